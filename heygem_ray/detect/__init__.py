"""Face detectors (candidates per frame) and the tracker that turns them into one box per frame."""

from __future__ import annotations

from heygem_ray.config import DETECTORS, DetectorConfig, registered
from heygem_ray.detect.base import FaceDetector


def build_detector(cfg: DetectorConfig) -> FaceDetector:
    """The detector `cfg.name` names (`config.DETECTORS`), built from `cfg`."""
    path = DETECTORS.get(cfg.name)
    if path is None:
        with_model = ", ".join(name for name, entry in DETECTORS.items() if entry)
        raise ValueError(f"detector {cfg.name!r} has no model to build; detectors with one: {with_model}")
    detector: FaceDetector = registered(path).from_config(cfg)
    return detector
