"""vidaccel pipelines (imported as ``vidaccel.pipelines``).

``CausalWanPipeline`` (autoregressive rollout with a KV cache), ``FreeSwimWanPipeline`` (FreeSwim
refinement above the training size), ``WorldModelPipeline`` (the game world model of ``game.py``)
and the tiny from-config Wan pipelines of the tests and ``make demo``.
"""

from .causal_wan import CausalWanPipeline, RolloutOptions, RolloutState
from .freeswim import FreeSwimWanPipeline, FreeSwimWanPipelineOutput
from .game import ACTIONS, GameEnv, parse_actions, random_actions, scripted_actions
from .tiny import build_tiny_wan_pipeline, tiny_prompt_embeds
from .world_model import (
    BEST_WORLD_MODEL,
    DEFAULT_WORLD_MODEL,
    LONG_WORLD_MODEL,
    WorldModelPipeline,
    world_model_config,
)

__all__ = [
    "ACTIONS",
    "BEST_WORLD_MODEL",
    "DEFAULT_WORLD_MODEL",
    "LONG_WORLD_MODEL",
    "GameEnv",
    "WorldModelPipeline",
    "parse_actions",
    "random_actions",
    "scripted_actions",
    "world_model_config",
    "CausalWanPipeline",
    "FreeSwimWanPipeline",
    "FreeSwimWanPipelineOutput",
    "RolloutOptions",
    "RolloutState",
    "build_tiny_wan_pipeline",
    "tiny_prompt_embeds",
]
