"""``CausalWanPipeline``: autoregressive (chunk-by-chunk) video generation with a per-layer KV cache.

A causal Wan model (Self-Forcing, CausVid and their kin, in diffusers format) generates a video
chunk by chunk: each chunk of ``chunk_frames`` latent frames is denoised in a few steps while its
queries attend to the KV cache of every earlier chunk plus the chunk itself; a "commit" pass on the
finished chunk then writes its clean keys and values into the cache. Any ``WanTransformer3DModel``
runs this way, with any vidaccel processor (``DenseProcessor`` by default; TempCache compresses the
cache)::

    from vidaccel.pipelines import CausalWanPipeline
    pipe = CausalWanPipeline(transformer, scheduler, vae=vae, text_encoder=t5, tokenizer=tokenizer)
    video = pipe("a cat surfing", num_frames=81, generator=torch.Generator().manual_seed(0)).frames
    for chunk in pipe.stream("a cat surfing", num_frames=241):     # decoded chunks as they are made
        show(chunk.frames)
    vidaccel.apply(pipe, vidaccel.TempCacheConfig())               # merged KV cache

**Sampler.** Self-Forcing's few-step sampler: the denoising timesteps (default 1000, 750, 500, 250)
are warped by the flow shift, ``sigma = shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``
(the static shift of diffusers' ``FlowMatchEulerDiscreteScheduler``), and the model is called at
``1000 * sigma``. Each step predicts the clean chunk from the flow velocity, ``x0 = x - sigma * v``,
and re-noises it to the next sigma with fresh noise, ``x = (1 - sigma') x0 + sigma' noise``; the
last step's ``x0`` is the chunk. ``eta`` below 1 mixes the model's own noise estimate into that
noise; ``eta=0`` is the deterministic flow ODE's Euler step (:func:`renoise_noise`), the sampler a
model trained by plain flow matching implies: it keeps the detail that fresh noise averages away, the
model's errors included (on the game world model it brought texture: ``world_model_stability.md``). The
scheduler component is kept for the diffusers format and is not stepped. Every random draw (the
chunk's noise, then one per re-noising) is made chunk by chunk from ``generator``, so for one seed a
longer rollout begins with the shorter one.

**Positions.** Rotary positions continue across chunks: a forward hook on the transformer's
``rope`` module replaces its table with the one for the chunk's absolute frames (Wan's formula, which
is not learned, so rollouts longer than ``rope_max_seq_len`` frames extend it). Cached keys are kept
after rotary embedding, so each keeps the position it was committed at.

**Decoding.** Chunks are decoded one by one with the Wan VAE's causal feature cache carried from
chunk to chunk (:func:`decode_latent_chunk`), which makes the chunked decode equal to decoding the
whole latent at once; ``__call__`` and ``stream`` share that path and agree frame for frame.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel
from diffusers.models.autoencoders import autoencoder_kl_wan
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from vidaccel.cache import DenseKVCache, KVCache, RollingKVCache
from vidaccel.processors import AccelProcessor, DenseProcessor, WanAdapter
from vidaccel.state import StepContext, attach_context

__all__ = [
    "CausalWanPipeline",
    "ChunkConditioning",
    "RolloutState",
    "check_denoising_timesteps",
    "check_eta",
    "decode_latent_chunk",
    "flow_sigmas",
    "rotary_emb_at",
    "rotary_emb_frames",
]

WAN_ROPE_THETA = 10000.0
"""Base of Wan's rotary frequencies (``WanRotaryPosEmbed`` uses its default)."""

_OUTPUT_TYPES = ("np", "pil", "pt", "latent")
_MAX_SEQUENCE_LENGTH = 512  # Wan pads T5 prompts to 512 tokens


@dataclass
class RolloutState:
    """What a :class:`CausalWanPipeline` tells the processors about the rollout, in
    ``context.pipeline_state["rollout"]`` for the length of one generation.

    Attributes:
        chunk_frames: latent frames per chunk.
        num_chunks: chunks of the rollout (the last may be trimmed after generation).
        tokens_per_frame: tokens of one latent frame (``H/p_h * W/p_w``).
        make_cache: makes the KV cache of one self-attention module when no method of the
            processor makes its own (``AccelProcessor.make_kv_cache``): ``DenseKVCache`` sized for the
            rollout, or ``RollingKVCache`` for the rolling-window baseline.
        frame_offset: absolute latent frame of the current chunk's first frame.
        frame_index: long ``[S]`` on the model's device: the absolute latent frame of each token of
            the current chunk (raster order), passed to ``KVCache.commit``.
        steps_per_chunk: denoising steps of every chunk (``context.chunk_step`` runs from 0 to this
            minus 1), or ``None`` where unknown.
        committed_tokens: the most tokens the rollout commits to one layer's cache (every chunk but
            the last), which sizes the dense cache and bounds TempCache's; ``None`` where unknown.
    """

    chunk_frames: int
    num_chunks: int
    tokens_per_frame: int
    make_cache: Callable[[], KVCache]
    frame_offset: int = 0
    frame_index: torch.Tensor | None = field(default=None, repr=False)
    steps_per_chunk: int | None = None
    committed_tokens: int | None = None

    def enter_chunk(self, chunk_index: int, device: torch.device) -> None:
        """Point the state at chunk ``chunk_index``: its frame offset and token frame indices."""
        self.frame_offset = chunk_index * self.chunk_frames
        frames = torch.arange(self.frame_offset, self.frame_offset + self.chunk_frames, device=device)
        self.frame_index = frames.repeat_interleave(self.tokens_per_frame)


class ChunkConditioning:
    """Hooks of one rollout for models conditioned beyond the prompt (e.g. the world model's
    actions): the model input of each chunk and the true frames committed before generation.

    The default changes nothing (the input is the latents, no context). Subclasses override:

    Attributes:
        latent_channels: channels of the latents that are denoised (``None``: the transformer's
            ``in_channels``); the model input may add conditioning channels to them.
        context: clean latents ``[B, C, T0, h, w]`` committed into the KV cache (commit passes,
            phase ``"commit"``, chunk indices ``0 .. T0 / chunk_frames - 1``) before the first
            generated chunk, or ``None``. ``T0`` must be a multiple of ``chunk_frames``.
    """

    latent_channels: int | None = None
    context: torch.Tensor | None = None

    def model_input(self, latents: torch.Tensor, frame_offset: int) -> torch.Tensor:
        """The transformer input of a chunk (denoising and commit passes): ``latents`` ``[B, C, f, h, w]``
        of the frames ``frame_offset .. frame_offset + f - 1`` (absolute, context frames included) →
        ``[B, in_channels, f, h, w]``."""
        return latents

    def chunk_done(self, clean: torch.Tensor, frame_offset: int) -> torch.Tensor:
        """Called with each generated chunk's clean latents before it is committed and output; returns
        the latents to commit and output (unchanged by default)."""
        return clean


class CausalWanPipeline(DiffusionPipeline):
    """Chunk-by-chunk video generation with a KV cache, over any ``WanTransformer3DModel``.

    Args:
        transformer: a ``WanTransformer3DModel`` in diffusers format (e.g. a Self-Forcing checkpoint).
        scheduler: the checkpoint's scheduler (kept for the diffusers format; the few-step sampler
            is described in the module docs).
        vae: an ``AutoencoderKLWan``; ``None`` for a pixel-space model, whose output channels are the
            RGB frames in ``[-1, 1]`` (one latent frame per output frame, no spatial scaling).
        text_encoder, tokenizer: Wan's UMT5 encoder and tokenizer, needed only for ``prompt`` strings.

    The pipeline installs vidaccel's ``DenseProcessor`` and the step context;
    :meth:`set_attn_processor` (or ``vidaccel.apply(pipe, ...)``) swaps the processor, and
    ``vidaccel.remove(pipe)`` returns to ``DenseProcessor``.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None) -> None:
        super().__init__()
        if not isinstance(transformer, WanTransformer3DModel):
            raise ValueError(
                "transformer must be a diffusers WanTransformer3DModel (Wan architecture), got "
                f"{type(transformer).__name__}"
            )
        if transformer.config.patch_size[0] != 1:
            raise ValueError(
                "transformer.config.patch_size[0] (temporal patch) must be 1, as in every Wan model, so that "
                f"chunks and cached frames are whole latent frames; got {transformer.config.patch_size[0]}"
            )
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 1
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 1
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.set_default_attn_processor()

    def set_attn_processor(self, processor) -> None:
        """Install ``processor`` (one, or a dict by module name, as diffusers takes) on the transformer
        together with the step context, so every vidaccel feature works."""
        self.transformer.set_attn_processor(processor)
        self._step_context()

    def set_default_attn_processor(self) -> None:
        """Install vidaccel's ``DenseProcessor`` (exact dense attention); ``vidaccel.remove`` ends here."""
        self.set_attn_processor(DenseProcessor())

    def kv_cache_stats(self) -> dict:
        """Totals over the self-attention KV caches of the generation in progress (read between the
        chunks of :meth:`stream`): ``{"layers", "nbytes", "tokens"}`` plus the first layer's
        ``stats()`` under ``"first_layer"``. Empty outside a generation."""
        context = self._step_context()
        caches = [
            context.module_state(attn).get("kv_cache") for attn in WanAdapter().layers(self.transformer)
        ]
        caches = [cache for cache in caches if cache is not None]
        if not caches:
            return {}
        return {
            "layers": len(caches),
            "nbytes": sum(cache.nbytes for cache in caches),
            "tokens": sum(cache.stats()["tokens"] for cache in caches),
            "first_layer": caches[0].stats(),
        }

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        chunk_frames: int = 3,
        denoising_timesteps: Sequence[float] = (1000, 750, 500, 250),
        shift: float = 5.0,
        eta: float = 1.0,
        context_timestep: float = 0,
        max_cache_frames: int | None = None,
        sink_frames: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> WanPipelineOutput | tuple:
        """Generate a whole video, chunk by chunk.

        Args:
            prompt: text prompt(s) (needs ``text_encoder`` and ``tokenizer``), or ``None`` with
                ``prompt_embeds`` ``[B, L, text_dim]``.
            height, width: output size in pixels (multiples of the VAE's spatial factor times the
                transformer's patch).
            num_frames: output frames, as in diffusers' Wan pipelines (``4k + 1`` with the Wan VAE;
                others are rounded down with a warning). Latent frames: ``(num_frames - 1) // 4 + 1``.
            chunk_frames: latent frames per chunk; a last partial chunk is generated at full size and
                trimmed, so it changes nothing before it.
            denoising_timesteps: decreasing timesteps in ``(0, 1000]`` before the shift.
            shift: flow shift of the sigmas (> 0).
            eta: the share of fresh noise when a step re-noises its clean estimate, in ``[0, 1]``:
                ``1`` (Self-Forcing's sampler) re-noises with fresh noise; ``0`` re-noises with the
                model's own noise estimate, which makes each step the Euler step of the flow ODE (as
                diffusers' ``FlowMatchEulerDiscreteScheduler`` steps); between, the noise is
                ``eta * fresh + sqrt(1 - eta**2) * estimate``.
            context_timestep: timestep in ``[0, 1000]`` of the commit pass that writes a finished
                chunk into the KV cache (``0``: the clean chunk; above, re-noised to that sigma).
            max_cache_frames, sink_frames: Self-Forcing's rolling-window baseline: the KV cache holds
                at most ``max_cache_frames`` earlier latent frames, the first ``sink_frames`` of them
                kept for the whole rollout. ``None``: the whole past. Not combinable with TempCache,
                which has its own sinks and budget.
            generator: seeds the noise (drawn chunk by chunk).
            output_type: ``"np"`` (``[B, F, H, W, 3]`` floats in ``[0, 1]``), ``"pil"``, ``"pt"``
                (``[B, F, 3, H, W]``) or ``"latent"`` (``[B, C, F_latent, h, w]``).
            return_dict: return a ``WanPipelineOutput`` rather than a tuple.

        Returns ``WanPipelineOutput(frames=video)`` or ``(video,)``. Raises ``ValueError`` for a bad
        argument.
        """
        chunks = self._rollout(
            prompt, prompt_embeds, height, width, num_frames, chunk_frames, denoising_timesteps,
            shift, eta, context_timestep, max_cache_frames, sink_frames, generator, output_type,
        )  # fmt: skip
        return self._collected(chunks, output_type, return_dict)

    def stream(
        self,
        prompt: str | list[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        chunk_frames: int = 3,
        denoising_timesteps: Sequence[float] = (1000, 750, 500, 250),
        shift: float = 5.0,
        eta: float = 1.0,
        context_timestep: float = 0,
        max_cache_frames: int | None = None,
        sink_frames: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> Iterator[WanPipelineOutput | tuple]:
        """Generate like :meth:`__call__` (same arguments) and yield each chunk as soon as it is
        decoded: ``WanPipelineOutput(frames=chunk)`` (or ``(chunk,)``), the chunk's frames in the
        layout of ``output_type``. Concatenated along frames they equal ``__call__``'s video. The
        arguments are checked at this call; stopping early (``close()``, ``break``) releases the KV
        caches like a finished generation."""
        chunks = self._rollout(
            prompt, prompt_embeds, height, width, num_frames, chunk_frames, denoising_timesteps,
            shift, eta, context_timestep, max_cache_frames, sink_frames, generator, output_type,
        )  # fmt: skip
        return self._postprocessed(chunks, output_type, return_dict)

    @torch.no_grad()
    def _collected(self, chunks: Iterator[torch.Tensor], output_type: str, return_dict: bool):
        """The whole video of a rollout's chunks, in the layout of ``output_type``."""
        video = torch.cat(list(chunks), dim=2)
        if output_type != "latent":
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        return WanPipelineOutput(frames=video) if return_dict else (video,)

    @torch.no_grad()
    def _postprocessed(self, chunks: Iterator[torch.Tensor], output_type: str, return_dict: bool):
        try:
            for chunk in chunks:
                if output_type != "latent":
                    chunk = self.video_processor.postprocess_video(chunk, output_type=output_type)
                yield WanPipelineOutput(frames=chunk) if return_dict else (chunk,)
        finally:
            chunks.close()

    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None) -> torch.Tensor:
        """UMT5 embeddings ``[B, 512, text_dim]`` of ``prompt`` as diffusers' Wan pipelines make them:
        the encoder's output for the prompt's tokens, zeros after them."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "prompt needs the pipeline's text_encoder and tokenizer; pass prompt_embeds instead"
            )
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=_MAX_SEQUENCE_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return embeds * mask[..., None].to(embeds.dtype)

    def _rollout(
        self,
        prompt,
        prompt_embeds,
        height,
        width,
        num_frames,
        chunk_frames,
        denoising_timesteps,
        shift,
        eta,
        context_timestep,
        max_cache_frames,
        sink_frames,
        generator,
        output_type,
        conditioning: ChunkConditioning | None = None,
    ) -> Iterator[torch.Tensor]:
        """Check the arguments now, and return the generator of the chunks: latents ``[B, C, f, h, w]``
        for ``output_type="latent"``, else decoded frames ``[B, 3, f, H, W]`` in ``[-1, 1]``.
        ``conditioning`` (subclasses' hook) sets the model input and the context frames."""
        context = self._step_context()
        geometry = self._check_inputs(
            prompt, prompt_embeds, height, width, num_frames, chunk_frames, denoising_timesteps,
            shift, eta, context_timestep, max_cache_frames, sink_frames, output_type,
        )  # fmt: skip
        conditioning = conditioning or ChunkConditioning()
        latent_frames, (channels, *chunk_shape), tokens_per_frame = geometry
        if conditioning.latent_channels is not None:
            channels = conditioning.latent_channels
        if conditioning.context is not None and conditioning.context.shape[2] % chunk_frames:
            raise ValueError(
                f"the context frames must be a multiple of chunk_frames = {chunk_frames}, got {conditioning.context.shape[2]}"
            )
        geometry = (latent_frames, (channels, *chunk_shape), tokens_per_frame)
        return self._generate(
            context, geometry, prompt, prompt_embeds, chunk_frames, flow_sigmas(denoising_timesteps, shift),
            float(eta), context_timestep, max_cache_frames, sink_frames, generator, output_type, conditioning,
        )  # fmt: skip

    @torch.no_grad()
    def _generate(
        self,
        context: StepContext,
        geometry: tuple[int, tuple[int, int, int, int], int],
        prompt,
        prompt_embeds,
        chunk_frames: int,
        sigmas: list[float],
        eta: float,
        context_timestep: float,
        max_cache_frames: int | None,
        sink_frames: int,
        generator,
        output_type: str,
        conditioning: ChunkConditioning,
    ) -> Iterator[torch.Tensor]:
        """The rollout; releases every cache when it ends or is closed."""
        device = self._execution_device
        transformer_dtype = self.transformer.dtype
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=transformer_dtype)
        batch = prompt_embeds.shape[0]

        latent_frames, chunk_shape, tokens_per_frame = geometry
        prefill = conditioning.context
        context_chunks = 0 if prefill is None else prefill.shape[2] // chunk_frames
        num_chunks = context_chunks + math.ceil(latent_frames / chunk_frames)
        chunk_shape = (batch, *chunk_shape)
        context.reset()
        # every chunk but the last is committed to each layer's cache
        committed_tokens = (num_chunks - 1) * chunk_frames * tokens_per_frame
        rollout = RolloutState(
            chunk_frames,
            num_chunks,
            tokens_per_frame,
            _default_cache_factory(max_cache_frames, sink_frames, committed_tokens),
            steps_per_chunk=len(sigmas),
            committed_tokens=committed_tokens,
        )
        context.pipeline_state["rollout"] = rollout
        context.reset_on_timestep_jump = False
        rope = self.transformer.rope
        rope_hook = rope.register_forward_hook(
            lambda module, args, output: rotary_emb_at(module, args[0].shape[2:], rollout.frame_offset)
        )
        vae_cache: list | None = None

        def forward(latents: torch.Tensor, sigma: float) -> torch.Tensor:
            timestep = torch.full((batch,), 1000.0 * sigma, device=device)
            inputs = conditioning.model_input(latents, rollout.frame_offset)
            return self.transformer(inputs.to(transformer_dtype), timestep, prompt_embeds, return_dict=False)[
                0
            ]

        try:
            for chunk in range(context_chunks):
                rollout.enter_chunk(chunk, device)
                context.chunk_index, context.phase, context.chunk_step = chunk, "commit", None
                frames = prefill[:, :, chunk * chunk_frames : (chunk + 1) * chunk_frames].to(
                    device, torch.float32
                )
                forward(self._context_latents(frames, context_timestep, generator), context_timestep / 1000)
            with self.progress_bar(total=num_chunks - context_chunks) as progress_bar:
                for chunk in range(context_chunks, num_chunks):
                    rollout.enter_chunk(chunk, device)
                    context.chunk_index, context.phase = chunk, "denoise"
                    latents = randn_tensor(
                        chunk_shape, generator=generator, device=device, dtype=torch.float32
                    )
                    for step, sigma in enumerate(sigmas):
                        context.chunk_step = step
                        flow = forward(latents, sigma).float()
                        clean = latents - sigma * flow
                        if step + 1 < len(sigmas):
                            noise = renoise_noise(latents, flow, sigma, eta, generator)
                            latents = (1 - sigmas[step + 1]) * clean + sigmas[step + 1] * noise
                    clean = conditioning.chunk_done(clean, rollout.frame_offset)
                    if chunk + 1 < num_chunks:
                        context.phase, context.chunk_step = "commit", None
                        forward(
                            self._context_latents(clean, context_timestep, generator), context_timestep / 1000
                        )
                    kept = clean[:, :, : latent_frames - (chunk - context_chunks) * chunk_frames]
                    if output_type == "latent":
                        yield kept
                    else:
                        frames, vae_cache = self._decode_chunk(kept, vae_cache)
                        yield frames
                    progress_bar.update()
        finally:
            rope_hook.remove()
            context.reset()
            self.maybe_free_model_hooks()

    def _context_latents(self, clean: torch.Tensor, context_timestep: float, generator) -> torch.Tensor:
        if context_timestep == 0:
            return clean
        sigma = context_timestep / 1000
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return (1 - sigma) * clean + sigma * noise

    def _decode_chunk(
        self, latents: torch.Tensor, vae_cache: list | None
    ) -> tuple[torch.Tensor, list | None]:
        """``[B, C, f, h, w]`` latents → ``([B, 3, f', H, W]`` frames in ``[-1, 1]``, the VAE's cache)."""
        if self.vae is None:
            return latents.clamp(-1.0, 1.0), None
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        latents = latents * std.to(latents) + mean.to(latents)
        return decode_latent_chunk(self.vae, latents.to(self.vae.dtype), vae_cache)

    def _step_context(self) -> StepContext:
        """The transformer's step context, installed (or reused) with the processors' layers."""
        adapter = WanAdapter()
        return attach_context(self.transformer, adapter.layers(self.transformer), adapter.read_inputs)

    def _check_inputs(
        self,
        prompt,
        prompt_embeds,
        height,
        width,
        num_frames,
        chunk_frames,
        denoising_timesteps,
        shift,
        eta,
        context_timestep,
        max_cache_frames,
        sink_frames,
        output_type,
    ) -> tuple[int, tuple[int, int, int, int], int]:
        """Validate the arguments; ``-> (latent frames, chunk latent shape (C, f, h, w), tokens per frame)``."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt_embeds is not None and prompt_embeds.dim() != 3:
            raise ValueError(
                f"prompt_embeds must be [B, L, text_dim], got shape {tuple(prompt_embeds.shape)}"
            )
        _check_int("chunk_frames", chunk_frames, 1)
        _check_int("num_frames", num_frames, 1)
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        config = self.transformer.config
        _, p_h, p_w = config.patch_size
        for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
            multiple = self.vae_scale_factor_spatial * patch
            _check_int(name, size, multiple)
            if size % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {size}")
        if self.vae is None and output_type != "latent" and config.out_channels != 3:
            raise ValueError(
                f"a pipeline without a VAE returns the transformer's output as frames, which needs 3 output channels "
                f"(this transformer has {config.out_channels}); use output_type='latent'"
            )
        check_denoising_timesteps(denoising_timesteps)
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift < math.inf:
            raise ValueError(f"shift must be a float in (0, inf), got {shift!r}")
        check_eta(eta)
        if (
            not isinstance(context_timestep, (int, float))
            or isinstance(context_timestep, bool)
            or not 0 <= context_timestep <= 1000
        ):
            raise ValueError(f"context_timestep must be a float in [0, 1000], got {context_timestep!r}")
        self._check_cache_options(max_cache_frames, sink_frames)

        temporal = self.vae_scale_factor_temporal
        if (num_frames - 1) % temporal:
            rounded = (num_frames - 1) // temporal * temporal + 1
            warnings.warn(
                f"num_frames - 1 must be divisible by {temporal}; rounding {num_frames} down to {rounded}",
                stacklevel=4,
            )
        latent_frames = (num_frames - 1) // temporal + 1
        h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        return latent_frames, (config.in_channels, chunk_frames, h, w), (h // p_h) * (w // p_w)

    def _check_cache_options(self, max_cache_frames, sink_frames) -> None:
        _check_int("sink_frames", sink_frames, 0)
        if max_cache_frames is None:
            if sink_frames:
                raise ValueError("sink_frames needs max_cache_frames (the sinks of the rolling-window cache)")
        else:
            _check_int("max_cache_frames", max_cache_frames, 1)
            if sink_frames >= max_cache_frames:
                raise ValueError(
                    f"sink_frames must be an int in [0, max_cache_frames - 1 = {max_cache_frames - 1}], got {sink_frames}"
                )
        processors = set(self.transformer.attn_processors.values())
        if not all(isinstance(processor, AccelProcessor) for processor in processors):
            foreign = sorted({type(p).__name__ for p in processors if not isinstance(p, AccelProcessor)})
            raise ValueError(
                f"CausalWanPipeline keeps its KV cache in vidaccel processors; the transformer has {', '.join(foreign)}. "
                "Install one with pipe.set_attn_processor(vidaccel.DenseProcessor()) or vidaccel.apply(pipe, ...)"
            )
        if (max_cache_frames is not None or sink_frames) and any(p.makes_kv_cache for p in processors):
            raise ValueError(
                "max_cache_frames/sink_frames (the rolling-window baseline) cannot be combined with a processor that "
                "makes its own KV cache (TempCache has its own sinks and budget); leave them unset"
            )


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


def _default_cache_factory(
    max_cache_frames: int | None, sink_frames: int, capacity_tokens: int
) -> Callable[[], KVCache]:
    if max_cache_frames is not None:
        return lambda: RollingKVCache(max_cache_frames, sink_frames)
    return lambda: DenseKVCache(max(capacity_tokens, 1))


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int in [{low}, inf), got {value!r}")
