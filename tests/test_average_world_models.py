"""The weight average of two world models (``vidaccel.pipelines.training_run.average_world_models``)
is exact at the ends and the bf16 mean between them, loads as a ``WorldModelPipeline`` that rolls out,
and refuses bad input; ``demos/average_world_models.py`` is its command line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import run_script_cases
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from vidaccel.pipelines import WorldModelPipeline
from vidaccel.pipelines import training_run as soup
from vidaccel.pipelines.world_model import default_metadata, world_model_config

SCRIPT = "demos/average_world_models.py"
TINY = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2)


def _model(folder: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    WanTransformer3DModel.from_config(world_model_config() | TINY | config).save_pretrained(folder)
    (folder / "world_model.json").write_text(json.dumps(default_metadata() | {"training": {"seed": seed}}))
    return folder


def test_average_is_exact_at_the_ends_and_the_mean_between(tmp_path):
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    wa, wb = load_file(a / soup.WEIGHTS), load_file(b / soup.WEIGHTS)
    for alpha, expected in ((0.0, wa), (1.0, wb)):
        out = soup.average_world_models(a, b, alpha, tmp_path / f"end{alpha}")
        got = load_file(out / soup.WEIGHTS)
        assert all(torch.equal(got[k], expected[k].to(torch.bfloat16)) for k in expected)
    out = soup.average_world_models(a, b, 0.25, tmp_path / "mix")
    got = load_file(out / soup.WEIGHTS)
    for key in wa:
        assert got[key].dtype == torch.bfloat16
        torch.testing.assert_close(got[key].float(), 0.75 * wa[key] + 0.25 * wb[key], rtol=2**-8, atol=1e-6)
    meta = json.loads((out / "world_model.json").read_text())
    assert meta["training"]["average"]["alpha"] == 0.25 and meta["training"]["second_training"] == {"seed": 1}
    assert meta["denoising_timesteps"] == default_metadata()["denoising_timesteps"]
    pipe = WorldModelPipeline.from_pretrained_world_model(out, device="cpu")
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    video = pipe(frames, ["left"], 1, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 1, 64, 64, 3) and np.isfinite(video).all()


def test_bad_input_raises_value_error(tmp_path):
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\], got 1.5"):
        soup.average_world_models(a, b, 1.5, tmp_path / "out")
    with pytest.raises(ValueError, match="is not a world-model folder: it has no"):
        soup.average_world_models(a, tmp_path, 0.5, tmp_path / "out")
    other = _model(tmp_path / "c", 2, num_layers=3)
    with pytest.raises(ValueError, match="different configs"):
        soup.average_world_models(a, other, 0.5, tmp_path / "out")


def test_command_line(tmp_path):
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    ok, bad = run_script_cases(
        SCRIPT,
        [
            [str(a), str(b), "--alpha", "0.5", "--out", str(tmp_path / "mix")],
            [str(a), str(b), "--alpha", "-0.1", "--out", str(tmp_path / "bad")],
        ],
    )
    assert ok[0] == 0, ok[1][-2000:]
    meta = json.loads((tmp_path / "mix" / "world_model.json").read_text())
    assert meta["training"]["average"] == {"first": str(a), "second": str(b), "alpha": 0.5}
    assert bad[0] == 2 and r"alpha must be a float in [0, 1], got -0.1" in bad[1]
    assert not (tmp_path / "bad").exists()
