"""The app's models: load (or reuse) the pipeline of a ``model`` field value, check a checkpoint
folder before diffusers reads it, and release the memory a run leaves."""

from __future__ import annotations

import gc
import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from vidaccel.pipelines.app.fields import CAUSAL, T2V, WORLD_KINDS, WORLD_RANDOM, error_text, source_key
from vidaccel.pipelines.app.state import GPU_LOCK, LOADED, OPTIONS
from vidaccel.pipelines.causal_wan import CausalWanPipeline

LOG = logging.getLogger("vidaccel.app")

WAN_PIPELINES = ("WanPipeline", "CausalWanPipeline", "FreeSwimWanPipeline")
"""``model_index.json`` classes a checkpoint may have (all hold one ``WanTransformer3DModel``)."""
OPTIONAL_COMPONENTS = ("text_encoder", "tokenizer", "transformer_2")


@dataclass
class LoadedModel:
    """A loaded pipeline: ``kind`` (a :data:`~vidaccel.pipelines.app.fields.SOURCES` key), ``pipe``,
    and a one-line ``summary``."""

    kind: str
    pipe: object
    summary: str
    key: tuple = ()


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 where available, else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_model(model: str, checkpoint: str = "") -> LoadedModel:
    """Load (or reuse) the pipeline of a ``model`` field value. Loading another model first releases
    the previous one. Raises ``ValueError`` with a readable message for a missing or unsupported
    checkpoint and for missing shipped weights."""
    kind = source_key(model)
    key = (
        kind,
        str(Path(checkpoint).expanduser().resolve()) if kind in (T2V, CAUSAL) else OPTIONS["world_model"],
    )
    loaded = LOADED.get("compare")
    if loaded is not None and loaded.key == key:
        return loaded
    LOADED.pop("compare", None)
    release_memory()
    loaded = load_pipeline(kind, checkpoint)
    loaded.key = key
    LOADED["compare"] = loaded
    return loaded


def load_pipeline(kind: str, checkpoint: str) -> LoadedModel:
    """A new pipeline of model source ``kind`` (never reused: the Play tab's own instance)."""
    device, dtype = device_and_dtype()
    if kind in WORLD_KINDS:
        pipe, summary = _load_world_model(kind, device, dtype)
    else:
        pipe, summary = _load_checkpoint(kind, checkpoint, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(kind, pipe, f"{summary}; {device.type} {str(dtype).removeprefix('torch.')}")


def _load_world_model(kind: str, device: torch.device, dtype: torch.dtype) -> tuple[object, str]:
    folder = OPTIONS["world_model"]
    pipe = _world_model_class().from_pretrained_world_model(
        folder, device=device, dtype=dtype, random_weights=kind == WORLD_RANDOM
    )
    meta = pipe.metadata
    params = sum(p.numel() for p in pipe.transformer.parameters())
    weights = "random weights" if kind == WORLD_RANDOM else f"from {folder}" if folder else "shipped weights"
    summary = (
        f"world model ({weights}): "
        f"{params / 1e6:.1f}M parameters, chunks of {meta['chunk_frames']} frames, "
        f"{meta['context_frames']} context frames, actions {', '.join(meta['actions'])}"
    )
    return pipe, summary


def _load_checkpoint(
    kind: str, checkpoint: str, device: torch.device, dtype: torch.dtype
) -> tuple[object, str]:
    path, missing = check_checkpoint(checkpoint)
    from diffusers import WanPipeline

    cls = WanPipeline if kind == T2V else CausalWanPipeline
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers warns when the folder's class differs
            absent = dict.fromkeys(set(missing) & set(inspect.signature(cls.__init__).parameters))
            pipe = cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **absent)
    except Exception as error:  # a broken folder can fail in many ways inside diffusers
        raise ValueError(
            f"Could not load {path} as a {cls.__name__}: {type(error).__name__}: {error}"
        ) from None
    pipe.to(device)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    encoder = "" if pipe.text_encoder is not None else " (no text encoder: random prompt embeddings)"
    return pipe, f"{cls.__name__} from {path}: {params / 1e6:.1f}M-parameter transformer{encoder}"


def _world_model_class():
    try:
        from vidaccel.pipelines.world_model import WorldModelPipeline
    except ImportError as error:
        raise ValueError(f"The world model pipeline is not available in this build ({error})") from None
    return WorldModelPipeline


def check_checkpoint(checkpoint: str) -> tuple[Path, list[str]]:
    """``(folder, optional components it lacks)`` of a diffusers Wan pipeline checkpoint, or
    ``ValueError`` saying what is wrong."""
    text = (checkpoint or "").strip()
    if not text:
        raise ValueError(
            "Checkpoint folder: enter the path of a local diffusers Wan checkpoint (a folder with "
            "model_index.json, e.g. Wan2.1-T2V-1.3B-Diffusers)"
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"Checkpoint folder: {text} does not exist")
    if not path.is_dir():
        raise ValueError(f"Checkpoint folder: {text} is a file; give the pipeline's folder")
    spec = _model_index(path, text)
    # diffusers wants absent components passed explicitly (e.g. a checkpoint saved without its encoder).
    return path, [name for name in OPTIONAL_COMPONENTS if spec.get(name, [None])[-1] is None]


def _model_index(path: Path, text: str) -> dict:
    """The ``model_index.json`` of the checkpoint folder ``path`` (``text`` as the user gave it), or
    ``ValueError`` when it is absent, unreadable or names no supported Wan pipeline."""
    index = path / "model_index.json"
    supported = (
        f"supported: a diffusers pipeline folder whose model_index.json names one of {', '.join(WAN_PIPELINES)} "
        "with a WanTransformer3DModel"
    )
    if not index.is_file():
        raise ValueError(
            f"Checkpoint folder: {text} has no model_index.json, so it is not a diffusers pipeline ({supported})"
        )
    try:
        spec = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Checkpoint folder: cannot read {index}: {error}") from None
    transformer = spec.get("transformer") if isinstance(spec, dict) else None
    if (
        not isinstance(spec, dict)
        or spec.get("_class_name") not in WAN_PIPELINES
        or not isinstance(transformer, list)
        or transformer[-1:] != ["WanTransformer3DModel"]
    ):
        found = spec.get("_class_name") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"Checkpoint folder: {text} holds a {found}, not a supported model ({supported})")
    return spec


def load_model_message(model: str, checkpoint: str = "") -> str:
    """Callback of the Load button: load the model and say what it is, or what is wrong."""
    try:
        with GPU_LOCK:
            return f"Loaded {load_model(model, checkpoint).summary}."
    except ValueError as error:
        return error_text(error)
    except Exception as error:
        LOG.exception("loading failed")
        return error_text(error, unexpected=True)


def release_memory() -> None:
    """On CUDA: collect unreferenced tensors (cycles included) and return the cached blocks to the
    driver. (On the CPU, reference counting already frees a run's tensors.)"""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
