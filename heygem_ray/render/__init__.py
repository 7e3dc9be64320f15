"""Renderers: avatar frames + per-frame audio features + face boxes in, frames out."""

from __future__ import annotations

from heygem_ray.config import ClassicRendererConfig, Wav2LipRendererConfig
from heygem_ray.render.base import Renderer


def build_renderer(cfg: ClassicRendererConfig | Wav2LipRendererConfig) -> Renderer:
    if isinstance(cfg, ClassicRendererConfig):
        from heygem_ray.render.classic import ClassicRenderer

        return ClassicRenderer(cfg)
    if isinstance(cfg, Wav2LipRendererConfig):
        from heygem_ray.render.wav2lip import Wav2LipRenderer

        return Wav2LipRenderer(cfg.checkpoint, batch_size=cfg.batch_size, precision=cfg.precision,
                               blend=cfg.blend, device=cfg.device, image_ops=cfg.image_ops, compile=cfg.compile)
    raise ValueError(f"unknown renderer config {type(cfg).__name__}")
