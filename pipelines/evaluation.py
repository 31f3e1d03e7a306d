"""World-model evaluation: fidelity against the game's true frames, the stays-alive frame-range checks
(the world's and the level's ranges), the quality bars and the Markdown report table.

Rollouts are run by :mod:`vidaccel.pipelines.runs` (re-exported here: :func:`play`,
:func:`rollout_actions`, :func:`run_method`, :func:`timed_chunks`, :func:`world_batch`). PSNR of a range
of frames pools the squared error over those frames (the metric of :func:`vidaccel.metrics.psnr`).
"""

from __future__ import annotations

import functools
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from vidaccel.metrics import frame_statistics, psnr, ssim
from vidaccel.pipelines.game import ACTIONS, LEVELS, random_actions
from vidaccel.pipelines.runs import play, rollout_actions, run_method, timed_chunks, world_batch
from vidaccel.pipelines.world_model import LEVEL_FRAME_RANGES

__all__ = [
    "ALIVE_STATISTICS",
    "COPY_LAST_MARGIN_DB",
    "FIRST",
    "FLAG_DB",
    "LEVEL_RANGES",
    "LEVEL_WORLDS",
    "REFERENCE_COLORS",
    "REFERENCE_FRAMES",
    "alive",
    "alive_panels",
    "compare_with_dense",
    "fidelity",
    "finite",
    "format_table",
    "frames_out",
    "joined_range",
    "level_cell",
    "level_frame_range",
    "level_ranges",
    "play",
    "pool_reports",
    "pool_setting",
    "psnr_series",
    "quality_bars",
    "range_check",
    "reference_walk",
    "rollout_actions",
    "run_method",
    "stored_range_check",
    "stored_walk_ranges",
    "timed_chunks",
    "true_frame_range",
    "walk_range",
    "world_batch",
]

FIRST = 32  # the quality bars' "first 32 predicted frames"
FLAG_DB = 0.5  # a method losing more than this against dense over the first 32 frames is flagged
COPY_LAST_MARGIN_DB = 2.0  # dense must beat the copy-last-frame baseline by this much
REFERENCE_FRAMES = 1000  # true frames of the stays-alive range beyond the clip's own
ALIVE_STATISTICS = ("mean", "std", "edge")  # per-frame statistics the stays-alive check bounds
LEVEL_WORLDS = 512  # worlds whose random walks give a level's range (level_frame_range)
LEVEL_RANGES = LEVEL_FRAME_RANGES  # assets/level_frame_ranges.json, package data of vidaccel
"""Each world's walk range (:func:`walk_range`) for ``LEVEL_WORLDS`` worlds of every level, stored
because the game is deterministic and 512 walks take minutes (``benchmarks/level_frame_ranges.py``)."""
REFERENCE_COLORS = {
    "truth": (0, 0, 0),
    "copy last frame": (150, 150, 150),
    "world range low": (150, 150, 150),
    "world range high": (150, 150, 150),
    "level range low": (210, 110, 110),
    "level range high": (210, 110, 110),
}
"""The plots' reference lines (the methods take :data:`vidaccel.pipelines.media.SERIES_COLORS`)."""


def true_frame_range(truth: np.ndarray, seed: int, level: int) -> dict:
    """``{"mean": [low, high], "std": [low, high], "edge": [low, high]}``: the range of each of
    :func:`frame_statistics` over the true frames ``truth`` (uint8 ``[T, 64, 64, 3]``) and a
    :data:`REFERENCE_FRAMES`-frame random walk in the same world and level."""
    frames = np.concatenate([truth, reference_walk(seed, level)]).astype(np.float32) / 255.0
    return {key: bounds(values) for key, values in frame_statistics(frames).items()}


@functools.lru_cache(maxsize=8)
def level_frame_range(level: int, worlds: int = LEVEL_WORLDS) -> dict:
    """The range of each of :func:`frame_statistics` over the true frames of ``level`` in any world:
    :data:`REFERENCE_FRAMES`-frame random walks in ``worlds`` worlds (seeds ``0 .. worlds - 1``). The
    stays-alive check's level reading ("a true frame of this level"), beside the per-world range of
    :func:`true_frame_range` ("a true frame of this world").

    The walks' ranges come from :data:`LEVEL_RANGES` when it holds ``worlds`` worlds of ``level``,
    else they are computed (about half a second per world on one CPU core). Any finite number of
    worlds underestimates the level's range (``benchmarks/results/world_model_stability.md``, 9.1)."""
    ranges = stored_walk_ranges(level, worlds)
    if ranges is None:
        ranges = [walk_range(seed, level) for seed in range(worlds)]
    return joined_range(*ranges)


def walk_range(seed: int, level: int) -> dict:
    """``{statistic: [low, high]}`` over the true frames of world ``seed``'s reference walk in
    ``level`` (:func:`reference_walk`): one world's share of :func:`level_frame_range`."""
    stats = frame_statistics(reference_walk(seed, level) / 255.0)
    return {key: bounds(stats[key]) for key in ALIVE_STATISTICS}


def level_ranges(levels: list[int], worlds: int, workers: int) -> dict:
    """``{level: {"name", statistic: [[low, high] per world]}}``: :func:`walk_range` of worlds
    ``0 .. worlds - 1`` of each of ``levels``, in ``workers`` processes (1: in this one); the content of
    :data:`LEVEL_RANGES` (``benchmarks/level_frame_ranges.py`` writes it)."""
    seeds = [seed for _ in levels for seed in range(worlds)]
    level_of = [level for level in levels for _ in range(worlds)]
    if workers == 1:  # in this process
        ranges = list(map(walk_range, seeds, level_of))
    else:
        with ProcessPoolExecutor(workers) as pool:
            ranges = list(pool.map(walk_range, seeds, level_of, chunksize=8))
    out = {}
    for index, level in enumerate(levels):
        mine = ranges[index * worlds : (index + 1) * worlds]
        out[str(level)] = {"name": LEVELS[level], **{k: [r[k] for r in mine] for k in ALIVE_STATISTICS}}
    return out


def stored_walk_ranges(level: int, worlds: int, path: Path = LEVEL_RANGES) -> list[dict] | None:
    """The first ``worlds`` :func:`walk_range` results of ``level`` stored in ``path``, or ``None``
    when the file is missing, holds fewer worlds or was made with other reference walks."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    entry = stored["levels"].get(str(level))
    if stored["reference_frames"] != REFERENCE_FRAMES or entry is None or len(entry["mean"]) < worlds:
        return None
    return [{key: entry[key][seed] for key in ALIVE_STATISTICS} for seed in range(worlds)]


def reference_walk(seed: int, level: int) -> np.ndarray:
    """The true frames of a :data:`REFERENCE_FRAMES`-frame random walk in world ``seed`` of ``level``
    (uint8 ``[REFERENCE_FRAMES + 1, 64, 64, 3]``): the stays-alive ranges' reference."""
    return play(seed, level, [ACTIONS.index("noop")], random_actions(REFERENCE_FRAMES, seed=seed + 1))


def joined_range(*ranges: dict) -> dict:
    """The smallest range holding all ``ranges`` (each ``{statistic: [low, high]}``)."""
    return {key: [min(r[key][0] for r in ranges), max(r[key][1] for r in ranges)] for key in ranges[0]}


def fidelity(video: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR/SSIM of predicted frames ``[F, H, W, 3]`` in ``[0, 1]`` against the true ones, over the
    first 32 and all frames, and per frame."""
    all_finite = np.isfinite(video).all()
    return {
        "psnr_first32": finite(psnr(video[:FIRST], truth[:FIRST])),
        "psnr_all": finite(psnr(video, truth)),
        "ssim_first32": ssim(video[:FIRST], truth[:FIRST]) if all_finite else None,
        "ssim_all": ssim(video, truth) if all_finite else None,
        "per_frame_psnr": [finite(psnr(frame, true)) for frame, true in zip(video, truth, strict=True)],
    }


def alive(video: np.ndarray, true_range: dict, level_range: dict | None = None) -> dict:
    """The stays-alive check of ``video`` ``[T, H, W, 3]``: ``{"alive": ...}``, :func:`range_check`
    of its :func:`frame_statistics` (a frame with a NaN pixel has NaN statistics) against the world's
    ``true_range``, and with ``level_range`` ``"alive_level"``, the same statistics against it."""
    stats = frame_statistics(video)
    checks = {"alive": range_check(stats, true_range)}
    if level_range is not None:
        checks["alive_level"] = range_check(stats, level_range)
    return checks


def range_check(statistics: dict, true_range: dict) -> dict:
    """The stays-alive check on per-frame ``statistics`` (``{"mean", "std", "edge"}``, arrays, NaN
    where a frame is not finite): no NaN frame, and every frame's statistics within the true frames'
    range. ``first_exit``: the first frame that is NaN or has a statistic outside the range (``None``:
    none); ``pass_mean_std``: the same check on mean and std alone (the issue's two statistics);
    ``{statistic}_frames_in_range``: how many frames have that statistic within the range,
    ``{statistic}_frames_below`` and ``_above`` how many lie below and above it (a NaN value counts in
    neither)."""
    values = {key: np.asarray(statistics[key], dtype=np.float64) for key in ALIVE_STATISTICS}
    nan = ~np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    inside = {}
    result = {"nan_frames": int(nan.sum())}
    for key, series in values.items():
        low, high = true_range[key]
        inside[key] = (series >= low) & (series <= high)  # NaN values are outside
        result[f"{key}_in_range"] = bool(inside[key].all())
        result[f"{key}_frames_in_range"] = int(inside[key].sum())
        result[f"{key}_frames_below"] = int((series < low).sum())
        result[f"{key}_frames_above"] = int((series > high).sum())
        result[f"per_frame_{key}"] = [finite(v) for v in series]
    outside = nan | ~np.logical_and.reduce(list(inside.values()))
    result["first_exit"] = int(np.argmax(outside)) if outside.any() else None
    result["pass"] = result["first_exit"] is None
    result["pass_mean_std"] = not (nan | ~inside["mean"] | ~inside["std"]).any()
    return result


def frames_out(checks: list[dict]) -> dict:
    """Frames outside the range summed over :func:`range_check` results (worlds, walks):
    ``{statistic}_below`` and ``_above`` per statistic, and ``nan``, the frames that are not finite."""
    out = {
        f"{key}_{side}": sum(c[f"{key}_frames_{side}"] for c in checks)
        for key in ALIVE_STATISTICS
        for side in ("below", "above")
    }
    return out | {"nan": sum(c["nan_frames"] for c in checks)}


def quality_bars(runs: dict, baseline: dict) -> dict:
    """The report's quality bars over ``runs`` (``{method: run}`` with ``vs_truth``, ``alive`` and
    ``alive_level``) and the copy-last-frame ``baseline`` (:func:`fidelity`): dense's margin over the
    baseline over the first frames and whether it reaches :data:`COPY_LAST_MARGIN_DB`, each method's
    two stays-alive checks, and the flagged methods."""
    margin = None
    if "dense" in runs and None not in (runs["dense"]["vs_truth"]["psnr_first32"], baseline["psnr_first32"]):
        margin = runs["dense"]["vs_truth"]["psnr_first32"] - baseline["psnr_first32"]
    return {
        "dense_over_copy_last_db": margin,
        "dense_beats_copy_last": margin is not None and margin >= COPY_LAST_MARGIN_DB,
        "alive": {method: run["alive"]["pass"] for method, run in runs.items()},
        "alive_level": {method: run["alive_level"]["pass"] for method, run in runs.items()},
        "flagged": [method for method, run in runs.items() if run.get("flagged")],
    }


def psnr_series(runs: dict, baseline: dict) -> dict:
    """Per-frame PSNR against the truth of every run and of the copy-last-frame baseline, as plot
    series (``None`` becomes NaN, a gap in the line)."""
    series = {method: run["vs_truth"]["per_frame_psnr"] for method, run in runs.items()}
    series["copy last frame"] = baseline["per_frame_psnr"]
    return {name: [math.nan if v is None else v for v in values] for name, values in series.items()}


def level_cell(check: dict) -> str:
    """The report's "alive (level)" cell: pass, mean+std (edge strength left the range), or FAIL."""
    return "pass" if check["pass"] else "mean+std" if check["pass_mean_std"] else "FAIL"


def alive_panels(runs: dict, truth: np.ndarray, true_range: dict, level_range: dict) -> list:
    """The stays-alive plot's panels (:func:`vidaccel.pipelines.media.plot_lines`), one per statistic
    of :data:`ALIVE_STATISTICS`: the true frames', each run's, and both ranges' bounds per frame."""
    frames = len(truth)
    panels = []
    true_stats = frame_statistics(truth)
    for key in ALIVE_STATISTICS:
        title = f"per-frame {key}"
        series = {"truth": list(true_stats[key])}
        series.update(
            {
                m: [math.nan if v is None else v for v in run["alive"][f"per_frame_{key}"]]
                for m, run in runs.items()
            }
        )
        low, high = true_range[key]
        series.update({"world range low": [low] * frames, "world range high": [high] * frames})
        low, high = level_range[key]
        series.update({"level range low": [low] * frames, "level range high": [high] * frames})
        panels.append((f"{title} vs the true frames' ranges", series))
    return panels


def stored_range_check(world: dict, bounds: dict) -> dict:
    """:func:`range_check` of one world's per-frame statistics as a report stores them (``None``:
    a value that was not finite)."""
    return range_check(
        {key: [math.nan if v is None else v for v in world[f"per_frame_{key}"]] for key in ALIVE_STATISTICS},
        bounds,
    )


def pool_setting(reports: list[dict], name: str) -> dict:
    """One setting (row ``name``) pooled over ``bench_world_model_long.py`` ``reports`` (one per action
    walk): PSNR per walk, and the world's and the level's stays-alive checks over every world."""
    walks, psnr32, own, level = [], [], [], []  # own / level: range_check of every world
    for report in reports:
        row = next(r for r in report["rows"] if r["name"] == name)
        walks.append(report["settings"]["seeds_list"][0])
        psnr32.append(row["psnr_first32"])
        for world, mine, theirs in zip(
            row["per_world"], report["ranges"], report["level_ranges"], strict=True
        ):
            own.append(stored_range_check(world, mine))
            level.append(stored_range_check(world, theirs))
    frames = sum(len(check["per_frame_mean"]) for check in own)
    return {
        "name": name,
        "walks": walks,
        "psnr_first32": psnr32,
        "worlds": len(own),
        "frames": frames,
        "world": {
            "alive_worlds": sum(check["pass"] for check in own),
            "in_range": {
                key: sum(check[f"{key}_frames_in_range"] for check in own) / frames
                for key in ALIVE_STATISTICS
            },
        },
        "level": {
            "alive_worlds": sum(check["pass"] for check in level),
            "alive_worlds_mean_std": sum(check["pass_mean_std"] for check in level),
            "frames_out": frames_out(level),
            "first_exits": [check["first_exit"] for check in level],
        },
    }


def pool_reports(reports: list[dict], names: list[str] | None = None) -> list[dict]:
    """Every setting the reports share (or ``names``), pooled; a ``ValueError`` when a walk repeats or
    no setting is shared."""
    walks = [r["settings"]["seeds_list"][0] for r in reports]
    repeated = sorted({w for w in walks if walks.count(w) > 1})
    if repeated:
        raise ValueError(f"each report must be a different action walk; walk(s) {repeated} repeat")
    shared = [
        r["name"]
        for r in reports[0]["rows"]
        if all(any(x["name"] == r["name"] for x in o["rows"]) for o in reports)
    ]
    if names is not None:
        missing = [n for n in names if n not in shared]
        if missing:
            raise ValueError(f"--rows {missing} not in every report; shared: {shared}")
        shared = names
    if not shared:
        raise ValueError("the reports share no setting (row name); pool reports of one sweep")
    return [pool_setting(reports, name) for name in shared]


def compare_with_dense(runs: dict, videos: dict, truth: np.ndarray) -> None:
    """Add to each run of ``runs`` (``{method: run}``, the rollouts ``videos`` ``{method: frames}``
    against ``truth``) its comparison with the dense run, where there is one: ``speedup_vs_dense``,
    ``vs_dense`` (PSNR against dense over the first frames and all, and whether it is identical),
    ``loss_vs_dense_first32_db`` (its PSNR loss against the truth relative to dense's) and
    ``flagged`` (loses more than :data:`FLAG_DB`, or NaN)."""
    if "dense" not in videos:
        return
    dense, dense_video = runs["dense"], videos["dense"]
    for method, video in videos.items():
        run = runs[method]
        run["speedup_vs_dense"] = dense["total_s"] / run["total_s"]
        run["vs_dense"] = {
            "psnr_first32": finite(psnr(video[:FIRST], dense_video[:FIRST])),
            "psnr_all": finite(psnr(video, dense_video)),
            "identical": bool(np.array_equal(video, dense_video)),
        }
        loss = psnr(dense_video[:FIRST], truth[:FIRST]) - psnr(video[:FIRST], truth[:FIRST])
        run["loss_vs_dense_first32_db"] = finite(loss)
        run["flagged"] = not loss <= FLAG_DB  # a NaN video (NaN loss) is flagged too


def bounds(values: np.ndarray) -> list[float]:
    """``[min, max]`` of ``values`` as floats."""
    return [float(values.min()), float(values.max())]


def finite(value) -> float | None:
    """JSON has no infinity or NaN: those become ``None``."""
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``; ``"-"`` for ``None``."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table_rows(report: dict) -> list[tuple[str, ...]]:
    """The report table's rows: the header, its rule, one row per method and the copy-last baseline."""
    base = report["copy_last_frame"]
    header = ("method", "total s", "chunk ms", "speed-up", "memory MiB", "merge", "PSNR 32", "PSNR all",
              "SSIM 32", "vs dense 32", "alive", "alive (level)", "flag")  # fmt: skip
    rows = [header, tuple("---" for _ in header)]
    for method, run in report["methods"].items():
        fid, check = run["vs_truth"], run["alive"]
        memory = run["peak_gpu_bytes"] if run["peak_gpu_bytes"] is not None else run["kv_cache_bytes"]
        vs_dense = run.get("vs_dense", {})
        rows.append(
            (
                method,
                f"{run['total_s']:.2f}",
                f"{run['median_chunk_s'] * 1e3:.1f}",
                fmt(run.get("speedup_vs_dense"), ".2f", "x"),
                f"{memory / 2**20:.2f}",
                fmt(run["merge_rate"], ".2f"),
                fmt(fid["psnr_first32"], ".2f"),
                fmt(fid["psnr_all"], ".2f"),
                fmt(fid["ssim_first32"], ".3f"),
                "identical" if vs_dense.get("identical") else fmt(vs_dense.get("psnr_first32"), ".2f"),
                "pass" if check["pass"] else "FAIL",
                level_cell(run["alive_level"]),
                f"loses {fmt(run['loss_vs_dense_first32_db'], '.2f')} dB" if run.get("flagged") else "",
            )
        )
    rows.append(("copy last frame", "", "", "", "", "", fmt(base["psnr_first32"], ".2f"), fmt(base["psnr_all"], ".2f"),
                 fmt(base["ssim_first32"], ".3f"), "", "", "", ""))  # fmt: skip
    return rows


def format_table(report: dict) -> str:
    """The Markdown report: settings, one row per method, the baseline and the quality bars."""
    s, bars = report["settings"], report["quality_bars"]
    rows = _table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    margin = bars["dense_over_copy_last_db"]
    first = min(FIRST, s["frames"])  # the "first 32" figures of a shorter rollout cover all its frames
    memory_name = (
        "peak GPU memory (the most of any chunk)"
        if report["device"] != "cpu"
        else "the KV caches' allocated size (all layers; TempCache allocates its budget, or the rollout's tokens if fewer, at once)"
    )
    lines = [
        f"# World-model rollout: {s['frames']} predicted frames from {s['context']} true context frames",
        "",
        f"Model: {report['model']['path']} ({report['model']['parameters'] / 1e6:.2f}M parameters), "
        f"{report['device']}, {report['dtype']}; chunks of {s['chunk_frames']} frames, actions {s['actions']!r}, "
        f"level {s['level']}, seed {s['seed']}"
        + (
            f", sampler timesteps {[round(t) for t in s['sampler']['denoising_timesteps']]}"
            f" eta {s['sampler'].get('eta', 1.0):g}"
            if "sampler" in s
            else ""
        )
        + ". Fidelity figures come from this small model.",
        "",
        *("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows),
        "",
        f"PSNR/SSIM against the game's true frames (dB; 32: the first {first} predicted frames, squared error "
        f"pooled over frames); 'vs dense 32': PSNR against the dense rollout; chunk ms: median per-chunk latency "
        f"(the first chunk includes the context prefill); memory: {memory_name}; merge: TempCache's "
        f"merge rate (first layer); alive: no NaN and every frame's mean, std and edge strength within the range of this "
        f"world's true frames; alive (level): the same within the range of the level's true frames (walks in {LEVEL_WORLDS} "
        f"worlds, joined with this world's), 'mean+std' where only mean and std stay within it; "
        f"flag: loses more than {FLAG_DB} dB against dense over the first {first} frames.",
        "",
        "Quality bars: dense beats copy-last-frame by "
        + (("n/a (no dense run)" if "dense" not in report["methods"] else "n/a (copy-last PSNR infinite or NaN: the frames did not change)")
           if margin is None else f"{margin:.2f} dB over the first {first} frames "
           f"({'pass' if bars['dense_beats_copy_last'] else 'FAIL'}, needs >= {COPY_LAST_MARGIN_DB} dB)")
        + f"; alive: {', '.join(m + (' pass' if ok else ' FAIL') for m, ok in bars['alive'].items())}"
        + f"; alive (level): {', '.join(m + (' pass' if ok else ' FAIL') for m, ok in bars['alive_level'].items())}; "
        f"flagged: {', '.join(bars['flagged']) or 'none'}. Wall time of the whole script: {report['wall_s']:.1f} s.",
    ]  # fmt: skip
    return "\n".join(lines)
