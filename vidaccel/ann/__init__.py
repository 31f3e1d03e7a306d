"""ANN routing for attention: k-means/IVF on vidaccel's Triton kernels, faiss, and an exact oracle.

One interface, :class:`AnnBackend`, three backends chosen by name:

- ``"triton"`` (default on CUDA): Lloyd k-means with the assignment and centroid update as Triton
  kernels (``vidaccel.kernels.kmeans``), warm-started by the caller from the previous step's
  centroids; routing by centroid score.
- ``"faiss"``: the same on faiss indexes (``faiss.contrib.torch_utils``; a GPU index when faiss-gpu
  is installed, CPU otherwise). Choosing it without faiss raises a ``ValueError``.
- ``"exact"``: exact answers from full scores (exact top-k, exact cluster masses): the oracle.

``"auto"`` resolves to triton on CUDA, faiss on CPU when it is installed, else exact.

Example::

    from vidaccel import ann
    backend = ann.get_backend("auto", keys.device)
    centroids, assign = backend.kmeans(keys, ann.init_centroids(keys, 64), iters=3)   # keys [G, N, D]
    top = backend.search(queries, keys, k=16, n_clusters=64, nprobe=8)                 # [G, M, 16]
    ann.recall(top, ann.get_backend("exact").search(queries, keys, k=16))              # in [0, 1]

Recall (tests/test_ann.py): on well-separated clustered data (16 clusters, queries near a cluster
centre, top-10 within its cluster, nprobe 2 of 16), the triton and faiss searches reach
recall@10 ≥ 0.9 against the exact oracle.
"""

from __future__ import annotations

import torch

from .backends import AnnBackend, ExactBackend, FaissBackend, TritonBackend, import_faiss, init_centroids

__all__ = [
    "BACKENDS",
    "AnnBackend",
    "ExactBackend",
    "FaissBackend",
    "TritonBackend",
    "check_backend_name",
    "get_backend",
    "init_centroids",
    "kmeans",
    "recall",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "faiss", "exact")
_CLASSES = {"triton": TritonBackend, "faiss": FaissBackend, "exact": ExactBackend}
_instances: dict[str, AnnBackend] = {}


def check_backend_name(name: str, owner: str = "ann_backend") -> None:
    """``ValueError`` (naming ``owner``) unless ``name`` is one of :data:`BACKENDS`, or if it is
    ``"faiss"`` and faiss is not installed."""
    if name not in BACKENDS:
        raise ValueError(f"{owner} must be one of {BACKENDS}, got {name!r}")
    if name == "faiss":
        import_faiss()


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend ``name`` means on ``device``: ``"auto"`` -> ``"triton"`` on CUDA,
    ``"faiss"`` on CPU when faiss is installed, else ``"exact"``; other names unchanged."""
    check_backend_name(name)
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "triton"
    try:
        import_faiss()
    except ValueError:
        return "exact"
    return "faiss"


def get_backend(name: str, device: torch.device | str = "cpu") -> AnnBackend:
    """The :class:`AnnBackend` for ``name`` (resolved for ``device``), one shared instance per name."""
    name = resolve_backend(name, device)
    if name not in _instances:
        _instances[name] = _CLASSES[name]()
    return _instances[name]


def kmeans(
    x: torch.Tensor,
    n_clusters: int | None = None,
    *,
    centroids: torch.Tensor | None = None,
    iters: int = 3,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means per group: ``x [G, N, D]`` -> ``(centroids fp32 [G, C, D], assign int32 [G, N])``.

    Start from ``centroids`` (a warm start, e.g. the previous step's) or, given ``n_clusters``, from
    :func:`init_centroids`. ``valid`` bool ``[G, N]`` leaves points out (assignment ``-1``).
    """
    if (centroids is None) == (n_clusters is None):
        raise ValueError("pass exactly one of n_clusters and centroids")
    if centroids is None:
        centroids = init_centroids(x, n_clusters)
    return get_backend(backend, x.device).kmeans(x, centroids, iters, valid)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """recall@k: the fraction of the exact top-k indices ``exact [..., k]`` that ``found [..., k]``
    also returns (``-1`` entries of ``found`` match nothing)."""
    hits = (found[..., :, None] == exact[..., None, :]) & (found[..., :, None] >= 0)
    return float(hits.any(-2).float().mean())
