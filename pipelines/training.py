"""Training the world model: diffusion forcing with block-causal attention, the options against
exposure bias (the model's own context, rollout buffers, DMD, the contrast-and-detail loss) and the
held-out evaluation. :func:`vidaccel.pipelines.training_run.train` runs the recipe that
``demos/train_world_model.py`` describes; the data and the model come from
:mod:`vidaccel.pipelines.training_data` (re-exported here)."""

from __future__ import annotations

import contextlib
import functools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from vidaccel.metrics import frame_statistics, psnr
from vidaccel.pipelines.causal_wan import flow_sigmas, rotary_emb_frames
from vidaccel.pipelines.game import ACTIONS
from vidaccel.pipelines.training_data import (
    CHUNK_FRAMES,
    CONTEXT_FRAMES,
    MAX_WEIGHT_BYTES,
    SAMPLERS,
    TOY_CONFIG,
    Data,
    build_model,
    init_metadata,
    make_episodes,
)
from vidaccel.pipelines.world_model import LEVEL_TOKENS, level_embeddings
from vidaccel.processors import WanAdapter

__all__ = [
    "CHUNK_FRAMES",
    "CONTEXT_FRAMES",
    "MAX_WEIGHT_BYTES",
    "SAMPLERS",
    "TOY_CONFIG",
    "BlockCausalTrainingProcessor",
    "Data",
    "Trainer",
    "build_model",
    "eval_mode",
    "evaluate",
    "frame_stats_loss",
    "init_metadata",
    "make_episodes",
    "shifted_sigmas",
]


class BlockCausalTrainingProcessor:
    """Training-only attention: the stock Wan q/k/v (vidaccel's adapter) and differentiable torch
    SDPA, self-attention masked block-causally (``mask`` ``[S, S]`` bool, set per clip length)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return WanAdapter().forward(
            attn, hidden_states, encoder_hidden_states, None, rotary_emb, self._attend
        )

    def _attend(self, kind, q, k, v, attention_mask=None, k_pre=None):
        mask = self.mask if kind == "self" else None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)


class Trainer:
    """The model's input (frames + action planes), per-token timesteps, rotary positions and mask,
    the diffusion-forcing loss and the dense evaluation rollout."""

    def __init__(
        self,
        device: torch.device,
        self_context: float = 0.0,
        context_noise: float = 0.0,
        rollout_context: float = 0.0,
        rollout_sampler=SAMPLERS[0],
        stats_weight: float = 0.0,
        stats_sigma_max: float = 0.3,
    ) -> None:
        self.device = device
        self.stats_weight = stats_weight
        self.stats_sigma_max = stats_sigma_max
        self.self_context = self_context
        self.context_noise = context_noise
        self.rollout_context = rollout_context
        self.rollout_sampler = rollout_sampler
        self.buffer: dict | None = None  # the model's own rollouts (``refresh_rollouts``)
        self.refreshes = 0
        self.processor = BlockCausalTrainingProcessor()
        self.rotary = None
        self.level_tokens = level_embeddings(**LEVEL_TOKENS).to(device)
        sigmas = sorted({s for timesteps, shift in SAMPLERS for s in flow_sigmas(timesteps, shift)})
        self.sampler_sigmas = torch.tensor(sigmas, device=device)

    def install(self, model: WanTransformer3DModel) -> None:
        """Route ``model``'s attention and rotary positions through this trainer."""
        model.set_attn_processor(self.processor)
        model.rope.register_forward_hook(lambda module, args, output: self.rotary)

    def forward(self, model, noisy, actions, sigma, positions, levels) -> torch.Tensor:
        """``noisy`` ``[B, 3, F, 64, 64]``, ``actions``/``sigma``/``positions`` ``[B, F]`` → the flow
        prediction ``[B, 3, F, 64, 64]`` (fp32)."""
        batch, _, frames, height, width = noisy.shape
        _, p_h, p_w = model.config.patch_size
        tokens = (height // p_h) * (width // p_w)
        planes = F.one_hot(actions, len(ACTIONS)).to(noisy.dtype).permute(0, 2, 1)[..., None, None]
        inputs = torch.cat([noisy, planes.expand(-1, -1, -1, height, width)], dim=1)
        timestep = (1000 * sigma).repeat_interleave(tokens, dim=1)
        chunk = torch.arange(frames * tokens, device=self.device) // (tokens * CHUNK_FRAMES)
        self.processor.mask = chunk[None, :] <= chunk[:, None]
        self.rotary = rotary_emb_frames(model.rope, positions, height // p_h, width // p_w)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = model(inputs, timestep, self.level_tokens[levels], return_dict=False)[0]
        return out.float()

    def sigmas(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Per-frame sigma ``[B, F]`` (one per chunk of ``CHUNK_FRAMES``): 0 on the clean prefix and on a
        fifth of the later chunks, else half from the samplers' sigmas, half shifted-uniform."""
        batch_size, frames = batch["actions"].shape
        chunks = math.ceil(frames / CHUNK_FRAMES)

        def rand():
            return torch.rand(batch_size, chunks, generator=generator, device=self.device)

        shifted = shifted_sigmas(rand())
        picked = self.sampler_sigmas[(rand() * len(self.sampler_sigmas)).long()]
        sigma = torch.where(rand() < 0.5, picked, shifted).clamp(min=0.02)
        sigma = torch.where(rand() < 0.2, 0.0, sigma)
        sigma = sigma.repeat_interleave(CHUNK_FRAMES, dim=1)[:, :frames]
        return torch.where(batch["clean"], 0.0, sigma)

    def loss(self, model, batch: dict, generator: torch.Generator, sigma: torch.Tensor | None = None):
        """Mean squared error of the flow prediction ``eps - x0`` over the noisy chunks."""
        x0 = batch["x0"]
        if sigma is None:
            sigma = self.sigmas(batch, generator)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        target = sigma > 0  # the frames with a loss; the others are context
        # context frames: the clip's (true, or the model's own rollout on ``mix_rollouts``' clips)
        context = batch.get("context")
        x_in = x0 if context is None else torch.where(target[:, None, :, None, None], x0, context)
        sigma_in = sigma
        if self.self_context > 0:
            x_in = self._own_context(model, batch, target, generator, x_in)
        if self.context_noise > 0:
            # Noise augmentation of the context (GameNGen): most context frames are seen slightly noisy,
            # at their own timestep, so a rollout can commit its frames re-noised (``context_timestep``)
            # and the model learns not to copy the fine detail of its past, where its errors live.
            level = torch.rand(sigma.shape, generator=generator, device=self.device) * self.context_noise
            keep_clean = torch.rand(sigma.shape, generator=generator, device=self.device) < 0.1
            sigma_in = torch.where(target, sigma, torch.where(keep_clean, 0.0, level))
        s = sigma_in[:, None, :, None, None]
        prediction = self.forward(
            model, (1 - s) * x_in + s * noise, batch["actions"], sigma_in, batch["positions"], batch["levels"]
        )
        per_frame = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 3, 4))
        weight = target.float()
        loss = (per_frame * weight).sum() / weight.sum().clamp(min=1)
        if self.stats_weight > 0:
            estimate = (1 - s) * x_in + s * noise - s * prediction  # x0_hat = x_s - s (eps - x0)_hat
            low = target & (sigma_in <= self.stats_sigma_max)
            loss = loss + self.stats_weight * frame_stats_loss(estimate, x0, low)
        return loss

    @torch.no_grad()
    def _own_context(self, model, batch: dict, target: torch.Tensor, generator, base=None) -> torch.Tensor:
        """Exposure to the model's own errors: the clips' frames ``x0`` with, in a ``self_context``
        fraction of the clips, every context frame (no loss) but the first replaced by the model's own
        estimate of it: ``x0_hat`` from one denoising step at a sampler sigma, the whole clip noised
        that way (block-causal: an estimate sees only the noisy inputs before it). The targets stay the
        true frames, so the model learns to pull a degraded past (blurred, colour-shifted, as its
        rollouts drift) back toward true frames instead of copying its errors."""
        x0 = batch["x0"]
        batch_size, frames = target.shape
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        pick = torch.rand(batch_size, frames, generator=generator, device=self.device) * len(
            self.sampler_sigmas
        )
        sigma_hat = self.sampler_sigmas[pick.long()].clamp(min=0.02)
        s_hat = sigma_hat[:, None, :, None, None]
        noisy = (1 - s_hat) * x0 + s_hat * noise
        with eval_mode(model):
            flow = self.forward(
                model, noisy, batch["actions"], sigma_hat, batch["positions"], batch["levels"]
            )
        estimate = (noisy - s_hat * flow).clamp(-1, 1)
        clips = torch.rand(batch_size, generator=generator, device=self.device) < self.self_context
        if "rolled" in batch:
            clips &= ~batch["rolled"]  # their context is already the model's own rollout
        replace = clips[:, None] & ~target
        replace[:, 0] = False
        return torch.where(replace[:, None, :, None, None], estimate, x0 if base is None else base)

    @torch.no_grad()
    def validation_loss(self, model, batch: dict) -> float:
        generator = torch.Generator(self.device).manual_seed(2)
        sigma = self.sigmas(batch, generator)
        options = self.self_context, self.context_noise, self.stats_weight
        # the plain objective, comparable across runs
        self.self_context = self.context_noise = self.stats_weight = 0.0
        try:
            return float(self.loss(model, batch, generator, sigma))
        finally:
            self.self_context, self.context_noise, self.stats_weight = options

    @torch.no_grad()
    def rollout(self, model, data: Data, context: int, frames: int, timesteps, shift: float, seed: int = 0):
        """Dense rollout of every held-out episode from its first ``context`` true frames with the true
        actions: uint8 ``[E, frames, 64, 64, 3]``."""
        generator = torch.Generator(self.device).manual_seed(seed)
        video = data.frames[:, :context].permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        positions = torch.arange(context + frames, device=self.device).expand(video.shape[0], -1)
        video = self.generate(
            model,
            video,
            data.actions[:, : context + frames],
            positions,
            data.levels,
            timesteps,
            shift,
            generator,
        )
        predicted = video[:, :, context : context + frames].permute(0, 2, 3, 4, 1)
        return ((predicted + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    @torch.no_grad()
    def generate(
        self, model, video, actions, positions, levels, timesteps, shift: float, generator, window=None
    ):
        """Continue the clean frames ``video`` ``[B, 3, T, H, W]`` autoregressively to the length of
        ``actions``/``positions`` ``[B, L]`` with the sampler ``(timesteps, shift)``. Each step re-runs
        the past (clean at timestep 0) with the new chunk (noisy), which equals the KV-cached rollout.
        ``window``: ``None``, the whole past; else the past is the ``T`` given frames (the sinks) and
        the ``window - T`` frames before the chunk, as the pipeline's rolling cache with
        ``max_cache_frames=window, sink_frames=T`` (positions stay absolute). Returns
        ``[B, 3, L, H, W]`` with the first ``T`` frames ``video``'s."""
        sigmas = flow_sigmas(timesteps, shift)
        batch, total = actions.shape
        sinks = video.shape[2]
        if window is not None and window <= sinks:
            raise ValueError(f"window must exceed the {sinks} given frames (the sinks), got {window}")
        for t in range(sinks, total, CHUNK_FRAMES):
            length = min(t + CHUNK_FRAMES, total)
            if window is None:
                past = torch.arange(t, device=self.device)
            else:
                recent = torch.arange(max(sinks, t - (window - sinks)), t, device=self.device)
                past = torch.cat([torch.arange(sinks, device=self.device), recent])
            frames = torch.cat([past, torch.arange(t, length, device=self.device)])
            # the chunk's view of the past, gathered once for all its steps
            view = {
                "past": video[:, :, past],
                "actions": actions[:, frames],
                "positions": positions[:, frames],
                "levels": levels,
            }
            predict = functools.partial(self._chunk_flow, model, view)
            clean = self._sample(predict, (batch, 3, length - t, *video.shape[-2:]), sigmas, generator)
            video = torch.cat([video, clean.clamp(-1, 1)], 2)
        return video

    def _sample(self, predict, shape, sigmas, generator, grad_last: bool = False) -> torch.Tensor:
        """The few-step sampler on one chunk: from noise, each step takes the clean estimate
        ``x - sigma * predict(x, sigma)`` and re-noises it with fresh noise to the next sigma; returns
        the last step's estimate. ``grad_last``: only the last step records gradients."""
        latents = torch.randn(shape, generator=generator, device=self.device)
        for step, sigma in enumerate(sigmas):
            with torch.set_grad_enabled(grad_last and step + 1 == len(sigmas)):
                clean = latents - sigma * predict(latents, sigma)
            if step + 1 < len(sigmas):
                noise = torch.randn(shape, generator=generator, device=self.device)
                latents = (1 - sigmas[step + 1]) * clean + sigmas[step + 1] * noise
        return clean

    @torch.no_grad()
    def refresh_rollouts(
        self, model, data: Data, clips: int, clip_frames: int, generator, rollout_frames=None, window=None
    ) -> None:
        """Fill the rollout buffer: ``clips`` clips of ``rollout_frames`` frames (default
        ``clip_frames``) whose frames after a true start (1 to ``CONTEXT_FRAMES`` frames, cycling per
        refresh) are the model's own autoregressive rollout with the clip's true actions
        (``rollout_sampler``, the model in eval mode; ``window``: through a rolling window with the
        true start as sinks, :meth:`generate`). ``mix_rollouts`` trains on them: the model's drifted
        past as context, the true frames as targets (DAgger-style correction of exposure bias: the
        model learns to pull its rollout back to the game)."""
        batch = data.sample(clips, rollout_frames or clip_frames, generator, far_frames=0)
        start = 1 + self.refreshes % min(CONTEXT_FRAMES, clip_frames - 2)
        self.refreshes += 1
        with eval_mode(model):
            batch["context"] = self.generate(
                model, batch["x0"][:, :, :start], batch["actions"], batch["positions"], batch["levels"],
                *self.rollout_sampler, generator, window,
            )  # fmt: skip
        batch["start"] = start
        self.buffer = batch

    def mix_rollouts(self, batch: dict, generator) -> dict:
        """``batch`` with its first ``round(rollout_context * B)`` clips drawn from the rollout buffer
        (with replacement), each with a clean prefix past its true start, so its targets follow some of
        the model's own frames; ``batch["context"]`` holds the context frames (the true frames on the
        other clips) and ``batch["rolled"]`` marks the buffer clips. Buffer clips longer than the
        batch's ``F`` frames give their true start (the sinks) and ``F - start`` consecutive frames
        from a random point after it, at their own positions: a rolling window's view of a long
        rollout. Unchanged without a buffer."""
        if self.buffer is None or self.rollout_context <= 0:
            return batch
        size, frames = batch["actions"].shape
        count = round(self.rollout_context * size)
        if count == 0:
            return batch
        start = self.buffer["start"]
        view = self._buffer_view(count, frames, generator)
        prefix = (
            start
            + 1
            + (torch.rand(count, generator=generator, device=self.device) * (frames - start - 1)).long()
        )
        mixed = {key: batch[key].clone() for key in ("x0", "actions", "positions", "levels", "clean")}
        mixed["context"] = batch.get("context", batch["x0"]).clone()
        mixed["rolled"] = torch.zeros(size, dtype=torch.bool, device=self.device)
        for key in ("x0", "context", "actions", "positions", "levels"):
            mixed[key][:count] = view[key]
        mixed["clean"][:count] = torch.arange(frames, device=self.device)[None, :] < prefix[:, None]
        mixed["rolled"][:count] = True
        return mixed

    def _buffer_view(self, count: int, frames: int, generator) -> dict:
        """``count`` clips of ``frames`` frames from the rollout buffer (with replacement): each picked
        clip's true start (the sinks), then a run of later frames from a random point after it, at
        their own positions (a rolling window's view of a long rollout). ``{"x0", "context"
        [B, 3, F, H, W], "actions", "positions" [B, F], "levels" [B]}``."""
        buffer, start = self.buffer, self.buffer["start"]
        length = buffer["actions"].shape[1]
        pick = (torch.rand(count, generator=generator, device=self.device) * buffer["x0"].shape[0]).long()
        run = (
            start
            + (torch.rand(count, generator=generator, device=self.device) * (length - frames + 1)).long()
        )
        sinks = torch.arange(start, device=self.device).expand(count, -1)
        index = torch.cat([sinks, run[:, None] + torch.arange(frames - start, device=self.device)], 1)
        rows = pick[:, None]
        view = {key: buffer[key][rows, :, index].permute(0, 2, 1, 3, 4) for key in ("x0", "context")}
        view |= {key: buffer[key][rows, index] for key in ("actions", "positions")}
        return view | {"levels": buffer["levels"][pick]}

    def window_clips(self, count: int, window: int, generator) -> dict:
        """``count`` rolling-window views of the rollout buffer, each ending in a frame to generate
        (:meth:`_buffer_view` of ``window + 1`` frames): a buffer clip's true start (the sinks), the
        ``window - start`` rolled frames before its frame ``j``, and frame ``j``'s action and
        position. ``{"past" [B, 3, window, H, W], "actions"/"positions" [B, window + 1], "levels"
        [B]}``."""
        view = self._buffer_view(count, window + 1, generator)
        return {"past": view["context"][:, :, :-1]} | {k: view[k] for k in ("actions", "positions", "levels")}

    def _chunk_flow(self, model, view: dict, chunk: torch.Tensor, sigma) -> torch.Tensor:
        """The flow prediction for ``chunk`` ``[B, 3, f, H, W]`` at ``sigma`` (a float, or one per clip
        ``[B]``) after ``view``'s clean past (``{"past" [B, 3, P, H, W], "actions"/"positions"
        [B, P + f], "levels" [B]}``)."""
        known = view["past"].shape[2]
        sigmas = torch.zeros(chunk.shape[0], known + chunk.shape[2], device=self.device)
        sigmas[:, known:] = sigma[:, None] if isinstance(sigma, torch.Tensor) else sigma
        flow = self.forward(
            model,
            torch.cat([view["past"], chunk], 2),
            view["actions"],
            sigmas,
            view["positions"],
            view["levels"],
        )
        return flow[:, :, known:]

    def dmd_loss(self, model, teacher, fake, clips: dict, generator, sigma_min: float):
        """Distribution matching distillation (DMD, as Self-Forcing and CausVid train) on the model's
        own rollouts: the model samples the next frame of each window view with ``rollout_sampler``
        (every step but the last without gradient), the sample is noised to a sigma in ``[sigma_min,
        0.98]``, and the loss pushes it along ``x0_teacher - x0_fake``: toward the frames the teacher
        (the initial weights, frozen) expects after this past, away from the ones the fake score
        model (trained on the model's samples, :meth:`fake_score_loss`) has learnt the model makes.
        Unlike a regression toward the true next frame, which after a drift is unpredictable and
        teaches its blurred mean, this matches distributions, so samples keep the contrast of real
        frames. ``-> (loss, the sample [B, 3, 1, H, W] detached)``."""
        past = clips["past"]
        batch = past.shape[0]
        shape = (batch, 3, 1, *past.shape[-2:])
        predict = functools.partial(self._chunk_flow, model, clips)
        sample = self._sample(predict, shape, flow_sigmas(*self.rollout_sampler), generator, grad_last=True)
        sigma = sigma_min + (0.98 - sigma_min) * torch.rand(batch, generator=generator, device=self.device)
        s = sigma[:, None, None, None, None]
        noisy = (1 - s) * sample.detach() + s * torch.randn(shape, generator=generator, device=self.device)
        with torch.no_grad():
            real = noisy - s * self._chunk_flow(teacher, clips, noisy, sigma)
            with eval_mode(fake):
                made = noisy - s * self._chunk_flow(fake, clips, noisy, sigma)
            scale = (sample.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-4)
            target = sample.detach() - (made - real) / scale
        return 0.5 * F.mse_loss(sample, target), sample.detach()

    def fake_score_loss(self, fake, clips: dict, sample: torch.Tensor, generator) -> torch.Tensor:
        """The fake score model's flow-matching loss on the model's samples ``sample`` after the same
        pasts, at shifted-uniform sigmas (DMD's second model, which tracks the model's distribution)."""
        sigma = shifted_sigmas(torch.rand(sample.shape[0], generator=generator, device=self.device)).clamp(
            min=0.02
        )
        s = sigma[:, None, None, None, None]
        noise = torch.randn(sample.shape, generator=generator, device=self.device)
        flow = self._chunk_flow(fake, clips, (1 - s) * sample + s * noise, sigma)
        return F.mse_loss(flow, noise - sample)


def frame_stats_loss(estimate: torch.Tensor, x0: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Contrast and detail of the denoised estimates against the true frames' (``--stats-loss``):
    the mean over the ``frames`` ``[B, F]`` (bool) of ``(std_hat / std - 1)^2 + (detail_hat / detail -
    1)^2``, per frame, where std and detail are the stays-alive check's std and edge strength
    (:func:`vidaccel.metrics.frame_statistics`). ``estimate``, ``x0``: ``[B, C, F, H, W]``. Zero
    when no frame is selected. A regression loss alone is minimised by the mean of the frames a past
    allows, which is flatter (lower std) and blurrier (less detail) than any of them; these two
    moments of each frame can be matched without knowing which frame it is."""

    def moments(video):  # [B, C, F, H, W] -> the stays-alive check's std and edge strength, [B, F]
        stats = frame_statistics(video.movedim(1, -1))
        return stats["std"], stats["edge"]

    (std_hat, detail_hat), (std, detail) = moments(estimate), moments(x0)
    per_frame = (std_hat / std.clamp(min=1e-3) - 1) ** 2 + (detail_hat / detail.clamp(min=1e-3) - 1) ** 2
    weight = frames.float()
    return (per_frame * weight).sum() / weight.sum().clamp(min=1)


def shifted_sigmas(uniform: torch.Tensor) -> torch.Tensor:
    """Uniform draws in [0, 1] warped by the flow shift 3 (more weight on high noise)."""
    return 3 * uniform / (1 + 2 * uniform)


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, back in its previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(trainer: Trainer, model, data: Data, frames: int, samplers) -> dict:
    """Mean PSNR over the first ``frames`` predicted frames (per frame index pooled over the held-out
    episodes, then averaged) for each sampler, against copying the last context frame (and, for
    reference, copying the previous true frame, which needs the truth)."""
    truth = data.frames[:, CONTEXT_FRAMES : CONTEXT_FRAMES + frames].cpu().numpy()
    last = data.frames[:, CONTEXT_FRAMES - 1 : CONTEXT_FRAMES].cpu().numpy()
    previous = data.frames[:, CONTEXT_FRAMES - 1 : CONTEXT_FRAMES - 1 + frames].cpu().numpy()

    def mean_psnr(video):
        return float(
            np.mean([psnr(video[:, min(i, video.shape[1] - 1)], truth[:, i]) for i in range(frames)])
        )

    rows = []
    for timesteps, shift in samplers:
        started = time.perf_counter()
        video = trainer.rollout(model, data, CONTEXT_FRAMES, frames, timesteps, shift)
        per_frame = [psnr(video[:, i], truth[:, i]) for i in range(frames)]
        rows.append({
            "denoising_timesteps": list(timesteps), "shift": shift, "psnr": float(np.mean(per_frame)),
            "psnr_per_frame": [round(float(p), 3) for p in per_frame], "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(f"eval {timesteps} shift {shift}: PSNR {rows[-1]['psnr']:.2f} dB", flush=True)
    chosen = max(rows, key=lambda row: row["psnr"])
    copy_last = mean_psnr(last)
    return {
        "episodes": int(truth.shape[0]),
        "context_frames": CONTEXT_FRAMES,
        "predicted_frames": frames,
        "psnr": "dB per predicted frame index, pooled over the held-out episodes, averaged over the frames",
        "samplers": rows,
        "chosen": {"denoising_timesteps": chosen["denoising_timesteps"], "shift": chosen["shift"]},
        "psnr_model": chosen["psnr"],
        "psnr_copy_last_context": copy_last,
        "psnr_copy_previous_true": mean_psnr(previous),
        "margin_db": chosen["psnr"] - copy_last,
    }
