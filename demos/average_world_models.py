"""Average the weights of two world models of one lineage (a "model soup" of two fine-tunings).

    python demos/average_world_models.py A B --alpha 0.25 --out DIR    # DIR = 0.75 A + 0.25 B

Two fine-tunings of the same initial weights lie close enough in weight space that their average is a
working model between them (Wortsman et al., *Model soups*, 2022). For the world model it trades one
fine-tuning's failure against the other's: D (rollout-context fine-tuning) keeps contrast but drifts into
texture over 1,000 frames; H (D plus rollouts through the deployed window) keeps the structure but washes
out; ``0.75 D + 0.25 H`` keeps both far longer (``benchmarks/results/world_model_stability.md``).

``DIR`` gets ``A``'s ``config.json`` and ``world_model.json`` (its sampler, actions and level tokens),
with ``training`` replaced by the record of the average, and bf16 weights like the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


def average_world_models(first: Path, second: Path, alpha: float, out: Path) -> Path:
    """Write ``(1 - alpha) * first + alpha * second`` (weights averaged in fp32, stored in bf16) to
    ``out`` with ``first``'s config and metadata. Raises ``ValueError`` for an ``alpha`` outside
    ``[0, 1]``, a folder without weights, or two models of different configs or parameters."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    first, second, out = Path(first), Path(second), Path(out)
    for folder in (first, second):
        for name in (WEIGHTS, "config.json", "world_model.json"):
            if not (folder / name).is_file():
                raise ValueError(f"{folder} is not a world-model folder: it has no {name}")
    configs = [_architecture(folder) for folder in (first, second)]
    if configs[0] != configs[1]:
        raise ValueError(f"{first} and {second} have different configs; only one architecture averages")
    a, b = load_file(first / WEIGHTS), load_file(second / WEIGHTS)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(f"{first} and {second} hold different parameters")
    weights = {
        k: ((1 - alpha) * a[k].float() + alpha * b[k].float()).to(torch.bfloat16).contiguous() for k in a
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / WEIGHTS, metadata={"format": "pt"})
    (out / "config.json").write_text((first / "config.json").read_text())
    metadata = json.loads((first / "world_model.json").read_text())
    metadata["training"] = {
        "average": {"first": str(first), "second": str(second), "alpha": float(alpha)},
        "command": " ".join(["python", *sys.argv]),
        "first_training": metadata.get("training"),
        "second_training": json.loads((second / "world_model.json").read_text()).get("training"),
    }
    metadata.pop("evaluation", None)  # the first model's figures do not describe the average
    (out / "world_model.json").write_text(json.dumps(metadata, indent=1))
    return out


def _architecture(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


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
