"""k-means for ANN routing: assignment and centroid update as Triton kernels, with references.

Many independent problems run in one launch: ``G`` groups (one per batch entry and head), each with
``N`` points ``x [G, N, D]`` and ``C`` centroids ``[G, C, D]``. One Lloyd iteration is
:func:`kmeans_assign_fwd` (nearest centroid per point) then :func:`kmeans_update_fwd` (mean of each
cluster's points; an empty cluster keeps its centroid). Points assigned ``-1`` take no part in the
update (masked keys, attention sinks).

Layers (house style): ``_kmeans_assign_kernel`` / ``_kmeans_update_kernel`` (Triton only), the
launchers ``kmeans_assign_fwd`` / ``kmeans_update_fwd`` and the public ``kmeans_lloyd_fwd``, and
pure-PyTorch references with the same signatures (``*_reference``), which are the CPU fallback and
the test oracle. The public op that picks kernel or reference is ``vidaccel.ann.kmeans``.

Distances: ``metric="l2"`` assigns the centroid minimising ``|x - c|^2``, i.e. maximising
``x·c - |c|^2 / 2``; ``metric="ip"`` maximises ``x·c`` (used to group queries by the key cluster
they score highest). Ties go to the lower centroid index. Scores are computed with ``x``'s dtype for
the operands (centroids are cast to it) and fp32 accumulation, in kernel and reference alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

METRICS = ("l2", "ip")
SUPPORTED_DIMS = (16, 32, 64, 128, 256)


@triton.jit
def _kmeans_assign_kernel(
    X,
    Cent,
    CNorm,
    Assign,
    Score,
    stride_xg,
    stride_xn,
    stride_cg,
    stride_cc,
    n_points,
    n_clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    L2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_g = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_n = o_n < n_points
    p_x = X + i_g * stride_xg + o_n[:, None] * stride_xn + o_d[None, :]
    b_x = tl.load(p_x, mask=m_n[:, None], other=0.0)  # [BN, D]

    b_best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_arg = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start_c in range(0, n_clusters, BLOCK_C):
        o_c = start_c + tl.arange(0, BLOCK_C)
        m_c = o_c < n_clusters
        p_c = Cent + i_g * stride_cg + o_c[None, :] * stride_cc + o_d[:, None]
        b_c = tl.load(p_c, mask=m_c[None, :], other=0.0).to(b_x.dtype)  # [D, BC]
        b_s = tl.dot(b_x, b_c, input_precision=DOT_PRECISION)  # [BN, BC] fp32
        if L2:
            b_norm = tl.load(CNorm + i_g * n_clusters + o_c, mask=m_c, other=0.0)  # [BC]
            b_s = b_s - 0.5 * b_norm[None, :]
        b_s = tl.where(m_c[None, :], b_s, float("-inf"))
        b_tile_best = tl.max(b_s, 1)
        b_tile_arg = tl.argmax(b_s, 1).to(tl.int32) + start_c
        m_better = b_tile_best > b_best  # strict: ties keep the lower index
        b_best = tl.where(m_better, b_tile_best, b_best)
        b_arg = tl.where(m_better, b_tile_arg, b_arg)
    tl.store(Assign + i_g * n_points + o_n, b_arg, mask=m_n)
    tl.store(Score + i_g * n_points + o_n, b_best, mask=m_n)


@triton.jit
def _kmeans_update_kernel(
    X,
    Assign,
    Sums,
    Counts,
    stride_xg,
    stride_xn,
    n_points,
    n_clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_g = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    b_a = tl.load(Assign + i_g * n_points + o_n, mask=o_n < n_points, other=-1)  # [BN]
    m_n = b_a >= 0
    p_x = X + i_g * stride_xg + o_n[:, None] * stride_xn + o_d[None, :]
    b_x = tl.load(p_x, mask=m_n[:, None], other=0.0).to(tl.float32)  # [BN, D]
    b_a = tl.where(m_n, b_a, 0)
    p_sum = Sums + (i_g * n_clusters + b_a[:, None]) * HEAD_DIM + o_d[None, :]
    tl.atomic_add(p_sum, b_x, mask=m_n[:, None])
    tl.atomic_add(Counts + i_g * n_clusters + b_a, tl.full([BLOCK_N], 1.0, dtype=tl.float32), mask=m_n)


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the k-means kernels cannot serve points ``x`` (None when they can)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (k-means kernels: fp16, bf16, fp32)"
    if x.shape[-1] not in SUPPORTED_DIMS:
        return f"dim {x.shape[-1]} (k-means kernels: {SUPPORTED_DIMS})"
    if x.shape[-2] * x.shape[-1] >= 2**31:
        return "more than 2**31 elements in one group"
    return None


def kmeans_assign_fwd(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2"):
    """Nearest centroid per point: ``x [G, N, D]``, ``centroids [G, C, D]`` -> ``(assign int32 [G, N],
    score fp32 [G, N])``, ``score`` the maximised ``x·c - |c|^2/2`` (l2) or ``x·c`` (ip)."""
    groups, n_points, dim = x.shape
    n_clusters = centroids.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    centroids = centroids.float().contiguous()
    cnorm = centroids.to(x.dtype).float().square().sum(-1).contiguous()  # [G, C]
    assign = torch.empty((groups, n_points), device=x.device, dtype=torch.int32)
    score = torch.empty((groups, n_points), device=x.device, dtype=torch.float32)
    block_n, block_c, num_warps = (128, 64, 4) if x.is_cuda else (32, 16, 1)
    grid = (triton.cdiv(n_points, block_n), groups)
    _kmeans_assign_kernel[grid](
        x,
        centroids,
        cnorm,
        assign,
        score,
        x.stride(0),
        x.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        n_points,
        n_clusters,
        HEAD_DIM=dim,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        L2=metric == "l2",
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return assign, score


def kmeans_update_fwd(x: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Centroid update: each centroid becomes the fp32 mean of the points assigned to it; a cluster
    with no point keeps its centroid. ``x [G, N, D]``, ``assign int32 [G, N]`` (``-1``: skip),
    ``centroids [G, C, D]`` -> fp32 ``[G, C, D]``. Sums are accumulated with atomics, so their
    rounding order varies from run to run."""
    groups, n_points, dim = x.shape
    n_clusters = centroids.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    sums = torch.zeros((groups, n_clusters, dim), device=x.device, dtype=torch.float32)
    counts = torch.zeros((groups, n_clusters), device=x.device, dtype=torch.float32)
    block_n, num_warps = (64, 4) if x.is_cuda else (32, 1)
    grid = (triton.cdiv(n_points, block_n), groups)
    _kmeans_update_kernel[grid](
        x,
        assign.to(torch.int32).contiguous(),
        sums,
        counts,
        x.stride(0),
        x.stride(1),
        n_points,
        n_clusters,
        HEAD_DIM=dim,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return _finish_update(sums, counts, centroids)


def kmeans_lloyd_fwd(x, centroids, iters: int, valid: torch.Tensor | None = None):
    """``iters`` Lloyd iterations on the kernels from ``centroids``; see :func:`kmeans_lloyd_reference`."""
    return _lloyd(x, centroids, iters, valid, kmeans_assign_fwd, kmeans_update_fwd)


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2"):
    """Reference of :func:`kmeans_assign_fwd`, same signature and result (up to fp32 rounding of
    near-ties)."""
    cent = centroids.float().to(x.dtype).float()  # the kernel's operands: centroids in x's dtype
    scores = torch.matmul(x.float(), cent.transpose(-1, -2))  # [G, N, C], fp32 accumulation
    if metric == "l2":
        scores = scores - 0.5 * cent.square().sum(-1)[:, None, :]
    score, assign = scores.max(dim=-1)
    return assign.to(torch.int32), score


def kmeans_update_reference(x: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`kmeans_update_fwd` (``index_add`` sums)."""
    groups, n_points, dim = x.shape
    n_clusters = centroids.shape[1]
    valid = assign >= 0
    flat = (torch.arange(groups, device=x.device)[:, None] * n_clusters + assign.long().clamp_min(0))[valid]
    sums = torch.zeros(groups * n_clusters, dim, device=x.device, dtype=torch.float32)
    sums.index_add_(0, flat, x.float()[valid])
    counts = torch.zeros(groups * n_clusters, device=x.device, dtype=torch.float32)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return _finish_update(sums.view(groups, n_clusters, dim), counts.view(groups, n_clusters), centroids)


def kmeans_lloyd_reference(x, centroids, iters: int, valid: torch.Tensor | None = None):
    """``iters`` Lloyd iterations (l2) from ``centroids``.

    Args:
        x: points ``[G, N, D]``.
        centroids: initial centroids ``[G, C, D]`` (e.g. the previous step's: a warm start).
        iters: Lloyd iterations (assign, update), ``>= 1``.
        valid: bool ``[G, N]`` or None; invalid points are not clustered (assignment ``-1``).

    Returns ``(centroids fp32 [G, C, D], assign int32 [G, N])``, the assignment to the returned
    centroids (one final assignment after the last update).
    """
    return _lloyd(x, centroids, iters, valid, kmeans_assign_reference, kmeans_update_reference)


def _lloyd(x, centroids, iters, valid, assign_fn, update_fn):
    centroids = centroids.float()
    assign = None
    for _ in range(iters):
        assign = _masked(assign_fn(x, centroids, "l2")[0], valid)
        centroids = update_fn(x, assign, centroids)
    assign = _masked(assign_fn(x, centroids, "l2")[0], valid)
    return centroids, assign


def _masked(assign, valid):
    return assign if valid is None else torch.where(valid, assign, -1)


def _finish_update(sums, counts, centroids):
    filled = counts > 0
    means = sums / counts.clamp_min(1.0)[..., None]
    return torch.where(filled[..., None], means, centroids.float())
