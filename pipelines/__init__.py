"""vidaccel pipelines (imported as ``vidaccel.pipelines``).

``CausalWanPipeline`` (autoregressive rollout with a KV cache), ``FreeSwimWanPipeline`` (FreeSwim
refinement above the training size) and the tiny from-config Wan pipelines of the tests and ``make demo``.
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
