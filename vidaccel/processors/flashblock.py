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
refresh step where AnnSA routes the call, AnnSA's plan for the cache part is built
(:meth:`~vidaccel.processors.annsa.AnnSA.plan`) and frozen until the next refresh. The routed cache
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

import torch

from vidaccel import ops
from vidaccel.config import FlashBlockConfig
from vidaccel.kernels.plan import plan_blocks

from .annsa import AnnSA, AnnSAPlan, run_plan, warn_once
from .base import AccelProcessor, AttentionCall, AttentionResult, Method, Proceed

__all__ = ["FlashBlock", "FlashBlockProcessor", "split_routing"]

_STATE_KEY = "flashblock"


def split_routing(plan: AnnSAPlan) -> tuple[AnnSAPlan | None, AnnSAPlan | None]:
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
    routed: AnnSAPlan | None


class FlashBlock(Method):
    """The runtime of :class:`~vidaccel.config.FlashBlockConfig` (see the module docstring)."""

    kinds = frozenset({"self"})
    needs_context = True
    chain_rank = -1  # it must split the cache from the own keys before AnnSA permutes them together

    def __init__(self, config: FlashBlockConfig) -> None:
        super().__init__(config)
        self._router: AnnSA | None = None
        self._warned: set[str] = set()

    def bind(self, later: list[Method]) -> None:
        """Take the first later AnnSA as the router of residual reuse."""
        self._router = next((method for method in later if isinstance(method, AnnSA)), None)

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        context = call.context
        if context is None or "rollout" not in context.pipeline_state:
            warn_once(
                self._warned,
                "FlashBlock acts on the self-attention of autoregressive rollouts (vidaccel.pipelines."
                "CausalWanPipeline, installed with vidaccel.apply); other calls run unchanged",
            )
            return proceed(call)
        num_external = call.num_external
        if context.phase != "denoise" or not 0 < num_external < call.k.shape[1]:
            # The commit pass has other queries, and the cache grows after it: nothing kept stays valid.
            context.module_state(call.attn).get(_STATE_KEY, {}).pop("kept", None)
            return proceed(call)
        if call.plan is not None:
            warn_once(
                self._warned,
                "FlashBlock: the call already has a block-sparse plan from an earlier method, which it cannot "
                "split into cache and own keys; running it unchanged",
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
        if (
            kept is None
            or kept.signature != signature
            or self.refreshes(step, context.pipeline_state["rollout"])
        ):
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
        router = self._router
        if router is None or not router.routes(external):
            fresh = proceed(external)
            return _Kept(signature, self._store(fresh), None), fresh
        plan = router.plan(external, state.get("centroids"))
        state["centroids"] = plan.centroids  # warm start of the next refresh, kept across chunks
        routed, remainder = split_routing(plan)
        fresh = None if remainder is None else run_plan(remainder, external, proceed)
        return _Kept(signature, None if fresh is None else self._store(fresh), routed), fresh

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


class FlashBlockProcessor(AccelProcessor):
    """:class:`~vidaccel.processors.base.AccelProcessor` running FlashBlock alone:
    ``FlashBlockProcessor(config)`` is ``AccelProcessor(config)``."""

    def __init__(self, config: FlashBlockConfig | None = None, *, backend: str = "auto") -> None:
        config = FlashBlockConfig() if config is None else config
        if not isinstance(config, FlashBlockConfig):
            raise ValueError(f"config must be a vidaccel.FlashBlockConfig, got {type(config).__name__}")
        super().__init__(config, backend=backend)
