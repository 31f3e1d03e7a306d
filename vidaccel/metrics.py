"""Fidelity metrics: PSNR and SSIM of decoded video, relative error of attention outputs, and the
per-frame statistics of the world model's stays-alive check (``frame_statistics``).

Conventions (``psnr`` and ``ssim``):

- A video is ``[T, H, W, C]`` and a frame ``[H, W, C]``, channels last, as diffusers returns with
  ``output_type="np"``. Inputs are numpy arrays or torch tensors (any device, any float dtype);
  the math runs on the CPU in float64.
- Value range: float inputs are taken to span ``[0, 1]`` (``data_range=1``), uint8 inputs
  ``[0, 255]`` (``data_range=255``). For anything else (or a uint8 input against a float one) pass
  ``data_range`` yourself. Values are never clipped.
- PSNR pools the squared error over the whole clip: ``10·log10(L² / MSE)`` with the MSE over all
  frames, pixels and channels. Identical inputs give ``inf``.
- SSIM follows Wang et al. (2004): an 11×11 Gaussian window (σ = 1.5, truncated at 3.5 σ), K1 = 0.01,
  K2 = 0.03, population (not sample) covariances. The SSIM map is evaluated wherever the window fits
  inside the frame (no padding), per channel, and averaged over positions, channels and frames.
  This equals scikit-image's ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1, data_range=L)`` per frame, averaged over frames.
  Identical inputs give exactly 1.

Example::

    from vidaccel.metrics import psnr, ssim, relative_error
    frames_ref = pipe(...).frames[0]            # [T, H, W, C] float in [0, 1]
    print(psnr(frames, frames_ref), ssim(frames, frames_ref))
    print(relative_error(out, out_dense))       # ||out - ref|| / ||ref||, fp64
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["frame_statistics", "psnr", "ssim", "relative_error"]

_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_TRUNCATE = 3.5
# Upper bound on the elements of one chunk of frames filtered at once (float64), to bound memory.
_SSIM_CHUNK_ELEMENTS = 1 << 22


def psnr(a, b, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two videos or frames of one shape.

    Args:
        a, b: ``[T, H, W, C]`` or ``[H, W, C]`` (any shape works; the error is pooled over all of it),
            numpy or torch, float in ``[0, 1]`` or uint8.
        data_range: the peak value ``L``; default 1 for float inputs, 255 for uint8.

    Returns ``10·log10(L² / MSE)`` as a float; ``inf`` when the inputs are identical.
    """
    x, y, peak = _prepare_pair(a, b, data_range, "psnr")
    mse = float(torch.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def ssim(a, b, data_range: float | None = None, *, sigma: float = 1.5) -> float:
    """Mean structural similarity between two videos ``[T, H, W, C]`` or frames ``[H, W, C]``.

    Gaussian-window SSIM per frame and channel, averaged (see the module docstring for the exact
    convention). ``H`` and ``W`` must be at least the window size, ``2·int(3.5·sigma + 0.5) + 1``
    (11 for the default ``sigma=1.5``).

    Returns a float in ``[-1, 1]``; exactly 1 for identical inputs.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    x, y, peak = _prepare_pair(a, b, data_range, "ssim")
    if x.dim() not in (3, 4):
        raise ValueError(f"ssim takes a video [T, H, W, C] or a frame [H, W, C], got shape {tuple(x.shape)}")
    if x.dim() == 3:
        x, y = x[None], y[None]
    frames, height, width, channels = x.shape
    radius = int(_SSIM_TRUNCATE * sigma + 0.5)
    window = 2 * radius + 1
    if height < window or width < window:
        raise ValueError(
            f"ssim needs frames of at least {window}x{window} pixels for sigma={sigma}, got {height}x{width} "
            "(is the input channels-last [T, H, W, C]?)"
        )

    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    c1 = (_SSIM_K1 * peak) ** 2
    c2 = (_SSIM_K2 * peak) ** 2

    chunk = max(1, _SSIM_CHUNK_ELEMENTS // (height * width * channels))
    total = 0.0
    for start in range(0, frames, chunk):
        # Frames and channels become independent planes: [N, C, H, W].
        xs = x[start : start + chunk].permute(0, 3, 1, 2)
        ys = y[start : start + chunk].permute(0, 3, 1, 2)
        mu_x, mu_y = _gaussian_valid(xs, kernel), _gaussian_valid(ys, kernel)
        var_x = _gaussian_valid(xs * xs, kernel) - mu_x * mu_x
        var_y = _gaussian_valid(ys * ys, kernel) - mu_y * mu_y
        cov_xy = _gaussian_valid(xs * ys, kernel) - mu_x * mu_y
        numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
        denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        total += float((numerator / denominator).sum())
    positions = frames * channels * (height - window + 1) * (width - window + 1)
    return total / positions


def frame_statistics(frames):
    """Per-frame statistics of a video ``[..., H, W, C]`` (pixels in ``[0, 1]``, channels last):
    ``{"mean", "std", "edge"}``, each of shape ``[...]``. ``mean`` and ``std`` (population) are over
    a frame's pixels and channels (a fade, a colour drift, a loss of contrast); ``edge`` is the mean
    absolute difference of horizontally and vertically adjacent pixels, averaged over the two (the
    fine structure: a collapse to texture raises it with mean and std unchanged, a collapse to blur
    lowers it). A numpy input (any dtype) gives float32 numpy arrays; a torch tensor gives tensors in
    its dtype, differentiable (the world model's training loss uses them)."""
    as_numpy = isinstance(frames, np.ndarray)
    video = torch.from_numpy(np.asarray(frames, dtype=np.float32)) if as_numpy else frames
    dims = (-3, -2, -1)
    across = (video[..., :, 1:, :] - video[..., :, :-1, :]).abs().mean(dim=dims)
    down = (video[..., 1:, :, :] - video[..., :-1, :, :]).abs().mean(dim=dims)
    stats = {
        "mean": video.mean(dim=dims),
        "std": video.std(dim=dims, correction=0),
        "edge": (across + down) / 2,
    }
    return {key: value.numpy() for key, value in stats.items()} if as_numpy else stats


def relative_error(out, ref) -> float:
    """Relative error ``‖out − ref‖ / ‖ref‖`` (Frobenius norms over all elements) in float64.

    ``out`` and ``ref`` are numpy arrays or torch tensors of one shape; torch tensors are compared on
    their own device. When ``ref`` is all zeros the result is 0 if ``out`` is too, else ``inf``.
    """
    x, y = _as_tensor(out, "out"), _as_tensor(ref, "ref")
    if x.shape != y.shape:
        raise ValueError(f"out and ref must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        y = y.to(x.device)
    x, y = x.to(torch.float64), y.to(torch.float64)
    diff = float(torch.linalg.vector_norm(x - y))
    norm = float(torch.linalg.vector_norm(y))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _prepare_pair(a, b, data_range, op):
    x, y = _as_tensor(a, "a"), _as_tensor(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"{op}: a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: inputs are empty (shape {tuple(x.shape)})")
    if data_range is None:
        peak = _default_range(x, y, op)
    elif (
        isinstance(data_range, (int, float))
        and not isinstance(data_range, bool)
        and math.isfinite(data_range)
        and data_range > 0
    ):
        peak = float(data_range)
    else:
        raise ValueError(f"{op}: data_range must be a finite number > 0, got {data_range!r}")
    return x.detach().cpu().to(torch.float64), y.detach().cpu().to(torch.float64), peak


def _default_range(x, y, op) -> float:
    kinds = {
        "uint8" if t.dtype == torch.uint8 else "float" if t.is_floating_point() else str(t.dtype)
        for t in (x, y)
    }
    if kinds == {"uint8"}:
        return 255.0
    if kinds == {"float"}:
        return 1.0
    raise ValueError(
        f"{op}: cannot infer data_range from dtypes {x.dtype} and {y.dtype} (defaults: 1 for two float inputs "
        "in [0, 1], 255 for two uint8 inputs); convert the inputs or pass data_range"
    )


def _as_tensor(value, name) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers, got numpy dtype {value.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got {tensor.dtype}")
    return tensor


def _gaussian_valid(planes: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``[..., H, W]`` planes, keeping only positions where it fits.

    A weighted sum of shifted views per axis: several times faster than ``conv2d`` in float64 on CPU.
    """
    size = kernel.numel()
    weights = kernel.tolist()
    height, width = planes.shape[-2] - size + 1, planes.shape[-1] - size + 1
    rows = planes[..., 0:height, :] * weights[0]
    for shift in range(1, size):
        rows.add_(planes[..., shift : shift + height, :], alpha=weights[shift])
    out = rows[..., 0:width] * weights[0]
    for shift in range(1, size):
        out.add_(rows[..., shift : shift + width], alpha=weights[shift])
    return out
