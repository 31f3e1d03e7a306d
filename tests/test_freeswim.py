"""FreeSwim's method and FreeSwimWanPipeline on tiny from-config Wan models (no download).

The tiny model is "trained" at 32×48 pixels (token grid 2×3 per frame, half-window 1×1) and refined
at 64×96 (4×6 tokens per frame, 3 latent frames).
"""

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from _helpers import masked_attention_fp64, rel_err, run_script

import vidaccel
from vidaccel import AccelProcessor, FreeSwimConfig, FreeSwimProcessor, Method, MethodConfig, ops
from vidaccel.kernels.window import window_attention_reference, window_mask_reference
from vidaccel.pipelines import FreeSwimWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds
from vidaccel.processors import AttentionCall, FreeSwimBatch
from vidaccel.processors.freeswim import freeswim_batch_of, set_freeswim_batch
from vidaccel.state import StepContext

TRAIN = (32, 48)
TARGET = (64, 96)
GRID = (3, 4, 6)


@dataclass
class CrossLogConfig(MethodConfig):
    """Records, for every cross-attention call, the FreeSwim batch mode, the layer, q and the result
    of the rest of the chain (FreeSwim and the attention after it)."""

    log: list = field(default_factory=list)

    def build(self) -> Method:
        return _CrossLog(self)


class _CrossLog(Method):
    kinds = frozenset({"cross"})
    needs_context = True

    def attend(self, call, proceed):
        out, lse = proceed(call)
        batch = freeswim_batch_of(call.context)
        self.config.log.append((batch.mode if batch else None, call.layer.index, call.q, call.k, call.v, out))
        return out, lse


def _pipe(*configs, head_dim=64):
    pipe = FreeSwimWanPipeline(**build_tiny_wan_pipeline(head_dim=head_dim).components)
    pipe.set_progress_bar_config(disable=True)
    if configs:
        pipe.set_attn_processor(AccelProcessor(*configs))
    return pipe


def _video():
    return torch.rand(1, 9, 3, *TRAIN, generator=torch.Generator().manual_seed(5))


def _refine(pipe, steps=5, **kwargs):
    args = dict(
        prompt_embeds=tiny_prompt_embeds(pipe, seed=1),
        negative_prompt_embeds=tiny_prompt_embeds(pipe, seed=2),
        video=_video(),
        height=TARGET[0],
        width=TARGET[1],
        strength=1.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return pipe(**(args | kwargs))


def test_cross_attention_override_and_cache():
    """Full-branch steps (0 and 2 with cache_steps=2): the window rows' cross-attention output is the
    full rows', computed from different queries; other steps: the cached (bf16) value of that block;
    the unconditional pass: plain cross-attention of its own queries."""
    log = []
    pipe = _pipe(CrossLogConfig(log=log), FreeSwimConfig(train_size=TRAIN, cache_steps=2))
    result = _refine(pipe, steps=4)
    assert result.timings["steps"] == 4 and result.timings["full_steps"] == 2
    modes = [mode for mode, layer, *_ in log if layer == 0]
    assert modes == ["dual", "window", "cached", "window"] * 2
    last_full = {}
    for mode, layer, q, k, v, out in log:
        if mode == "dual":
            assert out.shape[0] == 2 and torch.equal(out[0], out[1])
            assert not torch.allclose(q[0], q[1])  # the branches' queries differ after self-attention
            assert rel_err(out[1:], masked_attention_fp64(q[1:], k[1:], v[1:])[0]) <= 1e-5
            last_full[layer] = out[1:]
        elif mode == "cached":
            assert torch.equal(out, last_full[layer].to(torch.bfloat16).to(out.dtype))
            assert rel_err(out, masked_attention_fp64(q, k, v)[0]) > 1e-3  # not its own attention
        else:
            assert rel_err(out, masked_attention_fp64(q, k, v)[0]) <= 1e-5


def test_only_the_window_branch_latent_survives():
    """NaN in the full branch's prediction leaves the result unchanged; a change in the window
    branch's prediction changes it."""
    pipe = _pipe(FreeSwimConfig(train_size=TRAIN, cache_steps=2))
    clean = _refine(pipe, steps=3).frames

    def poison(rows):
        def hook(module, args, kwargs, output):
            if kwargs["hidden_states"].shape[0] == 2:  # a dual forward: window row, then full row
                output[0][rows] = float("nan") if rows == slice(1, 2) else output[0][rows] + 1.0
            return output

        return pipe.transformer.register_forward_hook(hook, with_kwargs=True)

    handle = poison(slice(1, 2))
    assert torch.equal(_refine(pipe, steps=3).frames, clean)
    handle.remove()
    handle = poison(slice(0, 1))
    assert not torch.allclose(_refine(pipe, steps=3).frames, clean)
    handle.remove()


def test_generates_from_a_prompt_and_decodes():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"smaller than FreeSwimConfig.train_size \(480, 832\)"):
        _refine(pipe)  # a default FreeSwimProcessor was installed, for a model trained at 480×832
    assert isinstance(pipe.transformer.attn_processors["blocks.0.attn1.processor"], FreeSwimProcessor)
    pipe.set_attn_processor(FreeSwimProcessor(FreeSwimConfig(train_size=TRAIN)))
    result = pipe(
        prompt_embeds=tiny_prompt_embeds(pipe, seed=1),
        negative_prompt_embeds=tiny_prompt_embeds(pipe, seed=2),
        height=TARGET[0],
        width=TARGET[1],
        num_frames=9,
        num_inference_steps=2,
        native_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert result.frames.shape == (1, 9, 3, *TARGET) and torch.isfinite(result.frames).all()
    assert set(result.timings) >= {"native", "encode", "refine", "decode", "total"}


def test_refines_a_list_of_pil_frames():
    from PIL import Image

    frames = (_video()[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    pipe = _pipe(FreeSwimConfig(train_size=TRAIN))
    result = _refine(pipe, steps=4, strength=0.5, video=[Image.fromarray(f) for f in frames])
    assert result.timings["steps"] == 2 and result.frames.shape == (1, 16, 3, 8, 12)


def test_demo_writes_the_video_and_timings(tmp_path):
    argv = ["--out", str(tmp_path), "--frames", "5", "--steps", "2", "--native-steps", "1"]
    run_script("demos/freeswim_upscale.py", *argv)  # its command line, in its own process
    report = json.loads((tmp_path / "timings.json").read_text())
    assert (tmp_path / report["video"]).stat().st_size > 0
    assert report["frames"] == 5 and report["size"] == [64, 96] and report["timings_s"]["refine"] > 0


def _self_call(q, k, v, batch, config, backend="reference"):
    context = StepContext()
    context.grid = GRID
    if batch is not None:
        set_freeswim_batch(context, batch)
    method = config.build()
    call = AttentionCall(torch.nn.Linear(1, 1), "self", q, k, v, context=context, backend=backend)
    return method.attend(
        call, lambda c: ops.attention(c.q, c.k, c.v, scale=c.scale, return_lse=True, backend=backend)
    )


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_self_attention_branches_with_temperature(backend):
    """Dual batch: window rows get window attention, full rows dense attention, both with the
    temperature scale sqrt(log(24) / log(6) / d)."""
    config = FreeSwimConfig(train_size=TRAIN, tiles=((4, 4), (4, 4)))
    q, k, v = (torch.randn(2, math.prod(GRID), 2, 64) for _ in range(3))
    scale = math.sqrt(math.log(24) / math.log(6) / 64)
    out, lse = _self_call(q, k, v, FreeSwimBatch("dual", 1), config, backend)
    window, _ = masked_attention_fp64(
        q[:1], k[:1], v[:1], scale=scale, mask=window_mask_reference(GRID, (1, 1))
    )
    full, _ = masked_attention_fp64(q[1:], k[1:], v[1:], scale=scale)
    assert rel_err(out[:1], window) <= 1e-5 and rel_err(out[1:], full) <= 1e-5 and lse.shape == (2, 2, 72)
    out, _ = _self_call(q, k, v, None, FreeSwimConfig(train_size=TRAIN, temperature=False))
    assert rel_err(out, window_attention_reference(q, k, v, grid=GRID, half_window=(1, 1))) <= 1e-5


def test_window_only_on_a_stock_pipeline_is_dense_at_the_training_size():
    stock = build_tiny_wan_pipeline(head_dim=64)
    stock.set_progress_bar_config(disable=True)
    args = dict(
        prompt_embeds=tiny_prompt_embeds(stock, seed=1),
        negative_prompt_embeds=tiny_prompt_embeds(stock, seed=2),
        num_frames=9,
        num_inference_steps=2,
        output_type="latent",
    )
    dense = stock(**args, height=TRAIN[0], width=TRAIN[1], generator=torch.Generator().manual_seed(0)).frames
    vidaccel.apply(stock, FreeSwimConfig(train_size=TRAIN))
    ours = stock(**args, height=TRAIN[0], width=TRAIN[1], generator=torch.Generator().manual_seed(0)).frames
    assert rel_err(ours, dense) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cache_steps=0), r"FreeSwimConfig.cache_steps must be an int in \[1, inf\)"),
        (dict(cache_steps=2.0), "cache_steps"),
        (dict(train_size=(480,)), "train_size"),
        (dict(train_size=(8, 832)), "train_size"),
        (dict(temperature=1), "temperature must be a bool"),
        (dict(half_window=(-1, 3)), "half_window"),
        (dict(target_tokens=0), "target_tokens"),
        (dict(tiles=((8, 16),)), "tiles"),
        (dict(spatial_compression=0), "spatial_compression"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreeSwimConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=16), r"height=16 is smaller than FreeSwimConfig.train_size"),
        (dict(width=32), r"width=32 is smaller than FreeSwimConfig.train_size"),
        (dict(height=72), "height must be an int multiple of 16"),
        (dict(strength=0.0), r"strength must be a float in \(0, 1\]"),
    ],
)
def test_bad_call_raises_value_error(kwargs, match):
    pipe = _pipe(FreeSwimConfig(train_size=TRAIN))
    with pytest.raises(ValueError, match=match):
        _refine(pipe, **kwargs)


def test_a_processor_set_on_the_transformer_gets_the_step_context():
    pipe = _pipe()
    processor = FreeSwimProcessor(FreeSwimConfig(train_size=TRAIN, cache_steps=2))
    pipe.transformer.set_attn_processor(processor)
    assert _refine(pipe, steps=2).timings["full_steps"] == 1
    assert all(p is processor for p in pipe.transformer.attn_processors.values())


def test_a_vidaccel_processor_without_freeswim_is_refused():
    pipe = _pipe()
    pipe.set_attn_processor(vidaccel.DenseProcessor())
    with pytest.raises(ValueError, match="needs a FreeSwim method"):
        _refine(pipe)


@pytest.mark.gpu
def test_gpu_dual_path_with_offloaded_cache():
    """On the GPU: the kernels in bf16 and the cache in pinned CPU memory give the same latent as the
    cache on the GPU."""

    def run(offload):
        pipe = _pipe(FreeSwimConfig(train_size=TRAIN, cache_steps=2, offload_cache=offload))
        pipe.to("cuda", torch.bfloat16)
        pipe.vae.to(torch.float32)
        return _refine(pipe, steps=4).frames

    assert torch.equal(run(True), run(False))
