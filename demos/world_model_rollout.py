"""World-model rollouts: our small Wan world model, dense and accelerated, against the game's true frames.

The world model (``vidaccel.pipelines.WorldModelPipeline``; by default the best one shipped,
``assets/world_model_long``, on CPU and GPU; ``--model`` takes another, e.g. ``assets/world_model``)
predicts the frames of a procedural game (``vidaccel.pipelines.game``) from true context frames and
the player's actions. This script rolls it out with the same actions the game is played with, once
per method, and measures every method against the game's true frames:

- ``dense``: the full KV cache of every earlier frame, exact attention (the baseline),
- ``rolling``: Self-Forcing's rolling-window cache (``--window-frames`` frames, ``--sink-frames`` sinks),
- ``tempcache``: TempCache's merged KV cache (``vidaccel.TempCacheConfig``; ``--threshold``, ``--max-tokens``),
- ``annsa``: ANN-routed sparse self-attention (``vidaccel.AnnSAConfig(top_p=0.9)``),
- ``annca``: ANN-selected cross-attention to the level tokens (``vidaccel.AnnCAConfig(top_p=0.9)``),
- ``flashblock``: reuse of the attention to earlier chunks across denoising steps
  (``vidaccel.FlashBlockConfig()``; listed when this vidaccel has it),

and ``+``-joined combinations, e.g. ``flashblock+tempcache`` (the configs in that order in one
processor; ``rolling`` combines with anything but ``tempcache``, which has its own budget).
Every method uses the model's sampler (``world_model.json``) unless ``--timesteps`` (and ``--eta``,
the share of fresh noise when a step re-noises, and ``--shift``, the flow shift) give another.

It writes to ``--out``:

- ``side_by_side.mp4``: truth | dense | each other method, labelled, the predicted frames (OpenCV's
  writer where imageio-ffmpeg is missing), and ``frame.png`` (one such frame; ``--frame-png``);
- ``latency_memory.png``: per-chunk latency and memory (peak GPU memory on CUDA, else the KV caches);
- ``psnr.png``: per-frame PSNR against the true frames, each method and the copy-last-frame baseline;
- ``alive.png``: per-frame mean, standard deviation and edge strength of each method's frames against
  two ranges of true frames (the "stays alive" check of long rollouts): the world's (the clip's true
  frames and a 1,000-frame random walk in the same world, so that a short clip's narrow range does not
  fail a healthy rollout) and the level's (1,000-frame walks in 512 worlds of the level, joined with
  the world's: "a true frame of this level");
- ``report.json`` and ``report.md``: per method the total time, per-chunk latency, speed-up over
  dense, peak memory and KV-cache bytes, TempCache's merge rate, PSNR/SSIM against the truth over the
  first 32 predicted frames and overall, PSNR against dense, the stays-alive check against both ranges (pass/fail), and a
  flag on every method that loses more than 0.5 dB against dense over the first 32 frames; the
  copy-last-frame baseline; and the quality bar "dense beats copy-last by >= 2 dB";
- ``progress.json``: each method's summary (time, memory, PSNR, alive) as soon as it finishes, so a
  long rollout stopped early keeps the methods it finished.

It prints the table last. PSNR of a range of frames pools the squared error over those frames (the
metric of ``vidaccel.metrics.psnr``). Fidelity figures describe this small model, not a large one.

    python demos/world_model_rollout.py --out out                       # the default (make demo)
    python demos/world_model_rollout.py --frames 1000 --methods dense,tempcache,rolling,annsa --out out/wm
    python demos/world_model_rollout.py --actions scripted --methods dense,flashblock+tempcache
    python demos/world_model_rollout.py --frames 1000 --methods rolling --window-frames 12 --sink-frames 4 \
        --timesteps 1000,750,500,250,150 --model DIR    # a fine-tuned model, a short window, a lower last step
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import vidaccel
from vidaccel.pipelines.causal_wan import check_eta
from vidaccel.pipelines.cli import (
    add_model_arguments,
    check_window,
    load_world_model,
    parse_methods,
    parse_timesteps,
    rollout_window,
)
from vidaccel.pipelines.evaluation import (
    REFERENCE_COLORS,
    alive,
    alive_panels,
    compare_with_dense,
    fidelity,
    format_table,
    joined_range,
    level_frame_range,
    play,
    psnr_series,
    quality_bars,
    rollout_actions,
    run_method,
    true_frame_range,
)
from vidaccel.pipelines.media import (
    VIEW_SCALE,
    plot_chunks,
    plot_lines,
    side_by_side_frames,
    write_frame_png,
    write_video,
)
from vidaccel.pipelines.runs import COMBINABLE, METHODS, method_configs, timing
from vidaccel.pipelines.world_model import BEST_WORLD_MODEL, DEFAULT_WORLD_MODEL

FPS = 16
# Embedded defaults: CPU (make demo on 2 cores within 5 minutes) and GPU (a longer rollout).
CPU_DEFAULTS = {"frames": 24, "methods": ("dense", "tempcache", "flashblock")}
GPU_DEFAULTS = {
    "frames": 240,
    "methods": ("dense", "tempcache", "rolling", "annsa", "flashblock", "flashblock+tempcache"),
}


def main(argv=None) -> dict:
    started = time.perf_counter()
    parser = _parser()
    args = _parse_args(parser, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "progress.json").unlink(missing_ok=True)
    pipe = load_world_model(args)
    rollout_window(args, pipe.metadata)
    check_window(parser, args)
    clip = _clip(parser, args, pipe.metadata)
    runs, videos = _run_methods(pipe, args, clip)
    vidaccel.remove(pipe)

    copy_last = np.broadcast_to(clip.context_frames[-1].astype(np.float32) / 255.0, clip.truth.shape)
    baseline = fidelity(copy_last, clip.truth)
    compare_with_dense(runs, videos, clip.truth)
    report = {
        "model": {
            "path": "random weights"
            if args.random_weights
            else str(args.model or f"shipped ({DEFAULT_WORLD_MODEL.name})"),
            "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            "training": pipe.metadata.get("training"),
        },
        "device": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu",
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "settings": _settings(args, clip, pipe),
        "actions": {"context": clip.context_actions, "predicted": clip.actions},
        "copy_last_frame": baseline,
        "true_range": clip.true_range,
        "level_range": clip.level_range,
        "quality_bars": quality_bars(runs, baseline),
        "methods": runs,
    }
    report["files"] = _write_files(args, clip, runs, videos, baseline)
    report["wall_s"] = time.perf_counter() - started  # the whole script, model loading to plots
    (args.out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    table = format_table(report)
    (args.out / "report.md").write_text(table + "\n")
    print(table)
    return report


def _clip(parser: argparse.ArgumentParser, args: argparse.Namespace, meta: dict) -> SimpleNamespace:
    """The rollout's actions and true frames: ``context`` (frames), ``context_actions`` and ``actions``,
    ``context_frames`` (uint8), ``truth`` (the predicted frames' truth, float32 in [0, 1]) and the
    world's and the level's stays-alive ranges."""
    chunk_frames = int(meta["chunk_frames"])
    context = args.context if args.context is not None else int(meta["context_frames"])
    if context < chunk_frames or context % chunk_frames:
        parser.error(
            f"--context must be a positive multiple of the model's chunk_frames ({chunk_frames}), got {context}"
        )
    try:
        context_actions, actions = rollout_actions(args.actions, context, args.frames, args.seed)
    except ValueError as error:
        parser.error(f"--actions: {error}")
    truth = play(args.seed, args.level, context_actions, actions)
    true_range = true_frame_range(truth, args.seed, args.level)
    return SimpleNamespace(
        context=context,
        chunk_frames=chunk_frames,
        context_actions=context_actions,
        actions=actions,
        context_frames=truth[:context],
        truth=truth[context:].astype(np.float32) / 255.0,
        true_range=true_range,
        level_range=joined_range(true_range, level_frame_range(args.level)),
    )


def _run_methods(pipe, args: argparse.Namespace, clip: SimpleNamespace) -> tuple[dict, dict]:
    """Roll out every ``--methods`` item: ``({method: run record}, {method: predicted frames})``;
    each finished method's summary goes to ``progress.json`` at once."""
    sampler = _sampler(args)
    runs, videos = {}, {}
    for method in args.methods:
        configs, rollout_kwargs = method_configs(method, args)
        chunks, videos[method] = run_method(
            pipe,
            configs,
            clip.context_frames,
            clip.context_actions,
            clip.actions,
            level=args.level,
            seed=args.seed,
            warmup_chunks=args.warmup_chunks,
            **sampler,
            **rollout_kwargs,
        )
        runs[method] = {
            "configs": [repr(config) for config in configs],
            "rollout_kwargs": rollout_kwargs,
            **timing(chunks),
            "vs_truth": fidelity(videos[method], clip.truth),
            **alive(videos[method], clip.true_range, clip.level_range),
        }
        _write_progress(args.out / "progress.json", method, runs[method])
    return runs, videos


def _sampler(args: argparse.Namespace) -> dict:
    """The sampler options given on the command line (``--timesteps``, ``--eta``, ``--shift``)."""
    given = (("denoising_timesteps", args.timesteps), ("eta", args.eta), ("shift", args.shift))
    return {k: v for k, v in given if v is not None}


def _settings(args: argparse.Namespace, clip: SimpleNamespace, pipe) -> dict:
    """The report's ``settings``: the command line's choices and the sampler the rollouts used."""
    return {
        "frames": args.frames,
        "context": clip.context,
        "chunk_frames": clip.chunk_frames,
        "actions": args.actions,
        "level": args.level,
        "seed": args.seed,
        "methods": args.methods,
        "warmup_chunks": args.warmup_chunks,
        "window_frames": args.window_frames,
        "sink_frames": args.sink_frames,
        "threshold": args.threshold,
        "max_tokens": args.max_tokens,
        "view_scale": args.view_scale,
        "sampler": pipe.sampler | _sampler(args),
    }


def _write_files(args, clip: SimpleNamespace, runs: dict, videos: dict, baseline: dict) -> dict:
    """Write the video, the frame PNG and the plots to ``--out``; the report's ``files``."""
    truth = clip.truth
    lines = dict(x_label="predicted frame", from_zero=False, colors=REFERENCE_COLORS)
    return {
        "video": write_video(
            args.out / "side_by_side.mp4", side_by_side_frames(truth, videos, args.view_scale), FPS
        ),
        "frame_png": write_frame_png(
            args.frame_png or args.out / "frame.png", truth, videos, args.frame_index
        ),
        "latency_memory_plot": plot_chunks(args.out / "latency_memory.png", runs),
        "psnr_plot": plot_lines(
            args.out / "psnr.png",
            [("PSNR vs truth per predicted frame (dB)", psnr_series(runs, baseline))],
            **lines,
        ),
        "alive_plot": plot_lines(
            args.out / "alive.png", alive_panels(runs, truth, clip.true_range, clip.level_range), **lines
        ),
        "report_md": "report.md",
    }


def _write_progress(path: Path, method: str, run: dict) -> None:
    """Append one finished method's summary (of its ``runs`` entry) to ``progress.json`` and print it
    (stderr), so that a long run stopped early keeps what it measured (the report comes at the end)."""
    summary = {
        "total_s": run["total_s"],
        "median_chunk_s": run["median_chunk_s"],
        "peak_gpu_bytes": run["peak_gpu_bytes"],
        "kv_cache_bytes": run["kv_cache_bytes"],
        "merge_rate": run["merge_rate"],
        "psnr_first32": run["vs_truth"]["psnr_first32"],
        "psnr_all": run["vs_truth"]["psnr_all"],
        **{
            name: {k: v for k, v in run[name].items() if not k.startswith("per_frame")}
            for name in ("alive", "alive_level")
        },
    }
    done = json.loads(path.read_text()) if path.exists() else {}
    done[method] = summary
    path.write_text(json.dumps(done, indent=2, allow_nan=False) + "\n")
    print(f"{method}: {json.dumps(summary)}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default=BEST_WORLD_MODEL)
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help=f"predicted frames (default {CPU_DEFAULTS['frames']} on CPU, {GPU_DEFAULTS['frames']} on CUDA)",
    )
    parser.add_argument(
        "--context", type=int, default=None, help="true context frames (default: the model's)"
    )
    parser.add_argument(
        "--actions",
        default="random",
        help="random | scripted | FILE (JSON list or one per line) or a comma-separated list: the predicted frames' actions",
    )
    parser.add_argument(
        "--level", type=int, default=0, help="game level (palette) of the truth and the model"
    )
    parser.add_argument("--seed", type=int, default=0, help="game world, random actions and noise")
    _add_method_arguments(parser)
    _add_output_arguments(parser)
    _add_sampler_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    return parser


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--methods`` and the methods' options (window, TempCache, warm-up)."""
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated {', '.join(METHODS)} and '+'-joined combinations "
        f"(default CPU {','.join(m for m in CPU_DEFAULTS['methods'] if m in METHODS)}; "
        f"CUDA {','.join(m for m in GPU_DEFAULTS['methods'] if set(m.split('+')) <= set(METHODS))})",
    )
    parser.add_argument(
        "--window-frames",
        type=int,
        default=None,
        help="rolling window in frames (default: the model's recommended_rollout in world_model.json, else 21)",
    )
    parser.add_argument(
        "--sink-frames",
        type=int,
        default=None,
        help="sink frames of the rolling window (default: the model's recommended_rollout, else 3)",
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="TempCache threshold (default: the config's)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="TempCache budget per layer and head (default: the config's)",
    )
    parser.add_argument(
        "--warmup-chunks",
        type=int,
        default=None,
        help="chunks of an untimed warm-up rollout per method (default 2 on CUDA, 0 on CPU)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The side-by-side frame PNG's and video's options."""
    parser.add_argument(
        "--frame-png",
        type=Path,
        default=None,
        help="where to write one side-by-side frame (default OUT/frame.png)",
    )
    parser.add_argument(
        "--frame-index", type=int, default=-1, help="predicted frame of --frame-png (default: the last)"
    )
    parser.add_argument(
        "--view-scale",
        type=int,
        default=VIEW_SCALE,
        help=f"video panel upscaling (default {VIEW_SCALE}; 2 for long rollouts)",
    )


def _add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """``--timesteps``, ``--eta`` and ``--shift``: the sampler, else the model's."""
    parser.add_argument(
        "--timesteps",
        default=None,
        help="the sampler's denoising timesteps, comma-separated and decreasing in (0, 1000] "
        "(default: the model's, world_model.json)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="the sampler's share of fresh noise when it re-noises, in [0, 1]: 1 fresh noise (Self-Forcing's "
        "sampler), 0 the flow ODE's Euler step (default: the model's, world_model.json, else 1)",
    )
    parser.add_argument(
        "--shift",
        type=float,
        default=None,
        help="the sampler's flow shift, > 0; above 1 spends more of the steps at high noise: smoother frames "
        "(default: the model's, world_model.json)",
    )


def _parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    args.frames = args.frames if args.frames is not None else defaults["frames"]
    if args.methods is None:
        args.methods = ",".join(m for m in defaults["methods"] if set(m.split("+")) <= set(METHODS))
    try:
        args.methods = parse_methods(args.methods, METHODS, combinable=COMBINABLE)
    except ValueError as error:
        parser.error(str(error))
    if any({"rolling", "tempcache"} <= set(m.split("+")) for m in args.methods):
        parser.error(
            "--methods: rolling cannot be combined with tempcache (TempCache has its own budget and sinks)"
        )
    if args.warmup_chunks is None:
        args.warmup_chunks = 2 if cuda else 0
    for name, low in (
        ("frames", 1),
        ("window_frames", 1),
        ("sink_frames", 0),
        ("warmup_chunks", 0),
        ("view_scale", 1),
    ):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    check_window(parser, args)
    if not -args.frames <= args.frame_index < args.frames:
        parser.error(
            f"--frame-index must be in [-{args.frames}, {args.frames - 1}] (--frames {args.frames}), got {args.frame_index}"
        )
    if args.timesteps is not None:
        try:
            args.timesteps = parse_timesteps(args.timesteps)
        except ValueError as error:
            parser.error(f"--timesteps: {error}")
    if args.eta is not None:
        try:
            check_eta(args.eta)
        except ValueError as error:
            parser.error(f"--eta: {error}")
    if args.shift is not None and not 0 < args.shift < math.inf:
        parser.error(f"--shift must be a float in (0, inf), got {args.shift}")
    if args.actions not in ("random", "scripted") and not args.actions.strip():
        parser.error("--actions must be random, scripted, a file or a comma-separated list of actions")
    return args


if __name__ == "__main__":
    main()
