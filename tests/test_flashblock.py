"""FlashBlock: exact split-KV reuse of the cache part, refresh schedule, composition with TempCache and
AnnSA (residual reuse), chain order, state release, configs."""

import dataclasses
import types
import warnings

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err
from _tiny import run, tiny_causal_pipe, tiny_pipe

import vidaccel
from vidaccel import (
    AccelProcessor,
    AnnSAConfig,
    AttentionCall,
    FlashBlockConfig,
    StepContext,
    TempCacheConfig,
)
from vidaccel.processors import WanAdapter, annsa, flashblock, tokens
from vidaccel.processors.base import dense_attention
from vidaccel.rollout import set_rollout
from vidaccel.state import LayerInfo, context_of

pytestmark = pytest.mark.filterwarnings("ignore:vidaccel.ops")
TOL = 1e-5  # fp32
SQ, NUM_EXTERNAL, HEADS, DIM = 48, 80, 2, 64


# ------------------------------------------------------------------------------- method level


def _cache_bias(batch, gen):
    """TempCache-style key bias over [cache ; own]: log(count) on cache keys, an empty (-inf) slot, 0 on own keys."""
    bias = torch.zeros(batch, HEADS, NUM_EXTERNAL + SQ)
    bias[..., :NUM_EXTERNAL] = torch.randint(1, 4, (batch, HEADS, NUM_EXTERNAL), generator=gen).float().log()
    bias[0, 1, 5] = float("-inf")
    return bias


class _Steps:
    """A chunk's denoising steps at method level: a fixed cache, queries and own keys/values that
    drift from step to step (``drift``: share of fresh noise), as a rollout's calls see them."""

    def __init__(self, *, batch=2, drift=0.1, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.gen, self.drift, self.batch = gen, drift, batch
        self.cache_k, self.cache_v = (
            torch.randn(batch, NUM_EXTERNAL, HEADS, DIM, generator=gen) for _ in range(2)
        )
        self.bias = _cache_bias(batch, gen)
        self.q, self.k, self.v = (torch.randn(batch, SQ, HEADS, DIM, generator=gen) for _ in range(3))
        self.context = StepContext()
        set_rollout(self.context, "a rollout")
        self.context.chunk_index, self.context.phase = 1, "denoise"
        self.attn = torch.nn.Linear(1, 1)

    def call(self, step, *, backend="reference", phase="denoise", move_queries=True) -> AttentionCall:
        if step > 0:
            for name in ("q", "k", "v") if move_queries else ("k", "v"):
                old = getattr(self, name)
                fresh = torch.randn(old.shape, generator=self.gen)
                setattr(self, name, (1 - self.drift) ** 0.5 * old + self.drift**0.5 * fresh)
        self.context.chunk_step, self.context.phase = step, phase
        return AttentionCall(
            self.attn, "self", self.q, torch.cat([self.cache_k, self.k], 1), torch.cat([self.cache_v, self.v], 1),
            key_bias=self.bias, context=self.context, layer=LayerInfo(1, 4, "self", "blocks.1.attn1"),
            backend=backend, num_external=NUM_EXTERNAL,
        )  # fmt: skip

    def dense(self, call):
        return masked_attention_fp64(call.q, call.k, call.v, bias=call.key_bias)

    def kept(self):
        return self.context.module_state(self.attn)["flashblock"]["kept"][0]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cached_external_merged_with_fresh_internal_equals_attention_over_the_concatenation(backend):
    """Queries unchanged, own keys new: the non-refresh step equals attention over [cache ; own]."""
    steps, processor = _Steps(), AccelProcessor(FlashBlockConfig(refresh_every=2), backend=backend)
    for step in range(2):
        call = steps.call(step, backend=backend, move_queries=False)
        out, lse = processor.attend(call)
        ref_out, ref_lse = steps.dense(call)
        assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
    assert steps.kept().external[0].shape == (2, SQ, HEADS, DIM)


def test_refresh_every_two_reuses_the_refresh_steps_external_part():
    """Refresh steps 0 and 2 are exact; steps 1 and 3 are exactly the previous refresh's cache part
    (its queries) merged with the step's own part: a bounded difference from dense."""
    steps, processor = _Steps(), AccelProcessor(FlashBlockConfig(refresh_every=2))
    for step in range(4):
        call = steps.call(step)
        if step % 2 == 0:
            refresh_q = call.q
        out, _ = processor.attend(call)
        dense = steps.dense(call)[0]
        ext_out, ext_lse = masked_attention_fp64(
            refresh_q, steps.cache_k, steps.cache_v, bias=steps.bias[..., :NUM_EXTERNAL]
        )
        own_out, own_lse = masked_attention_fp64(
            call.q, steps.k, steps.v, bias=steps.bias[..., NUM_EXTERNAL:]
        )
        lse = torch.logaddexp(ext_lse, own_lse)
        stale = sum(
            torch.exp(part - lse).transpose(1, 2)[..., None] * o
            for o, part in ((ext_out, ext_lse), (own_out, own_lse))
        )
        assert rel_err(out, stale) <= TOL
        if step % 2 == 0:
            assert rel_err(out, dense) <= TOL
        else:
            assert 1e-3 < rel_err(out, dense) < 0.5


def test_refresh_last_recomputes_the_chunks_last_step():
    """``refresh_last`` recomputes the chunk's last step on top of ``refresh_every``: over 4 steps,
    ``refresh_every=3`` or ``4`` refresh at 0 and 3; a rollout that does not say its step count
    refreshes every ``refresh_every`` steps only."""
    for rollout_state, refresh_every, exact_steps in (
        (types.SimpleNamespace(steps_per_chunk=4), 3, {0, 3}),
        (types.SimpleNamespace(steps_per_chunk=4), 4, {0, 3}),
        ("a rollout without a step count", 4, {0}),
        (types.SimpleNamespace(steps_per_chunk=3), 4, {0, 2}),
    ):
        config = FlashBlockConfig(refresh_every=refresh_every, refresh_last=True)
        steps, processor = _Steps(), AccelProcessor(config)
        set_rollout(steps.context, rollout_state)
        for step in range(rollout_state.steps_per_chunk if not isinstance(rollout_state, str) else 4):
            call = steps.call(step)
            error = rel_err(processor.attend(call)[0], steps.dense(call)[0])
            assert (error <= TOL) == (step in exact_steps), (rollout_state, refresh_every, step, error)
    steps, processor = _Steps(), AccelProcessor(FlashBlockConfig(refresh_every=2, refresh_last=False))
    set_rollout(steps.context, types.SimpleNamespace(steps_per_chunk=4))
    errors = []
    for step in range(4):
        call = steps.call(step)
        errors.append(rel_err(processor.attend(call)[0], steps.dense(call)[0]))
    assert errors[0] <= TOL and errors[2] <= TOL and errors[1] > 1e-3 and errors[3] > 1e-3


def test_commit_runs_plain_attention_and_drops_the_kept_state():
    steps, processor = _Steps(), AccelProcessor(FlashBlockConfig(refresh_every=4))
    processor.attend(steps.call(0))
    assert steps.kept().external is not None
    call = steps.call(1, phase="commit")
    out, _ = processor.attend(call)
    assert rel_err(out, steps.dense(call)[0]) <= TOL
    assert "kept" not in steps.context.module_state(steps.attn)["flashblock"]
    steps.context.reset()
    assert steps.context.module_state(steps.attn) == {}


# ------------------------------------------------------------------------------- residual reuse (AnnSA)

SPARSE = dict(dense_layers=0, dense_steps=0, block_size=16, ann_backend="exact")


def test_split_routing_parts_are_exact_complements():
    """Routed + remainder of one sparse plan (top_k=1 of 4 clusters) merge to dense attention."""
    steps = _Steps()
    call = steps.call(0)
    external = call.replace(k=steps.cache_k, v=steps.cache_v, key_bias=steps.bias[..., :NUM_EXTERNAL])
    plan = annsa.build_plan(
        call.q, external.k, AnnSAConfig(n_clusters=4, top_k=1, **SPARSE), key_bias=external.key_bias
    )
    routed, remainder = flashblock.split_routing(plan)
    assert 0 < plan.density() < 1 and routed is plan
    assert not (routed.blocks.block_mask & remainder.blocks.block_mask).any()
    out, lse = vidaccel.ops.merge_attention(
        *tokens.run_plan(routed, external, dense_attention),
        *tokens.run_plan(remainder, external, dense_attention),
    )
    ref_out, ref_lse = masked_attention_fp64(call.q, external.k, external.v, bias=external.key_bias)
    assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL


def _chunk(processor, steps):
    return [processor.attend(steps.call(step))[0] for step in range(4)]


def test_residual_reuse_with_every_block_routed_equals_annsa_alone():
    routed_all = AnnSAConfig(top_p=1.0, **SPARSE)
    alone, steps = _chunk(AccelProcessor(routed_all), _Steps()), _Steps()
    residual = _chunk(AccelProcessor(FlashBlockConfig(), routed_all), steps)
    kept = steps.kept()
    assert kept.routed is not None and kept.external is None  # the cache is all routed: nothing kept
    for ours, ref in zip(residual, alone, strict=True):
        assert rel_err(ours, ref) <= TOL


def test_residual_reuse_with_no_block_routed_equals_flashblock_alone(monkeypatch):
    everything = lambda plan: (  # noqa: E731
        None,
        dataclasses.replace(
            plan, blocks=vidaccel.ops.plan_blocks(torch.ones_like(plan.blocks.block_mask), (16, 16))
        ),
    )
    monkeypatch.setattr(flashblock, "split_routing", everything)
    alone = _chunk(AccelProcessor(FlashBlockConfig()), _Steps())
    steps = _Steps()
    residual = _chunk(AccelProcessor(FlashBlockConfig(), AnnSAConfig(top_p=1.0, **SPARSE)), steps)
    assert steps.kept().routed is None and steps.kept().external is not None
    for ours, ref in zip(residual, alone, strict=True):
        assert rel_err(ours, ref) <= TOL


def test_sparse_residual_reuse_freezes_the_routing_and_is_exact_with_unchanged_queries(monkeypatch):
    """top_k=1: the plan of the cache part is built at refresh steps only, and with the refresh's
    queries the routed blocks (fresh) + the kept remainder give exactly dense attention on the cache part."""
    builds = []
    real = annsa.build_plan
    monkeypatch.setattr(
        annsa, "build_plan", lambda q, k, *a, **kw: builds.append(k.shape[1]) or real(q, k, *a, **kw)
    )
    router = AnnSAConfig(n_clusters=4, top_k=1, refresh_every=10, **SPARSE)
    steps = _Steps()
    processor = AccelProcessor(router, FlashBlockConfig(refresh_every=2))  # FlashBlock runs first anyway
    assert isinstance(processor.methods[0], flashblock.FlashBlock)
    for step in range(4):
        call = steps.call(step, move_queries=False)
        out, _ = processor.attend(call)
        kept = steps.kept()
        assert kept.routed is not None and kept.external is not None
        # The own keys go through AnnSA (one plan per AnnSA refresh); compare with its output on them.
        external = call.replace(k=steps.cache_k, v=steps.cache_v, key_bias=steps.bias[..., :NUM_EXTERNAL])
        own = call.replace(k=steps.k, v=steps.v, key_bias=steps.bias[..., NUM_EXTERNAL:], num_external=0)
        internal_plan = steps.context.module_state(steps.attn)["annsa"]["plan"]
        ref = vidaccel.ops.merge_attention(
            *(
                t.float()
                for t in masked_attention_fp64(call.q, external.k, external.v, bias=external.key_bias)
            ),
            *tokens.run_plan(internal_plan, own, dense_attention),
        )[0]
        assert rel_err(out, ref) <= TOL
    assert (
        builds.count(NUM_EXTERNAL) == 2 and builds.count(SQ) == 1
    )  # cache part at steps 0 and 2; own part once


# ------------------------------------------------------------------------------- rollouts


@pytest.fixture(scope="module")
def causal_pipe():
    return tiny_causal_pipe()


def rollout(pipe, embeds, after_chunk=None, num_frames=9):
    """``num_frames`` latent frames of 4 x 6 tokens in chunks of 3: ``[1, 16, num_frames, 4, 6]`` latents."""
    chunks = []
    for out in pipe.stream(
        prompt_embeds=embeds, height=8, width=12, num_frames=num_frames, chunk_frames=3, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ):  # fmt: skip
        chunks.append(out.frames)
        if after_chunk is not None:
            after_chunk()
    return torch.cat(chunks, 2)


def test_rollout_refresh_every_one_equals_dense_and_two_differs_after_the_first_chunk(
    causal_pipe, monkeypatch
):
    pipe, embeds = causal_pipe
    dense = rollout(pipe, embeds)
    merges = []
    real_merge = vidaccel.ops.merge_attention
    monkeypatch.setattr(
        vidaccel.ops, "merge_attention", lambda *a, **kw: merges.append(1) or real_merge(*a, **kw)
    )
    try:
        vidaccel.apply(pipe, FlashBlockConfig(refresh_every=1))
        exact = rollout(pipe, embeds)
        assert len(merges) == 2 * 2 * 4  # 2 chunks with a cache x 2 layers x 4 steps
        vidaccel.apply(pipe, FlashBlockConfig(refresh_every=2))
        reused = rollout(pipe, embeds)
    finally:
        vidaccel.remove(pipe)
    assert rel_err(exact, dense) <= TOL
    assert rel_err(reused[:, :, :3], dense[:, :, :3]) <= TOL  # the first chunk has no cache
    assert torch.isfinite(reused).all() and 1e-4 < rel_err(reused, dense) < 0.5


def test_rollout_tells_flashblock_its_step_count(causal_pipe, monkeypatch):
    """CausalWanPipeline publishes its steps per chunk: the default schedule recomputes the external
    part at the first and the last of the 4 steps, as many refreshes as ``refresh_every=2`` alone."""
    pipe, embeds = causal_pipe
    refreshed = []
    real_refresh = flashblock.FlashBlock._refresh

    def recording(self, *args, **kwargs):
        refreshed.append(context_of(pipe.transformer).chunk_step)
        return real_refresh(self, *args, **kwargs)

    monkeypatch.setattr(flashblock.FlashBlock, "_refresh", recording)
    try:
        for config, expected in (
            (FlashBlockConfig(), [0, 3]),
            (FlashBlockConfig(refresh_every=2, refresh_last=False), [0, 2]),
            (FlashBlockConfig(refresh_every=2, refresh_last=True), [0, 2, 3]),
        ):
            refreshed.clear()
            vidaccel.apply(pipe, config)
            out = rollout(pipe, embeds)
            assert torch.isfinite(out).all()
            per_layer_and_chunk = 2 * 2  # 2 layers x 2 chunks with a cache
            assert sorted(set(refreshed)) == expected, config
            assert len(refreshed) == len(expected) * per_layer_and_chunk, config
    finally:
        vidaccel.remove(pipe)


def test_rollout_composes_with_tempcache(causal_pipe, monkeypatch):
    """Two chunks: the second attends to the merged cache (log-count bias) through FlashBlock."""
    pipe, embeds = causal_pipe
    tempcache = TempCacheConfig(threshold=0.5, sink_frames=1)
    external_biases = []
    real_split = flashblock._split
    monkeypatch.setattr(
        flashblock,
        "_split",
        lambda call, n: external_biases.append(call.key_bias[..., :n]) or real_split(call, n),
    )
    try:
        vidaccel.apply(pipe, tempcache)
        alone = rollout(pipe, embeds, num_frames=6)
        vidaccel.apply(pipe, tempcache, FlashBlockConfig(refresh_every=1))  # FlashBlock still runs first
        assert isinstance(pipe.transformer.blocks[0].attn1.processor.methods[0], flashblock.FlashBlock)
        combined = rollout(pipe, embeds, num_frames=6)
        vidaccel.apply(pipe, FlashBlockConfig(refresh_every=2), tempcache)
        reused = rollout(pipe, embeds, num_frames=6)
    finally:
        vidaccel.remove(pipe)
    assert rel_err(combined, alone) <= TOL
    assert any((bias > 0).any() for bias in external_biases)  # merged representatives: log(count) > 0
    assert torch.isfinite(reused).all() and 1e-4 < rel_err(reused, alone) < 0.5


def test_kept_state_lives_during_a_chunk_and_is_released_at_commit_and_generation_end(causal_pipe):
    pipe, embeds = causal_pipe
    context = context_of(pipe.transformer)
    layers = [attn for attn, info in WanAdapter().layers(pipe.transformer).items() if info.kind == "self"]
    during, after = [], []

    def kept():
        return [context.module_state(attn).get("flashblock", {}).get("kept") for attn in layers]

    handle = pipe.transformer.register_forward_hook(
        lambda *_: during.append((context.phase, context.chunk_index, kept()))
    )
    vidaccel.apply(pipe, FlashBlockConfig())
    try:
        rollout(pipe, embeds, after_chunk=lambda: after.append(kept()))
        ended = kept()
    finally:
        handle.remove()
        vidaccel.remove(pipe)
    denoising = [ks for phase, chunk, ks in during if phase == "denoise" and chunk > 0]
    assert len(denoising) == 8 and all(k and k[0].external is not None for ks in denoising for k in ks)
    assert all(k is None for phase, _, ks in during if phase == "commit" for k in ks)
    assert all(k is None for ks in after[:-1] for k in ks)  # committed chunks
    assert all(k is not None for k in after[-1])  # the last chunk has no commit pass: kept until the end
    assert all(k is None for k in ended)  # the end of the generation released it


def test_outside_a_rollout_calls_run_unchanged_with_one_warning():
    """On a bare transformer apply cannot tell whether a rollout will run: FlashBlock is installed and
    says so at its first call outside one (on a pipeline that runs none, apply refuses it:
    tests/test_apply.py)."""
    pipe = tiny_pipe(head_dim=64)
    vidaccel.apply(pipe)
    dense = run(pipe)
    vidaccel.apply(pipe.transformer, FlashBlockConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run(pipe)
    vidaccel.remove(pipe)
    assert torch.equal(ours, dense)
    assert sum("FlashBlock acts on" in str(w.message) for w in caught) == 1


# ------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(refresh_every=0), r"FlashBlockConfig.refresh_every must be an int in \[1, inf\), got 0"),
        (dict(refresh_every=1.5), r"FlashBlockConfig.refresh_every must be an int in \[1, inf\)"),
        (dict(refresh_every=True), r"FlashBlockConfig.refresh_every must be an int in \[1, inf\)"),
        (dict(offload="yes"), r"FlashBlockConfig.offload must be a bool"),
        (dict(refresh_last=1), r"FlashBlockConfig.refresh_last must be a bool, got 1"),
    ],
)
def test_bad_configuration_raises_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlashBlockConfig(**kwargs)


def test_processor_takes_only_a_flashblock_config():
    assert isinstance(vidaccel.FlashBlockProcessor().methods[0], flashblock.FlashBlock)
    with pytest.raises(ValueError, match="must be a vidaccel.FlashBlockConfig"):
        vidaccel.FlashBlockProcessor(TempCacheConfig())


# ------------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
def test_flashblock_on_gpu_bf16_and_offload():
    """Compiled kernels, bf16, 128-dim heads: the refresh step equals dense attention within bf16
    rounding, and offloading the kept part to pinned CPU memory changes nothing."""
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, s, 4, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        for s in (1024, 5120, 5120)
    )
    context = StepContext()
    set_rollout(context, "a rollout")
    context.chunk_index, context.phase = 1, "denoise"
    attn = torch.nn.Linear(1, 1)
    outs = {}
    for offload in (False, True):
        processor = AccelProcessor(FlashBlockConfig(refresh_every=2, offload=offload), backend="triton")
        for step in range(2):
            context.chunk_step = step
            call = AttentionCall(attn, "self", q, k, v, context=context, backend="triton", num_external=4096)
            outs[offload, step] = processor.attend(call)[0]
        kept = context.module_state(attn)["flashblock"]["kept"][0].external
        assert kept[0].is_cuda != offload and (not offload or kept[0].is_pinned())
        context.reset()
        set_rollout(context, "a rollout")
        context.chunk_index, context.phase = 1, "denoise"
    dense = masked_attention_fp64(q, k, v)[0]
    assert rel_err(outs[False, 0], dense) <= 1e-2 and rel_err(outs[False, 1], dense) <= 1e-2
    assert torch.equal(outs[False, 1], outs[True, 1])
