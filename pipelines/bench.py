"""The benchmark scripts' harness: their shared options, device, environment record, report
writing and text tables, and :class:`Bench`, which times attention providers against each other on
one set of inputs (warm-up, median time, fidelity on a query subset).

Import it after choosing ``TRITON_INTERPRET`` (the benchmark scripts set it to 1 without CUDA before
anything imports triton). Protocol: ``shared/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import vidaccel
from vidaccel import ops
from vidaccel.kernels import attention_reference, merge_attention_reference
from vidaccel.metrics import relative_error

BLOCK = 128  # the block-sparse layouts' block size (queries and keys)
MIN_REPEATS = 5  # timed calls at least, after the warm-up
MEDIAN_REPEATS = 7  # timed calls of median_ms on CUDA


class Bench:
    """Runs each provider on one set of inputs: warm-up, median time, fidelity on a query subset."""

    def __init__(self, device, dtype, shapes, seed):
        self.device, self.dtype, self.shapes = device, dtype, shapes
        self.cuda = device.type == "cuda"
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.flex = flex_attention_provider(self.cuda)
        # cuDNN attention exists only on CUDA; flash is the protocol's baseline everywhere.
        self.sdpa_backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION)]
        if self.cuda:
            self.sdpa_backends.append(("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))

    def dense(self, tokens):
        q, k, v = self.qkv(tokens)
        q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, S, D] for the peers
        ref = self.reference(q, k, v)
        pairs = tokens * tokens * self.shapes["heads"]
        base = dict(topic="dense", tokens=tokens, density=1.0)

        def sdpa(backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)

        rows = [
            self.measure(dict(base, provider=name), lambda b=backend: sdpa(b), ref, pairs, layout="bhsd")
            for name, backend in self.sdpa_backends
        ]

        def ours():
            return ops.attention(q, k, v, backend="triton")

        rows.append(self.measure(dict(base, provider="vidaccel_triton"), ours, ref, pairs))
        baseline = sdpa_baseline(rows, tokens)
        return [with_ratios(row, baseline, 1.0) for row in rows]

    def sparse(self, tokens, target_density, baseline):
        q, k, v = self.qkv(tokens)
        q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        block_mask = self._random_layout(tokens, target_density)
        plan = ops.plan_blocks(block_mask, (BLOCK, BLOCK))
        density = plan.density()
        check = self._check_queries(tokens)
        ref = self.reference(
            q, k, v, plan=ops.plan_blocks(block_mask[:, :, : math.ceil(check / BLOCK)], (BLOCK, BLOCK))
        )
        pairs = kept_pairs(block_mask, tokens)
        base = dict(topic="sparse", tokens=tokens, density=density, target_density=target_density)

        rows = []
        ours = self.measure(
            dict(base, provider="vidaccel_triton"),
            lambda: ops.attention(q, k, v, plan=plan, backend="triton"),
            ref,
            pairs,
        )
        rows.append(with_ratios(ours, baseline, density))

        def flex(flex_fn, row, mask):
            row = self.measure(
                row, lambda: flex_fn(q_t, k_t, v_t, block_mask=mask), ref, pairs, layout="bhsd"
            )
            return with_ratios(row, baseline, density)

        rows.append(self.flex_row(base, lambda: flex_block_mask(block_mask, tokens), flex))
        return rows

    def flex_row(self, base: dict, make_mask, measure) -> dict:
        """The FlexAttention peer's row: ``make_mask()`` builds its BlockMask and ``measure(flex_attention,
        row, mask)`` times it; where FlexAttention or the mask cannot run here, the row says why (a
        peer that cannot run is reported, not fatal)."""
        flex_fn, flex_note = self.flex
        row = dict(base, provider="flex_attention", mode=flex_note)
        if flex_fn is None:
            return dict(row, error=flex_note)
        try:
            mask = make_mask()
        except Exception as exc:
            return dict(row, error=f"BlockMask: {type(exc).__name__}: {exc}")
        return measure(flex_fn, row, mask)

    def merge(self, tokens):
        heads, dim = self.shapes["heads"], self.shapes["head_dim"]
        out_a, out_b = (self.randn(1, tokens, heads, dim) for _ in range(2))
        lse_a, lse_b = (self.randn(1, heads, tokens, dtype=torch.float32) * 3 for _ in range(2))
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
                out, ms = self.timed(lambda fn=fn: fn()[0])
            except Exception as exc:
                rows.append(dict(row, error=f"{type(exc).__name__}: {exc}"))
                continue
            rows.append(dict(row, ms=ms, gbps=moved / ms * 1e-6, rel_err=relative_error(out, ref)))
        torch_ms = rows[-1].get("ms")
        if torch_ms and "ms" in rows[0]:
            rows[0]["vs_torch"] = torch_ms / rows[0]["ms"]
        return rows

    def measure(self, row, fn, ref, pairs, layout="bshd"):
        """Time ``fn`` and check its output's first queries against ``ref`` ([B, S, H, D], fp32)."""
        try:
            out, ms = self.timed(fn)
        except Exception as exc:
            return dict(row, error=f"{type(exc).__name__}: {exc}")
        if layout == "bhsd":
            out = out.transpose(1, 2)
        check = ref.shape[1]
        flops = 4 * self.shapes["head_dim"] * pairs
        return dict(row, ms=ms, tflops=flops / ms * 1e-9, rel_err=relative_error(out[:, :check], ref))

    def timed(self, fn):
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
        return out, cpu_median_ms(fn)

    def reference(self, q, k, v, plan=None):
        check = self._check_queries(q.shape[1])
        return attention_reference(q[:, :check].float(), k.float(), v.float(), plan=plan)

    def _check_queries(self, tokens):
        return min(self.shapes["check_queries"], tokens)

    def qkv(self, tokens):
        shape = (1, tokens, self.shapes["heads"], self.shapes["head_dim"])
        return tuple(self.randn(*shape) for _ in range(3))

    def randn(self, *shape, dtype=None):
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


def cpu_median_ms(fn, repeats: int = MIN_REPEATS) -> float:
    """The median wall time in ms of ``repeats`` calls of ``fn`` (``time.perf_counter``)."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def sdpa_baseline(rows, tokens):
    """(SDPA-flash ms, fastest SDPA backend ms) measured at ``tokens``; None where none ran."""
    times = {
        r["provider"]: r["ms"]
        for r in rows
        if r["provider"].startswith("sdpa_") and r["tokens"] == tokens and "ms" in r
    }
    return times.get("sdpa_flash"), min(times.values(), default=None)


def with_ratios(row, baseline, density):
    """``row`` with its speed ratios against ``baseline`` (:func:`sdpa_baseline`): ``vs_sdpa`` and
    ``vs_best_sdpa``, and below full density the sparse efficiencies ``sparse_eff``(``_best_sdpa``)."""
    if "ms" not in row:
        return row
    for suffix, ms in zip(("", "_best_sdpa"), baseline, strict=True):
        if ms:
            row["vs_sdpa" if not suffix else "vs" + suffix] = ms / row["ms"]
            if density < 1.0:
                row["sparse_eff" + suffix] = ms * density / row["ms"]
    return row


def kept_pairs(block_mask, tokens) -> int:
    """Query-key pairs inside kept blocks, summed over heads (the last block may be ragged)."""
    sizes = torch.full((block_mask.shape[-1],), BLOCK, dtype=torch.float64, device=block_mask.device)
    sizes[-1] = tokens - BLOCK * (block_mask.shape[-1] - 1)
    return int(torch.einsum("bhqk,q,k->", block_mask.double(), sizes, sizes))


def flex_attention_provider(cuda):
    """(flex_attention callable or None, how it runs): compiled on CUDA, eager on CPU."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return None, f"unavailable: {exc}"
    if cuda:
        return torch.compile(flex_attention, dynamic=False), "compiled"
    return flex_attention, "eager (CPU)"


def flex_block_mask(block_mask, tokens):
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


def fmt(value, spec) -> str:
    """``value`` formatted with ``spec``; empty for ``None``."""
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
        "vidaccel": getattr(vidaccel, "__version__", dist_version()),
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


def write_report_and_table(path: Path, report: dict, table: str) -> None:
    """:func:`write_report`, the Markdown ``table`` beside it (``.md``), and the table printed."""
    write_report(path, report)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)


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


def dist_version(dist: str = "vidaccel") -> str:
    """The installed version of the distribution ``dist``, or ``"unknown"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def bench_ms(fn, device):
    """Warm-up call, then the median time in ms (do_bench with CUDA events; perf_counter on CPU)."""
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return out, triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return out, cpu_median_ms(fn)


def median_ms(fn, device, repeats: int = MEDIAN_REPEATS) -> float:
    """Median time in ms of ``repeats`` calls after two warm-ups (CUDA events; perf_counter on CPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats if device.type == "cuda" else 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def wall_ms(fn, device) -> float:
    """Wall time in ms of one synchronised call of ``fn``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def release(device) -> None:
    """Free what the last measurement left (Python garbage, the CUDA cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device) -> None:
    """Wait for the device (CUDA) to finish its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    """Start a new peak-memory measurement (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    """Peak allocated memory since :func:`reset_peak` (0 off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
