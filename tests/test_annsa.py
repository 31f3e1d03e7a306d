"""AnnSA: exact with every cluster routed, routed sparsity, plan reuse, configs, tiny WanPipeline."""

import warnings

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err
from _tiny import run, tiny_pipe

import vidaccel
from vidaccel import AnnSAConfig, AnnSAProcessor, AttentionCall, StepContext
from vidaccel.processors import annsa, tokens
from vidaccel.processors.base import dense_attention
from vidaccel.state import LayerInfo

pytestmark = pytest.mark.filterwarnings("ignore:vidaccel")
TOL = 1e-5


def _clustered_qkv(
    batch=1, seq_q=96, seq_k=128, heads=2, dim=64, n_clusters=4, seed=0, norm=8.0, noise=0.05, labels=False
):
    """Queries and keys around ``n_clusters`` well-separated centres of norm ``norm`` per head, in
    shuffled order, so that each query attends almost only to its own cluster's keys. With
    ``labels`` also ``(q_label [B, Sq], k_label [B, Sk])``, each token's true cluster."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(heads, n_clusters, dim, generator=gen), dim=-1) * norm

    def around(seq):
        label = torch.randint(0, n_clusters, (batch, seq), generator=gen)
        x = centres[:, label].permute(1, 2, 0, 3)  # [B, S, H, D]
        return x + noise * torch.randn(x.shape, generator=gen), label

    (q, q_label), (k, k_label) = around(seq_q), around(seq_k)
    v = torch.randn(batch, seq_k, heads, dim, generator=gen)
    return (q, k, v, (q_label, k_label)) if labels else (q, k, v)


def _own_cluster_error(q, k, v, labels, ref):
    """The error of attending to exactly each query's own true cluster: what a routing that finds
    the own cluster and nothing else gives (the mass outside it is dropped)."""
    q_label, k_label = labels
    own = (q_label[:, None, :, None] == k_label[:, None, None, :]).to(q.device)  # [B, 1, Sq, Sk]
    return rel_err(masked_attention_fp64(q, k, v, mask=own)[0], ref)


def _cache_bias(batch, heads, seq_k, gen):
    """A TempCache-like key bias: log(count) per key, two empty (-inf) slots."""
    bias = torch.randint(1, 4, (batch, heads, seq_k), generator=gen).float().log()
    bias[..., 7] = float("-inf")
    bias[0, 0, 40] = float("-inf")
    return bias


@pytest.mark.parametrize("ann_backend", ["triton", "faiss", "exact"])
@pytest.mark.parametrize("ops_backend", ["triton", "reference"])
def test_every_cluster_routed_equals_dense(ann_backend, ops_backend):
    """top_p = 1 reproduces dense attention, with a cache-style key bias, sinks, Sq != Sk, batch 2."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, s, 2, 64, generator=gen) for s in (70, 100, 100))
    bias = _cache_bias(2, 2, 100, gen)
    config = AnnSAConfig(n_clusters=5, top_p=1.0, sink_tokens=3, ann_backend=ann_backend, block_size=32)
    plan = annsa.build_plan(q, k, config, key_bias=bias)
    call = AttentionCall(None, "self", q, k, v, key_bias=bias, backend=ops_backend, num_external=60)
    out, lse = tokens.run_plan(plan, call, dense_attention)
    ref, ref_lse = masked_attention_fp64(q, k, v, bias=bias)
    assert rel_err(out, ref) <= TOL
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ann_backend", ["triton", "exact"])
def test_routing_keeps_the_attention_mass(ann_backend):
    """On clustered inputs, routing 90% of the estimated mass is sparse yet close to dense, and the
    output is exact attention over the visited blocks."""
    q, k, v = _clustered_qkv()
    config = AnnSAConfig(
        n_clusters=6, top_p=0.9, sink_tokens=8, ann_backend=ann_backend, block_size=8, kmeans_iters=3
    )
    plan = annsa.build_plan(q, k, config)
    call = AttentionCall(None, "self", q, k, v, backend="reference")
    out, _ = tokens.run_plan(plan, call, dense_attention)
    assert plan.density() <= 0.6  # 4 true clusters, plus sinks and partly filled blocks
    assert rel_err(out, masked_attention_fp64(q, k, v)[0]) <= 0.05
    assert plan.blocks.block_mask[..., 0].all()  # the sink block is visited by every query block
    # The same result as explicit masked attention with the plan's layout, mapped back to raster order.
    q_p, k_p, v_p = (
        tokens.gather_tokens(t, p) for t, p in ((q, plan.q_perm), (k, plan.k_perm), (v, plan.k_perm))
    )
    mask = plan.blocks.expand_mask(q.shape[1], k.shape[1])
    ref_p, _ = masked_attention_fp64(q_p, k_p, v_p, mask=mask)
    assert rel_err(out, tokens.gather_tokens(ref_p, plan.q_inverse)) <= TOL


@pytest.mark.parametrize(
    "routing, max_density, max_err",
    [(dict(top_p=0.95), 0.08, 0.02), (dict(top_k=3), 0.13, 0.05)],
)
def test_routing_fidelity_on_fragmented_clusters(routing, max_density, max_err):
    """The benchmark's clustered inputs scaled down: 32 true clusters, more k-means clusters (64)
    than true ones, so true clusters split into fragments, and every query must still get all of its
    own cluster. Before the farthest-point start, the chained cluster layout and the per-query union
    the same inputs gave error 0.024 at 11% density (top_p 0.95) and 0.26 at 11% (top_k 3)."""
    q, k, v = _clustered_qkv(seq_q=2048, seq_k=2048, heads=2, dim=64, n_clusters=32, norm=9.0, noise=0.1)
    config = AnnSAConfig(n_clusters=64, block_size=32, ann_backend="triton", **routing)
    plan = annsa.build_plan(q, k, config)
    out, _ = tokens.run_plan(plan, AttentionCall(None, "self", q, k, v, backend="reference"), dense_attention)
    assert plan.density() <= max_density
    assert rel_err(out, masked_attention_fp64(q, k, v)[0]) <= max_err


def test_chain_order_puts_near_duplicates_next_to_each_other():
    """Fragments of one structure (near-duplicate centroids) get adjacent layout positions."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(2, 5, 16, generator=gen), dim=-1) * 8
    fragments = centres.repeat_interleave(3, dim=1) + 0.01 * torch.randn(2, 15, 16, generator=gen)
    shuffle = torch.randperm(15, generator=gen)
    rank = annsa.chain_order(fragments[:, shuffle])  # [G, 15]
    assert torch.equal(rank.sort(1).values, torch.arange(15).expand(2, -1))  # a permutation
    structure = (shuffle // 3).expand(2, -1)
    by_position = torch.gather(structure, 1, rank.argsort(1))  # structure id along the layout
    assert ((by_position[:, 1:] != by_position[:, :-1]).sum(1) == 4).all()  # 5 contiguous runs


def test_select_clusters():
    mass = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert tokens.select_clusters(mass, top_p=0.8).tolist() == [[True, False, True, False]]
    assert tokens.select_clusters(mass, top_p=0.81).sum() == 3
    assert tokens.select_clusters(mass, top_p=0.2).tolist() == [[True, False, False, False]]
    assert tokens.select_clusters(mass, top_p=1.0).all()
    assert tokens.select_clusters(mass, top_k=2).tolist() == [[True, False, True, False]]


def _context_call(ctx, attn, layer=1, **kwargs):
    q, k, v = _clustered_qkv(seq_q=64, seq_k=64)
    return AttentionCall(
        attn,
        "self",
        q,
        k,
        v,
        context=ctx,
        layer=LayerInfo(layer, 4, "self", "blocks.x.attn1"),
        backend="reference",
    ).replace(**kwargs)


def test_plan_reuse_refresh_and_dense_steps(monkeypatch):
    builds = []
    real = annsa.build_plan
    monkeypatch.setattr(
        annsa, "build_plan", lambda *a, **kw: builds.append(kw["centroids"]) or real(*a, **kw)
    )
    method = AnnSAConfig(
        n_clusters=4, top_k=1, refresh_every=2, dense_layers=1, dense_steps=1, block_size=16
    ).build()
    ctx, attn = StepContext(), torch.nn.Linear(1, 1)
    dense_calls = []

    def proceed(call):
        dense_calls.append(call.plan is None)
        return dense_attention(call)

    for step in range(5):
        ctx.step_index = step
        for _ in range(2):  # CFG passes
            method.attend(_context_call(ctx, attn), proceed)
        method.attend(_context_call(ctx, attn, layer=0), proceed)  # a dense layer
    # Step 0 dense; plans built at steps 1, 2 and 4 (epochs 0, 1, 2) and reused in between.
    assert len(builds) == 3
    assert builds[0] is None and builds[1] is not None  # warm start from the previous centroids
    assert dense_calls == [True, True, True] + [False, False, True] * 4
    # In rollouts the chunk's own step counts: step 0 of a new chunk is dense again.
    ctx.chunk_index, ctx.chunk_step = 1, 0
    method.attend(_context_call(ctx, attn), proceed)
    assert dense_calls[-1] is True


def test_config_errors(monkeypatch):
    for kwargs, match in [
        (dict(top_p=0.0), r"AnnSAConfig.top_p must be a float in \(0, 1\]"),
        (dict(top_p=1.5), r"AnnSAConfig.top_p must be a float in \(0, 1\]"),
        (dict(), "exactly one of top_p"),
        (dict(top_p=0.5, top_k=3), "exactly one of top_p"),
        (dict(top_k=0), r"AnnSAConfig.top_k must be an int in \[1, inf\)"),
        (dict(top_k=2, n_clusters=0), r"AnnSAConfig.n_clusters must be an int in \[1, inf\)"),
        (dict(top_k=2, refresh_every=0), "refresh_every"),
        (dict(top_k=2, ann_backend="annoy"), "AnnSAConfig.ann_backend must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            AnnSAConfig(**kwargs)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ValueError, match="needs faiss"):
        AnnSAConfig(top_k=2, ann_backend="faiss")
    with pytest.raises(ValueError, match="must be a vidaccel.AnnSAConfig"):
        AnnSAProcessor(vidaccel.AnnCAConfig(top_k=2))


# _tiny.run: token grid (3, 2, 3) = 18 tokens, 3 blocks of 8 (the last ragged).


def test_tiny_pipeline_end_to_end_and_remove():
    pipe = tiny_pipe(head_dim=64)
    stock = run(pipe)
    config = AnnSAConfig(n_clusters=3, top_k=1, dense_layers=0, dense_steps=1, block_size=8)
    vidaccel.apply(pipe, config)
    sparse = run(pipe)
    assert torch.isfinite(sparse).all() and sparse.shape == stock.shape
    assert 0 < rel_err(sparse, stock) < 0.5
    vidaccel.remove(pipe)
    assert torch.equal(run(pipe), stock)

    vidaccel.apply(pipe, AnnSAConfig(top_p=1.0, dense_layers=0, dense_steps=0, block_size=8))
    assert rel_err(run(pipe), stock) <= TOL


def test_set_attn_processor_without_context_replans_every_call():
    pipe = tiny_pipe(head_dim=64)
    stock = run(pipe)
    pipe.transformer.set_attn_processor(AnnSAProcessor(AnnSAConfig(top_p=1.0, block_size=8)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run(pipe)
    assert sum("vidaccel.apply" in str(w.message) for w in caught) == 1
    assert rel_err(ours, stock) <= TOL


@pytest.mark.gpu
def test_annsa_on_gpu_bf16():
    """128-token blocks on the compiled kernels: exact with every cluster routed (bf16 tolerance),
    and on clustered inputs as close to dense as attending to each query's own true cluster.

    Here each query holds ~94% of its mass in its own cluster (norm 8, D 128: own logit 5.7 for 256
    keys against 3840 others at ~N(0, 0.5)), so top_p = 0.9 rightly routes the own cluster only and
    drops the other ~6%: the error is that of own-cluster attention (~0.055), not a routing miss."""
    q, k, v, labels = _clustered_qkv(seq_q=4096, seq_k=4096, heads=4, dim=128, n_clusters=16, labels=True)
    q, k, v = (t.cuda().to(torch.bfloat16) for t in (q, k, v))
    call = AttentionCall(None, "self", q, k, v, backend="triton")
    ref = masked_attention_fp64(q, k, v)[0]
    plan = annsa.build_plan(q, k, AnnSAConfig(n_clusters=32, top_p=1.0, ann_backend="triton"))
    assert rel_err(tokens.run_plan(plan, call, dense_attention)[0], ref) <= 1e-2
    own = _own_cluster_error(q, k, v, labels, ref)
    assert 0.03 <= own <= 0.08  # the premise above
    plan = annsa.build_plan(q, k, AnnSAConfig(n_clusters=32, top_p=0.9, ann_backend="triton"))
    assert plan.density() <= 0.2  # own cluster: 1/16 of the keys, in 2-3 of 32 key blocks
    assert rel_err(tokens.run_plan(plan, call, dense_attention)[0], ref) <= own + 0.01  # + bf16 rounding


def test_causal_rollout_composes_with_annca_and_tempcache(monkeypatch):
    """On CausalWanPipeline self calls see [KV cache ; own chunk] with TempCache's key_bias and
    Sq != Sk: with everything routed AnnSA + AnnCA change nothing; sparse, they run."""
    from vidaccel.pipelines import CausalWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds

    seen = []
    real = annsa.build_plan

    def recording(q, k, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], kwargs["key_bias"]))
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(annsa, "build_plan", recording)

    base = build_tiny_wan_pipeline(head_dim=64)
    pipe = CausalWanPipeline(base.transformer, base.scheduler)
    pipe.set_progress_bar_config(disable=True)

    def rollout():  # 3 chunks of 2 latent frames of 4x4 tokens (no VAE: pixels are latents)
        return pipe(
            prompt_embeds=tiny_prompt_embeds(base, seed=1, pad_to=32),
            height=8,
            width=8,
            num_frames=6,
            chunk_frames=2,
            denoising_timesteps=(1000, 500),
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames

    tempcache = vidaccel.TempCacheConfig(sink_frames=1, threshold=0.5)
    vidaccel.apply(pipe, tempcache)
    reference = rollout()
    routed = dict(dense_layers=0, dense_steps=0, block_size=8, sink_tokens=4)
    vidaccel.apply(pipe, tempcache, AnnSAConfig(top_p=1.0, **routed), vidaccel.AnnCAConfig(top_p=1.0))
    assert rel_err(rollout(), reference) <= TOL
    assert any(seq_q < seq_k for seq_q, seq_k, _ in seen)  # chunk queries; cache + chunk keys
    assert any(bias is not None and (bias > 0).any() for _, _, bias in seen)  # merged keys: log(count) > 0
    vidaccel.apply(
        pipe, tempcache, AnnSAConfig(top_k=1, n_clusters=4, **routed), vidaccel.AnnCAConfig(top_k=2)
    )
    sparse = rollout()
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, reference) < 1.0
