"""The encoder's BGR -> I420 conversion against FFmpeg's own scaler, which it replaces for speed."""

import av
import cv2
import numpy as np
import pytest

from heygem_ray.media.yuv import bgr_to_i420


def swscale_i420(frame: np.ndarray) -> np.ndarray:
    return av.VideoFrame.from_ndarray(frame, format="bgr24").reformat(format="yuv420p").to_ndarray()


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX)


def point_sampled_i420(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)


def roundtrip_psnr(i420: np.ndarray, original: np.ndarray) -> float:
    back = av.VideoFrame.from_ndarray(i420, format="yuv420p").to_ndarray(format="bgr24").astype(np.float64)
    return 10 * np.log10(255.0**2 / np.mean((back - original) ** 2))


@pytest.mark.parametrize("height, width", [(360, 640), (2, 2), (1080, 1920), (6, 10)])
def test_matches_ffmpeg_within_rounding(height, width):
    frame = textured(height, width)
    ours, ffmpeg = bgr_to_i420(frame).astype(int), swscale_i420(frame).astype(int)
    assert ours.shape == ffmpeg.shape == (height * 3 // 2, width)
    assert np.abs(ours[:height] - ffmpeg[:height]).max() <= 1  # luma: same BT.601 video-range matrix
    assert np.abs(ours[height:] - ffmpeg[height:]).max() <= 2  # chroma: 2x2 means, rounded differently


def test_saturated_colours_and_extremes():
    frame = np.zeros((4, 8, 3), np.uint8)
    frame[:2, :2], frame[2:, :2], frame[:2, 2:4], frame[2:, 2:4] = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255,) * 3
    frame[:, 6:] = (0, 255, 255)
    assert np.abs(bgr_to_i420(frame).astype(int) - swscale_i420(frame)).max() <= 1


def test_chroma_is_averaged_not_point_sampled():
    # a one-pixel colour stripe pattern: point sampling would see only the even columns' colour
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:, 0::2] = (0, 0, 255)  # red
    frame[:, 1::2] = (255, 0, 0)  # blue
    chroma = slice(64, None)
    ffmpeg = swscale_i420(frame)[chroma].astype(int)  # purple: the mean of red and blue
    point_sampled = point_sampled_i420(frame)[chroma].astype(int)  # red
    assert np.abs(point_sampled - ffmpeg).max() > 50
    assert np.abs(bgr_to_i420(frame)[chroma].astype(int) - ffmpeg).max() <= 1
    assert roundtrip_psnr(bgr_to_i420(frame), frame) > roundtrip_psnr(point_sampled_i420(frame), frame) + 1.5
    image = textured(360, 640)
    assert roundtrip_psnr(bgr_to_i420(image), image) >= roundtrip_psnr(swscale_i420(image), image) - 0.1


def test_odd_sizes_are_refused():
    with pytest.raises(ValueError, match="even"):
        bgr_to_i420(np.zeros((5, 4, 3), np.uint8))
