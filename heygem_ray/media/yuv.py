"""YUV 4:2:0 (I420) frames for the encoder: BGR -> I420 without FFmpeg's scaler, and the face
regions of I420 frames to BGR and back, so the actor converts only what the renderer draws on.

A BGR frame must go to yuv420p before x264. Handing PyAV a bgr24 frame makes swscale do
that conversion on its generic C path: ~7 ms per 1080p frame, a quarter of a segment's per-frame
CPU cost. OpenCV's SIMD conversion takes ~0.8 ms but point-samples chroma (each 2x2 block takes
its top-left pixel's colour), which aliases at colour edges. `bgr_to_i420` keeps OpenCV's luma and
computes chroma from the mean of each 2x2 block, as swscale does: ~2.5 ms on one core, and within a level of
swscale's output. Both use the same matrix as swscale's default (BT.601, video range), which is
what the decoder assumes when it turns an untagged source into BGR, so a frame that passes through
unchanged keeps its colours.
"""

from __future__ import annotations

import cv2
import numpy as np

# OpenCV's YCrCb is full-range chroma (128 +- 127.5); video range spans 128 +- 112.
_VIDEO_RANGE_CHROMA = np.clip(np.rint(128.0 + (np.arange(256) - 128.0) * 224.0 / 255.0), 0, 255).astype(np.uint8)


def bgr_to_i420(frame: np.ndarray) -> np.ndarray:
    """(h, w, 3) BGR uint8 with even h and w -> (h * 3 // 2, w) planar I420 (Y, then U, then V),
    the layout `av.VideoFrame.from_ndarray(..., format="yuv420p")` takes."""
    height, width = frame.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
    out = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)  # BT.601 video-range luma; chroma replaced below
    block_means = cv2.resize(frame, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    ycrcb = cv2.LUT(cv2.cvtColor(block_means, cv2.COLOR_BGR2YCrCb), _VIDEO_RANGE_CHROMA)
    luma = height * width
    flat = out.reshape(-1)
    u = flat[luma : luma + luma // 4].reshape(height // 2, width // 2)
    v = flat[luma + luma // 4 :].reshape(height // 2, width // 2)
    cv2.mixChannels([ycrcb], [u, v], [2, 0, 1, 1])  # U = Cb, V = Cr
    return out


# -- rendering on I420 frames ------------------------------------------------------------------
# Renderers change pixels inside the face box only. So the segment path keeps decoded frames in
# the decoder's own yuv420p, converts just the face region to BGR for the renderer and back, and
# hands the planes to the encoder: no whole-frame colour conversion either way (~5 ms per 1080p
# frame on one core), and every pixel away from the face reaches the encoder exactly as decoded.


def i420_size(i420: np.ndarray) -> tuple[int, int]:
    """(width, height) of a (h * 3 // 2, w) I420 array."""
    return i420.shape[1], i420.shape[0] * 2 // 3


def i420_planes(i420: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y (h, w), U and V (h/2, w/2) planes of an I420 array."""
    width, height = i420_size(i420)
    luma = width * height
    flat = i420.reshape(-1)
    chroma = (height // 2, width // 2)
    return (
        flat[:luma].reshape(height, width),
        flat[luma : luma + luma // 4].reshape(chroma),
        flat[luma + luma // 4 :].reshape(chroma),
    )


def assemble_i420(y: np.ndarray, u: np.ndarray, v: np.ndarray, width: int, height: int) -> np.ndarray:
    """One I420 array of `width` x `height` (both even) from planes at least that large (the
    top-left part of each is taken: a decoder's planes, or a region's)."""
    out = np.empty((height * 3 // 2, width), np.uint8)
    oy, ou, ov = i420_planes(out)
    oy[...] = y[:height, :width]
    ou[...] = u[: height // 2, : width // 2]
    ov[...] = v[: height // 2, : width // 2]
    return out


def even_region(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box clipped to the frame and widened to even edges (a whole number of chroma samples),
    or None when nothing of it is inside the frame."""
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(width, int(box[2])), min(height, int(box[3]))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1 & ~1, y1 & ~1, min(width, x2 + (x2 & 1)), min(height, y2 + (y2 & 1))


def region_to_bgr(i420: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """The BGR pixels of an even region of an I420 frame (BT.601 video range, as the decoder's)."""
    x1, y1, x2, y2 = region
    y, u, v = i420_planes(i420)
    part = assemble_i420(y[y1:y2, x1:x2], u[y1 // 2 :, x1 // 2 :], v[y1 // 2 :, x1 // 2 :], x2 - x1, y2 - y1)
    return cv2.cvtColor(part, cv2.COLOR_YUV2BGR_I420)


def paste_bgr(i420: np.ndarray, region: tuple[int, int, int, int], bgr: np.ndarray) -> None:
    """Write BGR pixels back into an even region of an I420 frame, in place."""
    x1, y1, x2, y2 = region
    py, pu, pv = i420_planes(bgr_to_i420(bgr))
    y, u, v = i420_planes(i420)
    y[y1:y2, x1:x2] = py
    u[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2] = pu
    v[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2] = pv
