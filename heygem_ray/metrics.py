"""Campaign metrics through `ray.util.metrics`, exported by every node's Ray agent in Prometheus
format (names get Ray's `ray_` prefix; counters a `_total` suffix) and shown in the dashboard's
metrics view when Prometheus/Grafana are attached.

    heygem_frames_rendered      counter    frames rendered by actors
    heygem_segments_in_flight   gauge      segments queued at or running on actors (driver)
    heygem_rows                 counter    finished rows, tag status=ok|failed|skipped (driver)
    heygem_stage_seconds        histogram  seconds per stage, tag stage=decode|detect|render|encode|audio|qa|stitch|upload
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

STAGE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]


@cache
def _metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "frames": Counter("heygem_frames_rendered", description="Frames rendered by renderer actors."),
        "inflight": Gauge("heygem_segments_in_flight", description="Segments queued at or running on actors."),
        "rows": Counter("heygem_rows", description="Finished campaign rows by status.", tag_keys=("status",)),
        "stage": Histogram(
            "heygem_stage_seconds",
            description="Seconds spent per pipeline stage.",
            boundaries=STAGE_BUCKETS,
            tag_keys=("stage",),
        ),
    }


def _enabled() -> bool:
    # only where Ray runs: the stages also run without it (the GPU check kit), where it may be absent
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def frames_rendered(count: int) -> None:
    if count and _enabled():
        _metrics()["frames"].inc(count)


def segments_in_flight(count: int) -> None:
    if _enabled():
        _metrics()["inflight"].set(count)


def row_finished(status: str) -> None:
    if _enabled():
        _metrics()["rows"].inc(1, tags={"status": status})


def stage_seconds(seconds: dict[str, float]) -> None:
    if _enabled():
        for stage, value in seconds.items():
            _metrics()["stage"].observe(value, tags={"stage": stage})


class StageClock:
    """Adds up wall seconds per stage name: `with clock("render"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def process_started() -> float:
    """time.time() when this process started (from /proc on Linux; now, elsewhere)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in clock ticks after boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
