"""Attention processors: the composition mechanism (:mod:`.base`), one adapter per model family
(:mod:`.wan`) in a registry keyed by transformer class (:mod:`.registry`), the token helpers the
methods share (:mod:`.tokens`), and one module per method holding its config, its runtime and its
cache or plan types (:mod:`.tempcache`, :mod:`.annsa`, :mod:`.annca`, :mod:`.flashblock`,
:mod:`.freeswim`)."""

from vidaccel._compat import renamed

from .annca import AnnCA, AnnCAConfig, AnnCAProcessor
from .annsa import AnnSA, AnnSAConfig, AnnSAProcessor
from .base import KINDS, AccelProcessor, AttentionCall, DenseProcessor, Method, MethodConfig
from .flashblock import FlashBlock, FlashBlockConfig, FlashBlockProcessor
from .freeswim import FreeSwim, FreeSwimBatch, FreeSwimConfig, FreeSwimProcessor
from .registry import ADAPTERS, adapter_for_attention, adapter_for_model
from .tempcache import MergedKVCache, TempCache, TempCacheConfig, TempCacheProcessor
from .wan import WanAdapter, apply_rotary_emb

__all__ = [
    "ADAPTERS",
    "KINDS",
    "AccelProcessor",
    "AnnCA",
    "AnnCAConfig",
    "AnnCAProcessor",
    "AnnSA",
    "AnnSAConfig",
    "AnnSAProcessor",
    "AttentionCall",
    "DenseProcessor",
    "FlashBlock",
    "FlashBlockConfig",
    "FlashBlockProcessor",
    "FreeSwim",
    "FreeSwimBatch",
    "FreeSwimConfig",
    "FreeSwimProcessor",
    "MergedKVCache",
    "Method",
    "MethodConfig",
    "TempCache",
    "TempCacheConfig",
    "TempCacheProcessor",
    "WanAdapter",
    "adapter_for_attention",
    "adapter_for_model",
    "apply_rotary_emb",
]

__getattr__ = renamed(__name__, {"FreeSwimMethod": ("vidaccel.processors.FreeSwim", lambda: FreeSwim)})
