"""TempCache: temporal KV-cache compression for autoregressive rollouts (shared/METHODS.md, "TempCache").

The work happens in the cache: the method makes each self-attention module's rollout cache a
:class:`~vidaccel.cache.TempCacheKV` (``make_kv_cache``), which merges near-duplicate keys at every
commit and hands attention its representatives with the bias ``log(count)``. The rollout stage of
:class:`~vidaccel.processors.base.AccelProcessor` prepends that cache to every self-attention call,
so the other methods of the processor (AnnSA, FlashBlock, ...) see the merged cache like any other.
The method itself only tells the cache the token grid (for the ``"local"`` search scope) and
otherwise proceeds unchanged.

Example::

    pipe = CausalWanPipeline(transformer, scheduler)
    vidaccel.apply(pipe, vidaccel.TempCacheConfig(threshold=0.95, max_tokens=32_760))
    video = pipe(prompt_embeds=embeds, num_frames=240, chunk_frames=3).frames
"""

from __future__ import annotations

import warnings

from vidaccel.cache import TempCacheKV
from vidaccel.config import TempCacheConfig

from .base import AccelProcessor, AttentionCall, AttentionResult, Method, Proceed

__all__ = ["TempCache", "TempCacheProcessor"]


class TempCache(Method):
    """The runtime half of :class:`~vidaccel.config.TempCacheConfig`."""

    kinds = frozenset({"self"})
    needs_context = True

    def __init__(self, config: TempCacheConfig) -> None:
        super().__init__(config)
        self._warned = False

    def make_kv_cache(self, rollout=None) -> TempCacheKV:
        """A new merged cache for one self-attention module of ``rollout`` (a
        :class:`~vidaccel.pipelines.RolloutState`): no larger than the tokens the rollout commits."""
        return TempCacheKV(self.config, rollout_tokens=getattr(rollout, "committed_tokens", None))

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        state = None if call.context is None else call.context.module_state(call.attn)
        cache = None if state is None else state.get("kv_cache")
        if isinstance(cache, TempCacheKV):
            if call.context.grid is not None:
                cache.observe_grid(call.context.grid)
        elif not self._warned:
            self._warned = True
            warnings.warn(
                "TempCache acts on the KV cache of an autoregressive rollout (vidaccel.pipelines.CausalWanPipeline, "
                "installed with vidaccel.apply); calls without a TempCache rollout cache run exact attention",
                stacklevel=3,
            )
        return proceed(call)


class TempCacheProcessor(AccelProcessor):
    """:class:`~vidaccel.processors.base.AccelProcessor` running TempCache alone:
    ``TempCacheProcessor(config)`` is ``AccelProcessor(config)``."""

    def __init__(self, config: TempCacheConfig | None = None, *, backend: str = "auto") -> None:
        config = TempCacheConfig() if config is None else config
        if not isinstance(config, TempCacheConfig):
            raise ValueError(f"config must be a vidaccel.TempCacheConfig, got {type(config).__name__}")
        super().__init__(config, backend=backend)
