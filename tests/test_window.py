"""FreeSwim's inward window: the mask against METHODS.md, the tiled plan, and the kernel against dense
attention with the explicit mask (CPU lane: the kernel under TRITON_INTERPRET=1, fp32/fp16)."""

import math

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err

from vidaccel import FreeSwimConfig, ops
from vidaccel.kernels.window import plan_window, window_attention_reference, window_mask_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (grid, half_window, tiles): grids that are not multiples of the tiles; full (unmasked) key tiles in
# the second and third (the third's window covers the rows but not the columns); different query
# and key tiles in the fourth; d = 0 in the last.
CASES = {
    "t2-9x13-d2x3-q4x8-k4x8": ((2, 9, 13), (2, 3), ((4, 8), (4, 8))),
    "t1-12x20-d4x6-q4x8-k2x8": ((1, 12, 20), (4, 6), ((4, 8), (2, 8))),
    "t2-5x13-d3x4-q4x4-k4x4": ((2, 5, 13), (3, 4), ((4, 4), (4, 4))),
    "t2-7x11-d1x4-q2x8-k4x4": ((2, 7, 11), (1, 4), ((2, 8), (4, 4))),
    "t2-5x6-d0x0-q2x8-k4x4": ((2, 5, 6), (0, 0), ((2, 8), (4, 4))),
}
# fp16 (and bf16 on the GPU) on one case with full and boundary tiles; fp32 on all.
DTYPE_CASES = [(case, torch.float32) for case in CASES] + [
    ("t1-12x20-d4x6-q4x8-k2x8", dtype) for dtype in DTYPES if dtype != torch.float32
]


def _coords(grid):
    frames, height, width = grid
    token = torch.arange(frames * height * width)
    return (token // width) % height, token % width


@pytest.mark.parametrize("grid", [(1, 9, 13), (2, 31, 53), (1, 40, 7), (2, 4, 5)], ids=str)
def test_mask_is_the_inward_window_at_every_position(grid):
    """METHODS.md's definition, literally, against the clamped window: each query sees exactly
    (2d_h+1)(2d_w+1) keys per frame (the whole frame on an axis shorter than the window), its own
    position among them, and at the borders the window is shifted inward, not truncated."""
    half = (15, 26) if grid[1] == 31 else (2, 3)
    frames, height, width = grid
    mask = window_mask_reference(grid, half)
    rows, cols = _coords(grid)
    span_h, span_w = min(2 * half[0] + 1, height), min(2 * half[1] + 1, width)
    assert torch.equal(mask.sum(-1), torch.full((mask.shape[0],), frames * span_h * span_w))
    assert mask.diagonal().all()
    start_h = (rows - half[0]).clamp(0, max(height - 1 - 2 * half[0], 0))
    start_w = (cols - half[1]).clamp(0, max(width - 1 - 2 * half[1], 0))
    expected = (
        (rows >= start_h[:, None])
        & (rows < (start_h + span_h)[:, None])
        & (cols >= start_w[:, None])
        & (cols < (start_w + span_w)[:, None])
    )
    assert torch.equal(mask, expected)
    # The corner query sees the corner block of the frame, in every frame.
    first = mask[0].view(frames, height, width)
    assert first[:, :span_h, :span_w].all() and first.sum() == frames * span_h * span_w


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_lists_every_visible_key_tile_and_masks_only_boundaries(case):
    """Token pairs the plan computes cover the window; pairs in full (unmasked) tiles are all visible;
    every token sits in exactly one query tile and one key tile."""
    grid, half, tiles = case
    frames, height, width = grid
    plan = plan_window(grid, half, tiles)
    frame_mask = window_mask_reference((1, height, width), half)  # [HW, HW]
    for rows, cols in ((plan.q_rows, plan.q_cols), (plan.k_rows, plan.k_cols)):
        tokens = (rows * width + cols)[rows >= 0]
        assert torch.equal(tokens.sort().values, torch.arange(height * width, dtype=tokens.dtype))
    listed = torch.zeros(height * width, height * width, dtype=torch.bool)
    for i in range(plan.q_rows.shape[0]):
        q_tok = (plan.q_rows[i] * width + plan.q_cols[i])[plan.q_rows[i] >= 0]
        for j, k_tile in enumerate(plan.kv_tiles[i, : plan.group_counts[i].sum()].tolist()):
            k_tok = (plan.k_rows[k_tile] * width + plan.k_cols[k_tile])[plan.k_rows[k_tile] >= 0]
            listed[q_tok[:, None], k_tok[None, :]] = True
            if j < plan.group_counts[i, 0]:
                assert len(k_tok) == plan.block_size[1] and frame_mask[q_tok[:, None], k_tok[None, :]].all()
    assert not (frame_mask & ~listed).any()


def test_plan_at_1088x1920_tiles_without_padding_and_is_block_aligned():
    """Wan at 1088×1920×81: 64 tiles of 128 tokens per 68×120 frame (8,160 tokens), and a computed
    density near the block-aligned limit METHODS.md gives (≈ 32% of the dense pairs)."""
    plan = plan_window((21, 68, 120), (15, 26))
    assert plan.q_rows.shape == (64, 128) and int((plan.q_rows >= 0).sum()) == 68 * 120
    assert 0.30 < plan.density() < 0.33
    assert 0.0 < plan.masked_fraction() < 1.0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name, dtype", DTYPE_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in DTYPE_CASES])
def test_window_attention_equals_dense_with_the_explicit_mask(name, dtype, backend, poison_empty):
    grid, half, tiles = CASES[name]
    batch, heads = (2, 1) if grid[1] == 9 else (1, 2)
    seq = math.prod(grid)
    q, k, v = (torch.randn(batch, seq, heads, 64, device=DEVICE, dtype=dtype) for _ in range(3))
    out, lse = ops.window_attention(
        q, k, v, grid=grid, half_window=half, scale=0.2, return_lse=True, backend=backend, tiles=tiles
    )
    ref, ref_lse = masked_attention_fp64(q, k, v, scale=0.2, mask=window_mask_reference(grid, half, DEVICE))
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, heads, seq)
    assert rel_err(out, ref) <= TOL[dtype]
    assert float((lse.double() - ref_lse).abs().max()) <= LSE_TOL[dtype] * 5


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_head_dim_128_and_strided_inputs(backend):
    grid, half = (1, 6, 10), (1, 2)
    qkv = torch.randn(1, math.prod(grid), 3, 2, 128, device=DEVICE)
    q, k, v = qkv.unbind(2)  # strided views, as fused projections give
    out = ops.window_attention(q, k, v, grid=grid, half_window=half, backend=backend, tiles=((2, 8), (4, 4)))
    ref, _ = masked_attention_fp64(q, k, v, mask=window_mask_reference(grid, half, DEVICE))
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("half", [(2, 3), (5, 9)], ids=["exact-cover", "larger"])
def test_window_covering_the_grid_is_dense_attention(half):
    grid = (2, 5, 7)
    q, k, v = (torch.randn(1, math.prod(grid), 2, 64, device=DEVICE) for _ in range(3))
    out, lse = ops.window_attention(q, k, v, grid=grid, half_window=half, return_lse=True)
    ref, ref_lse = ops.attention(q, k, v, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert window_mask_reference(grid, half).all()


def test_reference_chunks_queries_exactly(monkeypatch):
    import vidaccel.kernels.window as window

    grid, half = (2, 6, 9), (1, 2)
    q, k, v = (torch.randn(1, math.prod(grid), 2, 16, dtype=torch.float64) for _ in range(3))
    whole = window_attention_reference(q, k, v, grid=grid, half_window=half, return_lse=True)
    monkeypatch.setattr(window, "_SCORE_BYTES", 8 * 2 * 108 * 7)  # 7 queries per chunk
    chunked = window_attention_reference(q, k, v, grid=grid, half_window=half, return_lse=True)
    assert torch.allclose(whole[0], chunked[0], atol=1e-12) and torch.allclose(
        whole[1], chunked[1], atol=1e-12
    )


def test_head_dim_the_kernel_cannot_serve_runs_the_reference():
    grid, half = (1, 6, 9), (1, 2)
    q, k, v = (torch.randn(1, 54, 2, 24, device=DEVICE) for _ in range(3))
    if ON_GPU:
        with pytest.warns(UserWarning, match="head dim 24"):
            out = ops.window_attention(q, k, v, grid=grid, half_window=half)
    else:
        out = ops.window_attention(q, k, v, grid=grid, half_window=half, backend="reference")
    ref, _ = masked_attention_fp64(q, k, v, mask=window_mask_reference(grid, half, DEVICE))
    assert rel_err(out, ref) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="head dim 24"):
        ops.window_attention(q, k, v, grid=grid, half_window=half, backend="triton")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid=(1, 6, 8)), "grid"),
        (dict(grid=(1, 6)), "grid must be three"),
        (dict(half_window=(-1, 2)), "half_window"),
        (dict(half_window=(1,)), "half_window"),
        (dict(scale=0.0), "scale"),
        (dict(tiles=((4, 8),)), "tiles"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    q = torch.randn(1, 54, 1, 64)
    args = dict(grid=(1, 6, 9), half_window=(1, 2)) | kwargs
    with pytest.raises(ValueError, match=match):
        ops.window_attention(q, q, q, **args)


def test_temperature_scale():
    config = FreeSwimConfig()
    assert config.window == (15, 26)
    assert config.attention_scale(68 * 120, 128) == pytest.approx(
        math.sqrt(math.log(8160) / math.log(1560) / 128)
    )
    assert FreeSwimConfig(target_tokens=3120).attention_scale(8160, 128) == pytest.approx(
        math.sqrt(math.log(3120) / math.log(1560) / 128)
    )
    assert (
        config.attention_scale(1560, 128) is None
        and FreeSwimConfig(temperature=False).attention_scale(8160, 64) is None
    )


@pytest.mark.gpu
def test_gpu_bf16_at_a_wan_like_grid():
    """bf16 on a 21×34×60 grid (a quarter of 1088×1920) with Wan's 480p half-window, default tiles."""
    grid, half = (21, 34, 60), (15, 26)
    q, k, v = (torch.randn(1, math.prod(grid), 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = ops.window_attention(q, k, v, grid=grid, half_window=half, return_lse=True, backend="triton")
    ref, ref_lse = window_attention_reference(q, k, v, grid=grid, half_window=half, return_lse=True)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    assert float((lse - ref_lse).abs().max()) <= 0.05
