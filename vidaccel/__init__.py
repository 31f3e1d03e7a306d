"""vidaccel: training-free acceleration for video diffusion in diffusers.

    import vidaccel
    vidaccel.apply(pipe, *configs)                                  # processors + step context
    pipe.transformer.set_attn_processor(vidaccel.DenseProcessor())  # processors only
    vidaccel.remove(pipe)                                           # back to the stock processors
"""

from . import metrics, ops
from .api import apply, remove
from .config import MethodConfig
from .processors import AccelProcessor, AttentionCall, DenseProcessor, Method
from .state import LayerInfo, StepContext

__all__ = [
    "AccelProcessor",
    "AttentionCall",
    "DenseProcessor",
    "LayerInfo",
    "Method",
    "MethodConfig",
    "StepContext",
    "apply",
    "metrics",
    "ops",
    "remove",
]
