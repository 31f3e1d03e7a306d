"""The world model's training run: data, networks, the time-budgeted training loop, the choice of
weights and sampler, and the saved model folder; and the weight average of two model folders.
``demos/train_world_model.py`` is the run's command line (and describes the recipe and every option):
:func:`train` takes its parsed options; ``demos/average_world_models.py`` is the average's."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vidaccel.pipelines.game import ACTIONS, FRAME_SIZE, LEVELS
from vidaccel.pipelines.training import (
    CHUNK_FRAMES,
    CONTEXT_FRAMES,
    MAX_WEIGHT_BYTES,
    SAMPLERS,
    Data,
    Trainer,
    build_model,
    evaluate,
    init_metadata,
    make_episodes,
)
from vidaccel.pipelines.world_model import LEVEL_TOKENS, level_embeddings

WEIGHTS = "diffusion_pytorch_model.safetensors"  # a world-model folder's weights


def average_world_models(first: Path, second: Path, alpha: float, out: Path) -> Path:
    """Write ``(1 - alpha) * first + alpha * second`` (weights averaged in fp32, stored in bf16) to
    ``out`` with ``first``'s config and metadata. Raises ``ValueError`` for an ``alpha`` outside
    ``[0, 1]``, a folder without weights, or two models of different configs or parameters."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    first, second, out = Path(first), Path(second), Path(out)
    for folder in (first, second):
        for name in (WEIGHTS, "config.json", "world_model.json"):
            if not (folder / name).is_file():
                raise ValueError(f"{folder} is not a world-model folder: it has no {name}")
    configs = [_architecture(folder) for folder in (first, second)]
    if configs[0] != configs[1]:
        raise ValueError(f"{first} and {second} have different configs; only one architecture averages")
    a, b = load_file(first / WEIGHTS), load_file(second / WEIGHTS)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(f"{first} and {second} hold different parameters")
    weights = {
        k: ((1 - alpha) * a[k].float() + alpha * b[k].float()).to(torch.bfloat16).contiguous() for k in a
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / WEIGHTS, metadata={"format": "pt"})
    (out / "config.json").write_text((first / "config.json").read_text())
    metadata = json.loads((first / "world_model.json").read_text())
    metadata["training"] = {
        "average": {"first": str(first), "second": str(second), "alpha": float(alpha)},
        "command": " ".join(["python", *sys.argv]),
        "first_training": metadata.get("training"),
        "second_training": json.loads((second / "world_model.json").read_text()).get("training"),
    }
    metadata.pop("evaluation", None)  # the first model's figures do not describe the average
    (out / "world_model.json").write_text(json.dumps(metadata, indent=1))
    return out


def _architecture(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def train(args) -> dict:
    """Train, evaluate and save a world model as the options ``args`` (``train_world_model.py``'s)
    ask; returns the written ``world_model.json``."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, held_out = _datasets(args, device, start)
    nets = _networks(args, device)
    init_meta = init_metadata(args.init)
    init_sampler, rollout_sampler = samplers_of(args, init_meta)
    trainer = Trainer(
        device,
        self_context=args.self_context,
        context_noise=args.context_noise,
        rollout_context=args.rollout_context,
        rollout_sampler=rollout_sampler,
        stats_weight=args.stats_loss,
        stats_sigma_max=args.stats_sigma_max,
    )
    for net in (nets.model, nets.ema, nets.teacher, nets.fake):
        if net is not None:
            trainer.install(net)
    run = _train_loop(args, trainer, nets, data, device)
    best, chosen, val = _pick_weights(args, trainer, nets, held_out, device)
    samplers = SAMPLERS[:1] if args.toy else SAMPLERS
    if args.eval_samplers == "init":  # only the initial weights' sampler (a faster evaluation)
        samplers = (init_sampler,)
    evaluation = evaluate(trainer, best, held_out, args.eval_frames, samplers)
    record = training_record(args, device, run, nets.num_params, init_meta, rollout_sampler)
    record |= {"weights": chosen, "validation_loss": val}
    metadata = save_world_model(out, best, evaluation, record, run.curve, start)
    print_evaluation(evaluation, args.eval_frames)
    return metadata


def samplers_of(args, init_meta: dict | None) -> tuple[tuple | None, tuple]:
    """``(the initial weights' sampler, the rollout buffer's sampler)``, each ``(timesteps, shift)``:
    the sampler ``--init`` shipped with (``None`` without one; ``--rollout-timesteps`` replaces its
    timesteps), used by the rollout buffer, DMD and ``--eval-samplers init``; else the first of
    :data:`SAMPLERS`."""
    init_sampler = (
        None if init_meta is None else (tuple(init_meta["denoising_timesteps"]), float(init_meta["shift"]))
    )
    if args.rollout_timesteps is not None:
        init_sampler = (args.rollout_timesteps, init_sampler[1] if init_sampler else SAMPLERS[0][1])
    return init_sampler, init_sampler or SAMPLERS[0]


def _datasets(args, device: torch.device, start: float) -> tuple[Data, Data]:
    """The training episodes and the held-out ones (seeds from 1,000,000, never trained on)."""
    frames, actions, levels = make_episodes(args.episodes, args.episode_frames, args.workers, seed_base=0)
    held_out = make_episodes(
        args.eval_episodes, CONTEXT_FRAMES + args.eval_frames, args.workers, seed_base=1_000_000
    )
    print(
        f"data: {args.episodes} episodes x {args.episode_frames} frames (+{args.eval_episodes} held out) "
        f"in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return Data(frames, actions, levels, device), Data(*held_out, device)


def _networks(args, device: torch.device) -> SimpleNamespace:
    """The model, its EMA, and with ``--dmd`` the frozen teacher and the fake score model (both start
    as ``--init``) with the fake's optimizer; checks the bf16 weight budget."""
    model = build_model(args.init, args.toy, device)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters ({2 * num_params / 1e6:.1f} MB in bf16)", flush=True)
    if 2 * num_params > MAX_WEIGHT_BYTES:
        raise ValueError(f"{num_params} parameters exceed {MAX_WEIGHT_BYTES} bytes in bf16")
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if args.dmd > 0 else None
    fake = copy.deepcopy(model) if args.dmd > 0 else None
    return SimpleNamespace(
        model=model,
        ema=copy.deepcopy(model).requires_grad_(False),
        teacher=teacher,
        fake=fake,
        num_params=num_params,
        optimizer=_adamw(model, args.lr),
        fake_optimizer=None if fake is None else _adamw(fake, args.fake_lr),
    )


def _adamw(model, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def learning_rate(args, step: int, progress: float) -> float:
    """Linear warm-up over ``--warmup`` steps, then a cosine over the time budget down to 5%."""
    return (
        args.lr
        * min(1.0, (step + 1) / args.warmup)
        * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    )


def _train_loop(args, trainer: Trainer, nets: SimpleNamespace, data: Data, device) -> SimpleNamespace:
    """Train for ``--minutes``: ``{step, curve, seconds, rollout_seconds, final_loss}``."""
    budget = args.minutes * 60
    train_start = time.perf_counter()
    curve, window, dmd_window, step, rollout_seconds = [], [], [], 0, 0.0
    generator = torch.Generator(device).manual_seed(args.seed)
    while (elapsed := time.perf_counter() - train_start) < budget:
        lr = learning_rate(args, step, elapsed / budget)
        for group in nets.optimizer.param_groups:
            group["lr"] = lr
        if (args.rollout_context > 0 or args.dmd > 0) and step % args.rollout_every == 0:
            started = time.perf_counter()
            trainer.refresh_rollouts(
                nets.model,
                data,
                args.batch,
                args.clip_frames,
                generator,
                args.rollout_frames,
                args.rollout_window,
            )
            rollout_seconds += time.perf_counter() - started
        loss, dmd = _train_step(args, trainer, nets, data, generator)
        if dmd is not None:
            dmd_window.append(dmd)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(nets.ema.parameters()), list(nets.model.parameters()), 1 - decay)
        step += 1
        window.append(loss.detach())
        if step % args.log_every == 0:
            curve.append(_log_point(step, lr, window, dmd_window, train_start))
    seconds = time.perf_counter() - train_start
    final_loss = float(np.mean([point["loss"] for point in curve[-5:]])) if curve else float("nan")
    print(f"trained {step} steps in {seconds:.0f}s, final loss {final_loss:.4f}", flush=True)
    return SimpleNamespace(
        step=step, curve=curve, seconds=seconds, rollout_seconds=rollout_seconds, final_loss=final_loss
    )


def _train_step(args, trainer: Trainer, nets: SimpleNamespace, data: Data, generator):
    """One optimizer step of the model (and with ``--dmd`` of the fake score model): ``-> (diffusion
    loss, [dmd loss, fake loss] detached or None)``."""
    batch = data.sample(args.batch, args.clip_frames, generator, far_frames=args.far_frames)
    batch = trainer.mix_rollouts(batch, generator)
    loss = trainer.loss(nets.model, batch, generator)
    total = loss
    if args.dmd > 0:
        clips = trainer.window_clips(args.batch, args.rollout_window, generator)
        dmd_loss, sample = trainer.dmd_loss(
            nets.model, nets.teacher, nets.fake, clips, generator, args.dmd_sigma_min
        )
        total = loss + args.dmd * dmd_loss
    _optimize(nets.optimizer, nets.model, total)
    if args.dmd <= 0:
        return loss, None
    for _ in range(args.fake_steps):
        fake_loss = trainer.fake_score_loss(nets.fake, clips, sample, generator)
        _optimize(nets.fake_optimizer, nets.fake, fake_loss)
    return loss, torch.stack([dmd_loss.detach(), fake_loss.detach()])


def _optimize(optimizer, model, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _log_point(step: int, lr: float, window: list, dmd_window: list, train_start: float) -> dict:
    """The loss curve's point of the last ``--log-every`` steps (clears the windows), printed."""
    mean = float(torch.stack(window).mean())
    window.clear()
    point = {"step": step, "loss": mean, "lr": lr, "seconds": round(time.perf_counter() - train_start, 2)}
    extra = ""
    if dmd_window:
        dmd_mean, fake_mean = torch.stack(dmd_window).mean(0).tolist()
        dmd_window.clear()
        point |= {"dmd_loss": dmd_mean, "fake_loss": fake_mean}
        extra = f"  dmd {dmd_mean:.4f}  fake {fake_mean:.4f}"
    print(
        f"step {step:5d}  loss {mean:.4f}{extra}  lr {lr:.2e}  "
        f"{(time.perf_counter() - train_start) / step:.3f}s/step",
        flush=True,
    )
    return point


def _pick_weights(args, trainer: Trainer, nets: SimpleNamespace, held_out: Data, device):
    """The raw or the EMA weights, whichever has the lower validation loss on held-out clips:
    ``-> (model, "raw" | "ema", {"raw": loss, "ema": loss})``."""
    val_batch = held_out.sample(
        min(args.batch, 16),
        min(args.clip_frames, CONTEXT_FRAMES + args.eval_frames),
        torch.Generator(device).manual_seed(1),
        far_frames=0,
    )
    val = {
        name: trainer.validation_loss(net, val_batch)
        for name, net in (("raw", nets.model), ("ema", nets.ema))
    }
    chosen = min(val, key=val.get)
    print(f"validation loss raw {val['raw']:.4f} ema {val['ema']:.4f} -> {chosen}", flush=True)
    return (nets.ema if chosen == "ema" else nets.model), chosen, val


def training_record(args, device, run: SimpleNamespace, num_params: int, init_meta, rollout_sampler) -> dict:
    """``world_model.json``'s ``training`` record: the command, the run's figures and every option
    (``total_seconds``, ``weights_bytes``, ``weights`` and ``validation_loss`` still ``None``)."""
    dmd = args.dmd > 0
    return {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": run.step,
        "seconds": round(run.seconds, 1),
        "total_seconds": None,  # filled in by save_world_model, as the next three
        "final_loss": run.final_loss,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parameters": num_params,
        "weights_bytes": None,
        "weights": None,
        "validation_loss": None,
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
        "rollout_seconds": round(run.rollout_seconds, 1),
        "dmd": args.dmd,
        "dmd_sigma_min": args.dmd_sigma_min if dmd else None,
        "fake_lr": args.fake_lr if dmd else None,
        "fake_steps": args.fake_steps if dmd else None,
        "stats_loss": args.stats_loss,
        "stats_sigma_max": args.stats_sigma_max if args.stats_loss else None,
        "init": None if args.init is None else str(args.init),
        "init_training": None if init_meta is None else init_meta.get("training"),
        "lr": args.lr,
        "ema": args.ema,
        "episodes": args.episodes,
        "episode_frames": args.episode_frames,
        "toy": args.toy,
    }


def save_world_model(out: Path, model, evaluation: dict, record: dict, curve: list, start: float) -> dict:
    """Write the model folder: ``config.json``, bf16 weights, ``world_model.json`` (with the chosen
    sampler, the level tokens, ``record`` and ``evaluation``) and ``loss_curve.json``; returns the
    metadata. Raises ``ValueError`` when the weights exceed :data:`MAX_WEIGHT_BYTES`."""
    timesteps, shift = evaluation["chosen"]["denoising_timesteps"], evaluation["chosen"]["shift"]
    model.save_config(out)
    weights = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, out / WEIGHTS, metadata={"format": "pt"})
    weight_bytes = (out / WEIGHTS).stat().st_size
    record = record | {"total_seconds": round(time.perf_counter() - start, 1), "weights_bytes": weight_bytes}
    metadata = {
        "actions": list(ACTIONS),
        "frame_size": FRAME_SIZE,
        "chunk_frames": CHUNK_FRAMES,
        "context_frames": CONTEXT_FRAMES,
        "denoising_timesteps": list(timesteps),
        "shift": shift,
        "levels": list(LEVELS),
        "level_tokens": LEVEL_TOKENS | {"embeddings": level_embeddings(**LEVEL_TOKENS).tolist()},
        "training": record,
        "evaluation": evaluation,
    }
    (out / "world_model.json").write_text(json.dumps(metadata, indent=1))
    (out / "loss_curve.json").write_text(json.dumps(curve))
    print(f"wrote {out} ({weight_bytes / 1e6:.1f} MB weights) in {time.perf_counter() - start:.0f}s total")
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise ValueError(f"weights are {weight_bytes} bytes, above {MAX_WEIGHT_BYTES}")
    return metadata


def print_evaluation(evaluation: dict, frames: int) -> None:
    """The evaluation's table: each sampler's PSNR, the copy baselines and the margin."""
    print(f"\nsampler                         PSNR dB (first {frames} frames)")
    for row in evaluation["samplers"]:
        print(f"{str(row['denoising_timesteps']):24s} s={row['shift']:<4}  {row['psnr']:.2f}")
    print(f"copy last context frame          {evaluation['psnr_copy_last_context']:.2f}")
    print(f"copy previous true frame         {evaluation['psnr_copy_previous_true']:.2f}  (uses the truth)")
    print(f"margin over copy-last: {evaluation['margin_db']:+.2f} dB (bar: >= 2 dB)")
