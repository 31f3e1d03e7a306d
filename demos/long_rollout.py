"""Long autoregressive rollouts with ``CausalWanPipeline``: dense KV cache vs rolling window vs TempCache.

Generates one video per method (same seed, same prompt) chunk by chunk and measures every chunk:

- ``dense``: the full KV cache of every earlier chunk (exact; cost grows with the video),
- ``window``: Self-Forcing's rolling window (``--window-frames`` latent frames, the first
  ``--sink-frames`` kept as attention sinks),
- ``tempcache``: TempCache's merged cache (``vidaccel.TempCacheConfig``; ``--threshold``,
  ``--max-tokens``, same sinks).

It writes to ``--out``: ``<method>.mp4`` (OpenCV's writer where imageio-ffmpeg is missing),
``rollout.png`` (per-chunk latency and memory of each method) and ``report.json`` (settings,
per-chunk latency, KV-cache size and peak GPU memory, and each video's fidelity against dense),
and prints a table. Models:

- ``--checkpoint PATH``: a ``CausalWanPipeline`` in diffusers format (e.g. a Self-Forcing
  checkpoint converted to diffusers; ``--prompt`` is encoded by its text encoder);
- ``--random-weights``: a Wan2.1-1.3B-shaped transformer (30 layers, 12 heads × 128) with random
  weights, no VAE and random prompt embeddings. It runs at the latent shapes of the requested pixel
  size (``--height``/``--width`` / 8, ``(--frames - 1) / 4 + 1`` latent frames), and its "video" is
  a visualisation of the latents (a fixed projection of the 16 channels to RGB), not pixels: the
  point is speed and memory at real shapes;
- ``--tiny``: a tiny random Wan (2 layers, with the tiny VAE) that runs in seconds on a CPU.

    python demos/long_rollout.py --random-weights --frames 161 --methods dense,window,tempcache
    python demos/long_rollout.py --tiny --out out/rollout
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import vidaccel
from vidaccel.metrics import psnr, relative_error
from vidaccel.pipelines import CausalWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds
from vidaccel.pipelines.tiny import WAN21_1_3B_CONFIG

METHODS = ("dense", "window", "tempcache")
FPS = 16
VIEW_SIZE = 256  # written videos are upscaled (nearest) to at least this short side
PROMPT_TOKENS = 512  # Wan pads T5 prompts to 512 tokens
VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # the Wan VAE's compression, emulated by --random-weights


def main(argv=None) -> dict:
    args = _parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    pipe, prompt, size = _build(args, device, dtype)
    pipe.set_progress_bar_config(disable=True)

    runs = {}
    for method in args.methods:
        _install(pipe, method, args)
        runs[method] = _rollout(pipe, prompt, size, method, args, device)
    vidaccel.remove(pipe)

    clips = {method: run.pop("video") for method, run in runs.items()}
    if "dense" in clips:
        for method, clip in clips.items():
            runs[method]["fidelity_vs_dense"] = _fidelity(clip, clips["dense"], visualised=pipe.vae is None)
    views = {method: _view(clip, pipe.vae is None) for method, clip in clips.items()}
    report = {
        "model": "checkpoint" if args.checkpoint else "random-weights" if args.random_weights else "tiny",
        "video": "latent visualisation (no VAE)" if pipe.vae is None else "decoded frames",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "settings": {
            "frames": args.frames,
            "size": list(size),
            "chunk_frames": args.chunk_frames,
            "window_frames": args.window_frames,
            "sink_frames": args.sink_frames,
            "threshold": args.threshold,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        },
        "videos": _write_videos(args.out, views),
        "plot": _plot(args.out / "rollout.png", runs),
        "methods": runs,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(_table(report))
    return report


def _build(args, device, dtype):
    """``(pipeline, prompt kwargs, (height, width, frames) passed to it)``."""
    if args.checkpoint:
        pipe = CausalWanPipeline.from_pretrained(args.checkpoint, torch_dtype=dtype).to(device)
        return pipe, {"prompt": args.prompt}, (args.height, args.width, args.frames)
    if args.tiny:
        base = build_tiny_wan_pipeline(seed=args.seed, heads=2, head_dim=64, dtype=dtype, device=device)
        pipe = CausalWanPipeline(base.transformer, base.scheduler, vae=base.vae)
        return (
            pipe,
            {"prompt_embeds": tiny_prompt_embeds(base, seed=args.seed + 1)},
            (args.height, args.width, args.frames),
        )
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        transformer = WanTransformer3DModel(**WAN21_1_3B_CONFIG).to(device=device, dtype=dtype).eval()
    pipe = CausalWanPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=5.0))
    embeds = torch.randn(
        1, PROMPT_TOKENS, WAN21_1_3B_CONFIG["text_dim"], generator=torch.Generator().manual_seed(args.seed + 1)
    )
    latent_frames = (args.frames - 1) // VAE_TEMPORAL + 1
    size = (args.height // VAE_SPATIAL, args.width // VAE_SPATIAL, latent_frames)
    return pipe, {"prompt_embeds": embeds.to(device=device, dtype=dtype)}, size


def _install(pipe: CausalWanPipeline, method: str, args) -> None:
    if method == "tempcache":
        budget = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
        vidaccel.apply(
            pipe, vidaccel.TempCacheConfig(threshold=args.threshold, sink_frames=args.sink_frames, **budget)
        )
    else:
        vidaccel.remove(pipe)  # back to the pipeline's DenseProcessor


def _rollout(pipe, prompt, size, method, args, device) -> dict:
    """One streamed generation after a warm-up rollout (kernel compilation, allocator): per-chunk
    latency and memory, and the video (frames or latents)."""
    height, width, frames = size
    options = dict(
        **prompt,
        height=height,
        width=width,
        chunk_frames=args.chunk_frames,
        output_type="latent" if pipe.vae is None else "np",
    )
    if method == "window":
        options.update(max_cache_frames=args.window_frames, sink_frames=args.sink_frames)
    warmup = args.warmup_chunks * args.chunk_frames
    if warmup:
        warmup_frames = warmup if pipe.vae is None else (warmup - 1) * pipe.vae_scale_factor_temporal + 1
        for _ in pipe.stream(num_frames=min(frames, warmup_frames), **options):
            pass
    stream = pipe.stream(num_frames=frames, generator=torch.Generator().manual_seed(args.seed), **options)
    chunks, pieces = [], []
    _sync(device)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for out in stream:
        _sync(device)
        now = time.perf_counter()
        cache = pipe.kv_cache_stats()
        chunks.append(
            {
                "chunk": len(chunks),
                "latency_s": now - start,
                "kv_cache_bytes": cache.get("nbytes", 0),
                "kv_cache_tokens_per_layer": cache.get("first_layer", {}).get("tokens", 0),
                "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            }
        )
        pieces.append(out.frames)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
    video = (
        torch.cat(pieces, dim=2).float().cpu().numpy() if pipe.vae is None else np.concatenate(pieces, axis=1)
    )
    latencies = [c["latency_s"] for c in chunks]
    return {
        "chunks": chunks,
        "total_s": sum(latencies),
        "last_chunk_over_first_cached": latencies[-1] / latencies[1] if len(latencies) > 1 else None,
        "video": video,
    }


def _fidelity(clip: np.ndarray, dense: np.ndarray, *, visualised: bool) -> dict:
    if visualised:  # latents: the relative error is the meaningful figure
        return {"latent_relative_error": relative_error(clip, dense)}
    return {"psnr_db": psnr(clip, dense), "max_abs_diff": float(np.abs(clip - dense).max())}


def _view(clip: np.ndarray, latent: bool) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` in ``[0, 1]`` to write: decoded frames, or latents ``[1, C, F, h, w]``
    projected to RGB by a fixed random matrix and stretched by their 1st/99th percentiles."""
    if not latent:
        return clip[0]
    channels = clip.shape[1]
    projection = np.random.default_rng(0).standard_normal((channels, 3)) / math.sqrt(channels)
    rgb = np.einsum("cfhw,cd->fhwd", clip[0], projection)
    low, high = np.percentile(rgb, [1, 99])
    return np.clip((rgb - low) / max(high - low, 1e-6), 0.0, 1.0)


def _write_videos(out: Path, clips: dict[str, np.ndarray]) -> dict[str, str]:
    written = {}
    for name, frames in clips.items():
        scale = max(1, math.ceil(VIEW_SIZE / min(frames.shape[1:3])))
        frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
        path = out / f"{name}.mp4"
        if importlib.util.find_spec("imageio_ffmpeg") is not None:
            import imageio.v2 as imageio

            imageio.mimwrite(path, list(frames), fps=FPS, macro_block_size=1)
        else:
            import cv2

            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, frames.shape[2:0:-1])
            for frame in frames:
                writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
            writer.release()
        written[name] = path.name
    return written


def _plot(path: Path, runs: dict) -> str:
    """A PNG with two panels over the chunk index: latency (ms) and memory (MiB: peak GPU memory on
    CUDA, else the KV caches' size), one line per method. Drawn with PIL (no plotting dependency)."""
    colors = {"dense": (214, 39, 40), "window": (31, 119, 180), "tempcache": (44, 160, 44)}
    on_gpu = any(c["peak_gpu_bytes"] is not None for run in runs.values() for c in run["chunks"])
    memory_key, memory_name = (
        ("peak_gpu_bytes", "peak GPU memory") if on_gpu else ("kv_cache_bytes", "KV cache")
    )
    panels = [
        ("latency per chunk (ms)", lambda c: c["latency_s"] * 1e3),
        (f"{memory_name} per chunk (MiB)", lambda c: c[memory_key] / 2**20),
    ]
    width, height, margin = 560, 320, 56
    image = Image.new("RGB", (width * len(panels), height + 30), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, value) in enumerate(panels):
        left, right, top, bottom = index * width + margin, (index + 1) * width - 16, 28, height - 30
        series = {m: [value(c) for c in run["chunks"]] for m, run in runs.items()}
        top_value = max((max(s) for s in series.values() if s), default=1.0) * 1.1 or 1.0
        count = max(len(s) for s in series.values())
        draw.text((left, 8), title, fill="black")
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        for tick in range(5):
            y = bottom - (bottom - top) * tick / 4
            draw.text((index * width + 4, y - 6), f"{top_value * tick / 4:.4g}", fill="black")
        draw.text(((left + right) // 2 - 20, bottom + 6), "chunk", fill="black")
        for method, values in series.items():
            points = [
                (left + (right - left) * i / max(count - 1, 1), bottom - (bottom - top) * v / top_value)
                for i, v in enumerate(values)
            ]
            if len(points) > 1:
                draw.line(points, fill=colors.get(method, (0, 0, 0)), width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors.get(method, (0, 0, 0)))
    for slot, method in enumerate(runs):
        x, color = margin + 110 * slot, colors.get(method, (0, 0, 0))
        draw.line([(x, height + 16), (x + 18, height + 16)], fill=color, width=3)
        draw.text((x + 24, height + 10), method, fill=color)
    image.save(path)
    return path.name


def _table(report: dict) -> str:
    lines = [
        f"long rollout: {report['model']} model ({report['video']}), {report['device']} {report['dtype']}, "
        f"size (h, w, frames) {report['settings']['size']}",
        f"{'method':<10} {'chunks':>6} {'total s':>8} {'first ms':>9} {'last ms':>8} {'last/2nd':>8} "
        f"{'cache MiB':>9} {'fidelity vs dense':>20}",
    ]
    for method, run in report["methods"].items():
        chunks = run["chunks"]
        fidelity = run.get("fidelity_vs_dense", {})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in fidelity.items())
        ratio = run["last_chunk_over_first_cached"]
        lines.append(
            f"{method:<10} {len(chunks):>6} {run['total_s']:>8.2f} {chunks[0]['latency_s'] * 1e3:>9.1f} "
            f"{chunks[-1]['latency_s'] * 1e3:>8.1f} {'-' if ratio is None else f'{ratio:.2f}':>8} "
            f"{chunks[-1]['kv_cache_bytes'] / 2**20:>9.2f} {shown:>20}"
        )
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a CausalWanPipeline (diffusers format) directory or hub id")
    model.add_argument(
        "--random-weights", action="store_true", help="Wan2.1-1.3B shapes, random weights, no VAE"
    )
    model.add_argument(
        "--tiny", action="store_true", help="a tiny random Wan with the tiny VAE (CPU, seconds)"
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="output frames (4k+1); default 161 on CUDA, small on CPU"
    )
    parser.add_argument("--height", type=int, default=None, help="pixels; default 480 (tiny: 32)")
    parser.add_argument("--width", type=int, default=None, help="pixels; default 832 (tiny: 48)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk")
    parser.add_argument(
        "--window-frames", type=int, default=None, help="rolling window in latent frames (default 21, tiny 3)"
    )
    parser.add_argument(
        "--sink-frames",
        type=int,
        default=None,
        help="sink frames of window and TempCache (default 3, tiny 1)",
    )
    parser.add_argument("--threshold", type=float, default=0.95, help="TempCache merge threshold (cosine)")
    parser.add_argument("--max-tokens", type=int, default=None, help="TempCache budget per layer and head")
    parser.add_argument(
        "--prompt", default="A red panda walks through a bamboo forest, cinematic", help="with --checkpoint"
    )
    parser.add_argument(
        "--warmup-chunks", type=int, default=2, help="chunks of the warm-up rollout per method"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("out/long_rollout"))
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(
            f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}"
        )
    args.methods = methods
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.frames = args.frames or (161 if cuda and not args.tiny else 25 if args.tiny else 13)
    args.height = args.height or (32 if args.tiny else 480)
    args.width = args.width or (48 if args.tiny else 832)
    args.window_frames = args.window_frames or (3 if args.tiny else 21)
    args.sink_frames = args.sink_frames if args.sink_frames is not None else (1 if args.tiny else 3)
    return args


if __name__ == "__main__":
    main()
