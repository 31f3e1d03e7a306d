"""The world-model rollout script (``make demo``) end to end on a few frames with the shipped model,
its argument errors, and the TempCache sweep's smoke run.

Both scripts run as their own processes with ``TRITON_INTERPRET=0``, as ``make demo`` runs them:
every op on its PyTorch reference (the Triton kernels have their own tests, and in the interpreter
these rollouts would take minutes). Flipping the variable inside this process instead would make
kernel modules imported meanwhile compile for a GPU that is not there.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from _helpers import load_script
from PIL import Image

from vidaccel.metrics import psnr
from vidaccel.pipelines.game import ACTIONS, LEVELS, random_actions

ROOT = Path(__file__).resolve().parents[1]
FRAMES, CONTEXT = 2, 1


def _run(script: str, *argv: str) -> str:
    """Run ``script`` (a path under the repository) on the CPU with every op on its reference; its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def rollout():
    return load_script(ROOT / "demos" / "world_model_rollout.py")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_model")
    argv = ["--frames", str(FRAMES), "--context", str(CONTEXT), "--seed", "5", "--out", str(out)]
    printed = _run("demos/world_model_rollout.py", *argv, "--frame-png", str(out / "readme_frame.png"))
    return out, json.loads((out / "report.json").read_text()), printed


def test_rollout_writes_video_plots_and_report(demo_run, rollout):
    out, report, printed = demo_run
    assert (out / "report.md").read_text().strip() == printed.strip()  # the Markdown report, printed last
    assert printed.startswith("# World-model rollout")
    # The embedded CPU default methods (what `make demo` runs), FlashBlock where this vidaccel has it.
    assert list(report["methods"]) == [m for m in rollout.CPU_DEFAULTS["methods"] if m in rollout.METHODS]
    assert report["settings"]["frames"] == FRAMES and report["settings"]["context"] == CONTEXT
    # The demo's default model is the best one shipped (assets/world_model_long), with its sampler.
    assert Path(report["model"]["path"]) == ROOT / "assets" / "world_model_long" == rollout.BEST_WORLD_MODEL
    shipped = json.loads((ROOT / "assets" / "world_model_long" / "world_model.json").read_text())
    assert report["settings"]["sampler"] == {k: shipped[k] for k in ("denoising_timesteps", "shift")} | {
        "eta": shipped.get("eta", 1.0)
    }
    files = report["files"]
    capture = cv2.VideoCapture(str(out / files["video"]))
    frames = []
    while (frame := capture.read())[0]:
        frames.append(frame[1])
    capture.release()
    panels = 1 + len(report["methods"])  # truth | each method
    width = panels * 64 * rollout.VIEW_SCALE + (panels - 1) * rollout.GAP
    assert len(frames) == FRAMES and frames[0].shape == (
        64 * rollout.VIEW_SCALE + rollout.LABEL_HEIGHT,
        width,
        3,
    )
    with Image.open(files["frame_png"]) as frame:
        assert frame.size == (width, 64 * rollout.VIEW_SCALE + rollout.LABEL_HEIGHT)
    for key in ("latency_memory_plot", "psnr_plot", "alive_plot"):
        with Image.open(out / files[key]) as plot:
            assert plot.format == "PNG" and plot.size[0] > plot.size[1], key


def test_rollout_report_figures(demo_run, rollout):
    report = demo_run[1]
    runs = report["methods"]
    dense = runs["dense"]
    assert dense["speedup_vs_dense"] == 1.0 and dense["vs_dense"]["identical"] and not dense["flagged"]
    assert dense["merge_rate"] is None and 0.0 <= runs["tempcache"]["merge_rate"] <= 1.0
    for method, run in runs.items():
        assert len(run["chunks"]) == FRAMES and all(c["latency_s"] > 0 for c in run["chunks"]), method
        assert run["total_s"] == pytest.approx(sum(c["latency_s"] for c in run["chunks"]))
        assert run["speedup_vs_dense"] == pytest.approx(dense["total_s"] / run["total_s"])
        assert run["kv_cache_bytes"] > 0 and run["peak_gpu_bytes"] is None  # CPU: no GPU memory
        assert len(run["vs_truth"]["per_frame_psnr"]) == FRAMES
        assert run["flagged"] == (run["loss_vs_dense_first32_db"] > rollout.FLAG_DB)
        alive, level = run["alive"], run["alive_level"]
        assert alive["pass"] == (
            alive["nan_frames"] == 0
            and alive["mean_in_range"]
            and alive["std_in_range"]
            and alive["edge_in_range"]
        )
        # the level's range holds the world's: a frame inside the world's range is inside the level's
        for key in rollout.ALIVE_STATISTICS:
            assert level[f"{key}_frames_in_range"] >= alive[f"{key}_frames_in_range"], (method, key)
        assert level["pass"] >= alive["pass"] and level["pass_mean_std"] >= level["pass"]

    # The truth and the copy-last-frame baseline, recomputed from the recorded actions.
    actions = report["actions"]
    assert actions["context"][0] == ACTIONS.index("noop") and len(actions["predicted"]) == FRAMES
    truth = rollout.play(5, 0, actions["context"], actions["predicted"]).astype(np.float32) / 255.0
    copy_last = np.broadcast_to(truth[CONTEXT - 1], truth[CONTEXT:].shape)
    assert report["copy_last_frame"]["psnr_all"] == pytest.approx(psnr(copy_last, truth[CONTEXT:]))
    assert report["true_range"] == rollout.true_frame_range(
        (truth * 255).round().astype(np.uint8), 5, 0
    )  # the clip's true frames and a long walk in the same world
    assert report["level_range"] == rollout.joined_range(report["true_range"], rollout.level_frame_range(0))
    means = truth.mean(axis=(1, 2, 3))
    low, high = report["true_range"]["mean"]
    assert low <= means.min() and means.max() <= high
    # progress.json: each method's summary as it finished, the same figures as the final report
    progress = json.loads((demo_run[0] / "progress.json").read_text())
    assert list(progress) == list(runs)
    for method, summary in progress.items():
        run = runs[method]
        assert summary["total_s"] == run["total_s"] and summary["kv_cache_bytes"] == run["kv_cache_bytes"]
        assert summary["psnr_all"] == pytest.approx(run["vs_truth"]["psnr_all"])
        assert summary["alive"]["pass"] == run["alive"]["pass"]
        assert summary["alive_level"] == {
            k: v for k, v in run["alive_level"].items() if not k.startswith("per_")
        }
    bars = report["quality_bars"]
    margin = dense["vs_truth"]["psnr_first32"] - report["copy_last_frame"]["psnr_first32"]
    assert bars["dense_over_copy_last_db"] == pytest.approx(margin)
    assert bars["dense_beats_copy_last"] == (margin >= rollout.COPY_LAST_MARGIN_DB)
    assert bars["alive"] == {m: run["alive"]["pass"] for m, run in runs.items()}
    assert bars["alive_level"] == {m: run["alive_level"]["pass"] for m, run in runs.items()}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "dense,bogus"], "'bogus' is not"),
        (["--methods", "dense,rolling+tempcache"], "rolling cannot be combined with tempcache"),
        (["--methods", "dense,dense"], "lists a method twice"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--frames", "2", "--frame-index", "2"], "--frame-index must be in"),
        (["--actions", "up,jump", "--frames", "2"], "unknown action 'jump' at index 1; allowed: noop"),
        (["--actions", "up,down,left", "--frames", "2"], "expected 2 actions"),
        (["--context", "0"], "--context must be a positive multiple"),
        (["--timesteps", "1000,250,500"], "--timesteps: denoising_timesteps must be strictly decreasing"),
        (["--shift", "0"], "--shift must be a float in (0, inf), got 0.0"),
        (["--shift", "nan"], "--shift must be a float in (0, inf), got nan"),
    ],
)
def test_rollout_rejects_bad_arguments(rollout, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        rollout.main(["--device", "cpu", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_rollout_shift(demo_run, tmp_path):
    """``--shift`` reaches the sampler: the report records it, and the same rollout (world, seed,
    actions) with the sigmas warped otherwise predicts other frames."""
    own = demo_run[1]["settings"]["sampler"]["shift"]  # the default model's (1.25 for the long model)
    other = 1.0 if own != 1.0 else 1.25
    argv = ["--frames", str(FRAMES), "--context", str(CONTEXT), "--seed", "5", "--methods", "dense"]
    _run("demos/world_model_rollout.py", *argv, "--shift", str(other), "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["sampler"]["shift"] == other
    shifted = report["methods"]["dense"]["vs_truth"]["per_frame_psnr"]
    assert shifted != demo_run[1]["methods"]["dense"]["vs_truth"]["per_frame_psnr"]
    assert all(math.isfinite(v) for v in shifted)


def test_rollout_actions_sources(rollout, tmp_path):
    context, predicted = rollout.rollout_actions("scripted", 4, 6, seed=0)
    assert len(context) == 4 and len(predicted) == 6 and context[0] == 0  # the reset frame's noop
    assert rollout.rollout_actions("random", 4, 6, seed=1) == rollout.rollout_actions("random", 4, 6, seed=1)
    path = tmp_path / "actions.json"
    path.write_text(json.dumps(["up", "left", 4]))
    assert rollout.rollout_actions(str(path), 2, 3, seed=0)[1] == [1, 3, 4]
    path.write_text("up\nsideways\n")
    with pytest.raises(ValueError, match="unknown action 'sideways'"):
        rollout.rollout_actions(str(path), 2, 2, seed=0)


def test_parse_methods_combinations():
    long_rollout = load_script(ROOT / "demos" / "long_rollout.py")
    known, combinable = ("dense", "a", "b"), ("a", "b")
    parsed = long_rollout.parse_methods(" dense, a + b ,b", known, combinable=combinable)
    assert parsed == ["dense", "a+b", "b"]
    for spec in ("dense+a", "a+a", "a,c", " , "):
        with pytest.raises(ValueError, match="--methods"):
            long_rollout.parse_methods(spec, known, combinable=combinable)
    with pytest.raises(ValueError, match="'a\\+b' is not"):
        long_rollout.parse_methods("a+b", known)  # no combinations unless allowed


def test_tempcache_sweep_quick(rollout, tmp_path):
    out = tmp_path / "sweep.json"
    grid = [
        "--thresholds",
        "0.95",
        "--scopes",
        "local,previous_frame",
        "--match-keys",
        "pre_rotary",
        "--per-head",
        "true",
    ]
    # Two worlds in one batch; a small TempCache budget keeps the CPU buffers small (the sinks and a frame fit).
    argv = ["--quick", "--frames", "2", "--seeds", "2", "--max-tokens", "2048", *grid, "--out", str(out)]
    printed = _run("benchmarks/bench_world_model.py", *argv).strip().splitlines()
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["summary"]]
    assert names == ["dense", "pre/head/local/τ0.95", "pre/head/previous_frame/τ0.95"]
    assert report["winner"]["name"] in names[1:]
    assert [seed["seed"] for seed in report["per_seed"]] == [0, 1]  # two worlds, one batch
    assert report["tempcache_fixed"]["max_tokens"] == 2048
    dense = report["summary"][0]
    assert dense["loss_first32_db"] == 0 and dense["cache_fraction"] == 1.0 and dense["merge_rate"] is None
    for row in report["summary"][1:]:
        assert 0.0 <= row["merge_rate"] <= 1.0 and row["cache_fraction"] <= 1.0
        assert row["within_flag"] == (max(row["loss_first32_db"], row["loss_all_db"]) <= rollout.FLAG_DB)
        assert math.isfinite(row["psnr_dense_all"])
    winner_line = printed[-2]  # the table, the winner, then where it wrote
    assert winner_line == f"winner: {report['winner']['name']} ({report['winner']['reason']})"
    assert out.with_suffix(".md").read_text().strip().endswith(winner_line)


def test_long_rollout_sweep_quick(rollout, tmp_path):
    """The stability sweep: one row per (context timestep, cache) setting, each world's first exit
    from the true range consistent with its per-frame statistics, and the winner rule."""
    out = tmp_path / "long.json"
    argv = ["--quick", "--frames", "3", "--seeds", "2", "--context-timesteps", "0,500", "--caches", "full,8"]
    printed = _run("benchmarks/bench_world_model_long.py", *argv, "--out", str(out)).strip().splitlines()
    report = json.loads(out.read_text())
    assert [row["name"] for row in report["rows"]] == ["t0/full", "t500/full", "t0/8", "t500/8"]
    for row in report["rows"]:
        assert row["worlds"] == 2 and 0 <= row["alive_worlds"] <= 2
        for world, bounds in zip(row["per_world"], report["ranges"], strict=True):
            inside = np.ones(3, dtype=bool)
            for key in ("mean", "std", "edge"):
                values = np.array(world[f"per_frame_{key}"])
                inside &= (values >= bounds[key][0]) & (values <= bounds[key][1])
            assert world["alive"] == bool(inside.all())
            assert world["first_exit"] == (None if inside.all() else int(np.argmin(inside)))
        for key in ("mean", "std", "edge"):  # the share of frames in range, over every world's frames
            inside = [
                bounds[key][0] <= value <= bounds[key][1]
                for world, bounds in zip(row["per_world"], report["ranges"], strict=True)
                for value in world[f"per_frame_{key}"]
            ]
            assert row["in_range"][key] == pytest.approx(np.mean(inside))
        # the level's range holds the world's, so the lenient check passes whatever the strict one does
        for world, level, exit_level, bounds in zip(
            row["per_world"],
            report["level_ranges"],
            row["level"]["first_exits"],
            report["ranges"],
            strict=True,
        ):
            for key in ("mean", "std", "edge"):
                assert level[key][0] <= bounds[key][0] and bounds[key][1] <= level[key][1]
            assert exit_level is None if world["alive"] else True
            assert exit_level is None or world["first_exit"] is not None and exit_level >= world["first_exit"]
        assert row["level"]["alive_worlds"] >= row["alive_worlds"]
        assert all(row["level"]["in_range"][k] >= row["in_range"][k] for k in ("mean", "std", "edge"))
        # frames below / above the level's range per statistic, and the mean-and-std-only reading
        below_above, mean_std_alive = {}, 0
        for world, level in zip(row["per_world"], report["level_ranges"], strict=True):
            fine = np.ones(3, dtype=bool)
            for key in ("mean", "std", "edge"):
                values = np.array(world[f"per_frame_{key}"])
                below_above[f"{key}_below"] = below_above.get(f"{key}_below", 0) + int(
                    (values < level[key][0]).sum()
                )
                below_above[f"{key}_above"] = below_above.get(f"{key}_above", 0) + int(
                    (values > level[key][1]).sum()
                )
                if key != "edge":
                    fine &= (values >= level[key][0]) & (values <= level[key][1])
            mean_std_alive += bool(fine.all())
            below_above["nan"] = below_above.get("nan", 0) + sum(v is None for v in world["per_frame_mean"])
        assert row["level"]["frames_out"] == below_above
        assert row["level"]["alive_worlds_mean_std"] == mean_std_alive >= row["level"]["alive_worlds"]
    # a full cache and an 8-frame window hold the same 4 context + 3 frames: identical rollouts
    full, window = report["rows"][0], report["rows"][2]
    assert full["psnr_all"] == window["psnr_all"]
    alive = [r for r in report["rows"] if r["alive_worlds"] == r["worlds"]]
    expected = max(alive, key=lambda r: r["psnr_first32"])["name"] if alive else None
    if expected is not None:
        assert report["winner"]["name"] == expected
    assert printed[-2] == f"winner: {report['winner']['name']} ({report['winner']['reason']})"
    _check_pooling(report, out, tmp_path)
    with pytest.raises(AssertionError, match="--caches items must be 'full' or an int >= 1"):
        _run("benchmarks/bench_world_model_long.py", "--quick", "--caches", "full,0", "--out", str(out))
    with pytest.raises(AssertionError, match=r"eta must be a float in \[0, 1\], got 1.5"):
        _run("benchmarks/bench_world_model_long.py", "--quick", "--etas", "0,1.5", "--out", str(out))
    with pytest.raises(AssertionError, match="denoising_timesteps must be strictly decreasing"):
        _run(
            "benchmarks/bench_world_model_long.py",
            "--quick",
            "--timesteps",
            "1000,500;500,500",
            "--out",
            str(out),
        )


def _check_pooling(report: dict, path: Path, tmp_path: Path) -> None:
    """pool_world_model_long.py on the sweep's report and a copy of it as another walk (its worlds'
    statistics shifted up by one, out of every range): the pooled counts are the two walks' sums, the
    first walk's equal to the bench's own; a repeated walk or reports sharing no setting are refused."""
    pool = load_script(ROOT / "benchmarks" / "pool_world_model_long.py")
    other = json.loads(json.dumps(report))
    other["settings"]["seeds_list"] = [s + 100 for s in report["settings"]["seeds_list"]]
    for row in other["rows"]:
        for world in row["per_world"]:
            for key in ("mean", "std", "edge"):
                world[f"per_frame_{key}"] = [v + 1 for v in world[f"per_frame_{key}"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    pooled_json = tmp_path / "pooled.json"
    printed = _run(
        "benchmarks/pool_world_model_long.py",
        str(path),
        str(tmp_path / "other.json"),
        "--json",
        str(pooled_json),
    )
    pooled = json.loads(pooled_json.read_text())
    assert [p["name"] for p in pooled] == [row["name"] for row in report["rows"]]
    for row, p in zip(report["rows"], pooled, strict=True):
        frames = sum(len(w["per_frame_mean"]) for w in row["per_world"])
        assert p["walks"] == [report["settings"]["seeds_list"][0], report["settings"]["seeds_list"][0] + 100]
        assert p["worlds"] == 2 * row["worlds"] and p["frames"] == 2 * frames
        assert p["psnr_first32"] == [row["psnr_first32"], row["psnr_first32"]]
        assert p["world"]["alive_worlds"] == row["alive_worlds"]  # the shifted walk: no world alive
        assert p["level"]["alive_worlds"] == row["level"]["alive_worlds"]
        assert p["level"]["alive_worlds_mean_std"] == row["level"]["alive_worlds_mean_std"]
        for key in ("mean", "std", "edge"):
            assert p["world"]["in_range"][key] == pytest.approx(row["in_range"][key] / 2)
            assert p["level"]["frames_out"][f"{key}_below"] == row["level"]["frames_out"][f"{key}_below"]
            assert (
                p["level"]["frames_out"][f"{key}_above"]
                == row["level"]["frames_out"][f"{key}_above"] + frames
            )
        assert p["level"]["first_exits"][row["worlds"] :] == [0] * row["worlds"]
        assert f"| {row['name']} | " in printed
    assert pool.pool_reports([report], [report["rows"][1]["name"]])[0]["name"] == report["rows"][1]["name"]
    # --level-worlds: the bench's own level range (LEVEL_WORLDS worlds) again, then one world's: narrower
    stored = pool.main([str(path)])
    assert (
        pool.main(
            [
                str(path),
                "--level-worlds",
                str(load_script(ROOT / "demos" / "world_model_rollout.py").LEVEL_WORLDS),
            ]
        )
        == stored
    )
    for narrow, wide in zip(pool.main([str(path), "--level-worlds", "1"]), stored, strict=True):
        assert narrow["level"]["alive_worlds"] <= wide["level"]["alive_worlds"]
        assert sum(narrow["level"]["frames_out"].values()) >= sum(wide["level"]["frames_out"].values())
        assert narrow["world"] == wide["world"]  # each world's own range is untouched
    with pytest.raises(ValueError, match=r"walk\(s\) \[\d+\] repeat"):
        pool.pool_reports([report, report])
    renamed = json.loads(json.dumps(other))
    for row in renamed["rows"]:
        row["name"] += "-x"
    with pytest.raises(ValueError, match="share no setting"):
        pool.pool_reports([report, renamed])
    with pytest.raises(ValueError, match="not in every report"):
        pool.pool_reports([report], ["t9/full"])
    (tmp_path / "not_a_report.json").write_text('{"rows": []}')
    with pytest.raises(AssertionError, match="not_a_report.json is not a bench_world_model_long.py report"):
        _run("benchmarks/pool_world_model_long.py", str(tmp_path / "not_a_report.json"))


def test_long_rollout_sweep_samplers(tmp_path):
    """``--timesteps``: one row per sampler, each rolled out with its own timesteps: a sampler whose
    first steps are another's, plus a lower last step, gives another rollout."""
    out = tmp_path / "samplers.json"
    argv = ["--quick", "--frames", "2", "--context-timesteps", "0", "--caches", "full"]
    _run(
        "benchmarks/bench_world_model_long.py",
        *argv,
        "--timesteps",
        "1000,500;1000,500,100",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"] for row in rows] == ["t0/full/ts1000-500", "t0/full/ts1000-500-100"]
    assert [row["timesteps"] for row in rows] == [[1000.0, 500.0], [1000.0, 500.0, 100.0]]
    assert rows[0]["psnr_all"] != rows[1]["psnr_all"]


def test_stored_level_ranges_are_the_walks_ranges(rollout, tmp_path):
    """``assets/level_frame_ranges.json`` holds each world's walk range for 512 worlds of every level:
    recomputed worlds match it, the level's range joins them, and a file that cannot serve a request
    (too few worlds, other walks, missing) is not used."""
    stored = json.loads(rollout.LEVEL_RANGES.read_text())
    assert stored["reference_frames"] == rollout.REFERENCE_FRAMES and stored["worlds"] == rollout.LEVEL_WORLDS
    assert sorted(stored["levels"]) == [str(level) for level in range(len(LEVELS))]
    for level, seed in ((0, 0), (0, rollout.LEVEL_WORLDS - 1), (3, 7)):
        entry = stored["levels"][str(level)]
        recomputed = rollout.walk_range(seed, level)
        for key in rollout.ALIVE_STATISTICS:
            assert len(entry[key]) == rollout.LEVEL_WORLDS
            np.testing.assert_allclose(entry[key][seed], recomputed[key], rtol=1e-9)
    level = rollout.level_frame_range(0)
    for key in rollout.ALIVE_STATISTICS:
        lows, highs = zip(*stored["levels"]["0"][key], strict=True)
        assert level[key] == [min(lows), max(highs)]
    # more worlds: a wider (or equal) range; 512 worlds reach lower stds than 32 do
    few = rollout.level_frame_range(0, worlds=32)
    assert all(level[k][0] <= few[k][0] and few[k][1] <= level[k][1] for k in rollout.ALIVE_STATISTICS)
    assert level["std"][0] < few["std"][0]
    assert rollout.stored_walk_ranges(0, rollout.LEVEL_WORLDS + 1) is None
    assert rollout.stored_walk_ranges(0, 2, path=tmp_path / "missing.json") is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps(stored | {"reference_frames": rollout.REFERENCE_FRAMES + 1}))
    assert rollout.stored_walk_ranges(0, 2, path=other) is None


def test_level_ranges_script_writes_the_stored_ranges(tmp_path):
    """``benchmarks/level_frame_ranges.py`` on 2 worlds of two levels: the stored file's first 2
    worlds of each; bad options are refused."""
    script = load_script(ROOT / "benchmarks" / "level_frame_ranges.py")
    out = tmp_path / "ranges.json"
    written = script.main(["--worlds", "2", "--levels", "0,2", "--workers", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == written and written["worlds"] == 2
    stored = json.loads(script.LEVEL_RANGES.read_text())["levels"]
    for level in ("0", "2"):
        for key in script.ALIVE_STATISTICS:
            np.testing.assert_allclose(written["levels"][level][key], stored[level][key][:2], rtol=1e-9)
    assert sorted(written["levels"]) == ["0", "2"]
    for argv in (["--worlds", "0"], ["--levels", "4"]):
        with pytest.raises(SystemExit):
            script.main([*argv, "--out", str(out)])


def test_level_frame_range_spans_every_worlds_true_frames(rollout):
    """The level's range holds each of its worlds' walks; worlds differ, so it is wider than one's."""
    level = rollout.level_frame_range(0, worlds=3)
    for seed in range(3):
        walk = rollout.play(seed, 0, [0], rollout.random_actions(rollout.REFERENCE_FRAMES, seed=seed + 1))
        for key, values in rollout.frame_statistics(walk / 255.0).items():
            assert level[key][0] <= values.min() and values.max() <= level[key][1]
    world = rollout.true_frame_range(np.zeros((0, 64, 64, 3), np.uint8), 1, 0)  # world 1: its walk alone
    assert level["std"][1] - level["std"][0] > world["std"][1] - world["std"][0]
    assert rollout.joined_range({"a": [0, 1]}, {"a": [-1, 0.5]}) == {"a": [-1, 1]}


def test_rolling_window_defaults_to_the_models_recommendation(rollout):
    """``--window-frames``/``--sink-frames`` left unset take the model's ``recommended_rollout``
    (else 21 and 3); given ones stay."""
    recommended = {"recommended_rollout": {"max_cache_frames": 8, "sink_frames": 4}}
    for given, metadata, expected in (
        ((None, None), recommended, (8, 4)),
        ((None, None), {}, (21, 3)),
        ((12, None), recommended, (12, 4)),
        ((30, 2), recommended, (30, 2)),
    ):
        args = argparse.Namespace(window_frames=given[0], sink_frames=given[1])
        rollout.rollout_window(args, metadata)
        assert (args.window_frames, args.sink_frames) == expected


def test_parse_timesteps(rollout):
    assert rollout.parse_timesteps("1000, 750,500,250,150") == [1000.0, 750.0, 500.0, 250.0, 150.0]
    for text in ("1000,1000", "500,750", "1000,0", "1200,500", "1000,x", ""):
        with pytest.raises(ValueError, match="timesteps"):
            rollout.parse_timesteps(text)


def test_flashblock_schedule_quick(tmp_path):
    """The refresh-schedule comparison: dense and the three schedules on one world, each against the
    truth and the dense rollout, deltas consistent with the per-world figures."""
    out = tmp_path / "schedule.json"
    printed = (
        _run("benchmarks/bench_flashblock_schedule.py", "--quick", "--out", str(out)).strip().splitlines()
    )
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["summary"]]
    assert names == ["dense", "r2", "r3+last", "r2+last"]
    dense = report["per_seed"]["dense"]
    for row in report["summary"]:
        per_seed = report["per_seed"][row["name"]]
        assert row["delta_vs_dense_db"] == [
            r["psnr_vs_truth"] - d["psnr_vs_truth"] for r, d in zip(per_seed, dense, strict=True)
        ]
        if row["name"] == "dense":
            assert row["psnr_vs_dense"] is None and row["delta_vs_dense_db"] == [0.0]
        else:
            assert all(math.isfinite(v) for v in row["psnr_vs_dense"])
    assert printed[-1].startswith("| r2+last | 0, 2, 3 |")


def test_alive_catches_texture_with_the_true_mean_and_std(rollout):
    """A frame collapsed to texture (a true frame's pixels shuffled: mean and std exactly the truth's)
    fails the stays-alive check on edge strength; a blurred one too; the true frames pass."""
    truth = rollout.play(3, 0, [0], random_actions(40, seed=3))
    true_range = rollout.true_frame_range(truth, 3, 0)
    frames = truth[1:].astype(np.float32) / 255.0
    assert rollout._alive(frames, true_range)["alive"]["pass"]
    rng = np.random.default_rng(0)
    texture = frames.copy()
    flat = texture[-1].reshape(-1, 3)
    texture[-1] = flat[rng.permutation(len(flat))].reshape(texture[-1].shape)
    stats = rollout.frame_statistics(texture[-1:])
    np.testing.assert_allclose(stats["mean"], rollout.frame_statistics(frames[-1:])["mean"], rtol=1e-5)
    alive = rollout._alive(texture, true_range)["alive"]
    assert alive["mean_in_range"] and alive["std_in_range"]
    assert not alive["edge_in_range"] and not alive["pass"]
    assert alive["pass_mean_std"], "mean and std alone cannot see texture"
    assert alive["per_frame_edge"][-1] > true_range["edge"][1]
    assert alive["first_exit"] == len(frames) - 1, "the first frame outside the range: the texture"
    counts = {key: alive[f"{key}_frames_in_range"] for key in rollout.ALIVE_STATISTICS}
    assert counts == {"mean": len(frames), "std": len(frames), "edge": len(frames) - 1}
    assert (alive["edge_frames_above"], alive["edge_frames_below"], alive["std_frames_below"]) == (1, 0, 0)
    blurred = frames.copy()
    blurred[-1] = blurred[-1].mean(axis=(0, 1), keepdims=True)  # flat: no structure at all
    blurred_alive = rollout._alive(blurred, true_range)["alive"]
    assert not blurred_alive["edge_in_range"]
    assert (blurred_alive["edge_frames_below"], blurred_alive["std_frames_below"]) == (1, 1)
    nan = frames.copy()
    nan[0, 0, 0, 0] = np.nan
    nan_alive = rollout._alive(nan, true_range)["alive"]
    assert nan_alive["nan_frames"] == 1 and nan_alive["first_exit"] == 0 and not nan_alive["pass"]
    assert not nan_alive["pass_mean_std"]
    assert all(nan_alive[f"{key}_frames_in_range"] == len(frames) - 1 for key in rollout.ALIVE_STATISTICS)
    assert all(
        nan_alive[f"{key}_frames_{side}"] == 0
        for key in rollout.ALIVE_STATISTICS
        for side in ("below", "above")
    )
    assert rollout._alive(frames, true_range)["alive"]["first_exit"] is None
    # against a wider range (the level's) the blurred frame's std is back in range, its edge is not
    wider = {key: [low * 0.5, high] for key, (low, high) in true_range.items()}
    both = rollout._alive(blurred, true_range, wider)
    assert both["alive"] == blurred_alive and both["alive_level"]["std_in_range"]
    assert both["alive_level"]["edge_frames_below"] == 1 and not both["alive_level"]["pass"]
