"""Pure planning: how many frames a row gets, which avatar frame each output frame shows, and how
the frames split into segments. No I/O here, so all of it is unit- and property-tested."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, is_dataclass
from fractions import Fraction
from typing import Any

import numpy as np


def output_frame_count(audio_seconds: float, fps: float) -> int:
    """Frames needed so the video covers the whole audio (never shorter, at most one frame longer)."""
    if audio_seconds <= 0 or fps <= 0:
        raise ValueError(f"need positive audio length and fps, got {audio_seconds} s at {fps} fps")
    # the epsilon keeps 10.0 s at 25 fps at 250 frames despite float error
    return max(1, math.ceil(audio_seconds * fps - 1e-6))


#: how far over `render.max_fps` a clip's average rate may be and still count as at it: a phone's
#: variable-rate 60 fps clip averages 59.9 or 60.1, and must not drop to 30
FPS_CAP_SLACK = 1.02


def frame_step(fps: float, max_fps: float) -> int:
    """Every how many of a clip's frames the output shows one: the fewest that keep its rate at or
    under `max_fps` (0: no cap; FPS_CAP_SLACK over it counts as at it). Whole steps keep motion
    even: a 240 fps slow-motion clip shows every fourth frame at 60 fps, a 59.94 fps one every frame."""
    if max_fps <= 0:
        return 1
    return max(1, math.ceil(fps / (max_fps * FPS_CAP_SLACK)))


#: frame rates players, editors and platforms take as they are (NTSC's 1000/1001 ones too)
STANDARD_RATES = tuple(Fraction(r) for r in (10, 12, 15, 20, 24, 25, 30, 48, 50, 60, 90, 100, 120, 240)) + tuple(
    Fraction(r * 1000, 1001) for r in (24, 30, 60, 120)
)
#: how far a clip's average rate may be from a standard one and be written at it
STANDARD_RATE_SLACK = 0.02


def standard_rate(rate: Fraction) -> Fraction:
    """The rate a clip averaging `rate` frames a second is written at: the nearest standard rate
    within STANDARD_RATE_SLACK of it, else its own. A phone records at a variable rate: its 30 fps
    clip averages 29.87 (stored as 1800000/60261), which an editor or a platform shows as an odd
    rate; showing each frame 0.3 % shorter (at 30000/1001) is nothing a viewer sees (the narration sets
    the video's length, not the avatar)."""
    nearest = min(STANDARD_RATES, key=lambda r: abs(rate / r - 1))
    return nearest if abs(rate / nearest - 1) <= STANDARD_RATE_SLACK else rate


def avatar_frame_indices(output_frames: np.ndarray, avatar_frames: int, still: bool) -> np.ndarray:
    """The avatar frame shown at each output frame number.

    Shorter audio truncates the avatar; longer audio plays it forward, then backward, then forward
    again (ping-pong), so there is never a jump cut; a still image repeats its only frame.
    """
    out = np.asarray(output_frames, dtype=np.int64)
    if still or avatar_frames <= 1:
        return np.zeros_like(out)
    period = 2 * (avatar_frames - 1)
    phase = out % period
    return np.where(phase < avatar_frames, phase, period - phase)


@dataclass(frozen=True)
class SegmentSpan:
    index: int
    start: int  # first output frame
    stop: int  # one past the last output frame

    @property
    def frames(self) -> int:
        return self.stop - self.start


#: the shortest segment a row is cut into (a row shorter than that is one segment). x264 delays
#: its timestamps by its B-frame depth only from the third frame on: segments of 1-2 frames and
#: longer ones cannot be joined without re-encoding
MIN_SEGMENT_FRAMES = 8


def plan_segments(total_frames: int, fps: float, segment_seconds: float, min_segments: int = 1) -> list[SegmentSpan]:
    """Consecutive spans covering every frame once: as few as keep each at most `segment_seconds`
    (but at least MIN_SEGMENT_FRAMES), and at least `min_segments` (while frames last), of
    near-equal length (differing by one frame at most). Equal spans finish together on parallel
    actors: a 12 s row in 10 s segments is 6 s + 6 s, not 10 s + 2 s that leaves one actor
    waiting on the other."""
    if total_frames <= 0:
        raise ValueError("a row needs at least one frame")
    length = max(MIN_SEGMENT_FRAMES, round(segment_seconds * fps))
    most = max(1, total_frames // MIN_SEGMENT_FRAMES)
    count = min(most, max(min_segments, math.ceil(total_frames / length)))
    bounds = [i * total_frames // count for i in range(count + 1)]
    return [SegmentSpan(i, start, stop) for i, (start, stop) in enumerate(itertools.pairwise(bounds))]


def frame_center_samples(frames: np.ndarray, fps: float, sample_rate: int) -> np.ndarray:
    """The audio sample at the middle of each output frame's display interval [i/fps, (i+1)/fps)."""
    return np.round((np.asarray(frames, dtype=np.float64) + 0.5) * sample_rate / fps).astype(np.int64)


def audio_span(first: int, last: int, fps: float, sample_rate: int, context: int, total: int) -> tuple[int, int]:
    """Samples [lo, hi) of a row's audio (`total` samples) that frames first..last need: from the
    first frame's start to the last frame's end, with `context` samples more on each side. From
    the frames' centres instead, a frame a second or longer (a slideshow, `render.still_fps=1`)
    would start more than the context after its own start."""
    lo = max(0, math.floor(first * sample_rate / fps) - context)
    hi = min(total, math.ceil((last + 1) * sample_rate / fps) + context)
    return lo, max(lo, hi)


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short hex digest of JSON-able parts (dataclasses allowed), stable across processes and runs."""

    def plain(value: Any) -> Any:
        return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
