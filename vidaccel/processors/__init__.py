"""Attention processors: the composition mechanism (:mod:`.base`), one adapter per model family
(:mod:`.wan`) in a registry keyed by transformer class (:mod:`.registry`), and, in later modules, one
planner per method."""

from .base import KINDS, AccelProcessor, AttentionCall, DenseProcessor, Method
from .registry import ADAPTERS, adapter_for_attention, adapter_for_model
from .wan import WanAdapter, apply_rotary_emb

__all__ = [
    "ADAPTERS",
    "KINDS",
    "AccelProcessor",
    "AttentionCall",
    "DenseProcessor",
    "Method",
    "WanAdapter",
    "adapter_for_attention",
    "adapter_for_model",
    "apply_rotary_emb",
]
