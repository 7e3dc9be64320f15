"""Renderers: avatar frames + per-frame audio features + face boxes in, frames out."""

from __future__ import annotations

from heygem_ray.config import ClassicRendererConfig, Wav2LipRendererConfig
from heygem_ray.render.base import Renderer


def build_renderer(cfg: ClassicRendererConfig | Wav2LipRendererConfig, threads: int = 0) -> Renderer:
    """The renderer `cfg` names; `threads` is what the actor may use (0 = torch's setting)."""
    if isinstance(cfg, ClassicRendererConfig):
        from heygem_ray.render.classic import ClassicRenderer

        return ClassicRenderer(cfg)
    if isinstance(cfg, Wav2LipRendererConfig):
        from heygem_ray.render.wav2lip import Wav2LipRenderer

        # compile=auto compiles where it was measured to pay: nowhere yet (Wav2LipRendererConfig)
        return Wav2LipRenderer(
            cfg.checkpoint,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            blend=cfg.blend,
            device=cfg.device,
            image_ops=cfg.image_ops,
            compile=cfg.compile == "true",
            face_cache_mb=cfg.face_cache_mb,
            threads=threads,
        )
    raise ValueError(f"unknown renderer config {type(cfg).__name__}")
