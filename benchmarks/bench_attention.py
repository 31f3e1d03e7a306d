"""Attention kernels against their peers, speed and fidelity side by side (a script, not a test).

Dense: vidaccel's Triton kernel vs SDPA (flash backend) at Wan2.1-1.3B shapes, 32,760 and 75,600
tokens. Block-sparse: vidaccel's kernel on a ``plan_blocks`` plan vs FlexAttention (compiled) on a
BlockMask of the same random 128×128 layout, at 5 / 10 / 20 / 40% block density, 32,760 tokens.
Merge: ``ops.merge_attention`` vs the same math as a torch expression.

Protocol (shared/BENCHMARKS.md): B=1, 12 heads × 128, bf16, inputs from ``torch.randn``; each
provider warmed up (compiled) first, then the median of ``triton.testing.do_bench`` (CUDA events).
Every provider gets its native layout, contiguous: ``[B, S, H, D]`` for vidaccel, ``[B, H, S, D]``
for SDPA and FlexAttention. Figures:

- ``vs_sdpa``: dense SDPA-flash time / this provider's time, same run and token count (> 1 is faster);
- ``sparse_eff``: sparse efficiency = SDPA-flash time × block density / this time;
- ``vs_best_sdpa``, ``sparse_eff_best_sdpa``: the same against the fastest SDPA backend measured
  (flash or cuDNN, which can beat flash on Hopper), so that no ratio flatters vidaccel;
- ``tflops``: 4·D·(attended query-key pairs) / time, counting only kept blocks for sparse calls;
- ``rel_err``: ‖out − ref‖/‖ref‖ on the first 1,024 queries, ``ref`` from
  ``vidaccel.kernels.attention_reference`` in fp32 on the same device (TF32 off).

    python benchmarks/bench_attention.py                  # GPU: full run, ~ a few minutes
    python benchmarks/bench_attention.py --quick          # tiny smoke run (GPU, or CPU below)

Without CUDA, ``--quick`` runs tiny fp32 shapes with the Triton kernels in the interpreter
(TRITON_INTERPRET=1), SDPA on its CPU backend and FlexAttention eager, timed with
``time.perf_counter``: it checks the code paths, its times mean nothing.
Writes ``benchmarks/results/attention.json`` (``--out``) and prints a table last.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Set before anything imports triton, so the kernels can run in the interpreter on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vidaccel.pipelines.bench import (  # noqa: E402
    BLOCK,
    Bench,
    align,
    bench_device,
    bench_parser,
    environment,
    fmt,
    parse_bench_args,
    sdpa_baseline,
    write_report,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "attention.json"
FULL = dict(heads=12, head_dim=128, dense_tokens=(32760, 75600), sparse_tokens=32760, check_queries=1024)
# Quick: a ragged last block at every size, and few enough programs for the interpreter.
QUICK_GPU = dict(heads=2, head_dim=128, dense_tokens=(4000,), sparse_tokens=4000, check_queries=512)
QUICK_CPU = dict(heads=1, head_dim=64, dense_tokens=(1200,), sparse_tokens=1200, check_queries=256)
DENSITIES = (0.05, 0.10, 0.20, 0.40)


def main(argv=None) -> dict:
    parser = bench_parser(__doc__, DEFAULT_OUT)
    args = parse_bench_args(parser, argv)

    device, dtype = bench_device(parser, args)
    shapes = FULL if not args.quick else QUICK_GPU if device.type == "cuda" else QUICK_CPU

    bench = Bench(device, dtype, shapes, args.seed)
    rows = []
    for tokens in shapes["dense_tokens"]:
        rows += bench.dense(tokens)
    baseline = sdpa_baseline(rows, shapes["sparse_tokens"])
    for density in DENSITIES:
        rows += bench.sparse(shapes["sparse_tokens"], density, baseline)
    rows += bench.merge(shapes["sparse_tokens"])

    report = {
        **environment(device, args.quick, dtype),
        "batch": 1,
        "heads": shapes["heads"],
        "head_dim": shapes["head_dim"],
        "block_size": [BLOCK, BLOCK],
        "check_queries": shapes["check_queries"],
        "rows": rows,
    }
    write_report(args.out, report)
    print(
        f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['dtype']} | "
        f"{report['heads']} heads x {report['head_dim']} | {report['timer']}"
    )
    print(format_table(rows))
    print(f"wrote {args.out}")
    return report


def format_table(rows) -> str:
    header = (
        "topic",
        "tokens",
        "density",
        "provider",
        "ms",
        "TFLOP/s",
        "vs SDPA flash|best",
        "sparse eff flash|best",
        "rel err",
    )
    lines = [header]
    for r in rows:
        cells = (r["topic"], str(r["tokens"]), fmt(r.get("density"), ".3f"), r["provider"])
        if "error" in r:
            lines.append((*cells, "error: " + r["error"][:80], "", "", "", ""))
            continue
        speed = fmt(r["tflops"], ".1f") if "tflops" in r else fmt(r["gbps"], ".0f") + " GB/s"
        if "vs_torch" in r:
            ratio = fmt(r["vs_torch"], ".2f") + "x torch"
        else:
            ratio = _pair(r, "vs_sdpa", "vs_best_sdpa", "x")
        efficiency = _pair(r, "sparse_eff", "sparse_eff_best_sdpa", "")
        lines.append((*cells, fmt(r["ms"], ".3f"), speed, ratio, efficiency, fmt(r.get("rel_err"), ".2e")))
    return align(lines)


def _pair(row, flash_key, best_key, unit):
    if flash_key not in row and best_key not in row:
        return ""
    return f"{fmt(row.get(flash_key), '.2f')}{unit}|{fmt(row.get(best_key), '.2f')}{unit}"


if __name__ == "__main__":
    main()
