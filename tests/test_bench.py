"""The benchmark harness (``vidaccel.pipelines.bench``) and the rollout benchmark's workloads
(``vidaccel.pipelines.bench_caches``) on CPU: options and report paths, tables, the speed ratios, the
block-sparse pair count, the synthetic KV stream and the drifting denoising steps."""

import json
import math
from pathlib import Path

import pytest
import torch

from vidaccel.pipelines import bench, bench_caches


def test_options_and_report_paths(tmp_path):
    default = tmp_path / "results" / "x.json"
    parser = bench.bench_parser("Title line.\n\nMore.", default)
    assert parser.description == "Title line."
    args = bench.parse_bench_args(parser, [])
    assert args.out == default and not args.quick and args.seed == 0
    assert bench.parse_bench_args(parser, ["--quick"]).out == tmp_path / "results" / "x_quick.json"
    assert bench.parse_bench_args(parser, ["--quick", "--out", "y.json"]).out == Path("y.json")
    if torch.cuda.is_available():
        pytest.skip("the CPU's choices")
    with pytest.raises(SystemExit):  # without CUDA, only --quick runs
        bench.bench_device(parser, args)
    device, dtype = bench.bench_device(parser, bench.parse_bench_args(parser, ["--quick"]))
    assert (device.type, dtype) == ("cpu", torch.float32)
    report = bench.environment(device, True, dtype) | {"path": tmp_path}
    bench.write_report(default, report)
    written = json.loads(default.read_text())
    assert written["quick"] and written["dtype"] == "float32" and written["path"] == str(tmp_path)
    assert written["timer"].startswith("time.perf_counter")


def test_tables_and_ratios():
    assert bench.align([("a", "bb"), ("ccc", "d")]) == "a    bb\nccc  d"
    assert bench.fmt(None, ".2f") == "" and bench.fmt(1.234, ".2f") == "1.23"
    rows = [
        {"provider": "sdpa_flash", "tokens": 8, "ms": 4.0},
        {"provider": "sdpa_cudnn", "tokens": 8, "ms": 2.0},
        {"provider": "sdpa_flash", "tokens": 9, "ms": 1.0},
        {"provider": "sdpa_math", "tokens": 8, "error": "no"},
    ]
    baseline = bench.sdpa_baseline(rows, 8)
    assert baseline == (4.0, 2.0) and bench.sdpa_baseline(rows, 7) == (None, None)
    row = bench.with_ratios({"ms": 1.0}, baseline, 0.25)
    assert row == {
        "ms": 1.0,
        "vs_sdpa": 4.0,
        "sparse_eff": 1.0,
        "vs_best_sdpa": 2.0,
        "sparse_eff_best_sdpa": 0.5,
    }
    assert bench.with_ratios({"error": "x"}, baseline, 0.5) == {"error": "x"}


def test_kept_pairs_counts_the_ragged_last_block():
    tokens = bench.BLOCK + 10  # two blocks, the last of 10 tokens
    mask = torch.tensor([[True, False], [True, True]])[None, None]
    assert bench.kept_pairs(mask, tokens) == bench.BLOCK**2 + 10 * bench.BLOCK + 10 * 10


def test_redundant_stream_pans_one_column_a_frame():
    stream = bench_caches.RedundantStream((3, 4), 2, 8, 0.0, torch.device("cpu"), torch.float32)
    peeked = stream.peek(2)
    k, v = stream.next(2)
    assert torch.equal(peeked[0], k) and torch.equal(peeked[1], v) and k.shape == (1, 2 * 12, 2, 8)
    frames = k.view(2, 3, 4, 2, 8)
    assert torch.equal(torch.roll(frames[0], 1, dims=1), frames[1]), "frame t+1 is frame t one column on"
    steps = bench_caches.drifting_steps(k, k, v, 0.1)
    assert len(steps) == len(bench_caches.STEPS) and steps[0][0] is k
    cosine = torch.nn.functional.cosine_similarity(steps[0][0].flatten(), steps[1][0].flatten(), dim=0)
    assert math.isclose(float(cosine), math.sqrt(0.9), abs_tol=0.05)
    times = []
    assert bench_caches.median_ms(lambda: times.append(1), torch.device("cpu"), repeats=3) >= 0
    assert len(times) == 4  # two warm-ups, then two timed calls on CPU
