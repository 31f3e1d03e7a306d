"""The arguments of one rollout of :class:`~vidaccel.pipelines.CausalWanPipeline`, as one frozen
dataclass checked once when made (``pipe(...)`` and ``pipe.stream(...)`` build it from their keyword
arguments; ``pipe(options=RolloutOptions(...))`` passes one)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import check_denoising_timesteps, check_eta, flow_sigmas

__all__ = ["OUTPUT_TYPES", "RolloutOptions"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass(frozen=True, eq=False)
class RolloutOptions:
    """The arguments of one rollout of :class:`CausalWanPipeline` (``pipe(...)``, ``pipe.stream(...)``),
    checked once when made; a bad value raises ``ValueError`` naming the field and its range.

    Attributes:
        prompt: text prompt(s) (needs the pipeline's ``text_encoder`` and ``tokenizer``), or ``None``
            with ``prompt_embeds`` ``[B, L, text_dim]``.
        height, width: output size in pixels (multiples of the VAE's spatial factor times the
            transformer's patch; checked against the pipeline).
        num_frames: output frames, as in diffusers' Wan pipelines (``4k + 1`` with the Wan VAE;
            others are rounded down with a warning). Latent frames: ``(num_frames - 1) // 4 + 1``.
        chunk_frames: latent frames per chunk; a last partial chunk is generated at full size and
            trimmed, so it changes nothing before it.
        denoising_timesteps: decreasing timesteps in ``(0, 1000]`` before the shift.
        shift: flow shift of the sigmas (> 0).
        eta: the share of fresh noise when a step re-noises its clean estimate, in ``[0, 1]``: ``1``
            (Self-Forcing's sampler) re-noises with fresh noise; ``0`` re-noises with the model's own
            noise estimate, which makes each step the Euler step of the flow ODE (as diffusers'
            ``FlowMatchEulerDiscreteScheduler`` steps); between, the noise is
            ``eta * fresh + sqrt(1 - eta**2) * estimate``.
        context_timestep: timestep in ``[0, 1000]`` of the commit pass that writes a finished chunk
            into the KV cache (``0``: the clean chunk; above, re-noised to that sigma).
        max_cache_frames, sink_frames: Self-Forcing's rolling-window baseline: the KV cache holds at
            most ``max_cache_frames`` earlier latent frames, the first ``sink_frames`` of them kept
            for the whole rollout. ``None``: the whole past. Not combinable with TempCache, which
            has its own sinks and budget.
        generator: seeds the noise (drawn chunk by chunk).
        output_type: ``"np"`` (``[B, F, H, W, 3]`` floats in ``[0, 1]``), ``"pil"``, ``"pt"``
            (``[B, F, 3, H, W]``) or ``"latent"`` (``[B, C, F_latent, h, w]``).
    """

    prompt: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    height: int = 480
    width: int = 832
    num_frames: int = 81
    chunk_frames: int = 3
    denoising_timesteps: Sequence[float] = (1000, 750, 500, 250)
    shift: float = 5.0
    eta: float = 1.0
    context_timestep: float = 0
    max_cache_frames: int | None = None
    sink_frames: int = 0
    generator: torch.Generator | list[torch.Generator] | None = None
    output_type: str = "np"

    def __post_init__(self):
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if self.prompt_embeds is not None and self.prompt_embeds.dim() != 3:
            raise ValueError(
                f"prompt_embeds must be [B, L, text_dim], got shape {tuple(self.prompt_embeds.shape)}"
            )
        _check_int("chunk_frames", self.chunk_frames, 1)
        _check_int("num_frames", self.num_frames, 1)
        for name in ("height", "width"):
            _check_int(name, getattr(self, name), 1)
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {self.output_type!r}")
        check_denoising_timesteps(self.denoising_timesteps)
        shift = self.shift
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift < math.inf:
            raise ValueError(f"shift must be a float in (0, inf), got {shift!r}")
        check_eta(self.eta)
        timestep = self.context_timestep
        if not isinstance(timestep, (int, float)) or isinstance(timestep, bool) or not 0 <= timestep <= 1000:
            raise ValueError(f"context_timestep must be a float in [0, 1000], got {timestep!r}")
        _check_int("sink_frames", self.sink_frames, 0)
        if self.max_cache_frames is None:
            if self.sink_frames:
                raise ValueError("sink_frames needs max_cache_frames (the sinks of the rolling-window cache)")
        else:
            _check_int("max_cache_frames", self.max_cache_frames, 1)
            if self.sink_frames >= self.max_cache_frames:
                raise ValueError(
                    f"sink_frames must be an int in [0, max_cache_frames - 1 = {self.max_cache_frames - 1}], "
                    f"got {self.sink_frames}"
                )

    @property
    def sigmas(self) -> list[float]:
        """The shifted sigmas of the sampler's steps (:func:`~vidaccel.pipelines.sampling.flow_sigmas`)."""
        return flow_sigmas(self.denoising_timesteps, self.shift)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int in [{low}, inf), got {value!r}")
