"""The Gradio app's callbacks (``demos/app.py``) without a browser, on a tiny world model and a tiny
Wan checkpoint on the CPU: the artefacts a run returns, the messages bad values give, Stop, Play."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from _app import load_app, write_tiny_world_model
from PIL import Image

import vidaccel
from vidaccel.pipelines import build_tiny_wan_pipeline
from vidaccel.pipelines.game import ACTIONS, GameEnv
from vidaccel.pipelines.world_model import DEFAULT_WORLD_MODEL

FRAMES = 2  # predicted frames of the world-model runs (chunks of one frame)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    module = load_app()
    module.OPTIONS["world_model"] = write_tiny_world_model(tmp_path_factory.mktemp("world_model"))
    yield module
    module.play_stop()
    module._LOADED.clear()


@pytest.fixture(scope="module")
def world_run(app):
    values = app.default_values(frames=FRAMES, **{"TempCache.enabled": True, "TempCache.sink_frames": 1})
    progress = _Progress()
    return app.run_comparison(values, progress), progress.calls


class _Progress:
    """Records ``progress(fraction, desc=...)`` calls; falsy when empty, like Gradio's tracker."""

    def __init__(self):
        self.calls = []

    def __call__(self, fraction, desc=None):
        self.calls.append((fraction, desc))

    def __len__(self):
        return 0


@pytest.fixture(scope="module")
def t2v_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_t2v")
    build_tiny_wan_pipeline(seed=0).save_pretrained(folder)
    return folder


def _frames(path: str) -> tuple[int, int, int]:
    """(frame count, height, width) of a video file."""
    capture = cv2.VideoCapture(path)
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, shape = count + 1, frame.shape
    capture.release()
    return count, *shape[:2]


def _dense_processors(pipe) -> bool:
    return all(type(p) is vidaccel.DenseProcessor for p in pipe.transformer.attn_processors.values())


def test_world_run_returns_videos_plot_and_table(app, world_run):
    result, progress = world_run
    assert result.message.startswith("**Done**: TempCache ran at"), result.message
    for path in (result.dense_video, result.accel_video, result.truth_video):
        assert Path(path).is_file()
        assert _frames(path) == (FRAMES, app.VIEW_SIZE, app.VIEW_SIZE)  # 64x64 frames upscaled 4x
    with Image.open(result.plot) as plot:
        assert plot.width > plot.height > 100
    assert [row[0] for row in result.table] == ["dense", "TempCache"]
    assert all(len(row) == len(app.TABLE_HEADERS) for row in result.table)
    dense, accel = result.table
    assert dense[2] == 1.0 and dense[4] == "inf" and dense[5] == 1.0  # dense against itself
    assert accel[2] == pytest.approx(dense[1] / accel[1], rel=0.01, abs=0.006)  # dense time / its time
    assert accel[3] > 0  # the KV cache on the CPU: TempCache's budget is allocated at the first commit
    assert accel[4] == "inf" or accel[4] > 20  # PSNR vs dense (identical when nothing merged)
    assert all(isinstance(v, float) for v in accel[5:])  # SSIM vs dense, PSNR/SSIM vs the game's frames
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    descs = " ".join(d for _, d in progress)
    total = FRAMES + 1  # the context frame's chunk, then the predicted ones
    assert f"dense: chunk {total}/{total}" in descs and f"TempCache: chunk {total}/{total}" in descs
    assert _dense_processors(app._LOADED["compare"].pipe)  # the methods are removed after the run


def test_world_truth_is_the_game(app):
    """The truth video shows the game played with the run's actions after its context frames."""
    values = app.default_values(frames=3, actions="right,up", seed=5, level=2)
    runner = app._WorldRunner(app.load_model(values["model"]).pipe, values, seed=5)
    env = GameEnv(5, level=2)
    expected = np.concatenate([env.reset()[None], env.rollout(runner.context_actions[1:] + runner.actions)])
    assert runner.actions == [ACTIONS.index(a) for a in ("right", "up", "right")]
    np.testing.assert_array_equal(runner.context_frames, expected[:1])
    np.testing.assert_array_equal(runner.truth, expected[1:])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "turn on at least one method"),
        ({"TempCache.enabled": True, "TempCache.threshold": 2.0}, "TempCache: TempCacheConfig.threshold"),
        ({"AnnSA.enabled": True, "AnnSA.top_k": "3"}, "AnnSA: AnnSAConfig: set exactly one of top_p"),
        ({"AnnSA.enabled": True, "AnnSA.top_p": "lots"}, "AnnSA top_p: expected a number, got 'lots'"),
        ({"TempCache.enabled": True, "seed": "x"}, "Seed: expected an integer"),
        ({"TempCache.enabled": True, "frames": -1}, "Frames: expected an integer in [1, 4096]"),
        ({"TempCache.enabled": True, "frames": 2.5}, "Frames: expected an integer"),
        ({"TempCache.enabled": True, "level": 7}, "Level: expected an integer in [0, 3]"),
        ({"TempCache.enabled": True, "actions": "right,jump"}, "Actions: unknown action 'jump'"),
        ({"TempCache.enabled": True, "actions": "/etc/hostname"}, "Actions: unknown action '/etc/hostname'"),
        ({"TempCache.enabled": True, "model": "a cat"}, "Model must be one of"),
        ({"AnnSA.enabled": True, "model": "t2v", "checkpoint": ""}, "Checkpoint folder: enter the path"),
    ],
)
def test_bad_values_give_a_message(app, overrides, expected):
    result = app.run_comparison(app.default_values(**overrides))
    assert result.message.startswith("**Cannot run**: ") and expected in result.message, result.message
    assert result.as_tuple() == (None, None, None, None, [], result.message)


def test_checkpoint_messages(app, tmp_path, t2v_checkpoint):
    t2v = app.SOURCES[app.T2V]
    assert "does not exist" in app.load_model_message(t2v, str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_text("x")
    assert "is a file" in app.load_model_message(t2v, str(tmp_path / "file.txt"))
    assert "no model_index.json" in app.load_model_message(t2v, str(t2v_checkpoint / "transformer"))
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    message = app.load_model_message(t2v, str(other))
    assert "holds a StableDiffusionPipeline, not a supported model" in message and "WanPipeline" in message
    loaded = app.load_model_message(app.SOURCES[app.CAUSAL], str(t2v_checkpoint))
    assert loaded.startswith("Loaded CausalWanPipeline") and "random prompt embeddings" in loaded


def test_text_to_video_checkpoint_run(app, t2v_checkpoint):
    values = app.default_values(
        model=app.SOURCES[app.T2V], checkpoint=str(t2v_checkpoint), height=32, width=32, frames=5, steps=1,
        guidance=1.0, **{"AnnCA.enabled": True, "TempCache.enabled": True},  # TempCache does not apply: ignored
    )  # fmt: skip
    result = app.run_comparison(values)
    assert result.message.startswith("**Done**: AnnCA ran at"), result.message
    assert result.truth_video is None and _frames(result.accel_video) == (5, 256, 256)
    assert [row[0] for row in result.table] == ["dense", "AnnCA"]
    assert result.table[1][3] == "n/a" and result.table[1][6:] == [
        "n/a",
        "n/a",
    ]  # no memory off CUDA, no truth
    assert _dense_processors(app._LOADED["compare"].pipe) is False  # stock diffusers processors are back
    assert not any(
        isinstance(p, vidaccel.AccelProcessor)
        for p in app._LOADED["compare"].pipe.transformer.attn_processors.values()
    )


def test_method_fields_follow_the_configs(app):
    for spec in app.METHODS:
        if spec.config is None:
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(spec.config)}
        fields = app.method_fields(spec)
        assert fields[0].key == f"{spec.name}.enabled" and fields[0].default is False
        for f in fields[1:]:
            name = f.key.split(".", 1)[1]
            expected = spec.app_defaults.get(name, defaults[name])
            shown = f.default if f.kind != "pair" else tuple(int(v) for v in f.default.split(","))
            assert shown == expected, f.key
    values = app.default_values(**{f"{spec.name}.enabled": True for spec in app.METHODS if spec.config})
    world = {type(c).__name__ for c in app.method_configs(values, app.WORLD)}
    flashblock = {"FlashBlockConfig"} if hasattr(vidaccel, "FlashBlockConfig") else set()
    assert world == {"TempCacheConfig", "AnnSAConfig", "AnnCAConfig"} | flashblock  # no FreeSwim
    t2v = app.method_configs(values, app.T2V)
    assert {type(c).__name__ for c in t2v} == {"AnnSAConfig", "AnnCAConfig", "FreeSwimConfig"}
    freeswim = next(c for c in t2v if isinstance(c, vidaccel.FreeSwimConfig))
    assert freeswim == vidaccel.FreeSwimConfig()  # every shown default round-trips through the page


def test_stop_cancels_a_run(app):
    def progress(fraction, desc=None):
        if desc and desc.startswith("dense: chunk"):
            app.stop_run()

    values = app.default_values(frames=FRAMES, **{"AnnSA.enabled": True})
    result = app.run_comparison(values, progress)
    assert result.message.startswith("Stopped.") and result.as_tuple()[:5] == (None, None, None, None, [])
    assert _dense_processors(app._LOADED["compare"].pipe)
    app.run_comparison(app.default_values())  # any next run starts unstopped
    assert not app._STOP.is_set()


def test_play_streams_chunks_beside_the_game(app):
    assert "Play needs a world model" in app.play_start(app.default_values(model=app.SOURCES[app.T2V]))[2]
    model, true, message = app.play_start(app.default_values(seed=3, **{"TempCache.enabled": True}))
    assert message.startswith("Playing with TempCache") and model.shape == true.shape == (256, 256, 3)
    env = GameEnv(3)
    env.reset()
    for action in ("right", "down"):
        updates = list(app.play_step(action))
        assert len(updates) == 1  # one frame per chunk for this model
        model, true, message = updates[0]
        assert model.shape == (256, 256, 3) and model.dtype == np.uint8
        np.testing.assert_array_equal(true, app._upscale(env.step(action)))
    assert "frames 2/192" in message
    assert "unknown action 'jump'" in list(app.play_step("jump"))[0][2]
    assert "frames 3/192" in list(app.play_step("noop"))[0][2]  # a bad key leaves the session open
    assert app.play_stop() == "Session closed."
    assert list(app.play_step("up")) == [(None, None, "Press Start first.")]


def test_shipped_world_model_or_a_clear_message(app, monkeypatch):
    monkeypatch.setitem(app.OPTIONS, "world_model", None)
    message = app.load_model_message(app.SOURCES[app.WORLD])
    if (DEFAULT_WORLD_MODEL / "diffusion_pytorch_model.safetensors").is_file():
        assert message.startswith("Loaded world model (shipped weights)"), message
    else:
        assert message.startswith("**Cannot run**: no world model at"), message


def test_page_has_the_controls(app):
    pytest.importorskip("gradio", reason="the page needs gradio (pip install -e '.[demo]')")
    demo = app.build_app(frames=3)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    expected = {"run-button", "stop-button", "dense-video", "accel-video", "truth-video", "metrics-table"}
    expected |= {"chunk-plot", "play-start"} | {f"play-{a}" for a in ACTIONS}
    expected |= {app._elem_id(f.key) for f in app.all_fields()}
    assert expected <= ids
    frames = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "field-frames")
    assert frames.value == 3


@pytest.mark.gpu
def test_gpu_run_releases_its_memory(app, monkeypatch):
    """On CUDA (bf16, Triton kernels): a run with every rollout method returns its artefacts with peak
    GPU memory in the table, and leaves no more memory allocated than the run before it did (the
    first run's persistent allocations, e.g. cuBLAS workspaces, are the baseline)."""
    import torch

    shipped = (DEFAULT_WORLD_MODEL / "diffusion_pytorch_model.safetensors").is_file()
    monkeypatch.setitem(app.OPTIONS, "world_model", None)
    model = app.SOURCES[app.WORLD if shipped else app.WORLD_RANDOM]
    methods = {"TempCache.enabled": True, "AnnSA.enabled": True, "FlashBlock.enabled": True}
    first = app.run_comparison(app.default_values(model=model, frames=2, warmup=True, **methods))
    assert first.message.startswith("**Done**"), first.message
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    result = app.run_comparison(app.default_values(model=model, frames=16, warmup=True, **methods))
    assert result.message.startswith("**Done**"), result.message
    assert [row[0] for row in result.table] == ["dense", "TempCache + AnnSA + FlashBlock"]
    assert all(row[3] > 0 for row in result.table)  # peak GPU memory (MiB)
    assert _frames(result.accel_video)[0] == 16
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - baseline < 2**20
