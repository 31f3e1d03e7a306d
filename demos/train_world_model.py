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
  its drifted past back to the game (DAgger-style; results: ``benchmarks/results/world_model_finetune.md``).
  ``--rollout-frames L
  --rollout-window W`` make the buffer rollouts L frames long, through a W-frame rolling window with
  the true start as sinks (as a rollout with ``max_cache_frames=W`` deploys it); a batch takes each
  one's sinks and a run of later frames (results: ``benchmarks/results/world_model_stability.md``).
- ``--self-context P`` does the same with the model's one-step estimates of the context frames.
- ``--context-noise S`` noises context frames to a sigma drawn from [0, S] (GameNGen's noise
  augmentation), for rollouts that commit their frames re-noised (``context_timestep``).
- ``--dmd W`` (with ``--init``, ``--rollout-window`` and longer ``--rollout-frames``): distribution
  matching (DMD, as Self-Forcing and CausVid train) on the model's own rollouts, weighted ``W`` beside
  the diffusion loss: the model samples the frame after a rolling-window view of its rollout, and the
  sample is pushed toward what the frozen initial weights (the teacher) expect there, away from what a
  fake score model trained on the samples has learnt (results: ``world_model_stability.md``, section
  5.2). ``--rollout-timesteps``
  sets the sampler of the rollouts, DMD's generator and ``--eval-samplers init``.
- ``--stats-loss W`` adds ``W`` times :func:`frame_stats_loss` on the denoised estimates of the
  target frames at sigma <= ``--stats-sigma-max``: each frame's std and detail (mean absolute
  difference of adjacent pixels) against the true frame's. A regression loss toward a frame the past
  cannot predict teaches the flat, blurred mean of the possible frames; the two moments can be matched
  without knowing the frame. ``assets/world_model_long`` was fine-tuned with ``--rollout-context 0.5``
  and ``W = 4`` (results: ``world_model_stability.md``, section 6).

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
import os
from pathlib import Path

from vidaccel.pipelines.causal_wan import check_denoising_timesteps
from vidaccel.pipelines.training import CONTEXT_FRAMES
from vidaccel.pipelines.training_run import train


def main() -> None:
    train(parse_args())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_run_arguments(parser)
    _add_rollout_arguments(parser)
    _add_loss_arguments(parser)
    args = parser.parse_args(argv)
    defaults = dict(
        minutes=(0.6, 6.3), batch=(2, 32), clip_frames=(6, 16), far_frames=(2, 4), episodes=(8, 256),
        episode_frames=(64, 768), eval_episodes=(1, 16), eval_frames=(3, 32), log_every=(2, 25), warmup=(5, 100),
    )  # fmt: skip
    for name, (toy, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, toy if args.toy else full)
    _check_args(args)
    return args


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's size, data, optimizer and evaluation options."""
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


def _add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    """The context options against exposure bias: noise, the model's own rollouts as context."""
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


def _add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """The extra losses: DMD on the model's own rollouts and the contrast-and-detail loss."""
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


def _check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the option for a value out of its range or a missing companion."""
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


if __name__ == "__main__":
    main()
