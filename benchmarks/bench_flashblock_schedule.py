"""FlashBlock's refresh schedule on the game world model: which denoising steps recompute the
attention to the cache (a script, not a test).

FlashBlock computes the attention to earlier chunks at its refresh steps and reuses it at the others.
Which steps refresh matters for fidelity at equal cost: the last step sets the committed frame's
detail, so a stale cache part there reaches the output (and, committed, every later frame). This
rolls the shipped world model out from true context frames with the game's actions, dense and once
per schedule, per world (``--seeds``), and reports PSNR against the true frames and against the dense
rollout over the first ``--frames`` predicted frames:

- ``r2``: ``refresh_every=2, refresh_last=False``: steps 0 and 2 of 4 (the earlier default);
- ``r3+last``: ``refresh_every=3, refresh_last=True``: steps 0 and 3 (the default; the same count);
- ``r2+last``: ``refresh_every=2, refresh_last=True``: steps 0, 2 and 3 (one more refresh).

    python benchmarks/bench_flashblock_schedule.py                # CPU or GPU: 32 frames x 3 worlds
    python benchmarks/bench_flashblock_schedule.py --quick        # 2 frames x 1 world (smoke run)

Writes ``benchmarks/results/flashblock_schedule.json`` and ``.md`` (``--out``) and prints the table.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU: the PyTorch references, not the interpreter

from vidaccel import FlashBlockConfig  # noqa: E402
from vidaccel.metrics import psnr  # noqa: E402
from vidaccel.pipelines.bench import bench_parser, environment, parse_bench_args, write_report_and_table  # noqa: E402
from vidaccel.pipelines.cli import add_model_arguments, add_world_arguments, load_world_model  # noqa: E402
from vidaccel.pipelines.runs import run_method, world_batch  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "flashblock_schedule.json"
SCHEDULES = {
    "r2": dict(refresh_every=2, refresh_last=False),
    "r3+last": dict(refresh_every=3, refresh_last=True),
    "r2+last": dict(refresh_every=2, refresh_last=True),
}


def main(argv=None) -> dict:
    parser = bench_parser(__doc__, DEFAULT_OUT)
    add_model_arguments(parser)
    add_world_arguments(parser, frames=(32, 2), seeds=(3, 1), batched=False)
    args = parse_bench_args(parser, argv)
    frames = args.frames or (2 if args.quick else 32)
    seeds = list(range(args.seed, args.seed + (args.seeds or (1 if args.quick else 3))))
    if frames < 1:
        parser.error(f"--frames must be >= 1, got {frames}")
    pipe = load_world_model(args)
    context = int(pipe.metadata["context_frames"])
    started = time.perf_counter()
    rows = _rollouts(pipe, seeds, frames, context)
    summary = _summary(rows)
    report = {
        **environment(args.device, args.quick, pipe.transformer.dtype),
        "settings": {
            "frames": frames,
            "seeds": seeds,
            "context": context,
            "sampler": pipe.metadata["denoising_timesteps"],
        },
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "per_seed": rows,
    }
    write_report_and_table(args.out, report, format_table(report))
    return report


def _rollouts(pipe, seeds: list[int], frames: int, context: int) -> dict:
    """Dense and every schedule on each world (its own action walk): ``{name: [per-world row]}``."""
    rows = {name: [] for name in ("dense", *SCHEDULES)}
    for seed in seeds:
        context_actions, actions, truth, true_pred = world_batch([seed], context, frames, seed)
        truth, true_pred = truth[0], true_pred[0]  # one world, its own action walk
        videos = {}
        for name in rows:
            configs = [] if name == "dense" else [FlashBlockConfig(**SCHEDULES[name])]
            chunks, videos[name] = run_method(
                pipe, configs, truth[:context], context_actions, actions, seed=seed
            )
            rows[name].append(
                {
                    "seed": seed,
                    "psnr_vs_truth": float(psnr(videos[name], true_pred)),
                    "psnr_vs_dense": None if name == "dense" else float(psnr(videos[name], videos["dense"])),
                    "seconds": sum(c["latency_s"] for c in chunks),
                }
            )
            print(f"seed {seed} {name}: {rows[name][-1]}", flush=True)
    return rows


def _summary(rows: dict) -> list[dict]:
    """Per schedule: mean PSNR against the truth, its change against dense per world, PSNR against dense."""
    summary = []
    for name, per_seed in rows.items():
        dense = rows["dense"]
        summary.append(
            {
                "name": name,
                "config": SCHEDULES.get(name),
                "psnr_vs_truth": statistics.fmean(r["psnr_vs_truth"] for r in per_seed),
                "delta_vs_dense_db": [
                    r["psnr_vs_truth"] - d["psnr_vs_truth"] for r, d in zip(per_seed, dense, strict=True)
                ],
                "psnr_vs_dense": None if name == "dense" else [r["psnr_vs_dense"] for r in per_seed],
            }
        )
    return summary


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# FlashBlock refresh schedules on the world model: {s['frames']} frames x worlds {s['seeds']}",
        "",
        f"{report['device']}, {report['dtype']}, {report['date']}; PSNR over the predicted frames (squared error "
        "pooled), per world; vs truth: against the game's true frames; vs dense: against the dense rollout.",
        "",
        "| schedule | refresh steps of 4 | PSNR vs truth (mean) | vs dense rollout's PSNR vs truth, dB | PSNR vs dense rollout, dB |",
        "| --- | --- | --- | --- | --- |",
    ]
    steps = {"dense": "-", "r2": "0, 2", "r3+last": "0, 3", "r2+last": "0, 2, 3"}
    for row in report["summary"]:
        deltas = ", ".join(f"{d:+.2f}" for d in row["delta_vs_dense_db"])
        vs_dense = (
            "-" if row["psnr_vs_dense"] is None else ", ".join(f"{v:.2f}" for v in row["psnr_vs_dense"])
        )
        lines.append(
            f"| {row['name']} | {steps.get(row['name'], '?')} | {row['psnr_vs_truth']:.2f} | {deltas} | {vs_dense} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
