"""Face detectors (candidates per frame) and the tracker that turns them into one box per frame."""

from __future__ import annotations

from heygem_ray.config import DETECTORS, DetectorConfig
from heygem_ray.detect.base import FaceDetector


def build_detector(cfg: DetectorConfig) -> FaceDetector:
    if cfg.name == "haar":
        from heygem_ray.detect.haar import HaarDetector

        return HaarDetector(max_side=cfg.max_side, batch_size=cfg.batch_size)
    if cfg.name == "s3fd":
        from heygem_ray.detect.s3fd import load_s3fd_detector

        if not cfg.checkpoint:
            raise ValueError("detector=s3fd needs detector.checkpoint=<URI of s3fd-619a316812.pth>")
        return load_s3fd_detector(cfg.checkpoint, device=cfg.device, max_side=cfg.max_side, batch_size=cfg.batch_size)
    raise ValueError(f"unknown detector {cfg.name!r}; choose one of {', '.join(DETECTORS)}")
