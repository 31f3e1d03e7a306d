"""The pieces of a Wan rollout that are not the pipeline: the few-step flow sampler, Wan's rotary
table at any frame offset, and the chunk-by-chunk VAE decode.

:class:`~vidaccel.pipelines.CausalWanPipeline` and the world model's trainer share them; the module
docstring of :mod:`vidaccel.pipelines.causal_wan` describes the sampler and the positions.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence

import torch
from diffusers.models.autoencoders import autoencoder_kl_wan
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "WAN_ROPE_THETA",
    "check_denoising_timesteps",
    "check_eta",
    "decode_latent_chunk",
    "flow_sigmas",
    "renoise_noise",
    "rotary_emb_at",
    "rotary_emb_frames",
]

WAN_ROPE_THETA = 10000.0
"""Base of Wan's rotary frequencies (``WanRotaryPosEmbed`` uses its default)."""


def check_denoising_timesteps(denoising_timesteps: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``denoising_timesteps`` (a sampler's timesteps) are strictly
    decreasing values in ``(0, 1000]``."""
    timesteps = list(denoising_timesteps)
    if (
        not timesteps
        or any(not 0 < float(t) <= 1000 for t in timesteps)
        or timesteps != sorted(timesteps, reverse=True)
        or len(set(timesteps)) != len(timesteps)
    ):
        raise ValueError(
            f"denoising_timesteps must be strictly decreasing values in (0, 1000], got {denoising_timesteps!r}"
        )


def check_eta(eta) -> None:
    """Raise ``ValueError`` unless ``eta`` (the sampler's share of fresh noise) is a float in ``[0, 1]``."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")


def renoise_noise(
    latents: torch.Tensor, flow: torch.Tensor, sigma: float, eta: float, generator=None
) -> torch.Tensor:
    """The noise a sampler step re-noises its clean estimate ``latents - sigma * flow`` with:
    ``eta * fresh + sqrt(1 - eta**2) * estimate``, where ``estimate = latents + (1 - sigma) * flow`` is
    the model's estimate of the noise in ``latents`` (flow matching: ``x = (1 - sigma) x0 + sigma
    noise``, ``flow = noise - x0``). ``eta = 1``: fresh noise from ``generator``; ``eta = 0``: the
    estimate, which makes ``(1 - sigma') x0 + sigma' noise`` the flow ODE's Euler step
    ``latents + (sigma' - sigma) flow`` (no draw)."""
    fresh = None
    if eta > 0:
        fresh = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if eta == 1:
        return fresh
    estimate = latents + (1 - sigma) * flow
    return estimate if fresh is None else eta * fresh + math.sqrt(1 - eta**2) * estimate


def flow_sigmas(timesteps: Sequence[float], shift: float) -> list[float]:
    """Shifted flow-matching sigmas of ``timesteps`` (in ``[0, 1000]``): ``shift * s / (1 + (shift - 1) * s)``
    with ``s = t / 1000``, the static shift of diffusers' ``FlowMatchEulerDiscreteScheduler``.

    >>> flow_sigmas([1000, 750, 500, 250], 5.0)
    [1.0, 0.9375, 0.8333333333333334, 0.625]
    """
    return [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in map(float, timesteps)]


def rotary_emb_at(rope: WanRotaryPosEmbed, latent_shape: Sequence[int], frame_offset: int):
    """Wan's rotary table for a chunk whose first latent frame is ``frame_offset``.

    Args:
        rope: the transformer's ``WanRotaryPosEmbed``.
        latent_shape: ``(F, H, W)`` of the chunk's latents (before patchifying).
        frame_offset: absolute latent frame of the chunk's first frame (any size: the temporal part
            follows Wan's formula beyond ``rope_max_seq_len``).

    Returns ``(freqs_cos, freqs_sin)``, each ``[1, S, 1, D]`` in the layout ``rope`` returns; at
    ``frame_offset=0`` bit-identical to ``rope`` on the chunk, and at any offset equal to rows of
    ``rope``'s table for a sequence that long.
    """
    p_t, p_h, p_w = rope.patch_size
    frames = latent_shape[0] // p_t
    positions = torch.arange(frame_offset // p_t, frame_offset // p_t + frames, device=rope.freqs_cos.device)
    return rotary_emb_frames(rope, positions, latent_shape[1] // p_h, latent_shape[2] // p_w)


def rotary_emb_frames(rope: WanRotaryPosEmbed, frame_positions: torch.Tensor, height: int, width: int):
    """Wan's rotary table for token frames at arbitrary temporal positions (e.g. a training clip
    whose frames are not consecutive, a different layout per clip).

    Args:
        rope: the transformer's ``WanRotaryPosEmbed``.
        frame_positions: long ``[F]`` or ``[B, F]``: the temporal rotary position of each token frame.
        height, width: the token grid of one frame (after patchifying).

    Returns ``(freqs_cos, freqs_sin)``, each ``[1 | B, F * height * width, 1, D]`` (raster order);
    with consecutive positions equal to :func:`rotary_emb_at`.
    """
    positions = frame_positions.reshape(-1, frame_positions.shape[-1])
    batch, frames = positions.shape
    t_cos, t_sin = get_1d_rotary_pos_embed(
        rope.t_dim,
        positions.flatten().to(rope.freqs_cos.device),
        WAN_ROPE_THETA,
        use_real=True,
        repeat_interleave_real=True,
        freqs_dtype=torch.float64,
    )
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    shape = (batch, frames, height, width, -1)
    tables = []
    for table, t_part in ((rope.freqs_cos, t_cos), (rope.freqs_sin, t_sin)):
        _, h_part, w_part = table.split(split, dim=1)
        parts = (
            t_part.to(table.dtype).view(batch, frames, 1, 1, -1).expand(shape),
            h_part[:height].view(1, 1, height, 1, -1).expand(shape),
            w_part[:width].view(1, 1, 1, width, -1).expand(shape),
        )
        tables.append(torch.cat(parts, dim=-1).reshape(batch, frames * height * width, 1, -1))
    return tuple(tables)


def decode_latent_chunk(vae, latents: torch.Tensor, feat_cache: list | None) -> tuple[torch.Tensor, list]:
    """Decode the next latent frames of a video with the Wan VAE, continuing its causal feature cache.

    Args:
        vae: an ``AutoencoderKLWan``.
        latents: ``[B, z_dim, f, h, w]`` un-normalised latents (as ``vae.decode`` takes them), the
            frames that follow those decoded before with ``feat_cache``.
        feat_cache: the cache returned by the previous call, or ``None`` for a video's first chunk.

    Returns ``(frames [B, 3, f', H, W] in [-1, 1], feat_cache)``; ``f' = 1 + 4 (f - 1)`` for the first
    chunk and ``4 f`` after. Decoding a latent in chunks this way equals ``vae.decode`` on the whole.

    This is the one place that uses the private causal-decode protocol of diffusers'
    ``AutoencoderKLWan`` (the per-frame ``decoder(x, feat_cache=, feat_idx=, first_chunk=)`` loop of
    its ``_decode``, with one cache slot per ``WanCausalConv3d``); the cache is a list owned by the
    caller, so ``vae``'s own ``_feat_map`` is left alone. It raises ``RuntimeError`` if a diffusers
    upgrade changed that protocol, and tiled decoding is not applied to chunks.
    """
    decoder = vae.decoder
    missing = {"feat_cache", "feat_idx", "first_chunk"} - set(inspect.signature(decoder.forward).parameters)
    if (
        missing
        or not hasattr(autoencoder_kl_wan, "WanCausalConv3d")
        or not hasattr(autoencoder_kl_wan, "unpatchify")
    ):
        raise RuntimeError(
            "diffusers changed AutoencoderKLWan's causal decoding (decoder arguments feat_cache/feat_idx/first_chunk, "
            "WanCausalConv3d, unpatchify), which vidaccel.pipelines.causal_wan.decode_latent_chunk mirrors; "
            "update that function for this diffusers version"
        )
    if getattr(vae, "use_tiling", False):
        warnings.warn("decode_latent_chunk decodes chunks without VAE tiling", stacklevel=2)
    first = feat_cache is None
    if first:
        feat_cache = [None] * sum(
            isinstance(m, autoencoder_kl_wan.WanCausalConv3d) for m in decoder.modules()
        )
    x = vae.post_quant_conv(latents)
    frames = []
    for i in range(x.shape[2]):
        frames.append(
            decoder(x[:, :, i : i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=first and i == 0)
        )
    out = torch.cat(frames, dim=2)
    if vae.config.patch_size is not None:
        out = autoencoder_kl_wan.unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0), feat_cache
