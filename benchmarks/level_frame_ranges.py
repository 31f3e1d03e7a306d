"""Write ``assets/level_frame_ranges.json``: each world's true-frame range for the level check.

The stays-alive check of long rollouts reads "within the range of true frames" two ways: the
world's own true frames, or any true frame of the level (``vidaccel.pipelines.evaluation.level_frame_range``).
The level's range is the union of :data:`REFERENCE_FRAMES`-frame random walks in many worlds; it
keeps widening as worlds are added, so the check uses many (``LEVEL_WORLDS``, 512). The game is
deterministic, so the per-world ranges are computed once, in parallel, and stored:

    python benchmarks/level_frame_ranges.py                       # 512 worlds x 4 levels (~8 min on 2 cores)
    python benchmarks/level_frame_ranges.py --worlds 64 --levels 0 --out /tmp/ranges.json

Prints, per level, the range over the first 32, 64, ... worlds (how far it has converged).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # nothing here runs a kernel

from vidaccel.pipelines.evaluation import (  # noqa: E402
    LEVEL_RANGES,
    LEVEL_WORLDS,
    REFERENCE_FRAMES,
    joined_range,
    level_ranges,
    stored_walk_ranges,
)
from vidaccel.pipelines.game import LEVELS  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--worlds", type=int, default=LEVEL_WORLDS, help=f"worlds per level (default {LEVEL_WORLDS})"
    )
    parser.add_argument(
        "--levels", default=",".join(str(i) for i in range(len(LEVELS))), help="comma-separated"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=LEVEL_RANGES)
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.worlds < 1:
        parser.error(f"--worlds must be >= 1, got {args.worlds}")
    if any(not 0 <= level < len(LEVELS) for level in levels):
        parser.error(f"--levels must be in [0, {len(LEVELS) - 1}], got {args.levels}")
    stored = {
        "reference_frames": REFERENCE_FRAMES,
        "worlds": args.worlds,
        "note": "per level, each world's [low, high] of the per-frame mean, std and edge strength over its "
        "reference walk (vidaccel.pipelines.evaluation.walk_range, worlds 0 .. worlds - 1); level_frame_range joins them",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "levels": level_ranges(levels, args.worlds, args.workers),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stored, separators=(",", ":")) + "\n")
    for level, entry in stored["levels"].items():
        n = 32
        while True:
            n = min(n, args.worlds)
            joined = joined_range(*stored_walk_ranges(int(level), n, path=args.out))  # as the check reads it
            print(f"level {level} ({entry['name']}), {n} worlds: "
                  + ", ".join(f"{k} {lo:.4f}-{hi:.4f}" for k, (lo, hi) in joined.items()), flush=True)  # fmt: skip
            if n == args.worlds:
                break
            n *= 2
    print(f"wrote {args.out}")
    return stored


if __name__ == "__main__":
    main()
