"""ANN backends: one interface (:class:`AnnBackend`), three implementations.

- :class:`TritonBackend` (``"triton"``): k-means on vidaccel's Triton kernels (on CPU under the
  Triton interpreter, else on their PyTorch references), routing by centroid score.
- :class:`FaissBackend` (``"faiss"``): the same on faiss indexes through ``faiss.contrib.torch_utils``:
  a GPU index for CUDA tensors when faiss-gpu is installed, a CPU index otherwise.
- :class:`ExactBackend` (``"exact"``): exact answers from full scores, the oracle for tests and
  recall (``O(M·N)`` memory: tiny problems only).

Every tensor is grouped: ``G`` independent problems (one per batch entry and head), points
``[G, N, D]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from vidaccel import ops

__all__ = ["AnnBackend", "ExactBackend", "FaissBackend", "TritonBackend", "init_centroids"]


class AnnBackend(ABC):
    """What the ANN planners (AnnSA, AnnCA) need from a backend.

    Subclasses implement :meth:`assign` and :meth:`update`; the rest is shared and may be overridden
    (the exact oracle overrides the estimates with exact answers).
    """

    name: str = ""

    @abstractmethod
    def assign(self, x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2") -> torch.Tensor:
        """Nearest centroid per point: ``x [G, N, D]``, ``centroids [G, C, D]`` -> int32 ``[G, N]``
        (``metric`` ``"l2"``: least squared distance; ``"ip"``: largest inner product)."""

    @abstractmethod
    def update(self, x: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Mean of each cluster's points (``assign == -1`` skipped; an empty cluster keeps its
        centroid) -> fp32 ``[G, C, D]``."""

    def kmeans(
        self, x: torch.Tensor, centroids: torch.Tensor, iters: int, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``iters`` Lloyd iterations from ``centroids [G, C, D]`` (warm start) on ``x [G, N, D]``;
        points where ``valid [G, N]`` is False are left out (assignment ``-1``).
        -> ``(centroids fp32 [G, C, D], assign int32 [G, N])``."""
        centroids = centroids.float()
        for _ in range(iters):
            centroids = self.update(x, self._assign_valid(x, centroids, valid), centroids)
        return centroids, self._assign_valid(x, centroids, valid)

    def summarize_queries(
        self, queries: torch.Tensor, n_points: int, iters: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A weighted point set standing in for ``queries [G, M, D]`` when scoring keys:
        ``-> (points [G, P, D], weights fp32 [G, P])``, weights summing to 1 per group. Here: the
        ``n_points``-means of the queries, weighted by cluster size."""
        n_points = min(n_points, queries.shape[1])
        centroids, assign = self.kmeans(queries, init_centroids(queries, n_points), iters)
        counts = torch.zeros(centroids.shape[:2], device=queries.device, dtype=torch.float32)
        counts.scatter_add_(1, assign.long(), torch.ones_like(assign, dtype=torch.float32))
        return centroids.to(queries.dtype), counts / queries.shape[1]

    def cluster_mass(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        key_bias: torch.Tensor | None,
        assign: torch.Tensor,
        centroids: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Each query's softmax attention mass per key cluster: fp32 ``[G, M, C]``, rows summing to 1.

        ``queries [G, M, D]``, ``keys [G, N, D]`` with logit bias ``key_bias`` fp32 ``[G, N]`` (or
        None), clustered as ``assign`` int32 ``[G, N]`` (``-1``: not in any cluster) around
        ``centroids [G, C, D]``. Estimated from centroid scores: cluster ``c`` gets the logit
        ``scale · q·c + log Σ_{j in c} exp(bias_j)`` (``log |c|`` without bias).
        """
        log_size = _cluster_log_size(key_bias, assign, centroids.shape[1], keys)
        scores = self.centroid_scores(queries, centroids) * scale + log_size[:, None, :]
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def centroid_scores(self, queries: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Inner products ``queries [G, M, D]`` · ``centroids [G, C, D]`` -> fp32 ``[G, M, C]``."""
        return torch.matmul(queries.float(), centroids.float().transpose(-1, -2))

    def search(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        k: int,
        *,
        n_clusters: int,
        nprobe: int,
        iters: int = 4,
    ) -> torch.Tensor:
        """Approximate top-``k`` keys by inner product, IVF style: cluster the keys into
        ``n_clusters``, visit the ``nprobe`` clusters whose centroids score highest for each query,
        rank the keys found there exactly. ``queries [G, M, D]``, ``keys [G, N, D]`` -> int64
        ``[G, M, k]`` key indices, best first (``-1`` where fewer than ``k`` keys were visited)."""
        centroids, assign = self.kmeans(keys, init_centroids(keys, n_clusters), iters)
        probed = (
            self.centroid_scores(queries, centroids).topk(min(nprobe, n_clusters), dim=-1).indices
        )  # [G, M, P]
        visited = torch.zeros(*queries.shape[:2], n_clusters, device=keys.device, dtype=torch.bool)
        visited.scatter_(-1, probed, True)
        seen = torch.gather(
            visited, 2, assign.long()[:, None, :].expand(-1, queries.shape[1], -1)
        )  # [G, M, N]
        scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)).masked_fill(
            ~seen, float("-inf")
        )
        top = scores.topk(min(k, keys.shape[1]), dim=-1)
        return torch.where(torch.isfinite(top.values), top.indices, -1)

    def _assign_valid(self, x, centroids, valid):
        assign = self.assign(x, centroids, "l2")
        return assign if valid is None else torch.where(valid, assign, -1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TritonBackend(AnnBackend):
    """k-means on the Triton kernels of ``vidaccel.kernels.kmeans``; where they cannot run (a CPU
    tensor outside the Triton interpreter, an unsupported dim or dtype) on their references, with
    one warning per reason."""

    name = "triton"

    def assign(self, x, centroids, metric="l2"):
        return ops.kmeans_assign(x, centroids, metric)

    def update(self, x, assign, centroids):
        return ops.kmeans_update(x, assign, centroids)


class ExactBackend(AnnBackend):
    """Exact answers from full scores: the oracle. k-means on the PyTorch reference; cluster masses
    from the full softmax; key summaries are the queries themselves; search is exact top-k."""

    name = "exact"

    def assign(self, x, centroids, metric="l2"):
        return ops.kmeans_assign(x, centroids, metric, backend="reference")

    def update(self, x, assign, centroids):
        return ops.kmeans_update(x, assign, centroids, backend="reference")

    def summarize_queries(self, queries, n_points, iters):
        weights = torch.full(queries.shape[:2], 1.0 / queries.shape[1], device=queries.device)
        return queries, weights

    def cluster_mass(self, queries, keys, key_bias, assign, centroids, scale):
        scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale  # [G, M, N]
        if key_bias is not None:
            scores = scores + key_bias[:, None, :]
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        mass = torch.zeros(*queries.shape[:2], centroids.shape[1] + 1, device=queries.device)
        index = torch.where(assign >= 0, assign, centroids.shape[1]).long()  # unclustered keys -> spare slot
        mass.scatter_add_(2, index[:, None, :].expand_as(probs), probs)
        return mass[..., :-1]

    def search(self, queries, keys, k, *, n_clusters=1, nprobe=1, iters=0):
        scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2))
        return scores.topk(min(k, keys.shape[1]), dim=-1).indices


class FaissBackend(AnnBackend):
    """k-means and search on faiss indexes (``faiss.contrib.torch_utils``: torch tensors in and out).

    CUDA tensors use GPU indexes when faiss-gpu is installed; otherwise the data goes to the host
    and back (one warning). The centroid update is a ``torch`` ``index_add`` on the data's device.
    """

    name = "faiss"

    def __init__(self) -> None:
        self.faiss = import_faiss()
        self._gpu_resources = None

    def assign(self, x, centroids, metric="l2"):
        out = torch.empty(x.shape[:2], device=x.device, dtype=torch.int32)
        for group in range(x.shape[0]):
            index = self._flat_index(centroids.shape[-1], metric, x)
            index.add(self._on_index_device(centroids[group].float().contiguous()))
            _, nearest = index.search(self._on_index_device(x[group].float().contiguous()), 1)
            out[group] = nearest[:, 0].to(device=x.device, dtype=torch.int32)
        return out

    def update(self, x, assign, centroids):
        return ops.kmeans_update(x, assign, centroids, backend="reference")

    def centroid_scores(self, queries, centroids):
        n_clusters = centroids.shape[1]
        out = torch.empty(*queries.shape[:2], n_clusters, device=queries.device, dtype=torch.float32)
        for group in range(queries.shape[0]):
            index = self._flat_index(centroids.shape[-1], "ip", queries)
            index.add(self._on_index_device(centroids[group].float().contiguous()))
            scores, ids = index.search(self._on_index_device(queries[group].float().contiguous()), n_clusters)
            out[group].scatter_(-1, ids.to(queries.device), scores.to(queries.device))
        return out

    def search(self, queries, keys, k, *, n_clusters, nprobe, iters=4):
        faiss = self.faiss
        dim = keys.shape[-1]
        out = torch.empty(*queries.shape[:2], min(k, keys.shape[1]), device=queries.device, dtype=torch.int64)
        for group in range(keys.shape[0]):
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, n_clusters, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = max(iters, 1)
            index.cp.min_points_per_centroid = 1
            index = self._to_gpu(index, keys)
            data = self._on_index_device(keys[group].float().contiguous())
            index.train(data)
            index.add(data)
            index.nprobe = nprobe
            _, ids = index.search(self._on_index_device(queries[group].float().contiguous()), out.shape[-1])
            out[group] = ids.to(queries.device)
        return out

    def _flat_index(self, dim, metric, like):
        index = self.faiss.IndexFlatL2(dim) if metric == "l2" else self.faiss.IndexFlatIP(dim)
        return self._to_gpu(index, like)

    def _to_gpu(self, index, like):
        if not like.is_cuda:
            return index
        if not hasattr(self.faiss, "StandardGpuResources"):
            ops.warn_once(
                "vidaccel.ann: faiss has no GPU support here (faiss-cpu): CUDA tensors go through CPU indexes"
            )
            return index
        if self._gpu_resources is None:
            self._gpu_resources = self.faiss.StandardGpuResources()
        return self.faiss.index_cpu_to_gpu(self._gpu_resources, like.device.index or 0, index)

    def _on_index_device(self, tensor):
        return tensor if hasattr(self.faiss, "StandardGpuResources") else tensor.cpu()


def import_faiss():
    """``faiss`` with its torch bridge loaded; ``ValueError`` naming the install command if absent."""
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)
    except ImportError as exc:
        raise ValueError(
            "ann_backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu), or choose "
            f"ann_backend='triton', 'exact' or 'auto' ({exc})"
        ) from exc
    return faiss


def init_centroids(x: torch.Tensor, n_clusters: int, sample: int = 4096) -> torch.Tensor:
    """Deterministic k-means start: farthest-point sampling over ``sample`` points of ``x [G, N, D]``
    evenly spaced in token order -> fp32 ``[G, C, D]``.

    From the first sampled point, each next centroid is the sampled point farthest from those chosen,
    so every well-separated cluster gets a centroid before any cluster gets a second one (an evenly
    spaced pick leaves about ``e^{-C/K}`` of ``K`` true clusters without a centroid and merges them).
    """
    groups, n_points, dim = x.shape
    picks = torch.linspace(0, n_points - 1, min(max(sample, n_clusters), n_points), device=x.device)
    points = x[:, picks.round().long()].float()  # [G, P, D]
    chosen = torch.zeros(groups, n_clusters, device=x.device, dtype=torch.long)
    nearest = (points - points[:, :1]).square().sum(-1)  # [G, P], squared distance to the chosen set
    for i in range(1, n_clusters):
        chosen[:, i] = nearest.argmax(1)
        centre = torch.gather(points, 1, chosen[:, i, None, None].expand(-1, 1, dim))
        nearest = torch.minimum(nearest, (points - centre).square().sum(-1))
    return torch.gather(points, 1, chosen[..., None].expand(-1, -1, dim))


def _cluster_log_size(key_bias, assign, n_clusters, keys):
    """``log Σ_{j in c} exp(bias_j)`` per cluster: fp32 ``[G, C]`` (``-inf`` for an empty cluster)."""
    if key_bias is None:
        shift = torch.zeros(assign.shape[0], 1, device=keys.device)
        weight = torch.ones(assign.shape, device=keys.device)
    else:  # shifted by the group's largest finite bias, so that exp cannot overflow
        shift = key_bias.masked_fill(~torch.isfinite(key_bias), float("-inf")).amax(1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        weight = (key_bias - shift).exp()
    weight = torch.where(assign >= 0, weight, 0.0)
    sizes = torch.zeros(assign.shape[0], n_clusters + 1, device=keys.device)
    sizes.scatter_add_(1, torch.where(assign >= 0, assign, n_clusters).long(), weight)
    return sizes[:, :-1].log() + shift
