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
chunk to chunk (:func:`~vidaccel.pipelines.sampling.decode_latent_chunk`), which makes the chunked decode equal to decoding the
whole latent at once; ``__call__`` and ``stream`` share that path and agree frame for frame.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from vidaccel.processors import AccelProcessor, DenseProcessor, WanAdapter
from vidaccel.rollout import RolloutState, kv_cache_of, set_rollout
from vidaccel.state import StepContext, attach_context

from .rollout_options import RolloutOptions
from .sampling import (
    check_denoising_timesteps,
    check_eta,
    decode_latent_chunk,
    flow_sigmas,
    renoise_noise,
    rotary_emb_at,
    rotary_emb_frames,
)

__all__ = [
    "CausalWanPipeline",
    "ChunkConditioning",
    "RolloutOptions",
    "RolloutState",
    "check_denoising_timesteps",
    "check_eta",
    "decode_latent_chunk",
    "flow_sigmas",
    "rotary_emb_at",
    "rotary_emb_frames",
]

_MAX_SEQUENCE_LENGTH = 512  # Wan pads T5 prompts to 512 tokens


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
    runs_rollouts = True  # vidaccel.apply accepts rollout-only methods (TempCache, FlashBlock) here
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
        caches = [kv_cache_of(context, attn) for attn in WanAdapter().layers(self.transformer)]
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
        self, prompt: str | list[str] | None = None, *, return_dict: bool = True, **options
    ) -> WanPipelineOutput | tuple:
        """Generate a whole video, chunk by chunk.

        Args:
            prompt, **options: the rollout's :class:`RolloutOptions` (``prompt_embeds``, ``height``,
                ``width``, ``num_frames``, ``chunk_frames``, ``denoising_timesteps``, ``shift``,
                ``eta``, ``context_timestep``, ``max_cache_frames``, ``sink_frames``, ``generator``,
                ``output_type``), or ``options=`` one ``RolloutOptions``.
            return_dict: return a ``WanPipelineOutput`` rather than a tuple.

        Returns ``WanPipelineOutput(frames=video)`` or ``(video,)``. Raises ``ValueError`` for a bad
        argument.
        """
        rollout = self.rollout_options(prompt, **options)
        return self._collected(self._rollout(rollout), rollout.output_type, return_dict)

    def stream(
        self, prompt: str | list[str] | None = None, *, return_dict: bool = True, **options
    ) -> Iterator[WanPipelineOutput | tuple]:
        """Generate like :meth:`__call__` (same arguments) and yield each chunk as soon as it is
        decoded: ``WanPipelineOutput(frames=chunk)`` (or ``(chunk,)``), the chunk's frames in the
        layout of ``output_type``. Concatenated along frames they equal ``__call__``'s video. The
        arguments are checked at this call; stopping early (``close()``, ``break``) releases the KV
        caches like a finished generation."""
        rollout = self.rollout_options(prompt, **options)
        return self._postprocessed(self._rollout(rollout), rollout.output_type, return_dict)

    @staticmethod
    def rollout_options(prompt=None, *, options: RolloutOptions | None = None, **fields) -> RolloutOptions:
        """The :class:`RolloutOptions` of a call: ``options`` as given, or made from ``prompt`` and
        ``fields`` (an unknown name raises ``ValueError`` listing the allowed ones)."""
        if options is not None:
            if prompt is not None or fields:
                raise ValueError("pass either options=RolloutOptions(...) or its fields, not both")
            return options
        unknown = sorted(set(fields) - set(RolloutOptions.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown rollout argument(s) {unknown}; allowed: {', '.join(RolloutOptions.__dataclass_fields__)}"
            )
        return RolloutOptions(prompt=prompt, **fields)

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
        self, options: RolloutOptions, conditioning: ChunkConditioning | None = None
    ) -> Iterator[torch.Tensor]:
        """Check ``options`` against this pipeline now, and return the generator of the chunks: latents
        ``[B, C, f, h, w]`` for ``output_type="latent"``, else decoded frames ``[B, 3, f, H, W]`` in
        ``[-1, 1]``. ``conditioning`` (subclasses' hook) sets the model input and the context frames."""
        context = self._step_context()
        conditioning = conditioning or ChunkConditioning()
        latent_frames, (channels, *chunk_shape), tokens_per_frame = self._geometry(options)
        if conditioning.latent_channels is not None:
            channels = conditioning.latent_channels
        chunk_frames = options.chunk_frames
        if conditioning.context is not None and conditioning.context.shape[2] % chunk_frames:
            raise ValueError(
                f"the context frames must be a multiple of chunk_frames = {chunk_frames}, got {conditioning.context.shape[2]}"
            )
        geometry = (latent_frames, (channels, *chunk_shape), tokens_per_frame)
        return self._generate(context, geometry, options, conditioning)

    @torch.no_grad()
    def _generate(
        self,
        context: StepContext,
        geometry: tuple[int, tuple[int, int, int, int], int],
        options: RolloutOptions,
        conditioning: ChunkConditioning,
    ) -> Iterator[torch.Tensor]:
        """The rollout; releases every cache when it ends or is closed."""
        run = _Rollout(self, context, geometry, options, conditioning)
        vae_cache: list | None = None
        try:
            run.prefill()
            with self.progress_bar(total=run.num_chunks - run.context_chunks) as progress_bar:
                for chunk in range(run.context_chunks, run.num_chunks):
                    kept = run.generate_chunk(chunk)
                    if options.output_type == "latent":
                        yield kept
                    else:
                        frames, vae_cache = self._decode_chunk(kept, vae_cache)
                        yield frames
                    progress_bar.update()
        finally:
            run.close()
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

    def _geometry(self, options: RolloutOptions) -> tuple[int, tuple[int, int, int, int], int]:
        """Check ``options`` against this pipeline; ``-> (latent frames, chunk latent shape (C, f, h, w),
        tokens per frame)``."""
        config = self.transformer.config
        _, p_h, p_w = config.patch_size
        for name, patch in (("height", p_h), ("width", p_w)):
            multiple = self.vae_scale_factor_spatial * patch
            size = getattr(options, name)
            if size % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {size}")
        if self.vae is None and options.output_type != "latent" and config.out_channels != 3:
            raise ValueError(
                f"a pipeline without a VAE returns the transformer's output as frames, which needs 3 output channels "
                f"(this transformer has {config.out_channels}); use output_type='latent'"
            )
        self._check_processors(options)
        temporal, num_frames = self.vae_scale_factor_temporal, options.num_frames
        if (num_frames - 1) % temporal:
            rounded = (num_frames - 1) // temporal * temporal + 1
            warnings.warn(
                f"num_frames - 1 must be divisible by {temporal}; rounding {num_frames} down to {rounded}",
                stacklevel=4,
            )
        latent_frames = (num_frames - 1) // temporal + 1
        h, w = options.height // self.vae_scale_factor_spatial, options.width // self.vae_scale_factor_spatial
        return latent_frames, (config.in_channels, options.chunk_frames, h, w), (h // p_h) * (w // p_w)

    def _check_processors(self, options: RolloutOptions) -> None:
        processors = set(self.transformer.attn_processors.values())
        if not all(isinstance(processor, AccelProcessor) for processor in processors):
            foreign = sorted({type(p).__name__ for p in processors if not isinstance(p, AccelProcessor)})
            raise ValueError(
                f"CausalWanPipeline keeps its KV cache in vidaccel processors; the transformer has {', '.join(foreign)}. "
                "Install one with pipe.set_attn_processor(vidaccel.DenseProcessor()) or vidaccel.apply(pipe, ...)"
            )
        if (options.max_cache_frames is not None or options.sink_frames) and any(
            p.makes_kv_cache for p in processors
        ):
            raise ValueError(
                "max_cache_frames/sink_frames (the rolling-window baseline) cannot be combined with a processor that "
                "makes its own KV cache (TempCache has its own sinks and budget); leave them unset"
            )


class _Rollout:
    """One generation of a :class:`CausalWanPipeline`: the prompt on the device, the rollout state open
    on the step context, the rotary hook, and the passes of each chunk (denoise steps, commit)."""

    def __init__(self, pipe, context, geometry, options: RolloutOptions, conditioning: ChunkConditioning):
        self.pipe, self.context, self.options, self.conditioning = pipe, context, options, conditioning
        self.device, self.dtype = pipe._execution_device, pipe.transformer.dtype
        prompt_embeds = options.prompt_embeds
        if prompt_embeds is None:
            prompt_embeds = pipe.encode_prompt(options.prompt, self.device)
        self.prompt_embeds = prompt_embeds.to(device=self.device, dtype=self.dtype)
        self.latent_frames, chunk_shape, tokens_per_frame = geometry
        chunk_frames = options.chunk_frames
        self.chunk_shape = (self.prompt_embeds.shape[0], *chunk_shape)
        self.context_chunks = (
            0 if conditioning.context is None else conditioning.context.shape[2] // chunk_frames
        )
        self.num_chunks = self.context_chunks + math.ceil(self.latent_frames / chunk_frames)
        self.sigmas = options.sigmas
        context.reset()
        self.state = RolloutState(
            chunk_frames,
            self.num_chunks,
            tokens_per_frame,
            max_cache_frames=options.max_cache_frames,
            sink_frames=options.sink_frames,
            steps_per_chunk=len(self.sigmas),
            # every chunk but the last is committed to each layer's cache
            committed_tokens=(self.num_chunks - 1) * chunk_frames * tokens_per_frame,
        )
        set_rollout(context, self.state)
        context.reset_on_timestep_jump = False
        self.rope_hook = pipe.transformer.rope.register_forward_hook(
            lambda module, args, output: rotary_emb_at(module, args[0].shape[2:], self.state.frame_offset)
        )

    def forward(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        timestep = torch.full((self.chunk_shape[0],), 1000.0 * sigma, device=self.device)
        inputs = self.conditioning.model_input(latents, self.state.frame_offset).to(self.dtype)
        return self.pipe.transformer(inputs, timestep, self.prompt_embeds, return_dict=False)[0]

    def commit(self, chunk: int, clean: torch.Tensor) -> None:
        """The commit pass of ``chunk``: its clean (or re-noised) latents written into the caches."""
        timestep = self.options.context_timestep
        self.context.enter_chunk(chunk, "commit")
        self.forward(self.pipe._context_latents(clean, timestep, self.options.generator), timestep / 1000)

    def prefill(self) -> None:
        """Commit the conditioning's context frames, chunk by chunk."""
        frames_per_chunk = self.options.chunk_frames
        for chunk in range(self.context_chunks):
            self.state.enter_chunk(chunk, self.device)
            frames = self.conditioning.context[
                :, :, chunk * frames_per_chunk : (chunk + 1) * frames_per_chunk
            ]
            self.commit(chunk, frames.to(self.device, torch.float32))

    def generate_chunk(self, chunk: int) -> torch.Tensor:
        """Denoise ``chunk`` from fresh noise, commit it unless it is the last: its kept latents."""
        options, sigmas = self.options, self.sigmas
        self.state.enter_chunk(chunk, self.device)
        latents = randn_tensor(
            self.chunk_shape, generator=options.generator, device=self.device, dtype=torch.float32
        )
        for step, sigma in enumerate(sigmas):
            self.context.enter_chunk(chunk, "denoise", step)
            flow = self.forward(latents, sigma).float()
            clean = latents - sigma * flow
            if step + 1 < len(sigmas):
                noise = renoise_noise(latents, flow, sigma, float(options.eta), options.generator)
                latents = (1 - sigmas[step + 1]) * clean + sigmas[step + 1] * noise
        clean = self.conditioning.chunk_done(clean, self.state.frame_offset)
        if chunk + 1 < self.num_chunks:
            self.commit(chunk, clean)
        return clean[:, :, : self.latent_frames - (chunk - self.context_chunks) * options.chunk_frames]

    def close(self) -> None:
        self.rope_hook.remove()
