"""TempCache: the match and merge kernels against their references, the config, and the method in a
CausalWanPipeline rollout (threshold 1 reproduces the dense cached rollout)."""

import pytest
import torch
from _helpers import rel_err
from _tiny import tiny_causal_pipe

import vidaccel
from vidaccel import TempCacheConfig, TempCacheProcessor
from vidaccel.kernels.tempcache import (
    tempcache_match_fwd,
    tempcache_match_reference,
    tempcache_merge_fwd,
    tempcache_merge_reference,
)
from vidaccel.ops import tempcache_match
from vidaccel.processors.tempcache import MergedKVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def normalized(*shape, dtype=torch.float32, device=DEVICE):
    return torch.nn.functional.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype)


# ------------------------------------------------------------------------------- match kernel

MATCH_CASES = {
    "map": dict(map=True),
    "map-local": dict(map=True, width=5, radius=1),
    "range": dict(map=False, start=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim", [64, 192], ids=["d64", "d192-concatenated-heads"])
@pytest.mark.parametrize("case", MATCH_CASES, ids=list(MATCH_CASES))
def test_match_kernel_equals_reference(case, dim, dtype):
    opts = dict(MATCH_CASES[case])
    batch, seq, heads, cap = 2, 35, 2, 50  # 35 = 7 rows of 5: ragged against every tile
    keys, reps = (
        normalized(batch, seq, heads, dim, dtype=dtype),
        normalized(batch, cap, heads, dim, dtype=dtype),
    )
    if opts.pop("map"):
        opts["slot_map"] = torch.randint(-1, cap, (batch, heads, seq), dtype=torch.int32, device=DEVICE)
    else:
        opts["num_reps"] = torch.tensor(
            [[cap, 20], [3, 41]], dtype=torch.int32, device=DEVICE
        )  # [.., 3]: none
    sim, slot = tempcache_match_fwd(keys, reps, **opts)
    ref_sim, ref_slot = tempcache_match_reference(keys, reps, **opts)
    assert torch.equal(slot, ref_slot)
    found = ref_slot >= 0
    assert torch.isneginf(sim[~found]).all() and (sim[found] - ref_sim[found]).abs().max() < 1e-5
    if "num_reps" in opts:  # batch 1, head 0 has no slot past start=3: no candidate at all
        assert not found[1, 0].any() and found[0].all()


def test_local_radius_restricts_the_candidates():
    """Candidates lie within the radius of the key's grid position: a key whose exact copy sits two
    columns away finds it with radius 2, not with radius 1."""
    width, rows, heads, dim = 6, 4, 1, 64
    seq = width * rows
    reps = normalized(1, seq, heads, dim)
    slot_map = torch.arange(seq, dtype=torch.int32, device=DEVICE).view(1, 1, seq)
    shifted = torch.roll(reps.view(1, rows, width, heads, dim), shifts=2, dims=2).reshape(1, seq, heads, dim)
    _, near = tempcache_match(shifted, reps, slot_map=slot_map, width=width, radius=1)
    sim, far = tempcache_match(shifted, reps, slot_map=slot_map, width=width, radius=2)
    expected = torch.roll(torch.arange(seq, device=DEVICE).view(rows, width), shifts=2, dims=1).flatten()
    inside = (torch.arange(seq, device=DEVICE) % width) >= 2  # the copy is not wrapped around the row
    assert torch.equal(far[0, 0][inside], expected[inside].int()) and (sim[0, 0][inside] > 0.999).all()
    assert not torch.equal(near[0, 0][inside], expected[inside].int())


# ------------------------------------------------------------------------------- merge kernel


def merge_case(dtype, batch=2, seq=29, heads=3, cap=40, dim=64):
    """Representatives and one frame's keys with duplicate merge targets and new representatives."""
    g = torch.Generator().manual_seed(3)
    reps = [torch.randn(batch, cap, heads, dim, generator=g).to(dtype) for _ in range(3)]
    count = torch.randint(1, 6, (batch, heads, cap), generator=g, dtype=torch.int32)
    log_count = torch.log(count.float())
    new = [torch.randn(batch, seq, heads, dim, generator=g).to(dtype) for _ in range(3)]
    merge = torch.rand(batch, heads, seq, generator=g) < 0.7
    slot = torch.empty(batch, heads, seq, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            perm = torch.randperm(cap, generator=g)
            targets = perm[torch.randint(0, 4, (seq,), generator=g)]  # four targets: many duplicates
            slot[b, h] = torch.where(merge[b, h], targets, 0)
            slot[b, h][~merge[b, h]] = perm[4 : 4 + int((~merge[b, h]).sum())]
    sim = torch.rand(batch, heads, seq, generator=g)
    sim[:, :, :6] = 0.5  # ties: the lowest token wins
    move = lambda ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    return move(reps + [count, log_count]), move(new + [slot, merge, sim])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_merge_kernel_equals_reference(dtype):
    state, frame = merge_case(dtype)
    ours = [t.clone() for t in state]
    ref = [t.clone() for t in state]
    tempcache_merge_fwd(*ours, *frame)
    tempcache_merge_reference(*ref, *frame)
    rep_k, rep_v, rep_m, count, log_count = ours
    assert torch.equal(rep_k, ref[0]) and torch.equal(rep_m, ref[2]) and torch.equal(count, ref[3])
    assert torch.allclose(log_count, ref[4]) and rel_err(rep_v, ref[1]) < (
        1e-6 if dtype == torch.float32 else 1e-3
    )
    assert not torch.equal(count, state[3])  # the case did merge


def test_merge_reference_semantics_by_hand():
    """Two keys merging into one representative both count; values average; the best match's key wins."""
    state, _ = merge_case(torch.float64, batch=1, seq=3, heads=1, cap=4, dim=2)
    rep_k, rep_v, rep_m, count, log_count = state
    count[0, 0, 1] = 2
    k = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]], [[3.0, 0.0]]]], dtype=torch.float64, device=DEVICE)
    v = torch.tensor([[[[4.0, 8.0]], [[6.0, 2.0]], [[1.0, 1.0]]]], dtype=torch.float64, device=DEVICE)
    slot = torch.tensor([[[1, 1, 3]]], device=DEVICE)
    merge = torch.tensor([[[True, True, False]]], device=DEVICE)
    sim = torch.tensor([[[0.96, 0.99, float("-inf")]]], device=DEVICE)
    old_v = rep_v[0, 1, 0].clone()
    tempcache_merge_reference(rep_k, rep_v, rep_m, count, log_count, k, v, k, slot, merge, sim)
    assert count[0, 0, 1] == 4 and count[0, 0, 3] == 1
    assert torch.allclose(rep_v[0, 1, 0], (2 * old_v + v[0, 0, 0] + v[0, 1, 0]) / 4)
    assert torch.equal(rep_k[0, 1, 0], k[0, 1, 0]) and torch.equal(rep_v[0, 3, 0], v[0, 2, 0])
    assert torch.allclose(
        log_count[0, 0, [1, 3]].double(), torch.log(torch.tensor([4.0, 1.0], dtype=torch.float64))
    )


@pytest.mark.gpu
def test_kernels_equal_references_on_the_gpu_in_bf16():
    keys, reps = (
        normalized(1, 1560, 12, 128, dtype=torch.bfloat16),
        normalized(1, 8000, 12, 128, dtype=torch.bfloat16),
    )
    slot_map = torch.randint(0, 8000, (1, 12, 1560), dtype=torch.int32, device=DEVICE)
    for opts in (
        dict(slot_map=slot_map, width=52, radius=2),
        dict(num_reps=torch.full((1, 12), 8000, dtype=torch.int32, device=DEVICE)),
    ):
        sim, slot = tempcache_match_fwd(keys, reps, **opts)
        ref_sim, ref_slot = tempcache_match_reference(keys, reps, **opts)
        agree = (slot == ref_slot).float().mean()
        assert (
            agree > 0.999 and (sim - ref_sim).abs().max() < 1e-4
        )  # fp32 sums in another order may flip near-ties
    state, frame = merge_case(torch.bfloat16, seq=1560, heads=12, cap=4000, dim=128)
    ours, ref = [t.clone() for t in state], [t.clone() for t in state]
    tempcache_merge_fwd(*ours, *frame)
    tempcache_merge_reference(*ref, *frame)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[3], ref[3]) and rel_err(ours[1], ref[1]) < 1e-2


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("threshold", 1.5, r"TempCacheConfig.threshold must be a float in \[-1, 1\], got 1.5"),
        ("threshold", -1.01, r"threshold must be a float in \[-1, 1\]"),
        ("threshold", float("nan"), r"threshold"),
        ("sink_frames", -1, r"sink_frames must be an int in \[0, inf\)"),
        ("sink_frames", 1.0, r"sink_frames must be an int"),
        ("max_tokens", 0, r"max_tokens must be an int in \[1, inf\)"),
        ("radius", -1, r"radius must be an int in \[0, inf\)"),
        ("scope", "nearby", r"scope must be one of \('local', 'previous_frame', 'global'\)"),
        ("match_keys", "rotated", r"match_keys must be one of"),
        ("per_head", 1, r"per_head must be a bool"),
    ],
)
def test_bad_configuration_raises_a_clear_value_error(field, value, message):
    with pytest.raises(ValueError, match=message):
        TempCacheConfig(**{field: value})


def test_processor_takes_only_a_tempcache_config():
    assert TempCacheProcessor().configs == (TempCacheConfig(),)
    with pytest.raises(ValueError, match="TempCacheConfig"):
        TempCacheProcessor(vidaccel.AnnSAConfig(top_p=0.9))


# ------------------------------------------------------------------------------- rollout


@pytest.fixture(scope="module")
def causal_pipe():
    return tiny_causal_pipe()


def rollout(pipe, embeds, stats=None):
    """Nine latent frames of 4 x 6 tokens in chunks of 3; ``stats`` collects the cache stats per chunk."""
    chunks = []
    for out in pipe.stream(
        prompt_embeds=embeds, height=8, width=12, num_frames=9, chunk_frames=3, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ):  # fmt: skip
        chunks.append(out.frames)
        if stats is not None:
            stats.append(pipe.kv_cache_stats())
    return torch.cat(chunks, 2)


def test_threshold_one_reproduces_the_dense_cached_rollout(causal_pipe):
    pipe, embeds = causal_pipe
    dense = rollout(pipe, embeds)
    vidaccel.apply(pipe, TempCacheConfig(threshold=1.0, sink_frames=1, max_tokens=9 * 24))
    try:
        stats = []
        merged = rollout(pipe, embeds, stats)
        vidaccel.apply(pipe, TempCacheConfig(threshold=-1.0, sink_frames=1, max_tokens=9 * 24))
        everything = []
        collapsed = rollout(pipe, embeds, everything)
    finally:
        vidaccel.remove(pipe)
    assert rel_err(merged, dense) < 1e-5
    assert [s["first_layer"]["tokens"] for s in stats[:2]] == [3 * 24, 6 * 24]
    assert stats[1]["first_layer"]["merged"] == 0
    # threshold -1 merges every non-sink key: the cache stays at the sink frame + one frame.
    assert [s["first_layer"]["tokens"] for s in everything[:2]] == [2 * 24, 2 * 24]
    assert everything[1]["first_layer"]["merge_rate"] > 0.7
    assert torch.isfinite(collapsed).all() and rel_err(collapsed, dense) > 1e-3


def test_cache_is_sized_to_the_rollout_with_the_same_result(causal_pipe, monkeypatch):
    """A rollout that commits fewer tokens than ``max_tokens`` gets buffers of its own size: the same
    frames bit for bit as buffers of the whole budget (nothing is evicted either way), less memory."""
    pipe, embeds = causal_pipe
    config = TempCacheConfig(threshold=0.9, sink_frames=1, max_tokens=64 * 24)  # budget: 64 frames
    vidaccel.apply(pipe, config)
    try:
        sized_stats, budget_stats = [], []
        sized = rollout(pipe, embeds, sized_stats)
        # the earlier behaviour: every cache allocates the whole budget
        monkeypatch.setattr(
            vidaccel.processors.tempcache.TempCache,
            "make_kv_cache",
            lambda self, rollout=None: MergedKVCache(self.config),
        )
        vidaccel.apply(pipe, config)
        full = rollout(pipe, embeds, budget_stats)
    finally:
        vidaccel.remove(pipe)
    assert torch.equal(sized, full)
    assert [s["first_layer"] for s in sized_stats] == [s["first_layer"] for s in budget_stats]
    # 3 chunks of 3 frames of 24 tokens: the last chunk is never committed, so 6 frames = 144 slots
    # against 1,536, plus one chunk of own-key slots in both
    assert sized_stats[0]["nbytes"] < budget_stats[0]["nbytes"] / 4
    cache = MergedKVCache(config, rollout_tokens=6 * 24)
    assert cache.rollout_tokens == 144
    with pytest.raises(
        ValueError, match=r"MergedKVCache.rollout_tokens must be an int in \[0, inf\) or None, got -1"
    ):
        MergedKVCache(config, rollout_tokens=-1)


def test_rollout_longer_than_the_budget_keeps_the_budget(causal_pipe):
    """Past the budget the cache holds ``max_tokens`` slots and evicts, as before."""
    pipe, embeds = causal_pipe
    vidaccel.apply(pipe, TempCacheConfig(threshold=1.0, sink_frames=1, max_tokens=3 * 24))
    try:
        stats = []
        out = rollout(pipe, embeds, stats)
    finally:
        vidaccel.remove(pipe)
    assert torch.isfinite(out).all()
    assert stats[-1]["first_layer"]["tokens"] <= 3 * 24 and stats[-1]["first_layer"]["evicted"] > 0
