"""``make demo`` runs the world-model rollout (tested end to end in tests/test_world_model_rollout.py);
the earlier tiny Wan demo (``make demo-tiny``) on tiny settings, run as its own process with the
Triton kernels in the interpreter: files, report fields, and fidelity (vidaccel's dense attention
reproduces the stock clip)."""

import importlib.util
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import imageio.v2 as imageio
import pytest
from _helpers import run_script, run_script_cases

ROOT = Path(__file__).resolve().parents[1]
DEMO = "demos/tiny_wan_demo.py"
FRAMES, HEIGHT, WIDTH = 5, 32, 48


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["--out", str(out), "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]
    printed = run_script(
        DEMO, *argv, "--steps", "2", "--repeats", "1", "--seed", "3", env={"TRITON_INTERPRET": "1"}
    )
    report = json.loads((out / "report.json").read_text())
    return out, report, printed


def test_demo_writes_videos_and_report(demo_run):
    out, report, printed = demo_run
    assert printed.strip().endswith(f"wrote {', '.join(report['videos'].values())} and report.json to {out}/")
    suffix = ".mp4" if importlib.util.find_spec("imageio_ffmpeg") is not None else ".gif"
    assert report["videos"] == {name: name + suffix for name in ("stock", "vidaccel", "side_by_side")}
    for name, width in (("stock", WIDTH), ("vidaccel", WIDTH), ("side_by_side", 2 * WIDTH)):
        frames = imageio.mimread(out / report["videos"][name])
        assert len(frames) == FRAMES, name
        height, video_width = frames[0].shape[:2]
        # Upscaled by one integer factor for viewing, aspect ratio kept.
        assert height % HEIGHT == 0 and video_width == width * (height // HEIGHT), (name, frames[0].shape)


def test_demo_report_fields(demo_run):
    report = demo_run[1]
    settings = report["settings"]
    chosen = {key: settings[key] for key in ("frames", "height", "width", "steps", "seed")}
    assert chosen == {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "steps": 2, "seed": 3}
    assert settings["token_grid"] == [(FRAMES - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16]
    assert set(report["runs"]) == {"stock", "stock_sdpa_math", "vidaccel"}
    assert all(run["seconds"] > 0 for run in report["runs"].values())
    assert report["speedup"] == pytest.approx(
        report["runs"]["stock"]["seconds"] / report["runs"]["vidaccel"]["seconds"]
    )
    assert set(report["fidelity"]) == {"vidaccel", "stock_sdpa_math"}
    for fidelity in report["fidelity"].values():
        assert set(fidelity) == {"psnr_db", "identical", "ssim", "max_abs_diff"}
        assert fidelity["identical"] == (fidelity["psnr_db"] is None)


def _psnr(fidelity):
    return math.inf if fidelity["identical"] else fidelity["psnr_db"]


def test_demo_dense_processor_reproduces_stock(demo_run):
    report = demo_run[1]
    ours, floor = report["fidelity"]["vidaccel"], report["fidelity"]["stock_sdpa_math"]
    # Exact dense attention: vidaccel may differ from stock only by rounding, as another exact
    # attention (SDPA's math backend) does.
    assert _psnr(ours) >= _psnr(floor) - 6.0, (ours, floor)
    if report["dtype"] == "float32":
        assert _psnr(ours) > 60
        assert ours["ssim"] > 0.9999
        assert ours["max_abs_diff"] < 1e-3


def test_demo_rejects_bad_settings(tmp_path):
    bad = [
        (["--frames", "6"], "4k \\+ 1"),
        (["--height", "40"], "multiple of 16"),
        (["--steps", "0"], "steps"),
    ]
    results = run_script_cases(DEMO, [["--out", str(tmp_path), *argv] for argv, _ in bad])
    for (argv, message), (status, stderr) in zip(bad, results, strict=True):
        assert status == 2 and re.search(message, stderr), (argv, stderr[-500:])


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    "target, command",
    [
        ("demo", "demos/world_model_rollout.py --out out"),
        ("demo-tiny", "demos/tiny_wan_demo.py --out out/tiny"),
    ],
)
def test_make_targets_run_the_demos(target, command):
    # -n: print the recipe without running it (nor the install, whose commands it may print too).
    recipe = subprocess.run(
        ["make", "-n", "--no-print-directory", target], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert recipe.strip().splitlines()[-1] == f".venv/bin/python {command}", recipe
