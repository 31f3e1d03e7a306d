"""What the scripts write (``vidaccel.pipelines.media``): videos (imageio-ffmpeg or OpenCV, or GIFs),
labelled side-by-side frames, and line plots drawn with PIL."""

import importlib.util
import math

import cv2
import imageio.v2 as imageio
import numpy as np
from PIL import Image

from vidaccel.pipelines import media


def _frames(count=3, size=(8, 12)):
    return np.random.default_rng(0).random((count, *size, 3), dtype=np.float32)


def test_write_video_and_clips(tmp_path):
    """``write_video`` takes any iterable of uint8 frames; ``write_clips`` upscales each clip by one
    integer factor to the view size and writes ``<name>.mp4`` (a GIF where asked and without ffmpeg)."""
    frames = (media.upscaled(_frames(), 8)[i] for i in range(3))  # a generator, one frame at a time
    assert media.write_video(tmp_path / "v.mp4", frames, 8) == "v.mp4"
    capture = cv2.VideoCapture(str(tmp_path / "v.mp4"))
    assert capture.read()[1].shape == (8, 12, 3)
    capture.release()
    up = media.upscaled(_frames(size=(8, 12)), 20)
    assert up.dtype == np.uint8 and up.shape == (3, 24, 36, 3)  # factor 3: the short side reaches 20
    for gif in (False, True):
        written = media.write_clips(tmp_path, {"a": _frames()}, fps=8, view_size=16, gif_fallback=gif)
        suffix = ".gif" if gif and importlib.util.find_spec("imageio_ffmpeg") is None else ".mp4"
        assert written == {"a": "a" + suffix}
        first = imageio.mimread(tmp_path / written["a"])[0]
        assert first.shape[:2] == (16, 24)


def test_side_by_side_frames_are_labelled_panels(tmp_path):
    truth = _frames(2, (64, 64))
    videos = {"dense": truth * 0.5, "nan": np.full_like(truth, np.nan)}
    frames = list(media.side_by_side_frames(truth, videos, 2))
    width = 3 * 64 * 2 + 2 * media.GAP
    assert len(frames) == 2 and frames[0].shape == (64 * 2 + media.LABEL_HEIGHT, width, 3)
    panel = frames[1][media.LABEL_HEIGHT :, :128]
    np.testing.assert_array_equal(panel[::2, ::2], (truth[1] * 255).round().astype(np.uint8))
    assert (frames[0][media.LABEL_HEIGHT :, -128:] == 0).all(), "NaN pixels are drawn black"
    path = media.write_frame_png(tmp_path / "f.png", truth, videos, -1)
    with Image.open(path) as png:
        assert png.size == (
            3 * 64 * media.VIEW_SCALE + 2 * media.GAP,
            64 * media.VIEW_SCALE + media.LABEL_HEIGHT,
        )
        assert np.array_equal(np.asarray(png), media.composite(1, truth, videos, media.VIEW_SCALE))


def test_plots_are_pngs(tmp_path):
    """Panels side by side (``plot_lines``; NaN and inf leave gaps) and stacked (``plot_points``)."""
    runs = {
        m: {"chunks": [{"latency_s": 0.1 * i, "peak_gpu_bytes": None, "kv_cache_bytes": 2**20 * i,
                        "kv_cache_tokens": 10 * i} for i in range(4)]}
        for m in ("dense", "tempcache")
    }  # fmt: skip
    assert media.plot_chunks(tmp_path / "chunks.png", runs) == "chunks.png"
    lines = [("a", {"dense": [1.0, math.nan, 3.0], "other": [math.inf, 2.0, 1.0]}), ("b", {"x": []})]
    assert media.plot_lines(tmp_path / "lines.png", lines, x_label="frame", from_zero=False) == "lines.png"
    media.plot_points(
        [("p", {"s": [(21, 1.0), (60, 2.5)]}), ("q", {"t": [(0, 0.0)]})], tmp_path / "points.png"
    )
    for name, panels in (("chunks.png", 3), ("lines.png", 2)):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and png.size[0] == 560 * panels and png.size[0] > png.size[1]
    with Image.open(tmp_path / "points.png") as png:
        assert png.size == (640, 2 * 360)
