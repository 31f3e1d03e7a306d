"""AnnCA: ANN-selected sparse cross-attention to the prompt (shared/METHODS.md, "AnnCA").

1. Once per prompt: identical (key, value) rows of each head, such as the projections of Wan's zero
   padding to 512 tokens, merge into one representative with logit bias ``log(count)``. Exact (the
   merged-key identity): attention over the representatives equals attention over the prompt.
2. Every ``refresh_every`` steps: each frame (``granularity="frame"``) or block of query tokens
   (``"block"``) estimates every representative's attention mass from a summary of its queries
   (the ANN backend's query centroids, weighted by cluster size; the exact backend uses every
   query) and keeps the representatives up to cumulative mass ``top_p`` (or the ``top_k`` best).
3. Every call: each frame attends only to its kept representatives (one dense attention per frame
   over a gathered key set, padded slots masked by ``key_bias``).

Derived prompt data (representatives, selections) lives in the layer's module state, keyed on the
prompt key/value tensors (identity and version first, content second), so it is computed once per
prompt whether or not the adapter re-projects the prompt at every call. ``top_p = 1`` reproduces
dense cross-attention.

Example::

    vidaccel.apply(pipe, vidaccel.AnnSAConfig(top_p=0.9), vidaccel.AnnCAConfig(top_p=0.95))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vidaccel import ann, ops

from .base import (
    AttentionCall,
    AttentionResult,
    Method,
    MethodConfig,
    Proceed,
    check_one_of_top_p_top_k,
    named_processor,
)
from .tokens import gather_tokens, select_clusters

__all__ = [
    "AnnCA",
    "AnnCAConfig",
    "AnnCAProcessor",
    "PromptSelection",
    "PromptReps",
    "merge_identical_keys",
    "select_prompt",
]

_STATE_KEY = "annca"
_MAX_PROMPTS = 4  # prompts remembered per layer (cond, uncond, and room for a change of prompt)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class AnnCAConfig(MethodConfig):
    """AnnCA: ANN-selected sparse cross-attention to the prompt (shared/METHODS.md).

    The prompt keys/values are reduced once per prompt: identical (key, value) rows of a head, such
    as Wan's zero padding to 512 tokens, merge exactly into one representative with logit bias
    ``log(count)``. Each frame (or query block) then attends only to the representatives whose
    estimated attention mass for it the ANN selects; the selection is rebuilt every
    ``refresh_every`` steps.

    Meaning:
        top_p: keep, per frame or block, the prompt representatives holding this cumulative share
            of the estimated attention mass, in (0, 1]; 1 keeps all (exact dense cross-attention).
        top_k: keep this many representatives (>= 1). Set exactly one of top_p and top_k.
        granularity: ``"frame"`` (one selection per latent frame; needs the step context's grid,
            else ``"block"`` is used) or ``"block"`` (one per ``block_tokens`` query tokens).
        refresh_every: steps between selection rebuilds (>= 1).
    Performance:
        ann_backend: as in :class:`AnnSAConfig`.
        query_clusters: k-means centroids summarising a frame's queries when scoring the prompt
            (>= 1; the exact backend scores every query).
        kmeans_iters: Lloyd iterations for those centroids (>= 1).
        block_tokens: query tokens per block for ``granularity="block"`` (>= 1).
    """

    top_p: float | None = None
    top_k: int | None = None
    granularity: str = "frame"
    refresh_every: int = 5
    ann_backend: str = "auto"
    query_clusters: int = 8
    kmeans_iters: int = 2
    block_tokens: int = 1024

    def __post_init__(self):
        check_one_of_top_p_top_k(self)
        if self.granularity not in ("frame", "block"):
            raise ValueError(
                f"{type(self).__name__}.granularity must be 'frame' or 'block', got {self.granularity!r}"
            )
        self.check_range("refresh_every", low=1, integer=True)
        self.check_range("query_clusters", low=1, integer=True)
        self.check_range("kmeans_iters", low=1, integer=True)
        self.check_range("block_tokens", low=1, integer=True)
        ann.check_backend_name(self.ann_backend, f"{type(self).__name__}.ann_backend")

    def build(self) -> Method:
        return AnnCA(self)


@dataclass(frozen=True)
class PromptReps:
    """A prompt's keys/values with identical rows merged, per head.

    Attributes:
        k: ``[B, R, H, D]`` representatives (zero in padding slots).
        v: ``[B, R, H, Dv]``.
        bias: fp32 ``[B, H, R]``: ``log(count)`` of each representative, ``-inf`` in padding slots
            (heads with fewer distinct rows than ``R``).
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class PromptSelection:
    """Which representatives each query group attends to.

    Attributes:
        index: int64 ``[B, H, n_groups, K]`` representative indices.
        bias: fp32 ``[B * n_groups, H, K]``: the representatives' ``log(count)``, ``-inf`` where a
            group keeps fewer than ``K``.
        group_size: query tokens per group (the last group may be shorter).
    """

    index: torch.Tensor
    bias: torch.Tensor
    group_size: int


def merge_identical_keys(k: torch.Tensor, v: torch.Tensor) -> PromptReps:
    """Merge bitwise-identical (key, value) rows per batch entry and head: ``k [B, S, H, D]``,
    ``v [B, S, H, Dv]`` -> :class:`PromptReps` with bias ``log(count)``."""
    batch, seq, heads, _ = k.shape
    bits = _BITS[k.element_size()]
    rows = torch.cat([k.contiguous().view(bits), v.contiguous().view(bits)], dim=-1)  # [B, S, H, D + Dv]
    rows = rows.transpose(1, 2).reshape(batch * heads * seq, -1).long()
    group = torch.arange(batch * heads, device=k.device).repeat_interleave(seq)  # (batch, head) of each row
    # One sort for all heads: the group id leads each row, so a group's distinct rows are contiguous.
    unique, inverse, counts = torch.unique(
        torch.cat([group[:, None], rows], dim=1), dim=0, return_inverse=True, return_counts=True
    )
    token = torch.arange(seq, device=k.device).repeat(batch * heads)
    first = torch.full((unique.shape[0],), seq, device=k.device, dtype=torch.long)
    first.scatter_reduce_(0, inverse, token, "amin")  # first token of each distinct row
    owner = unique[:, 0]
    per_group = torch.bincount(owner, minlength=batch * heads)
    n_reps = int(per_group.max())
    slot = torch.arange(unique.shape[0], device=k.device) - (torch.cumsum(per_group, 0) - per_group)[owner]
    index = torch.zeros(batch * heads, n_reps, device=k.device, dtype=torch.long)
    index[owner, slot] = first
    bias = torch.full((batch * heads, n_reps), float("-inf"), device=k.device)
    bias[owner, slot] = counts.float().log()
    index, bias = index.view(batch, heads, n_reps), bias.view(batch, heads, n_reps)
    present = torch.isfinite(bias).transpose(1, 2)[..., None]  # [B, R, H, 1]
    k_rep = torch.where(present, gather_tokens(k, index), 0.0).to(k.dtype)
    v_rep = torch.where(present, gather_tokens(v, index), 0.0).to(v.dtype)
    return PromptReps(k_rep, v_rep, bias)


def select_prompt(
    q: torch.Tensor, reps: PromptReps, config: AnnCAConfig, group_size: int, scale: float | None = None
) -> PromptSelection:
    """Select, per group of ``group_size`` consecutive queries of ``q [B, Sq, H, D]``, the
    representatives of ``reps`` to keep (``config.top_p``/``top_k`` of the estimated mass)."""
    batch, seq_q, heads, dim = q.shape
    n_groups = -(-seq_q // group_size)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    backend = ann.get_backend(config.ann_backend, q.device)
    # Edge-pad the last group to full size with its last query (a summary, not an attention input).
    padded = torch.cat([q, q[:, -1:].expand(-1, n_groups * group_size - seq_q, -1, -1)], dim=1)
    groups = padded.view(batch, n_groups, group_size, heads, dim).permute(0, 3, 1, 2, 4)
    points, weights = backend.summarize_queries(
        groups.reshape(-1, group_size, dim), config.query_clusters, config.kmeans_iters
    )  # [B*H*ng, P, D], [B*H*ng, P]
    points = points.view(batch, heads, n_groups, -1, dim).float()
    keys = reps.k.transpose(1, 2).float()  # [B, H, R, D]
    scores = torch.einsum("bhgpd,bhrd->bhgpr", points, keys) * scale + reps.bias[:, :, None, None, :]
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    mass = torch.einsum("bhgpr,bhgp->bhgr", probs, weights.view(batch, heads, n_groups, -1))
    keep = (
        select_clusters(mass, top_p=config.top_p, top_k=config.top_k) & torch.isfinite(reps.bias)[:, :, None]
    )
    n_keep = max(int(keep.sum(-1).max()), 1)
    index = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :n_keep]  # kept first
    bias = torch.gather(reps.bias[:, :, None].expand(-1, -1, n_groups, -1), 3, index)
    bias = torch.where(torch.gather(keep, 3, index), bias, float("-inf"))
    bias = bias.permute(0, 2, 1, 3).reshape(batch * n_groups, heads, n_keep).contiguous()
    return PromptSelection(index, bias, group_size)


def run_selection(
    selection: PromptSelection, reps: PromptReps, call: AttentionCall, proceed: Proceed
) -> AttentionResult:
    """Attention of ``call.q`` to the selected representatives, one group of queries per batch entry
    of the inner call: ``-> (out [B, Sq, H, Dv], lse fp32 [B, H, Sq])``."""
    batch, seq_q, heads, dim = call.q.shape
    n_groups, size = selection.index.shape[2], selection.group_size
    q = call.q
    if n_groups * size != seq_q:
        q = torch.cat([q, q.new_zeros(batch, n_groups * size - seq_q, heads, dim)], dim=1)
    k = _take_grouped(reps.k, selection.index)
    v = _take_grouped(reps.v, selection.index)
    out, lse = proceed(
        call.replace(q=q.view(batch * n_groups, size, heads, dim), k=k, v=v, key_bias=selection.bias)
    )
    out = out.reshape(batch, n_groups * size, heads, -1)[:, :seq_q]
    lse = lse.view(batch, n_groups, heads, size).permute(0, 2, 1, 3).reshape(batch, heads, -1)[..., :seq_q]
    return out, lse


class AnnCA(Method):
    """The runtime of :class:`AnnCAConfig` (see the module docstring)."""

    kinds = frozenset({"cross"})
    needs_context = True

    def __init__(self, config: AnnCAConfig) -> None:
        super().__init__(config)
        self._warned: set[str] = set()

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        if call.key_bias is not None or call.plan is not None:
            ops.warn_once(
                "AnnCA: a cross-attention call that already has a key_bias or plan from an earlier method "
                "runs without AnnCA's selection (put AnnCA first to select its prompt tokens)",
                seen=self._warned,
            )
            return proceed(call)
        context = call.context
        group_size = self._group_size(call)
        if context is None:
            reps = merge_identical_keys(call.k, call.v)
            return run_selection(
                select_prompt(call.q, reps, self.config, group_size, call.scale), reps, call, proceed
            )
        entry = self._prompt_entry(context.module_state(call.attn).setdefault(_STATE_KEY, []), call)
        step = context.chunk_step if context.chunk_step is not None else context.step_index
        epoch = (
            context.chunk_index,
            context.phase,
            step // self.config.refresh_every,
            call.q.shape[:3],
            group_size,
        )
        if entry.get("epoch") != epoch:
            entry["selection"] = select_prompt(call.q, entry["reps"], self.config, group_size, call.scale)
            entry["epoch"] = epoch
        return run_selection(entry["selection"], entry["reps"], call, proceed)

    def _group_size(self, call: AttentionCall) -> int:
        grid = None if call.context is None else call.context.grid
        seq_q = call.q.shape[1]
        if self.config.granularity == "frame" and grid is not None and math.prod(grid) == seq_q:
            return grid[1] * grid[2]
        return min(self.config.block_tokens, seq_q)

    @staticmethod
    def _prompt_entry(entries: list, call: AttentionCall) -> dict:
        """The cached entry for this call's prompt K/V (made on a miss; the oldest is dropped)."""
        identity = _identity(call.k, call.v)
        for entry in entries:
            if entry["identity"] == identity:
                return entry
        for entry in entries:
            if entry["k"].shape == call.k.shape and entry["k"].dtype == call.k.dtype:
                if torch.equal(entry["k"], call.k) and torch.equal(entry["v"], call.v):
                    return entry
        entry = {"identity": identity, "k": call.k, "v": call.v, "reps": merge_identical_keys(call.k, call.v)}
        entries.append(entry)
        del entries[:-_MAX_PROMPTS]
        return entry


AnnCAProcessor = named_processor("AnnCAProcessor", AnnCAConfig, default=False)


def _identity(k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Identity of the prompt tensors: storage, shape, dtype and version (an in-place write bumps it)."""
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version) for t in (k, v))


def _take_grouped(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, R, H, D]`` gathered per group: ``index`` int64 ``[B, H, G, K]`` -> ``[B * G, K, H, D]``."""
    batch, _, heads, dim = x.shape
    n_groups, n_keep = index.shape[2:]
    return gather_tokens(x, index.reshape(batch, heads, n_groups * n_keep)).view(
        batch * n_groups, n_keep, heads, dim
    )
