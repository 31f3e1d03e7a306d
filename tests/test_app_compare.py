"""The app's Compare tab (``vidaccel.pipelines.app.models`` and ``.runners``) without a browser, on
a tiny world model and a tiny Wan checkpoint on the CPU: the artefacts a run returns, the messages
bad values and bad checkpoints give, and Stop."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from _app import tiny_world_model
from PIL import Image

import vidaccel
from vidaccel.pipelines import build_tiny_wan_pipeline
from vidaccel.pipelines.app.fields import CAUSAL, SOURCES, T2V, WORLD, WORLD_RANDOM, default_values
from vidaccel.pipelines.app.models import load_model, load_model_message
from vidaccel.pipelines.app.runners import TABLE_HEADERS, VIEW_SIZE, WorldRunner, run_comparison, stop_run
from vidaccel.pipelines.app.state import LOADED, OPTIONS, STOP
from vidaccel.pipelines.game import ACTIONS, GameEnv
from vidaccel.pipelines.world_model import DEFAULT_WORLD_MODEL

FRAMES = 2  # predicted frames of the world-model runs (chunks of one frame)


@pytest.fixture(scope="module", autouse=True)
def tiny_world(tmp_path_factory):
    with tiny_world_model(tmp_path_factory.mktemp("world_model")) as folder:
        yield folder


@pytest.fixture(scope="module")
def world_run():
    values = default_values(frames=FRAMES, **{"TempCache.enabled": True, "TempCache.sink_frames": 1})
    progress = _Progress()
    return run_comparison(values, progress), progress.calls


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


def test_world_run_returns_videos_plot_and_table(world_run):
    result, progress = world_run
    assert result.message.startswith("**Done**: TempCache ran at"), result.message
    for path in (result.dense_video, result.accel_video, result.truth_video):
        assert Path(path).is_file()
        assert _frames(path) == (FRAMES, VIEW_SIZE, VIEW_SIZE)  # 64x64 frames upscaled 4x
    with Image.open(result.plot) as plot:
        assert plot.width > plot.height > 100
    assert [row[0] for row in result.table] == ["dense", "TempCache"]
    assert all(len(row) == len(TABLE_HEADERS) for row in result.table)
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
    assert _dense_processors(LOADED["compare"].pipe)  # the methods are removed after the run


def test_world_truth_is_the_game():
    """The truth video shows the game played with the run's actions after its context frames."""
    values = default_values(frames=3, actions="right,up", seed=5, level=2)
    runner = WorldRunner(load_model(values["model"]).pipe, values, seed=5)
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
def test_bad_values_give_a_message(overrides, expected):
    result = run_comparison(default_values(**overrides))
    assert result.message.startswith("**Cannot run**: ") and expected in result.message, result.message
    assert result.as_tuple() == (None, None, None, None, [], result.message)


def test_checkpoint_messages(tmp_path, t2v_checkpoint):
    t2v = SOURCES[T2V]
    assert "does not exist" in load_model_message(t2v, str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_text("x")
    assert "is a file" in load_model_message(t2v, str(tmp_path / "file.txt"))
    assert "no model_index.json" in load_model_message(t2v, str(t2v_checkpoint / "transformer"))
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    message = load_model_message(t2v, str(other))
    assert "holds a StableDiffusionPipeline, not a supported model" in message and "WanPipeline" in message
    loaded = load_model_message(SOURCES[CAUSAL], str(t2v_checkpoint))
    assert loaded.startswith("Loaded CausalWanPipeline") and "random prompt embeddings" in loaded


def test_text_to_video_checkpoint_run(t2v_checkpoint):
    values = default_values(
        model=SOURCES[T2V], checkpoint=str(t2v_checkpoint), height=32, width=32, frames=5, steps=1,
        guidance=1.0, **{"AnnCA.enabled": True, "TempCache.enabled": True},  # TempCache does not apply: ignored
    )  # fmt: skip
    result = run_comparison(values)
    assert result.message.startswith("**Done**: AnnCA ran at"), result.message
    assert result.truth_video is None and _frames(result.accel_video) == (5, 256, 256)
    assert [row[0] for row in result.table] == ["dense", "AnnCA"]
    assert result.table[1][3] == "n/a" and result.table[1][6:] == [
        "n/a",
        "n/a",
    ]  # no memory off CUDA, no truth
    assert _dense_processors(LOADED["compare"].pipe) is False  # stock diffusers processors are back
    assert not any(
        isinstance(p, vidaccel.AccelProcessor)
        for p in LOADED["compare"].pipe.transformer.attn_processors.values()
    )


def test_stop_cancels_a_run():
    def progress(fraction, desc=None):
        if desc and desc.startswith("dense: chunk"):
            stop_run()

    values = default_values(frames=FRAMES, **{"AnnSA.enabled": True})
    result = run_comparison(values, progress)
    assert result.message.startswith("Stopped.") and result.as_tuple()[:5] == (None, None, None, None, [])
    assert _dense_processors(LOADED["compare"].pipe)
    run_comparison(default_values())  # any next run starts unstopped
    assert not STOP.is_set()


def test_shipped_world_model_or_a_clear_message(monkeypatch):
    monkeypatch.setitem(OPTIONS, "world_model", None)
    message = load_model_message(SOURCES[WORLD])
    if (DEFAULT_WORLD_MODEL / "diffusion_pytorch_model.safetensors").is_file():
        assert message.startswith("Loaded world model (shipped weights)"), message
    else:
        assert message.startswith("**Cannot run**: no world model at"), message


@pytest.mark.gpu
def test_gpu_run_releases_its_memory(monkeypatch):
    """On CUDA (bf16, Triton kernels): a run with every rollout method returns its artefacts with peak
    GPU memory in the table, and leaves no more memory allocated than the run before it did (the
    first run's persistent allocations, e.g. cuBLAS workspaces, are the baseline)."""
    import torch

    shipped = (DEFAULT_WORLD_MODEL / "diffusion_pytorch_model.safetensors").is_file()
    monkeypatch.setitem(OPTIONS, "world_model", None)
    model = SOURCES[WORLD if shipped else WORLD_RANDOM]
    methods = {"TempCache.enabled": True, "AnnSA.enabled": True, "FlashBlock.enabled": True}
    first = run_comparison(default_values(model=model, frames=2, warmup=True, **methods))
    assert first.message.startswith("**Done**"), first.message
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    result = run_comparison(default_values(model=model, frames=16, warmup=True, **methods))
    assert result.message.startswith("**Done**"), result.message
    assert [row[0] for row in result.table] == ["dense", "TempCache + AnnSA + FlashBlock"]
    assert all(row[3] > 0 for row in result.table)  # peak GPU memory (MiB)
    assert _frames(result.accel_video)[0] == 16
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - baseline < 2**20
