"""The world model's training data and model: the game's episodes, the clip sampler, the model to
train and the training constants (``demos/train_world_model.py`` describes the recipe)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from vidaccel.pipelines.game import LEVELS, GameEnv, random_actions, scripted_actions
from vidaccel.pipelines.world_model import world_model_config

CHUNK_FRAMES = 1  # one frame per chunk: strict action causality and per-frame control
CONTEXT_FRAMES = 4  # true frames a rollout starts from
SAMPLERS = (  # (denoising timesteps, shift) candidates; the evaluation picks the default
    ((1000, 750, 500, 250), 3.0),
    ((1000, 750, 500, 250), 1.0),
    ((1000, 500), 3.0),
)
TOY_CONFIG = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2)
MAX_WEIGHT_BYTES = 15_000_000


def build_model(init: Path | None, toy: bool, device: torch.device) -> WanTransformer3DModel:
    """The model to train, in training mode: ``world_model_config()`` (the toy size with ``toy``) with
    fresh weights, or, to fine-tune, the weights in the folder ``init`` (bf16 on disk, fp32 here; the
    optimizer starts fresh). ``from_pretrained`` returns a model in eval mode: set back to train."""
    if init is not None:
        return WanTransformer3DModel.from_pretrained(init, torch_dtype=torch.float32).to(device).train()
    return (
        WanTransformer3DModel.from_config(world_model_config() | (TOY_CONFIG if toy else {}))
        .to(device)
        .train()
    )


def init_metadata(init: Path | None) -> dict | None:
    """The ``world_model.json`` of the weights a fine-tuning starts from (``None``: none)."""
    if init is None or not (init / "world_model.json").exists():
        return None
    return json.loads((init / "world_model.json").read_text())


def make_episodes(count: int, length: int, workers: int, seed_base: int):
    """``count`` episodes of ``length`` frames: uint8 ``[count, length, 64, 64, 3]``, action ids
    ``[count, length]`` (frame 0 is the reset frame, action noop) and level ids ``[count]``. Every
    fifth episode follows the scripted tour from a seed-dependent point, the rest random walks."""
    jobs = [(seed_base + i, i % len(LEVELS), length) for i in range(count)]
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, count))) as pool:
        episodes = pool.map(_episode, jobs, chunksize=max(1, count // (4 * max(1, workers))))
    frames = np.stack([frames for frames, _ in episodes])
    actions = np.stack([actions for _, actions in episodes])
    return frames, actions, np.array([level for _, level, _ in jobs])


def _episode(job) -> tuple[np.ndarray, np.ndarray]:
    seed, level, length = job
    if seed % 5 == 4:
        offset = seed % 97
        actions = scripted_actions(length - 1 + offset)[offset:]
    else:
        actions = random_actions(length - 1, seed=seed)
    env = GameEnv(seed, level=level)
    frames = np.concatenate([env.reset()[None], env.rollout(actions)])
    return frames, np.array([0, *actions], dtype=np.int64)


class Data:
    """Episodes on the device and the clip sampler."""

    def __init__(self, frames: np.ndarray, actions: np.ndarray, levels: np.ndarray, device: torch.device):
        self.frames = torch.from_numpy(frames).to(device)  # uint8 [E, L, 64, 64, 3]
        self.actions = torch.from_numpy(actions).to(device)  # [E, L]
        self.levels = torch.from_numpy(levels).to(device)  # [E]
        self.device = device

    def sample(self, batch: int, clip_frames: int, generator: torch.Generator, *, far_frames: int) -> dict:
        """``batch`` clips of ``clip_frames`` frames: ``{"x0" [B, 3, F, 64, 64] in [-1, 1], "actions"
        [B, F], "positions" [B, F], "levels" [B], "clean" [B, F] bool (the clean prefix)}``.

        A quarter of the clips (when ``far_frames`` > 0 and the episodes are long enough) start with
        ``far_frames`` frames from 8+ frames before the rest. Each clip's clean prefix covers the far
        frames and 1 to half of the remaining frames."""
        episodes, length = self.actions.shape

        def randint(high, size=(batch,)):
            return (torch.rand(size, generator=generator, device=self.device) * high).long()

        episode = randint(episodes)
        steps = torch.arange(clip_frames, device=self.device)
        start = randint(length - clip_frames + 1)
        index = start[:, None] + steps
        recent = clip_frames - far_frames
        min_gap = 8
        prefix = 1 + randint(clip_frames // 2)
        if far_frames and length >= recent + far_frames + min_gap:
            far = torch.rand(batch, generator=generator, device=self.device) < 0.25
            recent_start = far_frames + min_gap + randint(length - recent - far_frames - min_gap + 1)
            far_start = (
                torch.rand(batch, generator=generator, device=self.device)
                * (recent_start - far_frames - min_gap + 1)
            ).long()
            far_index = torch.where(
                steps < far_frames, far_start[:, None] + steps, recent_start[:, None] + steps - far_frames
            )
            index = torch.where(far[:, None], far_index, index)
            prefix = torch.where(far, far_frames + 1 + randint(recent // 2), prefix)
        frames = self.frames[episode[:, None], index]  # [B, F, 64, 64, 3]
        x0 = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        offset = randint(1024)
        return {
            "x0": x0,
            "actions": self.actions[episode[:, None], index],
            "positions": index + offset[:, None],
            "levels": self.levels[episode],
            "clean": steps[None, :] < prefix[:, None],
        }
