"""CausalWanPipeline: the cached chunked rollout against a block-causal full-sequence reference,
prefix consistency, stream/__call__ agreement, rotary continuation, chunked VAE decoding, errors."""

import dataclasses
import json
import math
from types import SimpleNamespace

import _tiny
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_err, run_script
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from PIL import Image
from transformers import T5Config, T5EncoderModel

import vidaccel
from vidaccel import AccelProcessor, DenseProcessor, TempCacheConfig
from vidaccel.pipelines import CausalWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds
from vidaccel.pipelines.causal_wan import RolloutOptions, decode_latent_chunk, flow_sigmas, rotary_emb_at
from vidaccel.processors import WanAdapter
from vidaccel.state import context_of

TOL = 1e-5  # fp32: cached rollout vs one forward over the whole sequence
TOKENS_PER_FRAME = 4  # pixel-space rollouts of 4x4 "pixels", patch 2x2
SMALL = dict(height=4, width=4, output_type="latent")  # no VAE: latent frames = num_frames


def _pipe(*, vae: bool = False, rope_max_seq_len: int = 32, seed: int = 0) -> CausalWanPipeline:
    base = build_tiny_wan_pipeline(seed=seed)
    transformer = base.transformer
    if rope_max_seq_len != transformer.config.rope_max_seq_len:
        resized = WanTransformer3DModel.from_config(transformer.config, rope_max_seq_len=rope_max_seq_len)
        resized.load_state_dict(transformer.state_dict())
        transformer = resized.eval()
    pipe = CausalWanPipeline(transformer, base.scheduler, vae=base.vae if vae else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(pipe, seed=1):
    return tiny_prompt_embeds(pipe, seed=seed)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class _BlockCausalProcessor:
    """Reference processor: the stock q/k/v (vidaccel's Wan adapter) and torch SDPA, self-attention
    masked so a token of chunk c sees the tokens of chunks <= c (optionally only a rolling window of
    earlier frames: the first ``sink`` frames and the ``window - sink`` frames before the chunk)."""

    def __init__(self, chunk_tokens: int, window: int | None = None, sink: int = 0):
        self.chunk_tokens, self.window, self.sink = chunk_tokens, window, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return WanAdapter().forward(
            attn, hidden_states, encoder_hidden_states, None, rotary_emb, self._attend
        )

    def _attend(self, kind, q, k, v, attention_mask=None, k_pre=None):
        mask = None
        if kind == "self":
            token = torch.arange(q.shape[1])
            chunk, frame = token // self.chunk_tokens, token // TOKENS_PER_FRAME
            chunk_start = chunk * (self.chunk_tokens // TOKENS_PER_FRAME)  # first frame of each token's chunk
            mask = chunk[None, :] <= chunk[:, None]
            if self.window is not None:
                earlier = frame[None, :] < chunk_start[:, None]
                in_window = (frame[None, :] < self.sink) | (
                    frame[None, :] >= chunk_start[:, None] - (self.window - self.sink)
                )
                mask &= ~earlier | in_window
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)


def _record_forwards(pipe):
    """Every transformer forward of a rollout: (phase, chunk index, input, timestep, output)."""
    records = []
    context = context_of(pipe.transformer)

    def hook(module, args, output):
        records.append(
            (context.phase, context.chunk_index, args[0].clone(), float(args[1][0]), output[0].clone())
        )

    return records, pipe.transformer.register_forward_hook(hook)


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(context_timestep=100),
        dict(max_cache_frames=3, sink_frames=1),
        dict(rope_max_seq_len=3),  # the rollout runs past the rotary table, which is extended
    ],
    ids=["dense", "noisy_context", "rolling_window", "past_rope_table"],
)
def test_cached_rollout_equals_block_causal_full_sequence(case):
    """Each denoising forward of the cached rollout equals, on the current chunk, one forward over
    [committed earlier chunks; current chunk] with per-token timesteps and a block-causal mask."""
    case = dict(case)
    rope_max_seq_len = case.pop("rope_max_seq_len", 32)
    pipe = _pipe(rope_max_seq_len=rope_max_seq_len)
    chunk_frames = 2
    records, handle = _record_forwards(pipe)
    pipe(
        prompt_embeds=_embeds(pipe),
        num_frames=7,
        chunk_frames=chunk_frames,
        generator=_gen(),
        **SMALL,
        **case,
    )
    handle.remove()

    reference = _pipe().transformer  # same weights, rotary table of 32 frames
    chunk_tokens = chunk_frames * TOKENS_PER_FRAME
    reference.set_attn_processor(
        _BlockCausalProcessor(chunk_tokens, case.get("max_cache_frames"), case.get("sink_frames", 0))
    )
    committed = [(x, t) for phase, _, x, t, _ in records if phase == "commit"]
    denoised = [(chunk, x, t, out) for phase, chunk, x, t, out in records if phase == "denoise"]
    assert len(committed) == 3 and len(denoised) == 4 * 4  # 4 chunks x 4 steps, no commit after the last
    embeds = _embeds(pipe)
    for chunk, x, t, out in denoised:
        inputs = torch.cat([x_c for x_c, _ in committed[:chunk]] + [x], dim=2)
        timesteps = torch.tensor(
            [t_c for _, t_c in committed[:chunk] for _ in range(chunk_tokens)] + [t] * chunk_tokens
        )
        with torch.no_grad():
            full = reference(inputs, timesteps[None], embeds, return_dict=False)[0]
        assert rel_err(out, full[:, :, -chunk_frames:]) <= TOL, (chunk, t)


def test_longer_rollout_begins_with_shorter_and_same_seed_same_video():
    pipe = _pipe()
    run = dict(prompt_embeds=_embeds(pipe), chunk_frames=2, **SMALL)
    short = pipe(num_frames=5, generator=_gen(), **run).frames  # chunks 2 + 2 + 1 (a trimmed partial chunk)
    long = pipe(num_frames=8, generator=_gen(), **run).frames
    again = pipe(num_frames=5, generator=_gen(), **run).frames
    assert short.shape == (1, 16, 5, 4, 4) and long.shape == (1, 16, 8, 4, 4)
    assert torch.equal(long[:, :, :5], short)
    assert torch.equal(again, short)


def test_stream_equals_call_and_stopping_early_releases_everything():
    pipe = _pipe(vae=True)
    run = dict(prompt_embeds=_embeds(pipe), height=16, width=32, num_frames=13, chunk_frames=2)
    video = pipe(generator=_gen(), **run).frames
    chunks = [out.frames for out in pipe.stream(generator=_gen(), **run)]
    assert video.shape == (1, 13, 16, 32, 3) and 0 <= video.min() and video.max() <= 1
    assert [c.shape[1] for c in chunks] == [5, 8]  # latent frames 2 + 2: 1 + 4 and 4 + 4 frames
    assert np.array_equal(np.concatenate(chunks, axis=1), video)

    context = context_of(pipe.transformer)
    stream = pipe.stream(generator=_gen(), **run)
    first = next(stream)
    assert pipe.kv_cache_stats()["tokens"] == 2 * 2 * 2  # 2 layers x 2 committed frames x 2 tokens
    stream.close()
    assert np.array_equal(first.frames, chunks[0])
    assert context.pipeline_state == {} and pipe.kv_cache_stats() == {}
    assert not pipe.transformer.rope._forward_hooks
    assert np.array_equal(pipe(generator=_gen(), **run).frames, video)


def test_output_types_agree():
    pipe = _pipe(vae=True)
    run = dict(prompt_embeds=_embeds(pipe), height=16, width=32, num_frames=5, chunk_frames=2, generator=None)
    latents = pipe(**{**run, "generator": _gen()}, output_type="latent").frames
    frames = pipe(**{**run, "generator": _gen()}, output_type="pt").frames
    pil = pipe(**{**run, "generator": _gen()}, output_type="pil", return_dict=False)[0]
    decoded = pipe._decode_chunk(latents, None)[0]
    assert torch.equal(frames, (decoded.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1))
    assert len(pil) == 1 and len(pil[0]) == 5 and pil[0][0].size == (32, 16)


def test_chunked_vae_decode_equals_whole_decode():
    """Fails if a diffusers upgrade changes AutoencoderKLWan's causal decoding protocol."""
    vae = build_tiny_wan_pipeline().vae
    latents = torch.randn(1, 16, 6, 4, 6, generator=_gen(3))
    whole = vae.decode(latents).sample
    pieces, cache = [], None
    for part in latents.split([2, 3, 1], dim=2):
        frames, cache = decode_latent_chunk(vae, part, cache)
        pieces.append(frames)
    assert [p.shape[2] for p in pieces] == [5, 12, 4]
    assert torch.equal(torch.cat(pieces, dim=2), whole)


def test_chunked_vae_decode_refuses_a_changed_decoder(monkeypatch):
    vae = build_tiny_wan_pipeline().vae
    monkeypatch.setattr(vae.decoder, "forward", lambda x, feat_cache=None: x)
    with pytest.raises(RuntimeError, match="diffusers changed AutoencoderKLWan"):
        decode_latent_chunk(vae, torch.randn(1, 16, 1, 4, 6), None)


def test_rotary_table_continues_past_rope_max_seq_len():
    short, long = _pipe(rope_max_seq_len=4).transformer.rope, _pipe(rope_max_seq_len=32).transformer.rope
    x = torch.zeros(1, 16, 3, 4, 6)
    assert all(torch.equal(a, b) for a, b in zip(rotary_emb_at(short, x.shape[2:], 0), short(x), strict=True))
    whole = long(torch.zeros(1, 16, 9, 4, 6))
    for offset in (2, 6):  # inside and past the short table
        for ours, ref in zip(rotary_emb_at(short, x.shape[2:], offset), whole, strict=True):
            assert torch.equal(ours, ref[:, offset * 6 : (offset + 3) * 6])


def test_flow_sigmas_match_diffusers_shift():
    timesteps, shift = [1000, 750, 500, 250], 5.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=[t / 1000 for t in timesteps])
    assert flow_sigmas(timesteps, shift) == pytest.approx(scheduler.sigmas[:-1].tolist(), abs=1e-7)


def test_eta_zero_steps_like_diffusers_flow_match_euler_scheduler():
    """eta=0: each chunk's denoising is the flow ODE as diffusers' FlowMatchEulerDiscreteScheduler steps
    it (the next step's input, and the chunk = the step to sigma 0); eta=1 keeps fresh noise."""
    pipe = _pipe()
    timesteps, shift = (1000, 700, 400, 150), 3.0
    run = dict(prompt_embeds=_embeds(pipe), num_frames=3, chunk_frames=1, denoising_timesteps=timesteps,
               shift=shift, **SMALL)  # fmt: skip
    records, handle = _record_forwards(pipe)
    video = pipe(eta=0.0, generator=_gen(), **run).frames
    handle.remove()
    denoised = [(chunk, x, t, out) for phase, chunk, x, t, out in records if phase == "denoise"]
    assert len(denoised) == 3 * len(timesteps)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    for chunk in range(3):
        steps = [(x, t, out) for c, x, t, out in denoised if c == chunk]
        scheduler.set_timesteps(sigmas=[t / 1000 for t in timesteps])
        for i, (x, t, out) in enumerate(steps):
            assert t == pytest.approx(float(scheduler.timesteps[i]), abs=1e-3)
            stepped = scheduler.step(out, scheduler.timesteps[i], x).prev_sample
            expected = steps[i + 1][0] if i + 1 < len(steps) else video[:, :, chunk : chunk + 1]
            assert rel_err(stepped, expected) <= TOL, (chunk, i)
    fresh = pipe(eta=1.0, generator=_gen(), **run).frames
    assert torch.equal(fresh, pipe(generator=_gen(), **run).frames)  # eta=1 is the default
    assert not torch.allclose(fresh, video, atol=1e-3)


def test_eta_between_mixes_fresh_noise_and_the_noise_estimate():
    """0 < eta < 1: the second step's input is (1 - s1) x0 + s1 (eta z + sqrt(1 - eta^2) eps_hat), z the
    generator's second draw, eps_hat = x + (1 - s0) v the model's noise estimate."""
    pipe = _pipe()
    eta, timesteps = 0.6, (1000, 500)
    records, handle = _record_forwards(pipe)
    pipe(prompt_embeds=_embeds(pipe), num_frames=1, chunk_frames=1, denoising_timesteps=timesteps, shift=1.0,
         eta=eta, generator=_gen(), **SMALL)  # fmt: skip
    handle.remove()
    (_, _, x0_in, t0, v0), (_, _, x1_in, t1, _) = [r for r in records if r[0] == "denoise"]
    s0, s1 = t0 / 1000, t1 / 1000
    generator = _gen()
    first = torch.randn(x0_in.shape, generator=generator)
    fresh = torch.randn(x0_in.shape, generator=generator)
    assert torch.equal(first, x0_in)
    noise = eta * fresh + math.sqrt(1 - eta**2) * (x0_in + (1 - s0) * v0)
    assert rel_err(x1_in, (1 - s1) * (x0_in - s0 * v0) + s1 * noise) <= TOL


def test_tempcache_works_through_apply_and_set_attn_processor():
    pipe = _pipe()
    run = dict(prompt_embeds=_embeds(pipe), num_frames=6, chunk_frames=2, **SMALL)
    dense = pipe(generator=_gen(), **run).frames
    config = TempCacheConfig(threshold=1.0, sink_frames=1, max_tokens=64)  # merges nothing: exact
    vidaccel.apply(pipe, config)
    applied = pipe(generator=_gen(), **run).frames
    pipe.set_attn_processor(vidaccel.TempCacheProcessor(config))
    installed = pipe(generator=_gen(), **run).frames
    assert rel_err(applied, dense) <= TOL and torch.equal(applied, installed)

    vidaccel.remove(pipe)
    processors = set(pipe.transformer.attn_processors.values())
    assert len(processors) == 1 and type(processors.pop()) is DenseProcessor
    assert context_of(pipe.transformer) is not None
    assert torch.equal(pipe(generator=_gen(), **run).frames, dense)


def test_prompt_cross_attention_kv_projected_once_per_generation():
    pipe = _pipe()
    calls = []
    handle = pipe.transformer.blocks[0].attn2.to_k.register_forward_hook(lambda *_: calls.append(1))
    pipe(prompt_embeds=_embeds(pipe), num_frames=6, chunk_frames=2, generator=_gen(), **SMALL)
    assert len(calls) == 1  # 3 chunks x 4 steps + 2 commit passes = 14 forwards
    pipe(prompt_embeds=_embeds(pipe, seed=5), num_frames=6, chunk_frames=2, generator=_gen(), **SMALL)
    handle.remove()
    assert len(calls) == 2  # a new generation projects its own prompt


def test_prompt_kv_cache_on_a_stock_pipeline_with_guidance():
    """Under vidaccel.apply, a stock WanPipeline projects the cond and the uncond prompt once each
    per generation, and the video is the stock one."""
    pipe = _tiny.tiny_pipe()
    stock = _tiny.run(pipe, steps=3)
    vidaccel.apply(pipe)
    calls = []
    handle = pipe.transformer.blocks[1].attn2.to_v.register_forward_hook(lambda *_: calls.append(1))
    ours = _tiny.run(pipe, steps=3)
    handle.remove()
    assert len(calls) == 2  # 3 steps x (cond, uncond) forwards
    assert rel_err(ours, stock) <= TOL


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, right-padded, as Wan's pipelines call UMT5's."""

    def __call__(self, prompts, *, max_length, **kwargs):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            codes = [1 + ord(c) % 30 for c in prompt][:max_length]
            ids[row, : len(codes)], mask[row, : len(codes)] = torch.tensor(codes), 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


def test_prompt_strings_are_encoded_like_wan_pipelines():
    config = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=16, num_layers=1, num_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = T5EncoderModel(config).eval()
    base = _pipe()
    pipe = CausalWanPipeline(
        base.transformer, base.scheduler, text_encoder=encoder, tokenizer=_CharTokenizer()
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe.encode_prompt(["a cat", "surfing dog"])
    assert embeds.shape == (2, 512, 32)
    with torch.no_grad():
        alone = encoder(torch.tensor([[1 + ord(c) % 30 for c in "a cat"]])).last_hidden_state
    assert torch.allclose(embeds[0, :5], alone[0], atol=1e-6) and not embeds[0, 5:].any()
    run = dict(num_frames=4, chunk_frames=2, **SMALL)
    video = pipe("a cat", generator=_gen(), **run).frames
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat")
    assert rel_err(video, pipe(prompt_embeds=embeds, generator=_gen(), **run).frames) <= TOL
    with pytest.raises(ValueError, match="needs the pipeline's text_encoder and tokenizer"):
        base("a cat", **run)


@pytest.mark.gpu
def test_cached_rollout_on_cuda_matches_the_reference_backend():
    """bf16 on the GPU: the rollout on vidaccel's Triton kernels against the same rollout on the
    PyTorch reference (fp32 math), and TempCache with a budget runs and stays finite."""
    base = build_tiny_wan_pipeline(seed=0, heads=2, head_dim=64, dtype=torch.bfloat16, device="cuda")
    pipe = CausalWanPipeline(base.transformer, base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    run = dict(prompt_embeds=tiny_prompt_embeds(base, seed=1), num_frames=12, chunk_frames=3, **SMALL)
    pipe.set_attn_processor(DenseProcessor(backend="reference"))
    reference = pipe(generator=_gen(), **run).frames
    pipe.set_attn_processor(DenseProcessor(backend="triton"))
    ours = pipe(generator=_gen(), **run).frames
    assert rel_err(ours, reference) <= 2e-2
    vidaccel.apply(pipe, TempCacheConfig(threshold=0.5, sink_frames=3, max_tokens=24))
    merged = pipe(generator=_gen(), **run).frames
    assert merged.shape == ours.shape and torch.isfinite(merged).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_frames=0), "chunk_frames must be an int in \\[1, inf\\)"),
        (dict(chunk_frames=1.5), "chunk_frames must be an int"),
        (dict(num_frames=0), "num_frames must be an int in \\[1, inf\\)"),
        (dict(height=5), "height must be a positive multiple of 2"),
        (dict(denoising_timesteps=(500, 750)), "denoising_timesteps must be strictly decreasing"),
        (dict(denoising_timesteps=(1200,)), "denoising_timesteps"),
        (dict(shift=0.0), "shift must be a float in \\(0, inf\\)"),
        (dict(eta=1.5), "eta must be a float in \\[0, 1\\]"),
        (dict(eta=-0.1), "eta must be a float in \\[0, 1\\]"),
        (dict(eta=True), "eta must be a float in \\[0, 1\\]"),
        (dict(context_timestep=-1), "context_timestep must be a float in \\[0, 1000\\]"),
        (dict(sink_frames=1), "sink_frames needs max_cache_frames"),
        (
            dict(max_cache_frames=2, sink_frames=2),
            "sink_frames must be an int in \\[0, max_cache_frames - 1 = 1\\]",
        ),
        (dict(max_cache_frames=0), "max_cache_frames must be an int in \\[1, inf\\)"),
        (dict(output_type="np"), "needs 3 output channels"),
        (dict(output_type="gif"), "output_type must be one of"),
        (dict(num_steps=4), r"unknown rollout argument\(s\) \['num_steps'\]; allowed: prompt, prompt_embeds"),
        (dict(options=RolloutOptions(prompt="a cat")), "pass either options=RolloutOptions"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    pipe = _pipe()
    run = dict(prompt_embeds=_embeds(pipe), num_frames=4, **SMALL)
    with pytest.raises(ValueError, match=match):
        pipe(**{**run, **kwargs})
    with pytest.raises(ValueError, match=match):
        pipe.stream(**{**run, **kwargs})  # checked at the call, before the first chunk


def test_rollout_options_are_the_keyword_arguments():
    """``pipe(options=RolloutOptions(...))`` is ``pipe(**fields)``; the options are frozen, checked when made."""
    pipe = _pipe()
    fields = dict(prompt_embeds=_embeds(pipe), num_frames=4, generator=None, **SMALL)
    torch.manual_seed(0)
    by_fields = pipe(**fields).frames
    torch.manual_seed(0)
    options = RolloutOptions(**fields)
    assert torch.equal(pipe(options=options).frames, by_fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_frames = 8
    with pytest.raises(ValueError, match="chunk_frames must be an int in \\[1, inf\\)"):
        RolloutOptions(prompt="a cat", chunk_frames=0)


def test_bad_pipelines_raise_value_error():
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        CausalWanPipeline(torch.nn.Linear(2, 2), FlowMatchEulerDiscreteScheduler())
    pipe = _pipe()
    run = dict(prompt_embeds=_embeds(pipe), num_frames=4, max_cache_frames=3, **SMALL)
    vidaccel.apply(pipe, TempCacheConfig())
    with pytest.raises(ValueError, match="cannot be combined"):
        pipe(**run)
    pipe.set_attn_processor(AccelProcessor(TempCacheConfig()))
    with pytest.raises(ValueError, match="cannot be combined"):
        pipe(**run)
    pipe.transformer.set_attn_processor(WanAttnProcessor())
    with pytest.raises(ValueError, match="keeps its KV cache in vidaccel processors"):
        pipe(**{**run, "max_cache_frames": None})
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        _pipe()(num_frames=4, **SMALL)


def test_long_rollout_demo_writes_videos_plot_and_report(tmp_path):
    argv = [
        "--tiny",
        "--frames",
        "13",
        "--height",
        "16",
        "--width",
        "16",
        "--max-tokens",
        "64",
        "--warmup-chunks",
        "0",
    ]
    run_script("demos/long_rollout.py", *argv, "--out", str(tmp_path))  # its command line, in its own process
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["methods"]) == {"dense", "window", "tempcache"}
    for method, run in report["methods"].items():
        assert len(run["chunks"]) == 2 and all(
            c["latency_s"] > 0 for c in run["chunks"]
        )  # 4 latent frames, chunks of 3
        assert (tmp_path / report["videos"][method]).stat().st_size > 0
    assert report["methods"]["dense"]["fidelity_vs_dense"]["psnr_db"] == math.inf
    assert report["methods"]["dense"]["chunks"][-1]["kv_cache_bytes"] > 0
    with Image.open(tmp_path / report["plot"]) as plot:
        assert plot.format == "PNG" and plot.size[0] > plot.size[1]
