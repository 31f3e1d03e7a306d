"""Train the game world model: a pixel-space causal Wan (``WanTransformer3DModel``) on the procedural
game of ``vidaccel.pipelines.game``, by diffusion forcing with block-causal attention.

    python demos/train_world_model.py --toy                       # CPU, < 2 min: the recipe, loss falls
    python -u demos/train_world_model.py --out $OUT/world_model   # GPU: one command, ~8 min

**Model.** ``world_model_config()``: 64x64 RGB frames in ``[-1, 1]`` plus one-hot action planes
(frame t carries the action that produced it, so a frame sees actions up to its own), patch 1x4x4
(256 tokens a frame), out 3 channels; the cross-attention input is the level's fixed token sequence.

**Objective.** Flow matching as ``CausalWanPipeline`` samples it: ``x_s = (1 - s) x0 + s eps``, the
model predicts ``eps - x0`` at timestep ``1000 s``. Diffusion forcing: every chunk (``chunk_frames``
frames) of a clip has its own sigma (per-token timesteps) and attends to its own and earlier chunks
only (SDPA with a block-causal mask, a training-only attention processor). Each clip starts with a
clean prefix of random length (the true context a rollout starts from; no loss there), and later
chunks are sometimes clean too, so a noisy chunk sees clean and noisy pasts. Half the sigmas are
drawn from the few-step samplers' sigmas, half from a shifted uniform.

**Long rollouts.** Rotary attention depends only on relative positions, and a rollout's KV cache
holds frames far older than a clip is long. A quarter of the clips therefore begin with clean frames
from far earlier in the same episode (8 to a few hundred frames back, at their true positions), so
attention meets large relative distances in training and learns to discount them; every clip also
gets a random absolute position offset (rotary angles as large as a 1,000-frame rollout's).

**Fine-tuning for long rollouts** (``--init FOLDER``: start from these weights, fresh optimizer). The
shipped model's rollouts drift within tens of frames: their frames' mean and contrast leave the range
of true frames (``benchmarks/bench_world_model_long.py``). Five options target that exposure bias,
all off by default:

- ``--rollout-context P`` (with ``--rollout-every N``): a fraction P of each batch's clips take as
  context the model's own autoregressive rollout (from 1 to 4 true frames, with the clip's true
  actions, refilled every N steps). Their targets stay the true frames, so the model learns to pull
  its drifted past back to the game (DAgger-style). Of the options, only this one has moved the
  long-rollout figures (``benchmarks/results/world_model_finetune.md``). ``--rollout-frames L
  --rollout-window W`` make the buffer rollouts L frames long, through a W-frame rolling window with
  the true start as sinks (as a rollout with ``max_cache_frames=W`` deploys it); a batch takes each
  one's sinks and a run of later frames. That kept the structure but lowered the contrast further
  (``benchmarks/results/world_model_stability.md``).
- ``--self-context P`` does the same with the model's one-step estimates of the context frames.
- ``--context-noise S`` noises context frames to a sigma drawn from [0, S] (GameNGen's noise
  augmentation), for rollouts that commit their frames re-noised (``context_timestep``).
- ``--dmd W`` (with ``--init``, ``--rollout-window`` and longer ``--rollout-frames``): distribution
  matching (DMD, as Self-Forcing and CausVid train) on the model's own rollouts, weighted ``W`` beside
  the diffusion loss: the model samples the frame after a rolling-window view of its rollout, and the
  sample is pushed toward what the frozen initial weights (the teacher) expect there, away from what a
  fake score model trained on the samples has learnt. With this small model as its teacher it
  sharpened frames into texture (``world_model_stability.md``, section 5.2). ``--rollout-timesteps``
  sets the sampler of the rollouts, DMD's generator and ``--eval-samplers init``.
- ``--stats-loss W`` adds ``W`` times :func:`frame_stats_loss` on the denoised estimates of the
  target frames at sigma <= ``--stats-sigma-max``: each frame's std and detail (mean absolute
  difference of adjacent pixels) against the true frame's. A regression loss toward a frame the past
  cannot predict teaches the flat, blurred mean of the possible frames; the two moments can be matched
  without knowing the frame. With ``--rollout-context 0.5`` and ``W = 4`` it removed the long
  rollouts' contrast dips (``assets/world_model_long``; ``world_model_stability.md``, section 6).

``--eval-samplers init`` evaluates only the initial weights' sampler.

    python -u demos/train_world_model.py --init assets/world_model --rollout-context 0.5 --lr 3e-4 \
        --warmup 50 --minutes 5 --eval-samplers init --out $OUT/wm

**Output** (``--out``): ``config.json`` + ``diffusion_pytorch_model.safetensors`` (bf16),
``world_model.json`` (actions, frame size, chunk/context frames, the chosen sampler, level tokens,
the training record and the evaluation) and ``loss_curve.json``. The evaluation rolls the model out
densely from true context frames with the true actions on held-out worlds and compares the mean
PSNR of the first predicted frames with copying the last context frame.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from vidaccel.metrics import frame_statistics, psnr
from vidaccel.pipelines.causal_wan import check_denoising_timesteps, flow_sigmas, rotary_emb_frames
from vidaccel.pipelines.game import ACTIONS, FRAME_SIZE, LEVELS, GameEnv, random_actions, scripted_actions
from vidaccel.pipelines.world_model import LEVEL_TOKENS, level_embeddings, world_model_config
from vidaccel.processors import WanAdapter

CHUNK_FRAMES = 1  # one frame per chunk: strict action causality and per-frame control
CONTEXT_FRAMES = 4  # true frames a rollout starts from
SAMPLERS = (  # (denoising timesteps, shift) candidates; the evaluation picks the default
    ((1000, 750, 500, 250), 3.0),
    ((1000, 750, 500, 250), 1.0),
    ((1000, 500), 3.0),
)
TOY_CONFIG = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2)
MAX_WEIGHT_BYTES = 15_000_000


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    frames, actions, levels = make_episodes(args.episodes, args.episode_frames, args.workers, seed_base=0)
    eval_length = CONTEXT_FRAMES + args.eval_frames
    eval_frames, eval_actions, eval_levels = make_episodes(
        args.eval_episodes, eval_length, args.workers, seed_base=1_000_000
    )
    print(
        f"data: {args.episodes} episodes x {args.episode_frames} frames (+{args.eval_episodes} held out) "
        f"in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    data = Data(frames, actions, levels, device)

    model = build_model(args.init, args.toy, device)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters ({2 * num_params / 1e6:.1f} MB in bf16)", flush=True)
    if 2 * num_params > MAX_WEIGHT_BYTES:
        raise ValueError(f"{num_params} parameters exceed {MAX_WEIGHT_BYTES} bytes in bf16")
    ema = copy.deepcopy(model).requires_grad_(False)
    # DMD: the teacher (frozen) and the fake score model (trained on the model's samples) start as --init
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if args.dmd > 0 else None
    fake = copy.deepcopy(model) if args.dmd > 0 else None
    init_meta = _init_metadata(args.init)
    # the sampler the initial weights shipped with: the rollout buffer's, and the evaluation's with
    # ``--eval-samplers init``
    init_sampler = (
        None if init_meta is None else (tuple(init_meta["denoising_timesteps"]), float(init_meta["shift"]))
    )
    if args.rollout_timesteps is not None:
        init_sampler = (args.rollout_timesteps, init_sampler[1] if init_sampler else SAMPLERS[0][1])
    rollout_sampler = init_sampler or SAMPLERS[0]
    trainer = Trainer(
        device,
        self_context=args.self_context,
        context_noise=args.context_noise,
        rollout_context=args.rollout_context,
        rollout_sampler=rollout_sampler,
        stats_weight=args.stats_loss,
        stats_sigma_max=args.stats_sigma_max,
    )
    for net in (model, ema, teacher, fake):
        if net is not None:
            trainer.install(net)
    fake_optimizer = (
        None
        if fake is None
        else torch.optim.AdamW(fake.parameters(), lr=args.fake_lr, betas=(0.9, 0.99), weight_decay=0.01)
    )
    dmd_window = []

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    budget = args.minutes * 60
    train_start = time.perf_counter()
    curve, window, step, rollout_seconds = [], [], 0, 0.0
    generator = torch.Generator(device).manual_seed(args.seed)
    while (elapsed := time.perf_counter() - train_start) < budget:
        progress = elapsed / budget
        lr = (
            args.lr
            * min(1.0, (step + 1) / args.warmup)
            * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        if (args.rollout_context > 0 or args.dmd > 0) and step % args.rollout_every == 0:
            started = time.perf_counter()
            trainer.refresh_rollouts(
                model, data, args.batch, args.clip_frames, generator, args.rollout_frames, args.rollout_window
            )
            rollout_seconds += time.perf_counter() - started
        batch = data.sample(args.batch, args.clip_frames, generator, far_frames=args.far_frames)
        batch = trainer.mix_rollouts(batch, generator)
        loss = trainer.loss(model, batch, generator)
        total = loss
        if args.dmd > 0:
            clips = trainer.window_clips(args.batch, args.rollout_window, generator)
            dmd_loss, sample = trainer.dmd_loss(model, teacher, fake, clips, generator, args.dmd_sigma_min)
            total = loss + args.dmd * dmd_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if args.dmd > 0:
            for _ in range(args.fake_steps):
                fake_loss = trainer.fake_score_loss(fake, clips, sample, generator)
                fake_optimizer.zero_grad(set_to_none=True)
                fake_loss.backward()
                torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
                fake_optimizer.step()
            dmd_window.append(torch.stack([dmd_loss.detach(), fake_loss.detach()]))
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        window.append(loss.detach())
        if step % args.log_every == 0:
            mean = float(torch.stack(window).mean())
            window.clear()
            curve.append(
                {"step": step, "loss": mean, "lr": lr, "seconds": round(time.perf_counter() - train_start, 2)}
            )
            extra = ""
            if dmd_window:
                dmd_mean, fake_mean = torch.stack(dmd_window).mean(0).tolist()
                dmd_window.clear()
                curve[-1] |= {"dmd_loss": dmd_mean, "fake_loss": fake_mean}
                extra = f"  dmd {dmd_mean:.4f}  fake {fake_mean:.4f}"
            print(
                f"step {step:5d}  loss {mean:.4f}{extra}  lr {lr:.2e}  "
                f"{(time.perf_counter() - train_start) / step:.3f}s/step",
                flush=True,
            )
    train_seconds = time.perf_counter() - train_start
    final_loss = float(np.mean([point["loss"] for point in curve[-5:]])) if curve else float("nan")
    print(f"trained {step} steps in {train_seconds:.0f}s, final loss {final_loss:.4f}", flush=True)

    held_out = Data(eval_frames, eval_actions, eval_levels, device)
    val_batch = held_out.sample(
        min(args.batch, 16),
        min(args.clip_frames, eval_length),
        torch.Generator(device).manual_seed(1),
        far_frames=0,
    )
    val = {name: trainer.validation_loss(net, val_batch) for name, net in (("raw", model), ("ema", ema))}
    chosen = min(val, key=val.get)
    best = ema if chosen == "ema" else model
    print(f"validation loss raw {val['raw']:.4f} ema {val['ema']:.4f} -> {chosen}", flush=True)

    samplers = SAMPLERS[:1] if args.toy else SAMPLERS
    if args.eval_samplers == "init":  # only the initial weights' sampler (a faster evaluation)
        samplers = (init_sampler,)
    evaluation = evaluate(trainer, best, held_out, args.eval_frames, samplers)
    timesteps, shift = evaluation["chosen"]["denoising_timesteps"], evaluation["chosen"]["shift"]

    best.save_config(out)
    weights = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in best.state_dict().items()}
    save_file(weights, out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    weight_bytes = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    metadata = {
        "actions": list(ACTIONS),
        "frame_size": FRAME_SIZE,
        "chunk_frames": CHUNK_FRAMES,
        "context_frames": CONTEXT_FRAMES,
        "denoising_timesteps": list(timesteps),
        "shift": shift,
        "levels": list(LEVELS),
        "level_tokens": LEVEL_TOKENS | {"embeddings": level_embeddings(**LEVEL_TOKENS).tolist()},
        "training": {
            "command": " ".join(["python", *sys.argv]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": step,
            "seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - start, 1),
            "final_loss": final_loss,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "parameters": num_params,
            "weights_bytes": weight_bytes,
            "weights": chosen,
            "validation_loss": val,
            "batch_clips": args.batch,
            "clip_frames": args.clip_frames,
            "far_context_frames": args.far_frames,
            "self_context": args.self_context,
            "context_noise": args.context_noise,
            "rollout_context": args.rollout_context,
            "rollout_every": args.rollout_every,
            "rollout_frames": args.rollout_frames or args.clip_frames,
            "rollout_window": args.rollout_window,
            "rollout_sampler": {"denoising_timesteps": list(rollout_sampler[0]), "shift": rollout_sampler[1]}
            if args.rollout_context or args.dmd
            else None,
            "rollout_seconds": round(rollout_seconds, 1),
            "dmd": args.dmd,
            "dmd_sigma_min": args.dmd_sigma_min if args.dmd else None,
            "fake_lr": args.fake_lr if args.dmd else None,
            "fake_steps": args.fake_steps if args.dmd else None,
            "stats_loss": args.stats_loss,
            "stats_sigma_max": args.stats_sigma_max if args.stats_loss else None,
            "init": None if args.init is None else str(args.init),
            "init_training": None if init_meta is None else init_meta.get("training"),
            "lr": args.lr,
            "ema": args.ema,
            "episodes": args.episodes,
            "episode_frames": args.episode_frames,
            "toy": args.toy,
        },
        "evaluation": evaluation,
    }
    (out / "world_model.json").write_text(json.dumps(metadata, indent=1))
    (out / "loss_curve.json").write_text(json.dumps(curve))
    print(f"wrote {out} ({weight_bytes / 1e6:.1f} MB weights) in {time.perf_counter() - start:.0f}s total")
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise ValueError(f"weights are {weight_bytes} bytes, above {MAX_WEIGHT_BYTES}")
    print(f"\nsampler                         PSNR dB (first {args.eval_frames} frames)")
    for row in evaluation["samplers"]:
        print(f"{str(row['denoising_timesteps']):24s} s={row['shift']:<4}  {row['psnr']:.2f}")
    print(f"copy last context frame          {evaluation['psnr_copy_last_context']:.2f}")
    print(f"copy previous true frame         {evaluation['psnr_copy_previous_true']:.2f}  (uses the truth)")
    print(f"margin over copy-last: {evaluation['margin_db']:+.2f} dB (bar: >= 2 dB)")


def build_model(init: Path | None, toy: bool, device: torch.device) -> WanTransformer3DModel:
    """The model to train, in training mode: ``world_model_config()`` (the toy size with ``toy``) with
    fresh weights, or, to fine-tune, the weights in the folder ``init`` (bf16 on disk, fp32 here; the
    optimizer starts fresh). ``from_pretrained`` returns a model in eval mode: set back to train."""
    if init is not None:
        return WanTransformer3DModel.from_pretrained(init, torch_dtype=torch.float32).to(device).train()
    return (
        WanTransformer3DModel.from_config(world_model_config() | (TOY_CONFIG if toy else {}))
        .to(device)
        .train()
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="world_model_out", help="output folder")
    parser.add_argument("--toy", action="store_true", help="CPU proof of the recipe (< 2 min)")
    parser.add_argument(
        "--minutes", type=float, default=None, help="training time budget (default 6.3, toy 0.75)"
    )
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default 32, toy 4)")
    parser.add_argument("--clip-frames", type=int, default=None, help="frames per clip (default 16, toy 8)")
    parser.add_argument("--far-frames", type=int, default=None, help="far-context frames (default 4, toy 2)")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument(
        "--init", type=Path, default=None, help="start from these weights (a world-model folder): fine-tuning"
    )
    parser.add_argument(
        "--self-context",
        type=float,
        default=0.0,
        help="fraction of clips whose clean context frames are the model's own predictions (default 0)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 100, toy 5)")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--episodes", type=int, default=None, help="training episodes (default 256, toy 8)")
    parser.add_argument(
        "--episode-frames", type=int, default=None, help="frames per episode (default 768, toy 64)"
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=None, help="held-out episodes (default 16, toy 2)"
    )
    parser.add_argument(
        "--eval-frames", type=int, default=None, help="predicted frames evaluated (default 32, toy 4)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="data generation processes")
    parser.add_argument(
        "--log-every", type=int, default=None, help="steps per logged loss (default 25, toy 10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-samplers",
        choices=("all", "init"),
        default="all",
        help="evaluate every candidate sampler (default) or only --init's (faster)",
    )
    parser.add_argument(
        "--context-noise",
        type=float,
        default=0.0,
        help="context frames are noised to a sigma drawn from [0, this] (90%% of them; default 0)",
    )
    parser.add_argument(
        "--rollout-context",
        type=float,
        default=0.0,
        help="fraction of each batch's clips whose context is the model's own autoregressive rollout "
        "(targets true; default 0)",
    )
    parser.add_argument(
        "--rollout-every", type=int, default=20, help="steps between rollout-buffer refreshes (default 20)"
    )
    parser.add_argument(
        "--rollout-frames",
        type=int,
        default=None,
        help="frames of each buffer rollout (default --clip-frames); longer ones reach the drift of long "
        "rollouts, and a batch takes each as its true start plus a run of later frames",
    )
    parser.add_argument(
        "--rollout-window",
        type=int,
        default=None,
        help="buffer rollouts through a rolling window of this many frames, the true start as sinks, as "
        "a rollout with max_cache_frames=N deploys it (default: the whole past)",
    )
    parser.add_argument(
        "--rollout-timesteps",
        default=None,
        help="the sampler timesteps of the buffer rollouts, DMD's generator and --eval-samplers init, "
        "comma-separated (default: --init's world_model.json)",
    )
    parser.add_argument(
        "--dmd",
        type=float,
        default=0.0,
        help="weight of distribution matching (DMD) on the model's own rollouts, added to the diffusion "
        "loss (default 0: off; needs --rollout-window and --rollout-frames above it)",
    )
    parser.add_argument(
        "--dmd-sigma-min",
        type=float,
        default=0.3,
        help="DMD compares the teachers' denoisings at sigmas drawn from [this, 0.98] (default 0.3)",
    )
    parser.add_argument("--fake-lr", type=float, default=3e-4, help="learning rate of DMD's fake score model")
    parser.add_argument(
        "--fake-steps", type=int, default=1, help="fake score updates per generator step (default 1)"
    )
    parser.add_argument(
        "--stats-loss",
        type=float,
        default=0.0,
        help="weight of the contrast-and-detail loss (frame_stats_loss) on the denoised estimates of "
        "target frames at sigma <= --stats-sigma-max, added to the diffusion loss and to the logged loss "
        "(default 0: off)",
    )
    parser.add_argument(
        "--stats-sigma-max",
        type=float,
        default=0.3,
        help="the noisiest target frames the stats loss sees (default 0.3: the default sampler's last "
        "step, timestep 250, and below)",
    )
    args = parser.parse_args(argv)
    defaults = dict(
        minutes=(0.6, 6.3), batch=(2, 32), clip_frames=(6, 16), far_frames=(2, 4), episodes=(8, 256),
        episode_frames=(64, 768), eval_episodes=(1, 16), eval_frames=(3, 32), log_every=(2, 25), warmup=(5, 100),
    )  # fmt: skip
    for name, (toy, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, toy if args.toy else full)
    if args.eval_samplers == "init" and (args.init is None or not (args.init / "world_model.json").exists()):
        raise ValueError("--eval-samplers init needs --init with a world_model.json")
    if not 0.0 <= args.context_noise <= 1.0:
        raise ValueError(f"--context-noise must be in [0, 1], got {args.context_noise}")
    if not 0.0 <= args.self_context <= 1.0:
        raise ValueError(f"--self-context must be in [0, 1], got {args.self_context}")
    if not 0.0 <= args.rollout_context <= 1.0:
        raise ValueError(f"--rollout-context must be in [0, 1], got {args.rollout_context}")
    if args.rollout_every < 1:
        raise ValueError(f"--rollout-every must be >= 1, got {args.rollout_every}")
    if args.rollout_frames is not None and args.rollout_frames < args.clip_frames:
        raise ValueError(
            f"--rollout-frames must be >= --clip-frames ({args.clip_frames}), got {args.rollout_frames}"
        )
    if args.rollout_window is not None and args.rollout_window <= CONTEXT_FRAMES:
        raise ValueError(
            f"--rollout-window must exceed the {CONTEXT_FRAMES} sink frames, got {args.rollout_window}"
        )
    if args.rollout_timesteps is not None:
        args.rollout_timesteps = tuple(float(t) for t in args.rollout_timesteps.split(","))
        check_denoising_timesteps(args.rollout_timesteps)
    if args.dmd < 0:
        raise ValueError(f"--dmd must be >= 0, got {args.dmd}")
    if args.dmd > 0:
        if args.init is None:
            raise ValueError(
                "--dmd fine-tunes: it needs --init (the teacher and the fake score start from it)"
            )
        if args.rollout_window is None or (args.rollout_frames or args.clip_frames) <= args.rollout_window:
            raise ValueError(
                "--dmd needs --rollout-window W and --rollout-frames above W (the window's view)"
            )
        if not 0.0 < args.dmd_sigma_min < 0.98:
            raise ValueError(f"--dmd-sigma-min must be in (0, 0.98), got {args.dmd_sigma_min}")
        if args.fake_steps < 1:
            raise ValueError(f"--fake-steps must be >= 1, got {args.fake_steps}")
    if args.stats_loss < 0:
        raise ValueError(f"--stats-loss must be >= 0, got {args.stats_loss}")
    if not 0.0 < args.stats_sigma_max <= 1.0:
        raise ValueError(f"--stats-sigma-max must be in (0, 1], got {args.stats_sigma_max}")
    if args.clip_frames <= args.far_frames + 2:
        raise ValueError(
            f"--clip-frames must exceed --far-frames + 2 = {args.far_frames + 2}, got {args.clip_frames}"
        )
    return args


def _init_metadata(init: Path | None) -> dict | None:
    """The ``world_model.json`` of the weights a fine-tuning starts from (``None``: none)."""
    if init is None or not (init / "world_model.json").exists():
        return None
    return json.loads((init / "world_model.json").read_text())


def make_episodes(count: int, length: int, workers: int, seed_base: int):
    """``count`` episodes of ``length`` frames: uint8 ``[count, length, 64, 64, 3]``, action ids
    ``[count, length]`` (frame 0 is the reset frame, action noop) and level ids ``[count]``. Every
    fifth episode follows the scripted tour from a seed-dependent point, the rest random walks."""
    jobs = [(seed_base + i, i % len(LEVELS), length) for i in range(count)]
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, count))) as pool:
        episodes = pool.map(_episode, jobs, chunksize=max(1, count // (4 * max(1, workers))))
    frames = np.stack([frames for frames, _ in episodes])
    actions = np.stack([actions for _, actions in episodes])
    return frames, actions, np.array([level for _, level, _ in jobs])


def _episode(job) -> tuple[np.ndarray, np.ndarray]:
    seed, level, length = job
    if seed % 5 == 4:
        offset = seed % 97
        actions = scripted_actions(length - 1 + offset)[offset:]
    else:
        actions = random_actions(length - 1, seed=seed)
    env = GameEnv(seed, level=level)
    frames = np.concatenate([env.reset()[None], env.rollout(actions)])
    return frames, np.array([0, *actions], dtype=np.int64)


class Data:
    """Episodes on the device and the clip sampler."""

    def __init__(self, frames: np.ndarray, actions: np.ndarray, levels: np.ndarray, device: torch.device):
        self.frames = torch.from_numpy(frames).to(device)  # uint8 [E, L, 64, 64, 3]
        self.actions = torch.from_numpy(actions).to(device)  # [E, L]
        self.levels = torch.from_numpy(levels).to(device)  # [E]
        self.device = device

    def sample(self, batch: int, clip_frames: int, generator: torch.Generator, *, far_frames: int) -> dict:
        """``batch`` clips of ``clip_frames`` frames: ``{"x0" [B, 3, F, 64, 64] in [-1, 1], "actions"
        [B, F], "positions" [B, F], "levels" [B], "clean" [B, F] bool (the clean prefix)}``.

        A quarter of the clips (when ``far_frames`` > 0 and the episodes are long enough) start with
        ``far_frames`` frames from 8+ frames before the rest. Each clip's clean prefix covers the far
        frames and 1 to half of the remaining frames."""
        episodes, length = self.actions.shape

        def randint(high, size=(batch,)):
            return (torch.rand(size, generator=generator, device=self.device) * high).long()

        episode = randint(episodes)
        steps = torch.arange(clip_frames, device=self.device)
        start = randint(length - clip_frames + 1)
        index = start[:, None] + steps
        recent = clip_frames - far_frames
        min_gap = 8
        prefix = 1 + randint(clip_frames // 2)
        if far_frames and length >= recent + far_frames + min_gap:
            far = torch.rand(batch, generator=generator, device=self.device) < 0.25
            recent_start = far_frames + min_gap + randint(length - recent - far_frames - min_gap + 1)
            far_start = (
                torch.rand(batch, generator=generator, device=self.device)
                * (recent_start - far_frames - min_gap + 1)
            ).long()
            far_index = torch.where(
                steps < far_frames, far_start[:, None] + steps, recent_start[:, None] + steps - far_frames
            )
            index = torch.where(far[:, None], far_index, index)
            prefix = torch.where(far, far_frames + 1 + randint(recent // 2), prefix)
        frames = self.frames[episode[:, None], index]  # [B, F, 64, 64, 3]
        x0 = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        offset = randint(1024)
        return {
            "x0": x0,
            "actions": self.actions[episode[:, None], index],
            "positions": index + offset[:, None],
            "levels": self.levels[episode],
            "clean": steps[None, :] < prefix[:, None],
        }


class BlockCausalTrainingProcessor:
    """Training-only attention: the stock Wan q/k/v (vidaccel's adapter) and differentiable torch
    SDPA, self-attention masked block-causally (``mask`` ``[S, S]`` bool, set per clip length)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return WanAdapter().forward(
            attn, hidden_states, encoder_hidden_states, None, rotary_emb, self._attend
        )

    def _attend(self, kind, q, k, v, attention_mask=None, k_pre=None):
        mask = self.mask if kind == "self" else None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)


class Trainer:
    """The model's input (frames + action planes), per-token timesteps, rotary positions and mask,
    the diffusion-forcing loss and the dense evaluation rollout."""

    def __init__(
        self,
        device: torch.device,
        self_context: float = 0.0,
        context_noise: float = 0.0,
        rollout_context: float = 0.0,
        rollout_sampler=SAMPLERS[0],
        stats_weight: float = 0.0,
        stats_sigma_max: float = 0.3,
    ) -> None:
        self.device = device
        self.stats_weight = stats_weight
        self.stats_sigma_max = stats_sigma_max
        self.self_context = self_context
        self.context_noise = context_noise
        self.rollout_context = rollout_context
        self.rollout_sampler = rollout_sampler
        self.buffer: dict | None = None  # the model's own rollouts (``refresh_rollouts``)
        self.refreshes = 0
        self.processor = BlockCausalTrainingProcessor()
        self.rotary = None
        self.level_tokens = level_embeddings(**LEVEL_TOKENS).to(device)
        sigmas = sorted({s for timesteps, shift in SAMPLERS for s in flow_sigmas(timesteps, shift)})
        self.sampler_sigmas = torch.tensor(sigmas, device=device)

    def install(self, model: WanTransformer3DModel) -> None:
        """Route ``model``'s attention and rotary positions through this trainer."""
        model.set_attn_processor(self.processor)
        model.rope.register_forward_hook(lambda module, args, output: self.rotary)

    def forward(self, model, noisy, actions, sigma, positions, levels) -> torch.Tensor:
        """``noisy`` ``[B, 3, F, 64, 64]``, ``actions``/``sigma``/``positions`` ``[B, F]`` → the flow
        prediction ``[B, 3, F, 64, 64]`` (fp32)."""
        batch, _, frames, height, width = noisy.shape
        _, p_h, p_w = model.config.patch_size
        tokens = (height // p_h) * (width // p_w)
        planes = F.one_hot(actions, len(ACTIONS)).to(noisy.dtype).permute(0, 2, 1)[..., None, None]
        inputs = torch.cat([noisy, planes.expand(-1, -1, -1, height, width)], dim=1)
        timestep = (1000 * sigma).repeat_interleave(tokens, dim=1)
        chunk = torch.arange(frames * tokens, device=self.device) // (tokens * CHUNK_FRAMES)
        self.processor.mask = chunk[None, :] <= chunk[:, None]
        self.rotary = rotary_emb_frames(model.rope, positions, height // p_h, width // p_w)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = model(inputs, timestep, self.level_tokens[levels], return_dict=False)[0]
        return out.float()

    def sigmas(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Per-frame sigma ``[B, F]`` (one per chunk of ``CHUNK_FRAMES``): 0 on the clean prefix and on a
        fifth of the later chunks, else half from the samplers' sigmas, half shifted-uniform."""
        batch_size, frames = batch["actions"].shape
        chunks = math.ceil(frames / CHUNK_FRAMES)

        def rand():
            return torch.rand(batch_size, chunks, generator=generator, device=self.device)

        shifted = _shifted(rand())
        picked = self.sampler_sigmas[(rand() * len(self.sampler_sigmas)).long()]
        sigma = torch.where(rand() < 0.5, picked, shifted).clamp(min=0.02)
        sigma = torch.where(rand() < 0.2, 0.0, sigma)
        sigma = sigma.repeat_interleave(CHUNK_FRAMES, dim=1)[:, :frames]
        return torch.where(batch["clean"], 0.0, sigma)

    def loss(self, model, batch: dict, generator: torch.Generator, sigma: torch.Tensor | None = None):
        """Mean squared error of the flow prediction ``eps - x0`` over the noisy chunks."""
        x0 = batch["x0"]
        if sigma is None:
            sigma = self.sigmas(batch, generator)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        target = sigma > 0  # the frames with a loss; the others are context
        # context frames: the clip's (true, or the model's own rollout on ``mix_rollouts``' clips)
        context = batch.get("context")
        x_in = x0 if context is None else torch.where(target[:, None, :, None, None], x0, context)
        sigma_in = sigma
        if self.self_context > 0:
            x_in = self._own_context(model, batch, target, generator, x_in)
        if self.context_noise > 0:
            # Noise augmentation of the context (GameNGen): most context frames are seen slightly noisy,
            # at their own timestep, so a rollout can commit its frames re-noised (``context_timestep``)
            # and the model learns not to copy the fine detail of its past, where its errors live.
            level = torch.rand(sigma.shape, generator=generator, device=self.device) * self.context_noise
            keep_clean = torch.rand(sigma.shape, generator=generator, device=self.device) < 0.1
            sigma_in = torch.where(target, sigma, torch.where(keep_clean, 0.0, level))
        s = sigma_in[:, None, :, None, None]
        prediction = self.forward(
            model, (1 - s) * x_in + s * noise, batch["actions"], sigma_in, batch["positions"], batch["levels"]
        )
        per_frame = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 3, 4))
        weight = target.float()
        loss = (per_frame * weight).sum() / weight.sum().clamp(min=1)
        if self.stats_weight > 0:
            estimate = (1 - s) * x_in + s * noise - s * prediction  # x0_hat = x_s - s (eps - x0)_hat
            low = target & (sigma_in <= self.stats_sigma_max)
            loss = loss + self.stats_weight * frame_stats_loss(estimate, x0, low)
        return loss

    @torch.no_grad()
    def _own_context(self, model, batch: dict, target: torch.Tensor, generator, base=None) -> torch.Tensor:
        """Exposure to the model's own errors: the clips' frames ``x0`` with, in a ``self_context``
        fraction of the clips, every context frame (no loss) but the first replaced by the model's own
        estimate of it: ``x0_hat`` from one denoising step at a sampler sigma, the whole clip noised
        that way (block-causal: an estimate sees only the noisy inputs before it). The targets stay the
        true frames, so the model learns to pull a degraded past (blurred, colour-shifted, as its
        rollouts drift) back toward true frames instead of copying its errors."""
        x0 = batch["x0"]
        batch_size, frames = target.shape
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        pick = torch.rand(batch_size, frames, generator=generator, device=self.device) * len(
            self.sampler_sigmas
        )
        sigma_hat = self.sampler_sigmas[pick.long()].clamp(min=0.02)
        s_hat = sigma_hat[:, None, :, None, None]
        noisy = (1 - s_hat) * x0 + s_hat * noise
        with _eval_mode(model):
            flow = self.forward(
                model, noisy, batch["actions"], sigma_hat, batch["positions"], batch["levels"]
            )
        estimate = (noisy - s_hat * flow).clamp(-1, 1)
        clips = torch.rand(batch_size, generator=generator, device=self.device) < self.self_context
        if "rolled" in batch:
            clips &= ~batch["rolled"]  # their context is already the model's own rollout
        replace = clips[:, None] & ~target
        replace[:, 0] = False
        return torch.where(replace[:, None, :, None, None], estimate, x0 if base is None else base)

    @torch.no_grad()
    def validation_loss(self, model, batch: dict) -> float:
        generator = torch.Generator(self.device).manual_seed(2)
        sigma = self.sigmas(batch, generator)
        options = self.self_context, self.context_noise, self.stats_weight
        # the plain objective, comparable across runs
        self.self_context = self.context_noise = self.stats_weight = 0.0
        try:
            return float(self.loss(model, batch, generator, sigma))
        finally:
            self.self_context, self.context_noise, self.stats_weight = options

    @torch.no_grad()
    def rollout(self, model, data: Data, context: int, frames: int, timesteps, shift: float, seed: int = 0):
        """Dense rollout of every held-out episode from its first ``context`` true frames with the true
        actions: uint8 ``[E, frames, 64, 64, 3]``."""
        generator = torch.Generator(self.device).manual_seed(seed)
        video = data.frames[:, :context].permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        positions = torch.arange(context + frames, device=self.device).expand(video.shape[0], -1)
        video = self.generate(
            model,
            video,
            data.actions[:, : context + frames],
            positions,
            data.levels,
            timesteps,
            shift,
            generator,
        )
        predicted = video[:, :, context : context + frames].permute(0, 2, 3, 4, 1)
        return ((predicted + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    @torch.no_grad()
    def generate(
        self, model, video, actions, positions, levels, timesteps, shift: float, generator, window=None
    ):
        """Continue the clean frames ``video`` ``[B, 3, T, H, W]`` autoregressively to the length of
        ``actions``/``positions`` ``[B, L]`` with the sampler ``(timesteps, shift)``. Each step re-runs
        the past (clean at timestep 0) with the new chunk (noisy), which equals the KV-cached rollout.
        ``window``: ``None``, the whole past; else the past is the ``T`` given frames (the sinks) and
        the ``window - T`` frames before the chunk, as the pipeline's rolling cache with
        ``max_cache_frames=window, sink_frames=T`` (positions stay absolute). Returns
        ``[B, 3, L, H, W]`` with the first ``T`` frames ``video``'s."""
        sigmas = flow_sigmas(timesteps, shift)
        batch, total = actions.shape
        sinks = video.shape[2]
        if window is not None and window <= sinks:
            raise ValueError(f"window must exceed the {sinks} given frames (the sinks), got {window}")
        for t in range(sinks, total, CHUNK_FRAMES):
            length = min(t + CHUNK_FRAMES, total)
            if window is None:
                past = torch.arange(t, device=self.device)
            else:
                recent = torch.arange(max(sinks, t - (window - sinks)), t, device=self.device)
                past = torch.cat([torch.arange(sinks, device=self.device), recent])
            frames = torch.cat([past, torch.arange(t, length, device=self.device)])
            # the chunk's view of the past, gathered once for all its steps
            view = {
                "past": video[:, :, past],
                "actions": actions[:, frames],
                "positions": positions[:, frames],
                "levels": levels,
            }
            predict = functools.partial(self._chunk_flow, model, view)
            clean = self._sample(predict, (batch, 3, length - t, *video.shape[-2:]), sigmas, generator)
            video = torch.cat([video, clean.clamp(-1, 1)], 2)
        return video

    def _sample(self, predict, shape, sigmas, generator, grad_last: bool = False) -> torch.Tensor:
        """The few-step sampler on one chunk: from noise, each step takes the clean estimate
        ``x - sigma * predict(x, sigma)`` and re-noises it with fresh noise to the next sigma; returns
        the last step's estimate. ``grad_last``: only the last step records gradients."""
        latents = torch.randn(shape, generator=generator, device=self.device)
        for step, sigma in enumerate(sigmas):
            with torch.set_grad_enabled(grad_last and step + 1 == len(sigmas)):
                clean = latents - sigma * predict(latents, sigma)
            if step + 1 < len(sigmas):
                noise = torch.randn(shape, generator=generator, device=self.device)
                latents = (1 - sigmas[step + 1]) * clean + sigmas[step + 1] * noise
        return clean

    @torch.no_grad()
    def refresh_rollouts(
        self, model, data: Data, clips: int, clip_frames: int, generator, rollout_frames=None, window=None
    ) -> None:
        """Fill the rollout buffer: ``clips`` clips of ``rollout_frames`` frames (default
        ``clip_frames``) whose frames after a true start (1 to ``CONTEXT_FRAMES`` frames, cycling per
        refresh) are the model's own autoregressive rollout with the clip's true actions
        (``rollout_sampler``, the model in eval mode; ``window``: through a rolling window with the
        true start as sinks, :meth:`generate`). ``mix_rollouts`` trains on them: the model's drifted
        past as context, the true frames as targets (DAgger-style correction of exposure bias: the
        model learns to pull its rollout back to the game)."""
        batch = data.sample(clips, rollout_frames or clip_frames, generator, far_frames=0)
        start = 1 + self.refreshes % min(CONTEXT_FRAMES, clip_frames - 2)
        self.refreshes += 1
        with _eval_mode(model):
            batch["context"] = self.generate(
                model, batch["x0"][:, :, :start], batch["actions"], batch["positions"], batch["levels"],
                *self.rollout_sampler, generator, window,
            )  # fmt: skip
        batch["start"] = start
        self.buffer = batch

    def mix_rollouts(self, batch: dict, generator) -> dict:
        """``batch`` with its first ``round(rollout_context * B)`` clips drawn from the rollout buffer
        (with replacement), each with a clean prefix past its true start, so its targets follow some of
        the model's own frames; ``batch["context"]`` holds the context frames (the true frames on the
        other clips) and ``batch["rolled"]`` marks the buffer clips. Buffer clips longer than the
        batch's ``F`` frames give their true start (the sinks) and ``F - start`` consecutive frames
        from a random point after it, at their own positions: a rolling window's view of a long
        rollout. Unchanged without a buffer."""
        if self.buffer is None or self.rollout_context <= 0:
            return batch
        size, frames = batch["actions"].shape
        count = round(self.rollout_context * size)
        if count == 0:
            return batch
        start = self.buffer["start"]
        view = self._buffer_view(count, frames, generator)
        prefix = (
            start
            + 1
            + (torch.rand(count, generator=generator, device=self.device) * (frames - start - 1)).long()
        )
        mixed = {key: batch[key].clone() for key in ("x0", "actions", "positions", "levels", "clean")}
        mixed["context"] = batch.get("context", batch["x0"]).clone()
        mixed["rolled"] = torch.zeros(size, dtype=torch.bool, device=self.device)
        for key in ("x0", "context", "actions", "positions", "levels"):
            mixed[key][:count] = view[key]
        mixed["clean"][:count] = torch.arange(frames, device=self.device)[None, :] < prefix[:, None]
        mixed["rolled"][:count] = True
        return mixed

    def _buffer_view(self, count: int, frames: int, generator) -> dict:
        """``count`` clips of ``frames`` frames from the rollout buffer (with replacement): each picked
        clip's true start (the sinks), then a run of later frames from a random point after it, at
        their own positions (a rolling window's view of a long rollout). ``{"x0", "context"
        [B, 3, F, H, W], "actions", "positions" [B, F], "levels" [B]}``."""
        buffer, start = self.buffer, self.buffer["start"]
        length = buffer["actions"].shape[1]
        pick = (torch.rand(count, generator=generator, device=self.device) * buffer["x0"].shape[0]).long()
        run = (
            start
            + (torch.rand(count, generator=generator, device=self.device) * (length - frames + 1)).long()
        )
        sinks = torch.arange(start, device=self.device).expand(count, -1)
        index = torch.cat([sinks, run[:, None] + torch.arange(frames - start, device=self.device)], 1)
        rows = pick[:, None]
        view = {key: buffer[key][rows, :, index].permute(0, 2, 1, 3, 4) for key in ("x0", "context")}
        view |= {key: buffer[key][rows, index] for key in ("actions", "positions")}
        return view | {"levels": buffer["levels"][pick]}

    def window_clips(self, count: int, window: int, generator) -> dict:
        """``count`` rolling-window views of the rollout buffer, each ending in a frame to generate
        (:meth:`_buffer_view` of ``window + 1`` frames): a buffer clip's true start (the sinks), the
        ``window - start`` rolled frames before its frame ``j``, and frame ``j``'s action and
        position. ``{"past" [B, 3, window, H, W], "actions"/"positions" [B, window + 1], "levels"
        [B]}``."""
        view = self._buffer_view(count, window + 1, generator)
        return {"past": view["context"][:, :, :-1]} | {k: view[k] for k in ("actions", "positions", "levels")}

    def _chunk_flow(self, model, view: dict, chunk: torch.Tensor, sigma) -> torch.Tensor:
        """The flow prediction for ``chunk`` ``[B, 3, f, H, W]`` at ``sigma`` (a float, or one per clip
        ``[B]``) after ``view``'s clean past (``{"past" [B, 3, P, H, W], "actions"/"positions"
        [B, P + f], "levels" [B]}``)."""
        known = view["past"].shape[2]
        sigmas = torch.zeros(chunk.shape[0], known + chunk.shape[2], device=self.device)
        sigmas[:, known:] = sigma[:, None] if isinstance(sigma, torch.Tensor) else sigma
        flow = self.forward(
            model,
            torch.cat([view["past"], chunk], 2),
            view["actions"],
            sigmas,
            view["positions"],
            view["levels"],
        )
        return flow[:, :, known:]

    def dmd_loss(self, model, teacher, fake, clips: dict, generator, sigma_min: float):
        """Distribution matching distillation (DMD, as Self-Forcing and CausVid train) on the model's
        own rollouts: the model samples the next frame of each window view with ``rollout_sampler``
        (every step but the last without gradient), the sample is noised to a sigma in ``[sigma_min,
        0.98]``, and the loss pushes it along ``x0_teacher - x0_fake``: toward the frames the teacher
        (the initial weights, frozen) expects after this past, away from the ones the fake score
        model (trained on the model's samples, :meth:`fake_score_loss`) has learnt the model makes.
        Unlike a regression toward the true next frame, which after a drift is unpredictable and
        teaches its blurred mean, this matches distributions, so samples keep the contrast of real
        frames. ``-> (loss, the sample [B, 3, 1, H, W] detached)``."""
        past = clips["past"]
        batch = past.shape[0]
        shape = (batch, 3, 1, *past.shape[-2:])
        predict = functools.partial(self._chunk_flow, model, clips)
        sample = self._sample(predict, shape, flow_sigmas(*self.rollout_sampler), generator, grad_last=True)
        sigma = sigma_min + (0.98 - sigma_min) * torch.rand(batch, generator=generator, device=self.device)
        s = sigma[:, None, None, None, None]
        noisy = (1 - s) * sample.detach() + s * torch.randn(shape, generator=generator, device=self.device)
        with torch.no_grad():
            real = noisy - s * self._chunk_flow(teacher, clips, noisy, sigma)
            with _eval_mode(fake):
                made = noisy - s * self._chunk_flow(fake, clips, noisy, sigma)
            scale = (sample.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-4)
            target = sample.detach() - (made - real) / scale
        return 0.5 * F.mse_loss(sample, target), sample.detach()

    def fake_score_loss(self, fake, clips: dict, sample: torch.Tensor, generator) -> torch.Tensor:
        """The fake score model's flow-matching loss on the model's samples ``sample`` after the same
        pasts, at shifted-uniform sigmas (DMD's second model, which tracks the model's distribution)."""
        sigma = _shifted(torch.rand(sample.shape[0], generator=generator, device=self.device)).clamp(min=0.02)
        s = sigma[:, None, None, None, None]
        noise = torch.randn(sample.shape, generator=generator, device=self.device)
        flow = self._chunk_flow(fake, clips, (1 - s) * sample + s * noise, sigma)
        return F.mse_loss(flow, noise - sample)


def frame_stats_loss(estimate: torch.Tensor, x0: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Contrast and detail of the denoised estimates against the true frames' (``--stats-loss``):
    the mean over the ``frames`` ``[B, F]`` (bool) of ``(std_hat / std - 1)^2 + (detail_hat / detail -
    1)^2``, per frame, where std and detail are the stays-alive check's std and edge strength
    (:func:`vidaccel.metrics.frame_statistics`). ``estimate``, ``x0``: ``[B, C, F, H, W]``. Zero
    when no frame is selected. A regression loss alone is minimised by the mean of the frames a past
    allows, which is flatter (lower std) and blurrier (less detail) than any of them; these two
    moments of each frame can be matched without knowing which frame it is."""

    def moments(video):  # [B, C, F, H, W] -> the stays-alive check's std and edge strength, [B, F]
        stats = frame_statistics(video.movedim(1, -1))
        return stats["std"], stats["edge"]

    (std_hat, detail_hat), (std, detail) = moments(estimate), moments(x0)
    per_frame = (std_hat / std.clamp(min=1e-3) - 1) ** 2 + (detail_hat / detail.clamp(min=1e-3) - 1) ** 2
    weight = frames.float()
    return (per_frame * weight).sum() / weight.sum().clamp(min=1)


def _shifted(uniform: torch.Tensor) -> torch.Tensor:
    """Uniform draws in [0, 1] warped by the flow shift 3 (more weight on high noise)."""
    return 3 * uniform / (1 + 2 * uniform)


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` in eval mode inside the block, back in its previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(trainer: Trainer, model, data: Data, frames: int, samplers) -> dict:
    """Mean PSNR over the first ``frames`` predicted frames (per frame index pooled over the held-out
    episodes, then averaged) for each sampler, against copying the last context frame (and, for
    reference, copying the previous true frame, which needs the truth)."""
    truth = data.frames[:, CONTEXT_FRAMES : CONTEXT_FRAMES + frames].cpu().numpy()
    last = data.frames[:, CONTEXT_FRAMES - 1 : CONTEXT_FRAMES].cpu().numpy()
    previous = data.frames[:, CONTEXT_FRAMES - 1 : CONTEXT_FRAMES - 1 + frames].cpu().numpy()

    def mean_psnr(video):
        return float(
            np.mean([psnr(video[:, min(i, video.shape[1] - 1)], truth[:, i]) for i in range(frames)])
        )

    rows = []
    for timesteps, shift in samplers:
        started = time.perf_counter()
        video = trainer.rollout(model, data, CONTEXT_FRAMES, frames, timesteps, shift)
        per_frame = [psnr(video[:, i], truth[:, i]) for i in range(frames)]
        rows.append({
            "denoising_timesteps": list(timesteps), "shift": shift, "psnr": float(np.mean(per_frame)),
            "psnr_per_frame": [round(float(p), 3) for p in per_frame], "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(f"eval {timesteps} shift {shift}: PSNR {rows[-1]['psnr']:.2f} dB", flush=True)
    chosen = max(rows, key=lambda row: row["psnr"])
    copy_last = mean_psnr(last)
    return {
        "episodes": int(truth.shape[0]),
        "context_frames": CONTEXT_FRAMES,
        "predicted_frames": frames,
        "psnr": "dB per predicted frame index, pooled over the held-out episodes, averaged over the frames",
        "samplers": rows,
        "chosen": {"denoising_timesteps": chosen["denoising_timesteps"], "shift": chosen["shift"]},
        "psnr_model": chosen["psnr"],
        "psnr_copy_last_context": copy_last,
        "psnr_copy_previous_true": mean_psnr(previous),
        "margin_db": chosen["psnr"] - copy_last,
    }


if __name__ == "__main__":
    main()
