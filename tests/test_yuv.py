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


# -- face regions of I420 frames (the actor renders only these) -------------------------------
from heygem_ray.media.yuv import even_region, i420_planes, paste_bgr, region_to_bgr


def test_even_region_clips_and_widens_to_whole_chroma_samples():
    assert even_region(np.array([3, 5, 11, 20]), 64, 48) == (2, 4, 12, 20)
    assert even_region(np.array([-7, -3, 70, 50]), 64, 48) == (0, 0, 64, 48)
    assert even_region(np.array([63, 47, 90, 90]), 64, 48) == (62, 46, 64, 48)
    assert even_region(np.array([64, 10, 80, 20]), 64, 48) is None  # right of the picture
    assert even_region(np.array([10, 10, 10, 30]), 64, 48) is None  # no width


def test_region_to_bgr_is_the_crop_of_the_whole_frame_conversion():
    i420 = swscale_i420(textured(120, 160, seed=3))
    whole = cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)
    for region in [(0, 0, 160, 120), (20, 36, 84, 100), (2, 2, 4, 4)]:
        x1, y1, x2, y2 = region
        np.testing.assert_array_equal(region_to_bgr(i420, region), whole[y1:y2, x1:x2])


def test_paste_changes_the_region_only_and_an_unchanged_region_within_a_level():
    i420 = swscale_i420(textured(120, 160, seed=4))
    before = i420.copy()
    region = (20, 36, 84, 100)
    paste_bgr(i420, region, region_to_bgr(i420, region))  # the round trip a renderer that changes nothing causes
    x1, y1, x2, y2 = region
    inside = np.zeros((120, 160), bool)
    inside[y1:y2, x1:x2] = True
    masks = (inside, inside[::2, ::2], inside[::2, ::2])
    for plane, original, mask in zip(i420_planes(i420), i420_planes(before), masks):
        np.testing.assert_array_equal(plane[~mask], original[~mask])  # bit-exact outside
        assert np.abs(plane[mask].astype(int) - original[mask]).max() <= 2
        assert np.abs(plane[mask].astype(int) - original[mask]).mean() < 0.6
    grey = np.full((y2 - y1, x2 - x1, 3), 128, np.uint8)
    paste_bgr(i420, region, grey)
    y, u, _v = i420_planes(i420)
    assert np.all(y[y1:y2, x1:x2] == bgr_to_i420(grey)[0, 0])
    assert np.all(u[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2] == 128)
