"""Tiny Wan pipelines with deterministic random weights, built from configs (no download).

The shapes follow diffusers' own Wan tests. They run on a CPU in well under a second per step,
for tests and for ``make demo``::

    from vidaccel.pipelines import build_tiny_wan_pipeline, tiny_prompt_embeds
    pipe = build_tiny_wan_pipeline(seed=0)
    frames = pipe(
        prompt_embeds=tiny_prompt_embeds(pipe, seed=1),
        negative_prompt_embeds=tiny_prompt_embeds(pipe, seed=2),
        height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=5.0, output_type="pt",
    ).frames                                                    # [1, 9, 3, 32, 32]

Geometry: the VAE downsamples 8× in space and 4× in time (``num_frames = 4k + 1``), the transformer
patches 2×2, so ``height × width × num_frames`` gives a token grid
``((num_frames - 1) / 4 + 1, height / 16, width / 16)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

if TYPE_CHECKING:
    from diffusers import WanImageToVideoPipeline

__all__ = ["WAN21_1_3B_CONFIG", "build_tiny_wan_pipeline", "cast_keeping_fp32_modules", "tiny_prompt_embeds"]

WAN21_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
"""``WanTransformer3DModel`` config of Wan2.1-T2V-1.3B (as in its diffusers checkpoint), for the
random-weight benchmarks and demos: ``WanTransformer3DModel(**WAN21_1_3B_CONFIG)``."""

# diffusers' Wan I2V attention takes the last 512 encoder tokens as the (padded) prompt.
_I2V_TEXT_TOKENS = 512
_TEXT_DIM = 32
_IMAGE_DIM = 4


def build_tiny_wan_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 12,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    i2v: bool = False,
) -> WanPipeline | WanImageToVideoPipeline:
    """A diffusers Wan pipeline with a tiny random transformer and VAE, and no text encoder.

    Args:
        seed: seeds the weights (the caller's global RNG state is left untouched).
        num_layers: transformer blocks.
        heads, head_dim: attention heads and head dim (12 for adapter tests; 64 where a method's
            kernels are under test). ``head_dim`` must be at least 6 for Wan's 3-D rotary split.
        dtype: transformer dtype; the VAE (and image encoder) stay fp32, as in Wan's examples.
        device: where the modules live.
        i2v: build a Wan 2.1 style ``WanImageToVideoPipeline`` instead of a ``WanPipeline``: the
            transformer takes 36 input channels and image tokens through ``add_k_proj``/``add_v_proj``,
            and a tiny CLIP vision encoder turns the conditioning image into 5 image tokens.

    The pipeline has ``tokenizer=None`` and ``text_encoder=None``: call it with ``prompt_embeds`` and,
    with guidance, ``negative_prompt_embeds`` (see :func:`tiny_prompt_embeds`); an I2V pipeline also
    needs ``image`` (a PIL image or a ``[1, 3, H, W]`` tensor in ``[0, 1]``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=36 if i2v else 16,
            out_channels=16,
            text_dim=_TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
            image_dim=_IMAGE_DIM if i2v else None,
            added_kv_proj_dim=heads * head_dim if i2v else None,
        )
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        components = {
            "tokenizer": None,
            "text_encoder": None,
            "vae": vae.eval(),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
            "transformer": cast_keeping_fp32_modules(transformer.eval(), dtype),
        }
        if not i2v:
            return WanPipeline(**components).to(device)
        from diffusers import WanImageToVideoPipeline  # its import pulls in transformers' image processors

        image_encoder, image_processor = _tiny_image_encoder()
        return WanImageToVideoPipeline(
            **components, image_encoder=image_encoder.eval(), image_processor=image_processor
        ).to(device)


def tiny_prompt_embeds(
    pipe: WanPipeline | WanImageToVideoPipeline,
    seed: int = 0,
    *,
    seq_len: int = 16,
    pad_to: int | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Random prompt embeddings ``[batch_size, max(seq_len, pad_to), text_dim]`` for a tiny pipeline.

    ``seq_len`` tokens are standard normal (seeded by ``seed``); tokens after them, up to ``pad_to``,
    are zeros, as diffusers' Wan ``encode_prompt`` pads T5 output to ``max_sequence_length``. For an
    I2V transformer ``pad_to`` defaults to 512, the prompt length its attention expects. The result
    has the transformer's dtype and device. Use two seeds for ``prompt_embeds`` and
    ``negative_prompt_embeds``.
    """
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    if pad_to is None and transformer.config.added_kv_proj_dim is not None:
        pad_to = _I2V_TEXT_TOKENS
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds = torch.randn(batch_size, seq_len, transformer.config.text_dim, generator=generator)
    if pad_to is not None and pad_to > seq_len:
        embeds = torch.cat([embeds, embeds.new_zeros(batch_size, pad_to - seq_len, embeds.shape[-1])], dim=1)
    return embeds.to(device=transformer.device, dtype=transformer.dtype)


def cast_keeping_fp32_modules(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to ``dtype`` but keep the model's ``_keep_in_fp32_modules`` as they are, as
    ``from_pretrained(torch_dtype=...)`` does (a plain ``.to(dtype)`` would cast them too)."""
    keep = set(transformer._keep_in_fp32_modules)
    tensors = [*transformer.named_parameters(), *transformer.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_floating_point() and keep.isdisjoint(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return transformer


def _tiny_image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=_IMAGE_DIM,
        projection_dim=_IMAGE_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=32,
        patch_size=16,
    )
    return CLIPVisionModel(config), CLIPImageProcessor(crop_size=32, size=32)
