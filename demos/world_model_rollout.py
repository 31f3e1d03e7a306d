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
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import vidaccel
from vidaccel.metrics import frame_statistics, psnr, ssim
from vidaccel.pipelines.causal_wan import check_denoising_timesteps, check_eta
from vidaccel.pipelines.game import ACTIONS, GameEnv, parse_actions, random_actions, scripted_actions
from vidaccel.pipelines.world_model import (
    BEST_WORLD_MODEL,
    DEFAULT_WORLD_MODEL,
    LEVEL_FRAME_RANGES,
    WorldModelPipeline,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_rollout import parse_methods, plot_chunks, plot_lines, timed_chunks, write_video  # noqa: E402

HAS_FLASHBLOCK = hasattr(vidaccel, "FlashBlockConfig")
COMBINABLE = ("rolling", "tempcache", "annsa", "annca", *(("flashblock",) if HAS_FLASHBLOCK else ()))
METHODS = ("dense", *COMBINABLE)
FIRST = 32  # the quality bars' "first 32 predicted frames"
FLAG_DB = 0.5  # a method losing more than this against dense over the first 32 frames is flagged
COPY_LAST_MARGIN_DB = 2.0  # dense must beat the copy-last-frame baseline by this much
REFERENCE_FRAMES = 1000  # true frames of the stays-alive range beyond the clip's own
ALIVE_STATISTICS = ("mean", "std", "edge")  # per-frame statistics the stays-alive check bounds
LEVEL_WORLDS = 512  # worlds whose random walks give a level's range (level_frame_range)
LEVEL_RANGES = LEVEL_FRAME_RANGES  # assets/level_frame_ranges.json, package data of vidaccel
"""Each world's walk range (:func:`walk_range`) for ``LEVEL_WORLDS`` worlds of every level, stored
because the game is deterministic and 512 walks take minutes (``benchmarks/level_frame_ranges.py``)."""
FPS = 16
# The plots' reference lines (the methods take the shared method colours).
REFERENCE_COLORS = {
    "truth": (0, 0, 0),
    "copy last frame": (150, 150, 150),
    "world range low": (150, 150, 150),
    "world range high": (150, 150, 150),
    "level range low": (210, 110, 110),
    "level range high": (210, 110, 110),
}
VIEW_SCALE = 4  # default upscaling (nearest) of the 64x64 panels in the video and the PNG
LABEL_HEIGHT = 16
GAP = 4  # pixels between panels
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
    meta = pipe.metadata
    rollout_window(args, meta)
    _check_window(parser, args)
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
    context_frames, truth_pred = truth[:context], truth[context:].astype(np.float32) / 255.0

    true_range = true_frame_range(truth, args.seed, args.level)
    level_range = joined_range(true_range, level_frame_range(args.level))
    runs, videos = {}, {}
    for method in args.methods:
        configs, rollout_kwargs = method_configs(method, args)
        chunks, videos[method] = run_method(
            pipe,
            configs,
            context_frames,
            context_actions,
            actions,
            level=args.level,
            seed=args.seed,
            warmup_chunks=args.warmup_chunks,
            **({} if args.timesteps is None else {"denoising_timesteps": args.timesteps}),
            **({} if args.eta is None else {"eta": args.eta}),
            **({} if args.shift is None else {"shift": args.shift}),
            **rollout_kwargs,
        )
        runs[method] = {
            "configs": [repr(config) for config in configs],
            "rollout_kwargs": rollout_kwargs,
            **_timing(chunks),
            "vs_truth": _fidelity(videos[method], truth_pred),
            **_alive(videos[method], true_range, level_range),
        }
        _write_progress(args.out / "progress.json", method, runs[method])
    vidaccel.remove(pipe)

    copy_last = np.broadcast_to(context_frames[-1].astype(np.float32) / 255.0, truth_pred.shape)
    baseline = _fidelity(copy_last, truth_pred)
    for method, video in videos.items():
        run = runs[method]
        if "dense" in videos:
            dense = runs["dense"]
            run["speedup_vs_dense"] = dense["total_s"] / run["total_s"]
            run["vs_dense"] = {
                "psnr_first32": _finite(psnr(video[:FIRST], videos["dense"][:FIRST])),
                "psnr_all": _finite(psnr(video, videos["dense"])),
                "identical": bool(np.array_equal(video, videos["dense"])),
            }
            loss = psnr(videos["dense"][:FIRST], truth_pred[:FIRST]) - psnr(video[:FIRST], truth_pred[:FIRST])
            run["loss_vs_dense_first32_db"] = _finite(loss)
            run["flagged"] = not loss <= FLAG_DB  # a NaN video (NaN loss) is flagged too

    report = {
        "model": {
            "path": "random weights"
            if args.random_weights
            else str(args.model or f"shipped ({DEFAULT_WORLD_MODEL.name})"),
            "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            "training": meta.get("training"),
        },
        "device": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu",
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "settings": {
            "frames": args.frames,
            "context": context,
            "chunk_frames": chunk_frames,
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
            "sampler": pipe.sampler
            | {
                k: v
                for k, v in (
                    ("denoising_timesteps", args.timesteps),
                    ("eta", args.eta),
                    ("shift", args.shift),
                )
                if v is not None
            },
        },
        "actions": {"context": context_actions, "predicted": actions},
        "copy_last_frame": baseline,
        "true_range": true_range,
        "level_range": level_range,
        "quality_bars": _quality_bars(runs, baseline),
        "methods": runs,
    }
    report["files"] = {
        "video": write_video(
            args.out / "side_by_side.mp4", _side_by_side_frames(truth_pred, videos, args.view_scale), FPS
        ),
        "frame_png": _frame_png(
            args.frame_png or args.out / "frame.png", truth_pred, videos, args.frame_index
        ),
        "latency_memory_plot": plot_chunks(args.out / "latency_memory.png", runs),
        "psnr_plot": plot_lines(
            args.out / "psnr.png",
            [("PSNR vs truth per predicted frame (dB)", _psnr_series(runs, baseline))],
            x_label="predicted frame",
            from_zero=False,
            colors=REFERENCE_COLORS,
        ),
        "alive_plot": plot_lines(
            args.out / "alive.png",
            _alive_panels(runs, truth_pred, true_range, level_range),
            x_label="predicted frame",
            from_zero=False,
            colors=REFERENCE_COLORS,
        ),
        "report_md": "report.md",
    }
    report["wall_s"] = time.perf_counter() - started  # the whole script, model loading to plots
    (args.out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    table = format_table(report)
    (args.out / "report.md").write_text(table + "\n")
    print(table)
    return report


def rollout_actions(spec, context: int, frames: int, seed: int) -> tuple[list[int], list[int]]:
    """``(context actions, predicted frames' actions)`` for ``--actions``.

    ``"random"`` / ``"scripted"`` draw one sequence for the whole clip (:func:`random_actions` with
    ``seed``, :func:`scripted_actions`); anything else (a file path, a comma-separated string, a list
    of names/ids) is read by :func:`parse_actions` and holds the ``frames`` predicted frames' actions,
    and the context is played with the random walk. The reset frame's action is ``noop`` (the game's convention).
    Raises ``ValueError`` for an unknown action or a wrong number of them."""
    if spec in ("random", "scripted"):
        whole = (
            random_actions(context + frames, seed=seed)
            if spec == "random"
            else scripted_actions(context + frames)
        )
        context_actions, actions = whole[:context], whole[context:]
    else:
        actions = parse_actions(spec, num_frames=frames)
        context_actions = random_actions(context, seed=seed)
    return [ACTIONS.index("noop"), *context_actions[1:]], actions


def world_batch(seeds: list[int], context: int, frames: int, action_seed: int):
    """Game worlds ``seeds`` played with one random action walk (seeded by ``action_seed``):
    ``(context_actions, actions, truth uint8 [W, context + frames, 64, 64, 3], predicted truth float32
    [W, frames, 64, 64, 3] in [0, 1])``; the benchmarks roll the worlds out as one batch."""
    context_actions, actions = rollout_actions("random", context, frames, action_seed)
    truth = np.stack([play(seed, 0, context_actions, actions) for seed in seeds])
    return context_actions, actions, truth, truth[:, context:].astype(np.float32) / 255.0


def play(seed: int, level: int, context_actions: list[int], actions: list[int]) -> np.ndarray:
    """The game's true frames, uint8 ``[T0 + F, 64, 64, 3]``: the reset frame, then one per action
    after the first context action (the reset frame's)."""
    env = GameEnv(seed=seed, level=level)
    return np.concatenate([env.reset()[None], env.rollout(context_actions[1:] + actions)])


def run_method(
    pipe: WorldModelPipeline,
    configs: list,
    context_frames: np.ndarray,
    context_actions: list[int],
    actions: list[int],
    *,
    level: int = 0,
    seed: int = 0,
    warmup_chunks: int = 0,
    **rollout_kwargs,
) -> tuple[list[dict], np.ndarray]:
    """One timed rollout of ``len(actions)`` frames with ``configs`` installed (none: dense), after an
    untimed warm-up rollout of ``warmup_chunks`` chunks (first-call costs: kernel compilation, the
    allocator); ``-> (per-chunk records of timed_chunks, predicted frames float32 [F, 64, 64, 3] in
    [0, 1])``. Context frames ``[B, T0, 64, 64, 3]`` roll out a batch (shared actions) and return
    ``[B, F, 64, 64, 3]``. The pipeline is left on its ``DenseProcessor``."""
    if configs:
        vidaccel.apply(pipe, *configs)

    def stream(num_frames):
        return pipe.stream(
            context_frames,
            actions[:num_frames],
            num_frames,
            context_actions=context_actions,
            level=level,
            generator=torch.Generator().manual_seed(seed),
            **rollout_kwargs,
        )

    try:
        if warmup_chunks:
            for _ in stream(min(len(actions), warmup_chunks * int(pipe.metadata["chunk_frames"]))):
                pass
        chunks, pieces = timed_chunks(pipe, stream(len(actions)), pipe.device)
    finally:
        vidaccel.remove(pipe)  # back to the pipeline's DenseProcessor
    video = np.concatenate(pieces, axis=1).astype(np.float32)  # [B, F, 64, 64, 3]
    return chunks, video if context_frames.ndim == 5 else video[0]


def true_frame_range(truth: np.ndarray, seed: int, level: int) -> dict:
    """``{"mean": [low, high], "std": [low, high], "edge": [low, high]}``: the range of each of
    :func:`frame_statistics` over the true frames ``truth`` (uint8 ``[T, 64, 64, 3]``) and a
    :data:`REFERENCE_FRAMES`-frame random walk in the same world and level."""
    frames = np.concatenate([truth, _reference_walk(seed, level)]).astype(np.float32) / 255.0
    return {key: _bounds(values) for key, values in frame_statistics(frames).items()}


@functools.lru_cache(maxsize=8)
def level_frame_range(level: int, worlds: int = LEVEL_WORLDS) -> dict:
    """The range of each of :func:`frame_statistics` over the true frames of ``level`` in any world:
    :data:`REFERENCE_FRAMES`-frame random walks in ``worlds`` worlds (seeds ``0 .. worlds - 1``). The
    stays-alive check's level reading ("a true frame of this level"), beside the per-world range of
    :func:`true_frame_range` ("a true frame of this world").

    The walks' ranges come from :data:`LEVEL_RANGES` when it holds ``worlds`` worlds of ``level``,
    else they are computed (about half a second per world on one CPU core). Any finite number of
    worlds underestimates the level's range: from 32 to 512 worlds the lowest std of level 0 falls
    from 0.182 to 0.154 (``benchmarks/results/world_model_stability.md``, section 9)."""
    ranges = stored_walk_ranges(level, worlds)
    if ranges is None:
        ranges = [walk_range(seed, level) for seed in range(worlds)]
    return joined_range(*ranges)


def walk_range(seed: int, level: int) -> dict:
    """``{statistic: [low, high]}`` over the true frames of world ``seed``'s reference walk in
    ``level`` (:func:`_reference_walk`): one world's share of :func:`level_frame_range`."""
    stats = frame_statistics(_reference_walk(seed, level) / 255.0)
    return {key: _bounds(stats[key]) for key in ALIVE_STATISTICS}


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


def _reference_walk(seed: int, level: int) -> np.ndarray:
    """The true frames of a :data:`REFERENCE_FRAMES`-frame random walk in world ``seed`` of ``level``
    (uint8 ``[REFERENCE_FRAMES + 1, 64, 64, 3]``): the stays-alive ranges' reference."""
    return play(seed, level, [ACTIONS.index("noop")], random_actions(REFERENCE_FRAMES, seed=seed + 1))


def joined_range(*ranges: dict) -> dict:
    """The smallest range holding all ``ranges`` (each ``{statistic: [low, high]}``)."""
    return {key: [min(r[key][0] for r in ranges), max(r[key][1] for r in ranges)] for key in ranges[0]}


def method_configs(method: str, args) -> tuple[list, dict]:
    """``(vidaccel configs, extra pipeline arguments)`` of a ``--methods`` item (``"a+b"``: both)."""
    configs, rollout_kwargs = [], {}
    for part in method.split("+"):
        if part == "rolling":
            rollout_kwargs = {"max_cache_frames": args.window_frames, "sink_frames": args.sink_frames}
        elif part == "tempcache":
            overrides = {"threshold": args.threshold, "max_tokens": args.max_tokens}
            configs.append(vidaccel.TempCacheConfig(**{k: v for k, v in overrides.items() if v is not None}))
        elif part == "annsa":
            configs.append(vidaccel.AnnSAConfig(top_p=0.9))
        elif part == "annca":
            configs.append(vidaccel.AnnCAConfig(top_p=0.9))
        elif part == "flashblock":
            configs.append(vidaccel.FlashBlockConfig())
    return configs, rollout_kwargs


def format_table(report: dict) -> str:
    """The Markdown report: settings, one row per method, the baseline and the quality bars."""
    s, bars = report["settings"], report["quality_bars"]
    base = report["copy_last_frame"]
    header = ("method", "total s", "chunk ms", "speed-up", "memory MiB", "merge", "PSNR 32", "PSNR all",
              "SSIM 32", "vs dense 32", "alive", "alive (level)", "flag")  # fmt: skip
    rows = [header, tuple("---" for _ in header)]
    for method, run in report["methods"].items():
        fid, alive = run["vs_truth"], run["alive"]
        memory = run["peak_gpu_bytes"] if run["peak_gpu_bytes"] is not None else run["kv_cache_bytes"]
        vs_dense = run.get("vs_dense", {})
        rows.append(
            (
                method,
                f"{run['total_s']:.2f}",
                f"{run['median_chunk_s'] * 1e3:.1f}",
                _fmt(run.get("speedup_vs_dense"), ".2f", "x"),
                f"{memory / 2**20:.2f}",
                _fmt(run["merge_rate"], ".2f"),
                _fmt(fid["psnr_first32"], ".2f"),
                _fmt(fid["psnr_all"], ".2f"),
                _fmt(fid["ssim_first32"], ".3f"),
                "identical" if vs_dense.get("identical") else _fmt(vs_dense.get("psnr_first32"), ".2f"),
                "pass" if alive["pass"] else "FAIL",
                _level_cell(run["alive_level"]),
                f"loses {_fmt(run['loss_vs_dense_first32_db'], '.2f')} dB" if run.get("flagged") else "",
            )
        )
    rows.append(("copy last frame", "", "", "", "", "", _fmt(base["psnr_first32"], ".2f"), _fmt(base["psnr_all"], ".2f"),
                 _fmt(base["ssim_first32"], ".3f"), "", "", "", ""))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
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


def _timing(chunks: list[dict]) -> dict:
    latencies = [c["latency_s"] for c in chunks]
    peaks = [c["peak_gpu_bytes"] for c in chunks if c["peak_gpu_bytes"] is not None]
    return {
        "total_s": sum(latencies),
        "median_chunk_s": statistics.median(latencies[1:] or latencies),
        "peak_gpu_bytes": max(peaks) if peaks else None,
        "kv_cache_bytes": chunks[-1]["kv_cache_bytes"],
        "merge_rate": chunks[-1]["merge_rate"],
        "chunks": chunks,
    }


def _fidelity(video: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR/SSIM of predicted frames ``[F, H, W, 3]`` in ``[0, 1]`` against the true ones, over the
    first 32 and all frames, and per frame."""
    finite = np.isfinite(video).all()
    return {
        "psnr_first32": _finite(psnr(video[:FIRST], truth[:FIRST])),
        "psnr_all": _finite(psnr(video, truth)),
        "ssim_first32": ssim(video[:FIRST], truth[:FIRST]) if finite else None,
        "ssim_all": ssim(video, truth) if finite else None,
        "per_frame_psnr": [_finite(psnr(frame, true)) for frame, true in zip(video, truth, strict=True)],
    }


def _alive(video: np.ndarray, true_range: dict, level_range: dict | None = None) -> dict:
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
        result[f"per_frame_{key}"] = [_finite(v) for v in series]
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


def _quality_bars(runs: dict, baseline: dict) -> dict:
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


def _psnr_series(runs: dict, baseline: dict) -> dict:
    series = {method: run["vs_truth"]["per_frame_psnr"] for method, run in runs.items()}
    series["copy last frame"] = baseline["per_frame_psnr"]
    return {name: [math.nan if v is None else v for v in values] for name, values in series.items()}


def _level_cell(check: dict) -> str:
    """The report's "alive (level)" cell: pass, mean+std (edge strength left the range), or FAIL."""
    return "pass" if check["pass"] else "mean+std" if check["pass_mean_std"] else "FAIL"


def _alive_panels(runs: dict, truth: np.ndarray, true_range: dict, level_range: dict) -> list:
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


def _side_by_side_frames(truth: np.ndarray, videos: dict, scale: int):
    """Yield uint8 frames: truth | dense | the other methods, each panel labelled and upscaled."""
    for index in range(len(truth)):
        yield _composite(index, truth, videos, scale)


def _composite(index: int, truth: np.ndarray, videos: dict, scale: int) -> np.ndarray:
    panels = {f"truth {index}": truth[index], **{name: video[index] for name, video in videos.items()}}
    size = truth.shape[1] * scale
    width = len(panels) * size + (len(panels) - 1) * GAP
    canvas = Image.new("RGB", (width, size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for slot, (name, frame) in enumerate(panels.items()):
        left = slot * (size + GAP)
        pixels = (np.nan_to_num(np.clip(frame, 0.0, 1.0)) * 255).round().astype(np.uint8)
        panel = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
        canvas.paste(Image.fromarray(panel), (left, LABEL_HEIGHT))
        draw.text((left + 2, 2), name, fill="black")
    return np.asarray(canvas)


def _frame_png(path: Path, truth: np.ndarray, videos: dict, index: int) -> str:
    Image.fromarray(_composite(index % len(truth), truth, videos, VIEW_SCALE)).save(path)
    return str(path)


def _bounds(values: np.ndarray) -> list[float]:
    return [float(values.min()), float(values.max())]


def _finite(value) -> float | None:
    """JSON has no infinity or NaN: those become ``None``."""
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def add_model_arguments(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    """``--model`` (``default``: ``None`` loads ``from_pretrained_world_model()``'s default),
    ``--random-weights`` and ``--device``, which :func:`load_world_model` reads."""
    parser.add_argument(
        "--model",
        type=Path,
        default=default,
        help=f"world-model folder (default: the shipped {(default or DEFAULT_WORLD_MODEL).name})",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the shipped config with random weights (smoke runs, tests)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_world_arguments(
    parser: argparse.ArgumentParser, *, frames: tuple[int, int], seeds: tuple[int, int], batched: bool
) -> None:
    """A world-model benchmark's ``--frames`` and ``--seeds`` (``None`` when not given; ``frames`` and
    ``seeds`` are the (full, quick) defaults the help states); ``batched``: the worlds run as one
    batch, else one after another."""
    parser.add_argument(
        "--frames", type=int, default=None, help=f"predicted frames (default {frames[0]}, quick {frames[1]})"
    )
    how = "rolled out as one batch" if batched else "one after another"
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"game worlds, {how} (default {seeds[0]}, quick {seeds[1]})"
    )


def load_world_model(args: argparse.Namespace) -> WorldModelPipeline:
    """The world model of :func:`add_model_arguments`' options (``args.device`` becomes a ``torch.device``)."""
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = WorldModelPipeline.from_pretrained_world_model(
        args.model, device=args.device, random_weights=args.random_weights
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    return parser


def parse_timesteps(text: str) -> list[float]:
    """A sampler's denoising timesteps from ``"1000,750,500,250"``, checked as the pipeline checks them
    (:func:`~vidaccel.pipelines.causal_wan.check_denoising_timesteps`)."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"timesteps are comma-separated numbers, got {text!r}") from None
    check_denoising_timesteps(values)
    return values


def _check_window(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if None not in (args.sink_frames, args.window_frames) and args.sink_frames >= args.window_frames:
        parser.error(
            f"--sink-frames must be < --window-frames ({args.window_frames}), got {args.sink_frames}"
        )


def rollout_window(args: argparse.Namespace, metadata: dict) -> None:
    """Fill ``--window-frames`` and ``--sink-frames`` left unset from the model's
    ``recommended_rollout`` (the window it was measured stable with), else 21 and 3."""
    recommended = metadata.get("recommended_rollout") or {}
    if args.window_frames is None:
        args.window_frames = int(recommended.get("max_cache_frames", 21))
    if args.sink_frames is None:
        args.sink_frames = int(recommended.get("sink_frames", 3))


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
    _check_window(parser, args)
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
