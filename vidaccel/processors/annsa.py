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
from dataclasses import dataclass

import torch

from vidaccel import ann, ops
from vidaccel._compat import renamed
from vidaccel.kernels.plan import plan_blocks

from . import tokens
from .base import (
    AttentionCall,
    AttentionResult,
    Method,
    MethodConfig,
    Proceed,
    check_one_of_top_p_top_k,
    named_processor,
)
from .tokens import PermutedPlan, run_plan, select_clusters, token_rows

__all__ = ["AnnSA", "AnnSAConfig", "AnnSAPlan", "AnnSAProcessor", "build_plan", "chain_order", "plan_of"]

AnnSAPlan = PermutedPlan
"""AnnSA's plan: a :class:`~vidaccel.processors.tokens.PermutedPlan`."""


@dataclass(frozen=True)
class AnnSAConfig(MethodConfig):
    """AnnSA: ANN-routed block-sparse self-attention (shared/METHODS.md).

    Per layer and head, the keys are clustered by k-means (warm-started from the previous plan's
    centroids), tokens are permuted so that clusters are contiguous (queries grouped by the key
    cluster they score highest), and each query block visits the key blocks of the clusters that an
    ANN routing by centroid score selects. The plan is rebuilt every ``refresh_every`` steps and
    reused in between and across CFG passes.

    Meaning:
        n_clusters: k-means clusters per layer and head (>= 1; capped at the number of keys).
        top_p: keep, per query block, the clusters holding this cumulative share of the estimated
            attention mass, in (0, 1]; 1 keeps every cluster (exact dense attention).
        top_k: keep this many clusters per query block (>= 1). Set exactly one of top_p and top_k.
        refresh_every: steps between plan rebuilds (>= 1).
        dense_layers: the first blocks (transformer layers) that stay dense (>= 0).
        dense_steps: the first denoising steps that stay dense (>= 0); in rollouts the steps of each
            chunk (``context.chunk_step``).
        sink_tokens: the first keys that every query block always visits (>= 0).
    Performance:
        ann_backend: ``"auto"`` (triton on CUDA, faiss on CPU when installed, else exact),
            ``"triton"``, ``"faiss"`` or ``"exact"`` (see :mod:`vidaccel.ann`).
        kmeans_iters: Lloyd iterations per rebuild (>= 1).
        block_size: tokens per query and key block of the sparse layout; ``None``: 128 on CUDA, 32
            elsewhere. The Triton kernel needs a multiple of 32 (others run on the reference).

    Without the step context (plain ``set_attn_processor``) the layer and step are unknown: every
    layer and step is sparse and the plan is rebuilt at every call.
    """

    n_clusters: int = 64
    top_p: float | None = None
    top_k: int | None = None
    refresh_every: int = 5
    dense_layers: int = 1
    dense_steps: int = 2
    sink_tokens: int = 0
    ann_backend: str = "auto"
    kmeans_iters: int = 2
    block_size: int | None = None

    def __post_init__(self):
        self.check_range("n_clusters", low=1, integer=True)
        check_one_of_top_p_top_k(self)
        self.check_range("refresh_every", low=1, integer=True)
        self.check_range("dense_layers", low=0, integer=True)
        self.check_range("dense_steps", low=0, integer=True)
        self.check_range("sink_tokens", low=0, integer=True)
        self.check_range("kmeans_iters", low=1, integer=True)
        if self.block_size is not None:
            self.check_range("block_size", low=1, integer=True)
        ann.check_backend_name(self.ann_backend, f"{type(self).__name__}.ann_backend")

    def build(self) -> Method:
        return AnnSA(self)


_STATE_KEY = "annsa"


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
    keys = _cluster_keys(kg, bias, config, backend, centroids)

    # Queries: grouped by the key cluster they score highest, in layout order.
    q_assign = backend.assign(qg, keys.centroids, "ip")
    q_perm = torch.sort(torch.gather(keys.rank, 1, q_assign.long()), dim=1, stable=True).indices  # [G, Sq]
    offsets = torch.arange(groups, device=q.device)[:, None] * seq_q
    q_sorted = qg.reshape(-1, dim).index_select(0, (q_perm + offsets).reshape(-1)).view(groups, seq_q, dim)

    mass = backend.cluster_mass(q_sorted, kg, bias, keys.assign, keys.centroids, scale)  # [G, Sq, C]
    n_q_blocks = -(-seq_q // bq)
    # Every query keeps its own top_k clusters (or top_p of its own mass); a query block visits the
    # union over its queries, so no query loses its own clusters to a block majority.
    per_query = select_clusters(mass, top_p=config.top_p, top_k=config.top_k)
    selected = _block_reduce(per_query, bq, n_q_blocks, "any")

    n_k_blocks = -(-seq_k // bk)
    block_ids = torch.arange(n_k_blocks, device=k.device)
    first, last = keys.starts // bk, (keys.starts + keys.sizes - 1) // bk
    covers = (
        (block_ids >= first[..., None]) & (block_ids <= last[..., None]) & (keys.sizes[..., None] > 0)
    )  # [G, C, nk]
    mask = torch.matmul(selected.float(), covers.float()) > 0  # [G, nq, nk]
    mask[..., : -(-keys.sinks // bk)] = True

    shape = (batch, heads)
    q_perm, k_perm = q_perm.view(*shape, seq_q), keys.perm.view(*shape, seq_k)
    q_inverse = torch.argsort(q_perm, dim=2)
    return AnnSAPlan(
        blocks=plan_blocks(mask.view(*shape, n_q_blocks, n_k_blocks), (bq, bk)),
        q_perm=q_perm,
        q_inverse=q_inverse,
        k_perm=k_perm,
        q_rows=token_rows(q_perm, seq_q),
        q_inverse_rows=token_rows(q_inverse, seq_q),
        k_rows=token_rows(k_perm, seq_k),
        centroids=keys.centroids,
        signature=_signature(q, k, v_dim or dim),
    )


@dataclass(frozen=True)
class _KeyLayout:
    """The clustered keys of one plan: ``centroids`` ``[G, C, D]``, ``assign`` ``[G, Sk]``, ``rank``
    (each cluster's layout position) ``[G, C]``, the key permutation ``perm`` ``[G, Sk]``, each
    cluster's ``sizes`` and first permuted position ``starts`` ``[G, C]``, and the ``sinks`` count."""

    centroids: torch.Tensor
    assign: torch.Tensor
    rank: torch.Tensor
    perm: torch.Tensor
    sizes: torch.Tensor
    starts: torch.Tensor
    sinks: int


def _cluster_keys(kg, bias, config: AnnSAConfig, backend, centroids) -> _KeyLayout:
    """k-means over the grouped keys ``kg`` ``[G, Sk, D]`` (sinks and masked keys left out) and their
    layout: sinks first, clusters in chain order, masked keys last."""
    groups, seq_k, dim = kg.shape
    sinks = min(config.sink_tokens, seq_k)
    clustered = torch.arange(seq_k, device=kg.device)[None, :] >= sinks  # [1, Sk]
    if bias is not None:
        clustered = clustered & torch.isfinite(bias)
    clustered = clustered.expand(groups, seq_k)

    n_clusters = min(config.n_clusters, seq_k)
    if (
        centroids is None
        or tuple(centroids.shape) != (groups, n_clusters, dim)
        or centroids.device != kg.device
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
    perm = torch.sort(sort_key, dim=1, stable=True).indices  # [G, Sk]
    sizes = torch.zeros(groups, n_clusters, device=kg.device, dtype=torch.long)
    sizes.scatter_add_(1, torch.where(clustered, assign.long(), 0), clustered.long())
    ranked_sizes = torch.zeros_like(sizes).scatter_(1, rank, sizes)  # [G, C] in layout order
    starts = sinks + torch.gather(torch.cumsum(ranked_sizes, 1) - ranked_sizes, 1, rank)  # [G, C]
    return _KeyLayout(centroids, assign, rank, perm, sizes, starts, sinks)


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


def plan_of(context, attn: torch.nn.Module) -> AnnSAPlan | None:
    """The plan AnnSA last built for the self-attention module ``attn`` in this generation (benchmarks
    read its density), or ``None``."""
    return None if context is None else context.module_state(attn).get(_STATE_KEY, {}).get("plan")


class AnnSA(Method):
    """The runtime of :class:`AnnSAConfig` (see the module docstring)."""

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
                ops.warn_once(
                    "AnnSA: the call already has a block-sparse plan from an earlier method in the chain; "
                    "AnnSA leaves it unchanged (put AnnSA first to route it)",
                    seen=self._warned,
                    stacklevel=3,
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

    def route(self, call: AttentionCall, centroids: torch.Tensor | None = None) -> AnnSAPlan | None:
        """AnnSA's routing of ``call`` for a method before it (FlashBlock's residual reuse), k-means
        warm-started from ``centroids``; ``None`` where AnnSA leaves the call dense (:meth:`routes`)."""
        return self.plan(call, centroids) if self.routes(call) else None

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


AnnSAProcessor = named_processor("AnnSAProcessor", AnnSAConfig, default=False)


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


__getattr__ = renamed(
    __name__,
    {
        name: (f"vidaccel.processors.tokens.{name}", lambda name=name: getattr(tokens, name))
        for name in ("gather_tokens", "run_plan", "select_clusters", "take_rows", "token_rows")
    },
)
