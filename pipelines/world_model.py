"""``WorldModelPipeline``: the game world model — a small pixel-space causal Wan trained on
:mod:`vidaccel.pipelines.game` (``demos/train_world_model.py``) — rolled out from true frames with
per-frame actions.

The model is a ``WanTransformer3DModel`` (:func:`world_model_config`): 64x64 RGB frames in
``[-1, 1]`` plus one one-hot plane per action (frame t carries the action that produced it), patch
1x4x4, one frame per chunk; its cross-attention reads the level's fixed token sequence. It samples
like every :class:`CausalWanPipeline` (KV cache, few-step flow sampler, any vidaccel method)::

    from vidaccel.pipelines import GameEnv, WorldModelPipeline, random_actions
    pipe = WorldModelPipeline.from_pretrained_world_model()          # assets/world_model
    env = GameEnv(seed=3)
    context = np.stack([env.reset(), *env.rollout(["right"] * 3)])    # 4 true frames
    actions = random_actions(100, seed=3)
    video = pipe(context, actions, 100, context_actions=["noop"] + ["right"] * 3).frames  # [1, 100, 64, 64, 3]
    vidaccel.apply(pipe, vidaccel.TempCacheConfig())                  # accelerated, unchanged call

``actions`` may also be a file path or a policy ``policy(frame_index, frames) -> action`` asked for
each predicted frame just before its chunk is generated, with every frame so far.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from .causal_wan import CausalWanPipeline, ChunkConditioning, RolloutOptions
from .game import ACTIONS, FRAME_SIZE, LEVELS, parse_actions

__all__ = [
    "ASSETS",
    "BEST_WORLD_MODEL",
    "DEFAULT_WORLD_MODEL",
    "LEVEL_FRAME_RANGES",
    "LONG_WORLD_MODEL",
    "LEVEL_TOKENS",
    "WorldModelPipeline",
    "default_metadata",
    "level_embeddings",
    "world_model_config",
]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
"""The shipped assets: the repository's ``assets/`` in a checkout or an editable install, and
``vidaccel/assets/`` (package data) in an installed wheel; both lie beside this package's folder."""

DEFAULT_WORLD_MODEL = ASSETS / "world_model"
"""The shipped world model: ``assets/world_model``."""

LONG_WORLD_MODEL = ASSETS / "world_model_long"
"""The world model for long rollouts: ``assets/world_model_long``, a weight average of two
fine-tunings of the shipped model, fine-tuned again with the contrast-and-detail loss
(``train_world_model.py --stats-loss``). Its ``world_model.json`` holds the sampler (flow shift
1.25) and the rolling window (``recommended_rollout``) it was measured stable with over 1,000
frames."""

BEST_WORLD_MODEL = LONG_WORLD_MODEL
"""The best world model shipped, the rollout demo's default on CPU and GPU (``make demo``): every
method stays alive by the level's range with it, where :data:`DEFAULT_WORLD_MODEL` fails that check
at 24 frames. ``from_pretrained_world_model()`` without a path keeps loading :data:`DEFAULT_WORLD_MODEL`."""

LEVEL_FRAME_RANGES = ASSETS / "level_frame_ranges.json"
"""Each world's true-frame range for the level check of the rollout demo
(``benchmarks/level_frame_ranges.py`` writes it)."""

LEVEL_TOKENS = {"num_tokens": 4, "dim": 32, "seed": 0}
"""The level's prompt-like token sequence: ``num_tokens`` fixed random vectors of ``dim`` per level
(``torch.randn`` from a CPU generator seeded with ``seed``), the cross-attention input."""

_ROLLOUT_OPTIONS = ("context_timestep", "max_cache_frames", "sink_frames")
Policy = Callable[[int, np.ndarray], "int | str"]


def world_model_config() -> dict:
    """The world model's ``WanTransformer3DModel`` config (7 layers, 4 heads x 64, ffn 768, patch
    1x4x4 on 64x64 RGB frames plus one-hot action planes; 7.1M parameters)."""
    return dict(
        patch_size=(1, 4, 4),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=3 + len(ACTIONS),
        out_channels=3,
        text_dim=LEVEL_TOKENS["dim"],
        freq_dim=256,
        ffn_dim=768,
        num_layers=7,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def level_embeddings(num_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """The fixed level token sequences, fp32 ``[len(LEVELS), num_tokens, dim]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(LEVELS), num_tokens, dim, generator=generator)


def default_metadata() -> dict:
    """``world_model.json`` without the training record: what a random-weight model samples with."""
    return {
        "actions": list(ACTIONS),
        "frame_size": FRAME_SIZE,
        "chunk_frames": 1,
        "context_frames": 4,
        "denoising_timesteps": [1000, 750, 500, 250],
        "shift": 3.0,
        "levels": list(LEVELS),
        "level_tokens": LEVEL_TOKENS | {"embeddings": level_embeddings(**LEVEL_TOKENS).tolist()},
    }


class WorldModelPipeline(CausalWanPipeline):
    """:class:`CausalWanPipeline` for the game world model: rollouts from true context frames with
    per-frame actions (see the module docs).

    Args:
        transformer: the world model's ``WanTransformer3DModel`` (``in_channels = 3 + len(actions)``,
            ``out_channels = 3``).
        scheduler: kept for the diffusers format (the few-step sampler is the parent's).
        vae, text_encoder, tokenizer: the parent's optional components, for diffusers' bookkeeping;
            a world model has none (pixel space, level tokens instead of a prompt).
        metadata: ``world_model.json`` (actions, frame size, chunk and context frames, sampler, level
            tokens); :func:`default_metadata` when ``None``.
    """

    def __init__(
        self,
        transformer,
        scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        metadata: dict | None = None,
    ) -> None:
        if vae is not None or text_encoder is not None or tokenizer is not None:
            raise ValueError(
                "a WorldModelPipeline has no vae, text_encoder or tokenizer (pixel space, level tokens)"
            )
        super().__init__(transformer, scheduler)
        self.metadata = default_metadata() if metadata is None else metadata
        actions = self.metadata["actions"]
        if actions != list(ACTIONS):
            raise ValueError(f"the world model's actions {actions} differ from the game's {list(ACTIONS)}")
        config = transformer.config
        if config.in_channels != 3 + len(actions) or config.out_channels != 3:
            raise ValueError(
                f"a world model transformer has in_channels = 3 + {len(actions)} actions and out_channels = 3, "
                f"got {config.in_channels} and {config.out_channels}"
            )
        self.level_tokens = torch.tensor(self.metadata["level_tokens"]["embeddings"], dtype=torch.float32)

    @classmethod
    def from_pretrained_world_model(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        random_weights: bool = False,
    ) -> WorldModelPipeline:
        """Load the world model from ``path`` (``config.json``, ``diffusion_pytorch_model.safetensors``,
        ``world_model.json``; default :data:`DEFAULT_WORLD_MODEL`).

        Args:
            device: default CUDA when available, else CPU.
            dtype: default bf16 on CUDA, fp32 on CPU.
            random_weights: the same architecture with a seeded random init and
                :func:`default_metadata` (tests; needs no files).

        Raises ``ValueError`` when the files are missing (with where the shipped model lives).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                transformer = WanTransformer3DModel.from_config(world_model_config())
            if dtype != torch.float32:
                transformer = transformer.to(dtype)
            metadata = default_metadata()
        else:
            folder = Path(path) if path is not None else DEFAULT_WORLD_MODEL
            missing = [
                name
                for name in ("config.json", "diffusion_pytorch_model.safetensors", "world_model.json")
                if not (folder / name).is_file()
            ]
            if missing:
                raise ValueError(
                    f"no world model at {folder} (missing {', '.join(missing)}). The shipped models are "
                    f"{DEFAULT_WORLD_MODEL} and {LONG_WORLD_MODEL} (vidaccel's package data, assets/ in the "
                    "repository); pass the folder of another one; demos/train_world_model.py trains one"
                )
            transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
            metadata = json.loads((folder / "world_model.json").read_text())
        scheduler = FlowMatchEulerDiscreteScheduler(shift=float(metadata["shift"]))
        pipe = cls(transformer.eval(), scheduler, metadata=metadata)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def __call__(
        self,
        context_frames,
        actions,
        num_frames: int,
        *,
        context_actions=None,
        level=0,
        denoising_timesteps=None,
        shift: float | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        **rollout_kwargs,
    ) -> WanPipelineOutput | tuple:
        """Roll the world out for ``num_frames`` frames after the context.

        Args:
            context_frames: true frames, uint8 ``[T0, 64, 64, 3]`` or ``[B, T0, 64, 64, 3]`` (numpy or
                torch), ``T0 >= 1`` a multiple of ``chunk_frames``; committed into the KV cache first.
            actions: the predicted frames' actions: names/ids (``num_frames`` of them, shared by the
                batch), a file path, or a policy ``policy(frame_index, frames)`` (batch of one) asked
                for predicted frame ``frame_index`` in ``[0, num_frames)`` before its chunk is
                generated, ``frames`` uint8 ``[t, 64, 64, 3]`` every frame so far (context included).
            num_frames: predicted frames (>= 1).
            context_actions: the actions that produced the context frames (``T0``); default noop.
            level: level id (or one per batch item) in ``[0, len(levels))``, the cross-attention tokens.
            denoising_timesteps, shift, eta: the sampler (as in
                :class:`~vidaccel.pipelines.causal_wan.RolloutOptions`); default from ``world_model.json`` (``eta``: 1
                when it names none).
            generator: seeds the noise.
            output_type: ``"np"`` (``[B, num_frames, 64, 64, 3]`` floats in ``[0, 1]``), ``"pil"``,
                ``"pt"`` (``[B, num_frames, 3, 64, 64]``) or ``"latent"`` (``[B, 3, num_frames, 64, 64]``
                in ``[-1, 1]``).
            **rollout_kwargs: ``context_timestep``, ``max_cache_frames``, ``sink_frames`` as in
                :class:`~vidaccel.pipelines.causal_wan.RolloutOptions`.

        Raises ``ValueError`` for a bad argument (unknown action, wrong number of actions, bad frames).
        """
        chunks = self._world_rollout(
            context_frames, actions, num_frames, context_actions, level, denoising_timesteps, shift,
            eta, generator, output_type, rollout_kwargs,
        )  # fmt: skip
        return self._collected(chunks, output_type, return_dict)

    def stream(self, *args, **kwargs) -> Iterator[WanPipelineOutput | tuple]:
        """Roll out like :meth:`__call__` (the same arguments) and yield each chunk's frames as soon as
        they are made; concatenated they equal ``__call__``'s video."""
        call = inspect.signature(type(self).__call__).bind(self, *args, **kwargs)
        call.apply_defaults()
        arguments = dict(call.arguments)
        del arguments["self"]
        return_dict, rollout_kwargs = arguments.pop("return_dict"), arguments.pop("rollout_kwargs")
        chunks = self._world_rollout(**arguments, rollout_kwargs=rollout_kwargs)
        return self._postprocessed(chunks, arguments["output_type"], return_dict)

    @property
    def sampler(self) -> dict:
        """The model's sampler, the rollouts' default: ``denoising_timesteps`` and ``shift`` from
        ``world_model.json``, and its ``eta`` (1, fresh noise, when it names none)."""
        metadata = self.metadata
        return {
            "denoising_timesteps": metadata["denoising_timesteps"],
            "shift": metadata["shift"],
            "eta": metadata.get("eta", 1.0),
        }

    def _world_rollout(
        self, context_frames, actions, num_frames, context_actions, level, denoising_timesteps, shift,
        eta, generator, output_type, rollout_kwargs,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        unknown = sorted(set(rollout_kwargs) - set(_ROLLOUT_OPTIONS))
        if unknown:
            raise ValueError(f"unknown rollout option(s) {unknown}; allowed: {', '.join(_ROLLOUT_OPTIONS)}")
        size, chunk_frames = self.metadata["frame_size"], self.metadata["chunk_frames"]
        frames = _context_frames(context_frames, size, chunk_frames)
        batch, context_length = frames.shape[:2]
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be an int in [1, inf), got {num_frames!r}")
        if context_actions is None:
            context_ids = [0] * context_length
        else:
            context_ids = parse_actions(context_actions, context_length)
        if callable(actions):
            if batch != 1:
                raise ValueError(
                    f"a policy callable drives a batch of one; the context frames have batch {batch}"
                )
            policy, action_ids = actions, None
        else:
            policy, action_ids = None, parse_actions(actions, num_frames)
        levels = [level] * batch if isinstance(level, (int, np.integer)) else list(level)
        if len(levels) != batch or any(
            isinstance(lv, bool)
            or not isinstance(lv, (int, np.integer))
            or not 0 <= lv < len(self.level_tokens)
            for lv in levels
        ):
            raise ValueError(
                f"level must be an int in [0, {len(self.level_tokens) - 1}] ({', '.join(self.metadata['levels'])}) "
                f"or one per batch item ({batch}), got {level!r}"
            )
        conditioning = _ActionConditioning(frames, context_ids, action_ids, policy, num_frames, chunk_frames)
        sampler = self.sampler
        options = RolloutOptions(
            prompt_embeds=self.level_tokens[levels],
            height=size,
            width=size,
            num_frames=num_frames,
            chunk_frames=chunk_frames,
            denoising_timesteps=sampler["denoising_timesteps"]
            if denoising_timesteps is None
            else denoising_timesteps,
            shift=sampler["shift"] if shift is None else shift,
            eta=sampler["eta"] if eta is None else eta,
            generator=generator,
            output_type=output_type,
            **rollout_kwargs,
        )
        return self._rollout(options, conditioning)


class _ActionConditioning(ChunkConditioning):
    """One world-model rollout: the context frames, action planes for each chunk's frames (a policy
    asked when a chunk first needs them), and every frame so far for the policy."""

    latent_channels = 3

    def __init__(
        self, frames: np.ndarray, context_ids, action_ids, policy, num_frames: int, chunk_frames: int
    ):
        batch, context_length = frames.shape[:2]
        self.context = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        self.ids = list(context_ids)
        self.action_ids, self.policy = action_ids, policy
        self.context_length, self.num_frames = context_length, num_frames
        padded = context_length + num_frames + chunk_frames
        self.frames = np.zeros((batch, padded, *frames.shape[2:]), dtype=np.uint8)  # every frame so far
        self.frames[:, :context_length] = frames
        self.made = context_length

    def model_input(self, latents: torch.Tensor, frame_offset: int) -> torch.Tensor:
        batch, _, count, height, width = latents.shape
        while len(self.ids) < frame_offset + count:
            self.ids.append(self._next_action(len(self.ids) - self.context_length))
        ids = torch.tensor(self.ids[frame_offset : frame_offset + count], device=latents.device)
        planes = F.one_hot(ids, len(ACTIONS)).to(latents.dtype).T  # [A, f]
        planes = planes[None, :, :, None, None].expand(batch, -1, -1, height, width)
        return torch.cat([latents, planes], dim=1)

    def chunk_done(self, clean: torch.Tensor, frame_offset: int) -> torch.Tensor:
        # Clamped like the training evaluation: the committed frames stay in the data range.
        clean = clean.clamp(-1, 1)
        count = clean.shape[2]
        rgb = ((clean + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        self.frames[:, frame_offset : frame_offset + count] = rgb
        self.made = frame_offset + count
        return clean

    def _next_action(self, index: int) -> int:
        if index >= self.num_frames:  # the trimmed tail of a last partial chunk
            return 0
        if self.policy is None:
            return self.action_ids[index]
        frames = self.frames[0, : self.made]
        frames.flags.writeable = False
        action = self.policy(index, frames)
        try:
            (action_id,) = parse_actions([action])
        except ValueError as error:
            raise ValueError(f"the policy returned a bad action for frame {index}: {error}") from None
        return action_id


def _context_frames(frames, size: int, chunk_frames: int) -> np.ndarray:
    """uint8 ``[B, T0, size, size, 3]`` from ``[T0, ...]`` or ``[B, T0, ...]`` numpy/torch frames."""
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(
            f"context_frames must be a uint8 array [T0, {size}, {size}, 3] or [B, T0, {size}, {size}, 3], "
            f"got {type(frames).__name__} {getattr(frames, 'dtype', '')}"
        )
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[2:] != (size, size, 3) or frames.shape[0] < 1:
        raise ValueError(
            f"context_frames must be uint8 [T0, {size}, {size}, 3] or [B, T0, {size}, {size}, 3], got shape {frames.shape}"
        )
    if frames.shape[1] < 1 or frames.shape[1] % chunk_frames:
        raise ValueError(
            f"the number of context frames must be a positive multiple of chunk_frames = {chunk_frames}, got {frames.shape[1]}"
        )
    return np.ascontiguousarray(frames)
