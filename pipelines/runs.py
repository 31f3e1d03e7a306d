"""Running world-model rollouts: the game's true frames, the methods' configs, and timed rollouts.

:func:`run_method` rolls a :class:`~vidaccel.pipelines.world_model.WorldModelPipeline` out with a list
of vidaccel configs installed and times every chunk (:func:`timed_chunks`, which serves any
``CausalWanPipeline.stream``); :func:`play` gives the game's true frames for the same actions.
:mod:`vidaccel.pipelines.evaluation` measures the results.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

import vidaccel
from vidaccel.pipelines.causal_wan import CausalWanPipeline
from vidaccel.pipelines.game import ACTIONS, GameEnv, parse_actions, random_actions, scripted_actions
from vidaccel.pipelines.world_model import WorldModelPipeline

COMBINABLE = ("rolling", "tempcache", "annsa", "annca", "flashblock")
"""The world-model methods that ``+`` joins into one rollout (:func:`method_configs`)."""
METHODS = ("dense", *COMBINABLE)


def rollout_actions(spec, context: int, frames: int, seed: int) -> tuple[list[int], list[int]]:
    """``(context actions, predicted frames' actions)`` for ``--actions``.

    ``"random"`` / ``"scripted"`` draw one sequence for the whole clip (:func:`random_actions` with
    ``seed``, :func:`scripted_actions`); anything else (a file path, a comma-separated string, a list
    of names/ids) is read by :func:`parse_actions` and holds the ``frames`` predicted frames' actions,
    and the context is played with the random walk. The reset frame's action is ``noop`` (the game's convention).
    Raises ``ValueError`` for an unknown action or a wrong number of them."""
    if spec in ("random", "scripted"):
        whole = (
            random_actions(context + frames, seed=seed)
            if spec == "random"
            else scripted_actions(context + frames)
        )
        context_actions, actions = whole[:context], whole[context:]
    else:
        actions = parse_actions(spec, num_frames=frames)
        context_actions = random_actions(context, seed=seed)
    return [ACTIONS.index("noop"), *context_actions[1:]], actions


def world_batch(seeds: list[int], context: int, frames: int, action_seed: int):
    """Game worlds ``seeds`` played with one random action walk (seeded by ``action_seed``):
    ``(context_actions, actions, truth uint8 [W, context + frames, 64, 64, 3], predicted truth float32
    [W, frames, 64, 64, 3] in [0, 1])``; the benchmarks roll the worlds out as one batch."""
    context_actions, actions = rollout_actions("random", context, frames, action_seed)
    truth = np.stack([play(seed, 0, context_actions, actions) for seed in seeds])
    return context_actions, actions, truth, truth[:, context:].astype(np.float32) / 255.0


def play(seed: int, level: int, context_actions: list[int], actions: list[int]) -> np.ndarray:
    """The game's true frames, uint8 ``[T0 + F, 64, 64, 3]``: the reset frame, then one per action
    after the first context action (the reset frame's)."""
    env = GameEnv(seed=seed, level=level)
    return np.concatenate([env.reset()[None], env.rollout(context_actions[1:] + actions)])


def run_method(
    pipe: WorldModelPipeline,
    configs: list,
    context_frames: np.ndarray,
    context_actions: list[int],
    actions: list[int],
    *,
    level: int = 0,
    seed: int = 0,
    warmup_chunks: int = 0,
    **rollout_kwargs,
) -> tuple[list[dict], np.ndarray]:
    """One timed rollout of ``len(actions)`` frames with ``configs`` installed (none: dense), after an
    untimed warm-up rollout of ``warmup_chunks`` chunks (first-call costs: kernel compilation, the
    allocator); ``-> (per-chunk records of timed_chunks, predicted frames float32 [F, 64, 64, 3] in
    [0, 1])``. Context frames ``[B, T0, 64, 64, 3]`` roll out a batch (shared actions) and return
    ``[B, F, 64, 64, 3]``. The pipeline is left on its ``DenseProcessor``."""
    if configs:
        vidaccel.apply(pipe, *configs)

    def stream(num_frames):
        return pipe.stream(
            context_frames,
            actions[:num_frames],
            num_frames,
            context_actions=context_actions,
            level=level,
            generator=torch.Generator().manual_seed(seed),
            **rollout_kwargs,
        )

    try:
        if warmup_chunks:
            for _ in stream(min(len(actions), warmup_chunks * int(pipe.metadata["chunk_frames"]))):
                pass
        chunks, pieces = timed_chunks(pipe, stream(len(actions)), pipe.device)
    finally:
        vidaccel.remove(pipe)  # back to the pipeline's DenseProcessor
    video = np.concatenate(pieces, axis=1).astype(np.float32)  # [B, F, 64, 64, 3]
    return chunks, video if context_frames.ndim == 5 else video[0]


def method_configs(method: str, args) -> tuple[list, dict]:
    """``(vidaccel configs, extra pipeline arguments)`` of a ``--methods`` item (``"a+b"``: both)."""
    configs, rollout_kwargs = [], {}
    for part in method.split("+"):
        if part == "rolling":
            rollout_kwargs = {"max_cache_frames": args.window_frames, "sink_frames": args.sink_frames}
        elif part == "tempcache":
            overrides = {"threshold": args.threshold, "max_tokens": args.max_tokens}
            configs.append(vidaccel.TempCacheConfig(**{k: v for k, v in overrides.items() if v is not None}))
        elif part == "annsa":
            configs.append(vidaccel.AnnSAConfig(top_p=0.9))
        elif part == "annca":
            configs.append(vidaccel.AnnCAConfig(top_p=0.9))
        elif part == "flashblock":
            configs.append(vidaccel.FlashBlockConfig())
    return configs, rollout_kwargs


def timing(chunks: list[dict]) -> dict:
    """A rollout's summary of :func:`timed_chunks` records: total time, median chunk latency (without
    the first chunk, which holds the context prefill, when there are more), peak GPU memory (``None``
    off CUDA), the last chunk's KV-cache bytes and merge rate, and the records themselves."""
    latencies = [c["latency_s"] for c in chunks]
    peaks = [c["peak_gpu_bytes"] for c in chunks if c["peak_gpu_bytes"] is not None]
    return {
        "total_s": sum(latencies),
        "median_chunk_s": statistics.median(latencies[1:] or latencies),
        "peak_gpu_bytes": max(peaks) if peaks else None,
        "kv_cache_bytes": chunks[-1]["kv_cache_bytes"],
        "merge_rate": chunks[-1]["merge_rate"],
        "chunks": chunks,
    }


def timed_chunks(pipe: CausalWanPipeline, stream, device: torch.device) -> tuple[list[dict], list]:
    """Consume ``stream`` (``pipe.stream(...)``), timing each chunk: ``-> (records, chunk outputs)``.

    A record per chunk: ``chunk`` (index), ``latency_s`` (wall time from the previous chunk's arrival,
    CUDA-synchronised; the first includes the rollout's set-up), ``kv_cache_bytes`` (all layers' caches
    after the chunk), ``kv_cache_tokens`` (their tokens, summed over layers), ``kv_cache_tokens_per_layer``
    and ``merge_rate`` (the first layer's cache; the
    merge rate only for a merging cache, else ``None``) and ``peak_gpu_bytes`` (peak allocated memory
    during the chunk; ``None`` off CUDA)."""
    chunks, pieces = [], []
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for out in stream:
        _sync(device)
        now = time.perf_counter()
        cache = pipe.kv_cache_stats()
        first_layer = cache.get("first_layer", {})
        chunks.append(
            {
                "chunk": len(chunks),
                "latency_s": now - start,
                "kv_cache_bytes": cache.get("nbytes", 0),
                "kv_cache_tokens": cache.get("tokens", 0),
                "kv_cache_tokens_per_layer": first_layer.get("tokens", 0),
                "merge_rate": first_layer.get("merge_rate"),
                "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            }
        )
        pieces.append(out.frames)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
    return chunks, pieces


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
