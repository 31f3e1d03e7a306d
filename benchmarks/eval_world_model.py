"""Held-out PSNR of a trained world model under several samplers (a script, not a test).

The training script (``demos/train_world_model.py``) ends with this evaluation: dense rollouts from
4 true context frames with the true actions on held-out worlds (episode seeds from 1,000,000, never
trained on), mean PSNR over the first predicted frames against copying the last context frame. It
evaluates only the samplers it may choose from. This script runs the same evaluation on a finished
model (its bf16 weights, in fp32) for any flow shifts and step lists, so a sampler change can be
scored on the numbers the training record gives:

    python benchmarks/eval_world_model.py --model assets/world_model_long --shifts 1.0,1.25
    python benchmarks/eval_world_model.py --model DIR --timesteps "1000,750,500,250;1000,500" --json out/eval.json

Prints one line per sampler and the copy-last baseline; ``--json`` writes the evaluation record
(the training record's ``held_out_evaluation`` layout).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("TRITON_INTERPRET", "0")  # nothing here runs a kernel

from vidaccel.pipelines.cli import parse_timesteps  # noqa: E402
from vidaccel.pipelines.training import CONTEXT_FRAMES, Data, Trainer, build_model, evaluate, make_episodes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a world-model folder (world_model.json)")
    parser.add_argument(
        "--timesteps",
        default=None,
        help="step lists separated by ';', each comma-separated (default: the model's world_model.json)",
    )
    parser.add_argument("--shifts", default=None, help="flow shifts, comma-separated (default: the model's)")
    parser.add_argument(
        "--episodes", type=int, default=16, help="held-out episodes (default 16, as training)"
    )
    parser.add_argument("--frames", type=int, default=32, help="predicted frames evaluated (default 32)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="data generation processes")
    parser.add_argument("--device", default=None, help="cuda when present, else cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the evaluation record here")
    args = parser.parse_args(argv)
    metadata_path = args.model / "world_model.json"
    if not metadata_path.is_file():
        raise ValueError(f"--model {args.model} has no world_model.json")
    metadata = json.loads(metadata_path.read_text())
    step_lists = (
        [metadata["denoising_timesteps"]]
        if args.timesteps is None
        else [parse_timesteps(part) for part in args.timesteps.split(";")]
    )
    try:
        shifts = (
            [float(metadata["shift"])] if args.shifts is None else [float(s) for s in args.shifts.split(",")]
        )
    except ValueError:
        raise ValueError(f"--shifts must be comma-separated numbers, got {args.shifts!r}") from None
    if not all(s > 0 for s in shifts):
        raise ValueError(f"--shifts must be > 0, got {shifts}")
    if args.episodes < 1 or args.frames < 1:
        raise ValueError(f"--episodes and --frames must be >= 1, got {args.episodes} and {args.frames}")
    args.samplers = [(tuple(steps), shift) for steps in step_lists for shift in shifts]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    frames, actions, levels = make_episodes(
        args.episodes, CONTEXT_FRAMES + args.frames, args.workers, seed_base=1_000_000
    )
    data = Data(frames, actions, levels, device)
    model = build_model(args.model, False, device)
    trainer = Trainer(device)
    trainer.install(model)
    record = evaluate(trainer, model, data, args.frames, args.samplers)
    record["model"] = str(args.model)
    print(
        f"copy-last context {record['psnr_copy_last_context']:.2f} dB, copy previous true frame "
        f"{record['psnr_copy_previous_true']:.2f} dB",
        flush=True,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
