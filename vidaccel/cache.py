"""KV caches of autoregressive (chunk-by-chunk) rollouts: one per self-attention module.

A causal video model denoises one chunk of latent frames at a time; every call of a self-attention
module attends to the cache of earlier chunks followed by the chunk's own keys. When the chunk is
finished, the rollout runs one more ("commit") pass and adds the chunk's clean keys/values to the
cache. Three caches implement that contract (:class:`KVCache`):

- :class:`DenseKVCache` keeps every committed key (exact; cost grows with the rollout),
- :class:`RollingKVCache` keeps the first ``sink_frames`` frames and a window of the most recent
  frames (Self-Forcing's rolling cache; fixed cost, forgets the middle),
- :class:`TempCacheKV` merges near-duplicate keys into representatives with a count, attended with
  the bias ``log(count)`` (TempCache; fixed cost under a token budget, keeps a summary of everything).

Layout is batch-major ``[B, N, H, D]`` like diffusers' q/k/v. Every cache preallocates its buffer and
writes the call's own keys into the slot after the cache, so :meth:`KVCache.extend` returns views
instead of copying the cache on every call::

    cache = RollingKVCache(max_frames=21, sink_frames=3)
    k_all, v_all, bias = cache.extend(k, v)        # every call: [B, N + S, H, D]
    out = ops.attention(q, k_all, v_all, key_bias=bias)
    cache.commit(k, v, k_pre=k_pre, frame_index=frame_index)   # once per chunk, clean keys
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from vidaccel.config import TempCacheConfig

__all__ = ["DenseKVCache", "KVCache", "RollingKVCache", "TempCacheKV"]


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


class _BufferedCache(KVCache):
    """Shared mechanics: a preallocated ``[B, capacity + tail, H, D]`` buffer whose first ``_filled``
    slots are the cache and whose next slots receive a call's own keys."""

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


class DenseKVCache(_BufferedCache):
    """Keeps every committed key and value: exact attention to the whole past.

    Args:
        capacity_tokens: slots to preallocate at the first commit (e.g. the whole rollout's tokens),
            so the buffer never moves; ``None`` grows it by doubling. A rollout longer than the
            capacity still works (the buffer grows once).

    ``extend`` returns ``key_bias = None``.
    """

    def __init__(self, capacity_tokens: int | None = None) -> None:
        if capacity_tokens is not None and (
            not isinstance(capacity_tokens, int) or isinstance(capacity_tokens, bool) or capacity_tokens < 1
        ):
            raise ValueError(
                f"DenseKVCache.capacity_tokens must be an int in [1, inf) or None, got {capacity_tokens!r}"
            )
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


class RollingKVCache(_BufferedCache):
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
        if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1:
            raise ValueError(f"RollingKVCache.max_frames must be an int in [1, inf), got {max_frames!r}")
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


class TempCacheKV(_BufferedCache):
    """TempCache's merged cache: representatives with counts, attended with the bias ``log(count)``.

    Args:
        config: :class:`~vidaccel.config.TempCacheConfig` (threshold, sinks, budget, search scope,
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
    for the whole rollout. A commit
    runs, per frame, the Triton match and merge kernels (:mod:`vidaccel.kernels.tempcache`; their
    references on CPU) and synchronises with the host only to read the chunk's frame count and ``N``.

    The ``"local"`` scope needs the token grid's width; the TempCache method reports it from the step
    context (:meth:`observe_grid`). Without it the search widens to the whole previous frame, with one
    warning.
    """

    def __init__(self, config: TempCacheConfig, rollout_tokens: int | None = None) -> None:
        if not isinstance(config, TempCacheConfig):
            raise ValueError(f"TempCacheKV needs a vidaccel.TempCacheConfig, got {type(config).__name__}")
        if rollout_tokens is not None and (
            not isinstance(rollout_tokens, int) or isinstance(rollout_tokens, bool) or rollout_tokens < 0
        ):
            raise ValueError(f"TempCacheKV.rollout_tokens must be an int in [0, inf) or None, got {rollout_tokens!r}")
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
        from vidaccel.kernels.tempcache import tempcache_match, tempcache_merge

        cfg = self.config
        batch, per_frame, heads, dim = k.shape
        cap = self._cap
        if cfg.per_head:
            keys, reps = m, self._m
        else:  # one decision for all heads: the dot product of the concatenated normalised heads / H
            keys, reps = m.reshape(batch, per_frame, 1, heads * dim), self._m.view(batch, cap, 1, heads * dim)
        if cfg.scope == "global":
            num_reps = self._n_reps if cfg.per_head else self._n_reps[:, :1]
            sim, slot = tempcache_match(
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
            sim, slot = tempcache_match(keys, reps, slot_map=self._pos_map, width=width, radius=radius)
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
        tempcache_merge(self._k, self._v, self._m, self._count, self._bias, k, v, m, slots, matched, sim)
        self._last.scatter_(2, slots, self._frames)
        self._n_reps = torch.clamp(self._n_reps + unmatched.sum(-1), max=cap)
        self._pos_map = (slots if cfg.per_head else slots[:, :1]).to(torch.int32)
        self._merged += matched.sum()
        self._appended += unmatched.sum()
        self._upper = min(cap, self._upper + per_frame)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)


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
