"""Helpers the tests share (fixtures live in conftest.py): the S3 test secret, a free port for the
local Ray's metrics, the campaign config as the CLI composes it, and real clips: one with no face,
one of 4:3 pixels."""

from __future__ import annotations

S3_SECRET = "heygem-test-secret-4f2a9c"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: the ports Ray's components take by default (its dashboard agent's 52365, ...): a free port the
#: kernel happens to hand out as one of them makes ray.init refuse the two
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 8076, 10001, 52365, 44217, 44227})


def _metrics_port() -> int:
    while (port := _free_port()) in RAY_DEFAULT_PORTS:
        pass
    return port


#: where the local Ray's node agent exports Prometheus metrics during the tests
METRICS_PORT = _metrics_port()  # grep-able: must never show up in logs or results


def write_faceless_clip(path: str, frames: int) -> None:
    """A real H.264 clip of textured noise: decodes fine, has no face."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(60, 200, (96, 128, 3), dtype=np.uint8), format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_anamorphic_clip(path: str, frames: int) -> None:
    """A real H.264 clip of 4:3 pixels (HDV, DV): 96x72 stored, shown 128x72; frames of rising grey."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(4, 3)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((72, 96, 3), 5 * i % 256, np.uint8), format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def compose_config(*overrides: str):
    """The campaign config as `heygem-ray render` would compose it, resolved to plain dataclasses."""
    from heygem_ray.cli import compose
    from heygem_ray.config import to_plain

    return to_plain(compose(list(overrides)))


def write_mixed_manifest(folder, media_dir, rows: int) -> str:
    """A manifest of `rows` rows, `row0`...: two narrations and two avatars (a still, a clip) in
    turn; its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = [str(media_dir / ("speech4.wav" if i % 2 else "speech3.wav")) for i in range(rows)]
    avatar = [str(media_dir / ("clip2.mp4" if i % 2 else "still.png")) for i in range(rows)]
    manifest = str(folder / "m.parquet")
    pq.write_table(pa.table({"id": [f"row{i}" for i in range(rows)], "audio": audio, "avatar": avatar}), manifest)
    return manifest


def write_one_row_manifest(folder, audio, avatar, row_id: str = "a") -> str:
    """A manifest of one row in `folder` (m.parquet); its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = str(folder / "m.parquet")
    pq.write_table(pa.table({"id": [row_id], "audio": [str(audio)], "avatar": [str(avatar)]}), manifest)
    return manifest


def render_cli(*args: str, timeout: float = 300, cwd: str | None = None, **env: str):
    """`heygem-ray render ARGS` in a process of its own, as a user runs it (output captured; its
    local Ray, if it starts one, too), in folder `cwd` (None: this one); `env`: variables to set."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "heygem_ray.cli", "render", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **env},
        timeout=timeout,
        cwd=cwd,
    )


class HandClock:
    """A module's `time` whose monotonic clock is moved by hand (`now`), so a test of "not again
    within N seconds" holds on a loaded machine, whose stalls pass for no time; the rest is `time`'s."""

    def __init__(self) -> None:
        import time

        self._time = time
        self.now = time.monotonic()

    def __getattr__(self, name: str) -> object:
        return getattr(self._time, name)

    def monotonic(self) -> float:
        return self.now


def run_within(campaign, seconds: float):
    """`campaign.run()` on a thread of its own, waited for up to `seconds`: its summary, or None
    while it still runs (a campaign that waits for ever must fail its test, not hang the suite)."""
    import threading

    done: list = []
    runner = threading.Thread(target=lambda: done.append(campaign.run()), daemon=True)
    runner.start()
    runner.join(timeout=seconds)
    return done[0] if done else None
