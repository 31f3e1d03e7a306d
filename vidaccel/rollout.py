"""The contract between rollout pipelines and processors: the rollout's state, its KV caches.

A pipeline that generates chunk by chunk (:class:`~vidaccel.pipelines.CausalWanPipeline`) opens a
:class:`RolloutState` on the transformer's step context (:func:`set_rollout`); every vidaccel processor
reads it (:func:`rollout_of`) and keeps one KV cache per self-attention module in the context
(:func:`kv_cache_of`, :func:`set_kv_cache`). This module never imports a pipeline or a processor.

KV caches of autoregressive (chunk-by-chunk) rollouts: one per self-attention module.

A causal video model denoises one chunk of latent frames at a time; every call of a self-attention
module attends to the cache of earlier chunks followed by the chunk's own keys. When the chunk is
finished, the rollout runs one more ("commit") pass and adds the chunk's clean keys/values to the
cache. Three caches implement that contract (:class:`KVCache`):

- :class:`DenseKVCache` keeps every committed key (exact; cost grows with the rollout),
- :class:`RollingKVCache` keeps the first ``sink_frames`` frames and a window of the most recent
  frames (Self-Forcing's rolling cache; fixed cost, forgets the middle),
- a method may bring its own: :class:`~vidaccel.processors.tempcache.MergedKVCache` merges
  near-duplicate keys into representatives with a count, attended with the bias ``log(count)``
  (TempCache; fixed cost under a token budget, keeps a summary of everything).

Layout is batch-major ``[B, N, H, D]`` like diffusers' q/k/v. Every cache preallocates its buffer and
writes the call's own keys into the slot after the cache, so :meth:`KVCache.extend` returns views
instead of copying the cache on every call::

    cache = RollingKVCache(max_frames=21, sink_frames=3)
    k_all, v_all, bias = cache.extend(k, v)        # every call: [B, N + S, H, D]
    out = ops.attention(q, k_all, v_all, key_bias=bias)
    cache.commit(k, v, k_pre=k_pre, frame_index=frame_index)   # once per chunk, clean keys
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

__all__ = [
    "BufferedKVCache",
    "DenseKVCache",
    "KVCache",
    "RollingKVCache",
    "RolloutState",
    "kv_cache_of",
    "rollout_of",
    "set_kv_cache",
    "set_rollout",
]

# The keys under which the step context holds the rollout (``pipeline_state``) and each module's
# cache (``module_state``): private to this module, read and written only through the accessors.
_ROLLOUT_KEY = "rollout"
_KV_CACHE_KEY = "kv_cache"


class KVCache(ABC):
    """One self-attention module's cache of earlier chunks, batch-major ``[B, N, H, D]``.

    The shapes ``B``, ``H``, ``D``, ``Dv``, the dtype and the device are fixed by the first call; a
    later call with others raises ``ValueError``.
    """

    @abstractmethod
    def extend(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The keys/values one call attends to: the cache followed by this call's own keys.

        Args:
            k: own keys ``[B, S, H, D]``, post-rotary.
            v: own values ``[B, S, H, Dv]``.

        Returns ``(k_all [B, N+S, H, D], v_all [B, N+S, H, Dv], key_bias)`` where ``N`` is
        :attr:`num_external` and ``key_bias`` is fp32 ``[B|1, H|1, N+S]`` (0 for own keys,
        ``log(count)`` for merged representatives, ``-inf`` for empty slots) or ``None`` when it would
        be all zeros. ``k_all``/``v_all`` may be views of the cache's buffer, valid until the next
        ``extend`` or ``commit``.
        """

    @abstractmethod
    def commit(
        self, k: torch.Tensor, v: torch.Tensor, *, k_pre: torch.Tensor | None, frame_index: torch.Tensor
    ) -> None:
        """Add one finished chunk's clean keys/values.

        Args:
            k: keys ``[B, S, H, D]``, post-rotary (what later calls attend to).
            v: values ``[B, S, H, Dv]``.
            k_pre: the same keys before rotary embedding ``[B, S, H, D]``, or ``None``.
            frame_index: long ``[S]``, the absolute latent frame of each token (raster order, so
                each frame's tokens are contiguous and every frame has the same token count).
        """

    @property
    @abstractmethod
    def num_external(self) -> int:
        """``N``: the number of cache slots the next :meth:`extend` prepends (0 before any commit)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of device memory the cache holds (buffers included)."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters for logs and benchmarks: at least ``tokens`` (slots held) and ``frames`` committed."""


class BufferedKVCache(KVCache):
    """Shared mechanics of the caches: a preallocated ``[B, capacity + tail, H, D]`` buffer whose
    first ``_filled`` slots are the cache and whose next slots receive a call's own keys. A method's
    own cache (TempCache's) builds on it."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._filled = 0
        self._frames = 0
        self._commits = 0
        self._tokens_per_frame = 0

    @property
    def num_external(self) -> int:
        return self._filled

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)

    def extend(self, k, v):
        _check_kv(k, v, self._k, self._v)
        if self._filled == 0:
            return k, v, None
        seq = k.shape[1]
        self._reserve(self._filled + seq)
        self._k[:, self._filled : self._filled + seq].copy_(k)
        self._v[:, self._filled : self._filled + seq].copy_(v)
        return self._k[:, : self._filled + seq], self._v[:, : self._filled + seq], None

    def _reserve(self, tokens: int) -> None:
        """Make the buffer hold at least ``tokens`` slots (keeping the first ``_filled``)."""
        if self._k is not None and self._k.shape[1] >= tokens:
            return
        size = self._grown_size(tokens)
        old_k, old_v = self._k, self._v
        # Zeroed: TempCache returns slots that some heads leave empty (masked by a -inf bias), and a
        # masked key must still be finite.
        self._k = self._template_k.new_zeros((self._template_k.shape[0], size, *self._template_k.shape[2:]))
        self._v = self._template_v.new_zeros((self._template_v.shape[0], size, *self._template_v.shape[2:]))
        if old_k is not None and self._filled:
            self._k[:, : self._filled].copy_(old_k[:, : self._filled])
            self._v[:, : self._filled].copy_(old_v[:, : self._filled])

    def _start_commit(self, k, v, k_pre, frame_index) -> tuple[int, int]:
        """Checks shared by every commit, and the chunk's layout: ``-> (frames, tokens per frame)``."""
        _check_kv(k, v, self._k, self._v)
        _check_commit(k, k_pre, frame_index)
        self._remember_layout(k, v)
        frames = _count_frames(frame_index, k.shape[1], self)
        per_frame = k.shape[1] // frames
        if self._tokens_per_frame and per_frame != self._tokens_per_frame:
            raise ValueError(
                f"frames must keep one token count: the cache holds {self._tokens_per_frame} per frame, got {per_frame}"
            )
        return frames, per_frame

    def _remember_layout(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._k is None:
            self._template_k, self._template_v = k[:, :0], v[:, :0]

    def _grown_size(self, tokens: int) -> int:
        return tokens


class DenseKVCache(BufferedKVCache):
    """Keeps every committed key and value: exact attention to the whole past.

    Args:
        capacity_tokens: slots to preallocate at the first commit (e.g. the whole rollout's tokens),
            so the buffer never moves; ``None`` grows it by doubling. A rollout longer than the
            capacity still works (the buffer grows once).

    ``extend`` returns ``key_bias = None``.
    """

    def __init__(self, capacity_tokens: int | None = None) -> None:
        check_count("DenseKVCache.capacity_tokens", capacity_tokens, 1, optional=True)
        super().__init__()
        self.capacity_tokens = capacity_tokens
        self._tail = 0

    def commit(self, k, v, *, k_pre, frame_index):
        frames, self._tokens_per_frame = self._start_commit(k, v, k_pre, frame_index)
        seq = k.shape[1]
        self._tail = max(self._tail, seq)
        self._reserve(self._filled + seq + self._tail)
        self._k[:, self._filled : self._filled + seq].copy_(k)
        self._v[:, self._filled : self._filled + seq].copy_(v)
        self._filled += seq
        self._frames += frames
        self._commits += 1

    def stats(self) -> dict:
        return {"tokens": self._filled, "frames": self._frames, "commits": self._commits}

    def _grown_size(self, tokens: int) -> int:
        if self._k is None and self.capacity_tokens is not None:
            return max(tokens, self.capacity_tokens + self._tail)
        current = 0 if self._k is None else self._k.shape[1]
        return max(tokens, 2 * current)


class RollingKVCache(BufferedKVCache):
    """Self-Forcing's rolling window: the first ``sink_frames`` latent frames (attention sinks) plus
    the most recent ``max_frames - sink_frames`` frames, in a fixed buffer.

    Args:
        max_frames: latent frames the cache holds at most (the current chunk's own keys come on top).
        sink_frames: the first frames ever committed, kept for the whole rollout (``< max_frames``).

    Recent frames live in a ring, so a commit overwrites the oldest frame in place and never shifts
    the buffer; the key order inside the cache is therefore not chronological, which attention does
    not depend on. ``extend`` returns ``key_bias = None``.
    """

    def __init__(self, max_frames: int, sink_frames: int = 0) -> None:
        check_count("RollingKVCache.max_frames", max_frames, 1)
        if (
            not isinstance(sink_frames, int)
            or isinstance(sink_frames, bool)
            or not 0 <= sink_frames < max_frames
        ):
            raise ValueError(
                f"RollingKVCache.sink_frames must be an int in [0, max_frames - 1 = {max_frames - 1}], got {sink_frames!r}"
            )
        super().__init__()
        self.max_frames = max_frames
        self.sink_frames = sink_frames

    def commit(self, k, v, *, k_pre, frame_index):
        frames, per_frame = self._start_commit(k, v, k_pre, frame_index)
        seq = k.shape[1]
        self._tokens_per_frame = per_frame
        self._reserve(self.max_frames * per_frame + seq)
        ring = self.max_frames - self.sink_frames
        for local in range(frames):
            ordinal = self._frames + local
            slot = (
                ordinal
                if ordinal < self.sink_frames
                else self.sink_frames + (ordinal - self.sink_frames) % ring
            )
            src = slice(local * per_frame, (local + 1) * per_frame)
            dst = slice(slot * per_frame, (slot + 1) * per_frame)
            self._k[:, dst].copy_(k[:, src])
            self._v[:, dst].copy_(v[:, src])
        self._frames += frames
        self._commits += 1
        self._filled = min(self._frames, self.max_frames) * per_frame

    def stats(self) -> dict:
        return {
            "tokens": self._filled,
            "frames": self._frames,
            "commits": self._commits,
            "frames_held": min(self._frames, self.max_frames),
            "frames_dropped": max(0, self._frames - self.max_frames),
        }

    def _grown_size(self, tokens: int) -> int:
        # The window never grows; only a longer own chunk than before needs a larger tail.
        return tokens


@dataclass
class RolloutState:
    """What a rollout pipeline tells the processors about the rollout, for the length of one
    generation (:func:`set_rollout` on the step context; :func:`rollout_of` reads it).

    Attributes:
        chunk_frames: latent frames per chunk.
        num_chunks: chunks of the rollout (the last may be trimmed after generation).
        tokens_per_frame: tokens of one latent frame (``H/p_h * W/p_w``).
        max_cache_frames, sink_frames: the rolling-window baseline: each module's default cache
            holds at most ``max_cache_frames`` earlier latent frames, the first ``sink_frames`` kept
            (:class:`RollingKVCache`); ``None``: the whole past (:class:`DenseKVCache` sized for the
            rollout). A method that makes its own cache (TempCache) replaces the default.
        frame_offset: absolute latent frame of the current chunk's first frame.
        frame_index: long ``[S]`` on the model's device: the absolute latent frame of each token of
            the current chunk (raster order), passed to ``KVCache.commit``.
        steps_per_chunk: denoising steps of every chunk (``context.chunk_step`` runs from 0 to this
            minus 1), or ``None`` where unknown.
        committed_tokens: the most tokens the rollout commits to one layer's cache (every chunk but
            the last), which sizes the dense cache and bounds TempCache's; ``None`` where unknown.
    """

    chunk_frames: int
    num_chunks: int
    tokens_per_frame: int
    max_cache_frames: int | None = None
    sink_frames: int = 0
    frame_offset: int = 0
    frame_index: torch.Tensor | None = field(default=None, repr=False)
    steps_per_chunk: int | None = None
    committed_tokens: int | None = None

    def make_cache(self) -> KVCache:
        """The default KV cache of one self-attention module of this rollout (no method makes its
        own): the rolling window with ``max_cache_frames``, else a dense cache sized for the rollout."""
        if self.max_cache_frames is not None:
            return RollingKVCache(self.max_cache_frames, self.sink_frames)
        return DenseKVCache(max(self.committed_tokens or 0, 1))

    def enter_chunk(self, chunk_index: int, device: torch.device) -> None:
        """Point the state at chunk ``chunk_index``: its frame offset and token frame indices."""
        self.frame_offset = chunk_index * self.chunk_frames
        frames = torch.arange(self.frame_offset, self.frame_offset + self.chunk_frames, device=device)
        self.frame_index = frames.repeat_interleave(self.tokens_per_frame)


def rollout_of(context) -> RolloutState | None:
    """The rollout open on ``context`` (a :class:`~vidaccel.state.StepContext` or ``None``), or ``None``
    outside a rollout."""
    return None if context is None else context.pipeline_state.get(_ROLLOUT_KEY)


def set_rollout(context, rollout: RolloutState | None) -> None:
    """Open ``rollout`` on ``context`` for the generation (``None`` closes it; a context reset closes
    it too)."""
    if rollout is None:
        context.pipeline_state.pop(_ROLLOUT_KEY, None)
    else:
        context.pipeline_state[_ROLLOUT_KEY] = rollout


def kv_cache_of(context, attn: torch.nn.Module) -> KVCache | None:
    """The rollout KV cache of the self-attention module ``attn``, or ``None`` (none made yet, or no
    context)."""
    return None if context is None else context.module_state(attn).get(_KV_CACHE_KEY)


def set_kv_cache(context, attn: torch.nn.Module, cache: KVCache) -> KVCache:
    """Make ``cache`` the rollout KV cache of ``attn`` (released when the context resets); returns it."""
    context.module_state(attn)[_KV_CACHE_KEY] = cache
    return cache


def check_count(name: str, value, low: int, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int ``>= low`` (``bool`` is not), or
    ``None`` where ``optional``."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        suffix = " or None" if optional else ""
        raise ValueError(f"{name} must be an int in [{low}, inf){suffix}, got {value!r}")


def _check_kv(k, v, buf_k, buf_v) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, S, H, D], got {got}")
    if k.shape[:3] != v.shape[:3] or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"k and v must share [B, S, H], dtype and device, got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}"
        )
    if k.shape[1] == 0:
        raise ValueError("k and v need at least one token")
    if buf_k is not None:
        expected = (buf_k.shape[0], buf_k.shape[2], buf_k.shape[3], buf_v.shape[3], buf_k.dtype, buf_k.device)
        got = (k.shape[0], k.shape[2], k.shape[3], v.shape[3], k.dtype, k.device)
        if got != expected:
            raise ValueError(
                f"this cache holds (B, H, D, Dv, dtype, device) = {expected}, got {got}; one cache serves one "
                "attention module of one generation (a new batch size or dtype needs a new rollout)"
            )


def _check_commit(k, k_pre, frame_index) -> None:
    if k_pre is not None and (not isinstance(k_pre, torch.Tensor) or k_pre.shape != k.shape):
        got = tuple(k_pre.shape) if isinstance(k_pre, torch.Tensor) else type(k_pre).__name__
        raise ValueError(f"k_pre must be None or a tensor of k's shape {tuple(k.shape)}, got {got}")
    if (
        not isinstance(frame_index, torch.Tensor)
        or frame_index.dim() != 1
        or frame_index.shape[0] != k.shape[1]
    ):
        got = (
            tuple(frame_index.shape) if isinstance(frame_index, torch.Tensor) else type(frame_index).__name__
        )
        raise ValueError(
            f"frame_index must be a 1-D tensor of the chunk's {k.shape[1]} token frames, got {got}"
        )
    if frame_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"frame_index must be an integer (int64) tensor, got {frame_index.dtype}")


def _count_frames(frame_index: torch.Tensor, seq: int, cache: KVCache) -> int:
    """Number of frames in a committed chunk. Frames are contiguous and equal in size, so the first
    frame's token count gives it; one small host sync per commit (not per call)."""
    per_frame = int((frame_index == frame_index[0]).sum())
    if seq % per_frame:
        raise ValueError(
            f"{type(cache).__name__}.commit: frame_index must list whole frames of equal size in raster order, "
            f"got {seq} tokens with {per_frame} in the first frame"
        )
    return seq // per_frame
