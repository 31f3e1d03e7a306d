"""Average the weights of two world models of one lineage (a "model soup" of two fine-tunings).

    python demos/average_world_models.py A B --alpha 0.25 --out DIR    # DIR = 0.75 A + 0.25 B

Two fine-tunings of the same initial weights lie close enough in weight space that their average is a
working model between them (Wortsman et al., *Model soups*, 2022). For the world model it trades one
fine-tuning's failure against the other's, e.g. ``0.75 D + 0.25 H`` of a rollout-context fine-tuning
D and D fine-tuned through the deployed window, H (results: ``benchmarks/results/world_model_stability.md``,
section 5.4).

``DIR`` gets ``A``'s ``config.json`` and ``world_model.json`` (its sampler, actions and level tokens),
with ``training`` replaced by the record of the average, and bf16 weights like the shipped ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vidaccel.pipelines.training_run import average_world_models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="world-model folder A")
    parser.add_argument("second", type=Path, help="world-model folder B")
    parser.add_argument(
        "--alpha", type=float, required=True, help="weight of B in [0, 1]: (1 - alpha) A + alpha B"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        out = average_world_models(args.first, args.second, args.alpha, args.out)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {out}: {1 - args.alpha:g} x {args.first} + {args.alpha:g} x {args.second}")


if __name__ == "__main__":
    main()
