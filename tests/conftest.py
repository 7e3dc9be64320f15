"""Shared fixtures. Ray 2.60 turns token auth on by default and caches the mode at import, so the
mode is set here, before anything imports ray."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (a cold start costs seconds on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """Small real media made once per session: clips, a still, speech-like audio in several formats."""
    from heygem_ray import demo

    root = tmp_path_factory.mktemp("media")
    speech = demo.speech_like(4.0, seed=7)
    demo.write_wav(str(root / "speech4.wav"), speech)
    demo.write_wav(str(root / "speech3.wav"), demo.speech_like(3.0, seed=8))
    demo.write_avatar_clip(str(root / "clip2.mp4"), 2.0, seed=1)
    demo.write_avatar_clip(str(root / "clip6.mp4"), 6.0, seed=2)
    demo.write_avatar_image(str(root / "still.png"))
    return root


def compose_config(*overrides: str):
    """The campaign config as `heygem-ray render` would compose it, resolved to plain dataclasses."""
    from heygem_ray.cli import compose
    from heygem_ray.config import to_plain

    return to_plain(compose(list(overrides)))
