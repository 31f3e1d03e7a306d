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
import json
import math
from pathlib import Path

import numpy as np
import torch

import vidaccel
from vidaccel.metrics import psnr, relative_error
from vidaccel.pipelines import CausalWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds
from vidaccel.pipelines.cli import parse_methods
from vidaccel.pipelines.media import plot_chunks, write_clips
from vidaccel.pipelines.runs import timed_chunks
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
        "videos": write_clips(args.out, views, fps=FPS, view_size=VIEW_SIZE),
        "plot": plot_chunks(args.out / "rollout.png", runs),
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
        1,
        PROMPT_TOKENS,
        WAN21_1_3B_CONFIG["text_dim"],
        generator=torch.Generator().manual_seed(args.seed + 1),
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
    chunks, pieces = timed_chunks(pipe, stream, device)
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
    try:
        args.methods = parse_methods(args.methods, METHODS)
    except ValueError as error:
        parser.error(str(error))
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.frames = args.frames or (161 if cuda and not args.tiny else 25 if args.tiny else 13)
    args.height = args.height or (32 if args.tiny else 480)
    args.width = args.width or (48 if args.tiny else 832)
    args.window_frames = args.window_frames or (3 if args.tiny else 21)
    args.sink_frames = args.sink_frames if args.sink_frames is not None else (1 if args.tiny else 3)
    return args


if __name__ == "__main__":
    main()
