"""The main demo (``make demo``): a tiny Wan pipeline, stock diffusers vs vidaccel, same seed.

Builds a tiny Wan text-to-video pipeline from config (random weights, nothing downloaded; fp32 on
CPU, bf16 on CUDA) and generates the same clip (same seed) three ways: with diffusers' stock
attention, with stock attention on PyTorch's math SDPA backend (another exact attention: the
rounding floor), and with ``vidaccel.apply(pipe)`` (exact dense attention on vidaccel's ops: the
Triton kernel on CUDA, the PyTorch reference on CPU). It writes to ``--out``:

- ``stock.mp4``, ``vidaccel.mp4`` and ``side_by_side.mp4`` (stock left), GIFs when imageio-ffmpeg
  is not installed;
- ``report.json``: each run's wall time (median of ``--repeats`` after a warm-up), vidaccel's
  speed-up over stock, and the fidelity of each clip against the stock one (PSNR, SSIM, max abs
  difference of the decoded frames in [0, 1]),

and prints the same as a table. Random weights make abstract noise videos; the point is that vidaccel
stays within the rounding floor. Later methods (AnnSA, FreeSwim, ...) and a real model add rows.

    python demos/tiny_wan_demo.py --out out --frames 17 --height 64 --width 64 --steps 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import vidaccel
from vidaccel.metrics import psnr, ssim
from vidaccel.pipelines import build_tiny_wan_pipeline, tiny_prompt_embeds
from vidaccel.pipelines.media import write_clips

GUIDANCE_SCALE = 5.0
# Heads of 64 dims, so that on CUDA vidaccel's Triton kernel (head dims 64 and 128) serves the calls.
HEADS, HEAD_DIM, LAYERS = 2, 64, 2
FPS = 8
# Written videos are upscaled (nearest) to at least this many pixels on their short side to be seen.
VIEW_SIZE = 256


def main(argv=None) -> dict:
    args = _parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = build_tiny_wan_pipeline(
        seed=args.seed, num_layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype, device=device
    )
    pipe.set_progress_bar_config(disable=True)
    (stock, stock_s), (floor, floor_s), (accel, accel_s), notes = _generate_all(pipe, args, device)

    videos = write_clips(
        args.out,
        {"stock": stock, "vidaccel": accel, "side_by_side": np.concatenate([stock, accel], axis=2)},
        fps=FPS,
        view_size=VIEW_SIZE,
        gif_fallback=True,
    )
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "vidaccel": _version("vidaccel"),
        },
        "settings": {
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
            "steps": args.steps,
            "seed": args.seed,
            "repeats": args.repeats,
            "guidance_scale": GUIDANCE_SCALE,
            "layers": LAYERS,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "token_grid": _token_grid(pipe, args),
        },
        # Median wall time of one whole generation (denoising and VAE decode).
        "runs": {
            "stock": {"attention": "diffusers WanAttnProcessor (SDPA, default backend)", "seconds": stock_s},
            "stock_sdpa_math": {
                "attention": "diffusers WanAttnProcessor (SDPA, math backend)",
                "seconds": floor_s,
            },
            "vidaccel": {"attention": "vidaccel.apply(pipe) -> DenseProcessor", "seconds": accel_s},
        },
        "speedup": stock_s / accel_s,
        # Decoded frames against the stock clip.
        "fidelity": {"vidaccel": _fidelity(accel, stock), "stock_sdpa_math": _fidelity(floor, stock)},
        "videos": videos,
        "notes": notes,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(_format_report(report, args.out))
    return report


def _fidelity(frames, reference) -> dict:
    value = psnr(frames, reference)
    return {
        # JSON has no infinity: identical clips give psnr_db null and identical true.
        "psnr_db": value if math.isfinite(value) else None,
        "identical": not math.isfinite(value),
        "ssim": ssim(frames, reference),
        "max_abs_diff": float(np.abs(frames.astype(np.float64) - reference.astype(np.float64)).max()),
    }


def _parse_args(argv):
    parser = argparse.ArgumentParser(description="tiny Wan pipeline: stock diffusers vs vidaccel, same seed")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    parser.add_argument("--frames", type=int, default=17, help="video frames, 4k + 1 (default: 17)")
    parser.add_argument("--height", type=int, default=64, help="pixels, a multiple of 16 (default: 64)")
    parser.add_argument("--width", type=int, default=64, help="pixels, a multiple of 16 (default: 64)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise (default: 0)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each, after a warm-up (default: 3)"
    )
    args = parser.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames must be 4k + 1 (1, 5, 9, 13, 17, ...), got {args.frames}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            parser.error(f"--{name} must be a positive multiple of 16 (VAE 8x, patch 2x), got {value}")
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def _generate_all(pipe, args, device):
    """The stock, the SDPA-math and the vidaccel generations, each ``(frames, median seconds)``, and
    the vidaccel warnings raised meanwhile."""
    prompt, negative = (
        tiny_prompt_embeds(pipe, seed=args.seed + 1),
        tiny_prompt_embeds(pipe, seed=args.seed + 2),
    )

    def generate(steps):
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            generator=torch.Generator(device).manual_seed(args.seed),
            output_type="np",
        ).frames[0]  # [T, H, W, C] float32 in [0, 1]

    stock, stock_s = _timed(generate, args.steps, args.repeats, device)
    # Another exact attention (PyTorch's math backend) gives the rounding floor the vidaccel clip is
    # judged against: in bf16 with guidance, rounding alone moves a random tiny model visibly.
    with sdpa_kernel(SDPBackend.MATH):
        floor, floor_s = _timed(generate, args.steps, args.repeats, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vidaccel.apply(pipe)
        try:
            accel, accel_s = _timed(generate, args.steps, args.repeats, device)
        finally:
            vidaccel.remove(pipe)
    notes = sorted({str(w.message) for w in caught if "vidaccel" in str(w.message)})

    return (stock, stock_s), (floor, floor_s), (accel, accel_s), notes


def _timed(generate, steps, repeats, device):
    """One untimed generation (first-call costs: kernel compilation, allocator and thread-pool
    warm-up), then the median wall time of ``repeats`` generations; returns (frames, seconds)."""
    generate(steps)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        frames = generate(steps)
        _sync(device)
        times.append(time.perf_counter() - start)
    return frames, statistics.median(times)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _token_grid(pipe, args) -> list[int]:
    vae_t, vae_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    _, patch_h, patch_w = pipe.transformer.config.patch_size
    return [(args.frames - 1) // vae_t + 1, args.height // vae_s // patch_h, args.width // vae_s // patch_w]


def _format_report(report, out: Path) -> str:
    header = ("run", "attention", "median s", "speed-up", "PSNR dB", "SSIM", "max |diff|")
    rows = [header]
    stock_s = report["runs"]["stock"]["seconds"]
    for name, run in report["runs"].items():
        fid = report["fidelity"].get(name)
        if fid is None:
            quality = ("-", "-", "-")
        else:
            psnr_text = "inf" if fid["identical"] else f"{fid['psnr_db']:.1f}"
            quality = (psnr_text, f"{fid['ssim']:.6f}", f"{fid['max_abs_diff']:.2e}")
        rows.append(
            (name, run["attention"], f"{run['seconds']:.3f}", f"{stock_s / run['seconds']:.2f}x", *quality)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    s = report["settings"]
    lines = [
        f"tiny Wan ({s['layers']} layers, {s['heads']} heads x {s['head_dim']}) on {report['device']}, "
        f"{report['dtype']}: {s['frames']} frames {s['height']}x{s['width']}, token grid {s['token_grid']}, "
        f"{s['steps']} steps, seed {s['seed']}",
        *("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows),
        "PSNR/SSIM/max |diff| of decoded frames against the stock clip; stock_sdpa_math, another exact "
        "attention, shows what rounding alone changes.",
        *(f"note: {note}" for note in report["notes"]),
        f"wrote {', '.join(report['videos'].values())} and report.json to {out}/",
    ]
    return "\n".join(lines)


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
