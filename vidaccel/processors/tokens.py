"""Token helpers the methods share: per-head gathers, permuted block-sparse plans, cluster selection.

Methods compose through the chain and these helpers, never through each other's internals: AnnSA
builds a :class:`PermutedPlan`, FlashBlock's residual reuse runs one (:func:`run_plan`) that a later
method handed it through :meth:`~vidaccel.processors.base.Method.route`, and AnnCA selects prompt
tokens with :func:`select_clusters` and :func:`gather_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidaccel.kernels.plan import BlockPlan

from .base import AttentionCall, AttentionResult, Proceed

__all__ = ["PermutedPlan", "gather_tokens", "run_plan", "select_clusters", "take_rows", "token_rows"]


@dataclass(frozen=True)
class PermutedPlan:
    """A routed block-sparse layout in permuted token order, with its permutations (AnnSA's plan;
    FlashBlock's residual reuse splits and runs it through :func:`run_plan`).

    Attributes:
        blocks: the :class:`BlockPlan` ``[B, H, nq, nk]`` over permuted queries and keys.
        q_perm: int64 ``[B, H, Sq]``: permuted query ``i`` of head ``h`` is query ``q_perm[b, h, i]``.
        q_inverse: int64 ``[B, H, Sq]``, the inverse of ``q_perm``.
        k_perm: int64 ``[B, H, Sk]``, likewise for keys.
        q_rows, q_inverse_rows, k_rows: the same permutations as flat row indices into a
            ``[B * S * H, D]`` view of the tokens (:func:`token_rows`), so a call gathers in one kernel.
        centroids: fp32 ``[B*H, C, D]``, the planner's key centroids (the next rebuild's warm start).
        signature: ``(B, Sq, Sk, H, D, Dv, device)`` of the calls the plan serves.
    """

    blocks: BlockPlan
    q_perm: torch.Tensor
    q_inverse: torch.Tensor
    k_perm: torch.Tensor
    q_rows: torch.Tensor
    q_inverse_rows: torch.Tensor
    k_rows: torch.Tensor
    centroids: torch.Tensor
    signature: tuple

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited."""
        return self.blocks.density()


def run_plan(plan: PermutedPlan, call: AttentionCall, proceed: Proceed) -> AttentionResult:
    """Run ``call`` on ``plan``: permute q/k/v and ``key_bias``, ``proceed`` on the block-sparse
    layout, un-permute: ``-> (out [B, Sq, H, Dv], lse fp32 [B, H, Sq])`` in raster order."""
    batch, seq_k, heads, _ = call.k.shape
    bias = call.key_bias
    if bias is not None:
        bias = torch.gather(bias.expand(batch, heads, seq_k), 2, plan.k_perm)
    permuted = call.replace(
        q=take_rows(call.q, plan.q_rows),
        k=take_rows(call.k, plan.k_rows),
        v=take_rows(call.v, plan.k_rows),
        key_bias=bias,
        plan=plan.blocks,
        # Cache and own keys are interleaved now, unless every key is a cache key (FlashBlock's cache part).
        num_external=seq_k if call.num_external == seq_k else 0,
    )
    out, lse = proceed(permuted)
    return take_rows(out, plan.q_inverse_rows), torch.gather(lse, 2, plan.q_inverse)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-head token gather: ``out[b, i, h] = x[b, index[b, h, i], h]`` for ``x [B, S, H, D]`` and
    ``index`` int64 ``[B, H, N]`` -> contiguous ``[B, N, H, D]``."""
    return take_rows(x, token_rows(index, x.shape[1]))


def token_rows(index: torch.Tensor, seq: int) -> torch.Tensor:
    """Flat row indices ``[B * N * H]`` into a ``[B * seq * H, D]`` view of ``[B, seq, H, D]`` tokens
    that perform :func:`gather_tokens` with ``index`` int64 ``[B, H, N]``."""
    batch, heads, _ = index.shape
    rows = (torch.arange(batch, device=index.device)[:, None, None] * seq + index) * heads
    rows = rows + torch.arange(heads, device=index.device)[None, :, None]  # [B, H, N]
    return rows.transpose(1, 2).reshape(-1)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x [B, S, H, D]`` gathered by flat ``rows`` (:func:`token_rows`) -> contiguous ``[B, N, H, D]``."""
    batch, _, heads, dim = x.shape
    return x.reshape(-1, dim).index_select(0, rows).view(batch, -1, heads, dim)


def select_clusters(
    mass: torch.Tensor, *, top_p: float | None = None, top_k: int | None = None
) -> torch.Tensor:
    """Which clusters each row keeps: ``mass`` fp32 ``[..., C]`` (rows summing to 1) -> bool ``[..., C]``.

    ``top_p``: the smallest set of most massive clusters whose mass reaches ``top_p`` (at least
    one); ``top_p >= 1`` keeps every cluster. ``top_k``: the ``min(top_k, C)`` most massive.
    """
    if top_k is not None:
        chosen = mass.topk(min(top_k, mass.shape[-1]), dim=-1).indices
        return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, chosen, True)
    if top_p >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    ordered, order = mass.sort(dim=-1, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the clusters ranked above
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, order, before < top_p)
