"""The step context: filled by the hook and diffusers' cache_context, reset between generations."""

import pytest
import torch
from _tiny import GRID, RecordConfig, run, tiny_pipe
from diffusers.hooks import HookRegistry

import vidaccel
from vidaccel.state import HOOK_NAME, ForwardInputs, StepContext, context_for, context_of

TOKENS = GRID[0] * GRID[1] * GRID[2]


@pytest.fixture
def recorded():
    """A tiny pipeline patched with a recording method on self- and cross-attention."""
    pipe = tiny_pipe()
    record = RecordConfig()
    vidaccel.apply(pipe, record)
    return pipe, record.log


def test_context_follows_steps_passes_and_cfg_branches(recorded):
    pipe, log = recorded
    steps = 3
    run(pipe, steps=steps)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    calls_per_forward = 2 * 2  # 2 blocks x (self, cross)
    assert len(log) == steps * 2 * calls_per_forward
    for position, rec in enumerate(log):
        forward = position // calls_per_forward
        step, branch = divmod(forward, 2)
        assert rec.has_context
        assert (rec.step_index, rec.pass_index) == (step, branch)
        assert rec.cache_name == ("cond", "uncond")[branch]
        assert rec.timestep == timesteps[step]
        assert rec.grid == GRID and rec.batch_size == 1
        assert rec.seq_q == TOKENS and rec.seq_k == (TOKENS if rec.kind == "self" else 16)
        block = (position % calls_per_forward) // 2
        assert rec.layer.index == block and rec.layer.num_layers == 2 and rec.layer.kind == rec.kind
        assert rec.layer.name == f"blocks.{block}.{'attn1' if rec.kind == 'self' else 'attn2'}"
        assert rec.calls_before == forward  # module state persists through the generation


def test_context_resets_between_generations(recorded):
    pipe, log = recorded
    context = context_of(pipe.transformer)
    run(pipe, steps=2)
    first = list(log)
    assert context.step_index == -1 and context.timestep is None and context.grid is None  # reset at the end
    assert all(not context.module_state(attn) for attn in {rec.attn for rec in first})  # state released
    log.clear()
    run(pipe, steps=2)
    assert [(r.step_index, r.pass_index, r.calls_before) for r in log] == [
        (r.step_index, r.pass_index, r.calls_before) for r in first
    ]
    assert {r.generation for r in log} == {first[0].generation + 1}


def _forward(transformer, timestep, batch=1, frames=3, height=4, width=6):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 16, frames, height, width, generator=generator)
    prompt = torch.randn(batch, 16, 32, generator=generator)
    timestep = torch.as_tensor(timestep, dtype=torch.float32)
    with torch.no_grad():
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt, return_dict=False)[0]


def test_timestep_jump_starts_a_new_generation(recorded):
    pipe, log = recorded
    transformer = pipe.transformer
    for t in (900.0, 900.0, 500.0, 800.0):
        _forward(transformer, [t])
    selfs = [r for r in log if r.kind == "self" and r.layer.index == 0]
    assert [(r.step_index, r.pass_index) for r in selfs] == [(0, 0), (0, 1), (1, 0), (0, 0)]
    assert [r.calls_before for r in selfs] == [0, 1, 2, 0]  # the jump released the module state
    assert selfs[3].generation == selfs[0].generation + 1
    assert all(r.cache_name is None for r in log)  # called outside any cache_context


def test_timestep_jump_reset_can_be_disabled_for_chunked_rollouts(recorded):
    pipe, log = recorded
    context = context_of(pipe.transformer)
    _forward(pipe.transformer, [900.0])
    context.reset_on_timestep_jump = False
    context.chunk_index, context.chunk_step, context.phase = 1, 0, "denoise"
    _forward(pipe.transformer, [500.0])
    _forward(pipe.transformer, [900.0])
    selfs = [r for r in log if r.kind == "self" and r.layer.index == 0]
    assert [r.step_index for r in selfs] == [0, 1, 2] and [r.calls_before for r in selfs] == [0, 1, 2]
    assert len({r.generation for r in selfs}) == 1
    context.reset()
    assert context.reset_on_timestep_jump and (context.chunk_index, context.chunk_step, context.phase) == (None,) * 3


def test_grid_batch_and_per_token_timesteps(recorded):
    pipe, log = recorded
    per_token = torch.zeros(2, 2 * 3 * 5)  # [B, S] as Wan 2.2 TI2V passes them
    per_token[:, 6:] = 700.0
    _forward(pipe.transformer, per_token, batch=2, frames=2, height=6, width=10)
    rec = log[0]
    assert (rec.grid, rec.batch_size, rec.timestep, rec.seq_q) == ((2, 3, 5), 2, 700.0, 30)


def test_cache_context_reaches_the_context_and_clears(recorded):
    pipe, _ = recorded
    transformer = pipe.transformer
    context = context_of(transformer)
    with transformer.cache_context("cond", step_index=4, sigma=0.5):
        assert context.cache_name == "cond" and context.cache_context.step_index == 4
        assert context.pass_key == "cond"
    assert context.cache_context is None and context.pass_key == context.pass_index


def test_hook_is_registered_stateful_and_reset_by_diffusers(recorded):
    pipe, _ = recorded
    transformer = pipe.transformer
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(HOOK_NAME)
    assert hook is not None and hook._is_stateful
    context = context_of(transformer)
    attn = transformer.blocks[1].attn1
    assert context_for(attn) is context and context.layer(attn).name == "blocks.1.attn1"
    _forward(transformer, [900.0])
    assert context.step_index == 0 and context.module_state(attn)
    generation = context.generation
    transformer._reset_stateful_cache()  # what maybe_free_model_hooks does after each generation
    assert context.step_index == -1 and not context.module_state(attn) and context.generation == generation + 1


def test_step_context_unit():
    context = StepContext()
    attn = torch.nn.Linear(1, 1)
    context.module_state(attn)["kv"] = torch.zeros(3)
    for timestep in (999.0, 999.0, 999.0, 750.0):
        context.begin_forward(ForwardInputs((1, 2, 3), 2, timestep))
    assert (context.step_index, context.pass_index, context.grid, context.batch_size) == (1, 0, (1, 2, 3), 2)
    assert context.pass_key == 0 and context.module_state(attn)["kv"].shape == (3,)
    assert context.layer(attn) is None
    context.begin_forward(ForwardInputs((1, 2, 3), 2, 750.0))
    assert context.pass_index == 1
    context.reset()
    assert context.module_state(attn) == {} and context.generation == 1 and context.step_index == -1
