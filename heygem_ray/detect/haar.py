"""OpenCV's bundled frontal-face Haar cascade: no weights to fetch, fast on CPU, good enough for
presenter footage. Runs on a grey copy downscaled to `max_side`."""

from __future__ import annotations

import os

import cv2
import numpy as np

from heygem_ray.config import DetectorConfig


class HaarDetector:
    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> HaarDetector:
        return cls(max_side=cfg.max_side, batch_size=cfg.batch_size)

    def __init__(self, max_side: int = 720, batch_size: int = 16, min_face_fraction: float = 0.08):
        # cv2.data is a plain module of the wheel that OpenCV's type stubs leave out
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")  # type: ignore[attr-defined]
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV's Haar cascade is missing ({path}); opencv-python-headless>=4.10,<5 ships it")
        self.max_side = max_side
        self.batch_size = batch_size
        self.min_face_fraction = min_face_fraction

    def detect(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        return [self._detect_one(frame) for frame in frames]

    def _detect_one(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        min_side = max(24, int(self.min_face_fraction * min(grey.shape)))
        boxes, _, weights = self._cascade.detectMultiScale3(
            grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side), outputRejectLevels=True
        )
        if len(boxes) == 0:
            return np.zeros((0, 5), np.float32)
        boxes = np.asarray(boxes, np.float32) / scale
        out = np.concatenate(
            [boxes[:, :2], boxes[:, :2] + boxes[:, 2:], np.asarray(weights, np.float32).reshape(-1, 1)], axis=1
        )
        return out.astype(np.float32)
