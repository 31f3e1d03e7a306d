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
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from vidaccel.kernels.plan import BlockPlan, check_block_size, plan_blocks
from vidaccel.kernels.reference import attention_reference, merge_attention_reference

__all__ = ["attention", "merge_attention", "plan_blocks", "BlockPlan", "BACKENDS", "window_attention"]

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
            raise ValueError(f"plan must be a BlockPlan from vidaccel.ops.plan_blocks, got {type(plan).__name__}")
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
        raise ValueError(f"out_a and out_b must be [B, S, H, D] of one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if out_a.dtype != out_b.dtype or out_a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_a and out_b must share one float dtype, got {out_a.dtype} and {out_b.dtype}")
    batch, seq, heads, _ = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != (batch, heads, seq) or lse.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 [B, H, S] = {(batch, heads, seq)}, got {tuple(lse.shape)} {lse.dtype}")
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
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 3
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
    if math.prod(grid) != q.shape[1] or k.shape[1] != q.shape[1]:
        raise ValueError(f"grid {tuple(grid)} holds {math.prod(grid)} tokens; q has {q.shape[1]} and k {k.shape[1]}")
    if (
        not isinstance(half_window, (tuple, list))
        or len(half_window) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in half_window)
    ):
        raise ValueError(f"half_window must be two ints >= 0 (d_h, d_w), got {half_window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0 (or None for 1/sqrt(D)), got {scale!r}")
    from vidaccel.kernels.window import (
        DEFAULT_TILES,
        plan_window,
        window_attention_reference,
        window_covers_grid,
    )

    if window_covers_grid(grid, half_window):
        return attention(q, k, v, scale=scale, return_lse=return_lse, backend=backend)
    tiles = DEFAULT_TILES if tiles is None else tiles
    if (
        not isinstance(tiles, (tuple, list))
        or len(tiles) != 2
        or not all(
            isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, int) and x >= 1 for x in t)
            for t in tiles
        )
    ):
        raise ValueError(f"tiles must be ((q_rows, q_cols), (k_rows, k_cols)) of positive ints, got {tiles!r}")
    plan = plan_window(grid, half_window, tiles, q.device)
    reason = None if backend == "reference" else _kernel_unsupported_reason("window", q, k, v, plan)
    if _use_triton_for(backend, q, reason, "window_attention"):
        from vidaccel.kernels.window import window_attention_fwd

        return window_attention_fwd(q, k, v, plan=plan, scale=scale, return_lse=return_lse)
    return window_attention_reference(
        q, k, v, grid=tuple(grid), half_window=tuple(half_window), scale=scale, return_lse=return_lse
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
        raise ValueError(f"q, k, v must share one float dtype (fp16, bf16, fp32, fp64), got {q.dtype}, {k.dtype}, {v.dtype}")
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
        raise ValueError(f"key_bias must be [B|1, H|1, Sk] = [{batch}|1, {heads}|1, {seq_k}], got {tuple(key_bias.shape)}")
    if key_bias.dtype != torch.float32:
        raise ValueError(f"key_bias must be float32, got {key_bias.dtype}")
    if key_bias.device != q.device:
        raise ValueError(f"key_bias is on {key_bias.device}, q on {q.device}")


def _check_layout(mask, name, block_size, q, batch, heads, seq_q, seq_k):
    bq, bk = block_size
    n_q, n_k = -(-seq_q // bq), -(-seq_k // bk)
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"{name} must be a 4-D bool tensor [B|1, H|1, n_q_blocks, n_k_blocks], got {tuple(mask.shape)} {mask.dtype}")
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
        else:
            from vidaccel.kernels.merge import unsupported_reason
    except ImportError as exc:  # no Triton on this platform
        return f"Triton unavailable ({exc})"
    return unsupported_reason(*args)


def _use_triton_for(backend, tensor, reason, op) -> bool:
    if backend == "reference":
        return False
    device_ok = tensor.is_cuda or (backend == "triton" and _interpreting())
    if backend == "triton":
        if not device_ok:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {tensor.device}); on CPU it runs only under the "
                "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
        if reason is not None:
            raise ValueError(f"backend='triton' cannot serve this {op} call: {reason}; use backend='auto' or 'reference'")
        return True
    if not tensor.is_cuda:
        reason = f"tensors on {tensor.device.type} (the Triton kernels run on CUDA)"
    if reason is not None:
        _warn_once(f"vidaccel.ops.{op}: running the PyTorch reference instead of the Triton kernel: {reason}")
        return False
    return True


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
