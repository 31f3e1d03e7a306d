"""Exact merge of two partial attention results by their LSEs, in Triton.

``_merge_attention_kernel`` (Triton only) and ``merge_attention_fwd`` (launcher). The reference is
``merge_attention_reference`` in :mod:`vidaccel.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_attention_kernel(
    OutA, LseA, OutB, LseB, Out, Lse,
    stride_oab, stride_oas, stride_oah,
    stride_obb, stride_obs, stride_obh,
    stride_ob, stride_os, stride_oh,
    stride_lab, stride_lah,
    stride_lbb, stride_lbh,
    stride_lb, stride_lh,
    heads, seq, head_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // heads).to(tl.int64)  # a batch offset can pass 2**31 elements
    i_h = i_bh % heads
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < seq
    m_sd = m_s[:, None] & (o_d[None, :] < head_dim)

    b_la = tl.load(LseA + i_b * stride_lab + i_h * stride_lah + o_s, mask=m_s, other=float("-inf"))
    b_lb = tl.load(LseB + i_b * stride_lbb + i_h * stride_lbh + o_s, mask=m_s, other=float("-inf"))
    b_max = tl.maximum(b_la, b_lb)
    m_visible = b_max > float("-inf")
    b_max_safe = tl.where(m_visible, b_max, 0.0)
    b_wa = tl.exp(b_la - b_max_safe)  # [BS], each in [0, 1]
    b_wb = tl.exp(b_lb - b_max_safe)
    b_sum = tl.where(m_visible, b_wa + b_wb, 1.0)
    b_lse = tl.where(m_visible, b_max + tl.log(b_sum), float("-inf"))

    p_a = OutA + i_b * stride_oab + i_h * stride_oah + o_s[:, None] * stride_oas + o_d[None, :]
    p_b = OutB + i_b * stride_obb + i_h * stride_obh + o_s[:, None] * stride_obs + o_d[None, :]
    b_a = tl.load(p_a, mask=m_sd, other=0.0).to(tl.float32)  # [BS, BD]
    b_b = tl.load(p_b, mask=m_sd, other=0.0).to(tl.float32)
    b_out = (b_a * (b_wa / b_sum)[:, None] + b_b * (b_wb / b_sum)[:, None])
    p_o = Out + i_b * stride_ob + i_h * stride_oh + o_s[:, None] * stride_os + o_d[None, :]
    tl.store(p_o, b_out.to(Out.dtype.element_ty), mask=m_sd)
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + o_s, b_lse, mask=m_s)


def unsupported_reason(out_a: torch.Tensor, out_b: torch.Tensor) -> str | None:
    """Why the merge kernel cannot serve these partials (None when it can)."""
    if out_a.dtype == torch.float64:
        return "dtype torch.float64 (kernel: fp16, bf16, fp32)"
    if max(t.shape[1] * t.stride(1) for t in (out_a, out_b)) >= 2**31:
        return "more than 2**31 elements within one batch entry (the kernel's token offsets are int32)"
    return None


def merge_attention_fwd(out_a, lse_a, out_b, lse_b):
    """Launch the merge. ``out_*`` ``[B, S, H, D]`` (last dim contiguous), ``lse_*`` fp32 ``[B, H, S]``.

    Returns ``(out, lse)``: ``out`` in ``out_a``'s dtype, ``lse`` fp32; rows where both LSEs are
    ``-inf`` get output 0 and LSE ``-inf``. Under ``torch.compile`` it runs as the opaque custom op
    ``vidaccel::merge_attention_fwd``.
    """
    launch = _merge_attention_op if torch.compiler.is_compiling() else _launch_merge_attention
    return launch(out_a, lse_a, out_b, lse_b)


def _launch_merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, head_dim = out_a.shape
    out_a, out_b = (t if t.stride(-1) == 1 else t.contiguous() for t in (out_a, out_b))
    lse_a, lse_b = (t if t.stride(-1) == 1 else t.contiguous() for t in (lse_a, lse_b))
    out = torch.empty_like(out_a)
    lse = torch.empty((batch, heads, seq), device=out_a.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(seq, block_s), batch * heads)
    _merge_attention_kernel[grid](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1), out_a.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_a.stride(0), lse_a.stride(1),
        lse_b.stride(0), lse_b.stride(1),
        lse.stride(0), lse.stride(1),
        heads, seq, head_dim,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
    )
    return out, lse


_merge_attention_op = torch.library.custom_op("vidaccel::merge_attention_fwd", mutates_args=())(
    _launch_merge_attention
)


@_merge_attention_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    return torch.empty_like(out_a), torch.empty_like(lse_a, dtype=torch.float32)
