"""Inward sliding-window attention over a (T, H, W) token grid (FreeSwim), block-aligned in 2-D tiles.

The window (METHODS.md, FreeSwim): a query at row ``q_h``, column ``q_w`` sees the keys of every frame
whose row lies in ``[s_h, s_h + 2 d_h]`` and whose column lies in ``[s_w, s_w + 2 d_w]``, with the
window start ``s = clamp(q - d, 0, max(n - 1 - 2 d, 0))``: near a border the window is shifted inward,
not truncated, so every query sees ``(2 d_h + 1)(2 d_w + 1)`` keys per frame when the grid is large
enough (and the whole frame when it is not).

Execution: each frame is cut into rectangular spatial tiles (default 8 × 16 = 128 tokens; tiles at the
right and bottom borders are clipped). A tile's tokens are the slots of one kernel block; the slot →
(row, column) tables are the token permutation, applied inside the kernel by gathered loads, so q, k,
v and the output stay in diffusers' raster order and no permuted copy is made. For each query tile the
planner lists the key tiles its union of windows touches, split into *full* tiles (complete and inside
every query's window: no mask) and *boundary* tiles (the window predicate is evaluated per element from
the token coordinates). All frames are visible, so one spatial list serves every frame: the kernel
walks ``frames × list``.

Layers (house style): ``_window_attention_kernel`` (Triton), ``window_attention_fwd`` (launcher),
``window_attention_reference`` (pure PyTorch, fp32 math, the CPU fallback and test oracle), and the
planner :func:`plan_window`. The public entry point is :func:`vidaccel.ops.window_attention`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "DEFAULT_TILES",
    "WindowPlan",
    "plan_window",
    "unsupported_reason",
    "window_attention_fwd",
    "window_attention_reference",
    "window_covers_grid",
    "window_mask_reference",
    "window_starts",
]

DEFAULT_TILES = ((8, 16), (8, 16))
"""(query tile, key tile) as (rows, columns) of one frame, 128 tokens each: at 1088×1920 (grid 68×120,
half-window 15×26) 32.3% of the dense pairs are computed, 76% of the visited key tiles with a mask
on one or both axes. ``benchmarks/bench_window.py`` times the alternatives."""

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Upper bound on the fp32 score matrix one query chunk of the reference materialises.
_SCORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class WindowPlan:
    """The block-aligned execution plan of one window layout, planned once and reused by every call.

    Attributes:
        grid: token grid ``(T, H, W)``.
        half_window: ``(d_h, d_w)``.
        q_tile, k_tile: ``(rows, columns)`` of a query tile and a key tile.
        q_rows, q_cols: int32 ``[n_q_tiles, q_rows * q_cols]``, the row and column of each slot of each
            spatial query tile, ``-1`` for the empty slots of clipped border tiles.
        k_rows, k_cols: the same for key tiles ``[n_k_tiles, k_rows * k_cols]``.
        k_tokens: int32 ``[n_k_tiles, k_rows * k_cols]``, each key slot's token within its frame
            (``row * W + col``; 0 for an empty slot, which every mask drops).
        kv_tiles: int32 ``[n_q_tiles, max_listed]``: row ``i`` lists the key tiles query tile ``i``
            visits, in four groups of ``group_counts[i]`` entries: full tiles (complete and inside
            every query's window: no mask), tiles that need the column test only, the row test only,
            and both tests. Empty slots fail either test.
        group_counts: int32 ``[n_q_tiles, 4]``.
    """

    grid: tuple[int, int, int]
    half_window: tuple[int, int]
    q_tile: tuple[int, int]
    k_tile: tuple[int, int]
    q_rows: torch.Tensor
    q_cols: torch.Tensor
    k_rows: torch.Tensor
    k_cols: torch.Tensor
    k_tokens: torch.Tensor
    kv_tiles: torch.Tensor
    group_counts: torch.Tensor

    @property
    def block_size(self) -> tuple[int, int]:
        return self.q_tile[0] * self.q_tile[1], self.k_tile[0] * self.k_tile[1]

    def density(self) -> float:
        """Computed (query slot, key slot) pairs over the dense pairs ``S²`` (clipped border tiles
        count in full, as the kernel computes them)."""
        bq, bk = self.block_size
        frames, height, width = self.grid
        pairs = float(self.group_counts.double().sum()) * frames * frames * bq * bk
        return pairs / float(frames * height * width) ** 2

    def block_density(self) -> float:
        """Visited (query tile, key tile) pairs over all tile pairs."""
        return float(self.group_counts.double().sum()) / (self.q_rows.shape[0] * self.k_rows.shape[0])

    def masked_fraction(self) -> float:
        """Share of the visited key tiles that need the per-element window mask."""
        listed = float(self.group_counts.double().sum())
        return 1.0 - float(self.group_counts[:, 0].double().sum()) / max(1.0, listed)


def window_starts(n: int, d: int, coords: torch.Tensor) -> torch.Tensor:
    """First visible row (or column) of the inward window of each coordinate in ``coords`` on an
    axis of ``n`` tokens with half-window ``d``: ``clamp(coords - d, 0, max(n - 1 - 2d, 0))``."""
    return (coords - d).clamp(min=0, max=max(n - 1 - 2 * d, 0))


def window_covers_grid(grid, half_window) -> bool:
    """True when every query's window is the whole frame (window attention is dense attention)."""
    _, height, width = grid
    return 2 * half_window[0] + 1 >= height and 2 * half_window[1] + 1 >= width


def window_mask_reference(grid, half_window, device=None) -> torch.Tensor:
    """Bool ``[S, S]`` (``S = T·H·W``, raster order): ``mask[i, j]`` iff query ``i`` sees key ``j``,
    written literally as METHODS.md defines it (d_b, d_u, d_r, d_l). For tests and small grids."""
    frames, height, width = grid
    d_h, d_w = half_window
    rows = torch.arange(height, device=device).repeat_interleave(width).repeat(frames)  # [S]
    cols = torch.arange(width, device=device).repeat(height * frames)
    d_b = (d_h - rows).clamp(min=0)
    d_u = (d_h + rows - height + 1).clamp(min=0)
    d_r = (d_w - cols).clamp(min=0)
    d_l = (d_w + cols - width + 1).clamp(min=0)
    row_ok = (rows[None, :] >= (rows - d_h - d_u)[:, None]) & (rows[None, :] <= (rows + d_h + d_b)[:, None])
    col_ok = (cols[None, :] >= (cols - d_w - d_l)[:, None]) & (cols[None, :] <= (cols + d_w + d_r)[:, None])
    return row_ok & col_ok


def plan_window(grid, half_window, tiles=DEFAULT_TILES, device="cpu") -> WindowPlan:
    """Plan the tiled execution of the inward window on ``grid = (T, H, W)``.

    ``tiles = ((q_rows, q_cols), (k_rows, k_cols))``: query and key tile shapes within one frame.
    Plans are cached per (grid, half_window, tiles, device): every layer and step reuses one.

    Example::

        plan = plan_window((21, 68, 120), (15, 26))
        plan.block_density(), plan.masked_fraction()
    """
    grid = tuple(int(g) for g in grid)
    half_window = tuple(int(d) for d in half_window)
    tiles = tuple(tuple(int(x) for x in tile) for tile in tiles)
    return _plan_window(grid, half_window, tiles, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _plan_window(grid, half_window, tiles, device) -> WindowPlan:
    _, height, width = grid
    d_h, d_w = half_window
    (qh, qw), (kh, kw) = tiles
    q_rows, q_cols, q_box = _tile_slots(height, width, qh, qw)
    k_rows, k_cols, k_box = _tile_slots(height, width, kh, kw)
    k_box = torch.tensor(k_box)  # [n_k, 4]: row0, row1, col0, col1 (inclusive)
    k_complete = (k_box[:, 1] - k_box[:, 0] + 1) * (k_box[:, 3] - k_box[:, 2] + 1) == kh * kw
    lists, counts = [], []
    for r0, r1, c0, c1 in q_box:
        s_h = window_starts(height, d_h, torch.arange(r0, r1 + 1))
        s_w = window_starts(width, d_w, torch.arange(c0, c1 + 1))
        union = (int(s_h.min()), int(s_h.max()) + 2 * d_h, int(s_w.min()), int(s_w.max()) + 2 * d_w)
        inner = (int(s_h.max()), int(s_h.min()) + 2 * d_h, int(s_w.max()), int(s_w.min()) + 2 * d_w)
        touched = (
            (k_box[:, 0] <= union[1])
            & (k_box[:, 1] >= union[0])
            & (k_box[:, 2] <= union[3])
            & (k_box[:, 3] >= union[2])
        )
        rows_in = (k_box[:, 0] >= inner[0]) & (k_box[:, 1] <= inner[1])
        cols_in = (k_box[:, 2] >= inner[2]) & (k_box[:, 3] <= inner[3])
        full = rows_in & cols_in & k_complete
        # A clipped tile inside the window still needs one test, to drop its empty slots.
        groups = (
            full,
            rows_in & ~cols_in,
            ~rows_in & cols_in | rows_in & cols_in & ~k_complete,
            ~rows_in & ~cols_in,
        )
        lists.append(torch.cat([(touched & group).nonzero()[:, 0] for group in groups]))
        counts.append([int((touched & group).sum()) for group in groups])
    counts = torch.tensor(counts, dtype=torch.int32)
    kv_tiles = torch.zeros(len(lists), max(1, int(counts.sum(1).max())), dtype=torch.int32)
    for i, row in enumerate(lists):
        kv_tiles[i, : len(row)] = row
    return WindowPlan(
        grid,
        half_window,
        (qh, qw),
        (kh, kw),
        q_rows.to(device),
        q_cols.to(device),
        k_rows.to(device),
        k_cols.to(device),
        torch.where(k_rows >= 0, k_rows * width + k_cols, 0).to(device),
        kv_tiles.to(device),
        counts.to(device),
    )


def _tile_slots(height: int, width: int, th: int, tw: int):
    """Cut an ``height × width`` frame into tiles of ``th · tw`` slots -> (rows, cols) int32
    ``[n, th·tw]`` (-1 for an empty slot) and each tile's box ``(row0, row1, col0, col1)``, inclusive.

    The frame's main part holds ``th × tw`` tiles. Rather than clip a whole column and a whole row of
    tiles at the right and bottom borders (13% empty slots at 68 × 120 with 8 × 16 tiles), the right
    strip (``W mod tw`` columns) is cut into narrower, taller tiles and the bottom strip (``H mod th``
    rows, full width) into flatter, wider ones, of the same slot count: at most one tile per strip is
    clipped. Slots run in raster order within each tile.
    """
    slots = th * tw
    main_h, main_w = height - height % th, width - width % tw
    boxes = []  # (row0, col0, tile columns, rows in frame, columns in frame)
    for r0 in range(0, main_h, th):
        boxes += [(r0, c0, tw, th, tw) for c0 in range(0, main_w, tw)]
    if width > main_w and main_h > 0:  # right strip
        sw = width - main_w
        tile_w = min(slots, 1 << (sw - 1).bit_length())
        tile_h = slots // tile_w
        boxes += [(r0, main_w, tile_w, min(tile_h, main_h - r0), sw) for r0 in range(0, main_h, tile_h)]
    if height > main_h:  # bottom strip, full width
        sh = height - main_h
        tile_h = min(slots, 1 << (sh - 1).bit_length())
        tile_w = slots // tile_h
        boxes += [(main_h, c0, tile_w, sh, min(tile_w, width - c0)) for c0 in range(0, width, tile_w)]
    local = torch.arange(slots)
    rows, cols = [], []
    for r0, c0, tile_w, n_r, n_c in boxes:
        r, c = local // tile_w, local % tile_w
        valid = (r < n_r) & (c < n_c)
        rows.append(torch.where(valid, r0 + r, -1))
        cols.append(torch.where(valid, c0 + c, -1))
    boxes = [(r0, r0 + n_r - 1, c0, c0 + n_c - 1) for r0, c0, _, n_r, n_c in boxes]
    return torch.stack(rows).to(torch.int32), torch.stack(cols).to(torch.int32), boxes


def window_attention_reference(q, k, v, *, grid, half_window, scale=None, return_lse=False):
    """Window attention in fp32 (fp64 for fp64 inputs): dense attention with the explicit window mask.

    Args:
        q, k: ``[B, S, H, D]``; v: ``[B, S, H, Dv]``; tokens in raster order over ``grid = (T, H, W)``
            (``S = T·H·W``).
        half_window: ``(d_h, d_w)``.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log LSE, fp32 ``[B, heads, S]``.

    Returns ``out`` ``[B, S, H, Dv]`` in q's dtype, or ``(out, lse)``. Queries are processed in chunks
    whose masks are built from token coordinates, so memory stays bounded on large grids.
    """
    batch, seq, heads, dim = q.shape
    frames, height, width = grid
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.to(math_dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    token = torch.arange(seq, device=q.device)
    rows, cols = (token // width) % height, token % width
    starts_h = window_starts(height, half_window[0], rows)
    starts_w = window_starts(width, half_window[1], cols)
    chunk = max(1, _SCORE_BYTES // max(1, qf.element_size() * batch * heads * seq))
    outs, lses = [], []
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        s_h, s_w = starts_h[start:stop, None], starts_w[start:stop, None]
        visible = (
            (rows >= s_h)
            & (rows <= s_h + 2 * half_window[0])
            & (cols >= s_w)
            & (cols <= s_w + 2 * half_window[1])
        )
        scores = torch.matmul(qf[:, :, start:stop], kf.transpose(-1, -2)) * scale  # [B, H, c, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), vf))
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=2).float()
    return out


# fmt: off
@triton.jit
def _window_keys(
    b_q, b_acc, b_l, b_m, K, V, KTokens, KRows, KCols, p_list, count,
    frames, frame_tokens, b_sh, b_sw, span_h, span_w, stride_ks, stride_vs, qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TEST_ROWS: tl.constexpr,
    TEST_COLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax updates of a query tile with the ``count`` key tiles listed at ``p_list``, in
    every frame. ``TEST_ROWS`` / ``TEST_COLS``: apply the window test on that axis per element (a key
    row ``r`` is inside iff ``0 <= r - s_h <= span_h``, one unsigned compare); full tiles test nothing.
    ``K``/``V`` point at this batch and head; ``b_sh``/``b_sw`` [BM] are the queries' window starts.
    """
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    for it in range(0, frames * count):
        i_k = tl.load(p_list + it % count)
        b_tok = (it // count) * frame_tokens + tl.load(KTokens + i_k * BLOCK_N + o_n)  # [BN]
        b_k = tl.load(K + b_tok[None, :] * stride_ks + o_d[:, None])  # [D, BN]
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BM, BN], log2 domain
        if TEST_ROWS:
            b_kr = tl.load(KRows + i_k * BLOCK_N + o_n)  # -1 for an empty slot: fails the test
            m_r = (b_kr[None, :] - b_sh[:, None]).to(tl.uint32) <= span_h
            b_s = tl.where(m_r, b_s, float("-inf"))
        if TEST_COLS:
            b_kc = tl.load(KCols + i_k * BLOCK_N + o_n)
            m_c = (b_kc[None, :] - b_sw[:, None]).to(tl.uint32) <= span_w
            b_s = tl.where(m_c, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A row that has seen only masked keys keeps max -inf: subtract 0 there so exp2 gives 0, not NaN.
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.math.exp2(b_m - b_m_safe)
        b_p = tl.math.exp2(b_s - b_m_safe[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(V + b_tok[:, None] * stride_vs + o_d[None, :])  # [BN, D]
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
        b_m = b_m_new
    return b_acc, b_l, b_m


@triton.jit
def _window_attention_kernel(
    Q, K, V, Out, Lse,
    QRows, QCols, KTokens, KRows, KCols, KvTiles, GroupCounts,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_list,
    heads, frames, frame_tokens, width, n_q_tiles,
    half_h, half_w, max_start_h, max_start_w,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_tile = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    i_h = i_bh % heads
    i_t = i_tile // n_q_tiles  # the query tile's frame
    i_s = i_tile % n_q_tiles  # and its spatial tile

    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    b_qr = tl.load(QRows + i_s * BLOCK_M + o_m)  # [BM] row of each slot, -1 for an empty slot
    b_qc = tl.load(QCols + i_s * BLOCK_M + o_m)
    m_q = b_qr >= 0
    b_qtok = tl.where(m_q, i_t * frame_tokens + b_qr * width + b_qc, 0)
    # The inward window of each query: rows [s_h, s_h + 2 d_h], columns [s_w, s_w + 2 d_w].
    b_sh = tl.minimum(tl.maximum(b_qr - half_h, 0), max_start_h)
    b_sw = tl.minimum(tl.maximum(b_qc - half_w, 0), max_start_w)

    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    p_q = Q + i_b * stride_qb + i_h * stride_qh + b_qtok[:, None] * stride_qs + o_d[None, :]
    b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [BM, D]

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The four groups of key tiles: full, column test, row test, both tests.
    p_list = KvTiles + i_s * stride_list
    n_full = tl.load(GroupCounts + i_s * 4)
    n_cols = tl.load(GroupCounts + i_s * 4 + 1)
    n_rows = tl.load(GroupCounts + i_s * 4 + 2)
    n_both = tl.load(GroupCounts + i_s * 4 + 3)
    span_h = 2 * half_h
    span_w = 2 * half_w
    b_acc, b_l, b_m = _window_keys(b_q, b_acc, b_l, b_m, K, V, KTokens, KRows, KCols, p_list, n_full,
                                   frames, frame_tokens, b_sh, b_sw, span_h, span_w, stride_ks, stride_vs,
                                   qk_scale_log2, HEAD_DIM, BLOCK_N, False, False, DOT_PRECISION)
    p_list += n_full
    b_acc, b_l, b_m = _window_keys(b_q, b_acc, b_l, b_m, K, V, KTokens, KRows, KCols, p_list, n_cols,
                                   frames, frame_tokens, b_sh, b_sw, span_h, span_w, stride_ks, stride_vs,
                                   qk_scale_log2, HEAD_DIM, BLOCK_N, False, True, DOT_PRECISION)
    p_list += n_cols
    b_acc, b_l, b_m = _window_keys(b_q, b_acc, b_l, b_m, K, V, KTokens, KRows, KCols, p_list, n_rows,
                                   frames, frame_tokens, b_sh, b_sw, span_h, span_w, stride_ks, stride_vs,
                                   qk_scale_log2, HEAD_DIM, BLOCK_N, True, False, DOT_PRECISION)
    p_list += n_rows
    b_acc, b_l, b_m = _window_keys(b_q, b_acc, b_l, b_m, K, V, KTokens, KRows, KCols, p_list, n_both,
                                   frames, frame_tokens, b_sh, b_sw, span_h, span_w, stride_ks, stride_vs,
                                   qk_scale_log2, HEAD_DIM, BLOCK_N, True, True, DOT_PRECISION)

    m_seen = b_l > 0.0
    b_out = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]
    p_o = Out + i_b * stride_ob + i_h * stride_oh + b_qtok[:, None] * stride_os + o_d[None, :]
    tl.store(p_o, b_out.to(Out.dtype.element_ty), mask=m_q[:, None])
    b_lse = (b_m + tl.math.log2(tl.where(m_seen, b_l, 1.0))) * 0.6931471805599453  # natural log
    b_lse = tl.where(m_seen, b_lse, float("-inf"))
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + b_qtok, b_lse, mask=m_q)
# fmt: on


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan) -> str | None:
    """Why the window kernel cannot serve this call (None when it can)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (kernel: fp16, bf16, fp32)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} (kernel: q, k and v head dims equal and in {SUPPORTED_HEAD_DIMS})"
    for name, size in zip(("query", "key"), plan.block_size, strict=True):
        if size < 16 or size & (size - 1):
            return f"{name} tile of {size} tokens (kernel: a power of two, at least 16)"
    if max(t.shape[1] * t.stride(1) for t in (q, k, v)) >= 2**31:
        return "more than 2**31 elements within one batch entry (the kernel's token offsets are int32)"
    return None


def window_attention_fwd(q, k, v, *, plan: WindowPlan, scale=None, return_lse=False):
    """Launch the window kernel. Same semantics as :func:`window_attention_reference` with ``plan``'s
    grid and half-window; ``plan`` on q's device. q/k/v ``[B, S, H, D]`` with the last dim contiguous.

    Under ``torch.compile`` the launch goes through the opaque custom op ``vidaccel::window_attention_fwd``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    launch = _window_attention_fwd_op if torch.compiler.is_compiling() else _launch_window_attention_fwd
    tables = (
        plan.q_rows,
        plan.q_cols,
        plan.k_tokens,
        plan.k_rows,
        plan.k_cols,
        plan.kv_tiles,
        plan.group_counts,
    )
    out, lse = launch(q, k, v, *tables, list(plan.grid), list(plan.half_window), scale)
    return (out, lse) if return_lse else out


# (num_warps, num_stages) by (head dim, fp32); tiles come from the plan.
_CUDA_LAUNCH = {(128, False): (8, 3), (64, False): (4, 3), (128, True): (8, 2), (64, True): (4, 2)}


def _launch_window_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_rows: torch.Tensor,
    q_cols: torch.Tensor,
    k_tokens: torch.Tensor,
    k_rows: torch.Tensor,
    k_cols: torch.Tensor,
    kv_tiles: torch.Tensor,
    group_counts: torch.Tensor,
    grid: list[int],
    half_window: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, head_dim = q.shape
    frames, height, width = grid
    d_h, d_w = half_window
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq), device=q.device, dtype=torch.float32)
    block_m, block_n = q_rows.shape[1], k_rows.shape[1]
    if q.is_cuda:
        num_warps, num_stages = _CUDA_LAUNCH[(head_dim, q.dtype == torch.float32)]
    else:
        num_warps, num_stages = 1, 1
    n_q_tiles = q_rows.shape[0]
    launch_grid = (frames * n_q_tiles, batch * heads)
    _window_attention_kernel[launch_grid](
        q, k, v, out, lse,
        q_rows, q_cols, k_tokens, k_rows, k_cols, kv_tiles, group_counts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        kv_tiles.stride(0),
        heads, frames, height * width, width, n_q_tiles,
        d_h, d_w, max(height - 1 - 2 * d_h, 0), max(width - 1 - 2 * d_w, 0),
        scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out, lse


_window_attention_fwd_op = torch.library.custom_op("vidaccel::window_attention_fwd", mutates_args=())(
    _launch_window_attention_fwd
)


@_window_attention_fwd_op.register_fake
def _(q, k, v, q_rows, q_cols, k_tokens, k_rows, k_cols, kv_tiles, group_counts, grid, half_window, scale):
    batch, seq, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seq), dtype=torch.float32)
