"""The world-model training script's command line (``demos/train_world_model.py``): a toy run writes
a loadable model folder, bad options are refused; and ``benchmarks/eval_world_model.py``, the same
held-out evaluation on a finished model. The training itself: tests/test_training.py."""

import json
import re

import pytest
import torch
from _helpers import run_script, run_script_cases

from vidaccel.pipelines import DEFAULT_WORLD_MODEL, WorldModelPipeline
from vidaccel.pipelines import training as train

SHIPPED = (DEFAULT_WORLD_MODEL / "diffusion_pytorch_model.safetensors").is_file()
CPU = torch.device("cpu")
DMD = ["--dmd", "1", "--init", "wm", "--rollout-window", "8", "--rollout-frames", "32"]  # valid DMD options
BAD_OPTIONS = [
    (["--self-context", "1.5"], r"--self-context must be in \[0, 1\], got 1.5"),
    (["--context-noise", "-0.1"], r"--context-noise must be in \[0, 1\], got -0.1"),
    (["--eval-samplers", "init"], "--eval-samplers init needs --init with a world_model.json"),
    (["--rollout-context", "2"], r"--rollout-context must be in \[0, 1\], got 2.0"),
    (["--rollout-every", "0"], "--rollout-every must be >= 1, got 0"),
    (["--rollout-frames", "8"], r"--rollout-frames must be >= --clip-frames \(16\), got 8"),
    (["--rollout-window", "4"], "--rollout-window must exceed the 4 sink frames, got 4"),
    (["--rollout-timesteps", "500,750"], "denoising_timesteps must be strictly decreasing"),
    (["--dmd", "-1"], "--dmd must be >= 0, got -1.0"),
    (["--dmd", "1"], "--dmd fine-tunes: it needs --init"),
    (
        ["--dmd", "1", "--init", "wm", "--rollout-window", "16"],
        "--dmd needs --rollout-window W and --rollout-frames above W",
    ),
    ([*DMD, "--dmd-sigma-min", "1"], r"--dmd-sigma-min must be in \(0, 0.98\), got 1.0"),
    ([*DMD, "--fake-steps", "0"], "--fake-steps must be >= 1, got 0"),
    (["--stats-loss", "-1"], "--stats-loss must be >= 0, got -1.0"),
    (["--stats-sigma-max", "0"], r"--stats-sigma-max must be in \(0, 1\], got 0.0"),
]


def test_toy_training_writes_a_world_model(tmp_path):
    """``--toy``: a few steps on CPU write the model folder (weights, config, metadata with the training
    record and the evaluation, loss curve), which loads as a ``WorldModelPipeline``."""
    out = tmp_path / "wm"
    printed = run_script(
        "demos/train_world_model.py", "--toy", "--minutes", "0.01", "--workers", "1", "--log-every", "1",
        "--out", str(out),
    )  # fmt: skip
    assert "margin over copy-last" in printed.strip().splitlines()[-1]
    metadata = json.loads((out / "world_model.json").read_text())
    record = metadata["training"]
    assert record["toy"] and record["steps"] >= 1 and record["weights"] in ("raw", "ema")
    assert record["weights_bytes"] == (out / "diffusion_pytorch_model.safetensors").stat().st_size
    assert record["total_seconds"] >= record["seconds"] > 0 and set(record["validation_loss"]) == {
        "raw",
        "ema",
    }
    assert (
        metadata["context_frames"] == train.CONTEXT_FRAMES and metadata["chunk_frames"] == train.CHUNK_FRAMES
    )
    chosen = metadata["evaluation"]["chosen"]
    assert (tuple(chosen["denoising_timesteps"]), chosen["shift"]) == train.SAMPLERS[0]  # the toy's only one
    assert metadata["denoising_timesteps"] == chosen["denoising_timesteps"]
    assert len(json.loads((out / "loss_curve.json").read_text())) == record["steps"]
    pipe = WorldModelPipeline.from_pretrained_world_model(out, device="cpu")
    assert pipe.transformer.config.num_layers == train.TOY_CONFIG["num_layers"]


def test_bad_options():
    results = run_script_cases("demos/train_world_model.py", [argv for argv, _ in BAD_OPTIONS])
    for (argv, message), (status, stderr) in zip(BAD_OPTIONS, results, strict=True):
        assert status != 0 and re.search(f"ValueError: .*{message}", stderr), (argv, stderr[-500:])


@pytest.mark.skipif(not SHIPPED, reason="the shipped world model is missing")
def test_eval_script_is_the_training_evaluation_for_any_sampler(tmp_path):
    """``benchmarks/eval_world_model.py``: the training's held-out evaluation (episode seeds from
    1,000,000) of a finished model, one row per sampler given, the model's own by default; bad
    samplers and a folder without ``world_model.json`` are refused."""
    script = "benchmarks/eval_world_model.py"
    out, default_out = tmp_path / "eval.json", tmp_path / "default.json"
    argv = ["--model", str(DEFAULT_WORLD_MODEL), "--episodes", "1", "--frames", "2", "--workers", "1"]
    run_script(
        script, *argv, "--timesteps", "1000,500", "--shifts", "1.0,3.0", "--device", "cpu", "--json", str(out)
    )
    record = json.loads(out.read_text())
    samplers = [(row["denoising_timesteps"], row["shift"]) for row in record["samplers"]]
    assert samplers == [([1000, 500], 1.0), ([1000, 500], 3.0)]
    assert record["samplers"][0]["psnr"] != record["samplers"][1]["psnr"]
    assert record["chosen"]["shift"] == max(record["samplers"], key=lambda row: row["psnr"])["shift"]
    # the training's evaluation, in this process: the same figures
    frames, actions, levels = train.make_episodes(1, train.CONTEXT_FRAMES + 2, 1, seed_base=1_000_000)
    model = train.build_model(DEFAULT_WORLD_MODEL, False, CPU)
    trainer = train.Trainer(CPU)
    trainer.install(model)
    expected = train.evaluate(
        trainer, model, train.Data(frames, actions, levels, CPU), 2, [((1000, 500), 3.0)]
    )
    assert record["samplers"][1]["psnr_per_frame"] == expected["samplers"][0]["psnr_per_frame"]
    assert record["psnr_copy_last_context"] == expected["psnr_copy_last_context"]
    cases = [
        [*argv, "--device", "cpu", "--json", str(default_out)],
        [*argv, "--shifts", "0"],
        [*argv, "--shifts", "1,x"],
        [*argv, "--timesteps", "1000,x"],
        [*argv, "--timesteps", "1000,750;500,750"],
        ["--model", str(tmp_path)],
    ]
    (status, stderr), *refused = run_script_cases(script, cases)
    assert status == 0, stderr[-2000:]
    metadata = json.loads((DEFAULT_WORLD_MODEL / "world_model.json").read_text())
    default = json.loads(default_out.read_text())["samplers"]
    assert [(row["denoising_timesteps"], row["shift"]) for row in default] == [
        (metadata["denoising_timesteps"], metadata["shift"])
    ]
    messages = [
        r"--shifts must be > 0, got \[0.0\]",
        "--shifts must be comma-separated numbers, got '1,x'",
        "timesteps are comma-separated numbers, got '1000,x'",
        "denoising_timesteps must be strictly decreasing",
        "has no world_model.json",
    ]
    for (status, stderr), message in zip(refused, messages, strict=True):
        assert status != 0 and re.search(f"ValueError: .*{message}", stderr), (message, stderr[-500:])
