"""FreeSwimWanPipeline: Wan text-to-video above the training resolution with FreeSwim.

Generate at the model's native size with the stock Wan pipeline (or take an input video), upscale the
frames to the target size, then refine video-to-video (SDEdit-style, ``strength``) with FreeSwim's dual
path: the window branch (inward sliding-window self-attention) and the full branch (dense
self-attention) in one batch, the full branch's cross-attention output overriding the window branch's
in every block, the full branch run every ``cache_steps`` steps and its cached cross-attention outputs
serving the steps in between, the unconditional pass on the window branch alone, and only the window
branch's latent kept (shared/METHODS.md, FreeSwim)::

    import torch, vidaccel
    from vidaccel.pipelines import FreeSwimWanPipeline

    pipe = FreeSwimWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    pipe.to("cuda")
    pipe.set_attn_processor(vidaccel.FreeSwimProcessor(vidaccel.FreeSwimConfig(cache_steps=5, offload_cache=True)))
    result = pipe(prompt="a red fox in fresh snow", height=1088, width=1920, num_frames=81)
    result.frames, result.timings

Memory at 1088×1920×81 (token grid 21×68×120 = 171,360 tokens, bf16), estimated from shapes with the
1.3B anchor of shared/BENCHMARKS.md (10.5 GiB peak for one row at this size) and to be confirmed on
the GPU:

==========  ========  ======================  ===========================  =========================
checkpoint  weights   dual-batch activations  cross-attention cache        peak GPU (cache on GPU /
                      (window + full rows)    (bf16, one per block)        ``offload_cache=True``)
==========  ========  ======================  ===========================  =========================
Wan-1.3B    2.8 GB    ≈ 15 GB                 30 × 0.53 GB = 15.8 GB       ≈ 34 GB / ≈ 18 GB
Wan-14B     28.6 GB   ≈ 30 GB                 40 × 1.75 GB = 70 GB         ≈ 129 GB / ≈ 59 GB
==========  ========  ======================  ===========================  =========================

The per-block cache holds one cross-attention output ``[1, 171360, dim]`` (dim 1536 / 5120) and its
LSE; with ``offload_cache`` it lives in pinned host memory (that much CPU RAM). Add the UMT5 text
encoder (11.4 GB in bf16) unless it is offloaded (``enable_model_cpu_offload``); the VAE decodes
tiled (``vae.enable_tiling()``, done here), a few GB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

import vidaccel
from vidaccel.processors.base import AccelProcessor
from vidaccel.processors.freeswim import (
    FreeSwim,
    FreeSwimBatch,
    FreeSwimConfig,
    FreeSwimProcessor,
    set_freeswim_batch,
)
from vidaccel.state import context_of

__all__ = ["FreeSwimWanPipeline", "FreeSwimWanPipelineOutput"]


@dataclass
class FreeSwimWanPipelineOutput(BaseOutput):
    """``frames``: the refined video (``output_type`` as in ``WanPipeline``; latents for ``"latent"``).
    ``timings``: seconds per stage (``native``, ``encode``, ``refine``, ``decode``, ``total``) and the
    number of refinement steps and of steps that ran the full branch."""

    frames: object
    timings: dict


class FreeSwimWanPipeline(WanPipeline):
    """A ``WanPipeline`` that generates above the training size with FreeSwim (see the module docstring).

    Loads like ``WanPipeline`` (Wan2.1-T2V-1.3B / 14B in diffusers format, or
    ``FreeSwimWanPipeline(**pipe.components)``). The FreeSwim configuration comes from the installed
    :class:`~vidaccel.FreeSwimProcessor` (a default one is installed at the first call when the
    transformer still has its stock processors).
    """

    def set_attn_processor(self, processor) -> None:
        """Install ``processor`` (one instance or a ``{name: processor}`` dict) on the transformer; a
        vidaccel processor also gets vidaccel's step context, as with ``vidaccel.apply``."""
        processors = processor.values() if isinstance(processor, dict) else [processor]
        if any(isinstance(p, AccelProcessor) for p in processors):
            vidaccel.apply(self.transformer)
        self.transformer.set_attn_processor(processor)

    @property
    def freeswim_config(self) -> FreeSwimConfig | None:
        """The config of the FreeSwim method installed on the transformer, or ``None``."""
        for processor in self.transformer.attn_processors.values():
            for method in getattr(processor, "methods", ()):
                if isinstance(method, FreeSwim):
                    return method.config
        return None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        video=None,
        height: int = 1088,
        width: int = 1920,
        num_frames: int = 81,
        strength: float = 0.7,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        flow_shift: float | None = 9.0,
        native_inference_steps: int = 50,
        native_guidance_scale: float = 5.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int = 512,
    ):
        """Generate (or take ``video``), upscale to ``height × width`` and refine with FreeSwim.

        Args:
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length: as
                for ``WanPipeline``.
            video: input video (list of PIL frames, ``[F, 3, h, w]``/``[1, F, 3, h, w]`` tensor in
                ``[0, 1]``, or what ``video_processor.preprocess_video`` takes); ``None`` generates one
                at the config's ``train_size`` with the stock Wan pipeline first.
            height, width: target size in pixels, multiples of 16 and at least ``train_size``.
            num_frames: frames to generate (``4k + 1``); ignored when ``video`` is given.
            strength: share of the refinement schedule run from the noised input, in ``(0, 1]``.
            num_inference_steps: refinement schedule length (``round(strength · steps)`` are run).
            guidance_scale: classifier-free guidance of the refinement (``<= 1``: none).
            flow_shift: scheduler shift of the refinement (``None``: the pipeline's scheduler as is).
            native_inference_steps, native_guidance_scale: of the native-size generation.
            generator: seeds the native generation and the refinement noise.
            output_type: ``"np"``, ``"pt"``, ``"pil"`` or ``"latent"``.

        Returns :class:`FreeSwimWanPipelineOutput` (or ``(frames, timings)`` without ``return_dict``).
        Raises ``ValueError`` for a target smaller than ``train_size`` or not a multiple of 16, a
        ``strength`` outside ``(0, 1]``, or a processor set without FreeSwim.
        """
        config = self._ensure_freeswim()
        self._check_call(config, height, width, strength)
        device = self._execution_device
        timings: dict = {}
        start = self._clock()

        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg or (video is None and native_guidance_scale > 1.0),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        negative_prompt_embeds = None if negative_prompt_embeds is None else negative_prompt_embeds.to(dtype)
        if video is None:
            native = dict(steps=native_inference_steps, guidance=native_guidance_scale, generator=generator)
            video = self._native(config, prompt_embeds, negative_prompt_embeds, num_frames, **native)
        timings["native"] = self._clock() - start

        mark = self._clock()
        scheduler = self._refine_scheduler(flow_shift)
        latents, timesteps = self._noised(
            video, height, width, scheduler, num_inference_steps, strength, generator
        )
        timings["encode"] = self._clock() - mark

        mark = self._clock()
        embeds = (prompt_embeds, negative_prompt_embeds)
        latents, full_steps = self._refine(
            config, scheduler, timesteps, latents, *embeds, guidance_scale, do_cfg
        )
        timings.update(refine=self._clock() - mark, steps=len(timesteps), full_steps=full_steps)

        mark = self._clock()
        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(self._decode(latents), output_type=output_type)
        timings["decode"] = self._clock() - mark
        timings["total"] = self._clock() - start
        self.maybe_free_model_hooks()  # also resets the step context: releases the cross-attention cache
        if not return_dict:
            return frames, timings
        return FreeSwimWanPipelineOutput(frames=frames, timings=timings)

    def _native(
        self, config, prompt_embeds, negative_prompt_embeds, num_frames, *, steps, guidance, generator
    ):
        """The video at the training size, from the stock Wan pipeline: ``[B, F, 3, h, w]`` in ``[0, 1]``."""
        return WanPipeline.__call__(
            self,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=config.train_size[0],
            width=config.train_size[1],
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
        ).frames

    def _noised(self, video, height, width, scheduler, num_inference_steps, strength, generator):
        """``video`` upscaled, encoded and noised to the refinement's first timestep:
        ``-> (latents, the refinement's timesteps)``."""
        device = self._execution_device
        pixels = self._upscale(video, height, width, device)  # [B, 3, F, H, W] in [-1, 1]
        scheduler.set_timesteps(num_inference_steps, device=device)
        run = min(num_inference_steps, max(1, round(num_inference_steps * strength)))
        timesteps = scheduler.timesteps[(num_inference_steps - run) * scheduler.order :]
        self.vae.enable_tiling()
        clean = self._encode(pixels)
        noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=torch.float32)
        t0 = timesteps[:1].repeat(clean.shape[0])
        if hasattr(scheduler, "add_noise"):
            return scheduler.add_noise(clean, noise, t0), timesteps
        return scheduler.scale_noise(clean, t0, noise), timesteps

    def _ensure_freeswim(self) -> FreeSwimConfig:
        if getattr(self, "transformer_2", None) is not None:
            raise ValueError(
                "FreeSwimWanPipeline serves Wan2.1 checkpoints (one transformer); got a transformer_2"
            )
        config = self.freeswim_config
        if config is not None:
            if context_of(self.transformer) is None:  # set on the transformer directly: add the step context
                self.set_attn_processor(self.transformer.attn_processors)
            return config
        if any(isinstance(p, AccelProcessor) for p in self.transformer.attn_processors.values()):
            raise ValueError(
                "FreeSwimWanPipeline needs a FreeSwim method among the installed vidaccel processors, e.g. "
                "pipe.set_attn_processor(vidaccel.AccelProcessor(vidaccel.FreeSwimConfig(), ...))"
            )
        self.set_attn_processor(FreeSwimProcessor())
        return self.freeswim_config

    def _check_call(self, config: FreeSwimConfig, height: int, width: int, strength: float) -> None:
        unit = config.spatial_compression
        for name, value, train in (
            ("height", height, config.train_size[0]),
            ("width", width, config.train_size[1]),
        ):
            if not isinstance(value, int) or value % unit:
                raise ValueError(f"{name} must be an int multiple of {unit}, got {value!r}")
            if value < train:
                raise ValueError(
                    f"{name}={value} is smaller than FreeSwimConfig.train_size ({config.train_size[0]}, "
                    f"{config.train_size[1]}): FreeSwim refines at or above the training size"
                )
        if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
            raise ValueError(f"strength must be a float in (0, 1], got {strength!r}")

    def _refine(
        self, config, scheduler, timesteps, latents, prompt_embeds, negative_prompt_embeds, guidance, do_cfg
    ):
        """The refinement loop -> (latents, number of steps that ran the full branch)."""
        context = context_of(self.transformer)
        context.reset()  # a fresh generation: no cache, steps counted from here
        rows = latents.shape[0]
        dual_embeds = torch.cat([prompt_embeds, prompt_embeds])
        full_steps = 0
        for step, t in enumerate(self.progress_bar(timesteps)):
            x = latents.to(self.transformer.dtype)
            full = step % config.cache_steps == 0
            full_steps += full
            batch = FreeSwimBatch("dual" if full else "cached", rows)
            set_freeswim_batch(context, batch)
            with self.transformer.cache_context("cond"):
                cond = self.transformer(
                    hidden_states=torch.cat([x, x]) if full else x,
                    timestep=t.expand(batch.batch_size),
                    encoder_hidden_states=dual_embeds if full else prompt_embeds,
                    return_dict=False,
                )[0][:rows]  # the window branch; the full branch's prediction is dropped
            noise_pred = cond
            if do_cfg:
                set_freeswim_batch(context, FreeSwimBatch("window", rows))
                with self.transformer.cache_context("uncond"):
                    uncond = self.transformer(
                        hidden_states=x,
                        timestep=t.expand(rows),
                        encoder_hidden_states=negative_prompt_embeds,
                        return_dict=False,
                    )[0]
                noise_pred = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        set_freeswim_batch(context, None)
        return latents, full_steps

    def _upscale(self, video, height: int, width: int, device) -> torch.Tensor:
        """Frames -> ``[B, 3, F, height, width]`` in ``[-1, 1]``, bicubic."""
        if isinstance(video, torch.Tensor):
            frames = video if video.dim() == 5 else video.unsqueeze(0)  # [B, F, 3, h, w] in [0, 1]
            frames = frames.to(device=device, dtype=torch.float32) * 2.0 - 1.0
        else:
            frames = self.video_processor.preprocess_video(video).to(device, torch.float32).transpose(1, 2)
        batch, n_frames = frames.shape[:2]
        resized = F.interpolate(
            frames.flatten(0, 1), size=(height, width), mode="bicubic", align_corners=False
        )
        return resized.clamp(-1.0, 1.0).unflatten(0, (batch, n_frames)).transpose(1, 2).contiguous()

    def _refine_scheduler(self, flow_shift: float | None):
        if flow_shift is None:
            return self.scheduler
        key = "flow_shift" if "flow_shift" in self.scheduler.config else "shift"
        return type(self.scheduler).from_config(self.scheduler.config, **{key: flow_shift})

    def _latent_stats(self, like: torch.Tensor):
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = retrieve_latents(self.vae.encode(pixels.to(self.vae.dtype)), sample_mode="argmax").float()
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype)
        mean, std = self._latent_stats(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0]

    def _clock(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()
