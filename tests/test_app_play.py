"""The app's Play tab (``vidaccel.pipelines.app.play``) without a browser, on a tiny world model on
the CPU: each action makes one chunk, streamed beside the true game."""

from __future__ import annotations

import numpy as np
import pytest
from _app import tiny_world_model

from vidaccel.pipelines.app.fields import SOURCES, T2V, default_values
from vidaccel.pipelines.app.play import play_start, play_step, play_stop
from vidaccel.pipelines.app.runners import upscale
from vidaccel.pipelines.game import GameEnv


@pytest.fixture(scope="module", autouse=True)
def tiny_world(tmp_path_factory):
    with tiny_world_model(tmp_path_factory.mktemp("world_model")) as folder:
        yield folder


def test_play_streams_chunks_beside_the_game():
    assert "Play needs a world model" in play_start(default_values(model=SOURCES[T2V]))[2]
    model, true, message = play_start(default_values(seed=3, **{"TempCache.enabled": True}))
    assert message.startswith("Playing with TempCache") and model.shape == true.shape == (256, 256, 3)
    env = GameEnv(3)
    env.reset()
    for action in ("right", "down"):
        updates = list(play_step(action))
        assert len(updates) == 1  # one frame per chunk for this model
        model, true, message = updates[0]
        assert model.shape == (256, 256, 3) and model.dtype == np.uint8
        np.testing.assert_array_equal(true, upscale(env.step(action)))
    assert "frames 2/192" in message
    assert "unknown action 'jump'" in list(play_step("jump"))[0][2]
    assert "frames 3/192" in list(play_step("noop"))[0][2]  # a bad key leaves the session open
    assert play_stop() == "Session closed."
    assert list(play_step("up")) == [(None, None, "Press Start first.")]
