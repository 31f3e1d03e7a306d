"""World-model training (``vidaccel.pipelines.training``) and its fine-tuning options: ``init``
(weights loaded, training mode), ``self_context`` (the model's own estimates replace context frames
only), ``context_noise`` (context frames noised, targets untouched), ``rollout_context`` (the model's
own autoregressive rollout as context, true targets), the stats loss, DMD, and the plain objective
when all are off. The training script's command line: tests/test_train_world_model.py."""

import copy

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from vidaccel.pipelines import DEFAULT_WORLD_MODEL, GameEnv, random_actions
from vidaccel.pipelines import training as train
from vidaccel.pipelines.world_model import world_model_config

TINY = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2)
SHIPPED = (DEFAULT_WORLD_MODEL / "diffusion_pytorch_model.safetensors").is_file()
CPU = torch.device("cpu")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _setup(clip_frames=6, **options):
    """A tiny model installed in a trainer, and a batch of 2 clips from one short episode."""
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(world_model_config() | TINY).train()
    trainer = train.Trainer(CPU, **options)
    trainer.install(model)
    actions = [0, *random_actions(15, seed=3)]
    env = GameEnv(3, level=1)
    frames = np.stack([env.reset(), *env.rollout(actions[1:])])
    data = train.Data(frames[None], np.array(actions)[None], np.array([1]), CPU)
    batch = data.sample(2, clip_frames, _gen(1), far_frames=0)
    return model, trainer, batch


def _capture_inputs(trainer):
    """Record the noisy input and sigma of every model call of ``trainer``."""
    calls, forward = [], trainer.forward

    def recording(model, noisy, actions, sigma, positions, levels):
        calls.append((noisy.clone(), sigma.clone()))
        return forward(model, noisy, actions, sigma, positions, levels)

    trainer.forward = recording
    return calls


def test_options_off_is_the_plain_diffusion_forcing_loss():
    model, trainer, batch = _setup()
    sigma = trainer.sigmas(batch, _gen(2))
    sigma[:, -1] = 0.5  # at least one frame with a loss
    loss = trainer.loss(model, batch, _gen(3), sigma)
    # by hand: x_s = (1 - s) x0 + s eps, target eps - x0, mean over the frames with sigma > 0
    x0 = batch["x0"]
    noise = torch.randn(x0.shape, generator=_gen(3))
    s = sigma[:, None, :, None, None]
    flow = trainer.forward(
        model, (1 - s) * x0 + s * noise, batch["actions"], sigma, batch["positions"], batch["levels"]
    )
    per_frame = ((flow - (noise - x0)) ** 2).mean(dim=(1, 3, 4))
    expected = per_frame[sigma > 0].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_context_noise_noises_context_frames_only():
    model, plain, batch = _setup()
    sigma = plain.sigmas(batch, _gen(2))
    sigma[:, :3] = 0.0  # context
    sigma[:, 3:] = 0.75  # targets
    plain_calls = _capture_inputs(plain)
    plain_loss = plain.loss(model, batch, _gen(3), sigma)
    noisy_trainer = train.Trainer(CPU, context_noise=0.3)
    noisy_trainer.install(model)
    noisy_calls = _capture_inputs(noisy_trainer)
    noisy_loss = noisy_trainer.loss(model, batch, _gen(3), sigma)
    (plain_in, plain_sigma), (noisy_in, noisy_sigma) = plain_calls[0], noisy_calls[0]
    target = sigma > 0
    assert torch.equal(plain_sigma, sigma)
    assert torch.equal(noisy_sigma[target], sigma[target]), "targets keep their sigma"
    assert torch.equal(noisy_in[:, :, 3:], plain_in[:, :, 3:]), "targets' inputs are untouched"
    context_sigma = noisy_sigma[~target]
    assert context_sigma.min() >= 0 and context_sigma.max() <= 0.3 and (context_sigma > 0).any()
    moved = noisy_sigma[:, :3] > 0
    assert not torch.equal(noisy_in[:, :, :3], plain_in[:, :, :3]) and moved.any()
    assert torch.isfinite(noisy_loss) and not torch.equal(noisy_loss, plain_loss)


def test_self_context_replaces_context_frames_but_the_first():
    model, trainer, batch = _setup(self_context=1.0)
    target = torch.zeros(2, 6, dtype=torch.bool)
    target[:, 4:] = True
    x_in = trainer._own_context(model, batch, target, _gen(4))
    x0 = batch["x0"]
    assert model.training, "the estimate runs in eval mode and the model is set back to train"
    assert torch.equal(x_in[:, :, 0], x0[:, :, 0]), "the first frame stays true"
    assert torch.equal(x_in[:, :, 4:], x0[:, :, 4:]), "targets stay true"
    replaced = x_in[:, :, 1:4]
    assert replaced.abs().max() <= 1 and not torch.equal(replaced, x0[:, :, 1:4])
    # an untrained model's estimate differs from every true frame it replaces
    assert all(not torch.equal(x_in[b, :, f], x0[b, :, f]) for b in range(2) for f in range(1, 4))
    off = train.Trainer(CPU, self_context=0.0)
    off.install(model)
    assert torch.equal(off._own_context(model, batch, target, _gen(4)), x0), "fraction 0: no clip"


def test_frame_stats_loss_compares_contrast_and_detail():
    x0 = torch.rand(2, 3, 4, 8, 8, generator=_gen(0)) * 2 - 1
    frames = torch.tensor([[True, True, False, False], [False, True, False, False]])
    zero = train.frame_stats_loss(x0.clone(), x0, frames)
    assert zero == 0
    # halve every frame's deviation from its mean: std and detail both halve, so each selected frame
    # scores (0.5 - 1)^2 + (0.5 - 1)^2 = 0.5; unselected frames may hold anything
    flat = x0.mean(dim=(1, 3, 4), keepdim=True) + 0.5 * (x0 - x0.mean(dim=(1, 3, 4), keepdim=True))
    flat[:, :, 2:] = 7.0
    torch.testing.assert_close(train.frame_stats_loss(flat, x0, frames), torch.tensor(0.5))
    # a brighter frame with the same contrast and detail costs nothing: the loss sees moments, not means
    assert train.frame_stats_loss(x0 + 0.3, x0, frames) < 1e-10
    assert train.frame_stats_loss(flat, x0, torch.zeros_like(frames)) == 0, "no frame selected"


def test_stats_loss_adds_the_low_sigma_targets_moments():
    model, plain, batch = _setup()
    sigma = torch.zeros(2, 6)
    sigma[:, 3] = 0.2  # a target at the last sampler step's noise: the stats loss sees it
    sigma[:, 4:] = 0.75  # noisier targets: only the diffusion loss
    weighted = train.Trainer(CPU, stats_weight=2.0, stats_sigma_max=0.3)
    weighted.install(model)
    calls = _capture_inputs(weighted)
    loss = weighted.loss(model, batch, _gen(3), sigma)
    base = plain.loss(model, batch, _gen(3), sigma)
    noisy, _ = calls[0]
    s = sigma[:, None, :, None, None]
    flow = plain.forward(model, noisy, batch["actions"], sigma, batch["positions"], batch["levels"])
    estimate = noisy - s * flow
    low = torch.zeros(2, 6, dtype=torch.bool)
    low[:, 3] = True
    expected = base + 2.0 * train.frame_stats_loss(estimate, batch["x0"], low)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert loss > base, "an untrained model's estimates miss the true frames' moments"


def test_validation_loss_ignores_the_options():
    model, plain, batch = _setup()
    model.eval()
    expected = plain.validation_loss(model, batch)
    both = train.Trainer(CPU, self_context=1.0, context_noise=0.3, stats_weight=2.0)
    both.install(model)
    assert both.validation_loss(model, batch) == expected
    assert (both.self_context, both.context_noise, both.stats_weight) == (1.0, 0.3, 2.0), "options restored"


@pytest.mark.skipif(not SHIPPED, reason="the shipped world model is missing")
def test_init_loads_the_weights_in_training_mode():
    model = train.build_model(DEFAULT_WORLD_MODEL, False, CPU)
    assert model.training, "from_pretrained returns eval mode; fine-tuning must train"
    shipped = WanTransformer3DModel.from_pretrained(DEFAULT_WORLD_MODEL)
    assert model.dtype == torch.float32
    for (name, param), (_, ref) in zip(model.named_parameters(), shipped.named_parameters(), strict=True):
        assert torch.equal(param, ref.float()), name
    fresh = train.build_model(None, True, CPU)
    assert fresh.training and fresh.config.num_layers == train.TOY_CONFIG["num_layers"]


def _rollout_trainer(model, rollout_context=0.5):
    trainer = train.Trainer(CPU, rollout_context=rollout_context, rollout_sampler=((1000, 500), 1.0))
    trainer.install(model)
    return trainer


def test_generate_is_causal_and_keeps_the_given_frames():
    model, _, batch = _setup(clip_frames=6)
    model.eval()
    trainer = _rollout_trainer(model)
    args = batch["actions"], batch["positions"], batch["levels"], (1000, 500), 1.0
    start = batch["x0"][:, :, :2]
    full = trainer.generate(model, start, *args, _gen(5))
    short = trainer.generate(
        model, start, batch["actions"][:, :4], batch["positions"][:, :4], *args[2:], _gen(5)
    )
    assert full.shape == batch["x0"].shape and torch.equal(full[:, :, :2], start)
    assert full.abs().max() <= 1 and not torch.equal(full[:, :, 2:], batch["x0"][:, :, 2:])
    # block-causal: a frame does not depend on the frames generated after it
    torch.testing.assert_close(full[:, :, :4], short, rtol=0, atol=1e-5)


def test_generate_through_a_rolling_window():
    """``window``: a window as long as the clip is the whole past; a shorter one conditions each frame
    on the sinks and the ``window - sinks`` frames before it, exactly, at their own positions."""
    model, _, batch = _setup(clip_frames=8)
    model.eval()
    trainer = _rollout_trainer(model)
    actions, positions, levels = batch["actions"], batch["positions"], batch["levels"]
    sampler = ((1000,), 1.0)  # one step: one noise draw per frame
    sinks = batch["x0"][:, :, :2]
    whole = trainer.generate(model, sinks, actions, positions, levels, *sampler, _gen(5))
    same = trainer.generate(model, sinks, actions, positions, levels, *sampler, _gen(5), window=8)
    torch.testing.assert_close(same, whole, rtol=0, atol=1e-6)
    rolled = trainer.generate(model, sinks, actions, positions, levels, *sampler, _gen(5), window=4)
    assert not torch.allclose(rolled[:, :, 6:], whole[:, :, 6:], atol=1e-3)  # frames 0, 1 and 4, 5 only
    # frame 7 from its window's frames (0, 1, 5, 6) as given frames: the same frame
    seen = [0, 1, 5, 6, 7]
    generator = _gen(5)
    for _ in range(5):  # the draws of frames 2..6
        torch.randn((2, 3, 1, 64, 64), generator=generator)
    alone = trainer.generate(
        model, rolled[:, :, seen[:-1]], actions[:, seen], positions[:, seen], levels, *sampler, generator
    )
    torch.testing.assert_close(alone[:, :, -1], rolled[:, :, 7], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="window must exceed the 2 given frames"):
        trainer.generate(model, sinks, actions, positions, levels, *sampler, _gen(5), window=2)


def test_long_rollouts_give_the_sinks_and_a_run_of_later_frames():
    model, _, batch = _setup(clip_frames=6)
    trainer = _rollout_trainer(model, rollout_context=1.0)
    trainer.refresh_rollouts(model, _data(), 3, 6, _gen(7), rollout_frames=14, window=5)
    buffer, start = trainer.buffer, trainer.buffer["start"]
    assert buffer["x0"].shape[2] == buffer["context"].shape[2] == 14 and start == 1
    mixed = trainer.mix_rollouts(batch, _gen(8))
    assert mixed["rolled"].all() and mixed["x0"].shape == batch["x0"].shape
    for clip in range(2):
        row = [
            i
            for i in range(3)
            if torch.equal(buffer["positions"][i, :start], mixed["positions"][clip, :start])
        ]
        assert row, "the sinks: the buffer clip's true start"
        offset = int(mixed["positions"][clip, start] - buffer["positions"][row[0], 0])
        index = [*range(start), *range(offset, offset + 6 - start)]
        assert start <= offset <= 14 - (6 - start)
        assert torch.equal(mixed["positions"][clip], buffer["positions"][row[0], index])
        assert torch.equal(mixed["actions"][clip], buffer["actions"][row[0], index])
        assert torch.equal(mixed["x0"][clip], buffer["x0"][row[0]][:, index])
        assert torch.equal(mixed["context"][clip], buffer["context"][row[0]][:, index])


def test_rollout_context_trains_true_targets_on_the_models_own_past():
    model, _, batch = _setup(clip_frames=6)
    trainer = _rollout_trainer(model, rollout_context=0.5)
    assert trainer.mix_rollouts(batch, _gen(6)) is batch, "no buffer yet: unchanged"
    data_frames = batch["x0"]
    trainer.refresh_rollouts(model, _data(), clips=3, clip_frames=6, generator=_gen(7))
    assert model.training, "the rollout runs in eval mode and the mode is restored"
    buffer, start = trainer.buffer, trainer.buffer["start"]
    assert start == 1 and torch.equal(buffer["context"][:, :, :start], buffer["x0"][:, :, :start])
    assert not torch.equal(buffer["context"][:, :, start:], buffer["x0"][:, :, start:])
    mixed = trainer.mix_rollouts(batch, _gen(8))
    assert mixed["rolled"].tolist() == [True, False], "round(0.5 * 2) clips from the buffer"
    assert torch.equal(mixed["x0"][1], data_frames[1]) and torch.equal(mixed["context"][1], data_frames[1])
    prefix = int(mixed["clean"][0].sum())
    assert start < prefix < 6 and mixed["clean"][0, :prefix].all()
    row = [i for i in range(3) if torch.equal(buffer["x0"][i], mixed["x0"][0])]
    assert row and torch.equal(mixed["context"][0], buffer["context"][row[0]])
    # the loss sees the rollout as context and the true frames (noised) as targets
    calls = _capture_inputs(trainer)
    sigma = trainer.sigmas(mixed, _gen(9))
    sigma[:, -1] = 0.5
    loss = trainer.loss(model, mixed, _gen(10), sigma)
    noisy, _ = calls[0]
    context = ~(sigma > 0)
    assert torch.equal(noisy[0][:, context[0]], mixed["context"][0][:, context[0]])
    noise = torch.randn(mixed["x0"].shape, generator=_gen(10))
    expected_target = 0.5 * mixed["x0"][:, :, -1] + 0.5 * noise[:, :, -1]
    torch.testing.assert_close(noisy[:, :, -1], expected_target, rtol=0, atol=1e-6)
    assert torch.isfinite(loss)
    # self-context leaves the rolled clips' context alone
    both = train.Trainer(CPU, self_context=1.0, rollout_context=0.5)
    both.install(model)
    x_in = both._own_context(model, mixed, sigma > 0, _gen(11), mixed["context"])
    assert torch.equal(x_in[0], mixed["context"][0]) and not torch.equal(x_in[1], mixed["context"][1])


def test_dmd_reads_window_views_and_pushes_samples_from_fake_toward_teacher():
    """``window_clips``: a buffer clip's sinks, the rolled frames before frame j, frame j's action and
    position. ``dmd_loss``: zero with zero gradient while the fake score model equals the teacher;
    once the fake model has learnt from the samples, the gradient on each sample is
    ``(x0_fake - x0_teacher) / scale / N`` at the sampled sigma (descent moves toward the teacher)."""
    model, _, _ = _setup(clip_frames=6)
    trainer = _rollout_trainer(model, rollout_context=0.0)
    trainer.refresh_rollouts(model, _data(), 3, 6, _gen(7), rollout_frames=12, window=5)
    buffer, start = trainer.buffer, trainer.buffer["start"]
    clips = trainer.window_clips(4, 5, _gen(8))
    assert clips["past"].shape == (4, 3, 5, 64, 64) and clips["positions"].shape == (4, 6)
    for c in range(4):
        row = next(
            i for i in range(3) if torch.equal(buffer["positions"][i, :start], clips["positions"][c, :start])
        )
        j = int(clips["positions"][c, -1] - buffer["positions"][row, 0])
        index = [*range(start), *range(j - (5 - start), j)]
        assert 5 <= j < 12
        assert torch.equal(clips["past"][c], buffer["context"][row][:, index])
        assert torch.equal(clips["actions"][c], buffer["actions"][row, [*index, j]])
        assert torch.equal(clips["positions"][c], buffer["positions"][row, [*index, j]])
    teacher, fake = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model)
    for net in (teacher, fake):
        trainer.install(net)
    loss, sample = trainer.dmd_loss(model, teacher, fake, clips, _gen(9), 0.3)
    loss.backward()
    assert loss.item() == 0 and all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert sample.shape == (4, 3, 1, 64, 64) and not sample.requires_grad
    optimizer = torch.optim.SGD(fake.parameters(), lr=0.5)
    fake_loss = trainer.fake_score_loss(fake, clips, sample, _gen(10))
    fake_loss.backward()
    optimizer.step()
    assert torch.isfinite(fake_loss)
    calls = _capture_inputs(trainer)
    trainer.dmd_loss(model, teacher, fake, clips, _gen(9), 0.3)
    noisy, sigma = calls[-1]  # the fake model's call on the noised sample
    sigma = sigma[:, -1, None, None, None, None]
    x = noisy[:, :, -1:]
    with torch.no_grad():
        real = x - sigma * trainer._chunk_flow(teacher, clips, x, sigma.flatten())
        made = x - sigma * trainer._chunk_flow(fake, clips, x, sigma.flatten())
    model.zero_grad()
    loss, again = trainer.dmd_loss(model, teacher, fake, clips, _gen(9), 0.3)
    loss.backward()
    assert torch.equal(again, sample), "the same draws and weights: the same sample"
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())
    assert loss.item() > 0
    scale = (sample - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = 0.5 * (((made - real) / scale) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)


def _data():
    actions = [0, *random_actions(23, seed=4)]
    env = GameEnv(4, level=2)
    frames = np.stack([env.reset(), *env.rollout(actions[1:])])
    return train.Data(frames[None], np.array(actions)[None], np.array([2]), CPU)
