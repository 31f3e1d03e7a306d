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

**The rollout stage.** In an autoregressive rollout (``CausalWanPipeline`` sets
``context.pipeline_state["rollout"]``), every self-attention call first passes through the module's
KV cache, held by the step context: the chain sees the cache followed by the call's own keys
(``num_external`` cached keys, with the cache's ``key_bias``), and in the rollout's ``"commit"``
phase the call's own keys and values are added to the cache after the chain has run. The cache
comes from the first method that has ``make_kv_cache()`` (TempCache), else from the rollout
(dense, or a rolling window).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from vidaccel import ops
from vidaccel.config import MethodConfig
from vidaccel.kernels.plan import BlockPlan
from vidaccel.state import LayerInfo, StepContext, context_for

from .registry import adapter_for_attention

if TYPE_CHECKING:
    from vidaccel.cache import KVCache
    from vidaccel.pipelines.causal_wan import RolloutState

__all__ = ["KINDS", "AccelProcessor", "AttentionCall", "DenseProcessor", "Method", "dense_attention"]

KINDS = ("self", "cross", "cross_image")
"""Attention call kinds: video self-attention, cross-attention to the prompt, and (I2V) to image tokens."""

AttentionResult = tuple[torch.Tensor, torch.Tensor]
"""``(out [B, Sq, H, Dv] in q's dtype, lse fp32 [B, H, Sq])``, what every link of the chain returns."""


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
    """The runtime half of a :class:`~vidaccel.config.MethodConfig`, built by its ``build()``.

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
    chain_rank: ClassVar[int] = 0
    """Methods run in ascending ``chain_rank``, ties in the order of the configs. A method that must
    see a call before others restructure it has a lower rank (FlashBlock: -1, it splits the rollout's
    cache keys from the chunk's own keys, which AnnSA's permutation interleaves)."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def bind(self, later: list[Method]) -> None:
        """Called once by the processor with the methods that run after this one, for a method that
        cooperates with a later one (FlashBlock's residual reuse takes AnnSA's routing). Default: nothing."""
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
                raise ValueError(f"{type(method).__name__}.kinds must be a subset of {KINDS}, got {sorted(unknown)}")
        self.needs_context = any(method.needs_context for method in self.methods)
        self._chains = {kind: _chain([m for m in self.methods if kind in m.kinds]) for kind in KINDS}
        self._warned: set[str] = set()

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

    @property
    def makes_kv_cache(self) -> bool:
        """Whether a method of this processor makes its own rollout KV caches (``make_kv_cache()``)."""
        return any(hasattr(method, "make_kv_cache") for method in self.methods)

    def make_kv_cache(self, rollout: RolloutState) -> KVCache:
        """A new KV cache for one self-attention module of ``rollout``: from the first method with
        ``make_kv_cache()``, else the rollout's own (dense, or a rolling window)."""
        for method in self.methods:
            if hasattr(method, "make_kv_cache"):
                return method.make_kv_cache(rollout)
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
        call = AttentionCall(attn, kind, q, k, v, context=context, layer=layer, backend=self.backend, k_pre=k_pre)
        rollout = None if context is None else context.pipeline_state.get("rollout")
        if kind == "self" and rollout is not None:
            out, _ = self._attend_rollout(call, rollout)
        else:
            out, _ = self.attend(call)
        return out

    def _attend_rollout(self, call: AttentionCall, rollout: RolloutState) -> AttentionResult:
        context = call.context
        state = context.module_state(call.attn)
        cache = state.get("kv_cache")
        if cache is None:
            cache = state["kv_cache"] = self.make_kv_cache(rollout)
        num_external = cache.num_external
        k_all, v_all, key_bias = cache.extend(call.k, call.v)
        result = self.attend(call.replace(k=k_all, v=v_all, key_bias=key_bias, num_external=num_external))
        if context.phase == "commit":
            cache.commit(call.k, call.v, k_pre=call.k_pre, frame_index=rollout.frame_index)
        return result

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

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
