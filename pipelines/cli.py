"""Command-line helpers the world-model scripts share: model and world options, ``--methods`` and
``--timesteps`` parsing, the rolling window's defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from vidaccel.pipelines.causal_wan import check_denoising_timesteps
from vidaccel.pipelines.world_model import DEFAULT_WORLD_MODEL, WorldModelPipeline


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


def parse_timesteps(text: str) -> list[float]:
    """A sampler's denoising timesteps from ``"1000,750,500,250"``, checked as the pipeline checks them
    (:func:`~vidaccel.pipelines.causal_wan.check_denoising_timesteps`)."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"timesteps are comma-separated numbers, got {text!r}") from None
    check_denoising_timesteps(values)
    return values


def check_window(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` unless ``--sink-frames`` < ``--window-frames`` (where both are set)."""
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
