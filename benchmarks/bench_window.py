"""FreeSwim window attention against its peers, and the FreeSwim refinement step (a script, not a test).

Attention, at 1088×1920×81 frames (token grid 21×68×120 = 171,360 tokens), 12 heads × 128, bf16, B=1:
vidaccel's window kernel (``ops.window_attention``, exact inward window, 2-D tiles) with the default
tiles and alternatives, against dense SDPA (flash and cuDNN backends) and FlexAttention (compiled) with
the inward-window ``mask_mod`` over the raster token order (the published implementation's layout).
Figures: ``vs_sdpa`` (SDPA-flash time / this time), ``vs_best_sdpa`` (against the faster SDPA backend),
``density`` (computed token pairs / S², tiles' empty slots included) and ``block_density`` (visited
tile pairs), ``masked`` (share of visited key tiles that need the per-element mask), ``rel_err`` on
512 queries (corners, borders and random) against the fp32 reference with the explicit mask.

Step (``--step``): one refinement step with guidance of a Wan-1.3B-shaped transformer (30 blocks,
12 × 128, random weights, bf16) at the same size. Each forward kind is timed once after one warm-up:
stock dense (diffusers' SDPA processor), window branch alone (the uncond pass), dual (window + full
rows, batch 2, cross-attention override, cache written) and cached (window rows, cross-attention from
the cache). Per step with guidance, amortised over ``cache_steps = c``:
``window + (dual + (c - 1) · cached) / c`` against ``2 · dense``.

    python benchmarks/bench_window.py --step      # GPU: attention + step, < 4 minutes
    python benchmarks/bench_window.py --quick     # smoke run of every code path (GPU, or CPU below)

Without CUDA, ``--quick`` runs tiny fp32 shapes with the kernel in the Triton interpreter; its times
mean nothing. Writes ``benchmarks/results/window.json`` (``--out``) and prints a table last.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import vidaccel  # noqa: E402
from vidaccel import ops  # noqa: E402
from vidaccel.kernels.window import DEFAULT_TILES, plan_window, window_starts  # noqa: E402
from vidaccel.metrics import relative_error  # noqa: E402
from vidaccel.pipelines import bench as harness  # noqa: E402
from vidaccel.pipelines.tiny import WAN21_1_3B_CONFIG  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "window.json"
FULL = dict(grid=(21, 68, 120), half_window=(15, 26), heads=12, head_dim=128, check_queries=512)
QUICK_GPU = dict(grid=(5, 34, 60), half_window=(8, 13), heads=2, head_dim=128, check_queries=256)
QUICK_CPU = dict(grid=(2, 9, 13), half_window=(2, 3), heads=1, head_dim=64, check_queries=64)
# Alternatives to the default tiles (query tile, key tile): narrower key tiles halve the boundary
# waste, at the cost of a 64-wide inner loop.
ALT_TILES = (((8, 16), (8, 8)), ((16, 8), (16, 8)))
CACHE_STEPS = (1, 2, 5)
STEP_QUICK = dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=256)


def main(argv=None) -> dict:
    parser = harness.bench_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--step", action="store_true", help="also time the Wan-1.3B-shaped refinement step")
    args = harness.parse_bench_args(parser, argv)

    device, dtype = harness.bench_device(parser, args)
    shapes = FULL if not args.quick else QUICK_GPU if device.type == "cuda" else QUICK_CPU

    bench = harness.Bench(device, dtype, shapes, args.seed)
    rows = attention_rows(bench, shapes)
    if args.step:
        try:
            rows += step_rows(bench, shapes, quick=args.quick)
        except Exception as exc:  # report it with the attention rows rather than lose them
            rows.append(dict(topic="step", provider="step", error=f"{type(exc).__name__}: {exc}"))

    report = {
        **harness.environment(device, args.quick, dtype),
        "grid": list(shapes["grid"]),
        "half_window": list(shapes["half_window"]),
        "heads": shapes["heads"],
        "head_dim": shapes["head_dim"],
        "rows": rows,
    }
    harness.write_report(args.out, report)
    print(
        f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['dtype']} | "
        f"grid {tuple(shapes['grid'])} | half-window {tuple(shapes['half_window'])} | "
        f"{shapes['heads']} heads x {shapes['head_dim']}"
    )
    print(format_table(rows))
    print(f"wrote {args.out}")
    return report


def attention_rows(bench: harness.Bench, shapes) -> list[dict]:
    grid, half = shapes["grid"], shapes["half_window"]
    seq = math.prod(grid)
    q, k, v = bench.qkv(seq)
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    check = _check_tokens(grid, shapes["check_queries"], bench.device)
    ref = _window_reference(q, k, v, grid, half, check)
    base = dict(topic="attention", tokens=seq)
    rows = []

    def measure(row, fn, layout="bshd"):
        try:
            out, ms = bench.timed(fn)
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            return dict(row, error=f"{type(exc).__name__}: {exc}")
        out = out.transpose(1, 2) if layout == "bhsd" else out
        return dict(row, ms=ms, rel_err=relative_error(out[:, check].float(), ref))

    backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION)]
    if bench.cuda:
        backends.append(("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))
    for name, backend in backends:

        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)

        row = measure(dict(base, provider=name, density=1.0), sdpa, layout="bhsd")
        rows.append(dict(row, rel_err=None))  # dense attention is not the window: no error figure

    for tiles in (DEFAULT_TILES, *ALT_TILES):
        plan = plan_window(grid, half, tiles, bench.device)
        row = dict(
            base,
            provider="vidaccel_window",
            tiles=[list(t) for t in tiles],
            density=plan.density(),
            block_density=plan.block_density(),
            masked=plan.masked_fraction(),
        )
        rows.append(
            measure(
                row,
                lambda t=tiles: ops.window_attention(
                    q, k, v, grid=grid, half_window=half, tiles=t, backend="triton"
                ),
            )
        )

    def flex(flex_fn, row, block_mask):
        dense_blocks = block_mask.kv_num_blocks.sum() + (
            0 if block_mask.full_kv_num_blocks is None else block_mask.full_kv_num_blocks.sum()
        )
        n_blocks = triton.cdiv(seq, 128)
        row["block_density"] = float(dense_blocks) / n_blocks**2
        row["density"] = row["block_density"]
        return measure(row, lambda: flex_fn(q_t, k_t, v_t, block_mask=block_mask), layout="bhsd")

    rows.append(
        bench.flex_row(base, lambda: _flex_window_mask(grid, half, bench.device, compiled=bench.cuda), flex)
    )
    return _with_ratios(rows)


def step_rows(bench: harness.Bench, shapes, *, quick: bool) -> list[dict]:
    """Time the transformer forward kinds once each (after a warm-up), amortise per step."""
    from diffusers import WanTransformer3DModel

    from vidaccel.processors.freeswim import FreeSwimBatch, set_freeswim_batch
    from vidaccel.state import context_of

    dims = STEP_QUICK if quick else {}
    grid, half = shapes["grid"], shapes["half_window"]
    with torch.device(bench.device):
        model = WanTransformer3DModel(**{**WAN21_1_3B_CONFIG, **dims})
    model = model.to(bench.dtype).eval()  # speed only: random weights, every module in bf16
    latent = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], device=bench.device, dtype=bench.dtype)
    prompt = torch.randn(1, 512, 4096, device=bench.device, dtype=bench.dtype)
    timestep = torch.tensor([500.0], device=bench.device)
    config = vidaccel.FreeSwimConfig(
        half_window=tuple(half)
    )  # trained at 480×832: temperature from 1,560 tokens

    def forward(rows, mode=None):
        context = context_of(model)
        if context is not None:
            set_freeswim_batch(context, FreeSwimBatch(mode, 1))
        with torch.inference_mode():
            return model(
                hidden_states=latent.expand(rows, -1, -1, -1, -1),
                timestep=timestep.expand(rows),
                encoder_hidden_states=prompt.expand(rows, -1, -1),
                return_dict=False,
            )[0]

    times, peaks = {}, {}
    kinds = [("dense", 1, None), ("window", 1, "window"), ("dual", 2, "dual"), ("cached", 1, "cached")]
    for kind, rows, mode in kinds:
        if kind == "window":
            vidaccel.apply(model, config)
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats()
        forward(rows, mode)  # warm-up (and, for dual, the cache the cached kind reads)
        times[kind] = _once(lambda rows=rows, mode=mode: forward(rows, mode), bench.cuda)
        peaks[kind] = torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else None
    vidaccel.remove(model)

    dense_step = 2 * times["dense"]
    base = dict(topic="step", tokens=math.prod(grid), layers=dims["num_layers"])
    rows = [
        dict(base, provider=f"forward_{kind}", ms=times[kind], peak_gib=peaks[kind], batch=rows_)
        for kind, rows_, _ in kinds
    ]
    rows.append(dict(base, provider="step_dense_cfg", ms=dense_step, vs_dense_step=1.0))
    for c in CACHE_STEPS:
        ms = times["window"] + (times["dual"] + (c - 1) * times["cached"]) / c
        rows.append(
            dict(
                base, provider=f"step_freeswim_cache{c}", ms=ms, cache_steps=c, vs_dense_step=ms / dense_step
            )
        )
    return rows


def _once(fn, cuda) -> float:
    if not cuda:
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def _check_tokens(grid, count, device) -> torch.Tensor:
    """Token indices to check: the four corners and edge midpoints of frames 0 and T-1, then random."""
    frames, height, width = grid
    picks = []
    for t in (0, frames - 1):
        for r in (0, height // 2, height - 1):
            for c in (0, width // 2, width - 1):
                picks.append((t * height + r) * width + c)
    generator = torch.Generator().manual_seed(1)
    extra = torch.randint(0, frames * height * width, (max(0, count - len(picks)),), generator=generator)
    return torch.cat([torch.tensor(picks), extra]).unique().to(device)


def _window_reference(q, k, v, grid, half, tokens) -> torch.Tensor:
    """fp32 window attention of the queries at ``tokens`` -> ``[1, n, H, D]``, one head at a time."""
    frames, height, width = grid
    every = torch.arange(frames * height * width, device=q.device)
    rows, cols = (every // width) % height, every % width
    s_h = window_starts(height, half[0], rows[tokens])[:, None]
    s_w = window_starts(width, half[1], cols[tokens])[:, None]
    visible = (rows >= s_h) & (rows <= s_h + 2 * half[0]) & (cols >= s_w) & (cols <= s_w + 2 * half[1])
    outs = []
    for h in range(q.shape[2]):
        scores = q[0, tokens, h].float() @ k[0, :, h].float().T / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(probs @ v[0, :, h].float())
    return torch.stack(outs, dim=1)[None]


def _flex_window_mask(grid, half, device, compiled):
    """FlexAttention BlockMask of the inward window over raster token order (128-token blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    frames, height, width = grid
    d_h, d_w = half
    max_h, max_w = max(height - 1 - 2 * d_h, 0), max(width - 1 - 2 * d_w, 0)

    def inward(b, h, q_idx, kv_idx):
        q_r, q_c = (q_idx // width) % height, q_idx % width
        k_r, k_c = (kv_idx // width) % height, kv_idx % width
        s_h = torch.clamp(q_r - d_h, 0, max_h)
        s_w = torch.clamp(q_c - d_w, 0, max_w)
        return (k_r >= s_h) & (k_r <= s_h + 2 * d_h) & (k_c >= s_w) & (k_c <= s_w + 2 * d_w)

    seq = frames * height * width
    return create_block_mask(inward, None, None, seq, seq, device=device, _compile=compiled)


def _with_ratios(rows):
    times = {r["provider"]: r["ms"] for r in rows if r["provider"].startswith("sdpa_") and "ms" in r}
    flash, best = times.get("sdpa_flash"), min(times.values(), default=None)
    for row in rows:
        if "ms" in row and flash:
            row["vs_sdpa"] = flash / row["ms"]
            row["vs_best_sdpa"] = best / row["ms"]
    return rows


def format_table(rows) -> str:
    header = (
        "topic",
        "provider",
        "tiles",
        "ms",
        "vs SDPA flash|best",
        "density|blocks",
        "masked",
        "rel err",
        "vs dense step",
    )
    lines = [header]
    for r in rows:
        tiles = (
            "x".join(map(str, r["tiles"][0])) + "/" + "x".join(map(str, r["tiles"][1]))
            if "tiles" in r
            else ""
        )
        cells = (r["topic"], r["provider"], tiles)
        if "error" in r:
            lines.append((*cells, "error: " + r["error"][:80], "", "", "", "", ""))
            continue
        ratio = (
            f"{harness.fmt(r.get('vs_sdpa'), '.2f')}x|{harness.fmt(r.get('vs_best_sdpa'), '.2f')}x"
            if "vs_sdpa" in r
            else ""
        )
        density = (
            f"{harness.fmt(r.get('density'), '.3f')}|{harness.fmt(r.get('block_density'), '.3f')}"
            if "density" in r
            else ""
        )
        lines.append(
            (
                *cells,
                harness.fmt(r["ms"], ".1f"),
                ratio,
                density,
                harness.fmt(r.get("masked"), ".2f"),
                harness.fmt(r.get("rel_err"), ".2e"),
                harness.fmt(r.get("vs_dense_step"), ".3f"),
            )
        )
    return harness.align(lines)


if __name__ == "__main__":
    main()
