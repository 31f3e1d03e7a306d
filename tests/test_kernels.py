"""The attention kernel family against exact identities and fp64 oracles.

CPU lane: Triton kernels under TRITON_INTERPRET=1 on tiny ragged shapes (fp32/fp16: the
interpreter's bf16 dot is wrong). The ``gpu`` lane repeats them compiled, bf16 included.
"""

import math

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err

from vidaccel import ops
from vidaccel.kernels import attention_reference, merge_attention_reference, plan_blocks

# Relative-error bounds per dtype (reference in fp64); fp32 dots run in IEEE fp32.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
BACKENDS = ["triton", "reference"]

# (batch, seq_q, seq_k, heads): ragged against every tile size.
SHAPES = {"b2-q70-k100-h3": (2, 70, 100, 3), "b1-q130-k47-h2": (1, 130, 47, 2)}
if ON_GPU:
    SHAPES.update({"b2-q1000-k1531-h4": (2, 1000, 1531, 4), "b1-q4680-k9360-h2": (1, 4680, 9360, 2)})


def qkv(batch, seq_q, seq_k, heads, dim, dtype):
    return (torch.randn(batch, s, heads, dim, device=DEVICE, dtype=dtype) for s in (seq_q, seq_k, seq_k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dense_matches_fp64(shape, dtype, dim, backend, poison_empty):
    batch, seq_q, seq_k, heads = shape
    q, k, v = qkv(batch, seq_q, seq_k, heads, dim, dtype)
    out, lse = ops.attention(q, k, v, return_lse=True, backend=backend)
    ref, ref_lse = masked_attention_fp64(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (batch, heads, seq_q)
    assert rel_err(out, ref) <= TOL[dtype]
    assert float((lse.double() - ref_lse).abs().max()) <= LSE_TOL[dtype] * math.log(seq_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_bias_match_fp64(dtype, backend, poison_empty):
    q, k, v = qkv(2, 70, 100, 3, 64, dtype)
    bias_shapes = [(1, 1, 100), (2, 1, 100), (1, 3, 100), (2, 3, 100)]
    for bshape in bias_shapes:
        bias = torch.randn(bshape, device=DEVICE) * 2
        out, lse = ops.attention(q, k, v, scale=0.3, key_bias=bias, return_lse=True, backend=backend)
        ref, ref_lse = masked_attention_fp64(q, k, v, scale=0.3, bias=bias)
        assert rel_err(out, ref) <= TOL[dtype], bshape
        assert float((lse.double() - ref_lse).abs().max()) <= LSE_TOL[dtype] * 5, bshape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_bias_masks_exactly(dtype, backend):
    """-inf on a key set equals attention over the remaining keys; a query with every key masked
    gets output 0 and LSE -inf, never NaN."""
    q, k, v = qkv(2, 70, 100, 3, 64, dtype)
    keep = torch.rand(100, device=DEVICE) < 0.4
    bias = torch.zeros(2, 3, 100, device=DEVICE).masked_fill(~keep, float("-inf"))
    bias[1, 2] = float("-inf")  # batch 1, head 2: nothing visible
    out, lse = ops.attention(q, k, v, key_bias=bias, return_lse=True, backend=backend)
    sub, sub_lse = ops.attention(q, k[:, keep], v[:, keep], return_lse=True, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    assert torch.isneginf(lse[1, 2]).all()
    visible = torch.ones(2, 3, dtype=torch.bool)
    visible[1, 2] = False
    for b, h in visible.nonzero().tolist():
        assert rel_err(out[b, :, h], sub[b, :, h]) <= TOL[dtype]
        assert torch.allclose(lse[b, h], sub_lse[b, h], atol=LSE_TOL[dtype] * 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_kv_merge_equals_concatenated_keys(dtype, backend, poison_empty):
    q, k, v = qkv(2, 70, 100, 3, 64, dtype)
    cut = 37
    out_a, lse_a = ops.attention(q, k[:, :cut], v[:, :cut], return_lse=True, backend=backend)
    out_b, lse_b = ops.attention(q, k[:, cut:], v[:, cut:], return_lse=True, backend=backend)
    out, lse = ops.merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    ref, ref_lse = masked_attention_fp64(q, k, v)
    assert rel_err(out, ref) <= 2 * TOL[dtype]
    assert float((lse.double() - ref_lse).abs().max()) <= LSE_TOL[dtype] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_kernel_matches_reference_with_empty_rows(backend, poison_empty):
    out_a, out_b = torch.randn(2, 33, 3, 64, device=DEVICE), torch.randn(2, 33, 3, 64, device=DEVICE)
    lse_a, lse_b = torch.randn(2, 3, 33, device=DEVICE), torch.randn(2, 3, 33, device=DEVICE)
    lse_a[0, 1, :5] = float("-inf")  # one side empty: the other passes through
    lse_a[1, 0, :7] = lse_b[1, 0, :7] = float("-inf")  # both empty: 0 and -inf
    out, lse = ops.merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    ref, ref_lse = merge_attention_reference(out_a.double(), lse_a, out_b.double(), lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref) <= 1e-6
    assert torch.allclose(out[0, :5, 1], out_b[0, :5, 1], atol=1e-6)
    assert torch.equal(out[1, :7, 0], torch.zeros_like(out[1, :7, 0]))
    assert torch.isneginf(lse[1, 0, :7]).all()
    assert torch.allclose(lse[torch.isfinite(ref_lse)], ref_lse[torch.isfinite(ref_lse)], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_keys_with_log_count_bias_equal_duplicated_keys(dtype, backend):
    """TempCache's identity: identical keys collapse to one representative with bias log(count)
    and the mean of their values."""
    batch, heads, dim, groups = 2, 3, 64, 29
    q = torch.randn(batch, 50, heads, dim, device=DEVICE, dtype=dtype)
    reps = torch.randn(batch, groups, heads, dim, device=DEVICE, dtype=dtype)
    counts = torch.randint(1, 5, (groups,), device=DEVICE)
    k_full = reps.repeat_interleave(counts, dim=1)
    v_full = torch.randn_like(k_full)
    group_of = torch.arange(groups, device=DEVICE).repeat_interleave(counts)
    v_mean = torch.zeros_like(reps, dtype=torch.float32).index_add_(1, group_of, v_full.float())
    v_mean = (v_mean / counts[None, :, None, None]).to(dtype)
    bias = counts.float().log().expand(1, 1, groups).contiguous()
    out_merged, lse_merged = ops.attention(q, reps, v_mean, key_bias=bias, return_lse=True, backend=backend)
    ref, ref_lse = masked_attention_fp64(q, k_full, v_full)
    assert rel_err(out_merged, ref) <= 2 * TOL[dtype]
    assert float((lse_merged.double() - ref_lse).abs().max()) <= LSE_TOL[dtype] * 5


BLOCK_SIZES = [(64, 32), (128, 64), (64, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_block_sparse_equals_dense_with_expanded_mask(shape, dtype, block_size, backend, poison_empty):
    batch, seq_q, seq_k, heads = shape
    q, k, v = qkv(batch, seq_q, seq_k, heads, 64, dtype)
    n_q, n_k = -(-seq_q // block_size[0]), -(-seq_k // block_size[1])
    mask = torch.rand(batch, heads, n_q, n_k, device=DEVICE) < 0.5
    mask[0, 0, 0] = False  # an empty row: output 0, LSE -inf
    mask[-1, -1, -1] = True  # the partial last key block is visited
    bias = torch.randn(1, heads, seq_k, device=DEVICE)
    out, lse = ops.attention(q, k, v, key_bias=bias, block_mask=mask, block_size=block_size,
                             return_lse=True, backend=backend)
    token_mask = plan_blocks(mask, block_size).expand_mask(seq_q, seq_k)
    ref, ref_lse = masked_attention_fp64(q, k, v, bias=bias, mask=token_mask)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref) <= TOL[dtype]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert float((lse[finite].double() - ref_lse[finite]).abs().max()) <= LSE_TOL[dtype] * 5
    assert torch.equal(out[0, : block_size[0], 0], torch.zeros_like(out[0, : block_size[0], 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_is_reused_and_broadcast(backend):
    """One plan with broadcast batch/head serves several calls and equals passing the mask."""
    q, k, v = qkv(2, 130, 100, 3, 64, torch.float32)
    mask = torch.rand(1, 1, 3, 4, device=DEVICE) < 0.6
    mask[..., 0] = True
    plan = ops.plan_blocks(mask, (64, 32))
    for _ in range(2):
        a = ops.attention(q, k, v, plan=plan, backend=backend)
        b = ops.attention(q, k, v, block_mask=mask, block_size=(64, 32), backend=backend)
        assert torch.equal(a, b)
    full = ops.attention(q, k, v, block_mask=torch.ones_like(mask), block_size=(64, 32), backend=backend)
    assert rel_err(full, ops.attention(q, k, v, backend=backend)) <= 1e-6


def test_plan_blocks_lists_ascending_blocks():
    mask = torch.tensor([[[[True, False, True, False], [False, False, False, False], [True, True, True, True]]]])
    plan = plan_blocks(mask, (16, 16))
    assert plan.kv_counts.tolist() == [[[2, 0, 4]]]
    assert plan.kv_indices[0, 0, 0, :2].tolist() == [0, 2]
    assert plan.kv_indices[0, 0, 2].tolist() == [0, 1, 2, 3]
    assert plan.density() == pytest.approx(6 / 12)


def test_block_size_the_kernel_cannot_tile_runs_on_the_reference(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())  # the once-per-reason warning may have fired already
    q, k, v = qkv(1, 50, 60, 2, 64, torch.float32)
    mask = torch.rand(1, 2, 3, 3, device=DEVICE) < 0.7
    if not ON_GPU:  # auto never picks the interpreter; the forced kernel refuses the tile
        with pytest.raises(ValueError, match="block_size"):
            ops.attention(q, k, v, block_mask=mask, block_size=(20, 24), backend="triton")
    with pytest.warns(UserWarning, match="reference"):
        out = ops.attention(q, k, v, block_mask=mask, block_size=(20, 24), backend="auto")
    token_mask = plan_blocks(mask, (20, 24)).expand_mask(50, 60)
    assert rel_err(out, masked_attention_fp64(q, k, v, mask=token_mask)[0]) <= 1e-5


def test_other_head_dims_and_fp64_run_on_the_reference():
    q, k, v = qkv(1, 20, 30, 2, 24, torch.float64)
    out = ops.attention(q, k, v, backend="reference")
    assert rel_err(out, masked_attention_fp64(q, k, v)[0]) <= 1e-12
    with pytest.raises(ValueError, match="head dim"):
        q, k, v = qkv(1, 20, 30, 2, 24, torch.float32)
        ops.attention(q, k, v, backend="triton")


def test_reference_chunks_queries_exactly(monkeypatch):
    import vidaccel.kernels.reference as reference

    q, k, v = qkv(1, 70, 33, 2, 64, torch.float32)
    whole, whole_lse = attention_reference(q, k, v, return_lse=True)
    monkeypatch.setattr(reference, "_SCORE_BYTES", 4 * 2 * 33 * 8)  # 8 queries per chunk
    chunked, chunked_lse = attention_reference(q, k, v, return_lse=True)
    assert torch.allclose(whole, chunked, atol=1e-6) and torch.allclose(whole_lse, chunked_lse, atol=1e-6)


# ---- bad input -------------------------------------------------------------------------------

def _good():
    return qkv(2, 10, 12, 3, 64, torch.float32)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v: (q[0], k, v), "4-D"),
        (lambda q, k, v: (q, k.half(), v), "dtype"),
        (lambda q, k, v: (q, k[:1], v[:1]), "batch"),
        (lambda q, k, v: (q, k[:, :, :2], v), "head counts"),
        (lambda q, k, v: (q, k, v[:, :5]), "same number of keys"),
        (lambda q, k, v: (q, k[..., :32], v), "head dims"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "float dtype"),
    ],
)
def test_bad_qkv_raise_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        ops.attention(*change(*_good()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key_bias=torch.zeros(2, 3, 11)), "key_bias must be"),
        (dict(key_bias=torch.zeros(3, 3, 12)), "key_bias must be"),
        (dict(key_bias=torch.zeros(2, 3, 12, dtype=torch.float16)), "float32"),
        (dict(block_mask=torch.ones(2, 3, 1, 2, dtype=torch.bool), block_size=(8, 8)), "block_mask must be"),
        (dict(block_mask=torch.ones(2, 3, 2, 2), block_size=(8, 8)), "bool"),
        (dict(block_mask=torch.ones(2, 3, 2, 2, dtype=torch.bool), block_size=(8, 0)), "block_size"),
        (dict(scale=-1.0), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(plan="dense"), "plan must be a BlockPlan"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.attention(*_good(), **kwargs)


def test_plan_of_wrong_shape_and_both_layouts_raise():
    q, k, v = _good()
    plan = plan_blocks(torch.ones(1, 1, 3, 3, dtype=torch.bool), (4, 4))
    with pytest.raises(ValueError, match="plan must be"):
        ops.attention(q, k, v, plan=plan_blocks(torch.ones(1, 1, 1, 1, dtype=torch.bool), (8, 8)))
    with pytest.raises(ValueError, match="either block_mask or plan"):
        ops.attention(q, k, v, plan=plan, block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=(4, 4))


@pytest.mark.skipif(ON_GPU, reason="CPU-only behaviour")
def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ops.attention(*_good(), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        out = torch.zeros(1, 4, 2, 64)
        lse = torch.zeros(1, 2, 4)
        ops.merge_attention(out, lse, out, lse, backend="triton")


def test_inputs_that_require_grad_are_refused():
    q, k, v = _good()
    q.requires_grad_(True)
    for backend in BACKENDS:
        with pytest.raises(RuntimeError, match="inference-only"):
            ops.attention(q, k, v, backend=backend)
    with torch.no_grad():
        ops.attention(q, k, v, backend="reference")


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda o, s: (o, s, o[:, :3], s), "one shape"),
        (lambda o, s: (o, s, o.half(), s), "float dtype"),
        (lambda o, s: (o, s.double(), o, s), "lse_a must be fp32"),
        (lambda o, s: (o, s, o, s[:, :1]), "lse_b must be fp32"),
    ],
)
def test_merge_bad_input_raises(args, match):
    out, lse = torch.randn(1, 4, 2, 64), torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match=match):
        ops.merge_attention(*args(out, lse))


@pytest.mark.gpu
def test_gpu_auto_backend_uses_the_kernel_without_warnings():
    import warnings

    q, k, v = qkv(1, 300, 300, 2, 128, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.attention(q, k, v)
    assert rel_err(out, masked_attention_fp64(q, k, v)[0]) <= TOL[torch.bfloat16]


def test_kernels_compile_into_one_graph():
    """Under torch.compile the launches are opaque custom ops: a function that attends twice and
    merges traces as one graph (fullgraph) and equals its eager run."""
    q, k, v = qkv(1, 70, 100, 2, 64, torch.float32)
    plan = ops.plan_blocks(torch.rand(1, 2, 2, 4, device=DEVICE) < 0.6, (64, 32))

    def split_attention(q, k, v):
        out_a, lse_a = ops.attention(q, k[:, :37], v[:, :37], return_lse=True, backend="triton")
        out_b, lse_b = ops.attention(q, k[:, 37:], v[:, 37:], key_bias=torch.zeros(1, 1, 63, device=q.device),
                                     return_lse=True, backend="triton")
        merged, _ = ops.merge_attention(out_a, lse_a, out_b, lse_b, backend="triton")
        return merged + ops.attention(q, k, v, plan=plan, backend="triton")

    compiled = torch.compile(split_attention, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), split_attention(q, k, v))


def test_offsets_past_int32_are_left_to_the_reference():
    """A batch entry of 2**31 elements or more would overflow the kernels' int32 token offsets: they
    say so (meta tensors: no memory), and ops routes such calls to the reference."""
    from vidaccel.kernels.attention import unsupported_reason
    from vidaccel.kernels.merge import unsupported_reason as merge_unsupported_reason

    small = torch.empty(1, 64, 1, 64, device="meta", dtype=torch.float16)
    huge = torch.empty(1, 2**25, 1, 64, device="meta", dtype=torch.float16)  # 2**31 elements
    assert unsupported_reason(small, small, small, None) is None
    assert "2**31" in unsupported_reason(small, huge, huge, None)
    assert "2**31" in unsupported_reason(huge, small, small, None)
    assert merge_unsupported_reason(small, small) is None
    assert "2**31" in merge_unsupported_reason(huge, huge)
