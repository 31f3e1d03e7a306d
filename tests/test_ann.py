"""vidaccel.ann: the k-means kernels against their references, backend choice, search recall.

Recall floor (stated in vidaccel.ann's docstring): on well-separated clustered data (16 clusters,
queries near a cluster centre, top-10 within its cluster, nprobe 2 of 16) the triton and faiss
searches reach recall@10 >= 0.9 against the exact oracle.
"""

import sys

import pytest
import torch

from vidaccel import ann
from vidaccel.kernels import kmeans as km

pytestmark = pytest.mark.filterwarnings("ignore:vidaccel.ann")


def _clustered(groups=2, n_clusters=16, per_cluster=24, dim=64, spread=0.05, seed=0):
    """Points around well-separated unit-norm centres (shuffled): ``(x [G, N, D], centres [G, C, D])``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, n_clusters, dim, generator=gen), dim=-1) * 4
    x = centres.repeat_interleave(per_cluster, dim=1)
    x = x + spread * torch.randn(x.shape, generator=gen)
    return x[:, torch.randperm(x.shape[1], generator=gen)], centres


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_assign_kernel_matches_reference(metric, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 77, 64, generator=gen).to(dtype)  # ragged point count
    centroids = torch.randn(3, 21, 64, generator=gen)  # more than one (ragged) centroid tile
    assign, score = km.kmeans_assign_fwd(x, centroids, metric)
    ref_assign, ref_score = km.kmeans_assign_reference(x, centroids, metric)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-4)
    differ = assign != ref_assign
    # Only near-ties may resolve differently under another summation order.
    assert differ.float().mean() <= 0.02
    scores = torch.matmul(x.float(), centroids.to(dtype).float().transpose(-1, -2))
    if metric == "l2":
        scores = scores - 0.5 * centroids.to(dtype).float().square().sum(-1)[:, None]
    picked = torch.gather(scores, 2, assign.long()[..., None])[..., 0]
    assert torch.all(picked >= ref_score - 1e-4)


def test_update_kernel_matches_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 90, 64, generator=gen)
    centroids = torch.randn(2, 6, 64, generator=gen)
    assign = torch.randint(0, 5, (2, 90), generator=gen, dtype=torch.int32)  # cluster 5 stays empty
    assign[:, ::7] = -1  # left out
    out = km.kmeans_update_fwd(x, assign, centroids)
    ref = km.kmeans_update_reference(x, assign, centroids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 5], centroids[:, 5])  # an empty cluster keeps its centroid
    members = (assign[0] == 2) & (assign[0] >= 0)
    torch.testing.assert_close(ref[0, 2], x[0, members].mean(0))


def test_lloyd_kernels_match_reference_and_recover_clusters():
    x, _ = _clustered()
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[:, :5] = False
    init = ann.init_centroids(x, 16)
    centroids, assign = km.kmeans_lloyd_fwd(x, init, 3, valid)
    ref_centroids, ref_assign = km.kmeans_lloyd_reference(x, init, 3, valid)
    assert torch.equal(assign, ref_assign)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)
    assert torch.all(assign[:, :5] == -1)
    # Warm start: one more iteration from converged centroids changes nothing.
    again, again_assign = km.kmeans_lloyd_fwd(x, centroids, 1, valid)
    assert torch.equal(again_assign, assign)


@pytest.mark.parametrize("name", ["triton", "faiss", "exact"])
def test_search_recall_against_exact(name):
    x, centres = _clustered(per_cluster=24)
    gen = torch.Generator().manual_seed(3)
    queries = centres[:, torch.randint(0, 16, (20,), generator=gen)] + 0.05 * torch.randn(
        2, 20, 64, generator=gen
    )
    exact = ann.get_backend("exact").search(queries, x, 10)
    found = ann.get_backend(name).search(queries, x, 10, n_clusters=16, nprobe=2)
    assert found.shape == exact.shape == (2, 20, 10)
    assert ann.recall(found, exact) >= (1.0 if name == "exact" else 0.9)


@pytest.mark.parametrize("name", ["triton", "faiss", "exact"])
def test_cluster_mass_is_a_distribution_that_tracks_the_exact_mass(name):
    keys, _ = _clustered(groups=1, n_clusters=8, per_cluster=16)
    backend = ann.get_backend(name)
    centroids, assign = backend.kmeans(keys, ann.init_centroids(keys, 8), 3)
    queries = keys[:, :12] * 1.5
    bias = torch.zeros(keys.shape[:2])
    bias[:, 0] = 2.0
    mass = backend.cluster_mass(queries, keys, bias, assign, centroids, 0.5)
    exact = ann.get_backend("exact").cluster_mass(queries, keys, bias, assign, centroids, 0.5)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 12))
    probs = torch.softmax(torch.matmul(queries, keys.transpose(-1, -2)) * 0.5 + bias[:, None], -1)
    torch.testing.assert_close(exact[0, :, assign[0, 3]], probs[0][:, assign[0] == assign[0, 3]].sum(-1))
    assert (mass - exact).abs().max() <= 0.05  # tight clusters: centroid scores nearly exact


def test_backend_choice_and_errors(monkeypatch):
    assert ann.resolve_backend("auto", "cpu") == "faiss"  # faiss-cpu is a dev dependency here
    assert ann.resolve_backend("auto", "cuda") == "triton"
    assert isinstance(ann.get_backend("exact"), ann.ExactBackend)
    with pytest.raises(ValueError, match="ann_backend must be one of"):
        ann.check_backend_name("annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss not installed
    assert ann.resolve_backend("auto", "cpu") == "exact"
    with pytest.raises(ValueError, match="needs faiss: pip install faiss-cpu"):
        ann.check_backend_name("faiss")
    with pytest.raises(ValueError, match="exactly one of n_clusters and centroids"):
        ann.kmeans(torch.zeros(1, 4, 64))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_kmeans_kernels_on_gpu(dtype):
    x, _ = _clustered(groups=12, n_clusters=64, per_cluster=512, dim=128)
    x = x.cuda().to(dtype)
    init = ann.init_centroids(x, 64)
    assign, score = km.kmeans_assign_fwd(x, init)
    ref_assign, ref_score = km.kmeans_assign_reference(x, init)
    torch.testing.assert_close(score, ref_score, rtol=1e-4, atol=1e-3)
    assert (assign != ref_assign).float().mean() <= 1e-3
    torch.testing.assert_close(
        km.kmeans_update_fwd(x, ref_assign, init),
        km.kmeans_update_reference(x, ref_assign, init),
        rtol=1e-4,
        atol=1e-4,
    )


def test_init_centroids_covers_every_separated_cluster():
    """Farthest-point start: with as many centroids as true clusters each cluster gets exactly one
    (the evenly spaced pick it replaced left about 1/e of them without one); with more, every
    cluster still gets one."""
    x, centres = _clustered(n_clusters=16, per_cluster=24)
    for n_centroids in (16, 32):
        start = ann.init_centroids(x, n_centroids)
        assert start.shape == (2, n_centroids, 64) and start.dtype == torch.float32
        nearest = torch.cdist(start, centres).argmin(-1)  # [G, C]: the true cluster of each pick
        counts = torch.zeros(2, 16, dtype=torch.long).scatter_add_(1, nearest, torch.ones_like(nearest))
        assert counts.min() >= 1
