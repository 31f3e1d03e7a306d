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

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Set before anything imports triton, so the kernels can run in the interpreter on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import vidaccel  # noqa: E402
from vidaccel import ops  # noqa: E402
from vidaccel.kernels import attention_reference, merge_attention_reference  # noqa: E402
from vidaccel.metrics import relative_error  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "attention.json"
BLOCK = 128
FULL = dict(heads=12, head_dim=128, dense_tokens=(32760, 75600), sparse_tokens=32760, check_queries=1024)
# Quick: a ragged last block at every size, and few enough programs for the interpreter.
QUICK_GPU = dict(heads=2, head_dim=128, dense_tokens=(4000,), sparse_tokens=4000, check_queries=512)
QUICK_CPU = dict(heads=1, head_dim=64, dense_tokens=(1200,), sparse_tokens=1200, check_queries=256)
DENSITIES = (0.05, 0.10, 0.20, 0.40)
MIN_REPEATS = 5


def main(argv=None) -> dict:
    parser = bench_parser(__doc__, DEFAULT_OUT)
    args = parse_bench_args(parser, argv)

    device, dtype = bench_device(parser, args)
    shapes = FULL if not args.quick else QUICK_GPU if device.type == "cuda" else QUICK_CPU

    bench = Bench(device, dtype, shapes, args.seed)
    rows = []
    for tokens in shapes["dense_tokens"]:
        rows += bench.dense(tokens)
    baseline = _sdpa_baseline(rows, shapes["sparse_tokens"])
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


class Bench:
    """Runs each provider on one set of inputs: warm-up, median time, fidelity on a query subset."""

    def __init__(self, device, dtype, shapes, seed):
        self.device, self.dtype, self.shapes = device, dtype, shapes
        self.cuda = device.type == "cuda"
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.flex = _flex(self.cuda)
        # cuDNN attention exists only on CUDA; flash is the protocol's baseline everywhere.
        self.sdpa_backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION)]
        if self.cuda:
            self.sdpa_backends.append(("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))

    def dense(self, tokens):
        q, k, v = self._qkv(tokens)
        q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, S, D] for the peers
        ref = self._reference(q, k, v)
        pairs = tokens * tokens * self.shapes["heads"]
        base = dict(topic="dense", tokens=tokens, density=1.0)

        def sdpa(backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)

        rows = [
            self._measure(dict(base, provider=name), lambda b=backend: sdpa(b), ref, pairs, layout="bhsd")
            for name, backend in self.sdpa_backends
        ]

        def ours():
            return ops.attention(q, k, v, backend="triton")

        rows.append(self._measure(dict(base, provider="vidaccel_triton"), ours, ref, pairs))
        baseline = _sdpa_baseline(rows, tokens)
        return [_with_ratios(row, baseline, 1.0) for row in rows]

    def sparse(self, tokens, target_density, baseline):
        q, k, v = self._qkv(tokens)
        q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        block_mask = self._random_layout(tokens, target_density)
        plan = ops.plan_blocks(block_mask, (BLOCK, BLOCK))
        density = plan.density()
        check = self._check_queries(tokens)
        ref = self._reference(
            q, k, v, plan=ops.plan_blocks(block_mask[:, :, : math.ceil(check / BLOCK)], (BLOCK, BLOCK))
        )
        pairs = _kept_pairs(block_mask, tokens)
        base = dict(topic="sparse", tokens=tokens, density=density, target_density=target_density)

        rows = []
        ours = self._measure(
            dict(base, provider="vidaccel_triton"),
            lambda: ops.attention(q, k, v, plan=plan, backend="triton"),
            ref,
            pairs,
        )
        rows.append(_with_ratios(ours, baseline, density))
        flex_fn, flex_note = self.flex
        flex_base = dict(base, provider="flex_attention", mode=flex_note)
        if flex_fn is None:
            rows.append(dict(flex_base, error=flex_note))
        else:
            try:
                flex_mask = _flex_block_mask(block_mask, tokens)
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                rows.append(dict(flex_base, error=f"BlockMask: {type(exc).__name__}: {exc}"))
            else:
                row = self._measure(
                    flex_base, lambda: flex_fn(q_t, k_t, v_t, block_mask=flex_mask), ref, pairs, layout="bhsd"
                )
                rows.append(_with_ratios(row, baseline, density))
        return rows

    def merge(self, tokens):
        heads, dim = self.shapes["heads"], self.shapes["head_dim"]
        out_a, out_b = (self._randn(1, tokens, heads, dim) for _ in range(2))
        lse_a, lse_b = (self._randn(1, heads, tokens, dtype=torch.float32) * 3 for _ in range(2))
        ref, _ = merge_attention_reference(out_a.float(), lse_a, out_b.float(), lse_b)
        elem = out_a.element_size()
        moved = 3 * tokens * heads * dim * elem + 3 * tokens * heads * 4  # read 2 outs + 2 LSEs, write 1 + 1

        def torch_merge():
            lse = torch.logaddexp(lse_a, lse_b)
            w_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
            w_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
            return (w_a * out_a + w_b * out_b).to(out_a.dtype), lse

        rows = []
        for provider, fn in (
            ("vidaccel_triton", lambda: ops.merge_attention(out_a, lse_a, out_b, lse_b, backend="triton")),
            ("torch_eager", torch_merge),
        ):
            row = dict(topic="merge", tokens=tokens, provider=provider)
            try:
                out, ms = self._time(lambda fn=fn: fn()[0])
            except Exception as exc:
                rows.append(dict(row, error=f"{type(exc).__name__}: {exc}"))
                continue
            rows.append(dict(row, ms=ms, gbps=moved / ms * 1e-6, rel_err=relative_error(out, ref)))
        torch_ms = rows[-1].get("ms")
        if torch_ms and "ms" in rows[0]:
            rows[0]["vs_torch"] = torch_ms / rows[0]["ms"]
        return rows

    def _measure(self, row, fn, ref, pairs, layout="bshd"):
        """Time ``fn`` and check its output's first queries against ``ref`` ([B, S, H, D], fp32)."""
        try:
            out, ms = self._time(fn)
        except Exception as exc:
            return dict(row, error=f"{type(exc).__name__}: {exc}")
        if layout == "bhsd":
            out = out.transpose(1, 2)
        check = ref.shape[1]
        flops = 4 * self.shapes["head_dim"] * pairs
        return dict(row, ms=ms, tflops=flops / ms * 1e-9, rel_err=relative_error(out[:, :check], ref))

    def _time(self, fn):
        """Warm up (compiles), then the median time in ms over at least ``MIN_REPEATS`` timed calls;
        returns (output of the warm-up call, ms)."""
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            estimate = start.elapsed_time(stop)
            rep = max(200.0, MIN_REPEATS * 2 * estimate)  # do_bench sizes its repeats from ``rep`` ms
            return out, triton.testing.do_bench(
                fn, warmup=max(25.0, 2 * estimate), rep=rep, return_mode="median"
            )
        times = []
        for _ in range(MIN_REPEATS):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
        return out, statistics.median(times)

    def _reference(self, q, k, v, plan=None):
        check = self._check_queries(q.shape[1])
        return attention_reference(q[:, :check].float(), k.float(), v.float(), plan=plan)

    def _check_queries(self, tokens):
        return min(self.shapes["check_queries"], tokens)

    def _qkv(self, tokens):
        shape = (1, tokens, self.shapes["heads"], self.shapes["head_dim"])
        return tuple(self._randn(*shape) for _ in range(3))

    def _randn(self, *shape, dtype=None):
        return torch.randn(*shape, device=self.device, dtype=dtype or self.dtype, generator=self.generator)

    def _random_layout(self, tokens, density):
        """Bool ``[1, H, nq, nk]``: every query block keeps ``round(density·nk)`` (≥ 1) random key blocks."""
        n_blocks = triton.cdiv(tokens, BLOCK)
        keep = max(1, round(density * n_blocks))
        scores = torch.rand(
            1, self.shapes["heads"], n_blocks, n_blocks, device=self.device, generator=self.generator
        )
        chosen = scores.argsort(dim=-1)[..., :keep]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        return mask.scatter_(-1, chosen, True)


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
        cells = (r["topic"], str(r["tokens"]), _fmt(r.get("density"), ".3f"), r["provider"])
        if "error" in r:
            lines.append((*cells, "error: " + r["error"][:80], "", "", "", ""))
            continue
        speed = _fmt(r["tflops"], ".1f") if "tflops" in r else _fmt(r["gbps"], ".0f") + " GB/s"
        if "vs_torch" in r:
            ratio = _fmt(r["vs_torch"], ".2f") + "x torch"
        else:
            ratio = _pair(r, "vs_sdpa", "vs_best_sdpa", "x")
        efficiency = _pair(r, "sparse_eff", "sparse_eff_best_sdpa", "")
        lines.append((*cells, _fmt(r["ms"], ".3f"), speed, ratio, efficiency, _fmt(r.get("rel_err"), ".2e")))
    return align(lines)


def _pair(row, flash_key, best_key, unit):
    if flash_key not in row and best_key not in row:
        return ""
    return f"{_fmt(row.get(flash_key), '.2f')}{unit}|{_fmt(row.get(best_key), '.2f')}{unit}"


def _sdpa_baseline(rows, tokens):
    """(SDPA-flash ms, fastest SDPA backend ms) measured at ``tokens``; None where none ran."""
    times = {
        r["provider"]: r["ms"]
        for r in rows
        if r["provider"].startswith("sdpa_") and r["tokens"] == tokens and "ms" in r
    }
    return times.get("sdpa_flash"), min(times.values(), default=None)


def _with_ratios(row, baseline, density):
    if "ms" not in row:
        return row
    for suffix, ms in zip(("", "_best_sdpa"), baseline, strict=True):
        if ms:
            row["vs_sdpa" if not suffix else "vs" + suffix] = ms / row["ms"]
            if density < 1.0:
                row["sparse_eff" + suffix] = ms * density / row["ms"]
    return row


def _kept_pairs(block_mask, tokens) -> int:
    """Query-key pairs inside kept blocks, summed over heads (the last block may be ragged)."""
    sizes = torch.full((block_mask.shape[-1],), BLOCK, dtype=torch.float64, device=block_mask.device)
    sizes[-1] = tokens - BLOCK * (block_mask.shape[-1] - 1)
    return int(torch.einsum("bhqk,q,k->", block_mask.double(), sizes, sizes))


def _flex(cuda):
    """(flex_attention callable or None, how it runs): compiled on CUDA, eager on CPU."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return None, f"unavailable: {exc}"
    if cuda:
        return torch.compile(flex_attention, dynamic=False), "compiled"
    return flex_attention, "eager (CPU)"


def _flex_block_mask(block_mask, tokens):
    """FlexAttention BlockMask of the same layout, every kept block a full block.

    The compiled kernel skips ``mask_mod`` on full blocks, so the block lists alone set what it
    computes; the eager (unfused) path ignores the block lists and evaluates ``mask_mod`` densely,
    so ``mask_mod`` states the same layout token by token.
    """
    from torch.nn.attention.flex_attention import BlockMask

    counts = block_mask.sum(-1, dtype=torch.int32)  # [B, H, nq]
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return block_mask[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        torch.zeros_like(order),
        counts,
        order,
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(tokens, tokens),
    )


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def environment(device: torch.device, quick: bool, dtype: torch.dtype) -> dict:
    """The fields every benchmark report starts with: date, device, versions, timer, dtype."""
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "vidaccel": getattr(vidaccel, "__version__", _dist_version()),
        "python": sys.version.split()[0],
        "quick": quick,
        "timer": "triton.testing.do_bench median (CUDA events)"
        if cuda
        else "time.perf_counter median (CPU smoke run)",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "dtype": str(dtype).removeprefix("torch."),
    }


def bench_device(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a benchmark run: CUDA in bf16, or (``--quick`` only) the CPU in fp32, where
    the interpreter's bf16 dot is not exact. TF32 is switched off so that fp32 references are real fp32."""
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        parser.error("the full benchmark needs a CUDA GPU; on CPU run --quick (checks code paths only)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32


def write_report(path: Path, report: dict) -> None:
    """Write a benchmark report as indented JSON (values JSON cannot hold as their ``str``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def bench_parser(doc: str, default_out: Path) -> argparse.ArgumentParser:
    """The options every benchmark script takes (``--quick``, ``--out``, ``--seed``); a script adds its own
    and parses with :func:`parse_bench_args`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of every code path")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON results (default {default_out})")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(default_out=default_out)
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv``; ``args.out`` is resolved by :func:`results_path`."""
    args = parser.parse_args(argv)
    args.out = results_path(args.out, args.default_out, args.quick)
    return args


def results_path(out: Path | None, default: Path, quick: bool) -> Path:
    """Where a report goes: ``--out`` if given, else ``default``, or ``<stem>_quick.json`` beside it for a
    ``--quick`` smoke run, so that a smoke run never overwrites the measured results."""
    if out is not None:
        return out
    return default.with_name(f"{default.stem}_quick{default.suffix}") if quick else default


def align(lines: list[tuple[str, ...]]) -> str:
    """Rows of cells (the header first) as left-aligned text columns."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _dist_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vidaccel")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
