"""Tile sweep for the attention kernel on the GPU (not a test): times each (BLOCK_M, BLOCK_N,
num_warps, num_stages) candidate for dense and block-sparse calls against SDPA flash in the same
run, checks each output, and writes benchmarks/results/attention_tuning.json. The winners go into
``_pick_tiles`` in kernels/attention.py.

    python benchmarks/tune_attention.py [--tokens 32760 75600] [--density 0.1]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import vidaccel.kernels.attention as kattn
from vidaccel import ops

# (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA for K/V)
CANDIDATES = {
    128: [(128, 128, 8, 3, True), (128, 128, 8, 3, False), (128, 128, 8, 2, True), (128, 64, 8, 3, True),
          (64, 64, 4, 3, True)],
    64: [(128, 128, 4, 3, False), (128, 128, 4, 3, True), (128, 64, 8, 3, False), (64, 64, 4, 3, False)],
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def sweep(seq, heads, dim, density):
    rows = []
    q, k, v = (torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * seq * seq * heads * dim
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # diffusers' call: strided [B, H, S, D]
    qc, kc, vc = (t.contiguous() for t in (qt, kt, vt))  # SDPA's best case: contiguous [B, H, S, D]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = sdpa(qt, kt, vt).transpose(1, 2).float()
        t_strided = bench(lambda: sdpa(qt, kt, vt))
        t_sdpa = bench(lambda: sdpa(qc, kc, vc))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = bench(lambda: sdpa(qc, kc, vc))
    rows.append(dict(kind="sdpa-cudnn", dim=dim, tokens=seq, ms=t_cudnn, tflops=flops / t_cudnn * 1e-9))
    rows.append(dict(kind="sdpa-strided", dim=dim, tokens=seq, ms=t_strided, tflops=flops / t_strided * 1e-9))
    rows.append(dict(kind="sdpa", dim=dim, tokens=seq, ms=t_sdpa, tflops=flops / t_sdpa * 1e-9))
    print(rows[-2:], flush=True)
    n_blocks = triton.cdiv(seq, 128)
    plan = ops.plan_blocks(torch.rand(1, heads, n_blocks, n_blocks, device="cuda") < density, (128, 128))
    bias = torch.randn(1, heads, seq, device="cuda")
    for *tiles, tma in CANDIDATES[dim]:
        tiles = tuple(tiles)
        kattn._pick_tiles = lambda q_, plan_, tiles=tiles, tma=tma: (*tiles, tma)
        try:
            t0 = time.time()
            out = ops.attention(q, k, v, backend="triton")
            compile_s = time.time() - t0
            err = float((out.float() - ref).norm() / ref.norm())
            ms = bench(lambda: ops.attention(q, k, v, backend="triton"))
            bias_ms = bench(lambda: ops.attention(q, k, v, key_bias=bias, backend="triton"))
            sparse_ms = bench(lambda: ops.attention(q, k, v, plan=plan, backend="triton"))
        except Exception as exc:  # a tile that does not fit shared memory: record and go on
            rows.append(dict(kind="ours", dim=dim, tokens=seq, tiles=tiles, tma=tma, error=repr(exc)[:300]))
            print(rows[-1], flush=True)
            continue
        rows.append(dict(
            kind="ours", dim=dim, tokens=seq, tiles=tiles, tma=tma, ms=ms, tflops=flops / ms * 1e-9,
            vs_sdpa=t_sdpa / ms, vs_sdpa_strided=t_strided / ms, rel_err_vs_sdpa=err, compile_s=compile_s,
            bias_ms=bias_ms, sparse_ms=sparse_ms, density=plan.density(),
            sparse_efficiency=t_sdpa * plan.density() / sparse_ms,
        ))
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[32760, 75600])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results/attention_tuning.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for dim in args.dims:
        for seq in args.tokens if dim == 128 else args.tokens[:1]:
            rows += sweep(seq, args.heads, dim, args.density)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                    triton=triton.__version__, rows=rows), indent=1))
    print(f"{'D':>4} {'tokens':>7} {'provider':>30} {'ms':>8} {'TFLOP/s':>8} {'vs SDPA':>8} {'bias ms':>8} "
          f"{'rel err':>9} {'sparse eff':>10}")
    for r in rows:
        if "ms" in r:
            name = f"{r['tiles']} tma={int(r['tma'])}" if "tiles" in r else r["kind"]
            print(f"{r['dim']:>4} {r['tokens']:>7} {name:>30} {r['ms']:8.2f} {r['tflops']:8.1f} "
                  f"{r.get('vs_sdpa', 1.0):8.3f} {r.get('bias_ms', 0.0):8.2f} {r.get('rel_err_vs_sdpa', 0.0):9.2e} "
                  f"{r.get('sparse_efficiency', 0.0):10.3f}")


if __name__ == "__main__":
    main()
