"""The procedural game: deterministic for a seed, driven by its actions, camera-shift redundancy,
moving blocks, action parsing and its errors."""

import json
import time

import numpy as np
import pytest

from vidaccel.pipelines.game import (
    ACTIONS,
    AGENT_SPEED,
    FRAME_SIZE,
    LEVELS,
    GameEnv,
    parse_actions,
    random_actions,
    scripted_actions,
)


def test_same_seed_same_frames():
    actions = random_actions(40, seed=5)
    first, second = GameEnv(7, level=2), GameEnv(7, level=2)
    assert np.array_equal(first.reset(), second.reset())
    frames = first.rollout(actions)
    assert frames.shape == (40, FRAME_SIZE, FRAME_SIZE, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, second.rollout(actions))
    first.reset()
    assert np.array_equal(frames, first.rollout(actions)), "reset returns to the seed's first state"
    assert not np.array_equal(frames, GameEnv(8, level=2).rollout(actions)), "another seed, another world"
    assert not np.array_equal(GameEnv(7, level=0).reset(), GameEnv(7, level=1).reset()), "levels differ"


def test_actions_change_frames_and_shift_the_view():
    env = GameEnv(1)
    start = env.reset()
    moved = {name: (env.reset(), env.step(name))[1] for name in ACTIONS}
    assert np.array_equal(moved["noop"][28:36, 28:36], start[28:36, 28:36])
    for name in ACTIONS[1:]:
        assert not np.array_equal(moved[name], moved["noop"]), name
    # "right" moves the camera AGENT_SPEED pixels right: the world part of the view shifts left
    # (the agent sprite in the centre and the blocks aside).
    right = moved["right"].astype(int)
    shifted = start[:, AGENT_SPEED:].astype(int)
    agree = (right[:, :-AGENT_SPEED] == shifted).all(-1).mean()
    assert agree > 0.85, agree


def test_blocks_move_on_their_own():
    env = GameEnv(0)
    frames = [env.reset()] + [env.step("noop") for _ in range(300)]
    changed = sum(not np.array_equal(a, b) for a, b in zip(frames, frames[1:], strict=False))
    assert changed > 30, "the camera stands still; the blocks must change some frames"


def test_action_helpers():
    walk = random_actions(500, seed=3)
    assert len(walk) == 500 and set(walk) == set(range(len(ACTIONS)))
    assert walk == random_actions(500, seed=3) and walk != random_actions(500, seed=4)
    assert sum(a != b for a, b in zip(walk, walk[1:], strict=False)) < 100, "actions are persistent"
    tour = scripted_actions(300)
    assert len(tour) == 300 and set(tour) == set(range(len(ACTIONS))) and tour == scripted_actions(300)


def test_parse_actions(tmp_path):
    assert parse_actions(["noop", "UP", 4, np.int64(2), "3"]) == [0, 1, 4, 2, 3]
    assert parse_actions("up, left,noop") == [1, 3, 0]
    listed = tmp_path / "actions.json"
    listed.write_text(json.dumps(["right", 2]))
    assert parse_actions(listed, num_frames=2) == [4, 2]
    lines = tmp_path / "actions.txt"
    lines.write_text("down\n\nleft\n")
    assert parse_actions(str(lines)) == [2, 3]


@pytest.mark.parametrize(
    "actions, num_frames, message",
    [
        (["up", "jump"], None, r"unknown action 'jump' at index 1; allowed: noop, up, down, left, right"),
        ([0, len(ACTIONS)], None, rf"unknown action {len(ACTIONS)} at index 1"),
        ([True], None, "unknown action True"),
        ("up,fly", None, "unknown action 'fly'"),
        (["up", "down"], 3, r"expected 3 actions \(one per frame, num_frames\), got 2"),
        (42, None, "actions must be a list"),
    ],
)
def test_parse_actions_errors(actions, num_frames, message):
    with pytest.raises(ValueError, match=message):
        parse_actions(actions, num_frames)


def test_env_errors():
    with pytest.raises(ValueError, match="level must be an int in"):
        GameEnv(0, level=len(LEVELS))
    with pytest.raises(ValueError, match="size must be an even int"):
        GameEnv(0, size=63)
    with pytest.raises(ValueError, match="unknown action 'jump'"):
        GameEnv(0).step("jump")


def test_fast_enough_for_training_on_the_fly():
    env = GameEnv(2)
    actions = random_actions(2000, seed=2)
    start = time.perf_counter()
    env.rollout(actions)
    fps = 2000 / (time.perf_counter() - start)
    assert fps > 2000, f"{fps:.0f} frames/s"
