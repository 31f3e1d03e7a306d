"""The composition mechanism: one attention processor, a chain of methods, one attention op.

Every attention call of a patched model becomes an :class:`AttentionCall` that passes through the
configured methods in order, middleware style: each method's :meth:`Method.attend` receives the call
and ``proceed``, the rest of the chain, and may change the call before proceeding (permute tokens,
prepend cached keys with a ``key_bias``, set a block-sparse ``plan``), change the result after it
(merge a cached partial by LSE, un-permute), or answer from its cache without proceeding. The end of
the chain is :func:`vidaccel.ops.attention`. A method acts only on the call kinds it declares; the
others skip it, so the rest stays exact::

    class Tempered(Method):                      # a method that sharpens self-attention
        kinds = frozenset({"self"})

        def attend(self, call, proceed):
            return proceed(call.replace(scale=self.config.scale))

    processor = vidaccel.AccelProcessor(TemperedConfig(scale=0.2))   # TemperedConfig.build() -> Tempered
    pipe.transformer.set_attn_processor(processor)                  # processors only
    vidaccel.apply(pipe, TemperedConfig(scale=0.2))                 # processors + step context

**Configs.** A method's user-facing half is a :class:`MethodConfig` dataclass: what a user chooses,
validated in ``__post_init__``, and ``build()`` returning the runtime :class:`Method`::

    @dataclass
    class TemperedConfig(MethodConfig):
        scale: float = 0.2        # meaning: the softmax scale

        def __post_init__(self):
            self.check_range("scale", low=0.0, low_open=True)

        def build(self) -> Method:
            return Tempered(self)

Each method's module (``vidaccel/processors/<method>.py``) holds its config, its runtime and its
cache or plan types.

**The rollout stage.** In an autoregressive rollout (a pipeline opened a
:class:`~vidaccel.rollout.RolloutState` on the step context), every self-attention call first passes
through the module's KV cache, held by the step context: the chain sees the cache followed by the
call's own keys (``num_external`` cached keys, with the cache's ``key_bias``), and in the rollout's
``"commit"`` phase the call's own keys and values are added to the cache after the chain has run.
The cache comes from the first method whose :meth:`Method.make_kv_cache` makes one (TempCache),
else from the rollout (dense, or a rolling window).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from vidaccel import ops
from vidaccel.kernels.plan import BlockPlan
from vidaccel.rollout import KVCache, RolloutState, kv_cache_of, rollout_of, set_kv_cache
from vidaccel.state import LayerInfo, StepContext, context_for

from .registry import adapter_for_attention

__all__ = [
    "KINDS",
    "AccelProcessor",
    "AttentionCall",
    "DenseProcessor",
    "Method",
    "MethodConfig",
    "check_one_of_top_p_top_k",
    "dense_attention",
    "named_processor",
]

KINDS = ("self", "cross", "cross_image")
"""Attention call kinds: video self-attention, cross-attention to the prompt, and (I2V) to image tokens."""

AttentionResult = tuple[torch.Tensor, torch.Tensor]
"""``(out [B, Sq, H, Dv] in q's dtype, lse fp32 [B, H, Sq])``, what every link of the chain returns."""


class MethodConfig(ABC):
    """Base of every method's configuration.

    Subclasses are ``@dataclass`` es whose fields are the method's options. They validate every field
    in ``__post_init__`` (use :meth:`check_range`, which names the field and the allowed range in its
    ``ValueError``) and implement :meth:`build`. vidaccel's own configs are frozen: validated once
    when made, changed only through ``dataclasses.replace(config, top_k=8)``, which validates again
    (a field set afterwards would skip the check: it raises ``dataclasses.FrozenInstanceError``). A config is plain data: it holds no tensors and no
    per-layer state, so one config may build the methods of many processors.
    """

    @abstractmethod
    def build(self) -> Method:
        """The runtime :class:`Method` this config describes."""

    def check_range(
        self,
        field: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        integer: bool = False,
    ) -> None:
        """Raise ``ValueError`` unless ``self.<field>`` is a number in the given range.

        ``low``/``high`` bound the range (``None``: unbounded), inclusive unless ``low_open`` /
        ``high_open``; ``integer`` also requires an ``int`` (``bool`` is never accepted). The message
        names the config, the field, the allowed range and the value, e.g.
        ``"AnnSAConfig.top_p must be a float in (0, 1], got 1.5"``.
        """
        value = getattr(self, field)
        kind = "an int" if integer else "a float"
        left = "-inf" if low is None else _fmt(low)
        right = "inf" if high is None else _fmt(high)
        allowed = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
        ok = (
            is_number
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))
        )
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field} must be {kind} in {allowed}, got {value!r}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def check_one_of_top_p_top_k(config) -> None:
    """AnnSA/AnnCA: exactly one of ``top_p`` in (0, 1] and ``top_k`` >= 1."""
    name = type(config).__name__
    if (config.top_p is None) == (config.top_k is None):
        raise ValueError(
            f"{name}: set exactly one of top_p (cumulative mass in (0, 1]) and top_k (an int >= 1), "
            f"got top_p={config.top_p!r}, top_k={config.top_k!r}"
        )
    if config.top_p is not None:
        config.check_range("top_p", low=0.0, high=1.0, low_open=True)
    else:
        config.check_range("top_k", low=1, integer=True)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One attention computation inside an attention module, as it passes through the methods.

    Attributes:
        attn: the attention module being run (key for per-layer state: ``context.module_state(attn)``).
        kind: ``"self"``, ``"cross"`` or ``"cross_image"``.
        q: ``[B, Sq, H, D]``, after norm and rotary embedding, tokens in raster order.
        k: ``[B, Sk, H, D]``.
        v: ``[B, Sk, H, Dv]``.
        scale: softmax scale, ``None`` for ``1/sqrt(D)``.
        key_bias: fp32 ``[B|1, H|1, Sk]`` added to the logits (``-inf`` masks a key), or ``None``.
        plan: block-sparse layout (:func:`vidaccel.ops.plan_blocks`) or ``None`` for dense.
        context: the transformer's :class:`~vidaccel.state.StepContext`, or ``None`` when the processor
            was installed without ``vidaccel.apply``.
        layer: the module's :class:`~vidaccel.state.LayerInfo` (``None`` without a context).
        backend: the processor's ``ops`` backend; use it for any ``ops`` call a method makes itself.
        num_external: in autoregressive rollouts, the first ``num_external`` keys of ``k``/``v`` are
            the KV cache of earlier chunks (with their ``key_bias``) and the rest are the current
            chunk's own keys; ``0`` elsewhere.
        k_pre: self-attention keys ``[B, Sk_own, H, D]`` of the current call before rotary embedding
            (the own keys only, not the cache), or ``None`` where the adapter has none.
    """

    attn: torch.nn.Module
    kind: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None = None
    key_bias: torch.Tensor | None = None
    plan: BlockPlan | None = None
    context: StepContext | None = None
    layer: LayerInfo | None = None
    backend: str = "auto"
    num_external: int = 0
    k_pre: torch.Tensor | None = None

    def replace(self, **changes) -> AttentionCall:
        """A copy with ``changes`` applied, e.g. ``call.replace(k=k_all, v=v_all, key_bias=bias)``."""
        return dataclasses.replace(self, **changes)


Proceed = Callable[[AttentionCall], AttentionResult]


class Method(ABC):
    """The runtime half of a :class:`MethodConfig`, built by its ``build()``.

    A subclass declares ``kinds`` (the call kinds it acts on, a subset of :data:`KINDS`) and
    ``needs_context`` (whether it needs the step context: step index, grid, per-layer state), and
    implements :meth:`attend`. A method keeps no per-layer state on itself, since one processor
    serves every layer: it stores it in ``call.context.module_state(call.attn)``. When
    ``needs_context`` is set but ``call.context`` is ``None`` (plain ``set_attn_processor``), the
    processor has already warned once; ``attend`` must still return a correct result with what it
    has (e.g. re-plan every call) or proceed unchanged.
    """

    kinds: ClassVar[frozenset[str]] = frozenset()
    needs_context: ClassVar[bool] = False
    needs_rollout: ClassVar[bool] = False
    """The method acts only inside an autoregressive rollout (TempCache, FlashBlock): ``vidaccel.apply``
    refuses it on a pipeline that runs none (one without ``runs_rollouts``)."""
    chain_rank: ClassVar[int] = 0
    """Methods run in ascending ``chain_rank``, ties in the order of the configs. A method that must
    see a call before others restructure it has a lower rank (FlashBlock: -1, it splits the rollout's
    cache keys from the chunk's own keys, which AnnSA's permutation interleaves)."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def make_kv_cache(self, rollout: RolloutState) -> KVCache | None:
        """The method's own KV cache for one self-attention module of ``rollout``, or ``None`` (the
        default) to use the rollout's (dense, or a rolling window). TempCache makes its merged cache."""
        return None

    def route(self, call: AttentionCall, centroids: torch.Tensor | None = None):
        """This method's block-sparse routing of ``call`` for a method that runs before it and splits
        the call (FlashBlock's residual reuse of the cache part): a
        :class:`~vidaccel.processors.tokens.PermutedPlan` (``centroids``: a previous plan's warm
        start), or ``None`` (the default: the method does not route, or leaves this call dense)."""
        return None

    def bind(self, later: list[Method]) -> None:
        """Called once by the processor with the methods that run after this one, for a method that
        cooperates with a later one through the declared hooks (FlashBlock's residual reuse takes the
        first later method that has a :meth:`route`). Default: nothing."""
        return None

    @abstractmethod
    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        """Compute ``call``, using ``proceed(call)`` for the rest of the chain: ``-> (out, lse)``
        with ``out`` ``[B, Sq, H, Dv]`` in ``call.q``'s dtype and ``lse`` fp32 ``[B, H, Sq]``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class AccelProcessor:
    """A diffusers attention processor that runs ``configs``' methods, in order, on every call.

    Args:
        *configs: :class:`~vidaccel.config.MethodConfig` instances; their methods are chained in
            this order (the first sees the call first and the result last), after a stable sort by
            :attr:`Method.chain_rank`. None: dense attention.
        backend: :func:`vidaccel.ops.attention` backend, one of ``vidaccel.ops.BACKENDS``.

    Install it with ``vidaccel.apply(pipe, *configs)`` (which also installs the step context) or
    ``pipe.transformer.set_attn_processor(AccelProcessor(*configs))``. One instance serves self- and
    cross-attention and may be shared by all layers; it holds no per-layer state.
    """

    # Filled by diffusers: `set_attention_backend` (ignored, vidaccel runs its own ops) and
    # `enable_parallelism` (context parallelism is refused at the first call).
    _attention_backend = None
    _parallel_config = None

    def __init__(self, *configs: MethodConfig, backend: str = "auto") -> None:
        for position, config in enumerate(configs):
            if not isinstance(config, MethodConfig):
                raise ValueError(
                    f"configs[{position}] must be a vidaccel MethodConfig (e.g. vidaccel.AnnSAConfig()), "
                    f"got {type(config).__name__}"
                )
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.configs = configs
        self.backend = backend
        self.methods = sorted((config.build() for config in configs), key=lambda method: method.chain_rank)
        for position, method in enumerate(self.methods):
            method.bind(self.methods[position + 1 :])
        for method in self.methods:
            unknown = set(method.kinds) - set(KINDS)
            if unknown:
                raise ValueError(
                    f"{type(method).__name__}.kinds must be a subset of {KINDS}, got {sorted(unknown)}"
                )
        self.needs_context = any(method.needs_context for method in self.methods)
        self._chains = {kind: _chain([m for m in self.methods if kind in m.kinds]) for kind in KINDS}
        self._warned: set[str] = set()
        self.makes_kv_cache = any(type(m).make_kv_cache is not Method.make_kv_cache for m in self.methods)
        """Whether a method of this processor makes its own rollout KV caches (TempCache)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """diffusers' processor call for ``attn``: ``hidden_states`` ``[B, S, C]`` → ``[B, S, C]``, with the
        model adapter projecting q/k/v exactly as the stock processor and the attention run by the chain."""
        check_no_context_parallel(self._parallel_config, "this vidaccel processor")
        adapter = adapter_for_attention(attn)
        context = context_for(attn)
        if context is None and self.needs_context:
            self._warn_once(
                f"{type(self).__name__}: {', '.join(type(m).__name__ for m in self.methods if m.needs_context)} "
                "need the step context (denoising step, token grid, per-layer caches), which "
                "`set_attn_processor` alone does not install; install with `vidaccel.apply(pipe, ...)` for every "
                "feature. Serving what works without it."
            )
        attend = functools.partial(self._attend, attn, context)
        return adapter.forward(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, attend)

    def attend(self, call: AttentionCall) -> AttentionResult:
        """Run ``call`` through the methods that act on ``call.kind``: ``-> (out, lse)``."""
        return self._chains[call.kind](call)

    def make_kv_cache(self, rollout: RolloutState) -> KVCache:
        """A new KV cache for one self-attention module of ``rollout``: from the first method that
        makes one, else the rollout's own (dense, or a rolling window)."""
        for method in self.methods:
            cache = method.make_kv_cache(rollout)
            if cache is not None:
                return cache
        return rollout.make_cache()

    def _attend(
        self,
        attn: torch.nn.Module,
        context: StepContext | None,
        kind: str,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        k_pre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            self._warn_once(
                f"{type(self).__name__}: a call with an attention_mask runs exact dense attention "
                "(torch SDPA with that mask); vidaccel methods and kernels skip it"
            )
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask
            )
            return out.transpose(1, 2)
        layer = None if context is None else context.layer(attn)
        call = AttentionCall(
            attn, kind, q, k, v, context=context, layer=layer, backend=self.backend, k_pre=k_pre
        )
        rollout = rollout_of(context)
        if kind == "self" and rollout is not None:
            out, _ = self._attend_rollout(call, rollout)
        else:
            out, _ = self.attend(call)
        return out

    def _attend_rollout(self, call: AttentionCall, rollout: RolloutState) -> AttentionResult:
        context = call.context
        cache = kv_cache_of(context, call.attn)
        if cache is None:
            cache = set_kv_cache(context, call.attn, self.make_kv_cache(rollout))
        num_external = cache.num_external
        k_all, v_all, key_bias = cache.extend(call.k, call.v)
        result = self.attend(call.replace(k=k_all, v=v_all, key_bias=key_bias, num_external=num_external))
        if context.phase == "commit":
            cache.commit(call.k, call.v, k_pre=call.k_pre, frame_index=rollout.frame_index)
        return result

    def _warn_once(self, message: str) -> None:
        ops.warn_once(message, seen=self._warned, stacklevel=4)

    def __repr__(self) -> str:
        configs = ", ".join(repr(config) for config in self.configs)
        return f"{type(self).__name__}({configs}{', ' if configs else ''}backend={self.backend!r})"


class DenseProcessor(AccelProcessor):
    """:class:`AccelProcessor` with no method: exact dense attention on vidaccel's kernels.

    ``pipe.transformer.set_attn_processor(vidaccel.DenseProcessor())`` reproduces the stock
    ``WanAttnProcessor`` up to floating-point rounding.
    """

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__(backend=backend)


def named_processor(name: str, config_cls: type[MethodConfig], *, default: bool) -> type[AccelProcessor]:
    """The named processor of one method: ``<name>(config)`` is ``AccelProcessor(config)`` after checking
    that ``config`` is a ``config_cls`` (``default``: ``config`` may be omitted for ``config_cls()``).
    A class, so that ``isinstance`` and ``repr`` name the method."""

    def __init__(self, config: MethodConfig | None = None, *, backend: str = "auto") -> None:
        if config is None and default:
            config = config_cls()
        if not isinstance(config, config_cls):
            raise ValueError(f"config must be a vidaccel.{config_cls.__name__}, got {type(config).__name__}")
        AccelProcessor.__init__(self, config, backend=backend)

    doc = (
        f":class:`~vidaccel.processors.base.AccelProcessor` running one :class:`{config_cls.__name__}`: "
        f"``{name}(config)`` is ``AccelProcessor(config)``."
    )
    return type(
        name, (AccelProcessor,), {"__init__": __init__, "__doc__": doc, "__module__": config_cls.__module__}
    )


def check_no_context_parallel(parallel_config, what: str) -> None:
    """Raise ``NotImplementedError`` if ``parallel_config`` (diffusers' ``ParallelConfig`` or ``None``)
    enables context parallelism, which splits sequences inside diffusers' attention dispatch, a path
    vidaccel's processors bypass. Tensor parallelism keeps whole sequences and passes."""
    if getattr(parallel_config, "context_parallel_config", None) is not None:
        raise NotImplementedError(
            f"{what} is configured for diffusers context parallelism (enable_parallelism with a "
            "ContextParallelConfig), which vidaccel does not support yet: its attention would see only a "
            "shard of each sequence. Run without context parallelism, or call vidaccel.remove(pipe) first."
        )


def dense_attention(call: AttentionCall) -> AttentionResult:
    """The end of every method chain: ``call`` on :func:`vidaccel.ops.attention` with its bias and plan."""
    return ops.attention(
        call.q,
        call.k,
        call.v,
        scale=call.scale,
        key_bias=call.key_bias,
        plan=call.plan,
        return_lse=True,
        backend=call.backend,
    )


def _chain(methods: list[Method]) -> Proceed:
    proceed: Proceed = dense_attention
    for method in reversed(methods):
        proceed = functools.partial(method.attend, proceed=proceed)
    return proceed
