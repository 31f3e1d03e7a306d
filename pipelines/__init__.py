"""vidaccel pipelines (imported as ``vidaccel.pipelines``).

Now: the tiny from-config Wan pipelines used by tests and ``make demo``. Later issues add
``CausalWanPipeline`` (autoregressive rollout with a KV cache), ``WorldModelPipeline`` and
``FreeSwimWanPipeline``.
"""

from .causal_wan import CausalWanPipeline, RolloutState
from .freeswim import FreeSwimWanPipeline, FreeSwimWanPipelineOutput
from .tiny import build_tiny_wan_pipeline, tiny_prompt_embeds

__all__ = [
    "CausalWanPipeline",
    "FreeSwimWanPipeline",
    "FreeSwimWanPipelineOutput",
    "RolloutState",
    "build_tiny_wan_pipeline",
    "tiny_prompt_embeds",
]
