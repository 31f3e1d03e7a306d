"""The app's Play tab: actions drive the accelerated world model chunk by chunk.

:func:`play_start` opens a :class:`PlaySession` (its own world-model instance with the enabled
methods, and the true game), :func:`play_step` generates one chunk with an action and streams its
frames beside the game's, :func:`play_stop` closes the session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

import vidaccel
from vidaccel.pipelines.app.fields import (
    WORLD_KINDS,
    error_text,
    int_value,
    method_configs,
    method_names,
    source_key,
)
from vidaccel.pipelines.app.models import load_pipeline, release_memory
from vidaccel.pipelines.app.runners import FPS, upscale
from vidaccel.pipelines.app.state import GPU_LOCK, PLAY
from vidaccel.pipelines.game import GameEnv, parse_actions

LOG = logging.getLogger("vidaccel.app")

PLAY_KEYS = {"ArrowUp": "up", "ArrowDown": "down", "ArrowLeft": "left", "ArrowRight": "right", " ": "noop"}
"""The page's keys and the action each one presses."""

Frames = tuple[np.ndarray | None, np.ndarray | None, str]
"""What Play shows: ``(model frame, true frame, message)``."""


@dataclass
class PlaySession:
    """An open rollout of the Play tab: the accelerated world model's ``stream``, asking
    ``policy`` for each frame's action, and the true game stepped with the same actions."""

    pipe: object
    env: object
    stream: Iterator
    action: int = 0
    asked: list[int] = field(default_factory=list)
    frames: int = 0
    max_frames: int = 0
    methods: str = ""

    def policy(self, frame_index: int, frames) -> int:
        self.asked.append(self.action)
        return self.action

    def close(self) -> None:
        self.stream.close()
        vidaccel.remove(self.pipe)


def play_start(values: Mapping) -> Frames:
    """Callback of Play's Start: open a session on the world model of the Model field (its own
    instance, with the enabled methods) -> ``(model frame, true frame, message)``: the last context
    frame twice, or ``(None, None, message)`` for a bad value."""
    with GPU_LOCK:
        play_stop()
        try:
            session, last = _open(values)
        except ValueError as error:
            return None, None, error_text(error)
        except Exception as error:
            LOG.exception("play start failed")
            return None, None, error_text(error, unexpected=True)
        PLAY["session"] = session
        frame = upscale(last)
        keys = ", ".join(f"{k if k != ' ' else 'Space'}={a}" for k, a in PLAY_KEYS.items())
        return (
            frame,
            frame,
            f"Playing with {session.methods}: press an action ({keys}); each press makes one chunk.",
        )


def _open(values: Mapping) -> tuple[PlaySession, np.ndarray]:
    """A new session from the field values -> ``(session, its last context frame)``."""
    kind = source_key(values["model"])
    if kind not in WORLD_KINDS:
        raise ValueError("Play needs a world model: pick one in Model")
    configs = method_configs(values, kind)
    seed = int_value(values, "seed", 0, 2**31 - 1)
    level = int_value(values, "level", 0, 3)
    max_frames = int_value(values, "play_frames", 1, 4096)
    pipe = load_pipeline(kind, "").pipe
    env = GameEnv(seed, level=level)
    context = [env.reset(), *env.rollout([0] * (pipe.metadata["context_frames"] - 1))]
    if configs:
        vidaccel.apply(pipe, *configs)
    session = PlaySession(
        pipe, env, iter(()), max_frames=max_frames, methods=method_names(configs) or "dense"
    )
    session.stream = pipe.stream(
        np.stack(context), session.policy, max_frames, context_actions=[0] * len(context), level=level,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    )  # fmt: skip
    return session, context[-1]


def play_step(action: str) -> Iterator[Frames]:
    """Callback of an action button or key: generate the next chunk with ``action``, then stream its
    frames -> ``(model frame, true frame, message)`` per frame."""
    with GPU_LOCK:  # released before the frames are yielded: a paused generator holds no lock
        chunk, truth, message = _play_chunk(action)
    if chunk is None:
        yield None, None, message
        return
    for frame, true in zip(chunk, truth, strict=True):
        yield upscale(frame), upscale(true), message
        time.sleep(1 / (2 * FPS))


def _play_chunk(action: str) -> Frames:
    session = PLAY.get("session")
    if session is None:
        return None, None, "Press Start first."
    try:
        (session.action,) = parse_actions([action])
    except ValueError as error:
        return None, None, error_text(error)
    try:
        start = time.perf_counter()
        out = next(session.stream, None)
        latency = time.perf_counter() - start
    except Exception as error:
        LOG.exception("play step failed")
        play_stop()
        return None, None, error_text(error, unexpected=True) + " The session was closed; press Start."
    if out is None:
        play_stop()
        return None, None, f"The session reached its {session.max_frames} frames; press Start for a new one."
    chunk = np.asarray(out.frames)[0]
    truth = session.env.rollout(session.asked[: len(chunk)])
    del session.asked[: len(chunk)]
    session.frames += len(chunk)
    cache = session.pipe.kv_cache_stats().get("nbytes", 0) / 2**20
    message = (
        f"{session.methods}: frames {session.frames}/{session.max_frames}, last chunk {latency * 1e3:.0f} ms "
        f"({len(chunk)} frames), KV cache {cache:.1f} MiB"
    )
    return chunk, truth, message


def play_stop() -> str:
    """Callback of Play's Reset: close the session and release its memory."""
    with GPU_LOCK:
        session = PLAY.pop("session", None)
        if session is not None:
            session.close()
        release_memory()
    return "Session closed." if session is not None else "No session."
