"""The driver alone at campaign scale: `heygem_ray.campaign.Campaign` over N synthetic rows with a
simulated executor that answers every stage at once (no rendering, no Ray), so what is timed is the
driver's own bookkeeping: admission, the avatar join, segment planning and dispatch, results, the
report, the progress feed. Each size runs in a fresh process, so its peak RSS is its own.

    python -m benchmarks.driver [--rows 1000 10000 100000]

Prints, per size, the driver's seconds and peak RSS, and both per row: flat per row means the
driver's work per event is constant and its memory does not grow with the campaign.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from heygem_ray.executors import Expired, StageStopped

#: distinct avatars and narrations among the rows (a campaign reuses both)
AVATARS = 100
NARRATIONS = 1000
#: a JPEG-sized thumbnail per row, as the stitch returns
THUMBNAIL = b"\xff\xd8\xff" + bytes(3000)


class Done:
    """A simulated stage's handle: already finished, holding its result or the exception it raised."""

    __slots__ = ("error", "result")

    def __init__(self, result: Any = None, error: BaseException | None = None):
        self.result, self.error = result, error


class SimulatedExecutor:
    """Every stage answers at once with a made-up result of the right type (`stages`: stage name ->
    function, `STAGES` by default); `wait` gives one handle at a time (Ray's hands back every call
    that has ended: one at a time is the driver's slowest case, each event a turn of its loop). A
    handle given as an argument passes on its result, or its error. With `start_error`, every
    renderer answers `ready` with that RendererStartError."""

    def __init__(
        self, actors: int = 8, stages: dict[str, Callable[..., Any]] | None = None, start_error: str | None = None
    ):
        self.actors = actors
        self.stages = stages or STAGES
        self.start_error = start_error

    def submit(self, fn: Callable[..., Any], *args: Any, num_gpus: float = 0.0) -> Done:
        failed = next((a.error for a in args if isinstance(a, Done) and a.error is not None), None)
        if failed is not None:
            return Done(error=failed)
        try:
            return Done(self.stages[fn.__name__](*(a.result if isinstance(a, Done) else a for a in args)))
        except Exception as exc:  # noqa: BLE001 - the stage's error is its handle's outcome
            return Done(error=exc)

    def start_actors(self, count: int) -> None:
        pass

    def call(self, actor: int, method: str, *args: Any) -> Done:
        from heygem_ray.release import code_version
        from heygem_ray.segment import SegmentResult, WorkerInfo

        if method == "ready":
            if self.start_error is not None:
                from heygem_ray.errors import RendererStartError

                return Done(error=RendererStartError(self.start_error))
            return Done(WorkerInfo(1000 + actor, None, "libx264", time.time(), time.time(), code=code_version()))
        job = args[0]
        return Done(SegmentResult(job.row_id, job.index, job.frames, 1 << 20, reused=False))

    def wait(self, handles: Sequence[Done], timeout: float) -> list[Done]:
        return list(handles[:1])

    def get(self, handle: Done | Expired) -> Any:
        if isinstance(handle, Expired):
            raise StageStopped(handle.why)
        if handle.error is not None:
            raise handle.error
        return handle.result

    def stranded(self) -> list[Done]:
        return []

    def cancel(self, handle: Done) -> bool:
        return True  # done already

    def abandon(self, handle: Done) -> None:
        self.cancel(handle)

    def close(self) -> None:
        pass

    def stop(self, actor: int) -> None:
        pass

    def restart(self, actor: int) -> bool:
        return False

    def restarts(self, actor: int) -> int:
        return 0

    def all_restarts(self) -> list[int]:
        return [0] * self.actors

    def dead(self, actor: int) -> bool:
        return False

    def actor_count(self) -> int:
        return self.actors

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.actors)}

    def cause(self, exc: BaseException) -> BaseException:
        return exc

    def actor_lost(self, exc: BaseException) -> bool:
        return False


def _prepare_row(row: Any, cfg: Any, decode: bool = True) -> Any:
    from heygem_ray.prepare import AudioInfo, RowPrep

    audio = AudioInfo(row.audio, f"a{row.audio}", 16_000 * 10, 0.1, f"{row.audio}.f32", decoded=True)
    return RowPrep(f"fp-{row.id}", False, audio if decode else None, None)


def _prepare_avatar(avatar: str, *_: Any) -> Any:
    import numpy as np

    from heygem_ray.media.video import VideoInfo
    from heygem_ray.prepare import AvatarTrack

    info = VideoInfo(False, 25.0, "25/1", 1280, 720, 0, 250)
    return AvatarTrack(avatar, f"v{avatar}", info, np.arange(250), np.tile([[500, 100, 800, 500]], (250, 1)))


def _prepare_audio_track(audio: Any, *_: Any) -> Any:
    from heygem_ray.prepare import AudioTrack

    return AudioTrack(f"{audio.uri}.m4a", 480_000, 48_000)


def _stitch_row(job: Any, track: Any) -> Any:
    from heygem_ray.markers import Marker
    from heygem_ray.stitch import Stitched

    marker = Marker(job.row_id, job.fingerprint, job.output, job.frames, 10.0, time.time(), run=job.run)
    return Stitched(marker, THUMBNAIL)


STAGES: dict[str, Callable[..., Any]] = {
    "prepare_row": _prepare_row,
    "prepare_avatar": _prepare_avatar,
    "prepare_audio_track": _prepare_audio_track,
    "stitch_row": _stitch_row,
}


def measure(rows: int) -> dict[str, float]:
    """One campaign of `rows` rows on the simulated executor, in this process."""
    from heygem_ray.campaign import Campaign
    from heygem_ray.cli import compose
    from heygem_ray.config import to_plain
    from heygem_ray.manifest import Row

    with tempfile.TemporaryDirectory(prefix="heygem-driver-") as tmp:
        out = Path(tmp) / "out"
        cfg = to_plain(compose([f"manifest={tmp}/m.parquet", f"output={out}", "render.progress=false"]))
        manifest = [
            Row(f"r{i:06d}", f"/in/a{i % NARRATIONS}.wav", f"/in/v{i % AVATARS}.mp4", str(out / f"r{i:06d}.mp4"))
            for i in range(rows)
        ]
        start = time.perf_counter()
        job = Campaign(cfg, manifest, executor=SimulatedExecutor())
        summary = job.run()
        seconds = time.perf_counter() - start
        assert summary.count("ok") == rows, summary.line()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "seconds": seconds, "peak_rss_mib": peak_mib}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this size, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    print("| rows | driver s | µs per row | peak RSS MiB | KiB per row (over the smallest run) |")
    print("|---:|---:|---:|---:|---:|")
    base = None
    for rows in args.rows:
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.driver", "--one", str(rows)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        base = base or r
        growth = (r["peak_rss_mib"] - base["peak_rss_mib"]) * 1024 / max(1, rows - base["rows"])
        print(
            f"| {rows:,} | {r['seconds']:.2f} | {r['seconds'] / rows * 1e6:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{growth:.2f} |"
            if rows != base["rows"]
            else f"| {rows:,} | {r['seconds']:.2f} | {r['seconds'] / rows * 1e6:.0f} | {r['peak_rss_mib']:.0f} | — |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
