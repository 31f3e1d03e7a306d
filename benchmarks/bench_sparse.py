"""AnnSA and AnnCA against dense attention and FlexAttention (a script, not a test).

Kernel level (``topic="annsa"``), 32,760 and 75,600 tokens, 12 heads × 128, bf16, B=1, at about
5 / 10 / 20% block density (``top_k`` chosen per token count so that the plan's density is the
closest to each target, ``n_clusters=64``, ``refresh_every=5``, 2 Lloyd iterations, 128-token blocks),
and with ``top_p=0.95`` (mass-based routing, its density set by the data; ``route`` column):

- ``annsa_per_call``: one AnnSA layer call averaged over a simulated denoising run of 10 steps × 2
  CFG passes through ``AnnSA.attend`` with a step context (plans built at steps 0 and 5 and reused
  by the other 18 calls), so k-means, routing, token permutations and un-permutation all count;
- ``vidaccel_kernel_same_layout`` / ``flex_same_layout``: the attention alone on the already
  permuted tokens, vidaccel's block-sparse kernel vs FlexAttention (compiled) on the same layout;
- ``sdpa_flash``: dense SDPA (flash backend), the baseline of ``vs_sdpa`` and ``sparse_eff``;
- ``annsa_permutation_only``: the token gathers AnnSA adds per call (q, k, v in; out back);
- ``plan_ms``: one plan build (k-means + permutation + routing) on its own.

Inputs: ``clustered``: per head, 32 centres of norm 9 (random directions); every query and key is a
randomly chosen centre plus N(0, 0.1²) noise, so a query's attention mass sits on its centre's
keys (about 3% of them) — the structure AnnSA exploits; ``random``: ``torch.randn`` (no structure,
attention nearly uniform; fidelity there is reported, not targeted). ``rel_err``:
‖out − dense‖/‖dense‖ on the first 1,024 queries against an fp32 reference on the same device.

End to end (``--e2e``, ``topic="e2e"``): one Wan2.1-1.3B-shaped transformer (random weights, 30
layers, 12 heads × 128, ffn 8960, bf16) at 480×832×81 (token grid 21×30×52), prompts of 512
tokens of which the first 60 are non-zero (Wan zero-pads to 512). A run of 5 steps × 2 CFG passes
(one AnnSA refresh period) with the stock diffusers processors (dense SDPA), then with
``vidaccel.apply(AnnSAConfig(top_k=..., dense_layers=1, dense_steps=0), AnnCAConfig(top_p=0.9))``;
the figure is ms per transformer forward, averaged over the run, and the step speedup.

    python benchmarks/bench_sparse.py                 # GPU: kernel level, ~2-3 minutes
    python benchmarks/bench_sparse.py --e2e           # GPU: plus the end-to-end step
    python benchmarks/bench_sparse.py --quick         # tiny smoke run (GPU, or CPU interpreter)

Writes ``benchmarks/results/sparse.json`` (``--out``) and prints a table last.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import vidaccel  # noqa: E402
from vidaccel import AnnCAConfig, AnnSAConfig, AttentionCall, StepContext, ops  # noqa: E402
from vidaccel.metrics import relative_error  # noqa: E402
from vidaccel.pipelines.bench import (  # noqa: E402
    Bench,
    align,
    bench_device,
    bench_parser,
    environment,
    flex_block_mask,
    fmt,
    kept_pairs,
    parse_bench_args,
    sdpa_baseline,
    sync,
    with_ratios,
    write_report,
)
from vidaccel.pipelines.tiny import WAN21_1_3B_CONFIG  # noqa: E402
from vidaccel.processors import annsa  # noqa: E402
from vidaccel.processors.base import dense_attention  # noqa: E402
from vidaccel.processors.tokens import take_rows  # noqa: E402
from vidaccel.state import context_of  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sparse.json"
FULL = dict(
    heads=12, head_dim=128, tokens=(32760, 75600), check_queries=1024, block=128, n_clusters=64, steps=10
)
QUICK_GPU = dict(heads=2, head_dim=128, tokens=(4000,), check_queries=512, block=128, n_clusters=16, steps=10)
QUICK_CPU = dict(heads=1, head_dim=64, tokens=(256,), check_queries=128, block=32, n_clusters=8, steps=2)
DENSITIES = (0.05, 0.10, 0.20)
PASSES, REFRESH = 2, 5  # CFG passes per step, steps per plan refresh
E2E_REPEATS = 2
TRUE_CLUSTERS, CENTRE_NORM, NOISE = 32, 9.0, 0.1
TOP_P = 0.95  # the mass-routed row next to the top_k ones


def main(argv=None) -> dict:
    parser = bench_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--e2e", action="store_true", help="also time one Wan-1.3B-shaped denoising step")
    args = parse_bench_args(parser, argv)
    device, dtype = bench_device(parser, args)
    shapes = FULL if not args.quick else QUICK_GPU if device.type == "cuda" else QUICK_CPU

    bench = Bench(device, dtype, dict(shapes, dense_tokens=shapes["tokens"]), args.seed)
    rows = []
    for tokens in shapes["tokens"]:
        rows += kernel_level(bench, shapes, tokens)
    if args.e2e:
        rows += end_to_end(bench, quick=args.quick, steps=min(shapes["steps"], REFRESH))

    report = {
        **environment(device, args.quick, dtype),
        "shapes": shapes,
        "run": dict(steps=shapes["steps"], passes=PASSES, refresh_every=REFRESH),
        "clustered_inputs": dict(true_clusters=TRUE_CLUSTERS, centre_norm=CENTRE_NORM, noise=NOISE),
        "rows": rows,
    }
    write_report(args.out, report)
    print(f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['dtype']}")
    print(format_table(rows))
    print(f"wrote {args.out}")
    return report


def kernel_level(bench: Bench, shapes: dict, tokens: int) -> list[dict]:
    heads, dim, block = shapes["heads"], shapes["head_dim"], shapes["block"]
    inputs = {"clustered": clustered_qkv(bench, tokens), "random": bench.qkv(tokens)}
    q, k, v = inputs["clustered"]
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    sdpa = bench.measure(
        dict(topic="annsa", tokens=tokens, input="any", provider="sdpa_flash", density=1.0),
        lambda: _sdpa_flash(q_t, k_t, v_t),
        bench.reference(q, k, v),
        tokens * tokens * heads,
        layout="bhsd",
    )
    rows = [sdpa]
    baseline = sdpa_baseline(rows, tokens)
    base_config = dict(n_clusters=shapes["n_clusters"], refresh_every=REFRESH, dense_layers=0, dense_steps=0)
    base_config.update(sink_tokens=0, ann_backend="triton", block_size=block)
    top_ks = _top_k_for_densities(q, k, base_config, DENSITIES)
    routings = [(target, dict(top_k=top_k)) for target, top_k in zip(DENSITIES, top_ks, strict=True)]
    routings.append((None, dict(top_p=TOP_P)))  # mass-based routing: density follows the data
    references = {kind: bench.reference(*qkv) for kind, qkv in inputs.items()}
    for target, routing in routings:
        config = AnnSAConfig(**routing, **base_config)
        for kind, (q, k, v) in inputs.items():
            ref = references[kind]
            row = dict(topic="annsa", tokens=tokens, input=kind, target_density=target, **routing)
            out, plan = simulate_run(q, k, v, config, shapes["steps"])
            density = plan.density()
            row.update(density=density, rel_err=relative_error(out[:, : ref.shape[1]], ref))
            row["plan_ms"] = bench.timed(lambda q=q, k=k, config=config: annsa.build_plan(q, k, config))[1]
            run_ms = bench.timed(
                lambda q=q, k=k, v=v, config=config: simulate_run(q, k, v, config, shapes["steps"])
            )[1]
            pairs = kept_pairs(plan.blocks.block_mask, tokens)
            per_call = dict(row, provider="annsa_per_call", ms=run_ms / (shapes["steps"] * PASSES))
            per_call["tflops"] = 4 * dim * pairs / per_call["ms"] * 1e-9
            rows.append(with_ratios(per_call, baseline, density))
            rows += _same_layout(bench, row, plan, q, k, v, pairs, baseline, density)
    return rows


def simulate_run(q, k, v, config: AnnSAConfig, steps: int):
    """One layer's calls over a denoising run (``steps`` × ``PASSES``) through ``AnnSA.attend`` with
    a fresh step context: ``-> (last output [B, S, H, D], the last plan)``."""
    method = config.build()
    context, attn = StepContext(), _LAYER
    out = None
    for step in range(steps):
        context.step_index = step
        for _ in range(PASSES):
            out, _ = method.attend(
                AttentionCall(attn, "self", q, k, v, context=context, backend="triton"), dense_attention
            )
    return out, annsa.plan_of(context, attn)


def _same_layout(bench, row, plan, q, k, v, pairs, baseline, density):
    """The attention alone on permuted tokens: vidaccel's kernel and FlexAttention, same layout."""
    q_p = take_rows(q, plan.q_rows)
    k_p, v_p = take_rows(k, plan.k_rows), take_rows(v, plan.k_rows)
    out_p = torch.empty_like(q_p)
    permute_ms = bench.timed(  # what AnnSA adds per call around the kernel: 3 gathers, 1 un-permute
        lambda: (
            take_rows(q, plan.q_rows),
            take_rows(k, plan.k_rows),
            take_rows(v, plan.k_rows),
            take_rows(out_p, plan.q_inverse_rows),
        )
    )[1]
    rows = [dict(row, provider="annsa_permutation_only", ms=permute_ms)]
    ours = bench.timed(lambda: ops.attention(q_p, k_p, v_p, plan=plan.blocks, backend="triton"))[1]
    rows.append(with_ratios(dict(row, provider="vidaccel_kernel_same_layout", ms=ours), baseline, density))
    flex_fn, note = bench.flex
    flex_row = dict(row, provider="flex_same_layout", mode=note)
    if flex_fn is None:
        return rows + [dict(flex_row, error=note)]
    try:
        mask = flex_block_mask(plan.blocks.block_mask, q.shape[1])
        q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q_p, k_p, v_p))
        ms = bench.timed(lambda: flex_fn(q_t, k_t, v_t, block_mask=mask))[1]
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        return rows + [dict(flex_row, error=f"{type(exc).__name__}: {exc}")]
    return rows + [with_ratios(dict(flex_row, ms=ms), baseline, density)]


def clustered_qkv(bench: Bench, tokens: int):
    """q, k, v ``[1, S, H, D]``: q and k around ``TRUE_CLUSTERS`` centres per head (see the docstring)."""
    heads, dim = bench.shapes["heads"], bench.shapes["head_dim"]
    gen = bench.generator
    centres = torch.randn(heads, TRUE_CLUSTERS, dim, device=bench.device, generator=gen)
    centres = torch.nn.functional.normalize(centres, dim=-1) * CENTRE_NORM

    def around():
        label = torch.randint(0, TRUE_CLUSTERS, (heads, tokens), device=bench.device, generator=gen)
        x = torch.gather(centres, 1, label[..., None].expand(-1, -1, dim))  # [H, S, D]
        x = x + NOISE * torch.randn(x.shape, device=bench.device, generator=gen)
        return x.transpose(0, 1)[None].to(bench.dtype).contiguous()

    return around(), around(), bench.randn(1, tokens, heads, dim)


def _top_k_for_densities(q, k, base_config, targets):
    """Per target density, the top_k whose plan on (q, k) comes closest (each query block visits
    the union of its queries' top_k clusters, so top_k 1 is already a few percent)."""
    densities = {}
    for top_k in range(1, max(1, round(base_config["n_clusters"] * max(targets) / 2)) + 1):
        densities[top_k] = annsa.build_plan(q, k, AnnSAConfig(top_k=top_k, **base_config)).density()
    return [min(densities, key=lambda top_k: abs(densities[top_k] - t)) for t in targets]


def _sdpa_flash(q_t, k_t, v_t):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)


_LAYER = torch.nn.Identity()  # the attention module a simulated run keys its plan state on


def end_to_end(bench: Bench, quick: bool, steps: int) -> list[dict]:
    """Per-forward time of a Wan-1.3B-shaped transformer, stock (dense SDPA) vs AnnSA + AnnCA."""
    device = bench.device
    grid, text = ((3, 8, 8), 64) if quick else ((21, 30, 52), 512)
    model = _e2e_model(bench, quick)
    latent = bench.randn(1, 16, grid[0], grid[1] * 2, grid[2] * 2)
    prompts = []
    for _ in range(PASSES):
        embeds = bench.randn(1, text, 4096)
        embeds[:, 60:] = 0  # Wan's zero padding
        prompts.append(embeds)
    timesteps = torch.linspace(999, 800, steps).tolist()

    def run():
        out = None
        for t in timesteps:
            for embeds in prompts:
                timestep = torch.full((1,), t, device=device)
                out = model(latent, timestep, embeds, return_dict=False)[0]
        return out

    def per_forward(fn):
        """Warm-up run, then the median of ``E2E_REPEATS`` timed runs, per forward."""
        out = fn()
        times = []
        for _ in range(E2E_REPEATS):
            sync(device)
            begin = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - begin) * 1e3)
        return out, statistics.median(times) / (steps * PASSES)

    with torch.no_grad():
        dense_out, dense_ms = per_forward(run)
        density_k = 2  # per-query top-2 clusters, unioned per block: ~10% on the clustered inputs
        vidaccel.apply(
            model,
            AnnSAConfig(n_clusters=64, top_k=density_k, refresh_every=steps, dense_layers=1, dense_steps=0),
            AnnCAConfig(top_p=0.9),
        )
        sparse_out, sparse_ms = per_forward(run)
        context = context_of(model)
        plans = [annsa.plan_of(context, block.attn1) for block in model.blocks]
        density = statistics.mean(plan.density() for plan in plans if plan is not None)
        vidaccel.remove(model)
    base = dict(topic="e2e", tokens=grid[0] * grid[1] * grid[2], input="random weights")
    return [
        dict(base, provider="stock_dense_sdpa", ms=dense_ms, density=1.0),
        dict(
            base,
            provider="annsa_annca",
            ms=sparse_ms,
            density=density,
            top_k=density_k,
            step_speedup=dense_ms / sparse_ms,
            rel_err=relative_error(sparse_out.float(), dense_out.float()),
        ),
    ]


def _e2e_model(bench: Bench, quick: bool):
    """The end-to-end run's transformer: Wan2.1-1.3B's shapes (tiny with ``quick``), random weights."""
    from diffusers import WanTransformer3DModel

    tiny = dict(num_layers=2, num_attention_heads=2, ffn_dim=256) if quick else {}
    with torch.device(bench.device):
        model = WanTransformer3DModel(**(WAN21_1_3B_CONFIG | tiny))
    return model.to(bench.dtype).eval()


def format_table(rows) -> str:
    header = (
        "topic",
        "tokens",
        "input",
        "density",
        "route",
        "provider",
        "ms",
        "vs SDPA",
        "sparse eff",
        "plan ms",
        "rel err",
    )
    lines = [header]
    for r in rows:
        cells = (
            r["topic"],
            str(r["tokens"]),
            r.get("input", ""),
            fmt(r.get("density"), ".3f"),
            f"k={r['top_k']}" if r.get("top_k") else f"p={r['top_p']}" if r.get("top_p") else "",
            r["provider"],
        )
        if "error" in r:
            lines.append((*cells, "error: " + r["error"][:60], "", "", "", ""))
            continue
        ratio = r.get("vs_sdpa", r.get("step_speedup"))
        lines.append(
            (
                *cells,
                fmt(r.get("ms"), ".3f"),
                fmt(ratio, ".2f") + ("x" if ratio else ""),
                fmt(r.get("sparse_eff"), ".2f"),
                fmt(r.get("plan_ms"), ".2f") if r["provider"] == "annsa_per_call" else "",
                fmt(r.get("rel_err"), ".3f"),
            )
        )
    return align(lines)


if __name__ == "__main__":
    main()
