"""Wan adapter: projects q/k/v exactly like diffusers' stock ``WanAttnProcessor``.

Serves ``WanTransformer3DModel`` (Wan 2.1 and 2.2, T2V and I2V). Everything but the attention itself
is the stock computation, op for op: fused or separate projections, RMS norm of q and k across
heads, rotary embedding on self-attention, I2V image tokens through ``add_k_proj``/``add_v_proj``
with their output added to the text output, and the output projection. The attention calls go to
the processor's ``attend`` callback, where the configured methods act.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel

from vidaccel.state import ForwardInputs, LayerInfo

__all__ = ["WanAdapter", "apply_rotary_emb"]

# diffusers' Wan I2V pipelines pass [image tokens, 512 text tokens] as encoder_hidden_states.
_TEXT_CONTEXT_LENGTH = 512

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
        read per forward, never per layer.
        """
        hidden_states = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = transformer.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        return ForwardInputs(grid, batch, float(torch.as_tensor(timestep).max()))

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
        attention_mask=None)`` takes ``[B, S, H, D]`` q/k/v and returns ``[B, Sq, H, Dv]``; ``kind`` is
        ``"self"``, ``"cross"`` or ``"cross_image"``.
        """
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - _TEXT_CONTEXT_LENGTH
            image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]

        query, key, value = _project_qkv(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, Sq, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))  # [B, Sk, H, D]
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        image_out = None
        if image_context is not None:
            key_img, value_img = _project_added_kv(attn, image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image_out = attend("cross_image", query, key_img, value_img).flatten(2, 3).type_as(query)

        kind = "self" if encoder_hidden_states is None else "cross"
        out = attend(kind, query, key, value, attention_mask).flatten(2, 3).type_as(query)
        if image_out is not None:
            out = out + image_out
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


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


def _project_qkv(attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if not attn.fused_projections:
        return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if not attn.is_cross_attention:
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    key, value = attn.to_kv(context).chunk(2, dim=-1)
    return attn.to_q(hidden_states), key, value


def _project_added_kv(attn: WanAttention, image_context: torch.Tensor):
    if attn.fused_projections:
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)
