"""The world-model scripts' command lines: the rollout script (``make demo``) end to end on a few
frames with the shipped model and its argument errors, and the benchmarks built on the same library
(the TempCache sweep, the long-rollout sweep and its pooling, the level ranges, the FlashBlock
schedule), each on a smoke run.

Every script runs as its own process with ``TRITON_INTERPRET=0``, as ``make demo`` runs them: every
op on its PyTorch reference (the Triton kernels have their own tests, and in the interpreter these
rollouts would take minutes). Flipping the variable inside this process instead would make kernel
modules imported meanwhile compile for a GPU that is not there. The library they share:
tests/test_evaluation.py, tests/test_media.py, tests/test_cli.py.
"""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from _helpers import run_script, run_script_cases
from PIL import Image

from vidaccel.metrics import psnr
from vidaccel.pipelines import evaluation as ev
from vidaccel.pipelines.game import ACTIONS
from vidaccel.pipelines.media import GAP, LABEL_HEIGHT, VIEW_SCALE
from vidaccel.pipelines.runs import METHODS
from vidaccel.pipelines.world_model import BEST_WORLD_MODEL

ROOT = Path(__file__).resolve().parents[1]
FRAMES, CONTEXT = 2, 1
CPU_DEFAULT_METHODS = ("dense", "tempcache", "flashblock")  # the rollout script's CPU default (make demo)
_run = run_script


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_model")
    argv = ["--frames", str(FRAMES), "--context", str(CONTEXT), "--seed", "5", "--out", str(out)]
    printed = _run("demos/world_model_rollout.py", *argv, "--frame-png", str(out / "readme_frame.png"))
    return out, json.loads((out / "report.json").read_text()), printed


def test_rollout_writes_video_plots_and_report(demo_run):
    out, report, printed = demo_run
    assert (out / "report.md").read_text().strip() == printed.strip()  # the Markdown report, printed last
    assert printed.startswith("# World-model rollout")
    # The embedded CPU default methods (what `make demo` runs), FlashBlock where this vidaccel has it.
    assert list(report["methods"]) == [m for m in CPU_DEFAULT_METHODS if m in METHODS]
    assert report["settings"]["frames"] == FRAMES and report["settings"]["context"] == CONTEXT
    # The demo's default model is the best one shipped (assets/world_model_long), with its sampler.
    assert Path(report["model"]["path"]) == ROOT / "assets" / "world_model_long" == BEST_WORLD_MODEL
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
    width = panels * 64 * VIEW_SCALE + (panels - 1) * GAP
    assert len(frames) == FRAMES and frames[0].shape == (
        64 * VIEW_SCALE + LABEL_HEIGHT,
        width,
        3,
    )
    with Image.open(files["frame_png"]) as frame:
        assert frame.size == (width, 64 * VIEW_SCALE + LABEL_HEIGHT)
    for key in ("latency_memory_plot", "psnr_plot", "alive_plot"):
        with Image.open(out / files[key]) as plot:
            assert plot.format == "PNG" and plot.size[0] > plot.size[1], key


def test_rollout_report_figures(demo_run):
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
        assert run["flagged"] == (run["loss_vs_dense_first32_db"] > ev.FLAG_DB)
        alive, level = run["alive"], run["alive_level"]
        assert alive["pass"] == (
            alive["nan_frames"] == 0
            and alive["mean_in_range"]
            and alive["std_in_range"]
            and alive["edge_in_range"]
        )
        # the level's range holds the world's: a frame inside the world's range is inside the level's
        for key in ev.ALIVE_STATISTICS:
            assert level[f"{key}_frames_in_range"] >= alive[f"{key}_frames_in_range"], (method, key)
        assert level["pass"] >= alive["pass"] and level["pass_mean_std"] >= level["pass"]

    # The truth and the copy-last-frame baseline, recomputed from the recorded actions.
    actions = report["actions"]
    assert actions["context"][0] == ACTIONS.index("noop") and len(actions["predicted"]) == FRAMES
    truth = ev.play(5, 0, actions["context"], actions["predicted"]).astype(np.float32) / 255.0
    copy_last = np.broadcast_to(truth[CONTEXT - 1], truth[CONTEXT:].shape)
    assert report["copy_last_frame"]["psnr_all"] == pytest.approx(psnr(copy_last, truth[CONTEXT:]))
    assert report["true_range"] == ev.true_frame_range(
        (truth * 255).round().astype(np.uint8), 5, 0
    )  # the clip's true frames and a long walk in the same world
    assert report["level_range"] == ev.joined_range(report["true_range"], ev.level_frame_range(0))
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
    assert bars["dense_beats_copy_last"] == (margin >= ev.COPY_LAST_MARGIN_DB)
    assert bars["alive"] == {m: run["alive"]["pass"] for m, run in runs.items()}
    assert bars["alive_level"] == {m: run["alive_level"]["pass"] for m, run in runs.items()}


BAD_ARGUMENTS = [
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
]


def test_rollout_rejects_bad_arguments(tmp_path):
    results = run_script_cases(
        "demos/world_model_rollout.py",
        [["--device", "cpu", "--out", str(tmp_path), *argv] for argv, _ in BAD_ARGUMENTS],
    )
    for (argv, message), (status, stderr) in zip(BAD_ARGUMENTS, results, strict=True):
        assert status == 2 and message in stderr, (argv, stderr[-500:])


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


def test_tempcache_sweep_quick(tmp_path):
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
        assert row["within_flag"] == (max(row["loss_first32_db"], row["loss_all_db"]) <= ev.FLAG_DB)
        assert math.isfinite(row["psnr_dense_all"])
    winner_line = printed[-2]  # the table, the winner, then where it wrote
    assert winner_line == f"winner: {report['winner']['name']} ({report['winner']['reason']})"
    assert out.with_suffix(".md").read_text().strip().endswith(winner_line)


def test_long_rollout_sweep_quick(tmp_path):
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
    bad = [
        (["--caches", "full,0"], "--caches items must be 'full' or an int >= 1"),
        (["--etas", "0,1.5"], "eta must be a float in [0, 1], got 1.5"),
        (["--timesteps", "1000,500;500,500"], "denoising_timesteps must be strictly decreasing"),
    ]
    results = run_script_cases(
        "benchmarks/bench_world_model_long.py", [["--quick", *argv, "--out", str(out)] for argv, _ in bad]
    )
    for (argv, message), (status, stderr) in zip(bad, results, strict=True):
        assert status != 0 and message in stderr, (argv, stderr[-500:])


def _check_pooling(report: dict, path: Path, tmp_path: Path) -> None:
    """pool_world_model_long.py on the sweep's report and a copy of it as another walk (its worlds'
    statistics shifted up by one, out of every range): the pooled counts are the two walks' sums, the
    first walk's equal to the bench's own; ``--level-worlds``; a repeated walk, a file that is no
    report or reports sharing no setting are refused (the pooling itself: tests/test_evaluation.py)."""
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
    assert ev.pool_reports([report], [report["rows"][1]["name"]])[0]["name"] == report["rows"][1]["name"]
    # --level-worlds: the bench's own level range (LEVEL_WORLDS worlds) again, then one world's: narrower
    script, outs = "benchmarks/pool_world_model_long.py", [tmp_path / f"pooled{i}.json" for i in range(3)]
    (tmp_path / "not_a_report.json").write_text('{"rows": []}')
    cases = [
        [str(path), "--json", str(outs[0])],
        [str(path), "--level-worlds", str(ev.LEVEL_WORLDS), "--json", str(outs[1])],
        [str(path), "--level-worlds", "1", "--json", str(outs[2])],
        [str(tmp_path / "not_a_report.json")],
        [str(path), str(path)],
    ]
    results = run_script_cases(script, cases)
    assert [status for status, _ in results] == [0, 0, 0, 2, 2], results
    assert "not_a_report.json is not a bench_world_model_long.py report" in results[3][1]
    assert "repeat" in results[4][1]
    stored, same, narrowed = (json.loads(out.read_text()) for out in outs)
    assert same == stored
    for narrow, wide in zip(narrowed, stored, strict=True):
        assert narrow["level"]["alive_worlds"] <= wide["level"]["alive_worlds"]
        assert sum(narrow["level"]["frames_out"].values()) >= sum(wide["level"]["frames_out"].values())
        assert narrow["world"] == wide["world"]  # each world's own range is untouched
    with pytest.raises(ValueError, match=r"walk\(s\) \[\d+\] repeat"):
        ev.pool_reports([report, report])
    renamed = json.loads(json.dumps(other))
    for row in renamed["rows"]:
        row["name"] += "-x"
    with pytest.raises(ValueError, match="share no setting"):
        ev.pool_reports([report, renamed])
    with pytest.raises(ValueError, match="not in every report"):
        ev.pool_reports([report], ["t9/full"])


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


def test_level_ranges_script_writes_the_stored_ranges(tmp_path):
    """``benchmarks/level_frame_ranges.py`` on 2 worlds of two levels: the stored file's first 2
    worlds of each, what it prints; bad options are refused."""
    out = tmp_path / "ranges.json"
    printed = _run(
        "benchmarks/level_frame_ranges.py",
        "--worlds",
        "2",
        "--levels",
        "0,2",
        "--workers",
        "1",
        "--out",
        str(out),
    )
    written = json.loads(out.read_text())
    assert written["worlds"] == 2 and written["reference_frames"] == ev.REFERENCE_FRAMES
    stored = json.loads(ev.LEVEL_RANGES.read_text())["levels"]
    for level in ("0", "2"):
        for key in ev.ALIVE_STATISTICS:
            np.testing.assert_allclose(written["levels"][level][key], stored[level][key][:2], rtol=1e-9)
    assert sorted(written["levels"]) == ["0", "2"]
    assert printed.splitlines()[0].startswith("level 0 (meadow), 2 worlds: mean ")
    cases = [
        [*argv, "--out", str(out)] for argv in (["--worlds", "0"], ["--levels", "4"], ["--workers", "0"])
    ]
    for status, stderr in run_script_cases("benchmarks/level_frame_ranges.py", cases):
        assert status == 2 and "must be" in stderr, stderr[-500:]


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
