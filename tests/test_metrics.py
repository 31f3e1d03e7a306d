"""vidaccel.metrics: exact identities, analytic cases, monotonicity, symmetry, errors, and an
independent SSIM (scikit-image) where it is installed."""

import math

import numpy as np
import pytest
import torch

from vidaccel.metrics import frame_statistics, psnr, relative_error, ssim


def _video(seed=0, shape=(3, 24, 20, 3)):
    return np.random.default_rng(seed).random(shape)


def _noisy(video, sigma, seed=1):
    return np.clip(video + sigma * np.random.default_rng(seed).standard_normal(video.shape), 0.0, 1.0)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda v: v, id="float64-video"),
        pytest.param(lambda v: v[0].astype(np.float32), id="float32-frame"),
        pytest.param(lambda v: (v * 255).astype(np.uint8), id="uint8-video"),
        pytest.param(lambda v: torch.from_numpy(v).to(torch.bfloat16), id="torch-bf16"),
    ],
)
def test_identical_inputs_give_inf_psnr_and_ssim_one(make):
    video = make(_video())
    assert psnr(video, video) == math.inf
    assert ssim(video, video) == 1.0


def test_psnr_of_constant_offset_is_analytic():
    video = 0.25 + 0.5 * _video()  # keeps video + offset inside [0, 1]
    for offset in (0.01, 0.1, 0.2):
        assert psnr(video, video + offset) == pytest.approx(20 * math.log10(1.0 / offset), rel=1e-9)


def test_psnr_uint8_defaults_to_range_255():
    video = (50 + 100 * _video()).astype(np.uint8)
    shifted = video + np.uint8(5)
    assert psnr(video, shifted) == pytest.approx(20 * math.log10(255 / 5), rel=1e-12)


def test_psnr_explicit_data_range_matches_rescaled_input():
    a, b = _video(), _noisy(_video(), 0.05)
    assert psnr(a * 7.0, b * 7.0, data_range=7.0) == pytest.approx(psnr(a, b), rel=1e-12)
    assert psnr(a, b, data_range=2.0) == pytest.approx(psnr(a, b) + 20 * math.log10(2.0), rel=1e-12)


def test_ssim_of_constant_frames_is_analytic():
    # Zero variance and covariance: SSIM reduces to the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    mu_x, mu_y = 0.3, 0.6
    a = np.full((2, 16, 16, 3), mu_x)
    b = np.full((2, 16, 16, 3), mu_y)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_and_psnr_decrease_as_noise_grows():
    video = _video(shape=(2, 32, 32, 3))
    sigmas = (0.01, 0.03, 0.1, 0.3)
    ssims = [ssim(video, _noisy(video, s)) for s in sigmas]
    psnrs = [psnr(video, _noisy(video, s)) for s in sigmas]
    assert all(x > y for x, y in zip(ssims, ssims[1:], strict=False)), ssims
    assert all(x > y for x, y in zip(psnrs, psnrs[1:], strict=False)), psnrs
    assert 0.0 < ssims[-1] < ssims[0] < 1.0


def test_metrics_are_symmetric():
    a, b = _video(), _noisy(_video(), 0.1)
    assert psnr(a, b) == psnr(b, a)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)


def test_ssim_of_video_is_mean_over_frames():
    a, b = _video(), _noisy(_video(), 0.1)
    per_frame = [ssim(a[t], b[t]) for t in range(a.shape[0])]
    assert ssim(a, b) == pytest.approx(float(np.mean(per_frame)), rel=1e-12)


def test_numpy_and_torch_inputs_agree():
    a, b = _video().astype(np.float32), _noisy(_video(), 0.1).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert ssim(ta, tb) == ssim(a, b)
    assert psnr(ta, b) == psnr(a, b)


def test_shape_and_input_errors_are_clear():
    video = _video()
    with pytest.raises(ValueError, match="same shape"):
        psnr(video, video[:, :-1])
    with pytest.raises(ValueError, match="same shape"):
        ssim(video, video[:2])
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        ssim(video[0, :, :, 0], video[0, :, :, 0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(video[:, :8, :8], video[:, :8, :8])
    with pytest.raises(ValueError, match="data_range"):
        psnr((video * 255).astype(np.uint8), video)
    with pytest.raises(ValueError, match="data_range"):
        ssim(video, video, data_range=0)
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        psnr(video.tolist(), video.tolist())
    with pytest.raises(ValueError, match="sigma"):
        ssim(video, video, sigma=-1.0)


def test_relative_error_values():
    ref = torch.randn(4, 64, 2, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref * 1.5, ref) == pytest.approx(0.5, rel=1e-12)
    assert relative_error(-ref, ref) == pytest.approx(2.0, rel=1e-12)
    assert relative_error(ref.numpy() * 0.5, ref) == pytest.approx(0.5, rel=1e-12)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.ones(3), torch.zeros(3)) == math.inf


def test_relative_error_accumulates_in_float64():
    # Squares of 1e30 overflow float32; the figure must still be exact.
    ref = torch.full((1024,), 1e30, dtype=torch.float32)
    assert relative_error(ref * 2, ref) == pytest.approx(1.0, rel=1e-12)
    # bf16 inputs with an error far below bf16's epsilon relative to the sum of squares.
    ref16 = torch.ones(4096, dtype=torch.bfloat16)
    out16 = ref16.clone()
    out16[0] = 2.0
    assert relative_error(out16, ref16) == pytest.approx(1 / 64, rel=1e-12)


def test_relative_error_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        relative_error(torch.zeros(2, 3), torch.zeros(3, 2))


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _video(shape=(3, 40, 37, 3)), _noisy(_video(shape=(3, 40, 37, 3)), 0.1)
    for x, y, data_range in ((a, b, 1.0), ((a * 255).astype(np.uint8), (b * 255).astype(np.uint8), 255)):
        expected = np.mean(
            [
                metrics.structural_similarity(
                    x[t],
                    y[t],
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                    channel_axis=-1,
                    data_range=data_range,
                )
                for t in range(x.shape[0])
            ]
        )
        assert ssim(x, y) == pytest.approx(expected, abs=1e-10)
        assert psnr(x, y) == pytest.approx(
            metrics.peak_signal_noise_ratio(x, y, data_range=data_range), rel=1e-12
        )


def test_frame_statistics_by_hand_in_numpy_and_torch():
    video = _video(shape=(2, 5, 4, 3))
    stats = frame_statistics(video)
    for t in range(2):
        frame = video[t]
        across = np.abs(frame[:, 1:] - frame[:, :-1]).mean()
        down = np.abs(frame[1:] - frame[:-1]).mean()
        np.testing.assert_allclose(stats["mean"][t], frame.mean(), rtol=1e-6)
        np.testing.assert_allclose(stats["std"][t], frame.std(), rtol=1e-5)  # population std
        np.testing.assert_allclose(stats["edge"][t], (across + down) / 2, rtol=1e-6)
    assert all(value.dtype == np.float32 and value.shape == (2,) for value in stats.values())
    # a torch batch [B, T, H, W, C] gives the same figures, and gradients (the training loss)
    tensor = torch.tensor(np.stack([video, video[::-1]]), dtype=torch.float32, requires_grad=True)
    batched = frame_statistics(tensor)
    torch.testing.assert_close(batched["edge"][0], torch.from_numpy(stats["edge"]))
    torch.testing.assert_close(batched["std"][1], torch.from_numpy(stats["std"][::-1].copy()))
    sum(value.sum() for value in batched.values()).backward()
    assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    flat = frame_statistics(np.full((1, 4, 4, 3), 0.5))
    assert flat["std"][0] == 0 and flat["edge"][0] == 0 and flat["mean"][0] == 0.5
