"""Pool the long-rollout sweep's reports over several action walks (a script, not a test).

``bench_world_model_long.py`` rolls one batch of worlds out along one action walk: with ``--seed W``
every world of the batch (W, W+1, ...) follows walk W. Whether a setting keeps the video alive
depends on the walk (long straight runs are where a world model draws the most of the view itself),
so ``benchmarks/results/world_model_stability.md`` pools every setting over several walks:

    python benchmarks/bench_world_model_long.py --frames 1000 --context-timesteps 0 --caches 8 \\
        --seeds 8 --seed 0 --out out/w0.json                   # and --seed 8, 32, 40 into w8, w32, w40
    python benchmarks/pool_world_model_long.py out/w0.json out/w8.json out/w32.json out/w40.json
    python benchmarks/pool_world_model_long.py out/w*.json --json out/pooled.json

For each setting (row name) that every report holds, one Markdown row: PSNR over the first 32
frames per walk; worlds alive against each world's own range and against the level's (every frame's
mean, std and edge strength within it; NaN frames fail); the level's alive worlds checking mean and
std only (the issue's literal two statistics); and the frames outside the level's range per
statistic, below and above. The counts are ``vidaccel.pipelines.evaluation.range_check`` on each world's
per-frame statistics and the report's ranges, so reports written before the bench counted frames
out pool as well. ``--level-worlds N`` re-checks against the level's range from N worlds' walks
joined with each world's own (reports written before the level's range came from 512 worlds stored
the range of 32).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # as bench_world_model_long.py: nothing here runs a kernel

from vidaccel.pipelines.evaluation import ALIVE_STATISTICS, joined_range, level_frame_range, pool_reports  # noqa: E402


def format_table(pooled: list[dict]) -> str:
    lines = [
        "| setting | walks | PSNR 32 per walk | world: alive | world: in range % mean / std / edge "
        "| level: alive | level: alive, mean and std only | level: frames out, mean / std / edge below-above |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in pooled:
        out = p["level"]["frames_out"]
        counts = " / ".join(f"{out[f'{k}_below']}-{out[f'{k}_above']}" for k in ALIVE_STATISTICS)
        if out["nan"]:
            counts += f", NaN {out['nan']}"
        lines.append(
            f"| {p['name']} | {', '.join(map(str, p['walks']))} | "
            + ", ".join("-" if v is None else f"{v:.2f}" for v in p["psnr_first32"])
            + f" | {p['world']['alive_worlds']}/{p['worlds']} | "
            + " / ".join(f"{100 * p['world']['in_range'][k]:.1f}" for k in ALIVE_STATISTICS)
            + f" | {p['level']['alive_worlds']}/{p['worlds']} | {p['level']['alive_worlds_mean_std']}/{p['worlds']} "
            f"| {counts} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "reports", nargs="+", type=Path, help="bench_world_model_long.py JSON reports, one per walk"
    )
    parser.add_argument(
        "--rows", default=None, help="comma-separated setting names (default: every shared one)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the pooled rows here")
    parser.add_argument(
        "--level-worlds",
        type=int,
        default=None,
        help="re-check against the level's range from this many worlds' walks (level_frame_range, "
        "joined with each world's own range) instead of the range each report stored",
    )
    args = parser.parse_args(argv)
    if args.level_worlds is not None and args.level_worlds < 1:
        parser.error(f"--level-worlds must be >= 1, got {args.level_worlds}")
    reports = []
    for path in args.reports:
        try:
            report = json.loads(path.read_text())
            report["rows"][0]["per_world"], report["level_ranges"], report["settings"]["seeds_list"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            parser.error(f"{path} is not a bench_world_model_long.py report: {error!r}")
        if args.level_worlds is not None:  # the sweep's worlds are all of level 0
            level = level_frame_range(0, args.level_worlds)
            report["level_ranges"] = [joined_range(own, level) for own in report["ranges"]]
        reports.append(report)
    try:
        pooled = pool_reports(reports, None if args.rows is None else args.rows.split(","))
    except ValueError as error:
        parser.error(str(error))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(pooled, indent=1) + "\n")
    print(format_table(pooled))
    return pooled


if __name__ == "__main__":
    main()
