"""Per-model adapters, keyed by transformer class.

An adapter knows one model family's attention module: it lists the attention layers of a
transformer, reads the grid and timestep from a forward's arguments, and runs one attention-module
call with the attention itself delegated to the processor. To support a new family, write its
adapter (see :mod:`vidaccel.processors.wan`) and add it to :data:`ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from vidaccel.state import ForwardInputs, LayerInfo

from .wan import WanAdapter

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for_attention", "adapter_for_model"]


class ModelAdapter(Protocol):
    """What vidaccel needs from a model family (``WanAdapter`` is the reference implementation)."""

    transformer_cls: type[torch.nn.Module]
    attention_cls: type[torch.nn.Module]

    def layers(self, transformer: torch.nn.Module) -> dict[torch.nn.Module, LayerInfo]:
        """Every attention module a processor is installed on, with its :class:`LayerInfo`."""

    def read_inputs(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> ForwardInputs:
        """Grid, batch and timestep of one forward, from its arguments."""

    def forward(
        self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, attend: Callable
    ):
        """One attention-module call, with ``attend(kind, q, k, v, attention_mask=None)`` for the attention."""


ADAPTERS: dict[type[torch.nn.Module], ModelAdapter] = {
    adapter.transformer_cls: adapter for adapter in (WanAdapter(),)
}
"""Adapter per supported transformer class (Wan 2.1 and 2.2 share ``WanTransformer3DModel``)."""


def adapter_for_model(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class; ``ValueError`` listing the supported classes otherwise."""
    adapter = ADAPTERS.get(type(model))
    if adapter is None:
        raise ValueError(
            f"vidaccel does not support {type(model).__name__}; supported transformer classes: "
            f"{', '.join(cls.__name__ for cls in ADAPTERS)}"
        )
    return adapter


_BY_ATTENTION_CLASS: dict[type[torch.nn.Module], ModelAdapter] = {}
"""Adapter per attention-module class met so far: the processor's per-call lookup is one dict hit."""


def adapter_for_attention(attn: torch.nn.Module) -> ModelAdapter:
    """The adapter whose attention class ``attn`` is; ``ValueError`` listing the supported ones otherwise."""
    adapter = _BY_ATTENTION_CLASS.get(type(attn))
    if adapter is not None:
        return adapter
    for adapter in ADAPTERS.values():
        if isinstance(attn, adapter.attention_cls):
            _BY_ATTENTION_CLASS[type(attn)] = adapter
            return adapter
    raise ValueError(
        f"vidaccel processors do not support attention modules of class {type(attn).__name__}; supported: "
        f"{', '.join(adapter.attention_cls.__name__ for adapter in ADAPTERS.values())}"
    )
