"""Renderers: avatar frames + per-frame audio features + face boxes in, frames out."""

from __future__ import annotations

from typing import Any

from heygem_ray.config import RENDERERS, registered
from heygem_ray.render.base import Renderer


def build_renderer(cfg: Any, threads: int = 0) -> Renderer:
    """The renderer `cfg.name` names (`config.RENDERERS`), built from `cfg`; `threads` is what the
    actor may use (0 = torch's setting)."""
    if cfg.name not in RENDERERS:
        raise ValueError(f"unknown renderer {cfg.name!r}; choose one of {', '.join(RENDERERS)}")
    renderer: Renderer = registered(RENDERERS[cfg.name][1]).from_config(cfg, threads)
    return renderer
