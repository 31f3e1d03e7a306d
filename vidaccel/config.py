"""Method configurations: one documented dataclass per acceleration method.

A config holds what a user chooses (meaning fields such as sparsity, window or threshold, and
performance fields such as tile sizes), validates it in ``__post_init__``, and builds the runtime
:class:`~vidaccel.processors.base.Method` that a processor runs::

    @dataclass
    class MyConfig(MethodConfig):
        top_p: float = 0.9        # meaning: attention mass each query keeps

        def __post_init__(self):
            self.check_range("top_p", low=0.0, high=1.0, low_open=True)

        def build(self) -> Method:
            return MyMethod(self)

    processor = vidaccel.AccelProcessor(MyConfig(top_p=0.8))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vidaccel.processors.base import Method

__all__ = [
    "AnnCAConfig",
    "AnnSAConfig",
    "FlashBlockConfig",
    "FreeSwimConfig",
    "MethodConfig",
    "TempCacheConfig",
]


@dataclass
class MethodConfig(ABC):
    """Base of every method's configuration.

    Subclasses are ``@dataclass`` es whose fields are the method's options. They validate every field
    in ``__post_init__`` (use :meth:`check_range`, which names the field and the allowed range in its
    ``ValueError``) and implement :meth:`build`. A config is plain data: it holds no tensors and no
    per-layer state, so one config may build the methods of many processors.
    """

    @abstractmethod
    def build(self) -> Method:
        """The runtime :class:`~vidaccel.processors.base.Method` this config describes."""

    def check_range(
        self,
        field: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        integer: bool = False,
    ) -> None:
        """Raise ``ValueError`` unless ``self.<field>`` is a number in the given range.

        ``low``/``high`` bound the range (``None``: unbounded), inclusive unless ``low_open`` /
        ``high_open``; ``integer`` also requires an ``int`` (``bool`` is never accepted). The message
        names the config, the field, the allowed range and the value, e.g.
        ``"AnnSAConfig.top_p must be a float in (0, 1], got 1.5"``.
        """
        value = getattr(self, field)
        kind = "an int" if integer else "a float"
        left = "-inf" if low is None else _fmt(low)
        right = "inf" if high is None else _fmt(high)
        allowed = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
        ok = (
            is_number
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))
        )
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field} must be {kind} in {allowed}, got {value!r}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _check_one_of_top_p_top_k(config) -> None:
    """AnnSA/AnnCA: exactly one of ``top_p`` in (0, 1] and ``top_k`` >= 1."""
    name = type(config).__name__
    if (config.top_p is None) == (config.top_k is None):
        raise ValueError(
            f"{name}: set exactly one of top_p (cumulative mass in (0, 1]) and top_k (an int >= 1), "
            f"got top_p={config.top_p!r}, top_k={config.top_k!r}"
        )
    if config.top_p is not None:
        config.check_range("top_p", low=0.0, high=1.0, low_open=True)
    else:
        config.check_range("top_k", low=1, integer=True)


@dataclass
class AnnSAConfig(MethodConfig):
    """AnnSA: ANN-routed block-sparse self-attention (shared/METHODS.md).

    Per layer and head, the keys are clustered by k-means (warm-started from the previous plan's
    centroids), tokens are permuted so that clusters are contiguous (queries grouped by the key
    cluster they score highest), and each query block visits the key blocks of the clusters that an
    ANN routing by centroid score selects. The plan is rebuilt every ``refresh_every`` steps and
    reused in between and across CFG passes.

    Meaning:
        n_clusters: k-means clusters per layer and head (>= 1; capped at the number of keys).
        top_p: keep, per query block, the clusters holding this cumulative share of the estimated
            attention mass, in (0, 1]; 1 keeps every cluster (exact dense attention).
        top_k: keep this many clusters per query block (>= 1). Set exactly one of top_p and top_k.
        refresh_every: steps between plan rebuilds (>= 1).
        dense_layers: the first blocks (transformer layers) that stay dense (>= 0).
        dense_steps: the first denoising steps that stay dense (>= 0); in rollouts the steps of each
            chunk (``context.chunk_step``).
        sink_tokens: the first keys that every query block always visits (>= 0).
    Performance:
        ann_backend: ``"auto"`` (triton on CUDA, faiss on CPU when installed, else exact),
            ``"triton"``, ``"faiss"`` or ``"exact"`` (see :mod:`vidaccel.ann`).
        kmeans_iters: Lloyd iterations per rebuild (>= 1).
        block_size: tokens per query and key block of the sparse layout; ``None``: 128 on CUDA, 32
            elsewhere. The Triton kernel needs a multiple of 32 (others run on the reference).

    Without the step context (plain ``set_attn_processor``) the layer and step are unknown: every
    layer and step is sparse and the plan is rebuilt at every call.
    """

    n_clusters: int = 64
    top_p: float | None = None
    top_k: int | None = None
    refresh_every: int = 5
    dense_layers: int = 1
    dense_steps: int = 2
    sink_tokens: int = 0
    ann_backend: str = "auto"
    kmeans_iters: int = 2
    block_size: int | None = None

    def __post_init__(self):
        from vidaccel.ann import check_backend_name

        self.check_range("n_clusters", low=1, integer=True)
        _check_one_of_top_p_top_k(self)
        self.check_range("refresh_every", low=1, integer=True)
        self.check_range("dense_layers", low=0, integer=True)
        self.check_range("dense_steps", low=0, integer=True)
        self.check_range("sink_tokens", low=0, integer=True)
        self.check_range("kmeans_iters", low=1, integer=True)
        if self.block_size is not None:
            self.check_range("block_size", low=1, integer=True)
        check_backend_name(self.ann_backend, f"{type(self).__name__}.ann_backend")

    def build(self) -> Method:
        from vidaccel.processors.annsa import AnnSA

        return AnnSA(self)


@dataclass
class AnnCAConfig(MethodConfig):
    """AnnCA: ANN-selected sparse cross-attention to the prompt (shared/METHODS.md).

    The prompt keys/values are reduced once per prompt: identical (key, value) rows of a head, such
    as Wan's zero padding to 512 tokens, merge exactly into one representative with logit bias
    ``log(count)``. Each frame (or query block) then attends only to the representatives whose
    estimated attention mass for it the ANN selects; the selection is rebuilt every
    ``refresh_every`` steps.

    Meaning:
        top_p: keep, per frame or block, the prompt representatives holding this cumulative share
            of the estimated attention mass, in (0, 1]; 1 keeps all (exact dense cross-attention).
        top_k: keep this many representatives (>= 1). Set exactly one of top_p and top_k.
        granularity: ``"frame"`` (one selection per latent frame; needs the step context's grid,
            else ``"block"`` is used) or ``"block"`` (one per ``block_tokens`` query tokens).
        refresh_every: steps between selection rebuilds (>= 1).
    Performance:
        ann_backend: as in :class:`AnnSAConfig`.
        query_clusters: k-means centroids summarising a frame's queries when scoring the prompt
            (>= 1; the exact backend scores every query).
        kmeans_iters: Lloyd iterations for those centroids (>= 1).
        block_tokens: query tokens per block for ``granularity="block"`` (>= 1).
    """

    top_p: float | None = None
    top_k: int | None = None
    granularity: str = "frame"
    refresh_every: int = 5
    ann_backend: str = "auto"
    query_clusters: int = 8
    kmeans_iters: int = 2
    block_tokens: int = 1024

    def __post_init__(self):
        from vidaccel.ann import check_backend_name

        _check_one_of_top_p_top_k(self)
        if self.granularity not in ("frame", "block"):
            raise ValueError(f"{type(self).__name__}.granularity must be 'frame' or 'block', got {self.granularity!r}")
        self.check_range("refresh_every", low=1, integer=True)
        self.check_range("query_clusters", low=1, integer=True)
        self.check_range("kmeans_iters", low=1, integer=True)
        self.check_range("block_tokens", low=1, integer=True)
        check_backend_name(self.ann_backend, f"{type(self).__name__}.ann_backend")

    def build(self) -> Method:
        from vidaccel.processors.annca import AnnCA

        return AnnCA(self)


@dataclass
class FreeSwimConfig(MethodConfig):
    """FreeSwim: inward sliding-window self-attention with the cross-attention override, for
    generation above the model's training resolution (shared/METHODS.md, FreeSwim).

    Meaning fields:
        train_size: ``(height, width)`` in pixels the model was trained at, e.g. ``(480, 832)`` for
            Wan2.1-1.3B; the half-window is half its token grid: ``(15, 26)``.
        temperature: use the self-attention scale ``sqrt(log(N_target) / log(N_train) / d)`` with
            ``N`` the tokens per frame at the target and at the training size.
        cache_steps: ``FreeSwimWanPipeline`` runs the full-attention branch at the steps where
            ``step % cache_steps == 0`` and reuses its cached cross-attention outputs in between.
        offload_cache: keep those cached outputs (bf16, one per block) in CPU memory instead of on
            the GPU (about 0.53 GB per block for Wan-1.3B at 1088×1920×81).
        spatial_compression: pixels per token along height and width (Wan: VAE 8 × patch 2 = 16).
        half_window: ``(d_h, d_w)`` in tokens, overriding the one derived from ``train_size``.
        target_tokens: ``N_target`` for the temperature, overriding the target grid's tokens per
            frame (the published code hard-codes 3120).

    Performance fields:
        tiles: ``((q_rows, q_cols), (k_rows, k_cols))``, the query and key tiles of the window
            kernel (``None``: ``vidaccel.kernels.window.DEFAULT_TILES``).
    """

    train_size: tuple[int, int] = (480, 832)
    temperature: bool = True
    cache_steps: int = 1
    offload_cache: bool = False
    spatial_compression: int = 16
    half_window: tuple[int, int] | None = None
    target_tokens: int | None = None
    tiles: tuple[tuple[int, int], tuple[int, int]] | None = None

    def __post_init__(self):
        self.check_range("cache_steps", low=1, integer=True)
        self.check_range("spatial_compression", low=1, integer=True)
        for name in ("temperature", "offload_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FreeSwimConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not _int_pair(self.train_size, self.spatial_compression):
            raise ValueError(
                f"FreeSwimConfig.train_size must be (height, width), two ints >= spatial_compression "
                f"({self.spatial_compression}), got {self.train_size!r}"
            )
        self.train_size = tuple(self.train_size)
        if self.half_window is not None:
            if not _int_pair(self.half_window, 0):
                raise ValueError(f"FreeSwimConfig.half_window must be None or two ints >= 0, got {self.half_window!r}")
            self.half_window = tuple(self.half_window)
        if self.target_tokens is not None:
            self.check_range("target_tokens", low=1, integer=True)
        if self.tiles is not None:
            if not (isinstance(self.tiles, (tuple, list)) and len(self.tiles) == 2 and all(_int_pair(t, 1) for t in self.tiles)):
                raise ValueError(
                    f"FreeSwimConfig.tiles must be None or ((q_rows, q_cols), (k_rows, k_cols)) of ints >= 1, got {self.tiles!r}"
                )
            self.tiles = tuple(tuple(t) for t in self.tiles)

    @property
    def train_grid(self) -> tuple[int, int]:
        """Token rows and columns of one frame at ``train_size``, e.g. ``(30, 52)``."""
        return self.train_size[0] // self.spatial_compression, self.train_size[1] // self.spatial_compression

    @property
    def window(self) -> tuple[int, int]:
        """The half-window ``(d_h, d_w)`` in tokens: ``half_window`` or half the training grid."""
        if self.half_window is not None:
            return self.half_window
        return self.train_grid[0] // 2, self.train_grid[1] // 2

    def attention_scale(self, frame_tokens: int, head_dim: int) -> float | None:
        """Self-attention scale at ``frame_tokens`` tokens per frame, or ``None`` (``1/sqrt(d)``)
        without ``temperature``. ``sqrt(log_{N_train}(N_target) / d)``, never below ``1/sqrt(d)``
        (a target smaller than the training size is not sharpened the other way)."""
        if not self.temperature:
            return None
        n_train = self.train_grid[0] * self.train_grid[1]
        n_target = self.target_tokens if self.target_tokens is not None else frame_tokens
        if n_train <= 1 or n_target <= n_train:
            return None
        return math.sqrt(math.log(n_target) / math.log(n_train) / head_dim)

    def build(self) -> Method:
        from vidaccel.processors.freeswim import FreeSwimMethod

        return FreeSwimMethod(self)


def _int_pair(value, low: int) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in value)
    )


@dataclass
class TempCacheConfig(MethodConfig):
    """TempCache: temporal KV-cache compression for autoregressive rollouts (shared/METHODS.md).

    When a finished chunk is committed to a self-attention module's cache, each new key (frame by
    frame) is matched to the cache's representatives. If its best cosine similarity reaches
    ``threshold`` it merges: the representative takes the new (most recent) key, its value becomes
    the running mean and its count grows; otherwise the key becomes a new representative (count 1).
    Attention over the cache adds the bias ``log(count)``, which is exact for identical keys (the
    merged-key identity). Keys of one frame are matched in parallel against the representatives as
    they stood after the previous frame, so keys of one frame never merge with each other; several
    keys of a frame that match one representative all merge into it (deterministically). It acts on
    the caches of :class:`~vidaccel.pipelines.CausalWanPipeline` (install with ``vidaccel.apply``).

    Meaning:
        threshold: cosine similarity in [-1, 1] at or above which a key merges (τ). 1 merges only
            keys of (numerically) identical direction; the default 0.95 merges content that barely
            changed between frames. The defaults of ``threshold``, ``match_keys`` and ``per_head`` were
            settled on the game world model (``benchmarks/bench_world_model.py``,
            ``benchmarks/results/world_model_tempcache.md``): the most merging setting within 0.5 dB
            of dense against the true frames.
        sink_frames: the first latent frames committed (>= 0) stay for the whole rollout as separate
            representatives: never matched, merged or evicted (attention sinks). Default 3, the first
            chunk of a 3-frame rollout, as Self-Forcing-style rollouts keep it.
        max_tokens: hard budget (>= 1) of representatives per layer, batch entry and head, sinks
            included. Default 32,760 = 21 latent frames at 480×832 (1,560 tokens each), the
            Self-Forcing window. When a frame's new representatives do not fit, the least recently
            updated non-sink representatives are evicted (ties: lowest slot) and their slots reused:
            content that stopped matching long ago goes first, content still tracked stays whatever
            its age. It must hold the sink frames plus one frame; this is checked at the first commit,
            when the frame size is known (``ValueError``).
        scope: where a key looks for its match. ``"local"`` (default): the representatives that the
            previous frame's keys within ``radius`` rows and columns of the key's grid position went
            to; video correspondence is mostly local, and a key then scores (2r+1)² candidates.
            ``"previous_frame"``: the representatives of all the previous frame's keys.
            ``"global"``: every non-sink representative (exhaustive; cost grows with the cache up to
            ``max_tokens``).
        radius: half-size in tokens of the ``"local"`` window (>= 0). Default 2 (5 × 5 positions).
        match_keys: ``"post_rotary"`` (default) matches what attention sees: Wan's rotary encodes the
            token's row and column as well as its frame, so a post-rotary match is also a spatial
            match, and similarity to the previous frame's keys decays only by one frame's temporal
            rotation. ``"pre_rotary"`` matches content regardless of position: identical content at
            another position of the 3-D rotary grid (flat regions of a frame) merges too, and the
            merged representative loses the older key's spatial position (on the world model it
            lost ≥ 4.9 dB against dense where post-rotary lost ≤ 0.7 dB).
            Either way a representative attends with its most recent key post-rotary, i.e. at the
            rotary position of the most recent frame merged into it (positions continue across
            chunks; the rotary table is extended, never wrapped).
        per_head: ``False`` (default) makes one decision per token for all heads, on the mean over
            heads of the per-head cosine similarity, so a token merges only where every head's key
            agrees (on the world model: 0.23 dB from dense at τ 0.95 where per-head matching lost
            0.71 dB); ``True`` matches and merges each head on its own.

    Memory: per layer, keys, values and the normalised match keys of ``max_tokens`` slots (plus one
    chunk) are allocated at the first commit and never grow; a rollout that commits fewer tokens
    than ``max_tokens`` (a short one, or a small model's) gets only as many slots as it commits,
    which changes nothing else: it never reaches the budget.
    """

    threshold: float = 0.95
    sink_frames: int = 3
    max_tokens: int = 32_760
    scope: str = "local"
    radius: int = 2
    match_keys: str = "post_rotary"
    per_head: bool = False

    SCOPES = ("local", "previous_frame", "global")
    MATCH_KEYS = ("pre_rotary", "post_rotary")

    def __post_init__(self):
        self.check_range("threshold", low=-1.0, high=1.0)
        self.check_range("sink_frames", low=0, integer=True)
        self.check_range("max_tokens", low=1, integer=True)
        self.check_range("radius", low=0, integer=True)
        if self.scope not in self.SCOPES:
            raise ValueError(f"{type(self).__name__}.scope must be one of {self.SCOPES}, got {self.scope!r}")
        if self.match_keys not in self.MATCH_KEYS:
            raise ValueError(f"{type(self).__name__}.match_keys must be one of {self.MATCH_KEYS}, got {self.match_keys!r}")
        if not isinstance(self.per_head, bool):
            raise ValueError(f"{type(self).__name__}.per_head must be a bool, got {self.per_head!r}")

    def build(self) -> Method:
        from vidaccel.processors.tempcache import TempCache

        return TempCache(self)


@dataclass
class FlashBlockConfig(MethodConfig):
    """FlashBlock: reuse of the block-external attention across a chunk's denoising steps
    (shared/METHODS.md, FlashBlock), for autoregressive rollouts (``CausalWanPipeline``).

    While a chunk is denoised, each self-attention call attends to the KV cache of earlier chunks
    (external: fixed until the chunk is committed) and to the chunk itself (internal: new every
    step). At a refresh step the external part is computed and its output and LSE are kept per
    layer; at the other steps only the internal part is computed and merged with the kept one by
    the exact split-KV identity. The commit pass runs plain attention and drops the kept state.

    Meaning:
        refresh_every: the external part is recomputed at the chunk steps where
            ``chunk_step % refresh_every == 0`` (>= 1; the first step of every chunk always
            refreshes). 1 recomputes it every step (exact dense cached attention).
        refresh_last: also refresh at the chunk's last denoising step, the one that sets the
            committed frame's detail (where the pipeline says how many steps a chunk has, as
            ``CausalWanPipeline`` does). The defaults (3, ``True``) refresh Self-Forcing's 4 steps at
            0 and 3: 2 of 4, the cost of ``refresh_every=2`` alone (steps 0 and 2), with the final
            step exact. On the game world model (32 frames, 3 worlds, CPU fp32) that moved
            FlashBlock's PSNR against the dense rollout from 19.3–20.9 dB to 22.9–25.2 dB, and its
            PSNR against the true frames from 0.07–0.59 dB below dense to 0.2–0.6 dB above.
    Performance:
        offload: keep the kept external outputs in (pinned) CPU memory between steps instead of on
            the GPU (copied back at every non-refresh step; worth it only when memory is tight).

    Composition: with TempCache the external part is the merged cache with its ``log(count)`` bias.
    With AnnSA (``vidaccel.apply(pipe, FlashBlockConfig(), AnnSAConfig(...))``) it becomes residual
    reuse: at a refresh step AnnSA's routing of the cache part is built and frozen; the routed cache
    blocks are recomputed every step with fresh queries, the unrouted remainder is computed once,
    kept with its LSE and merged in (the chunk's own keys go through AnnSA as usual). FlashBlock runs
    before AnnSA whatever the order of the configs.

    Memory: the kept external output costs ``B x chunk tokens x H x Dv`` in the model's dtype (bf16)
    plus an fp32 LSE ``B x H x chunk tokens`` per self-attention layer and pass (CFG pass). Wan2.1-1.3B
    with 3-frame chunks (4,680 tokens, 12 heads x 128, 30 layers): 13.7 MiB + 0.2 MiB per layer,
    0.41 GiB in all per batch entry; released at every commit. Residual reuse keeps the remainder
    instead (the same size) plus the frozen routing plan of the cache part.
    """

    refresh_every: int = 3
    refresh_last: bool = True
    offload: bool = False

    def __post_init__(self):
        self.check_range("refresh_every", low=1, integer=True)
        if not isinstance(self.refresh_last, bool):
            raise ValueError(f"{type(self).__name__}.refresh_last must be a bool, got {self.refresh_last!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"{type(self).__name__}.offload must be a bool, got {self.offload!r}")

    def build(self) -> Method:
        from vidaccel.processors.flashblock import FlashBlock

        return FlashBlock(self)
