"""Long-rollout stability of the world model's sampler settings (a script, not a test).

An autoregressive model that conditions on its own outputs can drift: small errors compound until
the frames leave the distribution it was trained on (texture turns to noise, colours wash out). The
rollout report's "stays alive" check catches that: every frame's mean, standard deviation and edge
strength (mean absolute difference of adjacent pixels: texture raises it) must stay within the range
of true frames. This sweep rolls the shipped world model out densely for
``--frames`` frames over a batch of game worlds, once per combination of

- ``context_timestep`` (``--context-timesteps``): the timestep at which a finished frame is written
  into the KV cache. ``0`` commits the clean prediction; above, it is re-noised to that level first,
  which diffusion forcing trained for (the model saw noisy pasts) and which tells the model not to
  trust the past's fine detail, the part its own errors live in;
- the cache (``--caches``): ``full`` (every earlier frame) or an integer ``N``, Self-Forcing's rolling
  window of ``N`` frames with the context frames as sinks;
- optionally the sampler (``--shifts``, ``--timesteps``): the flow shift and the denoising timesteps
  (default: the model's, ``world_model.json``). Ending lower (``...,250,100,40,20``) leaves less
  residual noise in each frame, the error a model that copies its past accumulates; ``--etas``: the
  share of fresh noise when a step re-noises (``0``: the flow ODE's Euler step);

and reports per setting: PSNR against the true frames over the first 32 predicted frames and all of
them, how many worlds stay alive, the first frame at which a world leaves the true range, and the share
of frames whose mean, std and edge strength lie within it. The range is each world's own true frames;
``level`` repeats the check against the level's range (walks in ``LEVEL_WORLDS`` worlds joined with
the world's: "a true frame of this level" rather than "of this world").
**Winner**: among settings where every world stays alive, the highest PSNR over the first 32 frames;
if none, the one whose worlds stay alive longest.

    python benchmarks/bench_world_model_long.py                  # GPU: 8 settings, 4 worlds, 400 frames (~5 min)
    python benchmarks/bench_world_model_long.py --quick          # 1 world, 4 frames (CPU smoke run)
    python benchmarks/bench_world_model_long.py --context-timesteps 0,100 --caches full --frames 1000
    python benchmarks/bench_world_model_long.py --context-timesteps 0 --caches full,8 --timesteps "1000,750,500,250;1000,750,500,250,150"

Writes ``benchmarks/results/world_model_long.json`` and ``.md`` (``--out``) and prints the table last,
then the winner.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU: the PyTorch references, not the interpreter

from vidaccel.metrics import psnr  # noqa: E402
from vidaccel.pipelines.bench import bench_parser, environment, parse_bench_args, write_report_and_table  # noqa: E402
from vidaccel.pipelines.causal_wan import check_eta  # noqa: E402
from vidaccel.pipelines.cli import (  # noqa: E402
    add_model_arguments,
    add_world_arguments,
    load_world_model,
    parse_timesteps,
)
from vidaccel.pipelines.evaluation import (  # noqa: E402
    ALIVE_STATISTICS,
    FIRST,
    LEVEL_WORLDS,
    alive,
    finite,
    frames_out,
    joined_range,
    level_frame_range,
    true_frame_range,
)
from vidaccel.pipelines.runs import run_method, world_batch  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "world_model_long.json"
FULL = dict(
    frames=400,
    seeds=4,
    context_timesteps="0,50,100,250",
    caches="full,21",
    shifts=None,
    timesteps=None,
    etas=None,
)
QUICK = dict(
    frames=4, seeds=1, context_timesteps="0,100", caches="full,6", shifts=None, timesteps=None, etas=None
)


def main(argv=None) -> dict:
    parser = _parser()
    args = parse_bench_args(parser, argv)
    spec = dict(QUICK if args.quick else FULL)
    spec.update({k: getattr(args, k) for k in spec if getattr(args, k) is not None})
    try:
        settings = _settings(
            spec["context_timesteps"], spec["caches"], spec["shifts"], spec["timesteps"], spec["etas"]
        )
    except ValueError as error:
        parser.error(str(error))
    if spec["frames"] < 1 or spec["seeds"] < 1:
        parser.error(f"--frames and --seeds must be >= 1, got {spec['frames']} and {spec['seeds']}")

    pipe = load_world_model(args)
    context = int(pipe.metadata["context_frames"])
    started = time.perf_counter()
    seeds = list(range(args.seed, args.seed + spec["seeds"]))
    rows, ranges, level_ranges = _sweep(pipe, args, settings, seeds, spec["frames"], started)
    report = {
        **environment(args.device, args.quick, pipe.transformer.dtype),
        "model": "random weights"
        if args.random_weights
        else str(args.model or "shipped (assets/world_model)"),
        "sampler": pipe.sampler,
        "settings": {**spec, "context": context, "seeds_list": seeds, "first": FIRST},
        "ranges": ranges,
        "level_ranges": level_ranges,
        "rule": "every world alive, then the highest PSNR over the first 32 frames; else alive the longest",
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "winner": _winner(rows),
    }
    write_report_and_table(args.out, report, format_table(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return report


def _parser():
    """The benchmark options and the sweep's own."""
    parser = bench_parser(__doc__, DEFAULT_OUT)
    add_model_arguments(parser)
    add_world_arguments(
        parser, frames=(FULL["frames"], QUICK["frames"]), seeds=(FULL["seeds"], QUICK["seeds"]), batched=True
    )
    parser.add_argument(
        "--context-timesteps",
        default=None,
        help="comma-separated commit timesteps in [0, 1000] (default 0,50,100,250)",
    )
    parser.add_argument(
        "--caches",
        default=None,
        help="comma-separated: full, or a rolling window in frames (default full,21)",
    )
    parser.add_argument(
        "--shifts", default=None, help="comma-separated flow shifts (default: the model's, world_model.json)"
    )
    parser.add_argument(
        "--timesteps",
        default=None,
        help="denoising samplers: comma-separated timesteps, ';' between samplers, e.g. "
        "'1000,750,500,250;1000,750,500,250,100,40,20' (default: the model's, world_model.json)",
    )
    parser.add_argument(
        "--etas",
        default=None,
        help="comma-separated shares of fresh noise in [0, 1] when the sampler re-noises (0: the flow ODE's "
        "Euler step; default: the model's, world_model.json, else 1)",
    )
    return parser


def _sweep(pipe, args, settings: list[dict], seeds: list[int], frames: int, started: float):
    """Roll the worlds ``seeds`` out once per setting: ``(rows, each world's range, each world's
    level range)``."""
    context = int(pipe.metadata["context_frames"])
    context_actions, actions, truth, truth_pred = world_batch(seeds, context, frames, args.seed)
    ranges = [true_frame_range(truth[w], seed, 0) for w, seed in enumerate(seeds)]
    level_ranges = [joined_range(world, level_frame_range(0)) for world in ranges]
    warmup = 1 if args.device.type == "cuda" else 0
    rows = []
    for index, setting in enumerate(settings):
        kwargs = {
            "context_timestep": setting["context_timestep"],
            "shift": setting["shift"],
            "denoising_timesteps": setting["timesteps"],
            "eta": setting["eta"],
        }
        if setting["cache"] != "full":
            kwargs.update(max_cache_frames=setting["cache"], sink_frames=context)
        chunks, video = run_method(
            pipe,
            [],
            truth[:, :context],
            context_actions,
            actions,
            seed=args.seed,
            warmup_chunks=warmup,
            **kwargs,
        )
        rows.append(_measure(setting, chunks, video, truth_pred, ranges, level_ranges))
        print(
            f"[{index + 1}/{len(settings)}] {_row_line(rows[-1])} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return rows, ranges, level_ranges


def _settings(
    context_timesteps: str,
    caches: str,
    shifts: str | None,
    samplers: str | None = None,
    etas: str | None = None,
) -> list[dict]:
    timesteps = [float(t) for t in context_timesteps.split(",")]
    shift_values = [None] if shifts is None else [float(s) for s in shifts.split(",")]
    if any(s is not None and not s > 0 for s in shift_values):
        raise ValueError(f"--shifts must be > 0, got {shifts!r}")
    sampler_values = [None] if samplers is None else [parse_timesteps(text) for text in samplers.split(";")]
    try:
        eta_values = [None] if etas is None else [float(e) for e in etas.split(",")]
    except ValueError:
        raise ValueError(f"--etas are comma-separated numbers in [0, 1], got {etas!r}") from None
    for eta in eta_values:
        if eta is not None:
            check_eta(eta)
    if any(not 0 <= t <= 1000 for t in timesteps):
        raise ValueError(f"--context-timesteps must lie in [0, 1000], got {context_timesteps!r}")
    windows = []
    for cache in caches.split(","):
        if cache == "full":
            windows.append("full")
        elif cache.isdigit() and int(cache) >= 1:
            windows.append(int(cache))
        else:
            raise ValueError(f"--caches items must be 'full' or an int >= 1, got {cache!r}")
    return [
        {"context_timestep": t, "cache": c, "shift": s, "timesteps": d, "eta": e}
        for e in eta_values
        for d in sampler_values
        for s in shift_values
        for c in windows
        for t in timesteps
    ]


def _measure(
    setting: dict,
    chunks: list[dict],
    video: np.ndarray,
    truth: np.ndarray,
    ranges: list[dict],
    level_ranges: list[dict],
) -> dict:
    worlds, level = [], []
    for w in range(len(video)):
        checks = alive(video[w], ranges[w], level_ranges[w])  # the statistics once, both ranges
        world = checks["alive"]
        level.append(checks["alive_level"])
        worlds.append(
            {
                "psnr_first32": finite(psnr(video[w, :FIRST], truth[w, :FIRST])),
                "psnr_all": finite(psnr(video[w], truth[w])),
                "alive": world["pass"],
                "nan_frames": world["nan_frames"],
                "first_exit": world["first_exit"],
                **{
                    key: value
                    for key, value in world.items()
                    if key.startswith("per_frame_")
                    or key.endswith(("_frames_in_range", "_frames_below", "_frames_above"))
                },
            }
        )
    exits = [w["first_exit"] if w["first_exit"] is not None else len(video[0]) for w in worlds]
    frames = video.shape[0] * video.shape[1]
    psnrs = [w["psnr_first32"] for w in worlds if w["psnr_first32"] is not None]
    return {
        "name": f"t{setting['context_timestep']:g}/{setting['cache']}"
        + ("" if setting["shift"] is None else f"/shift{setting['shift']:g}")
        + ("" if setting["timesteps"] is None else "/ts" + "-".join(f"{t:g}" for t in setting["timesteps"]))
        + ("" if setting["eta"] is None else f"/eta{setting['eta']:g}"),
        **setting,
        "psnr_first32": statistics.fmean(psnrs) if psnrs else None,
        "psnr_all": statistics.fmean(
            [w["psnr_all"] for w in worlds if w["psnr_all"] is not None] or [float("nan")]
        ),
        "alive_worlds": sum(w["alive"] for w in worlds),
        "worlds": len(worlds),
        "median_alive_frames": statistics.median(exits),
        "in_range": _shares(worlds, frames),
        "min_alive_frames": min(exits),
        "level": {  # the same check against the level's range (any world's true frames)
            "alive_worlds": sum(a["pass"] for a in level),
            "first_exits": [a["first_exit"] for a in level],
            "in_range": _shares(level, frames),
            # the bar's own two statistics: no NaN, every frame's mean and std within the range
            "alive_worlds_mean_std": sum(a["pass_mean_std"] for a in level),
            "frames_out": frames_out(level),
        },
        "seconds": sum(c["latency_s"] for c in chunks),
        "per_world": worlds,
    }


def _shares(worlds: list[dict], frames: int) -> dict:
    """The share of all ``frames`` (every world) whose statistic lies within the range, from each
    world's ``{statistic}_frames_in_range`` counts."""
    return {key: sum(w[f"{key}_frames_in_range"] for w in worlds) / frames for key in ALIVE_STATISTICS}


def _winner(rows: list[dict]) -> dict:
    kept = [r for r in rows if r["alive_worlds"] == r["worlds"] and r["psnr_first32"] is not None]
    if kept:
        best = max(kept, key=lambda r: r["psnr_first32"])
        return {"name": best["name"], "reason": "every world alive; highest PSNR over the first 32 frames"}
    best = max(rows, key=lambda r: (r["min_alive_frames"], r["median_alive_frames"]))
    return {"name": best["name"], "reason": "no setting kept every world alive; alive the longest"}


def _row_line(row: dict) -> str:
    return (
        f"{row['name']}: PSNR32 {_fmt(row['psnr_first32'])} dB, alive {row['alive_worlds']}/{row['worlds']}, "
        f"alive frames min {row['min_alive_frames']} median {row['median_alive_frames']:g}"
    )


def _percentages(in_range: dict | None) -> str:
    if in_range is None:  # a report written before the in-range shares
        return "-"
    return " / ".join(f"{100 * in_range[key]:.0f}" for key in ALIVE_STATISTICS)


def _level_alive(level: dict | None, worlds: int) -> str:
    return "-" if level is None else f"{level['alive_worlds']}/{worlds}"


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None or value != value else f"{value:{spec}}"


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# World-model long-rollout stability: {s['frames']} frames x {s['seeds']} worlds, dense attention",
        "",
        f"{report['device']}, {report['dtype']}, sampler {report['sampler']}; {report['date']}. "
        "context t: the commit timestep of generated frames; cache: full or a rolling window (frames, "
        "the context frames as sinks); alive: worlds whose every frame's mean, std and edge strength stay within the true "
        "frames' range; alive frames: predicted frames before the first exit (min and median over worlds); "
        "in range: the share of all frames (every world) whose mean / std / edge strength lies within the range. "
        "The range is the world's true frames (its clip and a 1,000-frame walk); 'level' repeats alive and in range "
        f"against the level's range (walks in {LEVEL_WORLDS} worlds, joined with the world's).",
        "",
        "| setting | context t | cache | PSNR 32 | PSNR all | alive | alive frames min | median "
        "| in range % mean / std / edge | level: alive | level: in range % | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['context_timestep']:g} | {r['cache']} | {_fmt(r['psnr_first32'])} | "
            f"{_fmt(r['psnr_all'])} | {r['alive_worlds']}/{r['worlds']} | {r['min_alive_frames']} | "
            f"{r['median_alive_frames']:g} | {_percentages(r.get('in_range'))} | "
            f"{_level_alive(r.get('level'), r['worlds'])} | {_percentages((r.get('level') or {}).get('in_range'))} | "
            f"{r['seconds']:.1f} |"
        )
    lines += ["", f"winner: {report['winner']['name']} ({report['winner']['reason']})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
