"""FlashBlock: reuse of the block-external attention across a chunk's denoising steps
(shared/METHODS.md, "FlashBlock").

In an autoregressive rollout every self-attention call of a chunk's denoising steps arrives as
``[KV cache of earlier chunks ; the chunk's own keys]`` with ``call.num_external`` cache keys
(the rollout stage of :class:`~vidaccel.processors.base.AccelProcessor`). The cache is fixed until
the chunk is committed, and its attention output changes little from step to step; the chunk's
own part changes a lot. So, per layer and pass:

- at a refresh step (``chunk_step % refresh_every == 0``, always the chunk's first step, and with
  ``refresh_last`` the chunk's last step, whose output is committed) the external part
  ``(O_ext, L_ext)`` is computed and kept in the step context
  (``context.module_state(attn)["flashblock"]``);
- at every step the internal part ``(O_in, L_in)`` is computed and merged with the kept external
  part by the split-KV identity (:func:`vidaccel.ops.merge_attention`), which is exact: with
  unchanged queries the result equals attention over the concatenation;
- the commit pass (other queries: the clean chunk) runs plain attention and drops what was kept;
  a new chunk refreshes, and the end of a generation releases everything (``StepContext.reset``).

**Residual reuse with AnnSA** (``vidaccel.apply(pipe, FlashBlockConfig(), AnnSAConfig(...))``): at a
refresh step where a later method of the chain routes the call (its
:meth:`~vidaccel.processors.base.Method.route`: AnnSA's), its plan for the cache part is built and
frozen until the next refresh. The routed cache
blocks are recomputed at every step with the step's queries; the unrouted remainder (the
complementary blocks of the same plan) is computed once at the refresh and kept with its LSE. The
plan is frozen, not rebuilt at AnnSA's own refresh, because the kept remainder is only the exact
complement of the routed blocks under the permutations and block mask it was computed with: a
rebuilt plan would count some cache keys twice and miss others. At the refresh step itself
routed + remainder is the whole cache, so the step is exact. The chunk's own keys pass through
AnnSA as usual.

Example::

    pipe = CausalWanPipeline(transformer, scheduler)
    vidaccel.apply(pipe, vidaccel.FlashBlockConfig(), vidaccel.TempCacheConfig())
    video = pipe(prompt_embeds=embeds, num_frames=240, chunk_frames=3).frames
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vidaccel import ops
from vidaccel.kernels.plan import plan_blocks
from vidaccel.rollout import rollout_of

from .base import AttentionCall, AttentionResult, Method, MethodConfig, Proceed, named_processor
from .tokens import PermutedPlan, run_plan

__all__ = ["FlashBlock", "FlashBlockConfig", "FlashBlockProcessor", "split_routing"]

_STATE_KEY = "flashblock"


@dataclass(frozen=True)
class FlashBlockConfig(MethodConfig):
    """FlashBlock: reuse of the block-external attention across a chunk's denoising steps
    (shared/METHODS.md, FlashBlock), for autoregressive rollouts (``CausalWanPipeline``).

    While a chunk is denoised, each self-attention call attends to the KV cache of earlier chunks
    (external: fixed until the chunk is committed) and to the chunk itself (internal: new every
    step). At a refresh step the external part is computed and its output and LSE are kept per
    layer; at the other steps only the internal part is computed and merged with the kept one by
    the exact split-KV identity. The commit pass runs plain attention and drops the kept state.

    Meaning:
        refresh_every: the external part is recomputed at the chunk steps where
            ``chunk_step % refresh_every == 0`` (>= 1; the first step of every chunk always
            refreshes). 1 recomputes it every step (exact dense cached attention).
        refresh_last: also refresh at the chunk's last denoising step, the one that sets the
            committed frame's detail (where the pipeline says how many steps a chunk has, as
            ``CausalWanPipeline`` does). The defaults (3, ``True``) refresh Self-Forcing's 4 steps at
            0 and 3: 2 of 4, the cost of ``refresh_every=2`` alone (steps 0 and 2), with the final
            step exact, which is closer to dense than steps 0 and 2 on the game world model
            (``benchmarks/results/flashblock_schedule.md``).
    Performance:
        offload: keep the kept external outputs in (pinned) CPU memory between steps instead of on
            the GPU (copied back at every non-refresh step; worth it only when memory is tight).

    Composition: with TempCache the external part is the merged cache with its ``log(count)`` bias.
    With AnnSA (``vidaccel.apply(pipe, FlashBlockConfig(), AnnSAConfig(...))``) it becomes residual
    reuse: at a refresh step AnnSA's routing of the cache part is built and frozen; the routed cache
    blocks are recomputed every step with fresh queries, the unrouted remainder is computed once,
    kept with its LSE and merged in (the chunk's own keys go through AnnSA as usual). FlashBlock runs
    before AnnSA whatever the order of the configs.

    Memory: the kept external output costs ``B x chunk tokens x H x Dv`` in the model's dtype (bf16)
    plus an fp32 LSE ``B x H x chunk tokens`` per self-attention layer and pass (CFG pass). Wan2.1-1.3B
    with 3-frame chunks (4,680 tokens, 12 heads x 128, 30 layers): 13.7 MiB + 0.2 MiB per layer,
    0.41 GiB in all per batch entry; released at every commit. Residual reuse keeps the remainder
    instead (the same size) plus the frozen routing plan of the cache part.
    """

    refresh_every: int = 3
    refresh_last: bool = True
    offload: bool = False

    def __post_init__(self):
        self.check_range("refresh_every", low=1, integer=True)
        if not isinstance(self.refresh_last, bool):
            raise ValueError(f"{type(self).__name__}.refresh_last must be a bool, got {self.refresh_last!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"{type(self).__name__}.offload must be a bool, got {self.offload!r}")

    def build(self) -> Method:
        return FlashBlock(self)


def split_routing(plan: PermutedPlan) -> tuple[PermutedPlan | None, PermutedPlan | None]:
    """Residual reuse's two parts of one routed plan: ``-> (routed, remainder)``.

    ``routed`` is ``plan`` (the blocks each query block visits), ``remainder`` the same
    permutations with the complementary block mask; together they visit every (query, key) pair
    exactly once. Either is ``None`` when it visits no block.
    """
    mask = plan.blocks.block_mask
    routed = plan if bool(mask.any()) else None
    rest = ~mask
    remainder = (
        dataclasses.replace(plan, blocks=plan_blocks(rest, plan.blocks.block_size))
        if bool(rest.any())
        else None
    )
    return routed, remainder


@dataclasses.dataclass
class _Kept:
    """What one layer keeps for one pass between refreshes.

    Attributes:
        signature: the calls it serves (chunk, cache size, shapes, scale, dtype, device).
        external: ``(out, lse)`` of the cache part not recomputed every step (the whole cache, or the
            remainder of residual reuse), possibly offloaded to CPU; ``None`` when empty.
        routed: residual reuse's frozen routed plan of the cache part, or ``None``.
    """

    signature: tuple
    external: tuple[torch.Tensor, torch.Tensor] | None
    routed: PermutedPlan | None


class FlashBlock(Method):
    """The runtime of :class:`FlashBlockConfig` (see the module docstring)."""

    kinds = frozenset({"self"})
    needs_context = True
    needs_rollout = True
    chain_rank = -1  # it must split the cache from the own keys before AnnSA permutes them together

    def __init__(self, config: FlashBlockConfig) -> None:
        super().__init__(config)
        self._router: Method | None = None
        self._warned: set[str] = set()

    def bind(self, later: list[Method]) -> None:
        """Take the first later method that routes (:meth:`Method.route`: AnnSA) as the router of
        residual reuse."""
        self._router = next((m for m in later if type(m).route is not Method.route), None)

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        context = call.context
        rollout = rollout_of(context)
        if rollout is None:
            self._warn_once(
                "FlashBlock acts on the self-attention of autoregressive rollouts (vidaccel.pipelines."
                "CausalWanPipeline, installed with vidaccel.apply); other calls run unchanged"
            )
            return proceed(call)
        num_external = call.num_external
        if context.phase != "denoise" or not 0 < num_external < call.k.shape[1]:
            # The commit pass has other queries, and the cache grows after it: nothing kept stays valid.
            context.module_state(call.attn).get(_STATE_KEY, {}).pop("kept", None)
            return proceed(call)
        if call.plan is not None:
            self._warn_once(
                "FlashBlock: the call already has a block-sparse plan from an earlier method, which it cannot "
                "split into cache and own keys; running it unchanged"
            )
            return proceed(call)

        state = context.module_state(call.attn).setdefault(_STATE_KEY, {})
        kept_by_pass = state.setdefault("kept", {})
        external, internal = _split(call, num_external)
        step = context.chunk_step if context.chunk_step is not None else context.step_index
        signature = (
            context.chunk_index, num_external, tuple(call.q.shape), tuple(call.k.shape), call.v.shape[-1],
            call.scale, call.q.dtype, call.q.device,
        )  # fmt: skip
        kept = kept_by_pass.get(context.pass_key)
        parts = []
        if kept is None or kept.signature != signature or self.refreshes(step, rollout):
            kept, fresh = self._refresh(external, proceed, signature, state)
            kept_by_pass[context.pass_key] = kept
            if fresh is not None:
                parts.append(fresh)
        elif kept.external is not None:
            out, lse = kept.external
            parts.append((out.to(call.q.device, non_blocking=True), lse.to(call.q.device, non_blocking=True)))
        if kept.routed is not None:
            parts.append(run_plan(kept.routed, external, proceed))
        parts.append(proceed(internal))
        out, lse = parts[0]
        for part_out, part_lse in parts[1:]:
            out, lse = ops.merge_attention(out, lse, part_out, part_lse, backend=call.backend)
        return out, lse

    def refreshes(self, step: int, rollout) -> bool:
        """Whether chunk step ``step`` recomputes the external part: every ``refresh_every`` steps
        from the first and, with ``refresh_last``, the chunk's last step (where the rollout says
        how many steps a chunk has)."""
        if step % self.config.refresh_every == 0:
            return True
        last = getattr(rollout, "steps_per_chunk", None)
        return self.config.refresh_last and last is not None and step == last - 1

    def _refresh(
        self, external: AttentionCall, proceed: Proceed, signature: tuple, state: dict
    ) -> tuple[_Kept, AttentionResult | None]:
        """Compute the kept part of the cache for a refresh: ``-> (kept, its fresh (out, lse) or None)``."""
        plan = None if self._router is None else self._router.route(external, state.get("centroids"))
        if plan is None:
            fresh = proceed(external)
            return _Kept(signature, self._store(fresh), None), fresh
        state["centroids"] = plan.centroids  # warm start of the next refresh, kept across chunks
        routed, remainder = split_routing(plan)
        fresh = None if remainder is None else run_plan(remainder, external, proceed)
        return _Kept(signature, None if fresh is None else self._store(fresh), routed), fresh

    def _warn_once(self, message: str) -> None:
        ops.warn_once(message, seen=self._warned, stacklevel=4)

    def _store(self, result: AttentionResult) -> AttentionResult:
        out, lse = result
        if not (self.config.offload and out.is_cuda):
            return out, lse
        return tuple(_pinned(t) for t in (out, lse))


def _split(call: AttentionCall, num_external: int) -> tuple[AttentionCall, AttentionCall]:
    """The cache part (every key external) and the own part (none) of a rollout call."""
    bias = call.key_bias
    external = call.replace(
        k=call.k[:, :num_external],
        v=call.v[:, :num_external],
        key_bias=None if bias is None else bias[..., :num_external],
        k_pre=None,
    )
    internal = call.replace(
        k=call.k[:, num_external:],
        v=call.v[:, num_external:],
        key_bias=None if bias is None else bias[..., num_external:],
        num_external=0,
    )
    return external, internal


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of CUDA ``tensor`` in pinned CPU memory, queued on the current stream."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


FlashBlockProcessor = named_processor("FlashBlockProcessor", FlashBlockConfig, default=True)
