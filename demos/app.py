"""Gradio app: see and feel vidaccel's acceleration (``pip install -e ".[demo]"``)::

    python demos/app.py                   # http://127.0.0.1:7860
    python demos/app.py --port 7861 --share no

- **Model**: the shipped world model (``assets/world_model``; runs on a CPU), the same model with
  random weights (for testing), or a local diffusers Wan checkpoint run as text-to-video
  (``WanPipeline``) or autoregressively (``CausalWanPipeline``).
- **Methods**: TempCache, AnnSA, AnnCA, FlashBlock and FreeSwim, each offered where it applies to
  the chosen pipeline, with its main parameters (defaults read from the config dataclasses).
- **Compare**: the dense and the accelerated pipeline on the same seed; both videos side by side
  (and the game's true frames for the world model), per-chunk latency and memory of both, and a
  table of total time, speedup, peak memory and fidelity (PSNR/SSIM against dense and, for the
  world model, against the truth).
- **Play** (world model): the arrow keys or the buttons pick the action of the next chunk; the
  accelerated pipeline generates it and its frames stream into the page, beside the true game.

One generation runs at a time (the GPU events share one queue of concurrency 1, and a lock), its
memory is released when it ends (``vidaccel.remove``, ``torch.cuda.empty_cache``), a bad value in
any field gives a message in the page, and Stop cancels a run between two transformer calls.

The callbacks (:func:`load_model_message`, :func:`run_comparison`, :func:`play_start`,
:func:`play_step`, :func:`play_stop`) are plain functions over a dict of field values
(:func:`default_values`), testable without a browser; :func:`build_app` wires them to the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import shutil
import sys
import tempfile
import threading
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import vidaccel
from vidaccel.config import MethodConfig
from vidaccel.metrics import psnr, ssim
from vidaccel.state import context_of

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling demo scripts' helpers
from long_rollout import plot_lines, timed_chunks, write_video  # noqa: E402

LOG = logging.getLogger("vidaccel.app")

WORLD, WORLD_RANDOM, T2V, CAUSAL = "world", "world_random", "t2v", "causal"
SOURCES = {
    WORLD: "World model (shipped weights)",
    WORLD_RANDOM: "World model (random weights, for testing)",
    T2V: "Wan checkpoint: text-to-video (WanPipeline)",
    CAUSAL: "Wan checkpoint: autoregressive (CausalWanPipeline)",
}
"""Model sources: key -> the label shown in the page (the value of the ``model`` field)."""
WORLD_KINDS = frozenset({WORLD, WORLD_RANDOM})
ROLLOUT_KINDS = WORLD_KINDS | {CAUSAL}

FPS = 8
KEEP_RUNS = 4  # runs whose files stay on disk
VIEW_SIZE = 256  # videos and play frames are upscaled (nearest) to at least this many pixels
WAN_PIPELINES = ("WanPipeline", "CausalWanPipeline", "FreeSwimWanPipeline")
"""``model_index.json`` classes a checkpoint may have (all hold one ``WanTransformer3DModel``)."""
OPTIONAL_COMPONENTS = ("text_encoder", "tokenizer", "transformer_2")
PLAY_KEYS = {"ArrowUp": "up", "ArrowDown": "down", "ArrowLeft": "left", "ArrowRight": "right", " ": "noop"}


@dataclass(frozen=True)
class MethodSpec:
    """One method as the page offers it.

    Attributes:
        name: shown name and prefix of its field keys (``"TempCache.threshold"``).
        config: its config dataclass, or ``None`` when this vidaccel build lacks it.
        kinds: the model sources it applies to.
        fields: the config fields shown, in order (``None``: every field of a simple type).
        choices: allowed values of string fields (shown as drop-downs).
        app_defaults: values shown where the config's own default cannot run as is (AnnSA and AnnCA
            need exactly one of ``top_p``/``top_k``; their configs default both to ``None``).
        note: one line on what it does.
    """

    name: str
    config: type[MethodConfig] | None
    kinds: frozenset[str]
    fields: tuple[str, ...] | None
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    app_defaults: Mapping[str, object] = field(default_factory=dict)
    note: str = ""


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "TempCache",
        vidaccel.TempCacheConfig,
        ROLLOUT_KINDS,
        ("threshold", "sink_frames", "max_tokens", "scope", "radius"),
        {"scope": vidaccel.TempCacheConfig.SCOPES},
        note="merges near-duplicate cached keys across frames (KV cache of a rollout)",
    ),
    MethodSpec(
        "AnnSA",
        vidaccel.AnnSAConfig,
        ROLLOUT_KINDS | {T2V},
        ("n_clusters", "top_p", "top_k", "refresh_every", "dense_layers", "dense_steps"),
        app_defaults={"top_p": 0.9},
        note="ANN-routed block-sparse self-attention (set top_p or top_k, not both)",
    ),
    MethodSpec(
        "AnnCA",
        vidaccel.AnnCAConfig,
        ROLLOUT_KINDS | {T2V},
        ("top_p", "top_k", "granularity", "refresh_every"),
        {"granularity": ("frame", "block")},
        app_defaults={"top_p": 0.9},
        note="ANN-selected sparse cross-attention to the prompt (set top_p or top_k, not both)",
    ),
    MethodSpec(
        "FlashBlock",
        getattr(vidaccel, "FlashBlockConfig", None),
        ROLLOUT_KINDS,
        None,
        note="reuses the attention to earlier chunks across a chunk's denoising steps",
    ),
    MethodSpec(
        "FreeSwim",
        vidaccel.FreeSwimConfig,
        frozenset({T2V}),
        ("train_size", "cache_steps", "temperature", "offload_cache"),
        note="inward sliding windows above the training size (height/width >= train_size)",
    ),
)


# ---------------------------------------------------------------------------------------------------
# Fields: every value the page sends, by key
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """A page field: ``kind`` is ``int``, ``float``, ``bool``, ``choice``, ``pair`` or ``text``;
    ``optional``: a number that may be left empty (``None``), shown as a text box."""

    key: str
    label: str
    kind: str
    default: object
    choices: tuple = ()
    info: str = ""
    optional: bool = False


GENERAL_FIELDS: tuple[Field, ...] = (
    Field("model", "Model", "choice", SOURCES[WORLD], tuple(SOURCES.values())),
    Field("checkpoint", "Checkpoint folder (diffusers format)", "text", "",
          info="a local folder with model_index.json, for the two 'Wan checkpoint' models"),
    Field("seed", "Seed", "int", 0),
    Field("frames", "Frames", "int", 32 if torch.cuda.is_available() else 4,
          info="world model: frames predicted after the context; checkpoints: output frames (4k+1)"),
    Field("actions", "Actions", "text", "scripted",
          info="world model: 'scripted', 'random', or names/ids like 'right,right,up' (repeated to length)"),
    Field("level", "Level", "int", 0, info="world model: the game's palette, 0..3"),
    Field("prompt", "Prompt", "text", "A red panda walks through a bamboo forest, cinematic"),
    Field("height", "Height", "int", 480),
    Field("width", "Width", "int", 832),
    Field("steps", "Denoising steps", "int", 20, info="text-to-video (rollouts use the model's few-step schedule)"),
    Field("guidance", "Guidance scale", "float", 5.0, info="text-to-video"),
    Field("warmup", "Warm up first (compiles kernels; fairer timings)", "bool", torch.cuda.is_available()),
    Field("play_frames", "Play: frames per session", "int", 192),
)  # fmt: skip
"""The fields outside the method panels (their keys are those of :func:`default_values`)."""
GENERATION_FIELDS = ("seed", "frames", "actions", "level", "prompt", "height", "width", "steps", "guidance")
WORLD_ONLY = ("actions", "level")
CHECKPOINT_ONLY = ("checkpoint", "prompt", "height", "width")
T2V_ONLY = ("steps", "guidance")


def method_fields(spec: MethodSpec) -> list[Field]:
    """The page fields of one method: ``<name>.enabled`` and its parameters, defaults from the config
    dataclass (or :attr:`MethodSpec.app_defaults`). Empty when the method is not available."""
    if spec.config is None:
        return []
    hints = typing.get_type_hints(spec.config)
    defaults = {f.name: f.default for f in dataclasses.fields(spec.config)}
    names = spec.fields if spec.fields is not None else list(defaults)
    result = [Field(f"{spec.name}.enabled", spec.name, "bool", False, info=spec.note)]
    for name in names:
        kind = _kind_of(hints[name], name in spec.choices)
        if kind is None:
            continue
        default = spec.app_defaults.get(name, defaults[name])
        if kind == "pair" and default is not None:
            default = ", ".join(str(v) for v in default)
        optional = type(None) in typing.get_args(hints[name]) and kind in ("int", "float")
        choices = tuple(spec.choices.get(name, ()))
        result.append(Field(f"{spec.name}.{name}", name, kind, default, choices, optional=optional))
    return result


def all_fields() -> list[Field]:
    """Every field of the page, in the order the page sends them."""
    return [*GENERAL_FIELDS, *(f for spec in METHODS for f in method_fields(spec))]


def default_values(**overrides) -> dict:
    """``{field key: default}`` for every field, updated by ``overrides`` (keys with dots, such as
    ``"TempCache.enabled"``, are passed as a dict: ``default_values(**{"TempCache.enabled": True})``)."""
    values = {f.key: f.default for f in all_fields()}
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"unknown field(s) {sorted(unknown)}; known: {sorted(values)}")
    return {**values, **overrides}


def source_key(label_or_key: str) -> str:
    """The model source key of a ``model`` field value (its label, or the key itself)."""
    for key, label in SOURCES.items():
        if label_or_key in (key, label):
            return key
    raise ValueError(f"Model must be one of: {'; '.join(SOURCES.values())} (got {label_or_key!r})")


def method_configs(values: Mapping, kind: str) -> list[MethodConfig]:
    """The configs of the enabled methods that apply to ``kind``, from the field values. Raises
    ``ValueError`` naming the method and field for a bad value."""
    configs = []
    for spec in METHODS:
        if spec.config is None or not values.get(f"{spec.name}.enabled") or kind not in spec.kinds:
            continue
        kwargs = {}
        for f in method_fields(spec)[1:]:
            name = f.key.split(".", 1)[1]
            kwargs[name] = _parse(f, values.get(f.key, f.default), spec.name)
        try:
            configs.append(spec.config(**kwargs))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{spec.name}: {error}") from None
    return configs


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A loaded pipeline: ``kind`` (a :data:`SOURCES` key), ``pipe``, and a one-line ``summary``."""

    kind: str
    pipe: object
    summary: str
    key: tuple = ()


OPTIONS: dict[str, object] = {"world_model": None}
"""App-wide settings: ``world_model``, the folder of the "shipped weights" world model (``None``:
``assets/world_model``; ``--world-model`` sets it, e.g. to a model of ``demos/train_world_model.py``)."""
_GPU_LOCK = threading.RLock()  # one generation at a time, whatever the queue does
_STOP = threading.Event()  # set by the Stop button, checked before every transformer call
_LOADED: dict[str, LoadedModel] = {}  # the model of the Compare tab (one at a time)


class Cancelled(Exception):
    """The run was stopped from the page."""


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
    loaded = _LOADED.get("compare")
    if loaded is not None and loaded.key == key:
        return loaded
    _LOADED.pop("compare", None)
    release_memory()
    loaded = _load(kind, checkpoint)
    loaded.key = key
    _LOADED["compare"] = loaded
    return loaded


def _load(kind: str, checkpoint: str) -> LoadedModel:
    device, dtype = device_and_dtype()
    if kind in WORLD_KINDS:
        pipe = _world_model_class().from_pretrained_world_model(
            OPTIONS["world_model"], device=device, dtype=dtype, random_weights=kind == WORLD_RANDOM
        )
        meta = pipe.metadata
        params = sum(p.numel() for p in pipe.transformer.parameters())
        folder = OPTIONS["world_model"]
        weights = (
            "random weights" if kind == WORLD_RANDOM else f"from {folder}" if folder else "shipped weights"
        )
        summary = (
            f"world model ({weights}): "
            f"{params / 1e6:.1f}M parameters, chunks of {meta['chunk_frames']} frames, "
            f"{meta['context_frames']} context frames, actions {', '.join(meta['actions'])}"
        )
    else:
        path, missing = _check_checkpoint(checkpoint)
        from diffusers import WanPipeline

        from vidaccel.pipelines import CausalWanPipeline

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
        summary = f"{cls.__name__} from {path}: {params / 1e6:.1f}M-parameter transformer{encoder}"
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(kind, pipe, f"{summary}; {device.type} {str(dtype).removeprefix('torch.')}")


def _world_model_class():
    try:
        from vidaccel.pipelines.world_model import WorldModelPipeline
    except ImportError as error:
        raise ValueError(f"The world model pipeline is not available in this build ({error})") from None
    return WorldModelPipeline


def _check_checkpoint(checkpoint: str) -> tuple[Path, list[str]]:
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
    # diffusers wants absent components passed explicitly (e.g. a checkpoint saved without its encoder).
    return path, [name for name in OPTIONAL_COMPONENTS if spec.get(name, [None])[-1] is None]


def load_model_message(model: str, checkpoint: str = "") -> str:
    """Callback of the Load button: load the model and say what it is, or what is wrong."""
    try:
        with _GPU_LOCK:
            return f"Loaded {load_model(model, checkpoint).summary}."
    except ValueError as error:
        return _error_text(error)
    except Exception as error:
        LOG.exception("loading failed")
        return _error_text(error, unexpected=True)


def release_memory() -> None:
    """On CUDA: collect unreferenced tensors (cycles included) and return the cached blocks to the
    driver. (On the CPU, reference counting already frees a run's tensors.)"""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Compare: dense vs accelerated
# ---------------------------------------------------------------------------------------------------

TABLE_HEADERS = [
    "run", "total s", "speedup", "peak memory MiB", "PSNR vs dense dB", "SSIM vs dense",
    "PSNR vs truth dB", "SSIM vs truth",
]  # fmt: skip


@dataclass
class RunResult:
    """The Compare outputs of one run (``None`` / empty where the run made none)."""

    dense_video: str | None = None
    accel_video: str | None = None
    truth_video: str | None = None
    plot: str | None = None
    table: list[list] | None = None
    message: str = ""

    def as_tuple(self) -> tuple:
        table = self.table if self.table is not None else []
        return self.dense_video, self.accel_video, self.truth_video, self.plot, table, self.message


def run_comparison(values: Mapping, progress: Callable | None = None) -> RunResult:
    """Callback of the Run button: dense and accelerated on the same seed.

    ``values``: field values (:func:`default_values`). ``progress``: called as
    ``progress(fraction, desc=...)`` (Gradio's progress bar). Returns a :class:`RunResult`: both
    videos (and the truth for the world model), the per-chunk plot, the table (:data:`TABLE_HEADERS`)
    and a message; for a bad value, a missing model or a stop, only a message that says so.
    """
    if progress is None:  # (not `or`: a Gradio Progress object is falsy)
        progress = lambda *args, **kwargs: None  # noqa: E731
    with _GPU_LOCK:
        _STOP.clear()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return _compare(values, progress, caught)
        except Cancelled:
            return RunResult(message="Stopped. Nothing was kept; the memory was released.")
        except ValueError as error:
            return RunResult(message=_error_text(error))
        except torch.cuda.OutOfMemoryError as error:
            return RunResult(
                message=_error_text(f"out of GPU memory; try fewer frames or a smaller size ({error})")
            )
        except Exception as error:
            LOG.exception("run failed")
            return RunResult(message=_error_text(error, unexpected=True))
        finally:
            loaded = _LOADED.get("compare")
            if loaded is not None:
                vidaccel.remove(loaded.pipe)
            release_memory()


def _compare(values: Mapping, progress: Callable, caught: list) -> RunResult:
    kind = source_key(values["model"])
    configs = method_configs(values, kind)
    if not configs:
        raise ValueError("Methods: turn on at least one method that applies to this model")
    seed = _int_value(values, "seed", 0, 2**31 - 1)
    progress(0.0, desc="loading the model")
    loaded = load_model(values["model"], values.get("checkpoint", ""))
    runner = _WorldRunner if kind in WORLD_KINDS else _CausalRunner if kind == CAUSAL else _TextToVideoRunner
    runner = runner(loaded.pipe, values, seed)
    out = _run_folder()
    names = " + ".join(type(c).__name__.removesuffix("Config") for c in configs)
    runs = {}
    for index, (name, file, method_list) in enumerate(
        (("dense", "dense", []), (names, "accelerated", configs))
    ):
        low, high = index / 2, (index + 1) / 2
        progress(low, desc=f"{name}: starting")
        runs[name] = runner.run(method_list, bool(values.get("warmup")), lambda done, total, n=name, lo=low, hi=high: progress(
            lo + (hi - lo) * min(done / max(total, 1), 1.0), desc=f"{n}: {runner.unit} {done}/{total}"
        ))  # fmt: skip
        runs[name]["video_path"] = str(
            out / write_video(out / f"{file}.mp4", _view(runs[name]["video"]), FPS)
        )
    dense, accel = runs["dense"], runs[names]
    truth = runner.truth
    truth_path = str(out / write_video(out / "truth.mp4", _view(truth), FPS)) if truth is not None else None
    rows = [_table_row(name, run, dense, truth) for name, run in runs.items()]
    memory_name = "peak GPU memory" if runner.device.type == "cuda" else runner.memory_name
    plot = plot_lines(
        out / "chunks.png",
        [
            (f"latency per {runner.unit} (ms)", {n: [c["latency_s"] * 1e3 for c in r["chunks"]] for n, r in runs.items()}),
            (f"{memory_name} per {runner.unit} (MiB)", {n: [_memory(c) / 2**20 for c in r["chunks"]] for n, r in runs.items()}),
        ],
        x_label=runner.unit,
        colors={names: (44, 160, 44)},
    )  # fmt: skip
    speedup = dense["total_s"] / accel["total_s"]
    lines = [
        f"**Done**: {names} ran at {speedup:.2f}x the speed of dense ({accel['total_s']:.2f} s vs "
        f"{dense['total_s']:.2f} s) on the {loaded.summary}.",
        f"Memory column: {memory_name}. {runner.describe()}",
    ]
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    if notes:
        lines.append("Notes: " + " | ".join(notes))
    return RunResult(
        dense["video_path"], accel["video_path"], truth_path, str(out / plot), rows, "\n\n".join(lines)
    )


def _run_folder(keep: int = KEEP_RUNS) -> Path:
    """A new folder for a run's files under the system's temporary folder; the oldest beyond the
    last ``keep`` runs are deleted (Gradio serves its own copies of the files it was given)."""
    root = Path(tempfile.gettempdir()) / "vidaccel_app"
    root.mkdir(exist_ok=True)
    runs = sorted(root.glob("run_*"), key=lambda folder: folder.stat().st_mtime)
    for folder in runs[: max(0, len(runs) - keep + 1)]:
        shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="run_", dir=root))


def _table_row(name: str, run: dict, dense: dict, truth: np.ndarray | None) -> list:
    video = run["video"]
    peak = max((_memory(c) for c in run["chunks"]), default=0)
    row = [
        name,
        round(run["total_s"], 3),
        round(dense["total_s"] / run["total_s"], 2),
        round(peak / 2**20, 2) if peak else "n/a",
        _round(psnr(video, dense["video"])),
        _round(ssim(video, dense["video"])),
    ]
    if truth is None:
        return [*row, "n/a", "n/a"]
    reference = truth.astype(np.float32) / 255.0
    return [*row, _round(psnr(video, reference)), _round(ssim(video, reference))]


def _memory(chunk: dict) -> int:
    return (
        chunk["peak_gpu_bytes"] if chunk.get("peak_gpu_bytes") is not None else chunk.get("kv_cache_bytes", 0)
    )


def _round(value: float) -> float | str:
    return "inf" if math.isinf(value) else round(value, 4)


class _Runner:
    """Runs one model kind: ``run(configs, warmup, report) -> {"chunks", "total_s", "video"}`` (records
    of :func:`timed_chunks`, seconds, ``[F, H, W, 3]`` floats in [0, 1]) with ``configs`` installed (none:
    dense); ``truth`` (uint8 ``[F, H, W, 3]``) or ``None``; ``unit``: what one record times."""

    unit = "chunk"
    memory_name = "KV cache"
    truth: np.ndarray | None = None

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        self.pipe, self.values, self.seed = pipe, values, seed
        self.device = pipe.device

    def describe(self) -> str:
        return ""


class _WorldRunner(_Runner):
    """The world model through ``world_model_rollout.run_method`` (true context frames from the game)."""

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        super().__init__(pipe, values, seed)
        from world_model_rollout import play, rollout_actions

        self.chunk, context = int(pipe.metadata["chunk_frames"]), int(pipe.metadata["context_frames"])
        self.frames = _int_value(values, "frames", 1, 4096)
        self.level = _int_value(values, "level", 0, 3)
        spec = world_actions(values.get("actions"), self.frames)
        self.context_actions, self.actions = rollout_actions(spec, context, self.frames, seed)
        true = play(seed, self.level, self.context_actions, self.actions)
        self.context_frames, self.truth = true[:context], true[context:]

    def run(self, configs: list[MethodConfig], warmup: bool, report: Callable[[int, int], None]) -> dict:
        from world_model_rollout import run_method

        chunks = (
            len(self.context_frames) + self.frames + self.chunk - 1
        ) // self.chunk  # context chunks first
        with _watch(self.pipe.transformer, report, chunks):
            chunks, video = run_method(
                self.pipe, configs, self.context_frames, self.context_actions, self.actions,
                level=self.level, seed=self.seed, warmup_chunks=int(warmup),
            )  # fmt: skip
        return {"chunks": chunks, "total_s": sum(c["latency_s"] for c in chunks), "video": video}

    def describe(self) -> str:
        return (
            f"World model: {len(self.context_frames)} true context frames, then {self.frames} predicted "
            f"frames in chunks of {self.chunk}; 'truth' is the game itself."
        )


class _CausalRunner(_Runner):
    """A ``CausalWanPipeline`` checkpoint, streamed chunk by chunk (3 latent frames a chunk)."""

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        super().__init__(pipe, values, seed)
        self.height = _int_value(values, "height", 16, 4096)
        self.width = _int_value(values, "width", 16, 4096)
        self.frames = _int_value(values, "frames", 1, 4096)
        self.prompt = _prompt_kwargs(pipe, values, seed, negative=False)

    def run(self, configs: list[MethodConfig], warmup: bool, report: Callable[[int, int], None]) -> dict:
        def stream(frames):
            return self.pipe.stream(
                **self.prompt, height=self.height, width=self.width, num_frames=frames,
                generator=torch.Generator("cpu").manual_seed(self.seed), output_type="np",
            )  # fmt: skip

        latent = (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        vidaccel.remove(self.pipe)
        if configs:
            vidaccel.apply(self.pipe, *configs)
        with _watch(self.pipe.transformer, report, math.ceil(latent / 3)):
            if warmup:
                for _ in stream(min(self.frames, 2 * self.pipe.vae_scale_factor_temporal + 1)):
                    pass
            chunks, pieces = timed_chunks(self.pipe, stream(self.frames), self.device)
        video = np.concatenate([np.asarray(p, dtype=np.float32)[0] for p in pieces], axis=0)
        return {"chunks": chunks, "total_s": sum(c["latency_s"] for c in chunks), "video": video}


class _TextToVideoRunner(_Runner):
    """``WanPipeline`` (dense: its stock processors); with FreeSwim on, the accelerated run is a
    ``FreeSwimWanPipeline`` on the same components (native size, upscale, windowed refinement) and the
    dense run generates at the target size directly. A record times one denoising step."""

    unit = "step"
    memory_name = "memory (measured on CUDA only)"

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        super().__init__(pipe, values, seed)
        self.height = _int_value(values, "height", 16, 4096)
        self.width = _int_value(values, "width", 16, 4096)
        self.frames = _int_value(values, "frames", 1, 1024)
        self.steps = _int_value(values, "steps", 1, 1000)
        self.guidance = _float_value(values, "guidance", 0.0, 100.0)
        self.prompt = _prompt_kwargs(pipe, values, seed, negative=True)
        self.freeswim = False

    def run(self, configs: list[MethodConfig], warmup: bool, report: Callable[[int, int], None]) -> dict:
        from vidaccel.pipelines import FreeSwimWanPipeline

        vidaccel.remove(self.pipe)
        self.freeswim = any(isinstance(c, vidaccel.FreeSwimConfig) for c in configs)
        target = FreeSwimWanPipeline(**self.pipe.components) if self.freeswim else self.pipe
        target.set_progress_bar_config(disable=True)
        if self.freeswim:
            target.set_attn_processor(vidaccel.AccelProcessor(*configs))
        elif configs:
            vidaccel.apply(self.pipe, *configs)

        def call(steps: int):
            options = dict(
                **self.prompt, height=self.height, width=self.width, num_frames=self.frames,
                num_inference_steps=steps, guidance_scale=self.guidance,
                generator=torch.Generator("cpu").manual_seed(self.seed), output_type="np",
            )  # fmt: skip
            if self.freeswim:
                options.update(native_inference_steps=steps)
            return target(**options).frames

        with _watch(self.pipe.transformer):
            if warmup:
                call(1)
            with _StepTimer(self.pipe.transformer, self.device, report, self.steps) as timer:
                start = time.perf_counter()
                frames = call(self.steps)
                total_s = time.perf_counter() - start
        return {"chunks": timer.records, "total_s": total_s, "video": np.asarray(frames, dtype=np.float32)[0]}

    def describe(self) -> str:
        if self.freeswim:
            return "FreeSwim: native-size generation, upscale, windowed refinement; dense generates at the target size."
        return ""


class _StepTimer:
    """Forward hook timing a pipeline's denoising steps (consecutive transformer calls at one timestep
    are one step): records like :func:`timed_chunks`'s, and ``report(done, total)`` per step."""

    def __init__(self, transformer, device, report, total) -> None:
        self.transformer, self.device, self.report, self.total = transformer, device, report, total
        self.records: list[dict] = []
        self._timestep = None

    def __enter__(self):
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._mark = time.perf_counter()
        self._handle = self.transformer.register_forward_hook(self._after, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _after(self, module, args, kwargs, output):
        _sync(self.device)
        now = time.perf_counter()
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        key = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])
        cuda = self.device.type == "cuda"
        if not self.records or key != self._timestep:
            self.records.append(
                {
                    "chunk": len(self.records),
                    "latency_s": 0.0,
                    "kv_cache_bytes": 0,
                    "peak_gpu_bytes": 0 if cuda else None,
                }
            )
            self.report(len(self.records), self.total)
        record = self.records[-1]
        record["latency_s"] += now - self._mark
        if cuda:
            record["peak_gpu_bytes"] = max(
                record["peak_gpu_bytes"], torch.cuda.max_memory_allocated(self.device)
            )
            torch.cuda.reset_peak_memory_stats(self.device)
        self._timestep, self._mark = key, now


class _watch:
    """While active, every call of ``transformer`` first checks the Stop button (raises
    :class:`Cancelled`) and, in a rollout, reports ``report(chunk, total)`` when a new chunk starts."""

    def __init__(self, transformer, report: Callable[[int, int], None] | None = None, total: int = 0) -> None:
        self.transformer, self.report, self.total = transformer, report, total
        self._chunk = None

    def __enter__(self):
        self._handle = self.transformer.register_forward_pre_hook(self._before)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _before(self, *_) -> None:
        if _STOP.is_set():
            raise Cancelled()
        context = context_of(self.transformer)
        chunk = None if context is None else context.chunk_index
        if self.report is not None and chunk is not None and chunk != self._chunk:
            self._chunk = chunk
            self.report(chunk + 1, self.total)


def stop_run() -> str:
    """Callback of the Stop button: the running generation stops before its next transformer call."""
    _STOP.set()
    return "Stopped. The run ends at its next transformer call and releases its memory."


def world_actions(spec, frames: int) -> str | list[int]:
    """The Actions field as ``world_model_rollout.rollout_actions`` takes it: ``"scripted"``,
    ``"random"``, or the ids of a comma-separated list of names/ids repeated to ``frames`` (never a
    path: the page does not read the server's files). Raises ``ValueError`` naming a bad action."""
    from vidaccel.pipelines.game import parse_actions

    text = str(spec or "").strip()
    if text.lower() in ("", "scripted", "random"):
        return text.lower() or "scripted"
    try:
        ids = parse_actions([item for item in text.split(",") if item.strip()])
    except ValueError as error:
        raise ValueError(f"Actions: {error}") from None
    if not ids:
        raise ValueError("Actions: give 'scripted', 'random' or a comma-separated list of actions")
    return [ids[i % len(ids)] for i in range(frames)]


def _prompt_kwargs(pipe, values: Mapping, seed: int, *, negative: bool) -> dict:
    """``prompt`` (and an empty negative prompt) with a text encoder; else seeded random embeddings."""
    if pipe.text_encoder is not None and pipe.tokenizer is not None:
        prompt = str(values.get("prompt") or "").strip()
        if not prompt:
            raise ValueError("Prompt: enter a prompt")
        return {"prompt": prompt, **({"negative_prompt": ""} if negative else {})}
    config = pipe.transformer.config
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    embeds = [torch.randn(1, 16, config.text_dim, generator=generator) for _ in range(2 if negative else 1)]
    embeds = [e.to(device=pipe.device, dtype=pipe.transformer.dtype) for e in embeds]
    return {"prompt_embeds": embeds[0], **({"negative_prompt_embeds": embeds[1]} if negative else {})}


def _view(frames: np.ndarray) -> Iterator[np.ndarray]:
    """Frames ``[F, H, W, 3]`` (float in [0, 1] or uint8) as uint8, upscaled to :data:`VIEW_SIZE`."""
    for frame in frames:
        yield _upscale(frame)


def _upscale(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    scale = max(1, math.ceil(VIEW_SIZE / min(frame.shape[:2])))
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# Play: actions drive the accelerated world model chunk by chunk
# ---------------------------------------------------------------------------------------------------


@dataclass
class PlaySession:
    """An open rollout of the Play tab: the accelerated world model's ``stream``, asking
    ``policy`` for each frame's action, and the true game stepped with the same actions."""

    pipe: object
    env: object
    stream: Iterator
    action: int = 0
    asked: list[int] = field(default_factory=list)
    frames: int = 0
    max_frames: int = 0
    methods: str = ""

    def policy(self, frame_index: int, frames) -> int:
        self.asked.append(self.action)
        return self.action

    def close(self) -> None:
        self.stream.close()
        vidaccel.remove(self.pipe)


_PLAY: dict[str, PlaySession] = {}


def play_start(values: Mapping) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Callback of Play's Start: open a session on the world model of the Model field (its own
    instance, with the enabled methods) -> ``(model frame, true frame, message)``: the last context
    frame twice, or ``(None, None, message)`` for a bad value."""
    with _GPU_LOCK:
        play_stop()
        try:
            kind = source_key(values["model"])
            if kind not in WORLD_KINDS:
                raise ValueError("Play needs a world model: pick one in Model")
            configs = method_configs(values, kind)
            seed = _int_value(values, "seed", 0, 2**31 - 1)
            level = _int_value(values, "level", 0, 3)
            max_frames = _int_value(values, "play_frames", 1, 4096)
            pipe = _load(kind, "").pipe
            from vidaccel.pipelines.game import GameEnv

            meta = pipe.metadata
            env = GameEnv(seed, level=level)
            context = [env.reset(), *env.rollout([0] * (meta["context_frames"] - 1))]
            if configs:
                vidaccel.apply(pipe, *configs)
            session = PlaySession(pipe, env, iter(()), max_frames=max_frames)
            session.methods = " + ".join(type(c).__name__.removesuffix("Config") for c in configs) or "dense"
            session.stream = pipe.stream(
                np.stack(context), session.policy, max_frames, context_actions=[0] * len(context), level=level,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
            )  # fmt: skip
            _PLAY["session"] = session
        except ValueError as error:
            return None, None, _error_text(error)
        except Exception as error:
            LOG.exception("play start failed")
            return None, None, _error_text(error, unexpected=True)
        frame = _upscale(context[-1])
        keys = ", ".join(f"{k if k != ' ' else 'Space'}={a}" for k, a in PLAY_KEYS.items())
        return (
            frame,
            frame,
            f"Playing with {session.methods}: press an action ({keys}); each press makes one chunk.",
        )


def play_step(action: str) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, str]]:
    """Callback of an action button or key: generate the next chunk with ``action``, then stream its
    frames -> ``(model frame, true frame, message)`` per frame."""
    with _GPU_LOCK:  # released before the frames are yielded: a paused generator holds no lock
        chunk, truth, message = _play_chunk(action)
    if chunk is None:
        yield None, None, message
        return
    for frame, true in zip(chunk, truth, strict=True):
        yield _upscale(frame), _upscale(true), message
        time.sleep(1 / (2 * FPS))


def _play_chunk(action: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    from vidaccel.pipelines.game import parse_actions

    session = _PLAY.get("session")
    if session is None:
        return None, None, "Press Start first."
    try:
        (session.action,) = parse_actions([action])
    except ValueError as error:
        return None, None, _error_text(error)
    try:
        start = time.perf_counter()
        out = next(session.stream, None)
        latency = time.perf_counter() - start
    except Exception as error:
        LOG.exception("play step failed")
        play_stop()
        return None, None, _error_text(error, unexpected=True) + " The session was closed; press Start."
    if out is None:
        play_stop()
        return None, None, f"The session reached its {session.max_frames} frames; press Start for a new one."
    chunk = np.asarray(out.frames)[0]
    truth = session.env.rollout(session.asked[: len(chunk)])
    del session.asked[: len(chunk)]
    session.frames += len(chunk)
    cache = session.pipe.kv_cache_stats().get("nbytes", 0) / 2**20
    message = (
        f"{session.methods}: frames {session.frames}/{session.max_frames}, last chunk {latency * 1e3:.0f} ms "
        f"({len(chunk)} frames), KV cache {cache:.1f} MiB"
    )
    return chunk, truth, message


def play_stop() -> str:
    """Callback of Play's Reset: close the session and release its memory."""
    with _GPU_LOCK:
        session = _PLAY.pop("session", None)
        if session is not None:
            session.close()
        release_memory()
    return "Session closed." if session is not None else "No session."


# ---------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------


def _kind_of(hint, has_choices: bool) -> str | None:
    """The field kind of a config annotation (``X | None`` as ``X``); ``None``: not offered."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = set(typing.get_args(hint)) - {type(None)} if union else {hint}
    if args == {bool}:
        return "bool"
    if args == {str}:
        return "choice" if has_choices else "text"
    if args == {int}:
        return "int"
    if args <= {int, float}:
        return "float"
    if any(typing.get_origin(a) is tuple and typing.get_args(a) == (int, int) for a in args):
        return "pair"
    return None


def _parse(f: Field, value, method: str):
    """A method field's page value -> the config's value (``ValueError`` naming method and field)."""
    label = f"{method} {f.label}"
    if f.kind in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label}: expected a number, got {value!r}") from None
        if f.kind == "int" and number.is_integer():
            return int(number)
        return number
    if f.kind == "pair":
        if value is None or not str(value).strip():
            return None
        parts = [p.strip() for p in str(value).strip("()[] ").split(",")]
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"{label}: expected two integers like '480, 832', got {value!r}")
        return tuple(int(p) for p in parts)
    if f.kind == "bool":
        return bool(value)
    return value


def _int_value(values: Mapping, key: str, low: int, high: int) -> int:
    label = _label(key)
    value = values.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected an integer in [{low}, {high}], got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise ValueError(f"{label}: expected an integer in [{low}, {high}], got {value!r}")
    return int(number)


def _float_value(values: Mapping, key: str, low: float, high: float) -> float:
    value = values.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not low <= number <= high:
        raise ValueError(f"{_label(key)}: expected a number in [{low}, {high}], got {value!r}")
    return number


def _label(key: str) -> str:
    return next((f.label for f in GENERAL_FIELDS if f.key == key), key)


def _error_text(error, *, unexpected: bool = False) -> str:
    text = str(error) if not isinstance(error, BaseException) else (str(error) or type(error).__name__)
    if unexpected:
        return f"**Something went wrong** ({type(error).__name__}): {text}"
    return f"**Cannot run**: {text}"


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------

KEYBOARD_JS = """
() => {
  const keys = %s;
  document.addEventListener("keydown", (event) => {
    const tag = (event.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select" || !(event.key in keys)) return;
    const button = document.getElementById("play-" + keys[event.key]);
    if (button && button.offsetParent !== null) { event.preventDefault(); button.click(); }
  });
}
""" % json.dumps(PLAY_KEYS)  # noqa: UP031 (the JS braces would need escaping in an f-string)


def build_app(**initial):
    """The Gradio ``Blocks`` of the app (launch with :func:`launch`); ``initial``: field values the
    page starts with instead of the defaults (keys as :func:`default_values` takes them)."""
    import gradio as gr

    from vidaccel.pipelines.game import ACTIONS

    fields = all_fields()
    start_values = default_values(**initial)
    components: dict[str, object] = {}

    def widget(f: Field):
        value = start_values[f.key]
        common = dict(label=f.label, info=f.info or None, elem_id=_elem_id(f.key))
        if f.kind == "bool":
            return gr.Checkbox(value=value, **common)
        if f.kind == "choice":
            return gr.Dropdown(choices=list(f.choices), value=value, **common)
        if f.kind in ("int", "float") and not f.optional:
            return gr.Number(value=value, precision=0 if f.kind == "int" else None, **common)
        placeholder = "empty: not set" if f.optional else None
        return gr.Textbox(value="" if value is None else str(value), placeholder=placeholder, **common)

    with gr.Blocks(title="vidaccel demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# vidaccel: see and feel the acceleration\n"
            "Pick a model and turn methods on; **Run** generates with dense attention and with the methods "
            "on the same seed. **Play** drives the accelerated world model with the arrow keys."
        )
        with gr.Row():
            for key in ("model", "checkpoint"):
                components[key] = widget(_field(key))
            load = gr.Button("Load model", elem_id="load-button", scale=0)
        model_message = gr.Markdown(elem_id="model-message")
        with gr.Accordion("Generation", open=True):
            with gr.Row():
                for key in GENERATION_FIELDS:
                    components[key] = widget(_field(key))
        method_boxes = {}
        with gr.Accordion("Methods", open=True), gr.Row():
            for spec in METHODS:
                with gr.Column(min_width=200, elem_id=f"method-{spec.name.lower()}") as box:
                    if spec.config is None:
                        gr.Markdown(f"**{spec.name}**: not available in this vidaccel build.")
                    for f in method_fields(spec):
                        components[f.key] = widget(f)
                method_boxes[spec.name] = box
        with gr.Tab("Compare"):
            with gr.Row():
                components["warmup"] = widget(_field("warmup"))
                run = gr.Button("Run", variant="primary", elem_id="run-button")
                stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
            message = gr.Markdown(elem_id="run-message")
            with gr.Row():
                dense_video = gr.Video(label="dense", elem_id="dense-video", autoplay=True, loop=True)
                accel_video = gr.Video(label="accelerated", elem_id="accel-video", autoplay=True, loop=True)
                truth_video = gr.Video(
                    label="truth (the game)", elem_id="truth-video", autoplay=True, loop=True
                )
            plot = gr.Image(label="per chunk: latency and memory", type="filepath", elem_id="chunk-plot")
            table = gr.Dataframe(
                headers=TABLE_HEADERS, label="metrics", elem_id="metrics-table", interactive=False
            )
        with gr.Tab("Play (world model)"):
            with gr.Row():
                components["play_frames"] = widget(_field("play_frames"))
                start = gr.Button("Start", variant="primary", elem_id="play-start")
                reset = gr.Button("Reset", elem_id="play-reset")
            play_message = gr.Markdown(elem_id="play-message")
            with gr.Row():
                model_frame = gr.Image(
                    label="world model (accelerated)", elem_id="play-model", height=VIEW_SIZE
                )
                true_frame = gr.Image(label="the game", elem_id="play-truth", height=VIEW_SIZE)
            with gr.Row():
                action_buttons = {a: gr.Button(a, elem_id=f"play-{a}") for a in ACTIONS}

        # A set of inputs reaches a callback as one {component: value} dict, which leaves the
        # positional slot after it for Gradio's progress tracker.
        inputs = {components[f.key] for f in fields}

        def field_values(data: dict) -> dict:
            return {f.key: data[components[f.key]] for f in fields}

        def run_event(data, progress=gr.Progress()):  # noqa: B008 (how Gradio injects its bar)
            return run_comparison(field_values(data), progress).as_tuple()

        def visibility(model):
            try:
                kind = source_key(model)
            except ValueError:
                kind = WORLD
            world = kind in WORLD_KINDS
            shown = {k: world for k in WORLD_ONLY} | {k: not world for k in CHECKPOINT_ONLY}
            shown |= {k: kind == T2V for k in T2V_ONLY}
            return [gr.update(visible=shown[k]) for k in shown] + [
                gr.update(visible=kind in spec.kinds) for spec in METHODS
            ] + [gr.update(visible=world)]  # fmt: skip

        toggled = [components[k] for k in (*WORLD_ONLY, *CHECKPOINT_ONLY, *T2V_ONLY)]
        components["model"].change(
            visibility, components["model"], [*toggled, *method_boxes.values(), truth_video]
        )
        demo.load(visibility, components["model"], [*toggled, *method_boxes.values(), truth_video])
        load.click(load_model_message, [components["model"], components["checkpoint"]], model_message,
                   concurrency_id="gpu", concurrency_limit=1)  # fmt: skip
        running = run.click(
            run_event, inputs, [dense_video, accel_video, truth_video, plot, table, message],
            concurrency_id="gpu", concurrency_limit=1,
        )  # fmt: skip
        stop.click(stop_run, None, message, cancels=[running])
        start.click(lambda data: play_start(field_values(data)), inputs,
                    [model_frame, true_frame, play_message], concurrency_id="gpu", concurrency_limit=1)  # fmt: skip
        reset.click(play_stop, None, play_message, concurrency_id="gpu", concurrency_limit=1)
        for action, button in action_buttons.items():
            button.click(functools.partial(play_step, action), None, [model_frame, true_frame, play_message],
                         concurrency_id="gpu", concurrency_limit=1)  # fmt: skip
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(
    demo, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True
):
    """Start the server (``block=False`` returns at once, e.g. for tests); a blocking server closes
    the Play session when it stops."""
    try:
        return demo.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
            js=KEYBOARD_JS, footer_links=[], quiet=not block,
        )  # fmt: skip
    finally:
        if block:
            play_stop()


def _field(key: str) -> Field:
    return next(f for f in GENERAL_FIELDS if f.key == key)


def _elem_id(key: str) -> str:
    return "field-" + key.replace(".", "-").replace("_", "-").lower()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7860, help="server port (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--share", choices=("yes", "no"), default="no", help="a public gradio.live link")
    parser.add_argument(
        "--world-model",
        type=Path,
        default=None,
        help="world model folder (default: the shipped assets/world_model)",
    )
    args = parser.parse_args(argv)
    OPTIONS["world_model"] = args.world_model
    logging.basicConfig(level=logging.INFO)
    launch(build_app(), host=args.host, port=args.port, share=args.share == "yes")


if __name__ == "__main__":
    main()
