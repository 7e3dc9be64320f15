"""The weights-free renderer: opens and closes the mouth with the speech.

Each frame's speech-band loudness, relative to the row's speech level, sets an opening in [0, 1].
The lower face is warped down (jaw drop) and a dark, feathered mouth gap is drawn, all inside the
face box, so pixels outside it are untouched. Useful on machines without weights, as the demo's
renderer, and as a pipeline check: mouth motion must follow the audio frame for frame.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import cv2
import numpy as np

from heygem_ray.config import ClassicRendererConfig
from heygem_ray.media.audio import AudioWindow, speech_loudness
from heygem_ray.plan import frame_center_samples

#: loudness this far below the row's speech level closes the mouth
_RANGE_DB = 30.0
#: mouth line as a fraction of the (padded) face box height, from its top
_MOUTH_Y = 0.74


def openness(loudness: np.ndarray, level: float) -> np.ndarray:
    """Mouth opening in [0, 1] from loudness relative to the row's level (dB scale)."""
    ratio = np.asarray(loudness, np.float64) / max(level, 1e-6)
    db = 20.0 * np.log10(np.maximum(ratio, 1e-9))
    return np.clip((db + _RANGE_DB) / _RANGE_DB, 0.0, 1.0).astype(np.float32)


class ClassicRenderer:
    @classmethod
    def from_config(cls, cfg: ClassicRendererConfig, threads: int = 0) -> ClassicRenderer:
        return cls(cfg)

    def __init__(self, cfg: ClassicRendererConfig):
        self.cfg = cfg
        self.batch_size = cfg.batch_size

    def features(self, audio: AudioWindow, frames: np.ndarray, fps: float) -> np.ndarray:
        centers = frame_center_samples(frames, fps, audio.sample_rate) - audio.start
        return openness(speech_loudness(audio.samples, centers, audio.sample_rate), audio.level)

    def render(
        self,
        frames: list[np.ndarray],
        boxes: np.ndarray,
        features: np.ndarray,
        sources: Sequence[Hashable] | None = None,
    ) -> list[np.ndarray]:
        # `sources` is not needed: each frame costs a few array operations, nothing worth reusing
        return [self._render_one(frame, box, float(o)) for frame, box, o in zip(frames, boxes, features)]

    def _render_one(self, frame: np.ndarray, box: np.ndarray, opening: float) -> np.ndarray:
        x1, y1, x2, y2 = (int(v) for v in box)
        w, h = x2 - x1, y2 - y1
        if opening <= 0.0 or w < 8 or h < 8:
            return frame
        roi = frame[y1:y2, x1:x2].astype(np.float32)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        cx, mouth_y = w / 2.0, _MOUTH_Y * h

        # jaw drop: content below the mouth line moves down, most at the mouth, none at the box
        # bottom or sides, so the warp meets the untouched frame without a seam
        across = np.exp(-(((xs - cx) / (0.3 * w)) ** 2)) * _edge_fade(xs, w)
        below = np.clip((ys - mouth_y) / (0.05 * h), 0.0, 1.0) * np.clip((h - ys) / (h - mouth_y), 0.0, 1.0)
        drop = self.cfg.jaw_drop * h * opening * across * below
        warped = cv2.remap(roi, xs, ys - drop, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

        # mouth gap: a dark, feathered ellipse that opens downward from the mouth line
        gap = self.cfg.mouth_open * h * opening
        half_w, half_h = 0.17 * w, max(gap / 2.0, 1.0)
        inside = ((xs - cx) / half_w) ** 2 + ((ys - (mouth_y + gap / 2.0)) / half_h) ** 2
        mask = np.clip(1.5 - inside, 0.0, 1.0) * min(1.0, gap / 3.0)
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(1.0, 0.012 * w)) * _edge_fade(xs, w) * _edge_fade(ys, h)
        shade = np.array([0.28, 0.22, 0.38], np.float32)  # dark red-brown of an open mouth (BGR)
        dark = 1.0 - self.cfg.mouth_darkness * mask[..., None] * (1.0 - shade)
        frame[y1:y2, x1:x2] = np.clip(warped * dark + 0.5, 0, 255).astype(np.uint8)
        return frame


def _edge_fade(coord: np.ndarray, size: int) -> np.ndarray:
    """1 inside, falling to 0 over the outer 8% at both ends of an axis."""
    margin = max(2.0, 0.08 * size)
    return np.clip(np.minimum(coord, size - 1 - coord) / margin, 0.0, 1.0)
