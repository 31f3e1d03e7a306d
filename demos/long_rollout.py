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
from collections.abc import Iterable, Sequence
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


def _write_videos(out: Path, clips: dict[str, np.ndarray]) -> dict[str, str]:
    written = {}
    for name, frames in clips.items():
        scale = max(1, math.ceil(VIEW_SIZE / min(frames.shape[1:3])))
        frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
        written[name] = write_video(out / f"{name}.mp4", frames, FPS)
    return written


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int) -> str:
    """Write uint8 RGB frames ``[H, W, 3]`` (all one size; any iterable, consumed one frame at a time)
    as an mp4: imageio-ffmpeg where it is installed, else OpenCV's ``mp4v`` writer. Returns the file
    name."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio.v2 as imageio

        with imageio.get_writer(path, fps=fps, macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
    else:
        import cv2

        writer = None
        for frame in frames:
            if writer is None:
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frame.shape[1::-1])
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
        if writer is not None:
            writer.release()
    return path.name


def plot_chunks(path: Path, runs: dict) -> str:
    """A PNG with three panels over the chunk index: latency (ms), memory (MiB: peak GPU memory on
    CUDA, else the KV caches' allocated size) and the KV caches' tokens in use (all layers), one line
    per method."""
    on_gpu = any(c["peak_gpu_bytes"] is not None for run in runs.values() for c in run["chunks"])
    memory_key, memory_name = (
        ("peak_gpu_bytes", "peak GPU memory") if on_gpu else ("kv_cache_bytes", "KV cache")
    )
    panels = [
        (
            "latency per chunk (ms)",
            {m: [c["latency_s"] * 1e3 for c in run["chunks"]] for m, run in runs.items()},
        ),
        (
            f"{memory_name} per chunk (MiB)",
            {m: [c[memory_key] / 2**20 for c in run["chunks"]] for m, run in runs.items()},
        ),
        (
            "KV cache tokens in use (all layers)",
            {m: [c["kv_cache_tokens"] for c in run["chunks"]] for m, run in runs.items()},
        ),
    ]
    return plot_lines(path, panels, x_label="chunk")


SERIES_COLORS = {"dense": (214, 39, 40), "window": (31, 119, 180), "tempcache": (44, 160, 44)}
"""Fixed colours of the methods every plot shows; other series take :data:`PALETTE` colours in order."""
PALETTE = ((255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34),
           (127, 127, 127), (0, 0, 0))  # fmt: skip


def plot_lines(
    path: Path,
    panels: Sequence[tuple[str, dict[str, Sequence[float]]]],
    *,
    x_label: str,
    from_zero: bool = True,
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> str:
    """Draw line panels side by side into a PNG with PIL (no plotting dependency); returns the file name.

    Args:
        panels: ``(title, {series name: y values at x = 0, 1, ...})`` per panel; one colour per series
            name across panels (``colors``, then :data:`SERIES_COLORS`, then :data:`PALETTE` in order),
            one legend below. Non-finite values (inf, NaN) are left out of the lines and the scale.
        x_label: the x axis' name (``"chunk"``, ``"frame"``).
        from_zero: start every y axis at 0; ``False`` spans the data's range.
    """
    names = list(dict.fromkeys(name for _, series in panels for name in series))
    palette = iter(PALETTE * (len(names) // len(PALETTE) + 1))
    known = {**SERIES_COLORS, **(colors or {})}
    color = {name: known[name] if name in known else next(palette) for name in names}
    width, height, margin = 560, 320, 56
    per_row = max(1, (width * len(panels) - margin) // 150)  # legend entries per row
    legend_rows = math.ceil(len(names) / per_row)
    image = Image.new("RGB", (width * len(panels), height + 10 + 20 * legend_rows), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, series) in enumerate(panels):
        left, right, top, bottom = index * width + margin, (index + 1) * width - 16, 28, height - 30
        finite = [v for values in series.values() for v in values if math.isfinite(v)]
        high = max(finite, default=1.0)
        low = 0.0 if from_zero else min(finite, default=0.0)
        pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
        low, high = (0.0 if from_zero else low - pad), high + pad
        count = max((len(values) for values in series.values()), default=1)
        draw.text((left, 8), title, fill="black")
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        for tick in range(5):
            y = bottom - (bottom - top) * tick / 4
            draw.text((index * width + 4, y - 6), f"{low + (high - low) * tick / 4:.4g}", fill="black")
        draw.text((left, bottom + 4), "0", fill="black")
        draw.text((right - 24, bottom + 4), str(count - 1), fill="black")
        draw.text(((left + right) // 2 - 20, bottom + 6), x_label, fill="black")

        def point(i, v, left=left, right=right, top=top, bottom=bottom, low=low, high=high, count=count):
            return left + (right - left) * i / max(count - 1, 1), bottom - (bottom - top) * (v - low) / (
                high - low
            )

        for name, values in series.items():
            segment = []
            for i, v in enumerate([*values, math.nan]):  # a NaN ends every segment
                if math.isfinite(v):
                    segment.append(point(i, v))
                    continue
                if len(segment) > 1:
                    draw.line(segment, fill=color[name], width=2)
                if count <= 64:
                    for x, y in segment:
                        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color[name])
                segment = []
    for slot, name in enumerate(names):
        x, y = margin + 150 * (slot % per_row), height + 16 + 20 * (slot // per_row)
        draw.line([(x, y), (x + 18, y)], fill=color[name], width=3)
        draw.text((x + 24, y - 6), name, fill=color[name])
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


def timed_chunks(pipe: CausalWanPipeline, stream, device: torch.device) -> tuple[list[dict], list]:
    """Consume ``stream`` (``pipe.stream(...)``), timing each chunk: ``-> (records, chunk outputs)``.

    A record per chunk: ``chunk`` (index), ``latency_s`` (wall time from the previous chunk's arrival,
    CUDA-synchronised; the first includes the rollout's set-up), ``kv_cache_bytes`` (all layers' caches
    after the chunk), ``kv_cache_tokens`` (their tokens, summed over layers), ``kv_cache_tokens_per_layer``
    and ``merge_rate`` (the first layer's cache; the
    merge rate only for a merging cache, else ``None``) and ``peak_gpu_bytes`` (peak allocated memory
    during the chunk; ``None`` off CUDA)."""
    chunks, pieces = [], []
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for out in stream:
        _sync(device)
        now = time.perf_counter()
        cache = pipe.kv_cache_stats()
        first_layer = cache.get("first_layer", {})
        chunks.append(
            {
                "chunk": len(chunks),
                "latency_s": now - start,
                "kv_cache_bytes": cache.get("nbytes", 0),
                "kv_cache_tokens": cache.get("tokens", 0),
                "kv_cache_tokens_per_layer": first_layer.get("tokens", 0),
                "merge_rate": first_layer.get("merge_rate"),
                "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            }
        )
        pieces.append(out.frames)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
    return chunks, pieces


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


def parse_methods(spec: str, known: Sequence[str], *, combinable: Sequence[str] = ()) -> list[str]:
    """``"dense,tempcache,annsa+tempcache"`` → ``["dense", "tempcache", "annsa+tempcache"]``.

    Each comma-separated item is one of ``known``, or (when ``combinable`` is given) several names of
    ``combinable`` joined by ``+`` (a combination, run together). Raises ``ValueError`` naming the bad
    item and the allowed names for an unknown name, a name repeated within a combination, a repeated
    item or an empty list.
    """
    methods = [item.strip() for item in spec.split(",") if item.strip()]
    allowed = f"a comma-separated list of {', '.join(known)}" + (
        f" and '+'-joined combinations of {', '.join(combinable)}" if combinable else ""
    )
    if not methods:
        raise ValueError(f"--methods must be {allowed}, got {spec!r}")
    for method in methods:
        parts = [part.strip() for part in method.split("+")]
        ok = (
            method in known
            if len(parts) == 1
            else all(p in combinable for p in parts) and len(set(parts)) == len(parts)
        )
        if not ok:
            raise ValueError(f"--methods must be {allowed}; {method!r} is not")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {spec!r}")
    return ["+".join(part.strip() for part in method.split("+")) for method in methods]


if __name__ == "__main__":
    main()
