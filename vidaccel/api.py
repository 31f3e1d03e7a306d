"""``vidaccel.apply`` / ``vidaccel.remove``: patch a pipeline or transformer, and undo it exactly.

Example::

    import vidaccel
    processors = vidaccel.apply(pipe, *configs)   # both Wan 2.2 experts, with the step context
    video = pipe(prompt_embeds=..., negative_prompt_embeds=...).frames
    vidaccel.remove(pipe)                          # the stock processors are back
"""

from __future__ import annotations

import warnings
import weakref

import torch

from vidaccel.processors.base import AccelProcessor, MethodConfig, check_no_context_parallel
from vidaccel.processors.registry import adapter_for_model
from vidaccel.state import attach_context, detach_context

__all__ = ["apply", "remove"]

# Denoiser attributes of diffusers pipelines: Wan 2.2 A14B pipelines hold two experts.
_TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")

# Processors in place before the first `apply`, per transformer: what `remove` restores.
_SAVED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, object]] = weakref.WeakKeyDictionary()


def apply(pipe_or_transformer, *configs: MethodConfig, backend: str = "auto") -> list[AccelProcessor]:
    """Install ``AccelProcessor(*configs, backend=backend)`` and the step context on a model.

    Args:
        pipe_or_transformer: a diffusers pipeline (its ``transformer`` and, for Wan 2.2,
            ``transformer_2`` are patched) or a transformer of a supported class.
        *configs: method configs, chained in this order (see :class:`AccelProcessor`); none gives
            exact dense attention on vidaccel's kernels.
        backend: ``vidaccel.ops`` backend, one of ``vidaccel.ops.BACKENDS``.

    Returns the installed processors, one per transformer, each shared by all its attention modules.
    Applying again replaces the processors and keeps the step context (and its caches); ``remove``
    still restores the processors from before the first ``apply``. Raises ``ValueError`` for an
    unsupported model (naming the supported classes), a bad argument, two configs of one method, or a
    rollout-only method (TempCache, FlashBlock) on a pipeline that runs no rollout, and ``NotImplementedError``
    for a transformer set up for context parallelism; in both cases nothing is changed.
    """
    transformers = _transformers(pipe_or_transformer)
    adapters = [adapter_for_model(transformer) for transformer in transformers]
    for transformer in transformers:
        check_no_context_parallel(getattr(transformer, "_parallel_config", None), type(transformer).__name__)
    _check_one_config_per_method(configs)
    processors = [AccelProcessor(*configs, backend=backend) for _ in transformers]
    _check_rollout_methods(pipe_or_transformer, processors[0])

    for transformer, adapter, processor in zip(transformers, adapters, processors, strict=True):
        if transformer not in _SAVED:
            _SAVED[transformer] = dict(transformer.attn_processors)
        layers = adapter.layers(transformer)
        for attn in layers:
            attn.set_processor(processor)
        attach_context(transformer, layers, adapter.read_inputs)
    return processors


def _check_one_config_per_method(configs) -> None:
    """Two configs of one of vidaccel's methods would run it twice on every call (a second TempCache
    cache, two routings): refuse them. A user's own method may stack (``AccelProcessor`` chains
    whatever it is given)."""
    seen: set[type] = set()
    for position, config in enumerate(configs):
        kind = type(config)
        if kind in seen and kind.__module__.startswith("vidaccel."):
            raise ValueError(f"configs[{position}] is a second {kind.__name__}: pass one config per method")
        seen.add(kind)


def _check_rollout_methods(pipe_or_transformer, processor: AccelProcessor) -> None:
    """Refuse a method that acts only inside an autoregressive rollout on a pipeline that runs none
    (its ``runs_rollouts`` is not set); a bare transformer cannot tell, and the method warns at its
    first call outside a rollout instead."""
    if isinstance(pipe_or_transformer, torch.nn.Module) or getattr(
        pipe_or_transformer, "runs_rollouts", False
    ):
        return
    needing = [type(method).__name__ for method in processor.methods if method.needs_rollout]
    if needing:
        raise ValueError(
            f"{' and '.join(needing)} act{'s' if len(needing) == 1 else ''} on the KV cache of an autoregressive "
            f"rollout, which {type(pipe_or_transformer).__name__} does not run: use vidaccel.pipelines.CausalWanPipeline "
            "(any Wan checkpoint, chunk by chunk) or WorldModelPipeline, or leave "
            f"{' and '.join(needing)} out"
        )


# Attributes diffusers sets on a processor instance (``set_attention_backend``, ``enable_parallelism``)
# that the stock processor replacing a vidaccel one keeps.
_CARRIED_ATTRIBUTES = ("_attention_backend", "_parallel_config")


def remove(pipe_or_transformer) -> None:
    """Undo :func:`apply` or a plain ``set_attn_processor`` of vidaccel processors.

    Restores the processors from before the first ``apply``; every attention module that still holds
    a vidaccel processor afterwards (installed with ``transformer.set_attn_processor(...)``, so nothing
    was saved) gets diffusers' stock processor of its class, carrying over the ``_attention_backend``
    and ``_parallel_config`` the replaced processor had. Then removes the step context hook and
    releases its state. A stock model run afterwards is bit-identical to one never patched. A model
    that was never patched is left as it is; removing twice is harmless. vidaccel's own pipelines
    (those with a ``set_default_attn_processor()`` method, e.g. ``CausalWanPipeline``) return to their
    default, ``DenseProcessor`` with the step context."""
    for transformer in _transformers(pipe_or_transformer):
        saved = _SAVED.pop(transformer, None)
        if saved is not None:
            transformer.set_attn_processor(dict(saved))
        _restore_stock_processors(transformer)
        detach_context(transformer)
    if not isinstance(pipe_or_transformer, torch.nn.Module) and hasattr(
        pipe_or_transformer, "set_default_attn_processor"
    ):
        pipe_or_transformer.set_default_attn_processor()


def _restore_stock_processors(transformer: torch.nn.Module) -> None:
    """Give each attention module holding a vidaccel processor a fresh stock processor of its class."""
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        if not isinstance(processor, AccelProcessor):
            continue
        default_cls = getattr(type(module), "_default_processor_cls", None)
        if default_cls is None:
            warnings.warn(
                f"vidaccel.remove: {name} ({type(module).__name__}) names no stock processor class "
                "(_default_processor_cls); its vidaccel processor stays installed",
                stacklevel=3,
            )
            continue
        stock = default_cls()
        for attribute in _CARRIED_ATTRIBUTES:
            value = getattr(processor, attribute, None)
            if value is not None:
                setattr(stock, attribute, value)
        module.set_processor(stock)


def _transformers(pipe_or_transformer) -> list[torch.nn.Module]:
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [pipe_or_transformer]
    transformers = [getattr(pipe_or_transformer, name, None) for name in _TRANSFORMER_ATTRIBUTES]
    transformers = [transformer for transformer in transformers if transformer is not None]
    if not transformers:
        raise ValueError(
            f"pipe_or_transformer must be a diffusers pipeline with a `transformer` (or `transformer_2`) or a "
            f"transformer module, got {type(pipe_or_transformer).__name__}"
        )
    return transformers
