"""Helpers for the processor, state and apply tests: tiny pipeline runs and test-only methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vidaccel import Method, MethodConfig
from vidaccel.pipelines import CausalWanPipeline, build_tiny_wan_pipeline, tiny_prompt_embeds

# 9 frames of 32x48 pixels: latent [16, 3, 4, 6], token grid (3, 2, 3) = 18 tokens.
HEIGHT, WIDTH, FRAMES = 32, 48, 9
GRID = (3, 2, 3)


def tiny_pipe(**kwargs):
    pipe = build_tiny_wan_pipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, *, steps: int = 2, guidance_scale: float = 5.0, output_type: str = "latent", **kwargs):
    """One seeded generation: latents ``[1, 16, 3, 4, 6]`` or frames ``[1, 9, 3, 32, 48]``."""
    return pipe(
        prompt_embeds=tiny_prompt_embeds(pipe, seed=1),
        negative_prompt_embeds=tiny_prompt_embeds(pipe, seed=2),
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type=output_type,
        generator=torch.Generator("cpu").manual_seed(0),
        **kwargs,
    ).frames


@dataclass(frozen=True)
class Record:
    """What a :class:`RecordMethod` saw at one call."""

    kind: str
    attn: torch.nn.Module
    layer: object
    seq_q: int
    seq_k: int
    has_context: bool
    step_index: int | None = None
    pass_index: int | None = None
    cache_name: str | None = None
    timestep: float | None = None
    grid: tuple | None = None
    batch_size: int | None = None
    generation: int | None = None
    calls_before: int | None = None


@dataclass
class _TestConfig(MethodConfig):
    """Test-only configs choose their method's ``kinds`` and ``needs_context`` per instance."""

    kinds: tuple[str, ...] = ("self", "cross", "cross_image")
    needs_context: bool = False
    log: list = field(default_factory=list)

    def build(self) -> Method:
        return self.method_cls(self)


class _TestMethod(Method):
    def __init__(self, config: _TestConfig) -> None:
        super().__init__(config)
        self.kinds = frozenset(config.kinds)
        self.needs_context = config.needs_context


class RecordMethod(_TestMethod):
    def attend(self, call, proceed):
        ctx = call.context
        seen = dict(
            kind=call.kind, attn=call.attn, layer=call.layer, seq_q=call.q.shape[1], seq_k=call.k.shape[1]
        )
        if ctx is None:
            self.config.log.append(Record(**seen, has_context=False))
        else:
            state = ctx.module_state(call.attn)
            state["calls"] = state.get("calls", 0) + 1
            self.config.log.append(
                Record(
                    **seen,
                    has_context=True,
                    step_index=ctx.step_index,
                    pass_index=ctx.pass_index,
                    cache_name=ctx.cache_name,
                    timestep=ctx.timestep,
                    grid=ctx.grid,
                    batch_size=ctx.batch_size,
                    generation=ctx.generation,
                    calls_before=state["calls"] - 1,
                )
            )
        return proceed(call)


@dataclass
class RecordConfig(_TestConfig):
    """Records, per call, a :class:`Record` of the call and the step context in ``log``, then proceeds."""

    kinds: tuple[str, ...] = ("self", "cross")
    needs_context: bool = True
    method_cls = RecordMethod


class AffineMethod(_TestMethod):
    def attend(self, call, proceed):
        self.config.log.append((self.config.name, call.kind))
        if self.config.scale is not None:
            call = call.replace(scale=self.config.scale)
        out, lse = proceed(call)
        return out * self.config.mul + self.config.add, lse


@dataclass
class AffineConfig(_TestConfig):
    """Logs ``(name, kind)`` and maps the rest of the chain's output ``out`` to ``out * mul + add``,
    optionally running the rest of the chain with softmax scale ``scale``."""

    name: str = "affine"
    add: float = 0.0
    mul: float = 1.0
    scale: float | None = None
    method_cls = AffineMethod


def tiny_causal_pipe():
    """A tiny ``CausalWanPipeline`` (2 layers, 2 heads x 64, progress bar off) and prompt embeddings."""
    tiny = build_tiny_wan_pipeline(heads=2, head_dim=64, num_layers=2)
    pipe = CausalWanPipeline(tiny.transformer, tiny.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny_prompt_embeds(tiny, seed=1)
