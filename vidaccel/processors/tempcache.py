"""TempCache: temporal KV-cache compression for autoregressive rollouts (shared/METHODS.md, "TempCache").

One room: the config (:class:`TempCacheConfig`), the runtime (:class:`TempCache`) and its cache
(:class:`MergedKVCache`). The work happens in the cache: the method makes each self-attention
module's rollout cache a :class:`MergedKVCache` (``make_kv_cache``), which merges near-duplicate keys
at every commit and hands attention its representatives with the bias ``log(count)``. The rollout
stage of :class:`~vidaccel.processors.base.AccelProcessor` prepends that cache to every
self-attention call, so the other methods of the processor (AnnSA, FlashBlock, ...) see the merged
cache like any other. The method itself only tells the cache the token grid (for the ``"local"``
search scope) and otherwise proceeds unchanged.

Example::

    pipe = CausalWanPipeline(transformer, scheduler)
    vidaccel.apply(pipe, vidaccel.TempCacheConfig(threshold=0.95, max_tokens=32_760))
    video = pipe(prompt_embeds=embeds, num_frames=240, chunk_frames=3).frames
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vidaccel import ops
from vidaccel._compat import renamed
from vidaccel.rollout import BufferedKVCache, RolloutState, check_count, kv_cache_of

from .base import AttentionCall, AttentionResult, Method, MethodConfig, Proceed, named_processor

__all__ = ["MergedKVCache", "TempCache", "TempCacheConfig", "TempCacheProcessor"]


@dataclass(frozen=True)
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
    the caches of a rollout (:class:`~vidaccel.pipelines.CausalWanPipeline`; install with ``vidaccel.apply``).

    Meaning:
        threshold: cosine similarity in [-1, 1] at or above which a key merges (τ). 1 merges only
            keys of (numerically) identical direction; the default 0.95 merges content that barely
            changed between frames. The defaults of ``threshold``, ``match_keys`` and ``per_head`` are
            the most merging setting within 0.5 dB of dense against the true frames on the game world
            model (measurements: ``benchmarks/results/world_model_tempcache.md``).
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
            merged representative loses the older key's spatial position (it loses far more than
            post-rotary against dense on the world model: ``world_model_tempcache.md``).
            Either way a representative attends with its most recent key post-rotary, i.e. at the
            rotary position of the most recent frame merged into it (positions continue across
            chunks; the rotary table is extended, never wrapped).
        per_head: ``False`` (default) makes one decision per token for all heads, on the mean over
            heads of the per-head cosine similarity, so a token merges only where every head's key
            agrees (closer to dense than per-head matching on the world model:
            ``world_model_tempcache.md``); ``True`` matches and merges each head on its own.

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
            raise ValueError(
                f"{type(self).__name__}.match_keys must be one of {self.MATCH_KEYS}, got {self.match_keys!r}"
            )
        if not isinstance(self.per_head, bool):
            raise ValueError(f"{type(self).__name__}.per_head must be a bool, got {self.per_head!r}")

    def build(self) -> Method:
        return TempCache(self)


class TempCache(Method):
    """The runtime half of :class:`TempCacheConfig`: makes each self-attention module's rollout cache a
    :class:`MergedKVCache` and tells it the token grid."""

    kinds = frozenset({"self"})
    needs_context = True
    needs_rollout = True

    def __init__(self, config: TempCacheConfig) -> None:
        super().__init__(config)
        self._warned: set[str] = set()

    def make_kv_cache(self, rollout: RolloutState | None = None) -> MergedKVCache:
        """A new merged cache for one self-attention module of ``rollout``: no larger than the tokens
        the rollout commits."""
        return MergedKVCache(self.config, rollout_tokens=getattr(rollout, "committed_tokens", None))

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        cache = kv_cache_of(call.context, call.attn)
        if isinstance(cache, MergedKVCache):
            if call.context.grid is not None:
                cache.observe_grid(call.context.grid)
        else:
            ops.warn_once(
                "TempCache acts on the KV cache of an autoregressive rollout (vidaccel.pipelines.CausalWanPipeline, "
                "installed with vidaccel.apply); calls without a TempCache rollout cache run exact attention",
                seen=self._warned,
                stacklevel=4,
            )
        return proceed(call)


TempCacheProcessor = named_processor("TempCacheProcessor", TempCacheConfig, default=True)


class MergedKVCache(BufferedKVCache):
    """TempCache's merged cache: representatives with counts, attended with the bias ``log(count)``.

    Args:
        config: :class:`TempCacheConfig` (threshold, sinks, budget, search scope,
            match keys, per-head decisions; its docstring gives every policy).
        rollout_tokens: the most tokens the rollout will ever commit to this cache (what a dense
            cache of it would hold), if known. The buffers then hold ``min(max_tokens,
            rollout_tokens)`` slots: a rollout shorter than the budget never evicts, so its result is
            the same, and a small model or a short rollout does not pay for Wan's budget.

    Per batch entry and head the cache holds ``n[b, h] <= config.max_tokens`` representatives in slots
    ``0 .. n[b, h] - 1`` (the sinks first). ``extend`` returns ``N = max n[b, h]`` slots followed by the
    call's own keys, with ``key_bias`` fp32 ``[B, H, N + S]``: ``log(count)`` for representatives,
    ``-inf`` for slots a head leaves empty, 0 for the own keys. All buffers are allocated at the first
    commit (``max_tokens`` slots, or fewer for a shorter rollout, plus one chunk), so memory stays flat
    for the whole rollout. A commit runs, per frame, the match and merge ops
    (:func:`vidaccel.ops.tempcache_match`, :func:`vidaccel.ops.tempcache_merge`) and synchronises with the host only to read the chunk's frame count and ``N``.

    The ``"local"`` scope needs the token grid's width; the TempCache method reports it from the step
    context (:meth:`observe_grid`). Without it the search widens to the whole previous frame, with one
    warning.
    """

    def __init__(self, config: TempCacheConfig, rollout_tokens: int | None = None) -> None:
        if not isinstance(config, TempCacheConfig):
            raise ValueError(f"MergedKVCache needs a vidaccel.TempCacheConfig, got {type(config).__name__}")
        check_count("MergedKVCache.rollout_tokens", rollout_tokens, 0, optional=True)
        super().__init__()
        self.config = config
        self.rollout_tokens = rollout_tokens
        self._cap = 0  # slots per batch entry and head, set at the first commit
        self._grid_hw: tuple[int, int] | None = None
        self._sink_tokens = 0
        self._upper = 0  # host-side upper bound of max n[b, h]: eviction is possible only past the budget
        self._warned: set[str] = set()

    def observe_grid(self, grid: tuple[int, int, int]) -> None:
        """Record the token grid ``(T, H, W)`` of the calls (tokens per frame ``H * W``, row width ``W``)."""
        self._grid_hw = (int(grid[1]), int(grid[2]))

    def extend(self, k, v):
        k_all, v_all, _ = super().extend(k, v)
        if self._filled == 0:
            return k_all, v_all, None
        self._bias[:, :, self._filled : self._filled + k.shape[1]] = 0.0
        return k_all, v_all, self._bias[:, :, : self._filled + k.shape[1]]

    def commit(self, k, v, *, k_pre, frame_index):
        frames, per_frame = self._start_commit(k, v, k_pre, frame_index)
        cfg = self.config
        if self._k is not None and k.untyped_storage().data_ptr() == self._k.untyped_storage().data_ptr():
            k, v = k.clone(), v.clone()  # the own keys of extend(): merging writes into that buffer
        if not self._tokens_per_frame:
            self._allocate(k, v, per_frame)
        match_src = k
        if cfg.match_keys == "pre_rotary":
            if k_pre is None:
                self._warn_once(
                    "TempCache: match_keys='pre_rotary' but the rollout passed no pre-rotary keys (k_pre); "
                    "matching post-rotary keys instead"
                )
            else:
                match_src = k_pre
        m_all = F.normalize(match_src.float(), dim=-1).to(k.dtype)
        self._bias[:, :, self._filled :] = float("-inf")  # the old own-key slots become cache slots
        for local in range(frames):
            part = slice(local * per_frame, (local + 1) * per_frame)
            if self._frames < cfg.sink_frames:
                self._append_sink(k[:, part], v[:, part], m_all[:, part])
            else:
                self._commit_frame(k[:, part], v[:, part], m_all[:, part])
            self._frames += 1
        self._commits += 1
        self._filled = int(self._n_reps.max())  # N: a host sync, once per commit

    @property
    def nbytes(self) -> int:
        extra = (
            (self._m, self._count, self._bias, self._last, self._pos_map) if self._tokens_per_frame else ()
        )
        return super().nbytes + sum(t.numel() * t.element_size() for t in extra)

    def stats(self) -> dict:
        """``tokens`` (``N``, the most representatives of any head), ``tokens_mean`` (over batch and
        heads), ``frames``, ``commits``, ``sink_tokens``, and over non-sink keys (counted per head):
        ``merged``, ``appended``, ``evicted`` and ``merge_rate = merged / (merged + appended)``."""
        if not self._tokens_per_frame:
            return {"tokens": 0, "tokens_mean": 0.0, "frames": 0, "commits": 0, "sink_tokens": 0,
                    "merged": 0, "appended": 0, "evicted": 0, "merge_rate": 0.0}  # fmt: skip
        merged, appended = int(self._merged), int(self._appended)
        return {
            "tokens": self._filled,
            "tokens_mean": float(self._n_reps.float().mean()),
            "frames": self._frames,
            "commits": self._commits,
            "sink_tokens": self._sink_tokens,
            "merged": merged,
            "appended": appended,
            "evicted": int(self._evicted),
            "merge_rate": merged / max(merged + appended, 1),
        }

    def _allocate(self, k: torch.Tensor, v: torch.Tensor, per_frame: int) -> None:
        cfg = self.config
        needed = (cfg.sink_frames + 1) * per_frame
        if cfg.max_tokens < needed:
            raise ValueError(
                f"TempCacheConfig.max_tokens must hold the sink frames plus one frame: at least "
                f"(sink_frames + 1) * tokens_per_frame = ({cfg.sink_frames} + 1) * {per_frame} = {needed} for this "
                f"model's frames, got {cfg.max_tokens}"
            )
        batch, seq, heads, dim = k.shape
        cap = cfg.max_tokens
        if self.rollout_tokens is not None:  # never more slots than the rollout commits: no eviction lost
            cap = min(cap, max(needed, self.rollout_tokens))
        self._cap = cap
        self._tokens_per_frame = per_frame
        self._sink_tokens = cfg.sink_frames * per_frame
        self._remember_layout(k, v)
        self._reserve(cap + seq)
        self._m = k.new_zeros((batch, cap, heads, dim))
        self._count = torch.zeros((batch, heads, cap), dtype=torch.int32, device=k.device)
        self._last = torch.full((batch, heads, cap + 1), torch.iinfo(torch.int64).max, device=k.device)
        self._n_reps = torch.zeros((batch, heads), dtype=torch.int64, device=k.device)
        self._pos_map = torch.full(
            (batch, heads if cfg.per_head else 1, per_frame), -1, dtype=torch.int32, device=k.device
        )
        self._merged, self._appended, self._evicted = (
            torch.zeros((), dtype=torch.int64, device=k.device) for _ in range(3)
        )

    def _reserve(self, tokens: int) -> None:
        old = self._k.shape[1] if self._k is not None else 0
        super()._reserve(tokens)
        size = self._k.shape[1]
        if size != old:
            bias = torch.full(
                (self._k.shape[0], self._k.shape[2], size), float("-inf"), device=self._k.device
            )
            if old:
                bias[:, :, :old] = self._bias
            self._bias = bias

    def _append_sink(self, k, v, m) -> None:
        """A sink frame: new representatives in the next slots, never matched, merged or evicted."""
        start, stop = self._upper, self._upper + k.shape[1]
        self._k[:, start:stop] = k
        self._v[:, start:stop] = v
        self._m[:, start:stop] = m
        self._count[:, :, start:stop] = 1
        self._bias[:, :, start:stop] = 0.0
        self._n_reps += k.shape[1]
        self._upper = stop

    def _commit_frame(self, k, v, m) -> None:
        """Match one (non-sink) frame's keys against the representatives, then merge or append them."""
        cfg = self.config
        batch, per_frame, heads, dim = k.shape
        cap = self._cap
        if cfg.per_head:
            keys, reps = m, self._m
        else:  # one decision for all heads: the dot product of the concatenated normalised heads / H
            keys, reps = m.reshape(batch, per_frame, 1, heads * dim), self._m.view(batch, cap, 1, heads * dim)
        if cfg.scope == "global":
            num_reps = self._n_reps if cfg.per_head else self._n_reps[:, :1]
            sim, slot = ops.tempcache_match(
                keys, reps, num_reps=num_reps.to(torch.int32), start=self._sink_tokens
            )
        else:
            width, radius = 1, -1
            if cfg.scope == "local":
                if self._grid_hw is not None and self._grid_hw[0] * self._grid_hw[1] == per_frame:
                    width, radius = self._grid_hw[1], cfg.radius
                else:
                    self._warn_once(
                        "TempCache: scope='local' needs the token grid of the rollout (reported through the step "
                        "context by vidaccel.apply); searching the whole previous frame instead"
                    )
            sim, slot = ops.tempcache_match(keys, reps, slot_map=self._pos_map, width=width, radius=radius)
        if not cfg.per_head:
            sim, slot = (sim / heads).expand(batch, heads, per_frame), slot.expand(batch, heads, per_frame)
        matched = (slot >= 0) & (sim >= cfg.threshold)  # [B, H, P]
        unmatched = ~matched
        rank = unmatched.cumsum(-1) - 1  # order of the new representatives, in token order
        count = self._n_reps[..., None]
        free = cap - count
        dest = count + rank
        if self._upper + per_frame > cap:  # the budget may overflow: evict least recently updated
            self._last.scatter_(2, torch.where(matched, slot.long(), cap), self._frames)  # merge targets stay
            oldest = torch.argsort(self._last[..., :cap], dim=-1, stable=True)
            evicted = torch.gather(oldest, 2, (rank - free).clamp(0, cap - 1))
            self._evicted += (unmatched & (rank >= free)).sum()
            dest = torch.where(rank < free, dest, evicted)
        slots = torch.where(matched, slot.long(), dest)
        ops.tempcache_merge(self._k, self._v, self._m, self._count, self._bias, k, v, m, slots, matched, sim)
        self._last.scatter_(2, slots, self._frames)
        self._n_reps = torch.clamp(self._n_reps + unmatched.sum(-1), max=cap)
        self._pos_map = (slots if cfg.per_head else slots[:, :1]).to(torch.int32)
        self._merged += matched.sum()
        self._appended += unmatched.sum()
        self._upper = min(cap, self._upper + per_frame)

    def _warn_once(self, message: str) -> None:
        ops.warn_once(message, seen=self._warned, stacklevel=4)


__getattr__ = renamed(
    __name__, {"TempCacheKV": ("vidaccel.processors.tempcache.MergedKVCache", lambda: MergedKVCache)}
)
