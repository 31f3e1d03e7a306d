"""Attention processors: the composition mechanism (:mod:`.base`), one adapter per model family
(:mod:`.wan`) in a registry keyed by transformer class (:mod:`.registry`), and, in later modules, one
planner per method."""

from .annca import AnnCA, AnnCAProcessor
from .annsa import AnnSA, AnnSAProcessor
from .base import KINDS, AccelProcessor, AttentionCall, DenseProcessor, Method
from .flashblock import FlashBlock, FlashBlockProcessor
from .freeswim import FreeSwimBatch, FreeSwimMethod, FreeSwimProcessor
from .registry import ADAPTERS, adapter_for_attention, adapter_for_model
from .tempcache import TempCache, TempCacheProcessor
from .wan import WanAdapter, apply_rotary_emb

__all__ = [
    "ADAPTERS",
    "KINDS",
    "AccelProcessor",
    "AnnCA",
    "AnnCAProcessor",
    "AnnSA",
    "AnnSAProcessor",
    "AttentionCall",
    "DenseProcessor",
    "FlashBlock",
    "FlashBlockProcessor",
    "FreeSwimBatch",
    "FreeSwimMethod",
    "FreeSwimProcessor",
    "Method",
    "TempCache",
    "TempCacheProcessor",
    "WanAdapter",
    "adapter_for_attention",
    "adapter_for_model",
    "apply_rotary_emb",
]
