"""vidaccel pipelines (imported as ``vidaccel.pipelines``).

Now: the tiny from-config Wan pipelines used by tests and ``make demo``. Later issues add
``CausalWanPipeline`` (autoregressive rollout with a KV cache), ``WorldModelPipeline`` and
``FreeSwimWanPipeline``.
"""

from .tiny import build_tiny_wan_pipeline, tiny_prompt_embeds

__all__ = ["build_tiny_wan_pipeline", "tiny_prompt_embeds"]
