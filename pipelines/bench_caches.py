"""The rollout benchmark's workloads (``benchmarks/bench_rollout.py``): a synthetic stream of keys and
values of controlled redundancy, one self-attention layer as the rollout stage runs it, replayed
against fixed KV caches (dense, rolling window, TempCache) with and without FlashBlock, the SDPA peer
rows, the world model's fidelity run, and the timers they use.

Import it after choosing ``TRITON_INTERPRET`` (the benchmark sets it to 1 without CUDA).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

import vidaccel
from vidaccel import AccelProcessor, AttentionCall, StepContext, TempCacheConfig, ops
from vidaccel.metrics import psnr, relative_error, ssim
from vidaccel.pipelines.bench import (
    MEDIAN_REPEATS,
    bench_ms,
    median_ms,
    peak_bytes,
    release,
    reset_peak,
    sync,
    wall_ms,
)
from vidaccel.pipelines.causal_wan import CausalWanPipeline
from vidaccel.pipelines.tiny import cast_keeping_fp32_modules  # as from_pretrained casts
from vidaccel.processors.tempcache import MergedKVCache
from vidaccel.rollout import DenseKVCache, RollingKVCache, set_kv_cache, set_rollout

CHUNK_FRAMES = 3  # latent frames per chunk
STEPS = (1000, 750, 500, 250)  # denoising timesteps per chunk (and one commit pass)
FB_METHODS = {  # name: (which cache, which configs)
    "dense": ("dense", ()),
    "flashblock": ("dense", ("flashblock",)),
    "tempcache": ("tempcache", ("tempcache",)),
    "flashblock_tempcache": ("tempcache", ("flashblock", "tempcache")),
}
QUERY_MODELS = ("random", "tracking")
FB_REPEATS = MEDIAN_REPEATS  # timed calls of a FlashBlock layer measurement
WORLD_FRAMES = 48  # predicted frames of the world-model fidelity run


def layer_section(spec, device, dtype, noise) -> list[dict]:
    """Layer level: one self-attention layer call of a chunk against dense, rolling-window and TempCache
    caches filled to each of ``spec["layer_frames"]`` from a :class:`RedundantStream`; per cache its
    attention, extend and commit times, memory, merge rate and error against the dense cache (and
    SDPA on the dense cache as the peer)."""
    heads, dim = spec["model"]["num_attention_heads"], spec["model"]["attention_head_dim"]
    rows_hw = spec["grid_hw"]
    per_frame = rows_hw[0] * rows_hw[1]
    seq = CHUNK_FRAMES * per_frame
    q, own_k, own_v = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(3))
    stream = RedundantStream(rows_hw, heads, dim, noise, device, dtype)
    caches = {
        "dense": DenseKVCache(capacity_tokens=spec["max_frames"] * per_frame),
        "window": RollingKVCache(spec["window"]),
        "tempcache": MergedKVCache(TempCacheConfig()),
        "tempcache_prev_frame": MergedKVCache(TempCacheConfig(scope="previous_frame")),
    }
    for cache in caches.values():
        if isinstance(cache, MergedKVCache):
            cache.observe_grid((CHUNK_FRAMES, *rows_hw))
    commit_ms = {name: [] for name in caches}
    rows, done = [], 0
    for target in spec["layer_frames"]:
        done = fill_caches(caches, stream, done, target, per_frame, device, commit_ms)
        dense_out = None
        for name, cache in caches.items():
            k_all, v_all, bias = cache.extend(own_k, own_v)
            call = lambda k_all=k_all, v_all=v_all, bias=bias: ops.attention(q, k_all, v_all, key_bias=bias)  # noqa: E731
            out, attn_ms = bench_ms(call, device)
            _, extend_ms = bench_ms(lambda c=cache: c.extend(own_k, own_v), device)
            dense_out = out if name == "dense" else dense_out
            stats = cache.stats()
            rows.append(
                dict(
                    section="layer", method=name, provider="vidaccel_triton" if device.type == "cuda" else "reference",
                    cache_frames=target, cache_tokens=k_all.shape[1] - seq, attention_ms=attn_ms, extend_ms=extend_ms,
                    layer_call_ms=attn_ms + extend_ms, commit_ms_per_chunk=statistics.median(commit_ms[name][-5:]) * CHUNK_FRAMES,
                    cache_mib=cache.nbytes / 2**20, merge_rate=stats.get("merge_rate"),
                    rel_err_vs_dense=relative_error(out.float(), dense_out.float()),
                )
            )  # fmt: skip
            if name == "dense":
                rows.append(
                    dict(
                        rows[-1], provider="sdpa_flash", **sdpa_layer_row(q, k_all, v_all, dense_out, device)
                    )
                )
        release(device)
    del caches
    release(device)
    return rows


def pipeline_section(spec, device, dtype, methods=None, num_layers=None) -> list[dict]:
    """Per-chunk latency and peak memory of a random-weight rollout to ``spec["max_frames"]`` (+2 chunks)
    for each of ``methods`` (name -> configs applied with ``vidaccel.apply``; "window" runs the rolling
    window), default dense, window and TempCache; ``num_layers`` overrides the model's."""
    methods = methods or {"dense": (), "window": (), "tempcache": (TempCacheConfig(),)}
    model = dict(spec["model"], num_layers=num_layers or spec["model"]["num_layers"])
    with torch.device(device):
        transformer = cast_keeping_fp32_modules(WanTransformer3DModel(**model), dtype).eval()
    pipe = CausalWanPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, spec["text_len"], spec["model"]["text_dim"], device=device, dtype=dtype)
    rows_hw = spec["grid_hw"]
    patch = spec["model"]["patch_size"]
    frames = spec["max_frames"] + 2 * CHUNK_FRAMES
    rows = []
    for method, configs in methods.items():
        if configs:
            vidaccel.apply(pipe, *configs)
        else:
            vidaccel.remove(pipe)
        stream = pipe.stream(
            prompt_embeds=embeds, height=rows_hw[0] * patch[1], width=rows_hw[1] * patch[2], num_frames=frames,
            chunk_frames=CHUNK_FRAMES, denoising_timesteps=STEPS, output_type="latent",
            max_cache_frames=spec["window"] if method == "window" else None,
            generator=torch.Generator(device).manual_seed(0),
        )  # fmt: skip
        for chunk in range(frames // CHUNK_FRAMES):
            reset_peak(device)
            start = time.perf_counter()
            next(stream)
            sync(device)
            ms = (time.perf_counter() - start) * 1e3
            stats = pipe.kv_cache_stats()
            rows.append(
                dict(
                    section="pipeline", method=method, chunk=chunk, cache_frames=chunk * CHUNK_FRAMES, chunk_ms=ms,
                    peak_mib=peak_bytes(device) / 2**20, cache_mib=stats.get("nbytes", 0) / 2**20,
                    cache_tokens_layer0=stats.get("first_layer", {}).get("tokens"),
                    merge_rate=stats.get("first_layer", {}).get("merge_rate"),
                )
            )  # fmt: skip
        stream.close()
        release(device)
    vidaccel.remove(pipe)
    return rows


class RedundantStream:
    """Synthetic keys/values of controlled redundancy: a camera panning over a fixed cyclic "world"
    (frame ``t`` is the world rolled by ``t`` token columns) plus fresh relative noise ``noise`` per
    frame, renormalised to unit variance. Consecutive frames share all content one column apart
    (cosine ≈ 1 / (1 + noise²), 0.99 at 0.1), except the column that wraps around from the right
    border to the left, which a local search cannot find: about one new column per frame."""

    def __init__(self, grid_hw, heads, dim, noise, device, dtype):
        self.noise, self.dtype, self.frame = noise, dtype, 0
        self.world = torch.randn(2, 1, *grid_hw, heads, dim, device=device)  # keys and values

    def peek(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``frames`` frames, without advancing the stream."""
        start = self.frame
        try:
            return self.next(frames)
        finally:
            self.frame = start

    def next(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for _ in range(frames):
            frame = torch.roll(self.world, shifts=self.frame, dims=3)
            out.append(
                ((frame + self.noise * torch.randn_like(frame)) / (1 + self.noise**2) ** 0.5).flatten(2, 3)
            )
            self.frame += 1
        k, v = torch.cat(out, 2).to(self.dtype)  # [1, frames * H * W, heads, dim] each
        return k, v


def sdpa_layer_row(q, k, v, dense_out, device) -> dict:
    """The dense layer call on SDPA (flash on CUDA), the protocol's peer, with its error vs our kernel."""
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    try:
        with torch.nn.attention.sdpa_kernel(
            torch.nn.attention.SDPBackend.FLASH_ATTENTION
            if device.type == "cuda"
            else torch.nn.attention.SDPBackend.MATH
        ):
            out, ms = bench_ms(
                lambda: torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t), device
            )
    except RuntimeError as exc:  # a peer that cannot run here is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    rel_err = relative_error(out.transpose(1, 2).float(), dense_out.float())
    return {
        "attention_ms": ms,
        "layer_call_ms": ms,
        "extend_ms": None,
        "commit_ms_per_chunk": None,
        "rel_err_vs_dense": rel_err,
    }


@dataclasses.dataclass
class ChunkSteps:
    """The part of ``CausalWanPipeline``'s ``RolloutState`` FlashBlock reads: steps per chunk."""

    steps_per_chunk: int | None


class ChunkRunner:
    """One self-attention layer as the rollout stage runs it (``cache.extend`` + the processor's chain,
    context phase ``"denoise"`` with ``chunk_step`` 0, 1, ... then ``"commit"``), without committing,
    so a chunk can be replayed against a fixed cache."""

    def __init__(self, cache, configs, grid):
        self.cache, self.processor = cache, AccelProcessor(*configs)
        self.attn = torch.nn.Linear(1, 1)  # the key of the per-layer state
        self.context = StepContext()
        self.context.grid, self.context.chunk_index = grid, 1
        set_rollout(self.context, ChunkSteps(None))
        set_kv_cache(self.context, self.attn, cache)  # where TempCache finds its cache

    def call(self, q, k, v) -> torch.Tensor:
        k_all, v_all, bias = self.cache.extend(k, v)
        call = AttentionCall(
            self.attn,
            "self",
            q,
            k_all,
            v_all,
            key_bias=bias,
            context=self.context,
            num_external=self.cache.num_external,
        )
        return self.processor.attend(call)[0]

    def chunk(self, steps) -> list[torch.Tensor]:
        """The denoising steps ``[(q, own k, own v), ...]``: the output of each."""
        self.context.phase, outs = "denoise", []
        set_rollout(self.context, ChunkSteps(len(steps)))  # as CausalWanPipeline tells it
        for step, qkv in enumerate(steps):
            self.context.chunk_step = step
            outs.append(self.call(*qkv))
        return outs

    def commit(self, q, k, v) -> torch.Tensor:
        self.context.phase, self.context.chunk_step = "commit", None
        return self.call(q, k, v)


def drifting_steps(q, k, v, drift) -> list[tuple[torch.Tensor, ...]]:
    """``len(STEPS)`` denoising steps starting at ``(q, k, v)``; each next step mixes in fresh noise."""
    steps = [(q, k, v)]
    for _ in STEPS[1:]:
        steps.append(
            tuple(
                ((1 - drift) ** 0.5 * x.float() + drift**0.5 * torch.randn_like(x, dtype=torch.float32)).to(
                    x.dtype
                )
                for x in steps[-1]
            )
        )
    return steps


def flashblock_layer_section(spec, device, dtype, noise, drift, config) -> tuple[list[dict], list[dict]]:
    """FlashBlock at layer level: for each cache size, one chunk's denoising steps and commit pass
    replayed per :data:`FB_METHODS` (timing rows), and each method's per-step error against the dense
    and the TempCache cache for each of :data:`QUERY_MODELS` (fidelity rows)."""
    heads, dim = spec["model"]["num_attention_heads"], spec["model"]["attention_head_dim"]
    rows_hw = spec["grid_hw"]
    per_frame = rows_hw[0] * rows_hw[1]
    grid = (CHUNK_FRAMES, *rows_hw)
    stream = RedundantStream(rows_hw, heads, dim, noise, device, dtype)
    caches = {
        "dense": DenseKVCache(capacity_tokens=spec["max_frames"] * per_frame),
        "tempcache": MergedKVCache(TempCacheConfig()),
    }
    caches["tempcache"].observe_grid(grid)
    configs = {"flashblock": config, "tempcache": TempCacheConfig()}
    schedule = config.build()  # FlashBlock's refresh rule, for the report
    provider = "vidaccel_triton" if device.type == "cuda" else "reference"
    timing, fidelity, done = [], [], 0
    for target in spec["layer_frames"]:
        done = fill_caches(caches, stream, done, target, per_frame, device)
        runners = {
            name: ChunkRunner(caches[cache], [configs[c] for c in names], grid)
            for name, (cache, names) in FB_METHODS.items()
        }
        content_k, content_v = stream.peek(CHUNK_FRAMES)  # the chunk's clean keys and values
        inputs = {
            "random": (torch.randn_like(content_k), content_k, content_v),
            "tracking": (content_k, content_k, content_v),
        }
        steps = drifting_steps(*inputs["random"], drift)
        for name, runner in runners.items():
            chunk_ms = median_ms(lambda r=runner, s=steps: r.chunk(s), device)
            commit_ms = median_ms(lambda r=runner, x=inputs["random"]: r.commit(*x), device)
            timing.append(
                dict(
                    method=name, provider=provider, cache_frames=target, cache_tokens=runner.cache.num_external,
                    chunk_attention_ms=chunk_ms, commit_attention_ms=commit_ms,
                )
            )  # fmt: skip
        timing.append(sdpa_chunk_row(steps, caches["dense"], target, device))
        for model in QUERY_MODELS:
            steps = drifting_steps(*inputs[model], drift)
            fidelity += _fidelity_rows(model, steps, runners, caches["dense"], schedule, target)
        del runners
        release(device)
    del caches
    release(device)
    return timing, fidelity


def _fidelity_rows(model: str, steps, runners: dict, dense_cache, schedule, target: int) -> list[dict]:
    """Each :data:`FB_METHODS` runner's per-step error on ``steps`` against the dense and the
    TempCache runners, the refresh steps, and how much the cache's output changes step to step."""
    outs = {name: runner.chunk(steps) for name, runner in runners.items()}
    external = [external_output(q, dense_cache) for q, _, _ in steps]
    cosine = [
        float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())
        for a, b in zip(external, external[1:], strict=False)
    ]
    return [
        dict(
            query_model=model, method=name, cache_frames=target,
            refresh=[schedule.refreshes(step, ChunkSteps(len(steps))) for step in range(len(steps))],
            rel_err_vs_dense=[relative_error(o.float(), d.float()) for o, d in zip(outs[name], outs["dense"], strict=True)],
            rel_err_vs_tempcache=[relative_error(o.float(), t.float()) for o, t in zip(outs[name], outs["tempcache"], strict=True)],
            external_output_cosine_between_steps=cosine,
        )
        for name in FB_METHODS
    ]  # fmt: skip


def fill_caches(caches: dict, stream, done: int, target: int, per_frame: int, device, commit_ms=None) -> int:
    """Commit ``stream``'s frames ``done .. target - 1`` to every cache, a chunk at a time; returns
    ``target``. ``commit_ms`` (``{cache name: []}``): time each commit, appending its ms per frame
    (chunks at a target's edge may be short)."""
    while done < target:
        frames = min(CHUNK_FRAMES, target - done)
        k, v = stream.next(frames)
        frame_index = torch.arange(done, done + frames, device=device).repeat_interleave(per_frame)
        for name, cache in caches.items():
            if commit_ms is None:
                cache.commit(k, v, k_pre=k, frame_index=frame_index)
                continue
            commit = lambda c=cache, k=k, v=v, fi=frame_index: c.commit(k, v, k_pre=k, frame_index=fi)  # noqa: E731
            commit_ms[name].append(wall_ms(commit, device) / frames)
        done += frames
    return done


def world_model_fidelity(device, methods, seed, num_frames=WORLD_FRAMES) -> dict:
    """PSNR / SSIM against the game's true frames of the shipped world model (``assets/world_model``),
    rolled out from true context frames with random actions, for each of ``methods``; skipped (with
    the reason) when the model is not there, and any failure is reported instead of raised."""
    try:
        from vidaccel.pipelines.game import GameEnv, random_actions
        from vidaccel.pipelines.world_model import DEFAULT_WORLD_MODEL, WorldModelPipeline

        if not (DEFAULT_WORLD_MODEL / "world_model.json").is_file():
            return {"skipped": f"no world model at {DEFAULT_WORLD_MODEL}"}
        pipe = WorldModelPipeline.from_pretrained_world_model(device=device)
        context_frames = int(pipe.metadata["context_frames"])
        actions = random_actions(context_frames + num_frames, seed=seed)
        actions[0] = 0  # the reset frame's action is noop
        env = GameEnv(seed)
        frames = np.concatenate([env.reset()[None], env.rollout(actions[1:])])
        truth = frames[context_frames:].astype(np.float32) / 255
        videos = {}
        for name, configs in methods.items():
            if configs:
                vidaccel.apply(pipe, *configs)
            else:
                vidaccel.remove(pipe)
            videos[name] = pipe(
                frames[:context_frames], actions[context_frames:], num_frames,
                context_actions=actions[:context_frames], generator=torch.Generator(device).manual_seed(seed),
            ).frames[0]  # fmt: skip
        vidaccel.remove(pipe)
    except Exception as exc:  # W's model is optional here: report, never fail the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "frames": num_frames,
        "context_frames": context_frames,
        "seed": seed,
        **{
            name: dict(
                psnr_vs_truth=psnr(video, truth),
                ssim_vs_truth=ssim(video, truth),
                psnr_vs_dense=psnr(video, videos["dense"]),
            )
            for name, video in videos.items()
        },
    }


def external_output(q, cache) -> torch.Tensor:
    """Attention of ``q`` to the cache alone (the part FlashBlock keeps), ``[B, Sq, H, Dv]``."""
    n = cache.num_external
    k_all, v_all, bias = cache.extend(q, q)  # own keys are ignored below; the views cover the cache
    return ops.attention(q, k_all[:, :n], v_all[:, :n], key_bias=None if bias is None else bias[..., :n])


def sdpa_chunk_row(steps, cache, target, device) -> dict:
    """The dense chunk on SDPA (flash on CUDA), the protocol's peer: one call per step over the full
    cache (the own keys of step 0 stand in for every step's; the time does not depend on values)."""
    k_all, v_all, _ = cache.extend(steps[0][1], steps[0][2])
    k_t, v_t = (t.transpose(1, 2).contiguous() for t in (k_all, v_all))
    queries = [q.transpose(1, 2).contiguous() for q, _, _ in steps]
    backend = (
        torch.nn.attention.SDPBackend.FLASH_ATTENTION
        if device.type == "cuda"
        else torch.nn.attention.SDPBackend.MATH
    )
    row = dict(method="dense", provider="sdpa_flash", cache_frames=target, cache_tokens=cache.num_external)
    try:
        with torch.nn.attention.sdpa_kernel(backend):
            chunk_ms = median_ms(
                lambda: [torch.nn.functional.scaled_dot_product_attention(q, k_t, v_t) for q in queries],
                device,
            )
    except RuntimeError as exc:  # a peer that cannot run here is reported, not fatal
        return row | {"error": f"{type(exc).__name__}: {exc}"}
    return row | dict(chunk_attention_ms=chunk_ms, commit_attention_ms=chunk_ms / len(queries))


# ------------------------------------------------------------------------------------- helpers
