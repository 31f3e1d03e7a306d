"""vidaccel: training-free acceleration for video diffusion in diffusers.

import vidaccel
vidaccel.apply(pipe, *configs)                                  # processors + step context
pipe.transformer.set_attn_processor(vidaccel.DenseProcessor())  # processors only
vidaccel.remove(pipe)                                           # back to the stock processors
"""

from . import metrics, ops
from .api import apply, remove
from .config import AnnCAConfig, AnnSAConfig, FlashBlockConfig, FreeSwimConfig, MethodConfig, TempCacheConfig
from .processors import AccelProcessor, AttentionCall, DenseProcessor, Method
from .processors.annca import AnnCAProcessor
from .processors.annsa import AnnSAProcessor
from .processors.flashblock import FlashBlockProcessor
from .processors.freeswim import FreeSwimProcessor
from .processors.tempcache import TempCacheProcessor
from .state import LayerInfo, StepContext

__all__ = [
    "AccelProcessor",
    "AnnCAConfig",
    "AnnCAProcessor",
    "AnnSAConfig",
    "AnnSAProcessor",
    "AttentionCall",
    "DenseProcessor",
    "FlashBlockConfig",
    "FlashBlockProcessor",
    "FreeSwimConfig",
    "FreeSwimProcessor",
    "LayerInfo",
    "Method",
    "MethodConfig",
    "StepContext",
    "TempCacheConfig",
    "TempCacheProcessor",
    "apply",
    "metrics",
    "ops",
    "remove",
]
