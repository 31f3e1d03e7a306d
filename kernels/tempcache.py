"""TempCache's two cache-update ops in Triton: the match and the merge (METHODS.md, TempCache).

- **match**: for each new key, the best cosine similarity among a set of candidate representatives,
  and that representative's slot. Keys come L2-normalised, so similarity is a dot product; the
  candidates are either a slot range (global search) or a slot map with one slot per grid position
  of the previous frame, optionally restricted to a spatial window of ``radius`` rows/columns.
- **merge**: each new key either merges into an existing representative (the representative takes
  the best-matching new key, its value becomes the running mean, its count grows) or starts a new
  representative in a free or evicted slot (count 1).

Layers (house style): ``_tempcache_match_kernel`` / ``_tempcache_merge_kernel`` (Triton only),
``tempcache_match_fwd`` / ``tempcache_merge_fwd`` (launchers), ``tempcache_match_reference`` /
``tempcache_merge_reference`` (pure PyTorch, fp32 math: the CPU fallback and the test oracle) and
the declared check ``unsupported_reason``. :func:`vidaccel.ops.tempcache_match` /
:func:`vidaccel.ops.tempcache_merge` choose kernel or reference (and document the arguments).
Everything stays on the device; nothing here synchronises with the host. Cache updates run once per
chunk outside any compiled graph, so these launchers are not wrapped as torch custom ops.

Layouts: representatives ``[B, C, H, D]`` (batch-major like the KV cache), per-head bookkeeping
``[B, H, C]``, per-token decisions ``[B, H, S]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "check_match",
    "tempcache_match_fwd",
    "tempcache_match_reference",
    "tempcache_merge_fwd",
    "tempcache_merge_reference",
    "unsupported_reason",
]

# (BLOCK_M, BLOCK_N, num_warps) of the match kernel; the interpreter runs one program at a time, so
# small tiles keep tiny tests exhaustive.
_MATCH_TILES = {"cuda": (64, 64, 4), "interpreter": (16, 16, 1)}
_NO_SLOT = 2**31 - 1  # sorts after every real slot; becomes -1 ("no candidate") at the end


# ---------------------------------------------------------------------------------------------- match


def tempcache_match_reference(keys, reps, *, slot_map=None, num_reps=None, start=0, width=1, radius=-1):
    """Pure-PyTorch :func:`tempcache_match` (fp32 math): ``-> (best_sim [B, H, S], best_slot [B, H, S])``."""
    batch, seq, heads, _ = keys.shape
    cap = reps.shape[1]
    device = keys.device
    q = keys.float().transpose(1, 2)  # [B, H, S, D]
    r = reps.float().transpose(1, 2)  # [B, H, C, D]
    if slot_map is not None:
        cols = slot_map.long()  # [B, H, M]
        valid = (cols >= 0)[:, :, None, :].expand(batch, heads, seq, -1)  # [B, H, S, M]
        cand = torch.gather(
            r, 2, cols.clamp_min(0)[..., None].expand(-1, -1, -1, r.shape[-1])
        )  # [B, H, M, D]
        if radius >= 0:
            pos_q = torch.arange(seq, device=device)
            pos_c = torch.arange(cols.shape[-1], device=device)
            near = ((pos_q[:, None] // width - pos_c[None, :] // width).abs() <= radius) & (
                (pos_q[:, None] % width - pos_c[None, :] % width).abs() <= radius
            )
            valid = valid & near
        slots = cols[:, :, None, :].expand(batch, heads, seq, -1)
    else:
        cand = r
        pos_c = torch.arange(cap, device=device)
        valid = ((pos_c >= start) & (pos_c[None, None, :] < num_reps[..., None].long()))[:, :, None, :]
        valid = valid.expand(batch, heads, seq, cap)
        slots = pos_c.expand(batch, heads, seq, cap)
    sim = (q @ cand.transpose(-1, -2)).masked_fill(~valid, float("-inf"))
    best = sim.amax(-1)
    tied = valid & (sim == best[..., None])
    best_slot = torch.where(tied, slots, _NO_SLOT).amin(-1)
    found = best_slot != _NO_SLOT
    return torch.where(found, best, float("-inf")), torch.where(found, best_slot, -1).to(torch.int32)


def tempcache_match_fwd(keys, reps, *, slot_map=None, num_reps=None, start=0, width=1, radius=-1):
    """Launch the match kernel; same signature and semantics as :func:`tempcache_match_reference`.
    ``keys``/``reps`` need a contiguous last dim."""
    batch, seq, heads, dim = keys.shape
    keys, reps = (t if t.stride(-1) == 1 else t.contiguous() for t in (keys, reps))
    best_sim = torch.empty((batch, heads, seq), device=keys.device, dtype=torch.float32)
    best_slot = torch.empty((batch, heads, seq), device=keys.device, dtype=torch.int32)
    use_map = slot_map is not None
    table = (slot_map if use_map else num_reps).to(torch.int32)
    num_cols = table.shape[-1] if use_map else 0
    block_m, block_n, num_warps = _MATCH_TILES["cuda" if keys.is_cuda else "interpreter"]
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(seq, block_m), batch * heads)
    _tempcache_match_kernel[grid](
        keys, reps, table, best_sim, best_slot,
        seq, num_cols, heads, dim, start, width, radius,
        keys.stride(0), keys.stride(1), keys.stride(2),
        reps.stride(0), reps.stride(1), reps.stride(2),
        table.stride(0), table.stride(1),
        best_sim.stride(0), best_sim.stride(1),
        USE_MAP=use_map,
        LOCAL=use_map and radius >= 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )  # fmt: skip
    return best_sim, best_slot


@triton.jit
def _tempcache_match_kernel(
    Keys,
    Reps,
    Table,
    BestSim,
    BestSlot,
    seq,
    num_cols,
    heads,
    head_dim,
    start,
    width,
    radius,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_rb,
    stride_rs,
    stride_rh,
    stride_tb,
    stride_th,
    stride_ob,
    stride_oh,
    USE_MAP: tl.constexpr,
    LOCAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // heads).to(tl.int64)
    i_h = i_bh % heads
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < seq
    p_q = Keys + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs  # [BM, 1]
    p_r = Reps + i_b * stride_rb + i_h * stride_rh
    p_t = Table + i_b * stride_tb + i_h * stride_th
    if USE_MAP:
        lo = 0
        hi = num_cols
        if LOCAL:
            # Raster order: the rows of this key block, widened by the radius, bound the columns.
            row_first = (i_m * BLOCK_M) // width
            row_last = (tl.minimum(i_m * BLOCK_M + BLOCK_M, seq) - 1) // width
            lo = tl.maximum(row_first - radius, 0) * width
            hi = tl.minimum((row_last + radius + 1) * width, num_cols)
    else:
        lo = start
        hi = tl.load(p_t)

    b_best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_slot = tl.full([BLOCK_M], 2147483647, tl.int32)
    for start_n in range(lo, hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        if USE_MAP:
            b_cols = tl.load(p_t + o_n, mask=m_n, other=-1)  # [BN] slots
        else:
            b_cols = o_n
        m_valid = m_n & (b_cols >= 0)
        b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start_d in range(0, head_dim, BLOCK_D):
            o_d = start_d + tl.arange(0, BLOCK_D)
            m_d = o_d < head_dim
            b_q = tl.load(p_q + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
            p_k = p_r + b_cols.to(tl.int64)[None, :] * stride_rs + o_d[:, None]
            b_k = tl.load(p_k, mask=m_valid[None, :] & m_d[:, None], other=0.0)  # [BD, BN]
            b_s = tl.dot(b_q, b_k, acc=b_s, input_precision=DOT_PRECISION)
        m_cand = m_valid[None, :] & m_m[:, None]  # [BM, BN]
        if LOCAL:
            d_row = (o_m // width)[:, None] - (o_n // width)[None, :]
            d_col = (o_m % width)[:, None] - (o_n % width)[None, :]
            m_cand = m_cand & (d_row <= radius) & (d_row >= -radius) & (d_col <= radius) & (d_col >= -radius)
        b_s = tl.where(m_cand, b_s, float("-inf"))
        b_tile_best = tl.max(b_s, axis=1)  # [BM]
        b_tied = m_cand & (b_s == b_tile_best[:, None])
        b_tile_slot = tl.min(tl.where(b_tied, b_cols[None, :], 2147483647), axis=1)  # lowest slot among ties
        m_take = (b_tile_best > b_best) | ((b_tile_best == b_best) & (b_tile_slot < b_slot))
        b_best = tl.where(m_take, b_tile_best, b_best)
        b_slot = tl.where(m_take, b_tile_slot, b_slot)

    m_found = b_slot != 2147483647
    o_out = i_b * stride_ob + i_h * stride_oh + o_m
    tl.store(BestSim + o_out, tl.where(m_found, b_best, float("-inf")), mask=m_m)
    tl.store(BestSlot + o_out, tl.where(m_found, b_slot, -1), mask=m_m)


# ---------------------------------------------------------------------------------------------- merge


def tempcache_merge_reference(rep_k, rep_v, rep_m, count, log_count, k, v, m, slot, merge, sim) -> None:
    """Pure-PyTorch :func:`tempcache_merge` (sums in fp32, or fp64 for fp64 caches), in place; same arguments."""
    batch, seq, heads, _ = k.shape
    cap = rep_k.shape[1]
    slot = slot.long()
    incoming = torch.zeros((batch, heads, cap), dtype=torch.long, device=k.device).scatter_add_(
        2, slot, torch.ones_like(slot)
    )
    acc = torch.promote_types(v.dtype, torch.float32)
    v_t = v.to(acc).transpose(1, 2)  # [B, H, S, Dv]
    v_sum = torch.zeros((batch, heads, cap, v.shape[-1]), dtype=acc, device=k.device).scatter_add_(
        2, slot[..., None].expand_as(v_t), v_t
    )
    best_sim = torch.full((batch, heads, cap), float("-inf"), device=k.device).scatter_reduce_(
        2, slot, sim.float(), "amax"
    )
    tokens = torch.arange(seq, device=k.device).expand(batch, heads, seq)
    is_best = sim.float() == best_sim.gather(2, slot)
    best_tok = torch.full((batch, heads, cap), seq, device=k.device).scatter_reduce_(
        2, slot, torch.where(is_best, tokens, seq), "amin"
    )
    # A slot without a best (every sim -inf: a new key with no candidate) takes its first key.
    first_tok = torch.full((batch, heads, cap), seq, device=k.device).scatter_reduce_(2, slot, tokens, "amin")
    best_tok = torch.where(best_tok == seq, first_tok, best_tok)
    merging = (
        torch.zeros((batch, heads, cap), dtype=torch.long, device=k.device)
        .scatter_reduce_(2, slot, merge.long(), "amax")
        .bool()
    )

    b_idx, h_idx, c_idx = (incoming > 0).nonzero(as_tuple=True)
    tok = best_tok[b_idx, h_idx, c_idx]
    n_old = torch.where(merging[b_idx, h_idx, c_idx], count[b_idx, h_idx, c_idx].long(), 0)
    n_new = n_old + incoming[b_idx, h_idx, c_idx]
    v_old = rep_v[b_idx, c_idx, h_idx].to(acc)
    v_new = (v_old * n_old[:, None] + v_sum[b_idx, h_idx, c_idx]) / n_new[:, None]
    rep_v[b_idx, c_idx, h_idx] = v_new.to(rep_v.dtype)
    rep_k[b_idx, c_idx, h_idx] = k[b_idx, tok, h_idx]
    rep_m[b_idx, c_idx, h_idx] = m[b_idx, tok, h_idx]
    count[b_idx, h_idx, c_idx] = n_new.to(count.dtype)
    log_count[b_idx, h_idx, c_idx] = torch.log(n_new.float())


def tempcache_merge_fwd(rep_k, rep_v, rep_m, count, log_count, k, v, m, slot, merge, sim) -> None:
    """Launch the merge kernel (same arguments as :func:`tempcache_merge_reference`).

    Keys are sorted by slot (stable, so each run of keys merging into one representative is in token
    order); the first key of each run (its leader) owns the run: it sums the run's values in that fixed
    order and writes the representative, so the result never depends on thread scheduling.
    """
    batch, seq, heads, dim = k.shape
    dim_v = v.shape[-1]
    sorted_slot, order = torch.sort(slot.to(torch.int64), dim=-1, stable=True)  # [B, H, S]
    positions = torch.arange(seq, device=k.device)
    leader = torch.ones_like(sorted_slot, dtype=torch.bool)
    leader[..., 1:] = sorted_slot[..., 1:] != sorted_slot[..., :-1]
    run_start = torch.where(leader, positions, seq)
    next_start = torch.flip(torch.cummin(torch.flip(run_start, [-1]), -1).values, [-1])  # min over j >= i
    next_start = torch.cat([next_start[..., 1:], torch.full_like(next_start[..., :1], seq)], -1)
    run_len = torch.where(leader, next_start - positions, 0).to(torch.int32)
    merge_sorted = torch.gather(merge, -1, order).to(torch.int8)
    order = order.to(torch.int32)
    sorted_slot = sorted_slot.to(torch.int32)
    sim = sim.float().contiguous()
    k, v, m = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v, m))
    block_d = triton.next_power_of_2(max(dim, dim_v))
    block_s = max(1, min(64, 4096 // block_d)) if k.is_cuda else 16
    grid = (triton.cdiv(seq, block_s), batch * heads)
    _tempcache_merge_kernel[grid](
        rep_k, rep_v, rep_m, count, log_count,
        k, v, m, sim, order, sorted_slot, run_len, merge_sorted,
        seq, heads, dim, dim_v,
        rep_k.stride(0), rep_k.stride(1), rep_k.stride(2),
        rep_v.stride(0), rep_v.stride(1), rep_v.stride(2),
        rep_m.stride(0), rep_m.stride(1), rep_m.stride(2),
        count.stride(0), count.stride(1),
        log_count.stride(0), log_count.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        m.stride(0), m.stride(1), m.stride(2),
        sim.stride(0), sim.stride(1),
        order.stride(0), order.stride(1),
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        num_warps=4 if k.is_cuda else 1,
    )  # fmt: skip


@triton.jit
def _tempcache_merge_kernel(
    RepK,
    RepV,
    RepM,
    Count,
    LogCount,
    K,
    V,
    M,
    Sim,
    Order,
    Slot,
    RunLen,
    IsMerge,
    seq,
    heads,
    head_dim,
    value_dim,
    stride_rkb,
    stride_rks,
    stride_rkh,
    stride_rvb,
    stride_rvs,
    stride_rvh,
    stride_rmb,
    stride_rms,
    stride_rmh,
    stride_cb,
    stride_ch,
    stride_lb,
    stride_lh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_mb,
    stride_ms,
    stride_mh,
    stride_sb,
    stride_sh,
    stride_ob,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // heads).to(tl.int64)
    i_h = i_bh % heads
    o_i = i_s * BLOCK_S + tl.arange(0, BLOCK_S)  # positions in slot order
    o_d = tl.arange(0, BLOCK_D)
    m_i = o_i < seq
    m_dk = o_d < head_dim
    m_dv = o_d < value_dim
    p_sorted = i_b * stride_ob + i_h * stride_oh  # Order, Slot, RunLen, IsMerge share one layout
    b_len = tl.load(RunLen + p_sorted + o_i, mask=m_i, other=0)
    m_lead = b_len > 0
    b_slot = tl.load(Slot + p_sorted + o_i, mask=m_lead, other=0).to(tl.int64)
    m_merge = m_lead & (tl.load(IsMerge + p_sorted + o_i, mask=m_lead, other=0) != 0)
    p_sim = Sim + i_b * stride_sb + i_h * stride_sh

    b_sum = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    b_best_sim = tl.full([BLOCK_S], float("-inf"), tl.float32)
    b_best_tok = tl.load(Order + p_sorted + o_i, mask=m_lead, other=0).to(tl.int64)
    for j in range(0, tl.max(b_len, axis=0)):
        m_j = m_lead & (j < b_len)
        b_tok = tl.load(Order + p_sorted + o_i + j, mask=m_j, other=0).to(tl.int64)
        p_v = V + i_b * stride_vb + i_h * stride_vh + b_tok[:, None] * stride_vs + o_d[None, :]
        b_sum += tl.load(p_v, mask=m_j[:, None] & m_dv[None, :], other=0.0).to(tl.float32)
        b_sim = tl.load(p_sim + b_tok, mask=m_j, other=float("-inf"))
        m_better = m_j & (b_sim > b_best_sim)  # strict: ties keep the earlier (lower) token
        b_best_sim = tl.where(m_better, b_sim, b_best_sim)
        b_best_tok = tl.where(m_better, b_tok, b_best_tok)

    p_count = Count + i_b * stride_cb + i_h * stride_ch + b_slot
    b_old = tl.load(p_count, mask=m_merge, other=0)
    b_new = b_old + b_len
    p_rv = RepV + i_b * stride_rvb + i_h * stride_rvh + b_slot[:, None] * stride_rvs + o_d[None, :]
    b_v_old = tl.load(p_rv, mask=m_merge[:, None] & m_dv[None, :], other=0.0).to(tl.float32)
    b_mean = (b_v_old * b_old.to(tl.float32)[:, None] + b_sum) / tl.maximum(b_new, 1).to(tl.float32)[:, None]
    tl.store(p_rv, b_mean.to(RepV.dtype.element_ty), mask=m_lead[:, None] & m_dv[None, :])

    m_lk = m_lead[:, None] & m_dk[None, :]
    p_k = K + i_b * stride_kb + i_h * stride_kh + b_best_tok[:, None] * stride_ks + o_d[None, :]
    p_rk = RepK + i_b * stride_rkb + i_h * stride_rkh + b_slot[:, None] * stride_rks + o_d[None, :]
    tl.store(p_rk, tl.load(p_k, mask=m_lk, other=0.0), mask=m_lk)
    p_m = M + i_b * stride_mb + i_h * stride_mh + b_best_tok[:, None] * stride_ms + o_d[None, :]
    p_rm = RepM + i_b * stride_rmb + i_h * stride_rmh + b_slot[:, None] * stride_rms + o_d[None, :]
    tl.store(p_rm, tl.load(p_m, mask=m_lk, other=0.0), mask=m_lk)
    tl.store(p_count, b_new, mask=m_lead)
    tl.store(
        LogCount + i_b * stride_lb + i_h * stride_lh + b_slot,
        tl.log(tl.maximum(b_new, 1).to(tl.float32)),
        mask=m_lead,
    )


# ---------------------------------------------------------------------------------------------- helpers


def unsupported_reason(t: torch.Tensor) -> str | None:
    """Why the TempCache kernels cannot serve a frame's keys ``t`` (None when they can): they take
    fp16, bf16 and fp32; :mod:`vidaccel.ops` runs the reference otherwise."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {t.dtype} (kernel: fp16, bf16, fp32)"
    return None


def check_match(keys, reps, slot_map, num_reps) -> None:
    if (
        keys.dim() != 4
        or reps.dim() != 4
        or keys.shape[0] != reps.shape[0]
        or keys.shape[2:] != reps.shape[2:]
    ):
        raise ValueError(
            f"keys [B, S, H, D] and reps [B, C, H, D] must agree, got {tuple(keys.shape)} and {tuple(reps.shape)}"
        )
    if (slot_map is None) == (num_reps is None):
        raise ValueError("pass exactly one of slot_map (map candidates) and num_reps (slot-range candidates)")
