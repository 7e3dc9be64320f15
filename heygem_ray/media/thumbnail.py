"""A small JPEG of one frame of a video, for the campaign report's cards."""

from __future__ import annotations

from typing import IO

import av
import cv2
import numpy as np

from heygem_ray.media.hdr import frame_bgr

#: the report's pictures of finished rows: small, as its cards show them
THUMBNAIL_WIDTH, THUMBNAIL_QUALITY = 160, 75


def thumbnail_jpeg(video_path: str | IO[bytes], width: int = 240, quality: int = 80, at: float = 0.5) -> bytes:
    """A small JPEG (`width` pixels wide, aspect kept) of a local video's (or an open file's) frame at fraction `at` of
    its duration (the middle by default; 0 takes the first frame, which decodes only that one).

    Seeks near that time and takes the first decoded frame at or after it; a video too short for
    that (or whose seek lands past the end) gives its last frame. Display rotation metadata and
    the pixel aspect ratio (an anamorphic HDV or DV video's 4:3 pixels) are applied. Raises
    ValueError when the file has no decodable video frame."""
    try:
        frame = _frame_at(video_path, at)
    except av.error.FFmpegError as exc:
        raise ValueError(f"{video_path}: not a readable video ({exc.strerror or exc})") from None
    if frame is None:
        raise ValueError(f"{video_path}: no decodable video frames")
    h, w = frame.shape[:2]
    height = max(1, int(round(h * width / w)))
    interpolation = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    small = cv2.resize(frame, (width, height), interpolation=interpolation)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    if not ok:
        raise ValueError(f"{video_path}: JPEG encoding failed")
    return buf.tobytes()


def _frame_at(path: str | IO[bytes], at: float) -> np.ndarray | None:
    with av.open(path, "r") as container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        sar = float(stream.sample_aspect_ratio or 1) or 1.0  # a picture of square pixels: what it shows
        if at <= 0:
            return next((_display_bgr(f, sar) for f in container.decode(stream)), None)
        stream.thread_type = "AUTO"
        duration = _duration_seconds(container, stream)
        middle = duration * min(at, 1.0) if duration else 0.0
        if middle > 0 and stream.time_base:
            start = stream.start_time or 0
            target = start + int(middle / stream.time_base)
            try:
                container.seek(target, stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                container.seek(0)  # unseekable: decode from the start
            frame = _first_at_or_after(container, stream, start * stream.time_base + middle)
            if frame is not None:
                return _display_bgr(frame, sar)
            container.seek(0)  # the seek overshot a very short stream: take any frame from the start
        last = None
        for last in container.decode(stream):
            pass
        return _display_bgr(last, sar) if last is not None else None


def _duration_seconds(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _first_at_or_after(container, stream, seconds: float) -> av.VideoFrame | None:
    """The first frame at or after `seconds`; the last frame decoded if the stream ends first."""
    last = None
    for frame in container.decode(stream):
        last = frame
        if frame.time is None or frame.time >= seconds - 1e-6:
            return frame
    return last


def _display_bgr(frame: av.VideoFrame, sar: float = 1.0) -> np.ndarray:
    image = frame_bgr(frame)
    if abs(sar - 1.0) > 1e-3:  # its stored width stretched to the width it is shown at, before any turn
        h, w = image.shape[:2]
        image = cv2.resize(image, (max(1, round(w * sar)), h), interpolation=cv2.INTER_LINEAR)
    clockwise = int(round(-(getattr(frame, "rotation", 0) or 0))) % 360  # FFmpeg states it counter-clockwise
    if clockwise in (90, 180, 270):
        image = np.ascontiguousarray(np.rot90(image, k=-(clockwise // 90)))
    return image
