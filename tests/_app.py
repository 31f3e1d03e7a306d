"""Helpers of the Gradio app tests: the app script, and a tiny world model to run the app on."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from vidaccel.pipelines.app.play import play_stop
from vidaccel.pipelines.app.state import LOADED, OPTIONS
from vidaccel.pipelines.world_model import default_metadata, world_model_config

APP = Path(__file__).resolve().parents[1] / "demos" / "app.py"


def load_app():
    """``demos/app.py`` (the page and its command line) as a module: it is a script, not a package
    module; registered in ``sys.modules`` as its dataclasses need."""
    spec = importlib.util.spec_from_file_location("vidaccel_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_tiny_world_model(folder: Path) -> Path:
    """A world-model folder as ``WorldModelPipeline.from_pretrained_world_model`` reads it, with a
    one-layer random transformer (2 heads x 32), one context frame and a two-step sampler: a rollout
    of a few frames takes about a second on a CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    config = world_model_config() | dict(
        num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        WanTransformer3DModel(**config).save_pretrained(folder)
    metadata = default_metadata() | {"context_frames": 1, "denoising_timesteps": [1000, 500]}
    (folder / "world_model.json").write_text(json.dumps(metadata))
    return folder


@contextlib.contextmanager
def tiny_world_model(folder: Path):
    """While active, the app's "shipped weights" world model is a tiny one written to ``folder``
    (:func:`write_tiny_world_model`); on exit the Play session is closed and the loaded model and
    the setting are dropped."""
    OPTIONS["world_model"] = write_tiny_world_model(folder)
    try:
        yield OPTIONS["world_model"]
    finally:
        play_stop()
        LOADED.clear()
        OPTIONS["world_model"] = None
