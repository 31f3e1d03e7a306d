"""AnnCA: exact padding merge, exact with every prompt token kept, selection, caching, configs,
tiny WanPipeline (alone and with AnnSA)."""

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err
from _tiny import FRAMES, GRID, HEIGHT, WIDTH, tiny_pipe

import vidaccel
from vidaccel import AnnCAConfig, AnnCAProcessor, AnnSAConfig, AttentionCall, StepContext
from vidaccel.pipelines import tiny_prompt_embeds
from vidaccel.processors import annca
from vidaccel.processors.base import dense_attention

pytestmark = pytest.mark.filterwarnings("ignore:vidaccel")
TOL = 1e-5


def _prompt_kv(batch=2, seq=40, pad_to=96, heads=2, dim=64, seed=0):
    """Prompt keys/values as a projection of zero-padded embeddings gives them: the padding rows of
    a batch entry are identical; one head also repeats a real token."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, pad_to, heads, dim, generator=gen)
    v = torch.randn(batch, pad_to, heads, dim, generator=gen)
    k[:, seq:], v[:, seq:] = k[:, seq : seq + 1].clone(), v[:, seq : seq + 1].clone()
    k[:, 5, 1], v[:, 5, 1] = k[:, 3, 1], v[:, 3, 1]
    return k, v


def test_padding_merge_is_exact():
    k, v = _prompt_kv()
    reps = annca.merge_identical_keys(k, v)
    assert reps.k.shape[1] == 41  # 40 real tokens + 1 padding representative (head 1 has 40 in all)
    assert torch.isinf(reps.bias[:, 1]).sum(-1).tolist() == [1, 1]  # head 1: one padding slot
    torch.testing.assert_close(reps.bias.exp().sum(-1), torch.full((2, 2), 96.0))
    q = torch.randn(2, 30, 2, 64)
    out, lse = masked_attention_fp64(q, reps.k, reps.v, bias=reps.bias)
    ref, ref_lse = masked_attention_fp64(q, k, v)
    assert rel_err(out, ref) <= 1e-6  # the bias log(count) is fp32
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ann_backend", ["triton", "faiss", "exact"])
@pytest.mark.parametrize("granularity", ["frame", "block"])
def test_every_prompt_token_kept_equals_dense(ann_backend, granularity):
    k, v = _prompt_kv()
    q = torch.randn(2, 45, 2, 64)  # 3 frames of 15 tokens (frame); blocks of 16, the last ragged (block)
    ctx, attn = StepContext(), torch.nn.Linear(1, 1)
    ctx.grid, ctx.step_index = (3, 3, 5), 0
    method = AnnCAConfig(top_p=1.0, granularity=granularity, ann_backend=ann_backend, block_tokens=16).build()
    call = AttentionCall(attn, "cross", q, k, v, context=ctx, backend="triton")
    out, lse = method.attend(call, dense_attention)
    ref, ref_lse = masked_attention_fp64(q, k, v)
    assert rel_err(out, ref) <= TOL
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ann_backend", ["triton", "exact"])
def test_selection_attends_only_to_the_selected_tokens(ann_backend):
    k, v = _prompt_kv(batch=1)
    q = torch.randn(1, 32, 2, 64) + 2 * k[:, :1]  # queries leaning to prompt token 0
    reps = annca.merge_identical_keys(k, v)
    config = AnnCAConfig(top_k=6, ann_backend=ann_backend, block_tokens=16, granularity="block")
    selection = annca.select_prompt(q, reps, config, group_size=16)
    assert selection.index.shape == (1, 2, 2, 6)
    out, _ = annca.run_selection(
        selection, reps, AttentionCall(None, "cross", q, k, v, backend="reference"), dense_attention
    )
    # Reference: dense attention over the representatives, masked to each group's selection.
    mask = torch.zeros(1, 2, 32, reps.k.shape[1], dtype=torch.bool)
    for group in range(2):
        rows = slice(16 * group, 16 * (group + 1))
        mask[:, :, rows] = torch.zeros(1, 2, reps.k.shape[1], dtype=torch.bool).scatter(
            -1, selection.index[:, :, group], True
        )[:, :, None]
    ref, _ = masked_attention_fp64(q, reps.k, reps.v, bias=reps.bias, mask=mask)
    assert rel_err(out, ref) <= TOL
    first = torch.nonzero(torch.all(reps.k[0, :, 0] == k[0, 0, 0], -1))[0, 0]
    assert (selection.index[0, 0] == first).any(-1).all()  # token 0, which every query favours, is kept


def test_prompt_data_cached_once_per_prompt_and_selection_refreshed(monkeypatch):
    merges, selects = [], []
    real_merge, real_select = annca.merge_identical_keys, annca.select_prompt
    monkeypatch.setattr(annca, "merge_identical_keys", lambda k, v: merges.append(1) or real_merge(k, v))
    monkeypatch.setattr(annca, "select_prompt", lambda *a, **kw: selects.append(1) or real_select(*a, **kw))
    method = AnnCAConfig(top_k=4, refresh_every=2).build()
    ctx, attn = StepContext(), torch.nn.Linear(1, 1)
    ctx.grid = (3, 3, 5)
    cond, uncond = _prompt_kv(batch=1, seed=1), _prompt_kv(batch=1, seed=2)
    q = torch.randn(1, 45, 2, 64)
    for step in range(4):
        ctx.step_index = step
        for k, v in (cond, uncond):
            call = AttentionCall(
                attn, "cross", q, k.clone(), v.clone(), context=ctx, backend="reference"
            )  # re-projected
            method.attend(call, dense_attention)
    assert len(merges) == 2  # once per prompt
    assert len(selects) == 4  # per prompt, at steps 0 and 2


def test_config_errors(monkeypatch):
    for kwargs, match in [
        (dict(top_p=0.0), r"AnnCAConfig.top_p must be a float in \(0, 1\]"),
        (dict(top_p=2.0), r"AnnCAConfig.top_p must be a float in \(0, 1\]"),
        (dict(), "exactly one of top_p"),
        (dict(top_p=0.9, top_k=4), "exactly one of top_p"),
        (dict(top_k=4, granularity="pixel"), "AnnCAConfig.granularity must be 'frame' or 'block'"),
        (dict(top_k=4, refresh_every=0), r"AnnCAConfig.refresh_every must be an int in \[1, inf\)"),
        (dict(top_k=4, ann_backend="hnsw"), "AnnCAConfig.ann_backend must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            AnnCAConfig(**kwargs)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ValueError, match="needs faiss"):
        AnnCAConfig(top_k=4, ann_backend="faiss")


def _generate(pipe, steps=2):
    """A seeded tiny generation with prompts zero-padded to 64 tokens (as Wan pads to 512)."""
    return pipe(
        prompt_embeds=tiny_prompt_embeds(pipe, seed=1, pad_to=64),
        negative_prompt_embeds=tiny_prompt_embeds(pipe, seed=2, pad_to=64),
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(0),
    ).frames


def test_tiny_pipeline_end_to_end_composed_with_annsa_and_remove():
    assert GRID == (3, 2, 3)
    pipe = tiny_pipe(head_dim=64)
    stock = _generate(pipe)
    vidaccel.apply(pipe, AnnCAConfig(top_p=1.0))
    assert rel_err(_generate(pipe), stock) <= TOL
    vidaccel.apply(
        pipe,
        AnnSAConfig(top_k=1, n_clusters=2, dense_layers=0, dense_steps=0, block_size=8),
        AnnCAConfig(top_k=3),
    )
    sparse = _generate(pipe)
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, stock) < 0.5
    vidaccel.remove(pipe)
    assert torch.equal(_generate(pipe), stock)
    pipe.transformer.set_attn_processor(
        AnnCAProcessor(AnnCAConfig(top_p=1.0))
    )  # no context: block granularity
    with pytest.warns(UserWarning, match="AnnCA need the step context"):
        assert rel_err(_generate(pipe), stock) <= TOL
