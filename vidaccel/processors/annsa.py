"""AnnSA: ANN-routed block-sparse self-attention (shared/METHODS.md, "AnnSA").

A plan, per layer, built from one call's queries and keys and reused by the calls until the next
refresh (the other CFG passes and the next ``refresh_every - 1`` steps):

1. k-means over the keys of every batch entry and head (``vidaccel.ann``), warm-started from the
   layer's previous centroids. Sink keys (the first ``sink_tokens``) and masked keys (``key_bias``
   ``-inf``) are not clustered.
2. A key permutation per head: sinks first, then the clusters one after another in a chained
   order (:func:`chain_order`: each cluster next to its nearest one, so the fragments of a
   structure split over several clusters share key blocks), masked keys last. A query permutation
   groups the queries by the key cluster they score highest, in the same order, so a query block
   is coherent.
3. Routing: every query's attention mass per cluster is estimated (from centroid scores and
   cluster sizes, ``log Σ exp(key_bias)`` of the members; exactly by the exact backend). Each query
   keeps its smallest cluster set holding ``top_p`` of its mass, or its ``top_k`` most massive
   clusters; a query block routes the union over its queries (so no query loses its own clusters
   to the block's majority) and visits every key block that overlaps a routed cluster, plus the
   sink blocks.

Each call then permutes q/k/v (and ``key_bias``, e.g. TempCache's ``log(count)``) with the plan,
runs the rest of the chain on the block-sparse layout and un-permutes output and LSE. The attention
over the visited blocks is exact, so ``top_p = 1`` reproduces dense attention.

Example::

    vidaccel.apply(pipe, vidaccel.AnnSAConfig(n_clusters=64, top_p=0.9))
    # or: pipe.transformer.set_attn_processor(vidaccel.AnnSAProcessor(vidaccel.AnnSAConfig(top_k=8)))
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from vidaccel import ann
from vidaccel.config import AnnSAConfig
from vidaccel.kernels.plan import BlockPlan, plan_blocks

from .base import AccelProcessor, AttentionCall, AttentionResult, Method, Proceed

__all__ = [
    "AnnSA",
    "AnnSAPlan",
    "AnnSAProcessor",
    "build_plan",
    "chain_order",
    "gather_tokens",
    "run_plan",
    "select_clusters",
]

_STATE_KEY = "annsa"


@dataclass(frozen=True)
class AnnSAPlan:
    """A routed block-sparse layout in permuted token order, with its permutations.

    Attributes:
        blocks: the :class:`BlockPlan` ``[B, H, nq, nk]`` over permuted queries and keys.
        q_perm: int64 ``[B, H, Sq]``: permuted query ``i`` of head ``h`` is query ``q_perm[b, h, i]``.
        q_inverse: int64 ``[B, H, Sq]``, the inverse of ``q_perm``.
        k_perm: int64 ``[B, H, Sk]``, likewise for keys.
        q_rows, q_inverse_rows, k_rows: the same permutations as flat row indices into a
            ``[B * S * H, D]`` view of the tokens (:func:`token_rows`), so a call gathers in one kernel.
        centroids: fp32 ``[B*H, C, D]``, the key centroids (the next rebuild's warm start).
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


def build_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    config: AnnSAConfig,
    *,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    v_dim: int | None = None,
    centroids: torch.Tensor | None = None,
) -> AnnSAPlan:
    """Cluster, permute and route one self-attention call: ``-> AnnSAPlan``.

    ``q [B, Sq, H, D]``, ``k [B, Sk, H, D]``, ``key_bias`` fp32 ``[B|1, H|1, Sk]`` or None;
    ``scale`` the softmax scale (default ``1/sqrt(D)``); ``v_dim`` the value head dim (default D);
    ``centroids`` fp32 ``[B*H, C, D]`` from an earlier plan (warm start; ignored if shaped otherwise).
    """
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    groups = batch * heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    backend = ann.get_backend(config.ann_backend, q.device)
    bq = bk = config.block_size or (128 if q.is_cuda else 32)

    kg = k.transpose(1, 2).reshape(groups, seq_k, dim)  # [G, Sk, D]
    qg = q.transpose(1, 2).reshape(groups, seq_q, dim)
    bias = None if key_bias is None else key_bias.expand(batch, heads, seq_k).reshape(groups, seq_k)
    sinks = min(config.sink_tokens, seq_k)
    clustered = torch.arange(seq_k, device=k.device)[None, :] >= sinks  # [1, Sk]
    if bias is not None:
        clustered = clustered & torch.isfinite(bias)
    clustered = clustered.expand(groups, seq_k)

    n_clusters = min(config.n_clusters, seq_k)
    if (
        centroids is None
        or tuple(centroids.shape) != (groups, n_clusters, dim)
        or centroids.device != k.device
    ):
        centroids = ann.init_centroids(kg, n_clusters)
    centroids, assign = backend.kmeans(kg, centroids, config.kmeans_iters, clustered)

    # Clusters laid out in chain order (each next to its most similar one), so that the fragments
    # of one true cluster (n_clusters > true clusters splits them) share key blocks and queries.
    rank = chain_order(centroids)  # [G, C]: the layout position of each cluster
    assign_rank = torch.gather(rank, 1, assign.long().clamp(min=0))
    # Keys: sinks (-1) first, clusters in layout order, masked keys (n_clusters) last.
    sort_key = torch.where(clustered, assign_rank, n_clusters)
    sort_key[:, :sinks] = -1
    k_perm = torch.sort(sort_key, dim=1, stable=True).indices  # [G, Sk]
    sizes = torch.zeros(groups, n_clusters, device=k.device, dtype=torch.long)
    sizes.scatter_add_(1, torch.where(clustered, assign.long(), 0), clustered.long())
    ranked_sizes = torch.zeros_like(sizes).scatter_(1, rank, sizes)  # [G, C] in layout order
    starts = sinks + torch.gather(torch.cumsum(ranked_sizes, 1) - ranked_sizes, 1, rank)  # [G, C]

    # Queries: grouped by the key cluster they score highest, in layout order.
    q_assign = backend.assign(qg, centroids, "ip")
    q_perm = torch.sort(torch.gather(rank, 1, q_assign.long()), dim=1, stable=True).indices  # [G, Sq]
    offsets = torch.arange(groups, device=q.device)[:, None] * seq_q
    q_sorted = qg.reshape(-1, dim).index_select(0, (q_perm + offsets).reshape(-1)).view(groups, seq_q, dim)

    mass = backend.cluster_mass(q_sorted, kg, bias, assign, centroids, scale)  # [G, Sq, C]
    n_q_blocks = -(-seq_q // bq)
    # Every query keeps its own top_k clusters (or top_p of its own mass); a query block visits the
    # union over its queries, so no query loses its own clusters to a block majority.
    per_query = select_clusters(mass, top_p=config.top_p, top_k=config.top_k)
    selected = _block_reduce(per_query, bq, n_q_blocks, "any")

    n_k_blocks = -(-seq_k // bk)
    block_ids = torch.arange(n_k_blocks, device=k.device)
    first, last = starts // bk, (starts + sizes - 1) // bk
    covers = (
        (block_ids >= first[..., None]) & (block_ids <= last[..., None]) & (sizes[..., None] > 0)
    )  # [G, C, nk]
    mask = torch.matmul(selected.float(), covers.float()) > 0  # [G, nq, nk]
    mask[..., : -(-sinks // bk)] = True

    shape = (batch, heads)
    q_perm, k_perm = q_perm.view(*shape, seq_q), k_perm.view(*shape, seq_k)
    q_inverse = torch.argsort(q_perm, dim=2)
    return AnnSAPlan(
        blocks=plan_blocks(mask.view(*shape, n_q_blocks, n_k_blocks), (bq, bk)),
        q_perm=q_perm,
        q_inverse=q_inverse,
        k_perm=k_perm,
        q_rows=token_rows(q_perm, seq_q),
        q_inverse_rows=token_rows(q_inverse, seq_q),
        k_rows=token_rows(k_perm, seq_k),
        centroids=centroids,
        signature=_signature(q, k, v_dim or dim),
    )


def run_plan(plan: AnnSAPlan, call: AttentionCall, proceed: Proceed) -> AttentionResult:
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


def chain_order(centroids: torch.Tensor) -> torch.Tensor:
    """A 1-D layout of clusters: ``centroids [G, C, D]`` -> int64 ``[G, C]``, the position of each
    cluster in a greedy nearest-neighbour chain (by squared distance) from cluster 0."""
    groups, n_clusters, _ = centroids.shape
    dist = torch.cdist(centroids.float(), centroids.float())  # [G, C, C]
    rank = torch.zeros(groups, n_clusters, device=centroids.device, dtype=torch.long)
    taken = torch.zeros(groups, n_clusters, device=centroids.device, dtype=torch.bool)
    current = torch.zeros(groups, 1, device=centroids.device, dtype=torch.long)
    positions = torch.arange(n_clusters, device=centroids.device)
    for position in positions[:-1]:
        taken.scatter_(1, current, True)
        rank.scatter_(1, current, position.expand(groups, 1))
        row = torch.gather(dist, 1, current[..., None].expand(-1, 1, n_clusters))[:, 0]  # [G, C]
        current = row.masked_fill(taken, float("inf")).argmin(1, keepdim=True)
    rank.scatter_(1, current, positions[-1].expand(groups, 1))
    return rank


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


class AnnSA(Method):
    """The runtime of :class:`~vidaccel.config.AnnSAConfig` (see the module docstring)."""

    kinds = frozenset({"self"})
    needs_context = True

    def __init__(self, config: AnnSAConfig) -> None:
        super().__init__(config)
        self._warned: set[str] = set()

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        if call.plan is not None:
            # A planned call of cache keys only is FlashBlock's residual reuse, routed with this
            # method's config (FlashBlock.bind); any other plan comes from a method that AnnSA follows.
            if call.num_external != call.k.shape[1]:
                warn_once(
                    self._warned,
                    "AnnSA: the call already has a block-sparse plan from an earlier method in the chain; "
                    "AnnSA leaves it unchanged (put AnnSA first to route it)",
                )
            return proceed(call)
        context = call.context
        if context is None:
            return run_plan(self.plan(call), call, proceed)
        if not self.routes(call):
            return proceed(call)
        step = context.chunk_step if context.chunk_step is not None else context.step_index
        state = context.module_state(call.attn).setdefault(_STATE_KEY, {})
        epoch = (context.chunk_index, context.phase, step // self.config.refresh_every)
        plan = state.get("plan")
        if (
            plan is None
            or state.get("epoch") != epoch
            or plan.signature != _signature(call.q, call.k, call.v.shape[-1])
        ):
            plan = state["plan"] = self.plan(call, None if plan is None else plan.centroids)
            state["epoch"] = epoch
        return run_plan(plan, call, proceed)

    def routes(self, call: AttentionCall) -> bool:
        """Whether ``call`` (with a step context) is routed sparse: not one of the first
        ``dense_steps`` steps (in rollouts, of the chunk) nor of the first ``dense_layers`` layers."""
        context = call.context
        step = context.chunk_step if context.chunk_step is not None else context.step_index
        return step >= self.config.dense_steps and (
            call.layer is None or call.layer.index >= self.config.dense_layers
        )

    def plan(self, call: AttentionCall, centroids: torch.Tensor | None = None) -> AnnSAPlan:
        """A new plan for ``call`` with this method's config (:func:`build_plan`), k-means warm-started
        from ``centroids`` (a previous plan's) when given."""
        return build_plan(
            call.q,
            call.k,
            self.config,
            key_bias=call.key_bias,
            scale=call.scale,
            v_dim=call.v.shape[-1],
            centroids=centroids,
        )


class AnnSAProcessor(AccelProcessor):
    """:class:`~vidaccel.processors.base.AccelProcessor` running AnnSA alone:
    ``AnnSAProcessor(config)`` is ``AccelProcessor(config)``."""

    def __init__(self, config: AnnSAConfig, *, backend: str = "auto") -> None:
        if not isinstance(config, AnnSAConfig):
            raise ValueError(f"config must be a vidaccel.AnnSAConfig, got {type(config).__name__}")
        super().__init__(config, backend=backend)


def warn_once(warned: set[str], message: str) -> None:
    """``warnings.warn(message)`` unless ``message`` is in ``warned`` (a method's set of warnings given)."""
    if message not in warned:
        warned.add(message)
        warnings.warn(message, stacklevel=3)


def _block_reduce(x: torch.Tensor, block: int, n_blocks: int, how: str) -> torch.Tensor:
    """``x [G, S, C]`` reduced over consecutive runs of ``block`` rows (the last may be shorter):
    the mean (fp32) or, for bool ``x``, ``"any"``."""
    groups, seq, n_clusters = x.shape
    padded = x.new_zeros(groups, n_blocks * block, n_clusters)
    padded[:, :seq] = x
    padded = padded.view(groups, n_blocks, block, n_clusters)
    if how == "any":
        return padded.any(2)
    rows = torch.full((n_blocks,), float(block), device=x.device)
    rows[-1] = seq - block * (n_blocks - 1)
    return padded.sum(2) / rows[:, None]


def _signature(q: torch.Tensor, k: torch.Tensor, v_dim: int) -> tuple:
    batch, seq_q, heads, dim = q.shape
    return (batch, seq_q, k.shape[1], heads, dim, v_dim, q.device)
