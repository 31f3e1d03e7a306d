"""FreeSwim upscaling demo: a prompt (generated at the model's native size first) or an input video,
refined at a target size with ``FreeSwimWanPipeline``; writes the video and the timings.

With ``--model`` (a Wan2.1-T2V diffusers checkpoint: a local folder or a Hub id you have already
downloaded) it runs the real model, bf16 transformer and fp32 VAE::

    python demos/freeswim_upscale.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --prompt "a red fox trotting through fresh snow, golden hour" --height 1088 --width 1920 \\
        --frames 81 --cache-steps 5 --offload-cache --out out/freeswim
    python demos/freeswim_upscale.py --model ... --video clip_480p.mp4 --height 1088 --width 1920

Without ``--model`` it runs a tiny from-config Wan pipeline (random weights, nothing downloaded)
"trained" at 32×48 and refined at ``--height``×``--width`` (default 64×96): a smoke run of the whole
path. Writes ``freeswim.mp4`` (a GIF without imageio-ffmpeg) and ``timings.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import vidaccel
from vidaccel.pipelines import FreeSwimWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds
from vidaccel.pipelines.media import write_clips

TINY_TRAIN_SIZE = (32, 48)
FPS = 8
VIEW_SIZE = 256  # the video is upscaled (nearest) to at least this short side


def main(argv=None) -> dict:
    args = _parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe, prompt_args, train_size = _load(args, device)
    config = vidaccel.FreeSwimConfig(
        train_size=train_size, cache_steps=args.cache_steps, offload_cache=args.offload_cache
    )
    pipe.set_attn_processor(vidaccel.FreeSwimProcessor(config))
    result = pipe(
        **prompt_args,
        video=_read_video(args.video) if args.video else None,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        strength=args.strength,
        num_inference_steps=args.steps,
        native_inference_steps=args.native_steps,
        guidance_scale=args.guidance,
        native_guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        output_type="np",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    written = write_clips(
        args.out, {"freeswim": result.frames[0]}, fps=FPS, view_size=VIEW_SIZE, gif_fallback=True
    )
    report = {
        "model": args.model or "tiny (random weights)",
        "size": [args.height, args.width],
        "frames": int(result.frames.shape[1]),
        "config": {
            "train_size": list(train_size),
            "cache_steps": args.cache_steps,
            "offload_cache": args.offload_cache,
        },
        "strength": args.strength,
        "timings_s": result.timings,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "video": written["freeswim"],
    }
    (args.out / "timings.json").write_text(json.dumps(report, indent=2) + "\n")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if isinstance(v, float))
    print(f"wrote {args.out / written['freeswim']} ({args.height}x{args.width}x{report['frames']}): {stages}")
    return report


def _load(args, device):
    """-> (pipeline, prompt arguments, training size in pixels)."""
    if args.model is None:
        tiny = build_tiny_wan_pipeline(seed=args.seed, head_dim=64, device=device)
        pipe = FreeSwimWanPipeline(**tiny.components)
        pipe.set_progress_bar_config(disable=True)
        embeds = {
            "prompt_embeds": tiny_prompt_embeds(pipe, seed=args.seed + 1),
            "negative_prompt_embeds": tiny_prompt_embeds(pipe, seed=args.seed + 2),
        }
        return pipe, embeds, TINY_TRAIN_SIZE
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    pipe = FreeSwimWanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=torch.bfloat16)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    prompt = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    return pipe, prompt, tuple(args.train_size)


def _read_video(path: Path) -> torch.Tensor:
    """``[F, 3, h, w]`` in ``[0, 1]``."""
    import imageio.v3 as iio

    frames = np.stack(list(iio.imiter(path)))  # [F, h, w, 3] uint8
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Wan2.1-T2V diffusers checkpoint (default: a tiny random model)")
    parser.add_argument("--prompt", default="a red fox trotting through fresh snow, golden hour")
    parser.add_argument("--negative-prompt", default="blurry, low quality, distorted")
    parser.add_argument("--video", type=Path, help="input video to refine instead of generating one")
    parser.add_argument("--height", type=int, default=None, help="target height (default 1088; tiny: 64)")
    parser.add_argument("--width", type=int, default=None, help="target width (default 1920; tiny: 96)")
    parser.add_argument("--frames", type=int, default=None, help="frames, 4k + 1 (default 81; tiny: 9)")
    parser.add_argument("--train-size", type=int, nargs=2, default=(480, 832), help="model's native H W")
    parser.add_argument("--steps", type=int, default=None, help="refinement schedule (default 50; tiny: 4)")
    parser.add_argument(
        "--native-steps", type=int, default=None, help="native generation steps (default 50; tiny: 2)"
    )
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cache-steps", type=int, default=5)
    parser.add_argument(
        "--offload-cache", action="store_true", help="keep the cross-attention cache on the CPU"
    )
    parser.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (real model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/freeswim"))
    args = parser.parse_args(argv)
    real = args.model is not None
    defaults = dict(height=1088, width=1920, frames=81, steps=50, native_steps=50)
    tiny = dict(height=64, width=96, frames=9, steps=4, native_steps=2)
    for name, value in (defaults if real else tiny).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames must be 4k + 1, got {args.frames}")
    return args


if __name__ == "__main__":
    main()
