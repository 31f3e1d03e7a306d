"""A small procedural game whose true next frames we can compute: the world model's training data
and its ground truth.

An agent (the white sprite, always at the centre of the frame: the camera follows it) walks over a
larger textured world that wraps around like a torus; a few coloured blocks drift across the world
on their own. Each step moves the camera by :data:`AGENT_SPEED` pixels, so most of a frame persists,
shifted, from the previous one (the redundancy TempCache exploits); the blocks move at one pixel per
step in one of eight directions. Everything is drawn with numpy slicing on a pre-rendered world,
tens of thousands of frames per second per core::

    from vidaccel.pipelines.game import GameEnv, random_actions
    env = GameEnv(seed=3, level=1)
    first = env.reset()                               # uint8 [64, 64, 3]
    frames = env.rollout(random_actions(100, seed=3)) # uint8 [100, 64, 64, 3]

A seed fixes the world (terrain, decorations, blocks and the agent's start); a level picks the
palette (:data:`LEVELS`). Action convention: frame t's action is the one that produced it from
frame t - 1 (``env.step(a_t)`` returns frame t); the reset frame's action is ``"noop"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "ACTIONS",
    "AGENT_SPEED",
    "FRAME_SIZE",
    "LEVELS",
    "WORLD_SIZE",
    "GameEnv",
    "parse_actions",
    "random_actions",
    "scripted_actions",
]

ACTIONS: tuple[str, ...] = ("noop", "up", "down", "left", "right")
"""The discrete actions; the index is the action id."""

FRAME_SIZE = 64
"""Frames are uint8 RGB ``[FRAME_SIZE, FRAME_SIZE, 3]``."""

WORLD_SIZE = 192
"""Side of the square, wrapping world in pixels (nine frames' area)."""

AGENT_SPEED = 2
"""Pixels the camera moves per step of a movement action."""

LEVELS: tuple[str, ...] = ("meadow", "desert", "snow", "night")
"""Level palettes (``GameEnv(level=i)``)."""

_MOVES = {"noop": (0, 0), "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
_NUM_BLOCKS = 8
_NUM_DECORATIONS = 160
# Terrain palettes, low to high ground: four bands per level (RGB).
_PALETTES = {
    "meadow": ((40, 90, 170), (200, 190, 120), (70, 150, 60), (30, 90, 40)),
    "desert": ((150, 100, 60), (220, 180, 110), (235, 205, 140), (170, 120, 80)),
    "snow": ((80, 120, 160), (200, 210, 225), (240, 245, 250), (140, 150, 170)),
    "night": ((15, 20, 60), (50, 50, 90), (30, 70, 60), (90, 60, 110)),
}
_BLOCK_COLORS = ((230, 40, 40), (250, 200, 0), (40, 220, 230), (240, 90, 220), (255, 140, 0), (120, 80, 255))
_AGENT = np.array(
    [
        [0, 1, 1, 1, 1, 0],
        [1, 2, 2, 2, 2, 1],
        [1, 2, 2, 2, 2, 1],
        [1, 2, 2, 2, 2, 1],
        [1, 2, 2, 2, 2, 1],
        [0, 1, 1, 1, 1, 0],
    ],
    dtype=np.uint8,
)  # 0: transparent, 1: outline, 2: body


class GameEnv:
    """Deterministic, seedable procedural game (see the module docs).

    Args:
        seed: fixes the world, the blocks and the agent's start.
        size: frame side in pixels (even, in ``[16, WORLD_SIZE]``).
        level: palette index into :data:`LEVELS`.

    The environment starts reset: :meth:`step` and :meth:`rollout` continue from the current state,
    :meth:`reset` returns to the seed's first frame.
    """

    def __init__(self, seed: int = 0, *, size: int = FRAME_SIZE, level: int = 0) -> None:
        if not isinstance(size, int) or size % 2 or not 16 <= size <= WORLD_SIZE:
            raise ValueError(f"size must be an even int in [16, {WORLD_SIZE}], got {size!r}")
        if not isinstance(level, int) or not 0 <= level < len(LEVELS):
            raise ValueError(
                f"level must be an int in [0, {len(LEVELS) - 1}] ({', '.join(LEVELS)}), got {level!r}"
            )
        self.seed, self.size, self.level = int(seed), size, level
        rng = np.random.default_rng([self.seed, level])
        world = _render_world(rng, _PALETTES[LEVELS[level]])
        # Padded by one frame with the wrapped-around texture, so every view is one contiguous slice.
        self._world = np.pad(world, ((0, size), (0, size), (0, 0)), mode="wrap")
        self._start = rng.integers(0, WORLD_SIZE, size=2).tolist()
        directions = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy])
        self._block_start = rng.integers(0, WORLD_SIZE, size=(_NUM_BLOCKS, 2)).tolist()
        self._block_velocity = directions[rng.integers(0, len(directions), size=_NUM_BLOCKS)].tolist()
        self._block_size = rng.integers(4, 8, size=_NUM_BLOCKS).tolist()
        self._block_color = np.array(_BLOCK_COLORS, dtype=np.uint8)[
            rng.integers(0, len(_BLOCK_COLORS), size=_NUM_BLOCKS)
        ]
        opaque = np.nonzero(_AGENT)
        half = size // 2
        self._agent_pixels = (opaque[0] + half - 3, opaque[1] + half - 3)
        self._agent_rgb = np.array([(0, 0, 0), (20, 20, 20), (250, 250, 250)], dtype=np.uint8)[_AGENT[opaque]]
        self.reset()

    def reset(self) -> np.ndarray:
        """Return to the seed's first state; ``-> uint8 [size, size, 3]``, the first frame."""
        self._agent = tuple(self._start)
        self._blocks = [tuple(block) for block in self._block_start]
        self.t = 0
        return self.render()

    def step(self, action: int | str) -> np.ndarray:
        """Apply ``action`` (a name of :data:`ACTIONS` or its id) and advance the blocks by one step;
        ``-> uint8 [size, size, 3]``, the next frame."""
        (action_id,) = parse_actions([action])
        return self._advance(action_id)

    def rollout(self, actions) -> np.ndarray:
        """Step through ``actions`` (anything :func:`parse_actions` takes) from the current state;
        ``-> uint8 [len(actions), size, size, 3]``, the frame after each action."""
        ids = parse_actions(actions)
        frames = np.empty((len(ids), self.size, self.size, 3), dtype=np.uint8)
        for i, action in enumerate(ids):
            frames[i] = self._advance(action)
        return frames

    def _advance(self, action_id: int) -> np.ndarray:
        dx, dy = _MOVES[ACTIONS[action_id]]
        self._agent = (
            (self._agent[0] + AGENT_SPEED * dx) % WORLD_SIZE,
            (self._agent[1] + AGENT_SPEED * dy) % WORLD_SIZE,
        )
        self._blocks = [
            ((bx + vx) % WORLD_SIZE, (by + vy) % WORLD_SIZE)
            for (bx, by), (vx, vy) in zip(self._blocks, self._block_velocity, strict=True)
        ]
        self.t += 1
        return self.render()

    def render(self) -> np.ndarray:
        """The current frame, uint8 ``[size, size, 3]``: the view centred on the agent."""
        size, half = self.size, self.size // 2
        left, top = (self._agent[0] - half) % WORLD_SIZE, (self._agent[1] - half) % WORLD_SIZE
        frame = self._world[top : top + size, left : left + size].copy()
        for (bx, by), side, color in zip(self._blocks, self._block_size, self._block_color, strict=True):
            # Position relative to the view on the torus; blocks straddling the view edge are clipped.
            x0 = (bx - left) % WORLD_SIZE
            y0 = (by - top) % WORLD_SIZE
            x0 -= WORLD_SIZE * (x0 > WORLD_SIZE - side)
            y0 -= WORLD_SIZE * (y0 > WORLD_SIZE - side)
            if x0 >= size or y0 >= size:
                continue
            xs, ys = slice(max(x0, 0), min(x0 + side, size)), slice(max(y0, 0), min(y0 + side, size))
            frame[ys, xs] = color // 2
            xs_in = slice(max(x0 + 1, 0), min(x0 + side - 1, size))
            ys_in = slice(max(y0 + 1, 0), min(y0 + side - 1, size))
            frame[ys_in, xs_in] = color
        frame[self._agent_pixels] = self._agent_rgb
        return frame


def parse_actions(actions, num_frames: int | None = None) -> list[int]:
    """Action ids from names or ids, a comma-separated string of them, or a path to a file (a JSON
    list, or one name/id per line).

    Args:
        actions: e.g. ``["up", "up", 4]``, ``"up,left,noop"`` or ``"actions.json"``.
        num_frames: the required number of actions, or ``None`` for any.

    Returns a list of ints in ``[0, len(ACTIONS))``. Raises ``ValueError`` naming the bad action and
    the allowed names, or the wrong length (expected ``num_frames``).
    """
    if isinstance(actions, (str, Path)):
        path = Path(actions)
        if path.is_file():
            text = path.read_text()
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                items = [line.strip() for line in text.splitlines() if line.strip()]
            if not isinstance(items, list):
                raise ValueError(f"actions file {str(path)!r} must hold a JSON list or one action per line")
        else:
            items = [item.strip() for item in str(actions).split(",") if item.strip()]
    elif isinstance(actions, (Sequence, np.ndarray)):
        items = list(actions)
    else:
        raise ValueError(
            f"actions must be a list of names/ids, a comma-separated string or a file path, got {type(actions).__name__}"
        )
    ids = [_action_id(item, index) for index, item in enumerate(items)]
    if num_frames is not None and len(ids) != num_frames:
        raise ValueError(f"expected {num_frames} actions (one per frame, num_frames), got {len(ids)}")
    return ids


def random_actions(num_frames: int, seed: int = 0) -> list[int]:
    """A temporally persistent random walk of ``num_frames`` action ids: each action is held for a
    while (a new one is drawn with probability 0.12 per frame), a fifth of the draws are ``noop``."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.2] + [0.8 / (len(ACTIONS) - 1)] * (len(ACTIONS) - 1))
    draws = rng.choice(len(ACTIONS), size=num_frames, p=weights)
    switch = rng.random(num_frames) < 0.12
    switch[:1] = True
    held = np.maximum.accumulate(np.where(switch, np.arange(num_frames), 0))
    return draws[held].tolist()


def scripted_actions(num_frames: int) -> list[int]:
    """A fixed, varied tour of ``num_frames`` action ids: runs of every action of different lengths,
    pauses and quick turns, repeated."""
    tour = [
        ("right", 12), ("noop", 4), ("down", 10), ("left", 6), ("up", 3), ("left", 14), ("noop", 2),
        ("up", 16), ("right", 2), ("down", 2), ("right", 8), ("down", 12), ("noop", 6), ("left", 4),
    ]  # fmt: skip
    ids = [ACTIONS.index(name) for name, length in tour for _ in range(length)]
    return [ids[i % len(ids)] for i in range(num_frames)]


def _action_id(item, index: int) -> int:
    is_id = isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_))
    if is_id and 0 <= item < len(ACTIONS):
        return int(item)
    elif isinstance(item, str):
        name = item.strip().lower()
        if name in ACTIONS:
            return ACTIONS.index(name)
        if name.isdigit() and int(name) < len(ACTIONS):
            return int(name)
    raise ValueError(
        f"unknown action {item!r} at index {index}; allowed: {', '.join(ACTIONS)} "
        f"(or their ids 0..{len(ACTIONS) - 1})"
    )


def _render_world(rng: np.random.Generator, palette) -> np.ndarray:
    """A wrapping ``[WORLD_SIZE, WORLD_SIZE, 3]`` uint8 texture: periodic terrain bands from a sum of
    integer-frequency waves, fine shading, and scattered dark/light decorations."""
    coords = np.arange(WORLD_SIZE) * (2 * math.pi / WORLD_SIZE)
    x, y = np.meshgrid(coords, coords)
    height = np.zeros((WORLD_SIZE, WORLD_SIZE))
    for _ in range(6):
        fx, fy = rng.integers(-4, 5, size=2)
        height += rng.uniform(0.5, 1.0) * np.cos(fx * x + fy * y + rng.uniform(0, 2 * math.pi))
    bands = np.digitize(height, np.quantile(height, (0.2, 0.45, 0.8)))
    world = np.array(palette, dtype=np.float64)[bands]
    shade = np.zeros_like(height)
    for _ in range(3):
        fx, fy = rng.integers(6, 20, size=2) * rng.choice((-1, 1), size=2)
        shade += np.cos(fx * x + fy * y + rng.uniform(0, 2 * math.pi))
    world *= 1 + 0.06 * shade[..., None]
    positions = rng.integers(0, WORLD_SIZE, size=(_NUM_DECORATIONS, 2))
    for (px, py), kind in zip(positions, rng.integers(0, 3, size=_NUM_DECORATIONS), strict=True):
        rows = np.arange(py - 1, py + 2) % WORLD_SIZE
        cols = np.arange(px - 1, px + 2) % WORLD_SIZE
        if kind == 0:  # dark 3x3 stone
            world[np.ix_(rows, cols)] *= 0.45
        elif kind == 1:  # light cross
            world[rows, px % WORLD_SIZE] = world[rows, px % WORLD_SIZE] * 0.3 + 170
            world[py % WORLD_SIZE, cols] = world[py % WORLD_SIZE, cols] * 0.3 + 170
        else:  # dark diagonal pair
            world[rows[[0, 2]], cols[[0, 2]]] *= 0.35
    return np.clip(world, 0, 255).astype(np.uint8)
