"""Pure-PyTorch references of the attention kernel family.

Same signatures as the Triton launchers in :mod:`vidaccel.kernels.attention` and
:mod:`vidaccel.kernels.merge`; fp32 math (fp64 for fp64 inputs); they honour every option (scale, key bias, block-sparse
plan, LSE). They are the CPU fallback and the test oracle.
"""

from __future__ import annotations

import math

import torch

from .plan import BlockPlan

# Upper bound on the fp32 score matrix one query chunk materialises.
_SCORE_BYTES = 256 * 2**20


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    plan: BlockPlan | None = None,
    return_lse: bool = False,
):
    """Softmax attention in fp32.

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, H, D]``; v: ``[B, Sk, H, Dv]``.
        scale: softmax scale, default ``1/sqrt(D)``.
        key_bias: fp32 ``[B|1, H|1, Sk]`` added to the logits; ``-inf`` masks a key.
        plan: block-sparse layout; each query visits only the key blocks listed for its block.
        return_lse: also return the natural-log LSE, fp32 ``[B, H, Sq]``.

    Returns ``out`` ``[B, Sq, H, Dv]`` in q's dtype, or ``(out, lse)``. A query with no visible key
    gets output 0 and LSE ``-inf``.
    """
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    math_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    qf, kf, vf = (t.to(math_dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    bias = None if key_bias is None else key_bias.to(math_dtype)[:, :, None, :]  # [B|1, H|1, 1, Sk]
    mask = None if plan is None else plan.expand_mask(seq_q, seq_k).to(q.device)

    chunk = max(1, _SCORE_BYTES // max(1, qf.element_size() * batch * heads * seq_k))
    outs, lses = [], []
    for start in range(0, seq_q, chunk):
        stop = min(seq_q, start + chunk)
        scores = torch.matmul(qf[:, :, start:stop], kf.transpose(-1, -2)) * scale  # [B, H, c, Sk]
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, start:stop], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, c]
        visible = torch.isfinite(lse)
        probs = torch.exp(scores - torch.where(visible, lse, 0.0)[..., None])
        probs = torch.where(visible[..., None], probs, 0.0)
        outs.append(torch.matmul(probs, vf))
        lses.append(torch.where(visible, lse, float("-inf")))
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=2).float()
    return out


def merge_attention_reference(out_a, lse_a, out_b, lse_b):
    """Exact merge of two partial attentions over disjoint key sets by their LSEs.

    ``out_*``: ``[B, S, H, D]``; ``lse_*``: fp32 ``[B, H, S]``. Returns ``(out, lse)`` with
    ``lse = logaddexp(lse_a, lse_b)`` and ``out = e^(lse_a-lse) out_a + e^(lse_b-lse) out_b``; where
    both LSEs are ``-inf`` the output is 0 and the LSE ``-inf``.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    visible = torch.isfinite(lse)
    safe = torch.where(visible, lse, 0.0)
    w_a = torch.where(visible, torch.exp(lse_a.float() - safe), 0.0).transpose(1, 2)[..., None]  # [B, S, H, 1]
    w_b = torch.where(visible, torch.exp(lse_b.float() - safe), 0.0).transpose(1, 2)[..., None]
    out = w_a * out_a.float() + w_b * out_b.float()
    return out.to(out_a.dtype), torch.where(visible, lse, float("-inf"))
