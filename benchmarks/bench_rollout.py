"""Autoregressive rollout with a KV cache: dense full cache vs rolling window vs TempCache (a script, not a test).

Wan2.1-1.3B shapes (30 layers, 12 heads × 128, bf16), 480×832 (token grid 30×52 = 1,560 tokens per
latent frame), chunks of 3 latent frames (4,680 queries), 4 denoising steps + one commit pass per chunk.

1. **Layer level** (the primary TempCache speed evidence): one self-attention layer call of a chunk
   (``cache.extend`` + ``ops.attention`` with the cache's ``key_bias``) against caches of 21 / 60 /
   120 / 240 latent frames, for the dense cache (our kernel, and SDPA flash as the peer), the rolling
   window of 21 frames and TempCache (default config: τ 0.95, 3 sink frames, budget 32,760 tokens,
   local search r = 2, pre-rotary keys, per head), plus each cache's commit cost per chunk and layer
   and its memory. Random weights make no redundant keys, so the caches are filled with a synthetic
   stream of controlled redundancy: a camera panning one token column per frame over a fixed cyclic
   world, plus fresh Gaussian noise per frame (``--noise``, relative 0.1 by default: consecutive
   frames have cosine ≈ 0.99), renormalised. The column that wraps around the border is new to a
   local search (≈ 1 column, 30 tokens, per frame), so TempCache's default (``scope="local"``) grows
   by about that much per frame until its budget; ``tempcache_prev_frame`` (``scope="previous_frame"``)
   finds it too. The merge rate and the attention output's relative error against the dense cache
   are reported beside every time.
2. **Pipeline level**: ``CausalWanPipeline`` with a Wan-1.3B-shaped random transformer, no VAE,
   random prompt embeddings, to 240 latent frames (+2 chunks, so the chunk at frame 240 still
   commits): per-chunk latency (wall time of the chunk, CUDA-synchronised) and per-chunk peak
   memory for the dense cache, the rolling window (``max_cache_frames=21``) and TempCache
   (``vidaccel.apply(pipe, TempCacheConfig())``). Random weights give TempCache nothing to merge
   (merge rate reported), so there it runs at its budget with least-recently-updated eviction.

3. **FlashBlock** (``--sections flashblock``, its own report ``flashblock.json`` / ``.png``): one
   self-attention layer as the rollout stage runs it, replaying one chunk's 4 denoising steps and its
   commit pass against caches of 21 / 60 / 120 / 240 latent frames: attention time summed over the 4
   steps (the commit pass apart) for the dense cache, FlashBlock (``--refresh-every``, ``--refresh-last``; default the config's: steps 0 and 3),
   TempCache on the synthetic cache above, FlashBlock + TempCache, and SDPA flash on the dense cache
   as the peer. Fidelity: the output's relative error against the dense full cache at every step,
   with queries and own keys/values drifting between steps (``--drift``: the share of fresh noise
   per step, default 0.1, i.e. cosine ≈ 0.95 step to step) for random queries (no structure) and
   "tracking" queries (the chunk's own content, which the cache holds shifted). End to end: chunk
   latency of a random-weight rollout with ``--pipeline-layers`` (default 6) of the 30 layers, and,
   when ``assets/world_model`` exists, PSNR/SSIM against the game's true frames.

Targets (shared/BENCHMARKS.md): TempCache latency at frame 240 ≤ 1.15× its latency at frame 21; peak
memory flat (±5%) after warm-up; ≥ 5× faster than dense at 240 frames; merge rate reported. FlashBlock:
≥ 1.6× lower attention time over a chunk's denoising steps at ≥ 60 cached frames.

    python benchmarks/bench_rollout.py                    # GPU, full run (~3-4 min; dense to 240 is the long part)
    python benchmarks/bench_rollout.py --quick            # tiny smoke run (GPU, or CPU in the Triton interpreter)
    python benchmarks/bench_rollout.py --max-frames 120 --sections layer
    python -u benchmarks/bench_rollout.py --sections flashblock   # FlashBlock only (~2 min)

Writes ``benchmarks/results/rollout.json`` and ``rollout.png`` (``--out``; the flashblock section writes
``flashblock.json`` and ``flashblock.png`` beside it, or to ``--out`` when it runs alone) and prints a table last.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Set before anything imports triton, so the kernels can run in the interpreter on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from vidaccel import FlashBlockConfig, TempCacheConfig  # noqa: E402
from vidaccel.pipelines.bench import (  # noqa: E402
    align,
    bench_device,
    bench_parser,
    fmt,
    parse_bench_args,
    results_path,
    write_report,
)
from vidaccel.pipelines.bench_caches import (  # noqa: E402
    CHUNK_FRAMES,
    FB_METHODS,
    FB_REPEATS,
    QUERY_MODELS,
    STEPS,
    WORLD_FRAMES,
    flashblock_layer_section,
    layer_section,
    pipeline_section,
    world_model_fidelity,
)
from vidaccel.pipelines.media import plot_points  # noqa: E402
from vidaccel.pipelines.tiny import WAN21_1_3B_CONFIG as WAN_13B  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rollout.json"
FLASHBLOCK_OUT_NAME = (
    "flashblock"  # the flashblock section's report, beside --out: flashblock[_quick].json/.png
)
TINY = dict(WAN_13B, num_attention_heads=2, attention_head_dim=64, text_dim=32, ffn_dim=64, num_layers=2)
FULL = dict(
    model=WAN_13B, grid_hw=(30, 52), layer_frames=(21, 60, 120, 240), max_frames=240, window=21, text_len=512
)
QUICK_GPU = dict(model=TINY, grid_hw=(6, 8), layer_frames=(6, 12, 24), max_frames=24, window=6, text_len=16)
QUICK_CPU = dict(model=TINY, grid_hw=(4, 6), layer_frames=(6, 12), max_frames=12, window=6, text_len=16)
METHODS = ("dense", "window", "tempcache")


def main(argv=None) -> dict:
    parser = _parser()
    args = parse_bench_args(parser, argv)

    device, dtype = bench_device(parser, args)
    cuda = device.type == "cuda"
    spec = dict(FULL if not args.quick else QUICK_GPU if cuda else QUICK_CPU)
    if args.max_frames is not None:
        spec["max_frames"] = args.max_frames
        spec["layer_frames"] = tuple(f for f in spec["layer_frames"] if f < args.max_frames) + (
            args.max_frames,
        )
    sections = set(args.sections.split(","))
    torch.manual_seed(args.seed)

    report = _common_report(args, spec, device, dtype)
    if sections & {"layer", "pipeline"}:
        rollout_report(report, args, sections, spec, device, dtype)
    if "flashblock" in sections:
        return flashblock_report(report, args, spec, device, dtype)
    return report


def _parser():
    """The benchmark options and this benchmark's own."""
    parser = bench_parser(__doc__, DEFAULT_OUT)
    parser.add_argument(
        "--max-frames", type=int, default=None, help="latent frames of the longest cache (default 240)"
    )
    parser.add_argument(
        "--sections", default="layer,pipeline", help="comma-separated: layer, pipeline, flashblock"
    )
    parser.add_argument(
        "--noise", type=float, default=0.1, help="relative noise between consecutive synthetic frames"
    )
    parser.add_argument(
        "--drift",
        type=float,
        default=0.1,
        help="flashblock: share of fresh noise in queries/own keys per step",
    )
    parser.add_argument(
        "--refresh-every",
        type=int,
        default=None,
        help="flashblock: FlashBlockConfig.refresh_every (default the config's)",
    )
    parser.add_argument(
        "--refresh-last",
        choices=("yes", "no"),
        default=None,
        help="flashblock: FlashBlockConfig.refresh_last (default the config's)",
    )
    parser.add_argument(
        "--pipeline-layers",
        type=int,
        default=6,
        help="flashblock: transformer layers of the end-to-end rollout",
    )
    return parser


def _common_report(args, spec: dict, device, dtype) -> dict:
    """The fields both reports start with: date, device, versions, timer, the shapes and settings."""
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "dtype": str(dtype).removeprefix("torch."),
        "timer": "triton.testing.do_bench median (layer); CUDA-synchronised wall time per chunk (pipeline)"
        if cuda
        else "time.perf_counter (CPU smoke run: times mean nothing)",
        "model": {
            k: v
            for k, v in spec["model"].items()
            if k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")
        },
        "grid_hw": spec["grid_hw"],
        "chunk_frames": CHUNK_FRAMES,
        "steps": len(STEPS),
        "window_frames": spec["window"],
        "max_frames": spec["max_frames"],
        "tempcache": vars(TempCacheConfig()) | {"note": "default config"},
        "synthetic_noise": args.noise,
    }


def rollout_report(report, args, sections, spec, device, dtype) -> None:
    """The dense / window / TempCache sections, written to ``args.out`` with their table."""
    if "layer" in sections:
        report["layer"] = layer_section(spec, device, dtype, args.noise)
    if "pipeline" in sections:
        report["pipeline"] = pipeline_section(spec, device, dtype)
    report["targets"] = targets(report)

    write_report(args.out, report)
    png = args.out.with_suffix(".png")
    plot(report, png)
    print(
        f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['dtype']} | {report['timer']}"
    )
    print(format_table(report))
    print(f"wrote {args.out} and {png}")


# ------------------------------------------------------------------------------------- FlashBlock

FB_EXPECTATION = (
    "written before measuring (for refresh steps 0 and 2; the default now refreshes at 0 and 3, the same count): "
    "the cache part is computed at 2 of the 4 steps instead of 4; "
    "at >= 60 cached frames (>= 93,600 cache keys vs 4,680 own) the cache part is >= 95% of the work, so the "
    "chunk's attention time should drop ~1.8-1.9x (4 (N+S) / (2 (N+S) + 2 S) = 1.91 at 60 frames, 1.97 at 240), "
    "less the split and merge overhead; target >= 1.6x. Over TempCache's bounded cache (32,760 tokens) the "
    "cache part is ~87% of the work: expect ~1.6-1.7x over TempCache alone. The commit pass is unchanged."
)


def flashblock_report(common, args, spec, device, dtype) -> dict:
    """FlashBlock: layer-level attention time and fidelity over a chunk's denoising steps, and
    end-to-end chunk latency; its own JSON + PNG beside ``args.out``, table printed last."""
    overrides = {"refresh_every": args.refresh_every}
    if args.refresh_last is not None:
        overrides["refresh_last"] = args.refresh_last == "yes"
    config = FlashBlockConfig(**{k: v for k, v in overrides.items() if v is not None})
    layers = min(args.pipeline_layers, spec["model"]["num_layers"])
    report = {key: value for key, value in common.items() if key not in ("window_frames", "timer")}
    report |= {
        "timer": f"CUDA events, median of {FB_REPEATS} after 2 warm-ups (layer); CUDA-synchronised wall time per "
        "chunk (pipeline)"
        if device.type == "cuda"
        else "time.perf_counter (CPU smoke run: times mean nothing)",
        "flashblock": vars(config),
        "expectation": FB_EXPECTATION,
        "drift": args.drift,
        "query_models": {
            "random": "queries N(0, 1), unrelated to the cache (no attention structure: the pessimistic case)",
            "tracking": "queries = the chunk's own clean keys from the synthetic stream, which the cache holds "
            "shifted one column per frame (attention concentrated on temporal correspondences)",
            "drift": "per denoising step, queries and own keys/values become sqrt(1 - drift) x + sqrt(drift) "
            "fresh N(0, 1) noise; the commit pass uses the clean chunk",
        },
        "pipeline_layers": layers,
    }
    layer, fidelity = flashblock_layer_section(spec, device, dtype, args.noise, args.drift, config)
    report["layer"], report["fidelity"] = layer, fidelity
    flashblock_methods = {
        "dense": (),
        "flashblock": (config,),
        "tempcache": (TempCacheConfig(),),
        "flashblock_tempcache": (config, TempCacheConfig()),
    }
    report["pipeline"] = pipeline_section(spec, device, dtype, flashblock_methods, num_layers=layers)
    if args.quick and device.type != "cuda":
        report["world_model"] = {"skipped": "CPU smoke run"}
    else:
        report["world_model"] = world_model_fidelity(
            device, flashblock_methods, args.seed, num_frames=3 if args.quick else WORLD_FRAMES
        )
    report["targets"] = flashblock_targets(report)

    default = results_path(None, DEFAULT_OUT, args.quick)
    out = (
        args.out
        if args.out != default and args.sections == "flashblock"
        else default.with_name(default.name.replace(DEFAULT_OUT.stem, FLASHBLOCK_OUT_NAME))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot_points(flashblock_panels(report), png)
    print(
        f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['dtype']} | {report['timer']}"
    )
    print(format_flashblock_table(report))
    print(f"wrote {out} and {png}")
    return report


def flashblock_targets(report) -> dict:
    """BENCHMARKS.md: >= 1.6x lower attention time over a chunk's denoising steps at >= 60 cached frames."""
    at = {(r["method"], r["provider"], r["cache_frames"]): r for r in report["layer"] if "error" not in r}
    provider = next(r["provider"] for r in report["layer"] if r["provider"] != "sdpa_flash")
    frames = sorted({r["cache_frames"] for r in report["layer"]})
    judged = [f for f in frames if f >= 60] or frames
    ms = lambda method, f: at[method, provider, f]["chunk_attention_ms"]  # noqa: E731
    out = {
        "frames_judged": judged,
        "flashblock_speedup_vs_dense": {f: ms("dense", f) / ms("flashblock", f) for f in frames},
        "flashblock_tempcache_speedup_vs_tempcache": {
            f: ms("tempcache", f) / ms("flashblock_tempcache", f) for f in frames
        },
        "flashblock_tempcache_speedup_vs_dense": {
            f: ms("dense", f) / ms("flashblock_tempcache", f) for f in frames
        },
    }
    if all(("dense", "sdpa_flash", f) in at for f in frames):
        out["flashblock_speedup_vs_sdpa"] = {
            f: at["dense", "sdpa_flash", f]["chunk_attention_ms"] / ms("flashblock", f) for f in frames
        }
    for model in QUERY_MODELS:
        rows = [r for r in report["fidelity"] if r["query_model"] == model and r["method"] == "flashblock"]
        out[f"flashblock_max_rel_err_{model}"] = max(max(r["rel_err_vs_dense"]) for r in rows)
    pipeline = {(r["method"], r["cache_frames"]): r["chunk_ms"] for r in report["pipeline"]}
    shown = _shown_frames(sorted({f for _, f in pipeline}))
    out["pipeline_chunk_speedup_vs_dense"] = {
        f: pipeline["dense", f] / pipeline["flashblock", f] for f in shown
    }
    out["meets"] = all(out["flashblock_speedup_vs_dense"][f] >= 1.6 for f in judged)
    return out


def _shown_frames(frames: list[int]) -> list[int]:
    """The cache sizes a table shows: 21, 60, 120, 240 where present, else the first, second and last."""
    wanted = [f for f in frames if f in (21, 60, 120, 240)]
    return wanted if len(wanted) > 1 else sorted({frames[0], frames[min(1, len(frames) - 1)], frames[-1]})


def format_flashblock_table(report) -> str:
    t = report["targets"]
    lines = [
        *_flashblock_layer_lines(report),
        *_flashblock_fidelity_lines(report),
        *_flashblock_end_to_end_lines(report),
    ]
    judged = ", ".join(f"{f}: {t['flashblock_speedup_vs_dense'][f]:.2f}x" for f in t["frames_judged"])
    lines.append(
        f"target >= 1.6x lower chunk attention time at >= 60 frames ({judged}): {'met' if t['meets'] else 'NOT met'}"
    )
    return "\n".join(lines)


def _flashblock_layer_lines(report) -> list[str]:
    """The layer-level timing table."""
    at = {(r["method"], r["provider"], r["cache_frames"]): r for r in report["layer"]}
    provider = next(r["provider"] for r in report["layer"] if r["provider"] != "sdpa_flash")
    frames = sorted({r["cache_frames"] for r in report["layer"]})

    def ms(method, f, p=provider, key="chunk_attention_ms"):
        return fmt(at.get((method, p, f), {}).get(key), ".2f")

    t = report["targets"]
    lines = [
        f"FlashBlock(refresh_every={report['flashblock']['refresh_every']}, "
        f"refresh_last={report['flashblock'].get('refresh_last')}): attention over one chunk's "
        f"{report['steps']} denoising steps, one layer, ms (x = speedup)"
    ]
    table = [
        (
            "frames",
            "cache tok",
            "dense",
            "sdpa",
            "flashblock",
            "x",
            "tempcache",
            "fb+tc",
            "x vs tc",
            "commit dense / tc",
        )
    ]
    for f in frames:
        table.append(
            (
                str(f), str(at["dense", provider, f]["cache_tokens"]), ms("dense", f), ms("dense", f, "sdpa_flash"),
                ms("flashblock", f), f"{t['flashblock_speedup_vs_dense'][f]:.2f}", ms("tempcache", f),
                ms("flashblock_tempcache", f), f"{t['flashblock_tempcache_speedup_vs_tempcache'][f]:.2f}",
                f"{ms('dense', f, key='commit_attention_ms')} / {ms('tempcache', f, key='commit_attention_ms')}",
            )
        )  # fmt: skip
    lines.append(align(table))
    return lines


def _flashblock_fidelity_lines(report) -> list[str]:
    """The per-step error table, per query model and cache size."""
    frames = sorted({r["cache_frames"] for r in report["layer"]})
    lines = []
    lines.append(
        f"fidelity: rel err vs dense full cache per step (drift {report['drift']}), steps marked * refresh"
    )
    table = [("queries", "frames", "flashblock", "fb+tc", "fb+tc vs tc", "ext cos")]
    for model in QUERY_MODELS:
        by = {(r["method"], r["cache_frames"]): r for r in report["fidelity"] if r["query_model"] == model}
        for f in frames:
            fb, fbtc = by["flashblock", f], by["flashblock_tempcache", f]

            def steps(errs, refresh=fb["refresh"]):
                return " ".join(f"{e:.1e}{'*' if x else ''}" for e, x in zip(errs, refresh, strict=True))

            table.append(
                (
                    model, str(f), steps(fb["rel_err_vs_dense"]), steps(fbtc["rel_err_vs_dense"]),
                    steps(fbtc["rel_err_vs_tempcache"]),
                    " ".join(f"{c:.3f}" for c in fb["external_output_cosine_between_steps"]),
                )
            )  # fmt: skip
    lines.append(align(table))
    return lines


def _flashblock_end_to_end_lines(report) -> list[str]:
    """The end-to-end chunk latency table and the world model's fidelity."""
    t, lines = report["targets"], []
    pipeline = {(r["method"], r["cache_frames"]): r for r in report["pipeline"]}
    lines.append(
        f"end to end: chunk latency (4 steps + commit), {report['pipeline_layers']} layers, random weights, ms"
    )
    table = [("frames", *FB_METHODS, "fb x vs dense")]
    for f in _shown_frames(sorted({f for _, f in pipeline})):
        table.append(
            (
                str(f),
                *(f"{pipeline[m, f]['chunk_ms']:.1f}" for m in FB_METHODS),
                f"{t['pipeline_chunk_speedup_vs_dense'][f]:.2f}",
            )
        )
    lines.append(align(table))
    world = report.get("world_model", {})
    if "frames" in world:
        lines.append(
            f"world model, {world['frames']} predicted frames vs the game's truth: PSNR dB / SSIM / PSNR vs dense"
        )
        lines.append(
            align(
                [("method", "psnr", "ssim", "psnr vs dense")]
                + [
                    (
                        m,
                        f"{world[m]['psnr_vs_truth']:.2f}",
                        f"{world[m]['ssim_vs_truth']:.3f}",
                        f"{world[m]['psnr_vs_dense']:.2f}",
                    )
                    for m in FB_METHODS
                ]
            )
        )
    else:
        lines.append(f"world model: {world.get('skipped') or world.get('error')}")
    return lines


def flashblock_panels(report) -> list[tuple[str, dict]]:
    layer, series = [r for r in report["layer"] if "error" not in r], {}
    for r in layer:
        series.setdefault(f"{r['method']} ({r['provider']})", []).append(
            (r["cache_frames"], r["chunk_attention_ms"])
        )
    panels = [("chunk attention ms (4 steps, one layer) vs cache frames", series)]
    series = {}
    for r in report["pipeline"]:
        series.setdefault(r["method"], []).append((r["cache_frames"], r["chunk_ms"]))
    panels.append((f"end-to-end chunk ms vs frame ({report['pipeline_layers']} layers)", series))
    series = {}
    for r in report["fidelity"]:
        if r["method"] in ("flashblock", "flashblock_tempcache"):
            series.setdefault(f"{r['method']} {r['query_model']}", []).append(
                (r["cache_frames"], max(r["rel_err_vs_dense"]))
            )
    panels.append(("max per-step rel err vs dense vs cache frames", series))
    return panels


# ------------------------------------------------------------------------------------- targets, output


def targets(report) -> dict:
    """The BENCHMARKS.md targets, from the layer section and the pipeline section."""
    out = {}
    layer = [r for r in report.get("layer", []) if r["provider"] != "sdpa_flash"]
    if layer:
        frames = sorted({r["cache_frames"] for r in layer})
        at = {(r["method"], r["cache_frames"]): r for r in layer}
        first, last = frames[0], frames[-1]
        out["layer"] = {"frames": [first, last]}
        for method in sorted({r["method"] for r in layer if r["method"].startswith("tempcache")}):
            tc_first, tc_last, dense_last = at[method, first], at[method, last], at["dense", last]
            figures = {
                "latency_ratio_last_vs_first": tc_last["layer_call_ms"] / tc_first["layer_call_ms"],
                "speedup_vs_dense_at_last": dense_last["layer_call_ms"] / tc_last["layer_call_ms"],
                "cache_tokens": [tc_first["cache_tokens"], tc_last["cache_tokens"]],
                "merge_rate": tc_last["merge_rate"],
                "rel_err_vs_dense_at_last": tc_last["rel_err_vs_dense"],
            }
            figures["meets"] = (
                figures["latency_ratio_last_vs_first"] <= 1.15 and figures["speedup_vs_dense_at_last"] >= 5
            )
            out["layer"][method] = figures
    pipeline = report.get("pipeline", [])
    if pipeline:
        by = {(r["method"], r["cache_frames"]): r for r in pipeline}
        frames = sorted({r["cache_frames"] for r in pipeline})
        early = min(frames, key=lambda f: abs(f - 21))
        late = min(frames, key=lambda f: abs(f - report["max_frames"]))  # a chunk that still commits
        warm = [by["tempcache", f]["peak_mib"] for f in frames if f >= CHUNK_FRAMES]
        out["pipeline"] = {
            "frames": [early, late],
            "tempcache_latency_ratio": by["tempcache", late]["chunk_ms"] / by["tempcache", early]["chunk_ms"],
            "tempcache_speedup_vs_dense": by["dense", late]["chunk_ms"] / by["tempcache", late]["chunk_ms"],
            "window_speedup_vs_dense": by["dense", late]["chunk_ms"] / by["window", late]["chunk_ms"],
            "tempcache_peak_spread_after_warmup": (max(warm) - min(warm)) / min(warm)
            if warm and min(warm) > 0
            else None,
            "tempcache_merge_rate": by["tempcache", late]["merge_rate"],
        }
        p = out["pipeline"]
        p["meets"] = (
            p["tempcache_latency_ratio"] <= 1.15
            and p["tempcache_speedup_vs_dense"] >= 5
            and p["tempcache_peak_spread_after_warmup"] is not None
            and p["tempcache_peak_spread_after_warmup"] <= 0.05
        )
    return out


def format_table(report) -> str:
    lines = []
    layer = report.get("layer", [])
    if layer:
        lines.append(
            "layer call (one chunk's queries) | method | provider | cache frames | cache tokens | ms | commit ms | MiB | merge rate | rel err"
        )
        for r in layer:
            if "error" in r:
                lines.append(
                    f"  {r['method']:9s} {r['provider']:15s} {r['cache_frames']:4d}  error: {r['error']}"
                )
                continue
            lines.append(
                f"  {r['method']:9s} {r['provider']:15s} {r['cache_frames']:4d} {r['cache_tokens']:8d} "
                f"{r['layer_call_ms']:8.3f} {fmt(r['commit_ms_per_chunk'], '8.3f')} {fmt(r.get('cache_mib'), '9.1f')} "
                f"{fmt(r.get('merge_rate'), '6.3f')} {fmt(r.get('rel_err_vs_dense'), '9.2e')}"
            )
    pipeline = report.get("pipeline", [])
    if pipeline:
        frames = sorted({r["cache_frames"] for r in pipeline})
        shown = sorted(
            {
                frames[0],
                frames[1] if len(frames) > 1 else frames[0],
                *(f for f in frames if f in (21, 60, 120, 240)),
                frames[-1],
            }
        )
        by = {(r["method"], r["cache_frames"]): r for r in pipeline}
        lines.append(
            "pipeline chunk (4 steps + commit) | cache frames | "
            + " | ".join(f"{m} ms / peak MiB" for m in METHODS)
        )
        for f in shown:
            cells = [
                f"{by[m, f]['chunk_ms']:9.1f} / {by[m, f]['peak_mib']:9.0f}" for m in METHODS if (m, f) in by
            ]
            lines.append(f"  {f:4d}  " + "  ".join(cells))
    for section, figures in report.get("targets", {}).items():
        flat = {}
        for key, value in figures.items():
            flat.update(
                {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
            )
        lines.append(
            f"targets ({section}): "
            + ", ".join(f"{k}={fmt(v, '.3f') if isinstance(v, float) else v}" for k, v in flat.items())
        )
    return "\n".join(lines)


def plot(report, path: Path) -> None:
    """Per-chunk latency and peak memory vs cache frames (pipeline), and layer-call time vs cache
    frames (layer), as one PNG drawn with PIL (no plotting dependency)."""
    panels = []
    layer = [r for r in report.get("layer", []) if "error" not in r]
    if layer:
        series = {}
        for r in layer:
            series.setdefault(f"{r['method']} ({r['provider']})", []).append(
                (r["cache_frames"], r["layer_call_ms"])
            )
        panels.append(("layer call ms vs cache frames", series))
    pipeline = report.get("pipeline", [])
    for key, title in (
        ("chunk_ms", "pipeline ms per chunk vs frame"),
        ("peak_mib", "pipeline peak MiB per chunk vs frame"),
    ):
        series = {}
        for r in pipeline:
            series.setdefault(r["method"], []).append((r["cache_frames"], r[key]))
        if series:
            panels.append((title, series))
    plot_points(panels, path)


if __name__ == "__main__":
    main()
