"""World-model evaluation (``vidaccel.pipelines.evaluation`` and ``.runs``): the actions and true
frames of a rollout, the stays-alive frame-range checks (the world's and the level's ranges, the
stored level ranges), the comparison with dense and the quality bars, and the pooling of long-rollout
reports. The scripts that use them: tests/test_world_model_rollout.py."""

import json

import numpy as np
import pytest

from vidaccel.metrics import frame_statistics
from vidaccel.pipelines import evaluation as ev
from vidaccel.pipelines.game import LEVELS, random_actions


def test_rollout_actions_sources(tmp_path):
    context, predicted = ev.rollout_actions("scripted", 4, 6, seed=0)
    assert len(context) == 4 and len(predicted) == 6 and context[0] == 0  # the reset frame's noop
    assert ev.rollout_actions("random", 4, 6, seed=1) == ev.rollout_actions("random", 4, 6, seed=1)
    path = tmp_path / "actions.json"
    path.write_text(json.dumps(["up", "left", 4]))
    assert ev.rollout_actions(str(path), 2, 3, seed=0)[1] == [1, 3, 4]
    path.write_text("up\nsideways\n")
    with pytest.raises(ValueError, match="unknown action 'sideways'"):
        ev.rollout_actions(str(path), 2, 2, seed=0)


def test_stored_level_ranges_are_the_walks_ranges(tmp_path):
    """``assets/level_frame_ranges.json`` holds each world's walk range for 512 worlds of every level:
    recomputed worlds match it, the level's range joins them, and a file that cannot serve a request
    (too few worlds, other walks, missing) is not used."""
    stored = json.loads(ev.LEVEL_RANGES.read_text())
    assert stored["reference_frames"] == ev.REFERENCE_FRAMES and stored["worlds"] == ev.LEVEL_WORLDS
    assert sorted(stored["levels"]) == [str(level) for level in range(len(LEVELS))]
    for level, seed in ((0, 0), (0, ev.LEVEL_WORLDS - 1), (3, 7)):
        entry = stored["levels"][str(level)]
        recomputed = ev.walk_range(seed, level)
        for key in ev.ALIVE_STATISTICS:
            assert len(entry[key]) == ev.LEVEL_WORLDS
            np.testing.assert_allclose(entry[key][seed], recomputed[key], rtol=1e-9)
    level = ev.level_frame_range(0)
    for key in ev.ALIVE_STATISTICS:
        lows, highs = zip(*stored["levels"]["0"][key], strict=True)
        assert level[key] == [min(lows), max(highs)]
    # more worlds: a wider (or equal) range; 512 worlds reach lower stds than 32 do
    few = ev.level_frame_range(0, worlds=32)
    assert all(level[k][0] <= few[k][0] and few[k][1] <= level[k][1] for k in ev.ALIVE_STATISTICS)
    assert level["std"][0] < few["std"][0]
    assert ev.stored_walk_ranges(0, ev.LEVEL_WORLDS + 1) is None
    assert ev.stored_walk_ranges(0, 2, path=tmp_path / "missing.json") is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps(stored | {"reference_frames": ev.REFERENCE_FRAMES + 1}))
    assert ev.stored_walk_ranges(0, 2, path=other) is None


def test_level_frame_range_spans_every_worlds_true_frames():
    """The level's range holds each of its worlds' walks; worlds differ, so it is wider than one's."""
    level = ev.level_frame_range(0, worlds=3)
    for seed in range(3):
        walk = ev.play(seed, 0, [0], random_actions(ev.REFERENCE_FRAMES, seed=seed + 1))
        for key, values in frame_statistics(walk / 255.0).items():
            assert level[key][0] <= values.min() and values.max() <= level[key][1]
    world = ev.true_frame_range(np.zeros((0, 64, 64, 3), np.uint8), 1, 0)  # world 1: its walk alone
    assert level["std"][1] - level["std"][0] > world["std"][1] - world["std"][0]
    assert ev.joined_range({"a": [0, 1]}, {"a": [-1, 0.5]}) == {"a": [-1, 1]}


def test_alive_catches_texture_with_the_true_mean_and_std():
    """A frame collapsed to texture (a true frame's pixels shuffled: mean and std exactly the truth's)
    fails the stays-alive check on edge strength; a blurred one too; the true frames pass."""
    truth = ev.play(3, 0, [0], random_actions(40, seed=3))
    true_range = ev.true_frame_range(truth, 3, 0)
    frames = truth[1:].astype(np.float32) / 255.0
    assert ev.alive(frames, true_range)["alive"]["pass"]
    rng = np.random.default_rng(0)
    texture = frames.copy()
    flat = texture[-1].reshape(-1, 3)
    texture[-1] = flat[rng.permutation(len(flat))].reshape(texture[-1].shape)
    stats = frame_statistics(texture[-1:])
    np.testing.assert_allclose(stats["mean"], frame_statistics(frames[-1:])["mean"], rtol=1e-5)
    alive = ev.alive(texture, true_range)["alive"]
    assert alive["mean_in_range"] and alive["std_in_range"]
    assert not alive["edge_in_range"] and not alive["pass"]
    assert alive["pass_mean_std"], "mean and std alone cannot see texture"
    assert alive["per_frame_edge"][-1] > true_range["edge"][1]
    assert alive["first_exit"] == len(frames) - 1, "the first frame outside the range: the texture"
    counts = {key: alive[f"{key}_frames_in_range"] for key in ev.ALIVE_STATISTICS}
    assert counts == {"mean": len(frames), "std": len(frames), "edge": len(frames) - 1}
    assert (alive["edge_frames_above"], alive["edge_frames_below"], alive["std_frames_below"]) == (1, 0, 0)
    blurred = frames.copy()
    blurred[-1] = blurred[-1].mean(axis=(0, 1), keepdims=True)  # flat: no structure at all
    blurred_alive = ev.alive(blurred, true_range)["alive"]
    assert not blurred_alive["edge_in_range"]
    assert (blurred_alive["edge_frames_below"], blurred_alive["std_frames_below"]) == (1, 1)
    nan = frames.copy()
    nan[0, 0, 0, 0] = np.nan
    nan_alive = ev.alive(nan, true_range)["alive"]
    assert nan_alive["nan_frames"] == 1 and nan_alive["first_exit"] == 0 and not nan_alive["pass"]
    assert not nan_alive["pass_mean_std"]
    assert all(nan_alive[f"{key}_frames_in_range"] == len(frames) - 1 for key in ev.ALIVE_STATISTICS)
    assert all(
        nan_alive[f"{key}_frames_{side}"] == 0 for key in ev.ALIVE_STATISTICS for side in ("below", "above")
    )
    assert ev.alive(frames, true_range)["alive"]["first_exit"] is None
    # against a wider range (the level's) the blurred frame's std is back in range, its edge is not
    wider = {key: [low * 0.5, high] for key, (low, high) in true_range.items()}
    both = ev.alive(blurred, true_range, wider)
    assert both["alive"] == blurred_alive and both["alive_level"]["std_in_range"]
    assert both["alive_level"]["edge_frames_below"] == 1 and not both["alive_level"]["pass"]


def test_level_ranges_are_the_stored_ranges():
    """:func:`level_ranges` (what ``benchmarks/level_frame_ranges.py`` writes) on 2 worlds of two
    levels: the stored file's first 2 worlds of each."""
    stored = json.loads(ev.LEVEL_RANGES.read_text())["levels"]
    written = ev.level_ranges([0, 2], 2, 1)
    assert sorted(written) == ["0", "2"] and written["2"]["name"] == LEVELS[2]
    for level in ("0", "2"):
        for key in ev.ALIVE_STATISTICS:
            np.testing.assert_allclose(written[level][key], stored[level][key][:2], rtol=1e-9)


def _report(walk: int, shift: float = 0.0) -> dict:
    """A bench_world_model_long.py report of two settings on two worlds of 3 frames, its per-frame
    statistics shifted by ``shift``."""
    bounds = {"mean": [0.3, 0.5], "std": [0.15, 0.25], "edge": [0.02, 0.05]}
    world = {
        f"per_frame_{key}": [low + shift, (low + high) / 2 + shift, high + shift]
        for key, (low, high) in bounds.items()
    }
    rows = [{"name": name, "psnr_first32": 20.0, "per_world": [world, world]} for name in ("t0/full", "t0/8")]
    return {
        "settings": {"seeds_list": [walk]},
        "rows": rows,
        "ranges": [bounds] * 2,
        "level_ranges": [bounds] * 2,
    }


def test_pool_reports_sums_the_walks_and_refuses_bad_sets():
    pooled = ev.pool_reports([_report(0), _report(100, shift=1.0)])
    assert [p["name"] for p in pooled] == ["t0/full", "t0/8"]
    for p in pooled:
        assert p["walks"] == [0, 100] and p["worlds"] == 4 and p["frames"] == 12
        assert p["world"]["alive_worlds"] == 2 and p["level"]["alive_worlds_mean_std"] == 2
        assert p["world"]["in_range"] == {key: 0.5 for key in ev.ALIVE_STATISTICS}
        assert p["level"]["frames_out"] == {
            **{f"{key}_below": 0 for key in ev.ALIVE_STATISTICS},
            **{f"{key}_above": 6 for key in ev.ALIVE_STATISTICS},
            "nan": 0,
        }
        assert p["level"]["first_exits"] == [None, None, 0, 0]
    assert [p["name"] for p in ev.pool_reports([_report(0)], ["t0/8"])] == ["t0/8"]
    with pytest.raises(ValueError, match=r"walk\(s\) \[0\] repeat"):
        ev.pool_reports([_report(0), _report(0)])
    renamed = _report(1)
    for row in renamed["rows"]:
        row["name"] += "-x"
    with pytest.raises(ValueError, match="share no setting"):
        ev.pool_reports([_report(0), renamed])
    with pytest.raises(ValueError, match="not in every report"):
        ev.pool_reports([_report(0)], ["t9/full"])
    nan = _report(2)
    nan["rows"][0]["per_world"][0] = dict(nan["rows"][0]["per_world"][0], per_frame_mean=[None, 0.4, 0.4])
    check = ev.stored_range_check(nan["rows"][0]["per_world"][0], nan["ranges"][0])
    assert check["nan_frames"] == 1 and check["first_exit"] == 0


def test_compare_with_dense_and_the_quality_bars():
    """Each run against the dense one (speed-up, PSNR against it, the flag on a loss of more than
    ``FLAG_DB``), and the quality bars over the runs and the copy-last baseline."""
    rng = np.random.default_rng(0)
    truth = rng.random((4, 16, 16, 3), dtype=np.float32)
    videos = {
        "dense": np.clip(truth + 0.01 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32),
        "blurred": np.clip(truth * 0.5 + 0.25, 0, 1).astype(np.float32),
    }
    videos["same"] = videos["dense"].copy()
    runs = {
        m: {"total_s": t, "vs_truth": ev.fidelity(videos[m], truth)}
        for m, t in (("dense", 2.0), ("blurred", 1.0), ("same", 4.0))
    }
    ev.compare_with_dense(runs, videos, truth)
    assert runs["blurred"]["speedup_vs_dense"] == 2.0 and runs["same"]["speedup_vs_dense"] == 0.5
    assert runs["same"]["vs_dense"] == {"psnr_first32": None, "psnr_all": None, "identical": True}
    assert runs["dense"]["loss_vs_dense_first32_db"] == 0 and not runs["dense"]["flagged"]
    assert runs["blurred"]["flagged"] and runs["blurred"]["loss_vs_dense_first32_db"] > ev.FLAG_DB
    baseline = ev.fidelity(np.broadcast_to(truth[0], truth.shape), truth)
    for run, video in zip(runs.values(), videos.values(), strict=True):
        run.update(
            ev.alive(
                video,
                {k: [0.0, 1.0] for k in ev.ALIVE_STATISTICS},
                {k: [-1.0, 2.0] for k in ev.ALIVE_STATISTICS},
            )
        )
    bars = ev.quality_bars(runs, baseline)
    margin = runs["dense"]["vs_truth"]["psnr_first32"] - baseline["psnr_first32"]
    assert bars["dense_over_copy_last_db"] == pytest.approx(margin)
    assert bars["dense_beats_copy_last"] == (margin >= ev.COPY_LAST_MARGIN_DB)
    assert bars["flagged"] == ["blurred"] and set(bars["alive"]) == set(bars["alive_level"]) == set(runs)
    series = ev.psnr_series(runs, baseline)
    assert list(series) == [*runs, "copy last frame"] and all(len(v) == len(truth) for v in series.values())
    no_dense = {m: r for m, r in runs.items() if m != "dense"}
    assert ev.quality_bars(no_dense, baseline)["dense_over_copy_last_db"] is None
