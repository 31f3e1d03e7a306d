"""AccelProcessor and the Wan adapter: exact against diffusers' stock processor; method composition."""

import dataclasses
import warnings
from dataclasses import dataclass

import pytest
import torch
from _tiny import GRID, AffineConfig, RecordConfig, run, tiny_pipe
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

import vidaccel
from vidaccel import AccelProcessor, AttentionCall, DenseProcessor, Method, MethodConfig, ops
from vidaccel.metrics import relative_error
from vidaccel.pipelines import tiny_prompt_embeds

TOL = 1e-5  # fp32 reference attention vs torch SDPA, through 2 steps with CFG


def _install_shared(pipe):
    pipe.transformer.set_attn_processor(DenseProcessor())


def _install_per_module(pipe):
    names = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor({name: DenseProcessor() for name in names})


def _install_apply(pipe):
    vidaccel.apply(pipe)


@pytest.mark.parametrize(
    "install", [_install_shared, _install_per_module, _install_apply], ids=lambda f: f.__name__[9:]
)
@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_dense_matches_stock_pipeline(install, output_type):
    pipe = tiny_pipe()
    stock = run(pipe, output_type=output_type)
    install(pipe)
    assert all(
        isinstance(p, AccelProcessor) and not p.methods for p in pipe.transformer.attn_processors.values()
    )
    ours = run(pipe, output_type=output_type)
    assert ours.shape == stock.shape
    assert relative_error(ours, stock) <= TOL


def test_dense_on_the_triton_kernel_matches_stock_pipeline():
    """The processor's kernel path (head dim 64; on CPU through the Triton interpreter) against stock."""
    pipe = tiny_pipe(head_dim=64)
    stock = run(pipe)
    vidaccel.apply(pipe, backend="triton")
    assert relative_error(run(pipe), stock) <= TOL


def test_dense_matches_stock_with_fused_projections():
    pipe = tiny_pipe()
    pipe.transformer.fuse_qkv_projections()
    assert pipe.transformer.blocks[0].attn1.fused_projections and hasattr(
        pipe.transformer.blocks[0].attn2, "to_kv"
    )
    stock = run(pipe)
    pipe.transformer.set_attn_processor(DenseProcessor())
    assert relative_error(run(pipe), stock) <= TOL


def test_dense_matches_stock_i2v_pipeline():
    pipe = tiny_pipe(i2v=True)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    stock = run(pipe, image=image)
    record = RecordConfig(kinds=("cross_image",), needs_context=False)
    pipe.transformer.set_attn_processor(AccelProcessor(record))
    assert relative_error(run(pipe, image=image), stock) <= TOL
    assert record.log and {(r.seq_q, r.seq_k) for r in record.log} == {
        (18, 5)
    }  # 18 video tokens, 5 image tokens


def _module_case(case, fused):
    """A WanAttention and its call arguments: self-attention with rotary, cross, or I2V cross."""
    dim, heads, head_dim, batch = 24, 2, 12, 2
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(batch, 18, dim, generator=gen)
    if case == "self":
        attn = WanAttention(dim, heads, head_dim, processor=WanAttnProcessor())
        rotary = WanRotaryPosEmbed(head_dim, (1, 2, 2), 32)(torch.zeros(batch, 16, 3, 4, 6))
        args = (hidden, None, None, rotary)
    else:
        added = dim if case == "i2v" else None
        attn = WanAttention(
            dim,
            heads,
            head_dim,
            added_kv_proj_dim=added,
            cross_attention_dim_head=head_dim,
            processor=WanAttnProcessor(),
        )
        context_len = 5 + 512 if case == "i2v" else 16
        args = (hidden, torch.randn(batch, context_len, dim, generator=gen), None, None)
    for param in attn.parameters():  # random biases and norm weights, so every term matters
        param.data = torch.randn(param.shape, generator=gen) * 0.3
    if fused:
        attn.fuse_projections()
    return attn.eval(), args


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("case", ["self", "cross", "i2v"])
@torch.no_grad()
def test_dense_matches_stock_attention_module(case, fused):
    attn, args = _module_case(case, fused)
    stock = attn(*args)
    attn.set_processor(DenseProcessor())
    ours = attn(*args)
    assert relative_error(ours, stock) <= TOL
    if case == "i2v":  # the image tokens really take part
        image_less = args[1].clone()
        image_less[:, :5] = 0
        assert relative_error(attn(args[0], image_less), ours) > 1e-3


@torch.no_grad()
def test_attention_mask_runs_exact_dense_and_skips_methods():
    attn, (hidden, context, _, _) = _module_case("cross", fused=False)
    mask = torch.rand(2, 1, 18, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    stock = attn(hidden, context, mask)
    record = RecordConfig(needs_context=False)
    attn.set_processor(AccelProcessor(record))
    with pytest.warns(UserWarning, match="attention_mask runs exact dense attention"):
        ours = attn(hidden, context, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(hidden, context, mask)  # warned once only
    assert relative_error(ours, stock) <= TOL
    assert record.log == []


def _random_call(kind="self", **changes):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 20, 2, 16, generator=gen)
    k = torch.randn(1, 12, 2, 16, generator=gen)
    v = torch.randn(1, 12, 2, 16, generator=gen)
    return AttentionCall(torch.nn.Identity(), kind, q, k, v, **changes)


def test_methods_chain_in_order_and_only_on_their_kinds():
    log = []
    first = AffineConfig(name="first", kinds=("self", "cross"), add=1.0, log=log)
    second = AffineConfig(name="second", kinds=("self",), mul=2.0, log=log)
    call = _random_call()
    dense, dense_lse = ops.attention(call.q, call.k, call.v, return_lse=True)

    out, lse = AccelProcessor(first, second).attend(call)  # first(second(dense))
    assert log == [("first", "self"), ("second", "self")]
    torch.testing.assert_close(out, dense * 2 + 1)
    torch.testing.assert_close(lse, dense_lse)

    log.clear()
    out, _ = AccelProcessor(second, first).attend(call)  # second(first(dense))
    assert log == [("second", "self"), ("first", "self")]
    torch.testing.assert_close(out, (dense + 1) * 2)

    log.clear()
    out, _ = AccelProcessor(first, second).attend(call.replace(kind="cross"))
    assert log == [("first", "cross")]
    torch.testing.assert_close(out, dense + 1)

    log.clear()
    out, _ = AccelProcessor(first, second).attend(call.replace(kind="cross_image"))
    assert log == []
    torch.testing.assert_close(out, dense)


def test_a_method_changes_the_call_for_the_rest_of_the_chain():
    call = _random_call()
    out, lse = AccelProcessor(AffineConfig(scale=0.3)).attend(call)
    ref, ref_lse = ops.attention(call.q, call.k, call.v, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert not torch.allclose(out, ops.attention(call.q, call.k, call.v))


def test_composition_on_the_tiny_pipeline_follows_kinds():
    pipe = tiny_pipe()
    log = []
    vidaccel.apply(
        pipe,
        AffineConfig(name="a", kinds=("self", "cross"), log=log),
        AffineConfig(name="b", kinds=("self",), log=log),
    )
    run(pipe, steps=1, guidance_scale=1.0)  # one forward: 2 blocks x (self, cross)
    assert log == [("a", "self"), ("b", "self"), ("a", "cross")] * 2


def test_processor_rejects_bad_arguments():
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'\), got 'cuda'"
    ):
        AccelProcessor(backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        DenseProcessor(backend="flash")
    with pytest.raises(ValueError, match=r"configs\[1\] must be a vidaccel MethodConfig.*got str"):
        AccelProcessor(RecordConfig(), "annsa")


def test_method_kinds_are_checked():
    @dataclass
    class OddConfig(MethodConfig):
        def build(self):
            return OddMethod(self)

    class OddMethod(Method):
        kinds = frozenset({"self", "temporal"})

        def attend(self, call, proceed):
            return proceed(call)

    with pytest.raises(ValueError, match=r"OddMethod.kinds must be a subset of .*'temporal'"):
        AccelProcessor(OddConfig())


def test_method_config_is_abstract_and_checks_ranges():
    with pytest.raises(TypeError):
        MethodConfig()

    @dataclass
    class RangeConfig(MethodConfig):
        top_p: float = 0.5
        refresh: int = 2

        def __post_init__(self):
            self.check_range("top_p", low=0, high=1, low_open=True)
            self.check_range("refresh", low=1, integer=True)

        def build(self):
            raise AssertionError("not built in this test")

    RangeConfig(top_p=1.0, refresh=1)
    with pytest.raises(ValueError, match=r"RangeConfig.top_p must be a float in \(0, 1\], got 0"):
        RangeConfig(top_p=0)
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\], got nan"):
        RangeConfig(top_p=float("nan"))
    with pytest.raises(ValueError, match=r"RangeConfig.refresh must be an int in \[1, inf\), got 1.5"):
        RangeConfig(refresh=1.5)
    with pytest.raises(ValueError, match=r"refresh must be an int in \[1, inf\), got True"):
        RangeConfig(refresh=True)


@torch.no_grad()
def test_unsupported_attention_module_is_named():
    attn = Attention(query_dim=8, heads=2, dim_head=4, processor=DenseProcessor())
    with pytest.raises(ValueError, match="class Attention; supported: WanAttention"):
        attn(torch.randn(1, 3, 8))


def test_tiny_pipeline_shapes_and_determinism():
    pipe, again = tiny_pipe(seed=4, heads=3, head_dim=64), tiny_pipe(seed=4, heads=3, head_dim=64)
    attn = pipe.transformer.blocks[0].attn1
    assert (attn.heads, attn.inner_dim) == (3, 192)
    for a, b in zip(
        pipe.transformer.state_dict().values(), again.transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert not torch.equal(
        attn.to_q.weight, tiny_pipe(seed=5, heads=3, head_dim=64).transformer.blocks[0].attn1.to_q.weight
    )
    assert tiny_prompt_embeds(pipe, seed=1).shape == (1, 16, 32)
    assert torch.equal(tiny_prompt_embeds(pipe, seed=1), tiny_prompt_embeds(again, seed=1))
    padded = tiny_prompt_embeds(pipe, seed=1, seq_len=4, pad_to=10)
    assert padded.shape == (1, 10, 32) and padded[:, 4:].abs().sum() == 0 and padded[:, :4].abs().sum() > 0
    i2v_embeds = tiny_prompt_embeds(tiny_pipe(i2v=True), seed=1)  # I2V attention expects 512 prompt tokens
    assert i2v_embeds.shape == (1, 512, 32) and i2v_embeds[:, 16:].abs().sum() == 0
    latents = run(pipe, steps=1)
    assert latents.shape == (1, 16, GRID[0], 2 * GRID[1], 2 * GRID[2]) and torch.isfinite(latents).all()


def test_tiny_pipeline_dtype_keeps_fp32_modules():
    pipe = tiny_pipe(dtype=torch.bfloat16)
    transformer = pipe.transformer
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert transformer.blocks[0].norm2.weight.dtype == torch.float32  # in _keep_in_fp32_modules
    assert transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert pipe.vae.dtype == torch.float32
    assert tiny_prompt_embeds(pipe).dtype == torch.bfloat16
    assert torch.isfinite(run(pipe, steps=1).float()).all()


@pytest.mark.parametrize(
    "config, field, bad",
    [
        (vidaccel.AnnSAConfig(top_k=2), "top_k", -5),
        (vidaccel.AnnCAConfig(top_p=0.9), "top_p", 1.5),
        (vidaccel.TempCacheConfig(), "threshold", 2.0),
        (vidaccel.FlashBlockConfig(), "refresh_every", 0),
        (vidaccel.FreeSwimConfig(), "cache_steps", 0),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, vidaccel.MethodConfig) else None,
)
def test_configs_cannot_skip_their_checks(config, field, bad):
    """A field set after construction would skip the validation (top_k = -5 used to crash deep inside the
    routing): vidaccel's configs are frozen, and dataclasses.replace validates again."""
    with pytest.raises(dataclasses.FrozenInstanceError, match=f"cannot assign to field '{field}'"):
        setattr(config, field, bad)
    with pytest.raises(ValueError, match=f"{type(config).__name__}.{field} must be"):
        dataclasses.replace(config, **{field: bad})
    assert dataclasses.replace(config) == config
