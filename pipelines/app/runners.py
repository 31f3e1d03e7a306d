"""The app's Compare tab: the dense and the accelerated pipeline on the same seed.

:func:`run_comparison` (the Run button) checks the field values, loads the model, and has the
runner of its source (:class:`WorldRunner`, :class:`CausalRunner`, :class:`TextToVideoRunner`) run
it twice, timing every chunk or denoising step, then writes both videos, the per-chunk plot and the
metrics table. :func:`stop_run` (the Stop button) cancels a run before its next transformer call.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import vidaccel
from vidaccel.config import MethodConfig
from vidaccel.metrics import psnr, ssim
from vidaccel.pipelines.app.fields import (
    CAUSAL,
    WORLD_KINDS,
    error_text,
    float_value,
    int_value,
    method_configs,
    method_names,
    source_key,
    world_actions,
)
from vidaccel.pipelines.app.models import load_model, release_memory
from vidaccel.pipelines.app.state import GPU_LOCK, LOADED, STOP
from vidaccel.pipelines.evaluation import play, rollout_actions, run_method, timed_chunks
from vidaccel.pipelines.freeswim import FreeSwimWanPipeline
from vidaccel.pipelines.media import plot_lines, write_video
from vidaccel.state import context_of

LOG = logging.getLogger("vidaccel.app")

FPS = 8
KEEP_RUNS = 4  # runs whose files stay on disk
VIEW_SIZE = 256  # videos and play frames are upscaled (nearest) to at least this many pixels
TABLE_HEADERS = [
    "run", "total s", "speedup", "peak memory MiB", "PSNR vs dense dB", "SSIM vs dense",
    "PSNR vs truth dB", "SSIM vs truth",
]  # fmt: skip


class Cancelled(Exception):
    """The run was stopped from the page."""


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

    ``values``: field values (:func:`~vidaccel.pipelines.app.fields.default_values`). ``progress``:
    called as ``progress(fraction, desc=...)`` (Gradio's progress bar). Returns a :class:`RunResult`:
    both videos (and the truth for the world model), the per-chunk plot, the table
    (:data:`TABLE_HEADERS`) and a message; for a bad value, a missing model or a stop, only a message
    that says so.
    """
    if progress is None:  # (not `or`: a Gradio Progress object is falsy)
        progress = lambda *args, **kwargs: None  # noqa: E731
    with GPU_LOCK:
        STOP.clear()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return _compare(values, progress, caught)
        except Cancelled:
            return RunResult(message="Stopped. Nothing was kept; the memory was released.")
        except ValueError as error:
            return RunResult(message=error_text(error))
        except torch.cuda.OutOfMemoryError as error:
            return RunResult(
                message=error_text(f"out of GPU memory; try fewer frames or a smaller size ({error})")
            )
        except Exception as error:
            LOG.exception("run failed")
            return RunResult(message=error_text(error, unexpected=True))
        finally:
            loaded = LOADED.get("compare")
            if loaded is not None:
                vidaccel.remove(loaded.pipe)
            release_memory()


def stop_run() -> str:
    """Callback of the Stop button: the running generation stops before its next transformer call."""
    STOP.set()
    return "Stopped. The run ends at its next transformer call and releases its memory."


def _compare(values: Mapping, progress: Callable, caught: list) -> RunResult:
    kind = source_key(values["model"])
    configs = method_configs(values, kind)
    if not configs:
        raise ValueError("Methods: turn on at least one method that applies to this model")
    seed = int_value(values, "seed", 0, 2**31 - 1)
    progress(0.0, desc="loading the model")
    loaded = load_model(values["model"], values.get("checkpoint", ""))
    runner = WorldRunner if kind in WORLD_KINDS else CausalRunner if kind == CAUSAL else TextToVideoRunner
    runner = runner(loaded.pipe, values, seed)
    out = _run_folder()
    names = method_names(configs)
    runs = {}
    for index, (name, file, method_list) in enumerate(
        (("dense", "dense", []), (names, "accelerated", configs))
    ):
        low, high = index / 2, (index + 1) / 2
        progress(low, desc=f"{name}: starting")
        runs[name] = runner.run(method_list, bool(values.get("warmup")), lambda done, total, n=name, lo=low, hi=high: progress(
            lo + (hi - lo) * min(done / max(total, 1), 1.0), desc=f"{n}: {runner.unit} {done}/{total}"
        ))  # fmt: skip
        runs[name]["video_path"] = str(out / write_video(out / f"{file}.mp4", view(runs[name]["video"]), FPS))
    dense, accel = runs["dense"], runs[names]
    truth = runner.truth
    truth_path = str(out / write_video(out / "truth.mp4", view(truth), FPS)) if truth is not None else None
    rows = [_table_row(name, run, dense, truth) for name, run in runs.items()]
    memory_name = "peak GPU memory" if runner.device.type == "cuda" else runner.memory_name
    plot = _plot(out, runs, runner.unit, memory_name, names)
    speedup = dense["total_s"] / accel["total_s"]
    lines = [
        f"**Done**: {names} ran at {speedup:.2f}x the speed of dense ({accel['total_s']:.2f} s vs "
        f"{dense['total_s']:.2f} s) on the {loaded.summary}.",
        f"Memory column: {memory_name}. {runner.describe()}",
    ]
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    if notes:
        lines.append("Notes: " + " | ".join(notes))
    return RunResult(dense["video_path"], accel["video_path"], truth_path, plot, rows, "\n\n".join(lines))


def _plot(out: Path, runs: dict, unit: str, memory_name: str, accelerated: str) -> str:
    """The per-chunk latency and memory plot of ``runs`` as ``out/chunks.png`` -> its path."""
    plot = plot_lines(
        out / "chunks.png",
        [
            (f"latency per {unit} (ms)", {n: [c["latency_s"] * 1e3 for c in r["chunks"]] for n, r in runs.items()}),
            (f"{memory_name} per {unit} (MiB)", {n: [_memory(c) / 2**20 for c in r["chunks"]] for n, r in runs.items()}),
        ],
        x_label=unit,
        colors={accelerated: (44, 160, 44)},
    )  # fmt: skip
    return str(out / plot)


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


class Runner:
    """Runs one model kind: ``run(configs, warmup, report) -> {"chunks", "total_s", "video"}`` (records
    of :func:`~vidaccel.pipelines.evaluation.timed_chunks`, seconds, ``[F, H, W, 3]`` floats in
    [0, 1]) with ``configs`` installed (none: dense); ``truth`` (uint8 ``[F, H, W, 3]``) or ``None``;
    ``unit``: what one record times."""

    unit = "chunk"
    memory_name = "KV cache"
    truth: np.ndarray | None = None

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        self.pipe, self.values, self.seed = pipe, values, seed
        self.device = pipe.device

    def describe(self) -> str:
        return ""


class WorldRunner(Runner):
    """The world model through :func:`~vidaccel.pipelines.evaluation.run_method` (true context frames
    from the game)."""

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        super().__init__(pipe, values, seed)
        self.chunk, context = int(pipe.metadata["chunk_frames"]), int(pipe.metadata["context_frames"])
        self.frames = int_value(values, "frames", 1, 4096)
        self.level = int_value(values, "level", 0, 3)
        spec = world_actions(values.get("actions"), self.frames)
        self.context_actions, self.actions = rollout_actions(spec, context, self.frames, seed)
        true = play(seed, self.level, self.context_actions, self.actions)
        self.context_frames, self.truth = true[:context], true[context:]

    def run(self, configs: list[MethodConfig], warmup: bool, report: Callable[[int, int], None]) -> dict:
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


class CausalRunner(Runner):
    """A ``CausalWanPipeline`` checkpoint, streamed chunk by chunk (3 latent frames a chunk)."""

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        super().__init__(pipe, values, seed)
        self.height = int_value(values, "height", 16, 4096)
        self.width = int_value(values, "width", 16, 4096)
        self.frames = int_value(values, "frames", 1, 4096)
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


class TextToVideoRunner(Runner):
    """``WanPipeline`` (dense: its stock processors); with FreeSwim on, the accelerated run is a
    ``FreeSwimWanPipeline`` on the same components (native size, upscale, windowed refinement) and the
    dense run generates at the target size directly. A record times one denoising step."""

    unit = "step"
    memory_name = "memory (measured on CUDA only)"

    def __init__(self, pipe, values: Mapping, seed: int) -> None:
        super().__init__(pipe, values, seed)
        self.height = int_value(values, "height", 16, 4096)
        self.width = int_value(values, "width", 16, 4096)
        self.frames = int_value(values, "frames", 1, 1024)
        self.steps = int_value(values, "steps", 1, 1000)
        self.guidance = float_value(values, "guidance", 0.0, 100.0)
        self.prompt = _prompt_kwargs(pipe, values, seed, negative=True)
        self.freeswim = False

    def run(self, configs: list[MethodConfig], warmup: bool, report: Callable[[int, int], None]) -> dict:
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
    are one step): records like :func:`~vidaccel.pipelines.evaluation.timed_chunks`'s, and
    ``report(done, total)`` per step."""

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
        if STOP.is_set():
            raise Cancelled()
        context = context_of(self.transformer)
        chunk = None if context is None else context.chunk_index
        if self.report is not None and chunk is not None and chunk != self._chunk:
            self._chunk = chunk
            self.report(chunk + 1, self.total)


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


def view(frames: np.ndarray) -> Iterator[np.ndarray]:
    """Frames ``[F, H, W, 3]`` (float in [0, 1] or uint8) as uint8, upscaled to :data:`VIEW_SIZE`."""
    for frame in frames:
        yield upscale(frame)


def upscale(frame: np.ndarray) -> np.ndarray:
    """One frame ``[H, W, 3]`` (float in [0, 1] or uint8) as uint8, upscaled (nearest) by the smallest
    integer factor that makes its short side at least :data:`VIEW_SIZE`."""
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    scale = max(1, math.ceil(VIEW_SIZE / min(frame.shape[:2])))
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
