"""Wan adapter: projects q/k/v exactly like diffusers' stock ``WanAttnProcessor``.

Serves ``WanTransformer3DModel`` (Wan 2.1 and 2.2, T2V and I2V). Everything but the attention itself
is the stock computation, op for op: fused or separate projections, RMS norm of q and k across
heads, rotary embedding on self-attention, I2V image tokens through ``add_k_proj``/``add_v_proj``
with their output added to the text output, and the output projection. The attention calls go to
the processor's ``attend`` callback, where the configured methods act.

With a step context (``vidaccel.apply``), the prompt's cross-attention K/V (and the I2V image K/V)
are projected once per generation and per conditioning tensor: the transformer derives them from
the same prompt embeddings at every step, so the cached projection is bit-identical to a new one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel

from vidaccel.state import ForwardInputs, LayerInfo, context_for

__all__ = ["WanAdapter", "apply_rotary_emb"]

# diffusers' Wan I2V pipelines pass [image tokens, 512 text tokens] as encoder_hidden_states.
_TEXT_CONTEXT_LENGTH = 512
# Cross-attention K/V kept per module and generation: one per distinct conditioning (cond and uncond
# under CFG); a pipeline that passes new conditioning tensors at every step only cycles through these.
_PROMPT_KV_ENTRIES = 4

Attend = Callable[..., torch.Tensor]


class WanAdapter:
    """The model adapter for ``WanTransformer3DModel`` (see ``vidaccel.processors.registry``)."""

    transformer_cls = WanTransformer3DModel
    attention_cls = WanAttention

    def layers(self, transformer: WanTransformer3DModel) -> dict[WanAttention, LayerInfo]:
        """Every ``WanAttention`` in ``transformer.blocks`` with its block index and kind."""
        blocks = transformer.blocks
        layers = {}
        for index, block in enumerate(blocks):
            for name, module in block.named_modules():
                if isinstance(module, WanAttention):
                    kind = "cross" if module.is_cross_attention else "self"
                    layers[module] = LayerInfo(index, len(blocks), kind, f"blocks.{index}.{name}")
        return layers

    def read_inputs(self, transformer: WanTransformer3DModel, args: tuple, kwargs: dict) -> ForwardInputs:
        """Grid, batch and timestep of a forward called as ``transformer(hidden_states, timestep, ...)``.

        ``hidden_states`` is ``[B, C, F, H, W]``; the grid is ``(F/p_t, H/p_h, W/p_w)``. ``timestep`` is
        ``[B]`` or, for per-token timesteps (Wan 2.2 TI2V), ``[B, S]``, whose maximum is taken: one host
        read per forward, never per layer. The conditioning is ``(encoder_hidden_states,
        encoder_hidden_states_image)``.
        """
        hidden_states = _argument(args, kwargs, 0, "hidden_states")
        timestep = _argument(args, kwargs, 1, "timestep")
        conditioning = (
            _argument(args, kwargs, 2, "encoder_hidden_states"),
            _argument(args, kwargs, 3, "encoder_hidden_states_image"),
        )
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = transformer.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        return ForwardInputs(grid, batch, float(torch.as_tensor(timestep).max()), conditioning)

    def forward(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
        attend: Attend,
    ) -> torch.Tensor:
        """One ``WanAttention`` call: ``hidden_states`` ``[B, S, C]`` → ``[B, S, C]``.

        ``encoder_hidden_states`` ``[B, S_ctx, C_ctx]`` is ``None`` for self-attention; with I2V
        projections its first ``S_ctx - 512`` tokens are image tokens. ``attend(kind, q, k, v,
        attention_mask=None, k_pre=None)`` takes ``[B, S, H, D]`` q/k/v and returns ``[B, Sq, H, Dv]``;
        ``kind`` is ``"self"``, ``"cross"`` or ``"cross_image"``; self-attention calls also pass
        ``k_pre``, the keys before rotary embedding.
        """
        if encoder_hidden_states is None:
            query, key, value = _project_qkv(attn, hidden_states)
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            k_pre = key
            if rotary_emb is not None:
                query = apply_rotary_emb(query, *rotary_emb)
                key = apply_rotary_emb(key, *rotary_emb)
            out = attend("self", query, key, value, attention_mask, k_pre=k_pre).flatten(2, 3).type_as(query)
            return attn.to_out[1](attn.to_out[0](out))

        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, Sq, H, D]
        key, value, image_kv = _prompt_kv(attn, encoder_hidden_states)
        out = attend("cross", query, key, value, attention_mask).flatten(2, 3).type_as(query)
        if image_kv is not None:
            out = out + attend("cross_image", query, *image_kv).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs.

    ``x`` ``[B, S, H, D]``; ``freqs_cos``/``freqs_sin`` ``[1, S, 1, D]`` as ``WanRotaryPosEmbed``
    returns them (each pair's angle repeated twice). Pair ``(x1, x2)`` becomes
    ``(x1 cos - x2 sin, x1 sin + x2 cos)``, computed in the freqs' dtype and returned in ``x``'s.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2] each
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _prompt_kv(attn: WanAttention, encoder_hidden_states: torch.Tensor):
    """``(key, value, (key_img, value_img) or None)`` of a cross-attention call, ``[B, S_ctx, H, D]`` each,
    projected once per generation and conditioning where a step context is installed (not while
    ``torch.compile`` traces: a cache filled as a side effect of a traced graph is not reusable)."""
    context = context_for(attn)
    conditioning = None if context is None else context.conditioning
    if conditioning is None or torch.compiler.is_compiling():
        return _project_prompt_kv(attn, encoder_hidden_states)
    entries = context.module_state(attn).setdefault("prompt_kv", [])
    tag = _conditioning_tag(conditioning, encoder_hidden_states)
    for entry_tag, kv in entries:
        if _same_conditioning(entry_tag, tag):
            return kv
    kv = _project_prompt_kv(attn, encoder_hidden_states)
    entries.append((tag, kv))
    del entries[:-_PROMPT_KV_ENTRIES]
    return kv


def _conditioning_tag(conditioning: tuple, encoder_hidden_states: torch.Tensor) -> tuple:
    # The tensors themselves (kept alive until the context resets, so identity is never reused) with
    # their in-place version counters, and the shape the module receives.
    tensors = tuple(t for t in conditioning if t is not None)
    return tensors, tuple(t._version for t in tensors), tuple(encoder_hidden_states.shape)


def _same_conditioning(a: tuple, b: tuple) -> bool:
    return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0], strict=True)) and a[1:] == b[1:]


def _project_prompt_kv(attn: WanAttention, encoder_hidden_states: torch.Tensor):
    image_context = None
    if attn.add_k_proj is not None:
        split = encoder_hidden_states.shape[1] - _TEXT_CONTEXT_LENGTH
        image_context, encoder_hidden_states = (
            encoder_hidden_states[:, :split],
            encoder_hidden_states[:, split:],
        )
    if attn.fused_projections:
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if image_context is None:
        return key, value, None
    key_img, value_img = _project_added_kv(attn, image_context)
    key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
    return key, value, (key_img, value_img.unflatten(2, (attn.heads, -1)))


def _project_qkv(attn: WanAttention, hidden_states: torch.Tensor):
    if attn.fused_projections:
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def _project_added_kv(attn: WanAttention, image_context: torch.Tensor):
    if attn.fused_projections:
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


def _argument(args: tuple, kwargs: dict, position: int, name: str):
    return args[position] if len(args) > position else kwargs.get(name)
