"""KV caches of rollouts (vidaccel.rollout; TempCache's in vidaccel.processors.tempcache): dense, rolling window, merged.

TempCache's cache-level behaviour: identical keys merge into one representative with the right count
and mean value (and attention over it equals attention over the duplicated keys), random keys do not
merge, the budget is never exceeded, sink frames never merge.
"""

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err

from vidaccel import TempCacheConfig, ops
from vidaccel.processors.tempcache import MergedKVCache
from vidaccel.rollout import DenseKVCache, RollingKVCache

B, H, D = 2, 2, 64
GRID_HW = (3, 4)  # tokens per frame: 12
P = GRID_HW[0] * GRID_HW[1]


def frame_index(first: int, frames: int) -> torch.Tensor:
    return torch.arange(first, first + frames).repeat_interleave(P)


def chunk(frames=3, dtype=torch.float32):
    return torch.randn(B, frames * P, H, D, dtype=dtype), torch.randn(B, frames * P, H, D, dtype=dtype)


def tempcache(dtype=torch.float32, **options) -> MergedKVCache:
    cache = MergedKVCache(TempCacheConfig(**{"sink_frames": 1, "max_tokens": 40 * P, **options}))
    cache.observe_grid((3, *GRID_HW))
    return cache


def rollout(cache, keys, values, chunk_frames=3):
    """Commit ``keys``/``values`` ``[B, F * P, H, D]`` chunk by chunk; returns the caches' N after each."""
    sizes = []
    frames = keys.shape[1] // P
    for first in range(0, frames, chunk_frames):
        part = slice(first * P, min(first + chunk_frames, frames) * P)
        k, v = keys[:, part], values[:, part]
        cache.extend(k, v)
        cache.commit(k, v, k_pre=k, frame_index=frame_index(first, k.shape[1] // P))
        sizes.append(cache.num_external)
    return sizes


# ------------------------------------------------------------------------------- dense and rolling


def test_dense_cache_prepends_every_committed_key_without_copying_the_cache():
    cache = DenseKVCache(capacity_tokens=9 * P)
    k0, v0 = chunk()
    k_all, v_all, bias = cache.extend(k0, v0)
    assert k_all is k0 and v_all is v0 and bias is None and cache.num_external == 0
    committed_k, committed_v = [], []
    for index in range(3):
        k, v = chunk()
        cache.commit(k, v, k_pre=None, frame_index=frame_index(3 * index, 3))
        committed_k.append(k)
        committed_v.append(v)
    own_k, own_v = chunk()
    k_all, v_all, bias = cache.extend(own_k, own_v)
    assert torch.equal(k_all, torch.cat([*committed_k, own_k], 1)) and torch.equal(
        v_all, torch.cat([*committed_v, own_v], 1)
    )
    again, _, _ = cache.extend(own_k, own_v)
    assert again.data_ptr() == k_all.data_ptr()  # views of one preallocated buffer
    assert cache.stats() == {"tokens": 9 * P, "frames": 9, "commits": 3}


def test_dense_cache_grows_past_its_capacity():
    cache = DenseKVCache()
    keys, values = chunk(frames=12)
    rollout(cache, keys, values)
    k_all, _, _ = cache.extend(*chunk())
    assert torch.equal(k_all[:, : 12 * P], keys)


@pytest.mark.parametrize("sink_frames", [0, 2])
def test_rolling_cache_keeps_sinks_and_the_most_recent_frames(sink_frames):
    cache = RollingKVCache(max_frames=7, sink_frames=sink_frames)
    keys, values = chunk(frames=15)
    sizes = rollout(cache, keys, values)
    assert sizes == [3 * P, 6 * P, 7 * P, 7 * P, 7 * P]
    nbytes = cache.nbytes
    k_all, v_all, bias = cache.extend(*chunk())
    assert bias is None and cache.nbytes == nbytes
    kept = list(range(sink_frames)) + list(range(15 - (7 - sink_frames), 15))
    expected = {tuple(keys[:, f * P : (f + 1) * P].flatten().tolist()) for f in kept}
    held = {tuple(k_all[:, f * P : (f + 1) * P].flatten().tolist()) for f in range(7)}
    assert held == expected
    pairs = {
        tuple(k_all[:, f * P : (f + 1) * P].flatten().tolist()): v_all[:, f * P : (f + 1) * P]
        for f in range(7)
    }
    for f in kept:  # values stay with their keys
        assert torch.equal(
            pairs[tuple(keys[:, f * P : (f + 1) * P].flatten().tolist())], values[:, f * P : (f + 1) * P]
        )


def test_caches_reject_bad_input():
    with pytest.raises(ValueError, match="sink_frames"):
        RollingKVCache(max_frames=3, sink_frames=3)
    with pytest.raises(ValueError, match="max_frames"):
        RollingKVCache(max_frames=0)
    with pytest.raises(ValueError, match="capacity_tokens"):
        DenseKVCache(capacity_tokens=0)
    cache = DenseKVCache()
    k, v = chunk()
    with pytest.raises(ValueError, match="frame_index"):
        cache.commit(k, v, k_pre=None, frame_index=frame_index(0, 2))
    cache.commit(k, v, k_pre=None, frame_index=frame_index(0, 3))
    with pytest.raises(ValueError, match="holds"):
        cache.extend(k[:1], v[:1])
    with pytest.raises(ValueError, match="TempCacheConfig"):
        MergedKVCache(object())


# ------------------------------------------------------------------------------- TempCache


def static_scene(frames, dtype=torch.float64):
    """Every frame repeats one frame's keys (identical content at every position); values random."""
    keys = torch.randn(B, P, H, D, dtype=dtype).repeat(1, frames, 1, 1)
    return keys, torch.randn(B, frames * P, H, D, dtype=dtype)


@pytest.mark.parametrize("scope", ["local", "previous_frame", "global"])
@pytest.mark.parametrize("per_head", [True, False])
def test_identical_keys_merge_into_one_representative_with_count_and_mean(scope, per_head):
    frames = 7
    keys, values = static_scene(frames, torch.float32)
    cache = tempcache(scope=scope, per_head=per_head)
    assert rollout(cache, keys, values) == [2 * P, 2 * P, 2 * P]
    k_all, v_all, bias = cache.extend(*chunk(1))
    # Slots 0..P-1: the sink frame, untouched; P..2P-1: one representative per position for frames 1..6.
    assert torch.equal(k_all[:, :P], keys[:, :P]) and torch.equal(v_all[:, :P], values[:, :P])
    assert torch.equal(k_all[:, P : 2 * P], keys[:, :P])
    mean = values[:, P:].reshape(B, frames - 1, P, H, D).mean(1)
    assert rel_err(v_all[:, P : 2 * P], mean) < 1e-6
    expected_bias = torch.tensor([0.0] * P + [float(torch.log(torch.tensor(frames - 1.0)))] * P + [0.0] * P)
    assert torch.allclose(bias, expected_bias.expand(B, H, -1))
    stats = cache.stats()
    assert stats["merged"] == (frames - 2) * P * B * H and stats["appended"] == P * B * H


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_over_merged_representatives_equals_attention_over_the_duplicates(dtype):
    """The merged-key identity, on the cache: bias log(count) + mean values == the dense cache."""
    keys, values = static_scene(10, dtype)
    merged, dense = tempcache(dtype), DenseKVCache()
    rollout(merged, keys, values)
    rollout(dense, keys, values)
    q = torch.randn(B, 3 * P, H, D, dtype=dtype)
    own_k, own_v = chunk(3, dtype)
    k_m, v_m, bias = merged.extend(own_k, own_v)
    k_d, v_d, _ = dense.extend(own_k, own_v)
    assert k_m.shape[1] == 5 * P and k_d.shape[1] == 13 * P
    out, lse = ops.attention(q, k_m, v_m, key_bias=bias, return_lse=True, backend="reference")
    ref, ref_lse = masked_attention_fp64(q, k_d, v_d)
    # key_bias is fp32 by contract: log(count) carries fp32 rounding (~1e-7 relative) even in fp64.
    tol = 3e-7 if dtype == torch.float64 else 2e-6
    assert rel_err(out, ref) < tol and rel_err(lse, ref_lse) < tol


@pytest.mark.parametrize("scope", ["local", "global"])
def test_random_keys_do_not_merge_and_attention_stays_exact(scope):
    keys, values = chunk(frames=9)
    cache, dense = tempcache(scope=scope), DenseKVCache()
    assert rollout(cache, keys, values) == rollout(dense, keys, values)
    assert cache.stats()["merged"] == 0 and cache.stats()["merge_rate"] == 0.0
    own = chunk()
    k_m, v_m, bias = cache.extend(*own)
    k_d, v_d, _ = dense.extend(*own)
    assert torch.equal(k_m, k_d) and torch.equal(v_m, v_d) and torch.equal(bias, torch.zeros_like(bias))


@pytest.mark.parametrize("per_head", [True, False])
def test_budget_is_never_exceeded_and_evicts_the_least_recently_updated(per_head):
    """Half of each frame is static (tracked, merged every frame), half is new content; a budget of
    the sink + 3 frames forces evictions, which must hit the stale new content, never the sink or
    the tracked representatives."""
    budget, frames = 4 * P, 16
    static = torch.randn(B, P // 2, H, D)
    keys = torch.cat([static.repeat(1, 1, 1, 1), torch.randn(B, P - P // 2, H, D)], 1)
    parts = [keys] + [torch.cat([static, torch.randn(B, P - P // 2, H, D)], 1) for _ in range(frames - 1)]
    keys, values = torch.cat(parts, 1), torch.randn(B, frames * P, H, D)
    cache = tempcache(max_tokens=budget, per_head=per_head, scope="previous_frame")
    nbytes = []
    for first in range(frames):
        part = slice(first * P, (first + 1) * P)
        cache.commit(keys[:, part], values[:, part], k_pre=keys[:, part], frame_index=frame_index(first, 1))
        assert cache.num_external <= budget and int(cache._n_reps.max()) <= budget
        nbytes.append(cache.nbytes)
    assert len(set(nbytes)) == 1  # preallocated at the first commit: memory is flat
    stats = cache.stats()
    assert stats["evicted"] > 0 and stats["tokens"] == budget
    k_all, _, bias = cache.extend(*chunk(1))
    assert torch.equal(k_all[:, :P], keys[:, :P]) and torch.equal(bias[:, :, :P], torch.zeros(B, H, P))
    # Every static position is still one representative holding all its non-sink frames.
    held = bias[:, :, P:budget].exp().round()
    assert ((held == frames - 1).sum(-1) == P // 2).all()


def test_sink_frames_never_merge():
    keys, values = static_scene(9, torch.float32)
    cache = tempcache(sink_frames=4, scope="global")
    rollout(cache, keys, values)
    k_all, v_all, bias = cache.extend(*chunk(1))
    assert cache.num_external == 5 * P  # four sink frames of identical content, then one representative
    assert torch.equal(k_all[:, : 4 * P], keys[:, : 4 * P]) and torch.equal(
        v_all[:, : 4 * P], values[:, : 4 * P]
    )
    assert torch.equal(bias[:, :, : 4 * P], torch.zeros(B, H, 4 * P))
    assert torch.allclose(bias[:, :, 4 * P : 5 * P].exp(), torch.full((B, H, P), 5.0))


def test_budget_smaller_than_the_sink_raises_at_the_first_commit():
    cache = MergedKVCache(TempCacheConfig(sink_frames=2, max_tokens=2 * P))
    k, v = chunk()
    with pytest.raises(ValueError, match=r"max_tokens must hold the sink frames plus one frame.*got 24"):
        cache.commit(k, v, k_pre=None, frame_index=frame_index(0, 3))


def test_heads_keep_their_own_representatives():
    """Per head: a head whose keys are static merges, a head whose keys are random does not; the
    padded slots of the smaller head are masked with -inf."""
    frames = 6
    keys, values = static_scene(frames, torch.float32)
    keys[:, :, 1] = torch.randn(B, frames * P, D)
    cache = tempcache(per_head=True)
    rollout(cache, keys, values)
    _, _, bias = cache.extend(*chunk(1))
    assert cache.num_external == frames * P
    assert torch.isinf(bias[:, 0, 2 * P : frames * P]).all() and torch.isfinite(bias[:, 1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["local", "previous_frame", "global"])
def test_tempcache_on_the_gpu_merges_a_static_scene_and_keeps_its_budget(scope):
    """Wan-1.3B shapes in bf16 on the Triton kernels: 3 sink frames, 6 static frames merge into one
    representative per position (count 6, mean value); 6 random frames then overflow the budget."""
    heads, dim, grid = 12, 128, (30, 52)
    per_frame = grid[0] * grid[1]
    keys = torch.randn(1, per_frame, heads, dim, device="cuda", dtype=torch.bfloat16).repeat(1, 9, 1, 1)
    values = torch.randn(1, 9 * per_frame, heads, dim, device="cuda", dtype=torch.bfloat16)
    cache = MergedKVCache(TempCacheConfig(sink_frames=3, max_tokens=5 * per_frame, scope=scope))
    cache.observe_grid((3, *grid))
    chunk_tokens = 3 * per_frame
    index = lambda first: torch.arange(first, first + 3, device="cuda").repeat_interleave(per_frame)  # noqa: E731
    for first in (0, 3, 6):
        part = slice(first * per_frame, (first + 3) * per_frame)
        cache.commit(keys[:, part], values[:, part], k_pre=keys[:, part], frame_index=index(first))
    assert cache.num_external == 4 * per_frame
    k_all, v_all, bias = cache.extend(keys[:, :chunk_tokens], values[:, :chunk_tokens])
    assert torch.allclose(bias[:, :, 3 * per_frame : 4 * per_frame].exp(), torch.tensor(6.0, device="cuda"))
    mean = values[:, chunk_tokens:].float().view(1, 6, per_frame, heads, dim).mean(1)
    assert rel_err(v_all[:, 3 * per_frame : 4 * per_frame], mean) < 1e-2
    for first in (9, 12):
        k, v = (
            torch.randn(1, chunk_tokens, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)
        )
        cache.commit(k, v, k_pre=k, frame_index=index(first))
        assert cache.num_external <= 5 * per_frame
    k_all, _, bias = cache.extend(keys[:, :chunk_tokens], values[:, :chunk_tokens])
    assert cache.stats()["evicted"] > 0 and torch.equal(k_all[:, :chunk_tokens], keys[:, :chunk_tokens])
    assert torch.equal(bias[:, :, :chunk_tokens], torch.zeros_like(bias[:, :, :chunk_tokens]))
