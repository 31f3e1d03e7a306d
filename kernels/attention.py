"""Flash-attention forward in Triton: dense or block-sparse, with a per-key logit bias and LSE.

Layers (house style): ``_attention_fwd_kernel`` (Triton only), ``attention_fwd`` (launcher: checks
what the kernel serves, allocates, picks tiles, launches). Validation of user input and the choice
between kernel and reference live in :mod:`vidaccel.ops`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .plan import BlockPlan

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend_tile(
    b_q, b_acc, b_l, b_m, K, V, Bias, start_n, seq_k,
    stride_ks, stride_vs, tma_row, tma_col, qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MASK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """One online-softmax update of a query tile with the key tile starting at ``start_n``.

    ``Bias`` points at this batch and head. Without TMA, ``K`` and ``V`` are pointers to this batch
    and head; with TMA they are descriptors over ``[B * Sk, H * D]`` and ``tma_row``/``tma_col`` locate
    this batch and head (rows past seq_k then belong to the next batch and are masked like any key
    past seq_k). ``MASK_K`` masks keys at or past seq_k: only the last, partial tile needs it.
    """
    o_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_K:
        m_n = o_n < seq_k
    if USE_TMA:
        b_k = tl.trans(K.load([tma_row + start_n, tma_col]))  # [D, BN]
    else:
        o_d = tl.arange(0, HEAD_DIM)
        p_k = K + o_n[None, :] * stride_ks + o_d[:, None]
        if MASK_K:
            b_k = tl.load(p_k, mask=m_n[None, :], other=0.0)  # [D, BN]
        else:
            b_k = tl.load(p_k)
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION)  # [BM, BN] raw logits
    if HAS_BIAS:
        if MASK_K:
            b_bias = tl.load(Bias + o_n, mask=m_n, other=float("-inf"))
        else:
            b_bias = tl.load(Bias + o_n)
        b_s = b_s * qk_scale_log2 + b_bias[None, :] * 1.4426950408889634  # log2 domain
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    else:
        if MASK_K:
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        # Scale folded into the exponent below (one FMA per logit); the scale is positive.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale_log2)
    # A row that has seen only masked keys keeps max -inf; subtract 0 there instead of -inf so exp2
    # yields 0, not NaN.
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.math.exp2(b_m - b_m_safe)
    if HAS_BIAS:
        b_p = tl.math.exp2(b_s - b_m_safe[:, None])  # [BM, BN]
    else:
        b_p = tl.math.exp2(b_s * qk_scale_log2 - b_m_safe[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if USE_TMA:
        b_v = V.load([tma_row + start_n, tma_col])  # [BN, D]; masked keys have p = 0
    else:
        p_v = V + o_n[:, None] * stride_vs + o_d[None, :]
        if MASK_K:
            b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)  # [BN, D]
        else:
            b_v = tl.load(p_v)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Bias, KvIdx, KvCnt,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_biasb, stride_biash,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    heads, seq_q, seq_k, n_k_blocks, qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PLAN_BQ: tl.constexpr,
    PLAN_BK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PLAN: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b32 = i_bh // heads
    i_b = i_b32.to(tl.int64)  # a batch offset can pass 2**31 elements (e.g. B=3 at 14B, 1088x1920x81)
    i_h = i_bh % heads

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < seq_q
    tma_row = i_b32 * seq_k
    tma_col = i_h * HEAD_DIM
    if not USE_TMA:
        K += i_b * stride_kb + i_h * stride_kh
        V += i_b * stride_vb + i_h * stride_vh
    Bias += i_b * stride_biasb + i_h * stride_biash

    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)  # [BM, D]

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if HAS_PLAN:
        # Visit the key blocks listed for this query tile's plan row, BLOCK_N keys at a time. The
        # list is ascending, so only its last entry can be the partial block at the end of the keys.
        SUB: tl.constexpr = PLAN_BK // BLOCK_N
        i_row = (i_m * BLOCK_M) // PLAN_BQ
        p_idx = KvIdx + i_b * stride_ib + i_h * stride_ih + i_row * stride_iq
        n_listed = tl.load(KvCnt + i_b * stride_cb + i_h * stride_ch + i_row)
        n_full = n_listed
        if not EVEN_K:
            if n_listed > 0:
                i_last = tl.load(p_idx + n_listed - 1)
                n_full = tl.where(i_last == n_k_blocks - 1, n_listed - 1, n_listed)
        for it in range(0, n_full * SUB):
            start_n = tl.load(p_idx + it // SUB) * PLAN_BK + (it % SUB) * BLOCK_N
            b_acc, b_l, b_m = _attend_tile(b_q, b_acc, b_l, b_m, K, V, Bias, start_n, seq_k,
                                           stride_ks, stride_vs, tma_row, tma_col, qk_scale_log2,
                                           HEAD_DIM, BLOCK_N, HAS_BIAS, False, DOT_PRECISION, USE_TMA)
        if not EVEN_K:
            for it in range(0, (n_listed - n_full) * SUB):
                start_n = (n_k_blocks - 1) * PLAN_BK + it * BLOCK_N
                b_acc, b_l, b_m = _attend_tile(b_q, b_acc, b_l, b_m, K, V, Bias, start_n, seq_k,
                                               stride_ks, stride_vs, tma_row, tma_col, qk_scale_log2,
                                               HEAD_DIM, BLOCK_N, HAS_BIAS, True, DOT_PRECISION, USE_TMA)
    else:
        n_full = seq_k // BLOCK_N
        for it in range(0, n_full):
            b_acc, b_l, b_m = _attend_tile(b_q, b_acc, b_l, b_m, K, V, Bias, it * BLOCK_N, seq_k,
                                           stride_ks, stride_vs, tma_row, tma_col, qk_scale_log2,
                                           HEAD_DIM, BLOCK_N, HAS_BIAS, False, DOT_PRECISION, USE_TMA)
        if not EVEN_K:
            b_acc, b_l, b_m = _attend_tile(b_q, b_acc, b_l, b_m, K, V, Bias, n_full * BLOCK_N, seq_k,
                                           stride_ks, stride_vs, tma_row, tma_col, qk_scale_log2,
                                           HEAD_DIM, BLOCK_N, HAS_BIAS, True, DOT_PRECISION, USE_TMA)

    m_visible = b_l > 0.0
    b_out = b_acc / tl.where(m_visible, b_l, 1.0)[:, None]
    p_o = Out + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :]
    tl.store(p_o, b_out.to(Out.dtype.element_ty), mask=m_m[:, None])
    # Back from log2 to natural log at the boundary.
    b_lse = (b_m + tl.math.log2(tl.where(m_visible, b_l, 1.0))) * 0.6931471805599453
    b_lse = tl.where(m_visible, b_lse, float("-inf"))
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + o_m, b_lse, mask=m_m)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan | None) -> str | None:
    """Why the kernel cannot serve this call (None when it can). The reference serves every call."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (kernel: fp16, bf16, fp32)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} (kernel: q, k and v head dims equal and in {SUPPORTED_HEAD_DIMS})"
    if plan is not None and _pick_tiles(q, plan.block_size) is None:
        return f"block_size {plan.block_size} (kernel: bq and bk multiples of 32)"
    if max(t.shape[1] * t.stride(1) for t in (q, k, v)) >= 2**31:
        return "more than 2**31 elements within one batch entry (the kernel's token offsets are int32)"
    return None


# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA for K/V) by (head dim, fp32 or not), best
# first; the first whose tiles divide the plan's block size is used. Chosen on an H200 with
# benchmarks/tune_attention.py; the timings behind the order: benchmarks/results/attention_tiles.md.
_CUDA_TILES = {
    (128, False): [(128, 128, 8, 3, True), (128, 64, 8, 3, True), (64, 64, 4, 3, True), (64, 32, 4, 3, True),
                   (32, 32, 4, 2, True)],
    (64, False): [(128, 128, 4, 3, False), (128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 32, 4, 3, False),
                  (32, 32, 4, 2, False)],
    (128, True): [(64, 32, 4, 2, False), (32, 32, 4, 2, False)],
    (64, True): [(64, 32, 4, 2, False), (32, 32, 4, 2, False)],
}
# The interpreter runs one program at a time; small tiles keep tiny tests exhaustive.
_INTERPRETER_TILES = [(64, 32, 1, 1, False), (32, 32, 1, 1, False)]


def _pick_tiles(q: torch.Tensor, block_size: tuple[int, int] | None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, tma) for this call, or None if no tile divides the
    plan's ``block_size`` (``None`` for dense calls)."""
    candidates = _CUDA_TILES[(q.shape[-1], q.dtype == torch.float32)] if q.is_cuda else _INTERPRETER_TILES
    for tiles in candidates:
        if block_size is None or (block_size[0] % tiles[0] == 0 and block_size[1] % tiles[1] == 0):
            return tiles
    return None


def _use_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Load K/V tiles with the tensor-memory accelerator (Hopper and newer, contiguous K/V)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    if not (k.is_contiguous() and v.is_contiguous()):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    plan: BlockPlan | None = None,
    return_lse: bool = False,
):
    """Launch the Triton attention forward. Same signature and semantics as ``attention_reference``.

    q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` (last dim contiguous), ``key_bias`` fp32
    ``[B|1, H|1, Sk]``, ``plan`` a :class:`BlockPlan` on q's device. Returns ``out`` ``[B, Sq, H, D]``
    and, with ``return_lse``, fp32 natural-log ``lse`` ``[B, H, Sq]``.

    Under ``torch.compile`` the launch goes through the opaque custom op ``vidaccel::attention_fwd``
    (with a fake implementation for tracing), so a compiled model does not break its graph here;
    eager calls launch directly, without the dispatcher's overhead.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    indices, counts, block_q, block_k = (
        (None, None, 0, 0) if plan is None else (plan.kv_indices, plan.kv_counts, *plan.block_size)
    )
    launch = _attention_fwd_op if torch.compiler.is_compiling() else _launch_attention_fwd
    out, lse = launch(q, k, v, key_bias, indices, counts, block_q, block_k, scale)
    return (out, lse) if return_lse else out


def _launch_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    kv_indices: torch.Tensor | None,
    kv_counts: torch.Tensor | None,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate, pick tiles and launch; ``kv_indices``/``kv_counts`` and the plan's block size
    ``(block_q, block_k)`` describe a block-sparse layout (``None``/0 for dense). -> ``(out, lse)``."""
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sparse = kv_indices is not None
    block_m, block_n, num_warps, num_stages, tma_ok = _pick_tiles(q, (block_q, block_k) if sparse else None)

    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_q), device=q.device, dtype=torch.float32)

    if key_bias is not None:
        key_bias = key_bias if key_bias.stride(-1) == 1 else key_bias.contiguous()
        bias_strides = tuple(0 if key_bias.shape[i] == 1 else key_bias.stride(i) for i in range(2))
    else:
        bias_strides = (0, 0)

    if sparse:
        idx, cnt = kv_indices, kv_counts
        idx_strides = (0 if idx.shape[0] == 1 else idx.stride(0), 0 if idx.shape[1] == 1 else idx.stride(1), idx.stride(2))
        cnt_strides = (0 if cnt.shape[0] == 1 else cnt.stride(0), 0 if cnt.shape[1] == 1 else cnt.stride(1))
        plan_bq, plan_bk = block_q, block_k
        n_k_blocks = triton.cdiv(seq_k, block_k)
    else:
        idx = cnt = out
        idx_strides, cnt_strides = (0, 0, 0), (0, 0)
        plan_bq, plan_bk = block_m, block_n
        n_k_blocks = triton.cdiv(seq_k, block_n)

    use_tma = tma_ok and _use_tma(q, k, v)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor.from_tensor(k.view(batch * seq_k, heads * head_dim), [block_n, head_dim])
        v_arg = TensorDescriptor.from_tensor(v.view(batch * seq_k, heads * head_dim), [block_n, head_dim])
    else:
        k_arg, v_arg = k, v

    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _attention_fwd_kernel[grid](
        q, k_arg, v_arg, out, lse, key_bias if key_bias is not None else out, idx, cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        *bias_strides,
        *idx_strides,
        *cnt_strides,
        heads, seq_q, seq_k, n_k_blocks, scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PLAN_BQ=plan_bq,
        PLAN_BK=plan_bk,
        HAS_BIAS=key_bias is not None,
        HAS_PLAN=sparse,
        EVEN_K=seq_k % plan_bk == 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_TMA=use_tma,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse


_attention_fwd_op = torch.library.custom_op("vidaccel::attention_fwd", mutates_args=())(_launch_attention_fwd)


@_attention_fwd_op.register_fake
def _(q, k, v, key_bias, kv_indices, kv_counts, block_q, block_k, scale):
    batch, seq_q, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seq_q), dtype=torch.float32)
