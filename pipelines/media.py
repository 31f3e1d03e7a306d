"""Writing what a rollout produced: videos, line plots and labelled side-by-side frames.

PIL, NumPy and (where installed) imageio-ffmpeg or OpenCV only: no plotting dependency.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SERIES_COLORS = {"dense": (214, 39, 40), "window": (31, 119, 180), "tempcache": (44, 160, 44)}
"""Fixed colours of the methods every plot shows; other series take :data:`PALETTE` colours in order."""
PALETTE = ((255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34),
           (127, 127, 127), (0, 0, 0))  # fmt: skip
VIEW_SCALE = 4  # default upscaling (nearest) of the 64x64 panels in the side-by-side video and PNG
LABEL_HEIGHT = 16  # pixels above each side-by-side panel for its label
GAP = 4  # pixels between side-by-side panels


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int) -> str:
    """Write uint8 RGB frames ``[H, W, 3]`` (all one size; any iterable, consumed one frame at a time)
    as an mp4: imageio-ffmpeg where it is installed, else OpenCV's ``mp4v`` writer. Returns the file
    name."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio.v2 as imageio

        with imageio.get_writer(path, fps=fps, macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
    else:
        import cv2

        writer = None
        for frame in frames:
            if writer is None:
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frame.shape[1::-1])
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
        if writer is not None:
            writer.release()
    return path.name


def upscaled(frames: np.ndarray, view_size: int) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` in ``[0, 1]`` as uint8, upscaled (nearest) by the smallest integer
    factor that makes their short side at least ``view_size``."""
    scale = max(1, math.ceil(view_size / min(frames.shape[1:3])))
    frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_clips(
    out: Path, clips: dict[str, np.ndarray], *, fps: int, view_size: int, gif_fallback: bool = False
) -> dict[str, str]:
    """Write each clip ``{name: frames [F, H, W, 3] in [0, 1]}`` as ``out/<name>.mp4``, upscaled
    (:func:`upscaled`); without imageio-ffmpeg, with ``gif_fallback`` as ``out/<name>.gif`` (imageio),
    else through :func:`write_video`'s OpenCV fallback. Returns ``{name: file name}``."""
    gif = gif_fallback and importlib.util.find_spec("imageio_ffmpeg") is None
    written = {}
    for name, frames in clips.items():
        frames = upscaled(frames, view_size)
        if gif:
            import imageio.v2 as imageio

            path = out / f"{name}.gif"
            imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
            written[name] = path.name
        else:
            written[name] = write_video(out / f"{name}.mp4", frames, fps)
    return written


def plot_chunks(path: Path, runs: dict) -> str:
    """A PNG with three panels over the chunk index: latency (ms), memory (MiB: peak GPU memory on
    CUDA, else the KV caches' allocated size) and the KV caches' tokens in use (all layers), one line
    per method."""
    on_gpu = any(c["peak_gpu_bytes"] is not None for run in runs.values() for c in run["chunks"])
    memory_key, memory_name = (
        ("peak_gpu_bytes", "peak GPU memory") if on_gpu else ("kv_cache_bytes", "KV cache")
    )
    panels = [
        (
            "latency per chunk (ms)",
            {m: [c["latency_s"] * 1e3 for c in run["chunks"]] for m, run in runs.items()},
        ),
        (
            f"{memory_name} per chunk (MiB)",
            {m: [c[memory_key] / 2**20 for c in run["chunks"]] for m, run in runs.items()},
        ),
        (
            "KV cache tokens in use (all layers)",
            {m: [c["kv_cache_tokens"] for c in run["chunks"]] for m, run in runs.items()},
        ),
    ]
    return plot_lines(path, panels, x_label="chunk")


def plot_lines(
    path: Path,
    panels: Sequence[tuple[str, dict[str, Sequence[float]]]],
    *,
    x_label: str,
    from_zero: bool = True,
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> str:
    """Draw line panels side by side into a PNG with PIL (no plotting dependency); returns the file name.

    Args:
        panels: ``(title, {series name: y values at x = 0, 1, ...})`` per panel; one colour per series
            name across panels (``colors``, then :data:`SERIES_COLORS`, then :data:`PALETTE` in order),
            one legend below. Non-finite values (inf, NaN) are left out of the lines and the scale.
        x_label: the x axis' name (``"chunk"``, ``"frame"``).
        from_zero: start every y axis at 0; ``False`` spans the data's range.
    """
    names = list(dict.fromkeys(name for _, series in panels for name in series))
    palette = iter(PALETTE * (len(names) // len(PALETTE) + 1))
    known = {**SERIES_COLORS, **(colors or {})}
    color = {name: known[name] if name in known else next(palette) for name in names}
    width, height, margin = 560, 320, 56
    per_row = max(1, (width * len(panels) - margin) // 150)  # legend entries per row
    legend_rows = math.ceil(len(names) / per_row)
    image = Image.new("RGB", (width * len(panels), height + 10 + 20 * legend_rows), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, series) in enumerate(panels):
        box = (index * width + margin, (index + 1) * width - 16, 28, height - 30)
        _draw_panel(draw, box, index * width + 4, title, series, color, x_label=x_label, from_zero=from_zero)
    for slot, name in enumerate(names):
        x, y = margin + 150 * (slot % per_row), height + 16 + 20 * (slot // per_row)
        draw.line([(x, y), (x + 18, y)], fill=color[name], width=3)
        draw.text((x + 24, y - 6), name, fill=color[name])
    image.save(path)
    return path.name


def plot_points(panels: list[tuple[str, dict]], path: Path) -> None:
    """Line plots of points, one panel per ``(title, {series name: [(x, y), ...]})`` (sorted by x, y
    from 0), stacked in one PNG drawn with PIL; :func:`plot_lines` draws series at x = 0, 1, ..."""
    width, height, pad = 640, 360, 48
    image = Image.new("RGB", (width, height * max(len(panels), 1)), "white")
    draw = ImageDraw.Draw(image)
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for index, (title, series) in enumerate(panels):
        top = index * height
        xs = [x for points in series.values() for x, _ in points]
        ys = [y for points in series.values() for _, y in points]
        x0, x1, y1 = min(xs), max(max(xs), min(xs) + 1), max(ys) * 1.05 or 1.0
        box = (pad, top + pad, width - pad // 2, top + height - pad)
        draw.rectangle(box, outline="black")
        draw.text((pad, top + 12), title, fill="black")
        draw.text((4, box[1]), f"{y1:.3g}", fill="black")
        draw.text((4, box[3] - 10), "0", fill="black")
        draw.text((box[0], box[3] + 6), f"{x0}", fill="black")
        draw.text((box[2] - 24, box[3] + 6), f"{x1}", fill="black")

        def to_px(x, y, box=box, x0=x0, x1=x1, y1=y1):
            return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - y / y1 * (box[3] - box[1]))

        for s, (name, points) in enumerate(series.items()):
            color = colors[s % len(colors)]
            pixels = [to_px(x, y) for x, y in sorted(points)]
            if len(pixels) > 1:
                draw.line(pixels, fill=color, width=2)
            for px, py in pixels:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
            draw.text((box[0] + 8, box[1] + 6 + 12 * s), name, fill=color)
    image.save(path)


def _draw_panel(draw, box, tick_x, title, series, color, *, x_label: str, from_zero: bool) -> None:
    """One panel of :func:`plot_lines` inside ``box`` ``(left, right, top, bottom)``, its y ticks at
    ``tick_x``."""
    left, right, top, bottom = box
    finite = [v for values in series.values() for v in values if math.isfinite(v)]
    high = max(finite, default=1.0)
    low = 0.0 if from_zero else min(finite, default=0.0)
    pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
    low, high = (0.0 if from_zero else low - pad), high + pad
    count = max((len(values) for values in series.values()), default=1)
    draw.text((left, 8), title, fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in range(5):
        y = bottom - (bottom - top) * tick / 4
        draw.text((tick_x, y - 6), f"{low + (high - low) * tick / 4:.4g}", fill="black")
    draw.text((left, bottom + 4), "0", fill="black")
    draw.text((right - 24, bottom + 4), str(count - 1), fill="black")
    draw.text(((left + right) // 2 - 20, bottom + 6), x_label, fill="black")

    def point(i, v):
        return left + (right - left) * i / max(count - 1, 1), bottom - (bottom - top) * (v - low) / (
            high - low
        )

    for name, values in series.items():
        segment = []
        for i, v in enumerate([*values, math.nan]):  # a NaN ends every segment
            if math.isfinite(v):
                segment.append(point(i, v))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=color[name], width=2)
            if count <= 64:
                for x, y in segment:
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color[name])
            segment = []


def side_by_side_frames(truth: np.ndarray, videos: dict, scale: int) -> Iterator[np.ndarray]:
    """Yield uint8 frames: truth | each video, each panel labelled and upscaled (:func:`composite`)."""
    for index in range(len(truth)):
        yield composite(index, truth, videos, scale)


def composite(index: int, truth: np.ndarray, videos: dict, scale: int) -> np.ndarray:
    """Frame ``index`` of ``truth`` and of each video (``{name: frames [F, H, W, 3] in [0, 1]}``) side
    by side, upscaled ``scale`` times and labelled ("truth <index>", then each name): uint8 RGB."""
    panels = {f"truth {index}": truth[index], **{name: video[index] for name, video in videos.items()}}
    size = truth.shape[1] * scale
    width = len(panels) * size + (len(panels) - 1) * GAP
    canvas = Image.new("RGB", (width, size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for slot, (name, frame) in enumerate(panels.items()):
        left = slot * (size + GAP)
        pixels = (np.nan_to_num(np.clip(frame, 0.0, 1.0)) * 255).round().astype(np.uint8)
        panel = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
        canvas.paste(Image.fromarray(panel), (left, LABEL_HEIGHT))
        draw.text((left + 2, 2), name, fill="black")
    return np.asarray(canvas)


def write_frame_png(path: Path, truth: np.ndarray, videos: dict, index: int, scale: int = VIEW_SCALE) -> str:
    """Write :func:`composite` of frame ``index`` (negative: from the end) as a PNG; returns the path."""
    Image.fromarray(composite(index % len(truth), truth, videos, scale)).save(path)
    return str(path)
