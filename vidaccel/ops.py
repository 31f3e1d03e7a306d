"""Functional attention API that every vidaccel method uses.

Each op validates its input, then runs the Triton kernel (CUDA tensors, supported shapes) or the
pure-PyTorch reference, which honours the same options. Shapes follow diffusers: q/k/v are
``[B, S, H, D]`` with tokens in raster order; LSEs are fp32 natural-log ``[B, H, S]``.

Example::

    from vidaccel import ops
    out, lse = ops.attention(q, k, v, return_lse=True)                 # dense
    plan = ops.plan_blocks(block_mask, (128, 128))                     # once per step
    out = ops.attention(q, k, v, plan=plan)                            # block-sparse, every layer
    out, lse = ops.merge_attention(out_a, lse_a, out_b, lse_b)         # split-KV merge

This module is the one place that picks kernel or reference, for every kernel family: attention,
merge, window (above), k-means (:func:`kmeans_assign`, :func:`kmeans_update`) and TempCache's cache
update (:func:`tempcache_match`, :func:`tempcache_merge`). Each kernel module of
:mod:`vidaccel.kernels` declares its ``unsupported_reason(...)`` check and keeps its reference beside
the kernel; the choice and its one warning per reason (:func:`warn_once`) are made here.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from vidaccel.kernels.plan import BlockPlan, check_block_size, plan_blocks
from vidaccel.kernels.reference import attention_reference, merge_attention_reference

__all__ = [
    "BACKENDS",
    "BlockPlan",
    "attention",
    "kmeans_assign",
    "kmeans_update",
    "merge_attention",
    "plan_blocks",
    "tempcache_match",
    "tempcache_merge",
    "warn_once",
    "window_attention",
]

BACKENDS = ("auto", "triton", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    block_mask: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
    plan: BlockPlan | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Softmax attention, dense or block-sparse, with an optional per-key logit bias.

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, H, D]``; v: ``[B, Sk, H, Dv]``; one device, one float dtype.
        scale: softmax scale (> 0), default ``1/sqrt(D)``.
        key_bias: fp32 ``[B|1, H|1, Sk]`` added to every query's logits; ``-inf`` masks a key.
        block_mask: bool ``[B|1, H|1, ceil(Sq/bq), ceil(Sk/bk)]``: which key blocks each query block
            visits, at the granularity ``block_size = (bq, bk)``.
        plan: the same layout planned once by :func:`plan_blocks` (pass either this or ``block_mask``).
        return_lse: also return the fp32 natural-log LSE ``[B, H, Sq]``.
        backend: ``"auto"`` (Triton on CUDA where the kernel serves the call, else the reference,
            with one warning per reason), ``"triton"`` (forced; on CPU only under
            ``TRITON_INTERPRET=1``) or ``"reference"``.

    Returns ``out`` ``[B, Sq, H, Dv]`` in q's dtype, or ``(out, lse)``. A query with no visible key
    gets output 0 and LSE ``-inf``.
    """
    _check_backend(backend)
    _check_qkv(q, k, v)
    _check_inference(q, k, v)
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0 (or None for 1/sqrt(D)), got {scale!r}")
    if key_bias is not None:
        _check_key_bias(key_bias, q, batch, heads, seq_k)
    if block_mask is not None and plan is not None:
        raise ValueError("pass either block_mask or plan, not both")
    if block_mask is not None:
        block_size = check_block_size(block_size)
        _check_layout(block_mask, "block_mask", block_size, q, batch, heads, seq_q, seq_k)
        plan = plan_blocks(block_mask, block_size)
    elif plan is not None:
        if not isinstance(plan, BlockPlan):
            raise ValueError(
                f"plan must be a BlockPlan from vidaccel.ops.plan_blocks, got {type(plan).__name__}"
            )
        _check_layout(plan.block_mask, "plan", plan.block_size, q, batch, heads, seq_q, seq_k)
    if plan is not None and plan.kv_indices.device != q.device:
        plan = plan.to(q.device)

    if _use_triton(backend, q, k, v, plan):
        from vidaccel.kernels.attention import attention_fwd

        return attention_fwd(q, k, v, scale=scale, key_bias=key_bias, plan=plan, return_lse=return_lse)
    return attention_reference(q, k, v, scale=scale, key_bias=key_bias, plan=plan, return_lse=return_lse)


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: str = "auto",
):
    """Exact merge of two partial attentions over disjoint key sets: ``-> (out, lse)``.

    ``out_*`` ``[B, S, H, D]`` of one dtype; ``lse_*`` fp32 ``[B, H, S]``. The result equals
    attention over the union of the two key sets (split-KV identity).
    """
    _check_backend(backend)
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if out_a.dim() != 4 or out_a.shape != out_b.shape:
        raise ValueError(
            f"out_a and out_b must be [B, S, H, D] of one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}"
        )
    if out_a.dtype != out_b.dtype or out_a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_a and out_b must share one float dtype, got {out_a.dtype} and {out_b.dtype}")
    batch, seq, heads, _ = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != (batch, heads, seq) or lse.dtype != torch.float32:
            raise ValueError(
                f"{name} must be fp32 [B, H, S] = {(batch, heads, seq)}, got {tuple(lse.shape)} {lse.dtype}"
            )
    devices = {t.device for t in (out_a, lse_a, out_b, lse_b)}
    if len(devices) != 1:
        raise ValueError(f"merge_attention inputs must be on one device, got {sorted(map(str, devices))}")
    _check_inference(out_a, out_b, lse_a, lse_b)
    reason = None if backend == "reference" else _kernel_unsupported_reason("merge", out_a, out_b)
    if _use_triton_for(backend, out_a, reason, "merge_attention"):
        from vidaccel.kernels.merge import merge_attention_fwd

        return merge_attention_fwd(out_a, lse_a, out_b, lse_b)
    return merge_attention_reference(out_a, lse_a, out_b, lse_b)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    half_window: tuple[int, int],
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    tiles: tuple[tuple[int, int], tuple[int, int]] | None = None,
):
    """FreeSwim's inward sliding-window self-attention over the token grid ``(T, H, W)``.

    A query at row ``q_h``, column ``q_w`` of any frame sees, in every frame, the keys with rows in
    ``[s_h, s_h + 2 d_h]`` and columns in ``[s_w, s_w + 2 d_w]``, ``s = clamp(q - d, 0, max(n - 1 - 2d, 0))``:
    the window is shifted inward at the borders (shared/METHODS.md). Executed block-aligned in 2-D
    tiles by a Triton kernel (see :mod:`vidaccel.kernels.window`); exact.

    Args:
        q, k: ``[B, S, H, D]``; v: ``[B, S, H, Dv]``; tokens in diffusers' raster order over ``grid``
            (``S = T·H·W``), e.g. ``(21, 68, 120)`` for Wan at 1088×1920×81.
        grid: token grid ``(T, H, W)``.
        half_window: ``(d_h, d_w)``, e.g. ``(15, 26)`` for a model trained at 480×832.
        scale: softmax scale (> 0), default ``1/sqrt(D)``.
        return_lse: also return the fp32 natural-log LSE ``[B, H, S]``.
        backend: as for :func:`attention`.
        tiles: ``((q_rows, q_cols), (k_rows, k_cols))`` query and key tile shapes within a frame,
            default ``vidaccel.kernels.window.DEFAULT_TILES`` (8 × 16 each).

    Returns ``out`` ``[B, S, H, Dv]`` in q's dtype, or ``(out, lse)``. When the window covers the whole
    frame, this is dense attention and runs as such.
    """
    _check_backend(backend)
    _check_qkv(q, k, v)
    _check_inference(q, k, v)
    _check_window(q, k, grid, half_window, scale)
    from vidaccel.kernels.window import (
        DEFAULT_TILES,
        plan_window,
        window_attention_reference,
        window_covers_grid,
    )

    if window_covers_grid(grid, half_window):
        return attention(q, k, v, scale=scale, return_lse=return_lse, backend=backend)
    tiles = DEFAULT_TILES if tiles is None else tiles
    _check_tiles(tiles)
    plan = plan_window(grid, half_window, tiles, q.device)
    reason = None if backend == "reference" else _kernel_unsupported_reason("window", q, k, v, plan)
    if _use_triton_for(backend, q, reason, "window_attention"):
        from vidaccel.kernels.window import window_attention_fwd

        return window_attention_fwd(q, k, v, plan=plan, scale=scale, return_lse=return_lse)
    return window_attention_reference(
        q, k, v, grid=tuple(grid), half_window=tuple(half_window), scale=scale, return_lse=return_lse
    )


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2", *, backend: str = "auto"
) -> torch.Tensor:
    """Nearest centroid of each point: ``x`` ``[G, N, D]``, ``centroids`` ``[G, C, D]`` → int64
    assignment ``[G, N]``; ``metric`` ``"l2"`` or ``"ip"`` (largest inner product). Kernel:
    :mod:`vidaccel.kernels.kmeans` (CUDA, or CPU under the interpreter); reference elsewhere and
    with ``backend="reference"``."""
    from vidaccel.kernels import kmeans as km

    _check_backend(backend)
    reason = None if backend == "reference" else _kernel_unsupported_reason("kmeans", x)
    if _use_triton_for(backend, x, reason, "kmeans_assign", interpreted=True):
        return km.kmeans_assign_fwd(x, centroids, metric)[0]
    return km.kmeans_assign_reference(x, centroids, metric)[0]


def kmeans_update(
    x: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """One Lloyd update: the mean of each centroid's points (``assign`` ``[G, N]``, ``-1``: none), the
    old centroid where a cluster is empty. ``-> [G, C, D]``; ``backend`` as for :func:`kmeans_assign`."""
    from vidaccel.kernels import kmeans as km

    _check_backend(backend)
    reason = None if backend == "reference" else _kernel_unsupported_reason("kmeans", x)
    if _use_triton_for(backend, x, reason, "kmeans_update", interpreted=True):
        return km.kmeans_update_fwd(x, assign, centroids)
    return km.kmeans_update_reference(x, assign, centroids)


def tempcache_match(
    keys: torch.Tensor,
    reps: torch.Tensor,
    *,
    slot_map: torch.Tensor | None = None,
    num_reps: torch.Tensor | None = None,
    start: int = 0,
    width: int = 1,
    radius: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate representative of each new key by cosine similarity (TempCache's match).

    Args:
        keys: L2-normalised new keys ``[B, S, H, D]`` (one frame, raster order).
        reps: L2-normalised representative keys ``[B, C, H, D]`` (the cache's match keys).
        slot_map: int32 ``[B, H, M]``: candidate ``j`` is slot ``slot_map[b, h, j]`` (``-1``: none);
            ``j`` is a grid position of the previous frame (``M`` = tokens per frame). Exclusive with
            ``num_reps``.
        num_reps: int32 ``[B, H]``: candidates are the slots ``start <= c < num_reps[b, h]``.
        start: first candidate slot with ``num_reps`` (e.g. the first slot after the sinks).
        width: grid width (tokens per row), used with ``slot_map`` and ``radius >= 0``.
        radius: with ``slot_map``, keep only candidates within ``radius`` rows and columns of the key's
            own grid position (``-1``: the whole map).

    Returns ``(best_sim fp32 [B, H, S], best_slot int32 [B, H, S])``; ``best_slot = -1`` and
    ``best_sim = -inf`` where a key has no candidate. Ties go to the lowest slot.

    Example::

        sim, slot = ops.tempcache_match(k_new, cache_keys, slot_map=previous_frame_slots, width=52, radius=2)
        merge = (slot >= 0) & (sim >= 0.95)
    """
    from vidaccel.kernels import tempcache as tc

    tc.check_match(keys, reps, slot_map, num_reps)
    options = dict(slot_map=slot_map, num_reps=num_reps, start=start, width=width, radius=radius)
    reason = _kernel_unsupported_reason("tempcache", keys)
    if _use_triton_for("auto", keys, reason, "tempcache_match", interpreted=True):
        return tc.tempcache_match_fwd(keys, reps, **options)
    return tc.tempcache_match_reference(keys, reps, **options)


def tempcache_merge(rep_k, rep_v, rep_m, count, log_count, k, v, m, slot, merge, sim) -> None:
    """Write one frame's keys into TempCache's representatives, in place (TempCache's merge).

    Args:
        rep_k: representative keys ``[B, C, H, D]`` (post-rotary: what attention sees).
        rep_v: representative values ``[B, C, H, Dv]`` (the running mean of the merged values).
        rep_m: representative match keys ``[B, C, H, D]`` (normalised).
        count: int32 ``[B, H, C]``: keys merged into each representative.
        log_count: fp32 ``[B, H, C']`` with ``C' >= C``: ``log(count)``, the attention bias.
        k, v, m: the frame's keys ``[B, S, H, D]``, values ``[B, S, H, Dv]``, match keys ``[B, S, H, D]``.
        slot: int32/int64 ``[B, H, S]``: the slot each key goes to (``0 <= slot < C``).
        merge: bool ``[B, H, S]``: ``True`` merges into the representative at ``slot``; ``False``
            starts a new representative there (count 1, replacing whatever the slot held). A slot
            receives either merging keys only or exactly one new key.
        sim: fp32 ``[B, H, S]``: each key's match similarity.

    Several keys merging into one representative in the same call all count (deterministically):
    ``count += n``, ``value = (count_old * value + sum of the n values) / (count_old + n)``, and the
    representative takes the key (and match key) with the highest ``sim``, ties to the lowest token.
    """
    from vidaccel.kernels import tempcache as tc

    args = (rep_k, rep_v, rep_m, count, log_count, k, v, m, slot, merge, sim)
    if _use_triton_for(
        "auto", k, _kernel_unsupported_reason("tempcache", k), "tempcache_merge", interpreted=True
    ):
        tc.tempcache_merge_fwd(*args)
    else:
        tc.tempcache_merge_reference(*args)


def _check_window(q, k, grid, half_window, scale) -> None:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 3
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
    if math.prod(grid) != q.shape[1] or k.shape[1] != q.shape[1]:
        raise ValueError(
            f"grid {tuple(grid)} holds {math.prod(grid)} tokens; q has {q.shape[1]} and k {k.shape[1]}"
        )
    if (
        not isinstance(half_window, (tuple, list))
        or len(half_window) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in half_window)
    ):
        raise ValueError(f"half_window must be two ints >= 0 (d_h, d_w), got {half_window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0 (or None for 1/sqrt(D)), got {scale!r}")


def _check_tiles(tiles) -> None:
    if (
        not isinstance(tiles, (tuple, list))
        or len(tiles) != 2
        or not all(
            isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, int) and x >= 1 for x in t)
            for t in tiles
        )
    ):
        raise ValueError(
            f"tiles must be ((q_rows, q_cols), (k_rows, k_cols)) of positive ints, got {tiles!r}"
        )


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, S, H, D], got {got}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"q, k, v must share one float dtype (fp16, bf16, fp32, fp64), got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"head counts differ: q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of keys, got {k.shape[1]} and {v.shape[1]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} and {k.shape[3]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one token, got Sq={q.shape[1]}, Sk={k.shape[1]}")


def _check_inference(*tensors):
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "vidaccel attention is inference-only and has no backward: call it under torch.no_grad() or "
            "torch.inference_mode(), or use torch.nn.functional.scaled_dot_product_attention for training"
        )


def _check_key_bias(key_bias, q, batch, heads, seq_k):
    if not isinstance(key_bias, torch.Tensor) or key_bias.dim() != 3:
        got = tuple(key_bias.shape) if isinstance(key_bias, torch.Tensor) else type(key_bias).__name__
        raise ValueError(f"key_bias must be a 3-D tensor [B|1, H|1, Sk], got {got}")
    b, h, s = key_bias.shape
    if b not in (1, batch) or h not in (1, heads) or s != seq_k:
        raise ValueError(
            f"key_bias must be [B|1, H|1, Sk] = [{batch}|1, {heads}|1, {seq_k}], got {tuple(key_bias.shape)}"
        )
    if key_bias.dtype != torch.float32:
        raise ValueError(f"key_bias must be float32, got {key_bias.dtype}")
    if key_bias.device != q.device:
        raise ValueError(f"key_bias is on {key_bias.device}, q on {q.device}")


def _check_layout(mask, name, block_size, q, batch, heads, seq_q, seq_k):
    bq, bk = block_size
    n_q, n_k = -(-seq_q // bq), -(-seq_k // bk)
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D bool tensor [B|1, H|1, n_q_blocks, n_k_blocks], got {tuple(mask.shape)} {mask.dtype}"
        )
    b, h, mq, mk = mask.shape
    if b not in (1, batch) or h not in (1, heads) or (mq, mk) != (n_q, n_k):
        raise ValueError(
            f"{name} must be [B|1, H|1, ceil(Sq/bq), ceil(Sk/bk)] = [{batch}|1, {heads}|1, {n_q}, {n_k}] "
            f"for Sq={seq_q}, Sk={seq_k}, block_size={block_size}; got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device}, q on {q.device}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(backend, q, k, v, plan) -> bool:
    reason = None if backend == "reference" else _kernel_unsupported_reason("attention", q, k, v, plan)
    return _use_triton_for(backend, q, reason, "attention")


def _kernel_unsupported_reason(kernel: str, *args):
    """``vidaccel.kernels.<kernel>.unsupported_reason(*args)``: why that Triton kernel cannot serve the
    call, or None. Imported here, so that TRITON_INTERPRET can be set before Triton loads."""
    # Plain imports, not importlib: torch.compile traces through this function.
    try:
        if kernel == "attention":
            from vidaccel.kernels.attention import unsupported_reason
        elif kernel == "window":
            from vidaccel.kernels.window import unsupported_reason
        elif kernel == "kmeans":
            from vidaccel.kernels.kmeans import unsupported_reason
        elif kernel == "tempcache":
            from vidaccel.kernels.tempcache import unsupported_reason
        else:
            from vidaccel.kernels.merge import unsupported_reason
    except ImportError as exc:  # no Triton on this platform
        return f"Triton unavailable ({exc})"
    return unsupported_reason(*args)


def _use_triton_for(backend, tensor, reason, op, *, interpreted: bool = False) -> bool:
    """Whether ``op`` runs its Triton kernel: ``reason`` (the kernel's declared check) says why not.
    ``interpreted``: with ``backend="auto"``, CPU tensors under ``TRITON_INTERPRET=1`` run the kernel
    too (the small cache-update and k-means kernels; attention runs its reference there)."""
    if backend == "reference":
        return False
    device_ok = tensor.is_cuda or ((backend == "triton" or interpreted) and _interpreting())
    if backend == "triton":
        if not device_ok:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {tensor.device}); on CPU it runs only under the "
                "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
        if reason is not None:
            raise ValueError(
                f"backend='triton' cannot serve this {op} call: {reason}; use backend='auto' or 'reference'"
            )
        return True
    if not device_ok:
        reason = f"tensors on {tensor.device.type} (the Triton kernels run on CUDA)"
    if reason is not None:
        warn_once(
            f"vidaccel.ops.{op}: running the PyTorch reference instead of the Triton kernel: {reason}",
            stacklevel=4,
        )
        return False
    return True


def warn_once(
    message: str, *, seen: set[str] | None = None, category=UserWarning, stacklevel: int = 3
) -> None:
    """Warn with ``message`` unless it was warned before: once per process (``seen=None``), or once
    per owner of the set ``seen`` (a processor or cache warns once per instance). The one warn-once
    helper of vidaccel."""
    seen = _warned if seen is None else seen
    if message not in seen:
        seen.add(message)
        warnings.warn(message, category, stacklevel=stacklevel)
