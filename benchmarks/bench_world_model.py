"""Settle TempCache's open choices on our trained world model (a script, not a test).

TempCache leaves four choices open (shared/METHODS.md): match keys before or after the rotary
embedding (``match_keys``), per head or one decision for all heads (``per_head``), where a key looks
for its match (``scope``: the previous frame, a local window, or every representative) and the
merge threshold τ (``threshold``). Random weights make no redundant keys, so only a trained model can
settle them: this sweep rolls out the shipped world model (``assets/world_model``) from true context
frames with the game's actions, once dense and once per combination of the choices, over a batch of
game worlds (``--seeds``; one random action walk, seeded by ``--seed``), and measures

- fidelity: PSNR against the game's true frames and against the dense rollout, over the first 32
  predicted frames and over all of them (squared error pooled over the frames);
- the merge rate (merged / (merged + appended) non-sink keys, first layer) and the cache kept: the
  cache tokens of all layers at the end, as a fraction of the dense cache's.

Every other TempCache setting is the config's default (sinks, radius, and the budget unless
``--max-tokens``). **Winner**: among the combinations whose mean PSNR against the truth stays within
0.5 dB of dense over both the first 32 and all frames (the rollout report's flag threshold), the one
with the highest merge rate (ties: the higher PSNR over all frames) — the most compression that
costs no visible fidelity; if none qualifies, the one with the highest PSNR over all frames.

    python benchmarks/bench_world_model.py               # GPU: 36 combinations, 4 worlds, 96 frames (< 4 min)
    python benchmarks/bench_world_model.py --quick       # 1 world, 4 frames, budget 2048 (CPU: references)
    python benchmarks/bench_world_model.py --thresholds 0.95,0.98 --scopes local

Writes ``benchmarks/results/world_model_tempcache.json`` and ``.md`` (``--out``; ``--quick`` writes
``world_model_tempcache_quick.*``) and prints the table last, then the winner.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from pathlib import Path

# On CPU the world model runs every op on its PyTorch reference: the Triton interpreter (which
# the attention benchmarks select) only slows the sweep down; the kernels have their own tests.
os.environ.setdefault("TRITON_INTERPRET", "0")

from vidaccel import TempCacheConfig  # noqa: E402
from vidaccel.metrics import psnr  # noqa: E402
from vidaccel.pipelines.bench import (
    align,
    bench_parser,
    environment,
    parse_bench_args,
    write_report_and_table,
)  # noqa: E402
from vidaccel.pipelines.cli import add_model_arguments, add_world_arguments, load_world_model  # noqa: E402
from vidaccel.pipelines.evaluation import FIRST, FLAG_DB  # noqa: E402
from vidaccel.pipelines.runs import run_method, world_batch  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "world_model_tempcache.json"
FULL = dict(frames=96, seeds=4, max_tokens=None)
# A smoke run of every combination; a small TempCache budget keeps the CPU references' buffers small.
QUICK = dict(frames=4, seeds=1, max_tokens=2048)
PSNR_CAP = 100.0  # dB; JSON has no infinity
CHOICES = {
    "match_keys": TempCacheConfig.MATCH_KEYS,
    "per_head": (True, False),
    "scope": TempCacheConfig.SCOPES,
    "threshold": (0.9, 0.95, 0.98),
}


def main(argv=None) -> dict:
    parser = _parser()
    args = parse_bench_args(parser, argv)
    spec = dict(QUICK if args.quick else FULL)
    spec.update(
        {k: getattr(args, k) for k in ("frames", "seeds", "max_tokens") if getattr(args, k) is not None}
    )
    try:
        grid = _grid(args)
        budget = {} if spec["max_tokens"] is None else {"max_tokens": spec["max_tokens"]}
        configs = [TempCacheConfig(**choice, **budget) for choice in grid]
    except ValueError as error:
        parser.error(str(error))
    if spec["frames"] < 1 or spec["seeds"] < 1:
        parser.error(f"--frames and --seeds must be >= 1, got {spec['frames']} and {spec['seeds']}")

    pipe = load_world_model(args)
    device = args.device
    context = int(pipe.metadata["context_frames"])
    started = time.perf_counter()
    # One batch of game worlds (seeds) played with one random action walk: each rollout runs the whole
    # batch at once, and every figure is averaged over the worlds.
    seeds = list(range(args.seed, args.seed + spec["seeds"]))
    context_actions, actions, truth, truth_pred = world_batch(seeds, context, spec["frames"], args.seed)
    rollout = dict(
        context_frames=truth[:, :context], context_actions=context_actions, actions=actions, seed=args.seed
    )
    runs, dense, dense_chunks = _rollouts(pipe, grid, configs, rollout, started)
    per_seed = [
        {"seed": seed, "rows": [_measure(name, choice, chunks, video[w], dense[w], dense_chunks, truth_pred[w])
                                for name, choice, chunks, video in runs]}
        for w, seed in enumerate(seeds)
    ]  # fmt: skip
    summary = _summarise(per_seed)
    report = {
        **environment(device, args.quick, pipe.transformer.dtype),
        "model": "random weights"
        if args.random_weights
        else str(args.model or "shipped (assets/world_model)"),
        "training": pipe.metadata.get("training"),
        "settings": {
            **spec,
            "context": context,
            "first": FIRST,
            "chunk_frames": pipe.metadata["chunk_frames"],
        },
        "choices": {k: sorted({c[k] for c in grid}, key=str) for k in CHOICES},
        "tempcache_fixed": {k: v for k, v in vars(configs[0]).items() if k not in CHOICES},
        "rule": f"within {FLAG_DB} dB of dense (PSNR vs truth, first {FIRST} and all frames), highest merge rate",
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "winner": _winner(summary),
        "per_seed": per_seed,
    }
    write_report_and_table(args.out, report, format_table(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return report


def _parser():
    """The benchmark options and the sweep's grid."""
    parser = bench_parser(__doc__, DEFAULT_OUT)
    add_model_arguments(parser)
    add_world_arguments(
        parser, frames=(FULL["frames"], QUICK["frames"]), seeds=(FULL["seeds"], QUICK["seeds"]), batched=True
    )
    parser.add_argument("--thresholds", default=None, help="comma-separated τ values (default 0.9,0.95,0.98)")
    parser.add_argument(
        "--scopes", default=None, help=f"comma-separated subset of {','.join(CHOICES['scope'])}"
    )
    parser.add_argument(
        "--match-keys", default=None, help=f"comma-separated subset of {','.join(CHOICES['match_keys'])}"
    )
    parser.add_argument("--per-head", default=None, help="comma-separated subset of true,false")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="TempCache budget per layer and head (default: the config's; quick 2048)",
    )
    return parser


def _rollouts(pipe, grid: list[dict], configs: list, rollout: dict, started: float):
    """Dense, then one rollout per grid choice: ``(runs [(name, choice, chunks, video)], the dense
    video, the dense chunks)``."""
    device = pipe.device
    warmup = 1 if device.type == "cuda" else 0  # kernel compilation out of the timings
    dense_chunks, dense = run_method(pipe, [], warmup_chunks=warmup, **rollout)
    runs = [("dense", None, dense_chunks, dense)]
    for index, (choice, config) in enumerate(zip(grid, configs, strict=True)):
        runs.append((_name(choice), choice, *run_method(pipe, [config], warmup_chunks=warmup, **rollout)))
        print(f"[{index + 1}/{len(grid)}] {runs[-1][0]} ({time.perf_counter() - started:.0f} s)", flush=True)
    return runs, dense, dense_chunks


def _grid(args) -> list[dict]:
    """Every combination of the chosen values (``ValueError`` naming a bad one)."""
    chosen = {}
    for key, option in (("match_keys", args.match_keys), ("per_head", args.per_head), ("scope", args.scopes),
                        ("threshold", args.thresholds)):  # fmt: skip
        if option is None:
            chosen[key] = CHOICES[key]
            continue
        items = [item.strip() for item in option.split(",") if item.strip()]
        if key == "threshold":
            values = [float(item) for item in items]
        elif key == "per_head":
            if not set(items) <= {"true", "false"}:
                raise ValueError(f"--per-head must be a comma-separated subset of true,false, got {option!r}")
            values = [item == "true" for item in items]
        else:
            values = items
        if not values:
            raise ValueError(f"--{key.replace('_', '-')} lists no value: {option!r}")
        chosen[key] = tuple(dict.fromkeys(values))
    return [dict(zip(chosen, combo, strict=True)) for combo in itertools.product(*chosen.values())]


def _name(choice: dict) -> str:
    return (
        f"{choice['match_keys'].removesuffix('_rotary')}/{'head' if choice['per_head'] else 'shared'}/"
        f"{choice['scope']}/τ{choice['threshold']:g}"
    )


def _measure(name, choice, chunks, video, dense, dense_chunks, truth) -> dict:
    """One rollout's figures; PSNR capped at :data:`PSNR_CAP` (identical videos: the cap, not inf)."""
    last, dense_last = chunks[-1], dense_chunks[-1]
    return {
        "name": name,
        "choice": choice,
        "psnr_truth_first32": min(psnr(video[:FIRST], truth[:FIRST]), PSNR_CAP),
        "psnr_truth_all": min(psnr(video, truth), PSNR_CAP),
        "psnr_dense_first32": min(psnr(video[:FIRST], dense[:FIRST]), PSNR_CAP),
        "psnr_dense_all": min(psnr(video, dense), PSNR_CAP),
        "merge_rate": last["merge_rate"],
        "cache_fraction": last["kv_cache_tokens"] / max(dense_last["kv_cache_tokens"], 1),
        "seconds": sum(c["latency_s"] for c in chunks),
    }


def _summarise(per_seed: list[dict]) -> list[dict]:
    """Mean over seeds per combination, and its loss against dense."""
    keys = ("psnr_truth_first32", "psnr_truth_all", "psnr_dense_first32", "psnr_dense_all", "merge_rate",
            "cache_fraction", "seconds")  # fmt: skip
    rows = []
    for index, first in enumerate(per_seed[0]["rows"]):
        runs = [seed["rows"][index] for seed in per_seed]
        row = {"name": first["name"], "choice": first["choice"]}
        for key in keys:
            values = [run[key] for run in runs]
            row[key] = None if None in values else statistics.fmean(values)
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["loss_first32_db"] = dense["psnr_truth_first32"] - row["psnr_truth_first32"]
        row["loss_all_db"] = dense["psnr_truth_all"] - row["psnr_truth_all"]
        row["within_flag"] = row["loss_first32_db"] <= FLAG_DB and row["loss_all_db"] <= FLAG_DB
    return rows


def _winner(summary: list[dict]) -> dict:
    candidates = summary[1:]
    qualified = [row for row in candidates if row["within_flag"]]
    if qualified:
        best = max(qualified, key=lambda r: (r["merge_rate"] or 0.0, r["psnr_truth_all"]))
        why = f"highest merge rate within {FLAG_DB} dB of dense"
    else:
        best = max(candidates, key=lambda r: r["psnr_truth_all"])
        why = f"no combination stays within {FLAG_DB} dB of dense: the highest PSNR against the truth"
    return {"name": best["name"], "choice": best["choice"], "reason": why}


def format_table(report: dict) -> str:
    s = report["settings"]
    header = ("TempCache (keys/heads/scope/τ)", "PSNR truth 32", "PSNR truth all", "PSNR dense 32", "PSNR dense all",
              "loss 32", "loss all", "merge rate", "cache kept", "s")  # fmt: skip
    lines = [header]
    for row in report["summary"]:
        lines.append(
            (
                row["name"] + (" *" if row["name"] == report["winner"]["name"] else ""),
                f"{row['psnr_truth_first32']:.2f}",
                f"{row['psnr_truth_all']:.2f}",
                "-" if row["choice"] is None else f"{row['psnr_dense_first32']:.2f}",
                "-" if row["choice"] is None else f"{row['psnr_dense_all']:.2f}",
                f"{row['loss_first32_db']:+.2f}",
                f"{row['loss_all_db']:+.2f}",
                "-" if row["merge_rate"] is None else f"{row['merge_rate']:.3f}",
                f"{row['cache_fraction']:.3f}",
                f"{row['seconds']:.2f}",
            )
        )
    winner = report["winner"]
    return "\n".join(
        [
            f"world model {report['model']} on {report['device']} ({report['dtype']}): {s['frames']} predicted frames "
            f"from {s['context']} true ones, chunks of {s['chunk_frames']}, mean over {s['seeds']} world(s); PSNR in dB "
            f"(32: first {s['first']} frames), loss = dense - this vs truth, cache kept = cache tokens / dense's",
            align(lines),
            f"winner: {winner['name']} ({winner['reason']})",
        ]
    )


if __name__ == "__main__":
    main()
