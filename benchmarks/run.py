"""Pipeline benchmarks (issue 6): one runner that makes its own inputs and prints markdown tables.

    python -m benchmarks.run [--only defaults stages wav2lip rss second scaling node] [--quick] [--no-append]
                             [--avatar-height 720 [1080]] [--avatar-seconds S] [--audio-seconds S]
                             [--long-audio-minutes M] ...

Measurements (each prints its table as soon as it is measured):

  defaults what a new user gets: `heygem-ray render` with default settings (Wav2Lip, a 720p still,
           fixed box, 4 rows × 12 s and one row), each whole command timed from start to exit,
           against the official flow run once per video as its own process (benchmarks.naive_row:
           the naive batch-1 loop, the target's baseline, and the official batch of 128), plus the
           CLI's start-up breakdown (driver, Ray, actor, model load, wait, first batch).
  stages   per-stage seconds and frames/s on a generated 16:9 avatar (720p/1080p): decode
           (iter_frames full pass; FrameReader batches inside the segment path), detect (haar via
           prepare_avatar, then the cached call), audio, render, encode, segment upload (the product's
           own `RenderWorker.render_segment` stage clock, in this process), Wav2Lip render split into
           generator and crop+paste, stitch (mux.stitch), upload (storage.publish_file), and a whole
           campaign through `heygem_ray.campaign.run(cfg)` on a local Ray with sampled peak RSS.
  wav2lip  Wav2Lip with a fixed box: a naive one-process loop (decode one frame, generator on that
           frame, paste, encode) vs the batched actor segment path in this process and the campaign
           on a local Ray; same frames, same recipe weights, same torch threads.
  rss      a renderer actor's peak RSS (VmHWM from /proc, read while the actor is alive) for short vs
           long audio, same avatar and config.
  second   prepare_avatar seconds in a first and a second campaign over the same avatar (shared cache).
  scaling  campaign throughput with 1, 2 and 4 classic actors on a local Ray.
  node     the one-node target: a 3-min 1080p25 avatar + 3 min of audio through Wav2Lip as one
           campaign on a local Ray holding the whole machine, face track cached beforehand; on a
           CUDA machine with the `cluster=gpu` actor shape (2 CPUs + 1/8 GPU each) and fp16. Run
           it alone on the GPU node: `python -m benchmarks.run --only node`.

Results go to stdout and, unless --no-append, to benchmarks/RESULTS.md under "## Pipeline (issue 6)"
with the date and the machine. Inputs are synthetic (heygem_ray.demo) and weights are the recipe
weights (tests/recipe_weights.py), so nothing is downloaded.
"""

from __future__ import annotations

import os

# Ray reads the auth mode at import: set it before anything imports ray (as the tests do).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import argparse
import contextlib
import datetime
import importlib.util
import io
import itertools
import json
import math
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import psutil
import ray

from heygem_ray import demo, storage
from heygem_ray.campaign import Campaign
from heygem_ray.executors.ray_cluster import RayExecutor
from heygem_ray.media.yuv import bgr_to_i420
from heygem_ray.prepare import prepare_audio, prepare_avatar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HEADING = "## Pipeline (issue 6)"
FPS = 25
MEASUREMENTS = ("defaults", "stages", "wav2lip", "rss", "second", "scaling", "node")
MIB = 1024.0  # /proc reports kB


# --------------------------------------------------------------------------------------- output
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A markdown table; columns in `right` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def f1(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:,.1f}"


def f2(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:,.2f}"


def mib(kb: float | None) -> str:
    return "—" if not kb else f"{kb / MIB:,.0f}"


def rate(frames: float, seconds: float) -> float:
    return frames / seconds if seconds > 0 else float("nan")


@dataclass
class Report:
    """What a measurement prints: markdown sections, plus numbers the target summary needs."""

    sections: list[str] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)

    def emit(self, title: str, body: str, notes: str = "") -> None:
        text = f"#### {title}\n\n{body}\n" + (f"\n{notes.strip()}\n" if notes else "")
        self.sections.append(text)
        print("\n" + text, flush=True)


# --------------------------------------------------------------------------------------- machine
def machine_line() -> str:
    cpu, cores = "unknown CPU", os.cpu_count() or 0
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
        cores = sum(1 for line in info.splitlines() if line.startswith("processor")) or cores
    mem = "?"
    with contextlib.suppress(OSError, ValueError):
        kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {cores} cores, {mem} RAM; {device}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads by default), Ray {ray.__version__}, PyAV {av.__version__}"
    )


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


# --------------------------------------------------------------------------------------- processes
def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in kB (empty when it is gone). VmHWM, the kernel's peak-RSS
    high-water mark, is read from /proc: psutil gives the current RSS only (on Linux)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def _title(pid: int) -> str:
    """A process's title: a Ray worker names its actor class or task there ("ray::RenderWorker...")."""
    with contextlib.suppress(psutil.Error):
        cmdline = psutil.Process(pid).cmdline()
        return cmdline[0].strip() if cmdline else ""
    return ""


def _children(ppid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(ppid).children()]
    return []


def _raylets() -> list[int]:
    """The raylet of the Ray this process started (Ray workers are its children)."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "raylet":
                found.append(child.pid)
    if not found and ray.is_initialized():  # joined a Ray started elsewhere: ask a worker for its parent
        found.append(ray.get(ray.remote(_parent_pid).options(num_cpus=0).remote()))
    return found


def _parent_pid() -> int:
    return os.getppid()


def _role(title: str) -> str:
    """'ray::RenderWorker.render_segment' -> 'RenderWorker'; 'ray::stitch_row' -> 'stitch_row'."""
    return title.removeprefix("ray::").split(".", 1)[0].split(" ", 1)[0] or "?"


class Poller:
    """Calls `sample()` once on entering, every `interval` seconds on a thread, and once on leaving."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Poller:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class RssSampler(Poller):
    """Polls the resident memory of this Ray's worker processes (by role: actor class or task name,
    from the process title) and of the driver, every `interval` seconds.

    Besides the sampled VmRSS it keeps each process's VmHWM, the kernel's own peak-RSS high-water
    mark: it only grows, so the last sample before a process exits holds that process's true peak
    (Campaign.run kills its actors when it ends, so it cannot be read afterwards)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(interval)
        self.peak: dict[str, int] = {}  # role -> highest sampled VmRSS (kB)
        self.pids: dict[str, set[int]] = {}  # role -> pids seen in that role
        self.hwm: dict[int, int] = {}  # pid -> latest VmHWM (kB)
        self.series: list[tuple[float, int]] = []  # (time, summed VmRSS of the actor processes)
        self._raylets: list[int] = []
        self._lock = threading.Lock()

    def __enter__(self) -> RssSampler:
        self._raylets = _raylets()
        super().__enter__()
        return self

    def sample(self) -> None:
        seen = [(os.getpid(), "driver")]
        for raylet in self._raylets:
            seen += [(pid, _role(_title(pid))) for pid in _children(raylet)]
        now = time.perf_counter()
        with self._lock:
            actors = 0
            for pid, role in seen:
                status = _status(pid)
                rss = status.get("VmRSS", 0)
                if rss:
                    self.peak[role] = max(self.peak.get(role, 0), rss)
                    self.pids.setdefault(role, set()).add(pid)
                    self.hwm[pid] = max(self.hwm.get(pid, 0), status.get("VmHWM", 0))
                    actors += rss if role == "RenderWorker" else 0
            if actors:
                self.series.append((now, actors))

    def timeline(self, parts: int = 4) -> str:
        """Highest actor VmRSS (MiB) in each of `parts` equal slices of the time the actors were seen,
        e.g. '380 · 410 · 415 · 416': flat once warm, or growing with the video's length."""
        with self._lock:
            series = list(self.series)
        if not series:
            return "—"
        t0, t1 = series[0][0], series[-1][0]
        span = max(t1 - t0, 1e-9)
        peaks = [0] * parts
        for t, rss in series:
            k = min(parts - 1, int((t - t0) / span * parts))
            peaks[k] = max(peaks[k], rss)
        return " · ".join(mib(p) if p else "—" for p in peaks)

    def peak_hwm(self, role: str = "RenderWorker") -> int | None:
        """The highest VmHWM (kB) of the processes seen in `role`."""
        with self._lock:
            return max((self.hwm.get(pid, 0) for pid in self.pids.get(role, ())), default=0) or None


CPU_PARTS = ("actors", "driver, Ray and tasks", "rest of the machine")


class CpuSampler(Poller):
    """Where the machine's CPU time went during a run, sampled once a second: this benchmark's
    renderer actors, the rest of its own process tree (driver, Ray's daemons, prepare and stitch
    tasks), and everything else (kernel threads, host agents): what actors added to a busy machine
    can only be judged against the cores the rest left them."""

    def __init__(self, interval: float = 1.0):
        super().__init__(interval)
        self._first: dict[int, float] = {}  # pid -> CPU seconds when first seen (0 if born during the run)
        self._last: dict[int, float] = {}
        self._actor: set[int] = set()
        self._ours: set[int] = {os.getpid()}
        self._started = False
        self.seconds: dict[str, float] = {}  # CPU seconds by CPU_PARTS
        self.wall = 0.0

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def sample(self) -> None:
        first, self._started = not self._started, True
        parents: dict[int, int] = {}
        for proc in psutil.process_iter(["ppid", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is None:  # gone, or not ours to read
                continue
            pid, cpu = proc.pid, times.user + times.system
            parents[pid] = proc.info["ppid"] or 0
            self._first.setdefault(pid, cpu if first else 0.0)
            self._last[pid] = cpu
        root = os.getpid()
        for pid in parents:
            ancestor, hops = pid, 0
            while ancestor not in (0, 1, root) and hops < 64:
                ancestor, hops = parents.get(ancestor, 0), hops + 1
            if ancestor == root:
                self._ours.add(pid)
                if _role(_title(pid)) == "RenderWorker":
                    self._actor.add(pid)

    def __enter__(self) -> CpuSampler:
        self._start, self._busy0 = time.perf_counter(), self._busy()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.wall = time.perf_counter() - self._start
        used = {pid: self._last[pid] - self._first[pid] for pid in self._last}
        actors = sum(used[pid] for pid in self._actor)
        ours = sum(used[pid] for pid in self._ours - self._actor)
        rest = max(0.0, self._busy() - self._busy0 - actors - ours)
        self.seconds = dict(zip(CPU_PARTS, (actors, ours, rest)))

    def cores(self, part: str) -> float:
        """Average cores `part` kept busy over the run."""
        return self.seconds.get(part, 0.0) / max(self.wall, 1e-9)


# --------------------------------------------------------------------------------------- inputs
class Inputs:
    """Synthetic inputs, made once per run under `root` and reused by every measurement."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def stage_avatar(self, height: int, seconds: float) -> tuple[str, float]:
        """A 16:9 H.264 clip: the demo portrait (90 % of the height) with its head motion, on a
        padded canvas. Returns (path, seconds spent making it; 0 when it already existed)."""
        path = self._path(f"avatar-{height}p-{seconds:g}s.mp4")
        if os.path.exists(path):
            return path, 0.0
        start = time.perf_counter()
        stage = demo.Stage.of_height(height)
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.height, stream.width = stage.canvas.shape[:2]
            stream.pix_fmt = "yuv420p"
            # a keyframe every 2 s, as camera and phone files have (x264's default of 250 frames would
            # make every segment's seek decode ~25 % more frames than a real campaign does)
            stream.options = {"crf": "18", "preset": "veryfast", "g": str(2 * FPS)}
            for i in range(int(round(seconds * FPS))):
                video_frame = av.VideoFrame.from_ndarray(bgr_to_i420(stage.frame(i / FPS)), format="yuv420p")
                video_frame.pts = i
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode(None))
        return path, time.perf_counter() - start

    def still_avatar(self, height: int) -> tuple[str, list[int]]:
        """A 16:9 PNG of the demo portrait (90 % of the height) and the box of its face."""
        stage = demo.Stage.of_height(height)
        path = self._path(f"still-{height}p.png")
        if not os.path.exists(path):
            cv2.imwrite(path, stage.frame())
        return path, stage.face_box()

    def small_avatar(self, width: int, seconds: float) -> str:
        path = self._path(f"avatar-w{width}-{seconds:g}s.mp4")
        if not os.path.exists(path):
            demo.write_avatar_clip(path, seconds, fps=FPS, width=width, seed=1)
        return path

    def audio(self, seconds: float, seed: int) -> str:
        path = self._path(f"speech-{seconds:g}s-{seed}.wav")
        if not os.path.exists(path):
            demo.write_wav(path, demo.speech_like(seconds, seed=seed))
        return path

    def checkpoint(self) -> str:
        """The recipe generator weights as an official-layout training dict (like wav2lip_gan.pth)."""
        path = self._path("wav2lip_recipe.pth")
        if not os.path.exists(path):
            import torch

            spec = importlib.util.spec_from_file_location("recipe_weights", ROOT / "tests" / "recipe_weights.py")
            recipe = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(recipe)
            state = recipe.recipe_state_dict(
                recipe.read_keys(ROOT / "tests" / "data" / "wav2lip_state_dict.tsv"), seed=0
            )
            torch.save(
                {
                    "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": None,
                    "global_step": 0,
                    "global_epoch": 0,
                },
                path,
            )
        return path

    def manifest(self, name: str, audios: Sequence[str], avatar: str) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._path(f"{name}.parquet")
        ids = [f"row-{i}" for i in range(len(audios))]
        pq.write_table(pa.table({"id": ids, "audio": list(audios), "avatar": [avatar] * len(audios)}), path)
        return path


# --------------------------------------------------------------------------------------- Ray + campaigns
@dataclass
class Context:
    args: argparse.Namespace
    inputs: Inputs
    work: str
    report: Report

    def dir(self, name: str) -> str:
        path = os.path.join(self.work, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path


_SESSION: dict[str, int | None] = {"cpus": None}


def ray_session(cpus: int, fresh: bool = False) -> None:
    """A local Ray with `cpus` logical CPUs; restarted when the CPU count differs or `fresh`."""
    if ray.is_initialized() and (fresh or _SESSION["cpus"] != cpus):
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        _SESSION["cpus"] = cpus


def config(manifest: str, output: str, *overrides: str) -> Any:
    """The campaign config exactly as `heygem-ray render` composes it (Hydra), resolved to dataclasses."""
    from heygem_ray.cli import compose
    from heygem_ray.config import to_plain

    return to_plain(compose([f"manifest={manifest}", f"output={output}", "render.progress=false", *overrides]))


def in_process(cfg: Any) -> Any:
    """The config as an actor on this machine sees it: `encoder.codec=auto` decided here, as each
    actor decides it for its node (NVENC when this machine's GPU can encode, else libx264)."""
    from dataclasses import replace

    from heygem_ray.media.video import auto_codec

    if cfg.encoder.codec != "auto":
        return cfg
    return replace(cfg, encoder=replace(cfg.encoder, codec=auto_codec()))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Campaign log lines (one per row) would interleave with the tables; keep them out of stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _timed_prepare_avatar(*args: Any, **kwargs: Any) -> Any:
    """prepare_avatar as a campaign runs it, with its wall seconds attached to the returned track."""
    start = time.perf_counter()
    track = prepare_avatar(*args, **kwargs)
    object.__setattr__(track, "bench_seconds", time.perf_counter() - start)
    return track


class TimedAvatarExecutor(RayExecutor):
    """The Ray executor, timing each prepare_avatar task (detect or cache hit)."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.avatar_seconds: list[float] = []

    def submit(self, fn: Any, *args: Any, num_gpus: float = 0.0) -> Any:
        return super().submit(_timed_prepare_avatar if fn is prepare_avatar else fn, *args, num_gpus=num_gpus)

    def get(self, handle: Any) -> Any:
        result = super().get(handle)
        seconds = getattr(result, "bench_seconds", None)
        if seconds is not None:
            self.avatar_seconds.append(seconds)
        return result


class TimedCampaign(Campaign):
    """The product's Campaign with the figures the benchmarks print: how long each prepare_avatar
    task took (detect or cache hit) and when the first renderer actor answered (actor start and
    model load behind it)."""

    executor: TimedAvatarExecutor

    def __init__(self, cfg: Any, rows: list[Any]):
        super().__init__(cfg, rows, executor=TimedAvatarExecutor(cfg))
        self.started = time.time()

    def run(self) -> Any:
        self.started = time.time()
        return super().run()

    @property
    def avatar_seconds(self) -> list[float]:
        return self.executor.avatar_seconds

    @property
    def actor_start_seconds(self) -> float | None:
        """From run() until the first actor answered."""
        ready = self.actors.first_ready_at
        return None if ready is None else ready - self.started

    @property
    def workers(self) -> dict[int, Any]:
        """Actor index -> WorkerInfo (pid, pinned cores) of every actor that answered."""
        return {a.index: a.info for a in self.actors.actors if a.info is not None}

    def wait_for_actors_to_exit(self, timeout: float = 30.0) -> None:
        """ray.kill returns at once; the next campaign's actors must not meet these (pinned cores)."""
        deadline = time.time() + timeout
        for info in self.workers.values():
            while time.time() < deadline:
                try:
                    os.kill(info.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


def run_campaign(cfg: Any, timed: bool = False, sampler: Any = None) -> tuple[Any, float, Any, Any]:
    """Render a campaign on the running Ray while sampling memory (or what `sampler` samples, e.g.
    a CpuSampler). Without `timed` this is `campaign.run(cfg)` itself; with it, the same steps
    through TimedCampaign. Returns (summary, wall seconds, sampler, the TimedCampaign or None)."""
    from heygem_ray import campaign
    from heygem_ray.manifest import read_manifest

    job = None
    with sampler or RssSampler() as active, quiet():
        start = time.perf_counter()
        if not timed:
            summary = campaign.run(cfg)
        else:
            storage.configure(cfg.storage.options)
            rows = read_manifest(cfg.manifest, cfg.output, cfg.storage.allow_outside_output)
            job = TimedCampaign(cfg, rows)
            summary = job.run()
        wall = time.perf_counter() - start
    failed = [r for r in summary.rows if r.status != "ok"]
    if failed:
        raise RuntimeError(f"campaign row {failed[0].id} {failed[0].status}: {failed[0].error}")
    return summary, wall, active, job


def segment_jobs(cfg: Any, track: Any, audio: Any, work: str, frames: int | None = None) -> list[Any]:
    """The SegmentJobs the campaign would send to actors for this avatar and audio (`RowState`), their
    files under `work` (fresh per call: a segment file already there is reused, not rendered); `cfg`
    with a decided codec, as `in_process` gives it."""
    from heygem_ray.layout import CampaignLayout
    from heygem_ray.manifest import Row
    from heygem_ray.rows import RowState

    state = RowState.prepared(Row("bench", audio.uri, track.uri, ""), audio, "bench")
    state.plan(track, cfg.render.segment_seconds, frames=frames)
    return [state.segment_job(i, CampaignLayout(work), cfg.encoder.codec) for i in range(len(state.spans))]


def render_segments(worker: Any, jobs: list[Any]) -> tuple[float, dict[str, float], int]:
    """Run RenderWorker.render_segment over the jobs in this process: (wall s, stage seconds, frames)."""
    seconds: dict[str, float] = {}
    frames = 0
    start = time.perf_counter()
    for job in jobs:
        result = worker.render_segment(job)
        frames += result.frames
        for stage, value in result.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + value
    return time.perf_counter() - start, seconds, frames


def rss_columns(sampler: RssSampler) -> list[str]:
    return [
        mib(sampler.peak.get(role))
        for role in ("RenderWorker", "prepare_row", "prepare_avatar", "stitch_row", "driver")
    ]


RSS_HEADERS = ["actor MiB", "prepare_row MiB", "prepare_avatar MiB", "stitch_row MiB", "driver MiB"]


# --------------------------------------------------------------------------------------- 0. defaults
def timed_command(argv: Sequence[str], cwd: str) -> tuple[float, str]:
    """Run a command as a user would and time it from start to exit: (wall seconds, its stdout)."""
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return wall, done.stdout


STARTUP_PREFIX = "heygem-ray: start-up: "


def startup_steps(stdout: str) -> dict[str, float]:
    """The CLI's start-up line ("heygem-ray: start-up: driver 0.6 s, ...; first frames 9.8 s after
    launch") as {step: seconds}, "first frames" last."""
    line = next((ln[len(STARTUP_PREFIX) :] for ln in stdout.splitlines() if ln.startswith(STARTUP_PREFIX)), "")
    steps_text, _, total = line.partition("; first frames ")
    steps = {}
    for part in filter(None, steps_text.split(", ")):
        name, _, value = part.rpartition(" ")[0].rpartition(" ")
        steps[name] = float(value)
    if total:
        steps["first frames"] = float(total.split()[0])
    return steps


def bench_defaults(ctx: Context) -> None:
    """What a new user gets: `heygem-ray render` with default settings, the whole command timed,
    against the official one-video flow run once per video as its own process (benchmarks.naive_row):
    a campaign of several rows and a single row, side by side in this run."""
    args = ctx.args
    avatar, box = ctx.inputs.still_avatar(args.defaults_height)
    checkpoint = ctx.inputs.checkpoint()
    audios = [ctx.inputs.audio(args.defaults_audio_seconds, seed=70 + i) for i in range(args.defaults_rows)]
    work = ctx.dir("defaults")
    python = sys.executable
    cli = os.path.join(os.path.dirname(python), "heygem-ray")
    command = [cli] if os.path.exists(cli) else [python, "-m", "heygem_ray.cli"]
    box_arg = f"detector.box=[{','.join(map(str, box))}]"
    if ray.is_initialized():  # the CLI starts its own Ray, as a user's would: no other Ray on the machine
        ray.shutdown()

    def baseline(rows: list[str], batch: int, tag: str) -> tuple[float, dict[str, float]]:
        wall, steps = 0.0, {}
        for i, audio in enumerate(rows):
            seconds, out = timed_command(
                [
                    python,
                    "-m",
                    "benchmarks.naive_row",
                    "--checkpoint",
                    checkpoint,
                    "--audio",
                    audio,
                    "--avatar",
                    avatar,
                    "--box",
                    *map(str, box),
                    "--batch",
                    str(batch),
                    "--out",
                    os.path.join(work, f"{tag}-{i}.mp4"),
                ],
                cwd=str(ROOT),
            )
            wall += seconds
            for k, v in json.loads(out.strip().splitlines()[-1])["steps"].items():
                steps[k] = steps.get(k, 0.0) + v
        return wall, steps

    def ours(rows: list[str], tag: str, *extra: str) -> tuple[float, dict[str, float]]:
        manifest = ctx.inputs.manifest(f"defaults-{tag}", rows, avatar)
        wall, out = timed_command(
            [
                *command,
                "render",
                f"manifest={manifest}",
                f"output={os.path.join(work, tag)}",
                "renderer=wav2lip",
                f"renderer.checkpoint={checkpoint}",
                "detector=box",
                box_arg,
                "render.progress=false",
                *extra,
            ],
            cwd=work,
        )
        return wall, startup_steps(out)

    cases = [("one row", audios[:1]), (f"{len(audios)} rows", audios)]
    results: dict[str, dict[str, tuple[float, dict[str, float]]]] = {}
    for name, rows in cases:  # each case's paths back to back, so load from other work hits them alike
        tag = name.replace(" ", "")
        results[name] = {"naive": baseline(rows, 1, f"naive-{tag}")}
        if args.defaults_official:
            results[name]["official"] = baseline(rows, 128, f"official-{tag}")
        results[name]["ours"] = ours(rows, tag)
        if args.defaults_inline:  # no Ray: one renderer per core in the driver's process
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            actors = min(cores, len(rows))
            results[name]["inline"] = ours(rows, f"{tag}-inline", "cluster=inline", f"cluster.actors={actors}")
    frames = round(args.defaults_audio_seconds * FPS)
    table_rows, ratios = [], {}
    for name, paths in results.items():
        naive = paths["naive"][0]
        for path, (wall, _) in paths.items():
            label = {
                "naive": "naive loop, one process per video (batch 1, fp32)",
                "official": "official flow, one process per video (batch 128, fp32)",
                "ours": "heygem-ray render, defaults",
                "inline": "heygem-ray render, cluster=inline (no Ray; a renderer per core, up to one per row)",
            }[path]
            table_rows.append(
                [
                    name,
                    label,
                    f"{wall:,.1f}",
                    f1(rate(frames * (1 if name == "one row" else len(audios)), wall)),
                    f"{naive / wall:.2f}×",
                ]
            )
        ratios[name] = naive / paths["ours"][0]
    startup = results["one row"]["ours"][1]
    ctx.report.targets["defaults"] = (
        ratios["one row"],
        ratios[f"{len(audios)} rows"],
        len(audios),
        startup.get("first frames"),
    )
    steps_table = table(
        ["start-up step (one row, from the CLI's own line)", "s"],
        [[k, f"{v:.2f}"] for k, v in startup.items()],
        right=[1],
    )
    title = (
        f"0. Defaults, whole command: {len(audios)} rows × {args.defaults_audio_seconds:g} s and one row, "
        f"Wav2Lip, {args.defaults_height}p still, fixed box"
    )
    shown = "heygem-ray" if len(command) == 1 else "python -m heygem_ray.cli"
    notes = (
        f"Every figure is a whole command timed from start to exit (`{shown} render "
        "manifest=… output=… renderer=wav2lip renderer.checkpoint=… detector=box detector.box=[…]`, nothing "
        "else set) against `python -m benchmarks.naive_row` run once per video, model loaded each time, as the "
        "official script is. Same recipe weights, same still, same box, same x264 settings and audio mux. "
        + (
            "The `cluster=inline` rows add `cluster=inline cluster.actors=N` (no Ray; not the default, which stays "
            "a local Ray). "
            if args.defaults_inline
            else ""
        )
        + f"Targets: ≥ 1.5× for one row, ≥ 3× for the campaign. Measured: **{ratios['one row']:.2f}×** and "
        f"**{ratios[f'{len(audios)} rows']:.2f}×**.\n\n" + steps_table
    )
    ctx.report.emit(
        title, table(["work", "path", "wall s", "frames/s", "vs naive"], table_rows, right=range(2, 5)), notes
    )


# --------------------------------------------------------------------------------------- 1. stages
def bench_stages(ctx: Context, height: int) -> None:
    from heygem_ray.media.audio import AudioWindow
    from heygem_ray.media.mux import encode_audio, stitch
    from heygem_ray.media.video import iter_frames, probe
    from heygem_ray.render.wav2lip import Wav2LipRenderer
    from heygem_ray.segment import RenderWorker

    args = ctx.args
    avatar, made = ctx.inputs.stage_avatar(height, args.avatar_seconds)
    audio = ctx.inputs.audio(args.audio_seconds, seed=11)
    work = ctx.dir(f"stages-{height}")
    cache = os.path.join(work, "cache")
    cfg = in_process(config(os.path.join(work, "unused.parquet"), os.path.join(work, "out"), f"cache={cache}"))
    info = probe(avatar, cfg.render.still_fps)
    rows: list[list[Any]] = []

    def row(stage: str, what: str, frames: int | None, seconds: float) -> None:
        fps = rate(frames, seconds) if frames else None
        ms = 1000 * seconds / frames if frames else None
        rows.append([stage, what, frames if frames else "—", f"{seconds:,.3f}", f1(fps), f1(ms)])

    start, count = time.perf_counter(), 0
    for _ in iter_frames(avatar, info):
        count += 1
    row("decode", "iter_frames, full pass (PyAV, threads auto)", count, time.perf_counter() - start)

    start = time.perf_counter()
    track = prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)
    row(
        "detect",
        "prepare_avatar, detector=haar: fingerprint, probe, decode, detect, track",
        track.frames,
        time.perf_counter() - start,
    )
    start = time.perf_counter()
    prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)
    row("detect (cached)", "prepare_avatar again: cached track", None, time.perf_counter() - start)

    start = time.perf_counter()
    pcm = prepare_audio(audio, cache)
    row("audio", f"prepare_audio: {pcm.seconds:g} s wav to the 16 kHz PCM cache", None, time.perf_counter() - start)

    # the actor's own segment path, in this process: its stage clock splits decode/render/encode/upload
    worker = RenderWorker(cfg)
    frames = min(track.frames, math.ceil(pcm.seconds * info.fps - 1e-6))
    jobs = segment_jobs(cfg, track, pcm, os.path.join(work, "segments"), frames)
    wall, seconds, done = render_segments(worker, jobs)
    threads = worker.threads
    batch = cfg.renderer.batch_size
    row("audio features", "classic renderer.features (per segment window)", done, seconds.get("audio", 0.0))
    row("decode", f"FrameReader.read, batches of {batch} (in render_segment)", done, seconds.get("decode", 0.0))
    row(
        "render + paste",
        f"classic renderer.render, batches of {batch}; draws in place (paste inside)",
        done,
        seconds.get("render", 0.0),
    )
    row(
        "encode",
        f"SegmentWriter, {cfg.encoder.codec} {cfg.encoder.preset} crf {cfg.encoder.crf}, {threads} thread(s)",
        done,
        seconds.get("encode", 0.0),
    )
    row("upload (segment)", "storage.publish_file of each segment file (local)", None, seconds.get("upload", 0.0))
    row(
        "segment total",
        f"RenderWorker.render_segment, {len(jobs)} segment(s), {threads} thread(s); decode and "
        "encode overlap render on helper threads",
        done,
        wall,
    )

    # Wav2Lip at this resolution: generator vs the separable pixel work (crop+resize in, resize+paste out)
    n = min(args.wav2lip_stage_frames, track.frames)
    w2l = Wav2LipRenderer(ctx.inputs.checkpoint(), batch_size=n, device=args.device)
    gen = [0.0]
    generate = w2l._generate_cpu

    def timed_generate(*args: Any) -> np.ndarray:
        t = time.perf_counter()
        try:
            return generate(*args)
        finally:
            gen[0] += time.perf_counter() - t

    w2l._generate_cpu = timed_generate  # type: ignore[method-assign]
    frames_in = []
    for _, frame in iter_frames(avatar, info):
        frames_in.append(frame)
        if len(frames_in) == n:
            break
    from heygem_ray.prepare import read_pcm

    window = AudioWindow(read_pcm(pcm.pcm_uri, 0, pcm.samples), 0, pcm.samples, pcm.level)
    feats = w2l.features(window, np.arange(n), info.fps)
    w2l.render([f.copy() for f in frames_in[:2]], track.boxes[:2], feats[:2])  # warm-up
    gen[0] = 0.0
    start = time.perf_counter()
    w2l.render(frames_in, track.boxes[:n], feats)
    total = time.perf_counter() - start
    import torch

    row(
        "wav2lip render",
        f"Wav2LipRenderer.render, batch {n}, {w2l.device}, {torch.get_num_threads()} thread(s)",
        n,
        total,
    )
    row("  generator", "the network forward (Wav2LipRenderer._generate)", n, gen[0])
    row("  crop + paste", "crop + resize to 96², resize back + feather paste (render − generator)", n, total - gen[0])
    del frames_in

    # stitch: the rendered segments repeated to cover the whole audio, joined with AAC audio
    seg_files = [job.out_uri for job in jobs]
    need = math.ceil(pcm.seconds * info.fps - 1e-6)
    count = max(1, math.ceil(need / max(1, frames)) * len(seg_files))
    audio_track = os.path.join(work, "audio.m4a")
    start = time.perf_counter()
    encoded = encode_audio(
        audio, audio_track, cfg.encoder.audio_codec, cfg.encoder.audio_bitrate, cfg.encoder.audio_sample_rate
    )
    row(
        "audio track",
        f"mux.encode_audio: {encoded / cfg.encoder.audio_sample_rate:.0f} s to AAC (once per narration, while it renders)",
        None,
        time.perf_counter() - start,
    )
    stitched = os.path.join(work, "stitched.mp4")
    start = time.perf_counter()
    stats = stitch(
        lambda i: open(seg_files[i % len(seg_files)], "rb"),  # noqa: SIM115 - stitch closes each file it opens
        count,
        audio_track,
        stitched,
        info.fps_fraction,
    )
    row(
        "stitch",
        f"mux.stitch: {count} segment files + the audio track joined (packet copy)",
        stats.frames,
        time.perf_counter() - start,
    )
    size = os.path.getsize(stitched)
    start = time.perf_counter()
    storage.publish_file(stitched, os.path.join(work, "published", "row.mp4"))
    up = time.perf_counter() - start
    row(
        "upload",
        f"storage.publish_file, local: {size / 1e6:.1f} MB at {size / 1e6 / max(up, 1e-9):,.0f} MB/s",
        None,
        up,
    )

    # the whole product path: campaign.run on a local Ray (cold cache: prepares and detects again)
    ray_session(ctx.args.session_cpus or 2)
    manifest = ctx.inputs.manifest(f"stages-{height}", [audio], avatar)
    cfg_run = config(manifest, os.path.join(work, "campaign"))
    from heygem_ray.executors.ray_cluster import actor_count

    actors = actor_count(cfg_run)
    summary, wall, sampler, _ = run_campaign(cfg_run)
    result = summary.rows[0]
    row(
        "end to end",
        f"campaign.run, local Ray ({_SESSION['cpus']} CPUs, {actors} actor(s)), cold cache",
        result.frames,
        wall,
    )
    realtime = result.audio_seconds / wall
    ctx.report.targets.setdefault("realtime", []).append((height, realtime, rate(result.frames, wall)))

    title = (
        f"1. Stages, {info.width}×{info.height} avatar ({track.frames} frames, {args.avatar_seconds:g} s), "
        f"{pcm.seconds:g} s audio"
    )
    notes = (
        f"End to end: {result.frames} frames for {result.audio_seconds:.1f} s of audio in {wall:.1f} s = "
        f"**{realtime:.2f}× realtime** (audio s / wall s), {rate(result.frames, wall):.1f} frames/s; wall time "
        "includes actor start, audio decode, face detection, rendering and stitch, not Ray's own start. "
        f"Avatar generation ({made:.1f} s) is not counted. Stage rows run in this process, one after another "
        f"(the segment path with {threads} thread(s), as a default actor; its decode, render and encode seconds come "
        "from the actor's own stage clock and overlap, so they add up to more than the segment total).\n\n"
        "Peak memory during the campaign (MiB): the actor's VmHWM (kernel peak) and VmRSS sampled every 0.2 s "
        "per role (the actor class or task name in the process title):\n\n"
        + table(
            ["actor VmHWM MiB", *[f"sampled {h}" for h in RSS_HEADERS]],
            [[mib(sampler.peak_hwm()), *rss_columns(sampler)]],
            right=range(6),
        )
    )
    ctx.report.emit(
        title,
        table(["stage", "what runs", "frames", "seconds", "frames/s", "ms/frame"], rows, right=(2, 3, 4, 5)),
        notes,
    )


# --------------------------------------------------------------------------------------- 2. wav2lip
def face_box(avatar: str, cache: str) -> list[int]:
    """One fixed box for the avatar: the median of a haar track (every 10th frame)."""
    cfg = config("m", "o", "detector.stride=10")
    track = prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)
    return [int(v) for v in np.median(track.boxes, axis=0)]


def bench_wav2lip(ctx: Context) -> None:
    import torch

    from heygem_ray.media.audio import AudioWindow, iter_pcm16k
    from heygem_ray.media.video import SegmentWriter, iter_frames, probe
    from heygem_ray.plan import output_frame_count
    from heygem_ray.render.wav2lip import Wav2LipRenderer
    from heygem_ray.segment import RenderWorker

    args = ctx.args
    seconds = args.wav2lip_audio_seconds
    avatar = ctx.inputs.small_avatar(args.wav2lip_width, seconds + 1.0)  # every output frame is a new avatar frame
    audio = ctx.inputs.audio(seconds, seed=21)
    checkpoint = ctx.inputs.checkpoint()
    work = ctx.dir("wav2lip")
    cache = os.path.join(work, "cache")
    box = face_box(avatar, cache)
    threads = args.threads
    overrides = [
        "renderer=wav2lip",
        f"renderer.checkpoint={checkpoint}",
        f"renderer.device={args.device}",
        "detector=box",
        f"detector.box=[{','.join(map(str, box))}]",
        "cluster.actors=1",
        f"cluster.actor.threads={threads}",
    ]
    cfg = in_process(config("m", os.path.join(work, "unused"), f"cache={cache}", *overrides))
    info = probe(avatar, cfg.render.still_fps)
    n = output_frame_count(seconds, info.fps)
    boxes = np.asarray([box], np.int64)
    warm = np.zeros((info.height, info.width, 3), np.uint8)
    load_start = load_average()

    # naive: one process, frame by frame: decode one frame, generator on it (batch 1), paste, encode
    torch.set_num_threads(threads)
    naive = Wav2LipRenderer(
        checkpoint,
        batch_size=1,
        precision="fp32",
        blend=cfg.renderer.blend,
        device=args.device,
        fuse=False,
        face_cache_mb=0,
    )  # the official plain generator
    naive.render([warm], boxes, np.zeros((1, 80, 16), np.float32))  # first call pays one-off setup: not timed

    def naive_loop() -> tuple[float, dict[str, float], int]:
        stage = {"audio": 0.0, "decode": 0.0, "render": 0.0, "encode": 0.0}
        start = t = time.perf_counter()
        samples = np.concatenate(list(iter_pcm16k(audio)))
        mels = naive.features(AudioWindow(samples, 0, len(samples), 1.0), np.arange(n), info.fps)
        stage["audio"] += time.perf_counter() - t
        writer = SegmentWriter(
            os.path.join(work, "naive.mp4"),
            info.width,
            info.height,
            info.fps_fraction,
            cfg.encoder.codec,
            cfg.encoder.crf,
            cfg.encoder.preset,
            cfg.encoder.pix_fmt,
            threads=threads,
        )
        frames = iter_frames(avatar, info)
        for i in range(n):
            t = time.perf_counter()
            _, frame = next(frames)
            stage["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            out = naive.render([frame], boxes, mels[i : i + 1])
            stage["render"] += time.perf_counter() - t
            t = time.perf_counter()
            writer.write(out[0])
            stage["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        frames.close()
        writer.close()
        stage["encode"] += time.perf_counter() - t
        return time.perf_counter() - start, stage, n

    # ours, in this process: the actor's batched, overlapped segment path (RenderWorker.render_segment),
    # at the official fp32 and at int8 (the CPU default where the CPU has VNNI)
    pcm = prepare_audio(audio, cache)
    track = prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)
    workers = {}
    tuned = ["renderer.precision=int8", f"renderer.batch_size={args.cpu_batch}"]  # what suits a CPU
    if args.compile:
        tuned.append("renderer.compile=true")
    for precision in ("fp32", "int8"):
        cfg_p = in_process(
            config(
                "m",
                os.path.join(work, "unused"),
                f"cache={cache}",
                *overrides,
                *(tuned if precision == "int8" else ["renderer.precision=fp32"]),
            )
        )
        workers[precision] = (cfg_p, RenderWorker(cfg_p))
        workers[precision][1].renderer.render([warm], boxes, np.zeros((1, 80, 16), np.float32))  # untimed warm-up

    def segment_path(precision: str) -> tuple[float, dict[str, float], int]:
        cfg_p, worker = workers[precision]
        return render_segments(worker, segment_jobs(cfg_p, track, pcm, ctx.dir(f"wav2lip-segments-{precision}")))

    # interleaved (naive, ours, naive, ours, ...) and best of the repeats, so load from other work on a
    # shared machine hits every path alike
    runs: dict[str, list[tuple[float, dict[str, float], int]]] = {"naive": [], "fp32": [], "int8": []}
    for _ in range(max(1, args.repeats)):
        runs["naive"].append(naive_loop())
        for precision in ("fp32", "int8"):
            runs[precision].append(segment_path(precision))
    rows: list[list[Any]] = []
    naive_fps = 0.0

    def add(path: str, batch: Any, results: list[tuple[float, dict[str, float], int]]) -> float:
        wall, st, frames = min(results, key=lambda r: r[0])
        fps = rate(frames, wall)
        spread = " / ".join(f"{r[0]:.1f}" for r in results)
        parts = [f2(st.get(k)) if st else "—" for k in ("audio", "decode", "render", "encode")]
        rows.append([path, batch, frames, f"{wall:,.2f}", spread, f1(fps), f"{fps / (naive_fps or fps):.2f}×", *parts])
        return fps

    naive_fps = add(f"naive loop: decode 1 → generator (batch 1) → paste → encode, {threads} threads", 1, runs["naive"])
    segment_fps = add(
        f"RenderWorker.render_segment in this process, fp32 ({threads} threads; decode and encode "
        "overlap render on helper threads)",
        cfg.renderer.batch_size,
        runs["fp32"],
    )
    int8_fps = add(
        f"RenderWorker.render_segment in this process, renderer.precision=int8"
        f"{' + torch.compile' if args.compile else ''} ({threads} threads)",
        args.cpu_batch,
        runs["int8"],
    )

    # ours, the product: campaign on a local Ray, renderer=wav2lip detector=box
    ray_session(args.session_cpus or 2)
    manifest = ctx.inputs.manifest("wav2lip", [audio], avatar)
    cfg_run = config(manifest, os.path.join(work, "campaign"), *overrides)
    summary, wall, _, _ = run_campaign(cfg_run)
    campaign_fps = add(
        f"campaign.run, defaults (precision {'auto'}, batch auto), local Ray, 1 actor × "
        f"{threads} threads (incl. actor start + model load, prepare, stitch)",
        "auto",
        [(wall, {}, summary.rows[0].frames)],
    )
    ctx.report.targets["wav2lip"] = (naive_fps, max(segment_fps, int8_fps), campaign_fps)
    title = (
        f"2. Wav2Lip, fixed box: naive loop vs batched path ({info.width}×{info.height} avatar, {seconds:g} s "
        f"audio = {n} frames, {'CUDA' if torch.cuda.is_available() and args.device != 'cpu' else 'CPU'})"
    )
    notes = (
        f"Same recipe weights, same frames, same box {box}, same feather paste and encoder. The two in-process "
        f"paths ran interleaved {max(1, args.repeats)}× (seconds of each run listed; the best counts); model load "
        "and one warm-up frame are untimed there, the campaign row (one run) includes them. The naive loop's "
        "mel features are computed once up front, as the official script does. Stage seconds of the segment "
        "path overlap (helper threads), so they can add up to more than its wall time. Load average "
        f"{load_start} before, {load_average()} after. Target ≥ 3× the naive loop: "
        f"**{segment_fps / naive_fps:.2f}×** (segment path, fp32), **{int8_fps / naive_fps:.2f}×** (segment path, "
        f"int8), **{campaign_fps / naive_fps:.2f}×** (campaign, defaults). int8 stays ~43 dB from fp32 in the "
        "mouth region on these weights (tests/test_wav2lip_precision.py)."
    )
    ctx.report.emit(
        title,
        table(
            [
                "path",
                "batch",
                "frames",
                "best s",
                "runs s",
                "frames/s",
                "vs naive",
                "audio s",
                "decode s",
                "render s",
                "encode s",
            ],
            rows,
            right=range(1, 11),
        ),
        notes,
    )


# --------------------------------------------------------------------------------------- 3. rss
def bench_rss(ctx: Context) -> None:
    args = ctx.args
    avatar = ctx.inputs.small_avatar(args.rss_width, 10.0)
    results = []
    rows = []
    for minutes, seed in ((args.short_audio_minutes, 31), (args.long_audio_minutes, 32)):
        audio = ctx.inputs.audio(60.0 * minutes, seed=seed)
        work = ctx.dir(f"rss-{minutes:g}")
        ray_session(args.session_cpus or 2, fresh=not args.quick)  # fresh actor processes, nothing before them
        manifest = ctx.inputs.manifest(f"rss-{minutes:g}", [audio], avatar)
        cfg = config(manifest, os.path.join(work, "out"), "cluster.actors=1")
        summary, wall, sampler, _ = run_campaign(cfg)
        result = summary.rows[0]
        peak = sampler.peak_hwm("RenderWorker")
        results.append(peak)
        rows.append(
            [
                f"{minutes:g} min",
                result.frames,
                result.segments,
                f"{wall:,.1f}",
                f1(rate(result.frames, wall)),
                mib(peak),
                sampler.timeline(),
                *rss_columns(sampler),
            ]
        )
    ratio = results[1] / results[0] if all(results) else float("nan")
    ctx.report.targets["rss"] = (results[0], results[1], ratio, args.short_audio_minutes, args.long_audio_minutes)
    cfg = config("m", "o")
    title = (
        f"3. Renderer actor peak RSS, {args.short_audio_minutes:g} min vs {args.long_audio_minutes:g} min of "
        f"audio (classic, {args.rss_width} px wide avatar, 1 actor)"
    )
    notes = (
        f"actor VmHWM: the actor process's peak resident set (the kernel's high-water mark in /proc/<pid>/status, "
        "which only grows; polled every 0.2 s until the actor is killed at the end of the campaign, so it covers "
        "model load, every segment and idle time). Each campaign runs on a fresh local Ray, so the actor process "
        'is new. The other columns are peaks of VmRSS sampled every 0.2 s; "by quarter" is the actor\'s highest '
        "VmRSS in each quarter of the time it was alive (flat = bounded, rising = grows with length). Segments of "
        f"{cfg.render.segment_seconds:g} s, renderer batch {cfg.renderer.batch_size}. Target ≤ 1.2×: "
        f"**{ratio:.3f}×** ({mib(results[1])} vs {mib(results[0])} MiB)."
    )
    ctx.report.emit(
        title,
        table(
            [
                "audio",
                "frames",
                "segments",
                "wall s",
                "frames/s",
                "actor VmHWM MiB",
                "actor VmRSS by quarter of the run, MiB",
                *[f"sampled {h}" for h in RSS_HEADERS],
            ],
            rows,
            right=range(1, 12),
        ),
        notes,
    )


# --------------------------------------------------------------------------------------- 4. second campaign
def bench_second(ctx: Context) -> None:
    args = ctx.args
    height = args.avatar_height[0]
    avatar, _ = ctx.inputs.stage_avatar(height, args.avatar_seconds)
    audio = ctx.inputs.audio(args.second_audio_seconds, seed=41)
    work = ctx.dir("second")
    cache = os.path.join(work, "cache")
    ray_session(args.session_cpus or 2)
    manifest = ctx.inputs.manifest("second", [audio], avatar)
    rows, detect = [], []
    for name in ("first", "second"):
        cfg = config(manifest, os.path.join(work, f"out-{name}"), f"cache={cache}", "cluster.actors=1")
        summary, wall, _, job = run_campaign(cfg, timed=True)
        seconds = job.avatar_seconds[0] if job is not None and job.avatar_seconds else float("nan")
        detect.append(seconds)
        frames = summary.rows[0].frames
        rows.append(
            [
                f"{name} campaign",
                "empty" if name == "first" else "shared with the first",
                f"{seconds:,.3f}",
                f"{wall:,.1f}",
                frames,
                f1(rate(frames, wall)),
            ]
        )
        del job
    ctx.report.targets["second"] = tuple(detect)
    title = f"4. A second campaign over an already-seen avatar ({height}p, {args.avatar_seconds:g} s clip, haar)"
    notes = (
        "prepare_avatar s: the campaign's avatar task (content fingerprint, probe, decode + detect + track, or the "
        "cached track), timed inside the task. Outputs differ, the cache (`cache=`) is shared, so the second "
        f"campaign renders again but detects nothing: **{f2(detect[0])} s → {f2(detect[1])} s**."
    )
    ctx.report.emit(
        title,
        table(["run", "cache", "prepare_avatar s", "campaign wall s", "frames", "frames/s"], rows, right=(2, 3, 4, 5)),
        notes,
    )


# --------------------------------------------------------------------------------------- 5. scaling
def bench_scaling(ctx: Context) -> None:
    args = ctx.args
    height = args.avatar_height[0]
    avatar, _ = ctx.inputs.stage_avatar(height, args.avatar_seconds)
    audios = [ctx.inputs.audio(args.scaling_audio_seconds, seed=50 + i) for i in range(args.scaling_rows)]
    work = ctx.dir("scaling")
    cache = os.path.join(work, "cache")
    counts = sorted(set(args.scaling_actors))
    ray_session(args.session_cpus or max(counts) + 1)
    manifest = ctx.inputs.manifest("scaling", audios, avatar)
    base = [
        f"cache={cache}",
        "cluster.actor.num_cpus=1",
        "cluster.actor.threads=1",
        f"render.segment_seconds={args.scaling_segment_seconds}",
    ]
    warm = config(manifest, os.path.join(work, "warm"), *base)
    prepare_avatar(avatar, None, warm.detector, cache, warm.render.still_fps)  # tracks and PCM cached before timing
    for audio in audios:
        prepare_audio(audio, cache)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows, fps_by = [], {}
    for pinned in (False, True):
        series: dict[int, float] = {}
        for n in counts:
            cfg = config(
                manifest,
                os.path.join(work, f"out-{n}-{pinned}"),
                *base,
                f"cluster.actors={n}",
                f"cluster.actor.pin_cpus={str(pinned).lower()}",
            )
            summary, wall, cpu, job = run_campaign(cfg, timed=True, sampler=CpuSampler())
            job.wait_for_actors_to_exit()
            own_cores = sum(1 for info in job.workers.values() if info.cores is not None)
            frames = sum(r.frames or 0 for r in summary.rows)
            series[n] = rate(frames, wall)
            start = job.actor_start_seconds if job.actor_start_seconds is not None else float("nan")
            segments = sum(r.segments or 0 for r in summary.rows)
            rows.append(
                [
                    n,
                    "yes" if pinned else "no",
                    "yes" if n <= cores else "no",
                    len(summary.rows),
                    segments,
                    frames,
                    f"{wall:,.1f}",
                    f"{start:,.1f}",
                    f1(series[n]),
                    f1(rate(frames, wall - start)),
                    own_cores,
                    *(f2(cpu.cores(part)) for part in CPU_PARTS),
                ]
            )
        one, prev = series[counts[0]], None
        for r, n in zip(rows[-len(counts) :], counts):
            speedup = series[n] / one if one else float("nan")
            gain = "—" if prev is None else f"{(series[n] - series[prev]) / (n - prev) / one:+.2f}"
            r += [f"{speedup:.2f}×", f"{speedup / (n / counts[0]):.0%}", gain]
            prev = n
        fps_by[pinned] = series
    ctx.report.targets["scaling"] = (fps_by, cores)
    title = (
        f"5. Scaling: classic renderer, {height}p avatar, {len(audios)} rows × {args.scaling_audio_seconds:g} s, "
        f"{args.scaling_segment_seconds:g} s segments, 1 CPU + 1 thread per actor, unpinned and pinned"
    )
    notes = (
        f"Local Ray with {max(counts) + 1 if not args.session_cpus else args.session_cpus} logical CPUs so every "
        f'actor count can start and prepare/stitch tasks still run; this process may use {cores} cores ("cores '
        'allow": actors ≤ cores), so larger counts measure oversubscription, not added hardware. Unpinned, an '
        "actor's decode and encode helper threads can overlap its render on other cores, so an actor may use "
        "more than its one CPU; pinned (`cluster.actor.pin_cpus=true`), each actor owns one core and cannot, so "
        "the pinned series shows what an added actor adds while cores remain (actors beyond the cores find none "
        "free and run unpinned). Wall time is campaign.run (actor start included), avatar track and audio PCM "
        'already cached; "first actor ready s" is the part of it before any actor could render (Ray worker start, '
        'imports, renderer load), a fixed cost that longer campaigns amortise, and "frames/s after start" leaves '
        "it out. Speedup, efficiency and gain use the whole wall time. Efficiency = speedup ÷ actors; gain per added actor = extra frames/s per added actor, "
        'in units of one actor\'s frames/s (target ≥ 0.8 while cores allow). "cores: ..." columns: average cores '
        "kept busy during the run (from /proc each second) by the renderer actors, by the rest of this benchmark's "
        "process tree (driver, Ray's daemons, prepare and stitch tasks), and by everything else on the machine "
        "(kernel threads such as memory reclaim, host agents): an added actor can only use what these leave."
    )
    ctx.report.emit(
        title,
        table(
            [
                "actors",
                "pinned",
                "cores allow",
                "rows",
                "segments",
                "frames",
                "wall s",
                "first actor ready s",
                "frames/s",
                "frames/s after start",
                "actors on own cores",
                *(f"cores: {part}" for part in CPU_PARTS),
                "speedup",
                "efficiency",
                "gain per added actor",
            ],
            rows,
            right=(0, *range(3, 17)),
        ),
        notes,
    )


# --------------------------------------------------------------------------------------- 6. node
def bench_node(ctx: Context) -> None:
    """The H100 target as a campaign: one node, Wav2Lip, a long 1080p25 avatar with as much audio,
    face track already cached; the whole campaign (actor start, audio, render, stitch, upload) timed."""
    import torch

    args = ctx.args
    seconds = 60.0 * args.node_minutes
    avatar, made = ctx.inputs.stage_avatar(args.node_height, seconds)
    audio = ctx.inputs.audio(seconds, seed=61)
    checkpoint = ctx.inputs.checkpoint()
    work = ctx.dir("node")
    cache = os.path.join(work, "cache")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    cores = os.cpu_count() or 1
    ray_session(args.session_cpus or cores, fresh=not args.quick)
    overrides = [
        f"cache={cache}",
        "renderer=wav2lip",
        f"renderer.checkpoint={checkpoint}",
        f"renderer.device={'cuda' if cuda else 'cpu'}",
        f"detector.stride={args.node_detect_stride}",
        f"render.segment_seconds={args.node_segment_seconds}",
    ]
    if cuda:  # the cluster=gpu actor shape, on a local Ray that holds this machine's GPUs
        gpu = config("m", "o", "cluster=gpu").cluster.actor
        overrides += [
            "renderer.precision=fp16",
            f"cluster.actor.num_cpus={gpu.num_cpus}",
            f"cluster.actor.num_gpus={gpu.num_gpus}",
        ]
    else:  # the local default actors (1 CPU each), at the CPU's default precision and CPU-sized batches
        overrides += [f"renderer.batch_size={args.cpu_batch}"]
    manifest = ctx.inputs.manifest("node", [audio], avatar)
    cfg = config(manifest, os.path.join(work, "out"), *overrides)
    start = time.perf_counter()
    track = prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)  # the cached face track
    tracked = time.perf_counter() - start
    from heygem_ray.executors.ray_cluster import actor_count

    actors = actor_count(cfg)
    summary, wall, sampler, job = run_campaign(cfg, timed=True)
    cached = job.avatar_seconds[0] if job is not None and job.avatar_seconds else float("nan")
    result = summary.rows[0]
    fps = rate(result.frames, wall)
    target_s = seconds * 15.0 / 180.0  # the 15 s for 3 minutes, scaled to this run's length
    ctx.report.targets["node"] = (device, result.frames, wall, target_s, cuda)
    rows = [
        [
            f"{track.info.width}×{track.info.height}",
            f"{args.node_minutes:g} min",
            result.frames,
            result.segments,
            actors,
            f"{tracked:,.2f}",
            f"{cached:,.3f}",
            f"{wall:,.1f}",
            f1(fps),
            f"{result.audio_seconds / wall:.1f}×",
            f"{target_s:g}",
            mib(sampler.peak_hwm()),
            rss_columns(sampler)[-1],
        ]
    ]
    title = (
        f"6. One node, Wav2Lip, cached face track: {args.node_minutes:g} min {args.node_height}p25 avatar + "
        f"{args.node_minutes:g} min audio, on {device}"
    )
    notes = (
        f"`campaign.run` on a local Ray holding this machine ({cores} cores{', ' + device if cuda else ''}): "
        f"{actors} actor(s) of {cfg.cluster.actor.num_cpus:g} CPUs + {cfg.cluster.actor.num_gpus:g} GPU, "
        f"renderer.precision={cfg.renderer.precision}, batch {cfg.renderer.batch_size}, "
        f"{args.node_segment_seconds:g} s segments, encoder {in_process(cfg).encoder.codec} "
        f"{cfg.encoder.preset} crf {cfg.encoder.crf}. Wall time covers the whole campaign (actor start and "
        "model load, audio decode, rendering, stitch with AAC, publish); the face track was built before it "
        f'(detector stride {args.node_detect_stride}, "track s", not counted), as for an avatar seen before, so '
        f"the campaign's prepare_avatar only loads it. Avatar generation ({made:.1f} s) is not counted. Target: "
        f"≤ {target_s:g} s (≥ 300 frames/s; the issue's 15 s for 3 minutes on one H100 node with 16 cores)."
    )
    ctx.report.emit(
        title,
        table(
            [
                "avatar",
                "audio",
                "frames",
                "segments",
                "actors",
                "track s (before)",
                "prepare_avatar s",
                "wall s",
                "frames/s",
                "× realtime",
                "target s",
                "actor VmHWM MiB",
                "driver MiB",
            ],
            rows,
            right=range(2, 13),
        ),
        notes,
    )


# --------------------------------------------------------------------------------------- targets + main
def target_summary(report: Report, args: argparse.Namespace) -> str:
    t = report.targets
    rows = []
    if "defaults" in t:
        one, many, count, first = t["defaults"]
        rows.append(
            [
                "CPU defaults, whole command, one row ≥ 1.5× the naive loop per video",
                f"{one:.2f}×",
                "met" if one >= 1.5 else "not met",
            ]
        )
        rows.append(
            [
                f"CPU defaults, whole command, {count} rows ≥ 3× the naive loop per video",
                f"{many:.2f}×",
                "met" if many >= 3 else "not met",
            ]
        )
        if first is not None:
            rows.append(["start-up (launch → first frames rendered), one row", f"{first:.1f} s", "see the breakdown"])
    if "wav2lip" in t:
        naive, segment, campaign_fps = t["wav2lip"]
        best = max(segment, campaign_fps) / naive
        rows.append(
            [
                "Wav2Lip fixed box ≥ 3× a naive one-process loop",
                (
                    f"{naive:.1f} → {segment:.1f} (best segment path) / {campaign_fps:.1f} (campaign, defaults) frames/s = "
                    f"{segment / naive:.2f}× / {campaign_fps / naive:.2f}×"
                ),
                "met" if best >= 3 else "not met on this machine",
            ]
        )
    if "rss" in t:
        short, long, ratio, sm, lm = t["rss"]
        rows.append(
            [
                f"actor peak RSS at {lm:g} min ≤ 1.2× at {sm:g} min",
                f"{mib(long)} vs {mib(short)} MiB = {ratio:.3f}×",
                "met" if ratio <= 1.2 else "not met",
            ]
        )
    if "second" in t:
        first, second = t["second"]
        rows.append(
            [
                "second campaign on a seen avatar detects nothing",
                f"prepare_avatar {first:.2f} s → {second:.3f} s",
                "met" if second < max(0.5, 0.1 * first) else "not met",
            ]
        )
    for height, realtime, fps in t.get("realtime", []):
        rows.append(
            [
                f"end to end, {height}p, classic (reported, no target)",
                f"{fps:.1f} frames/s, {realtime:.2f}× realtime",
                "—",
            ]
        )
    if "scaling" in t:
        fps_by, cores = t["scaling"]
        texts = []
        for pinned, series in sorted(fps_by.items()):
            texts.append(
                ("pinned " if pinned else "unpinned ") + ", ".join(f"{n}: {v:.1f}" for n, v in sorted(series.items()))
            )
        allowed = sorted(n for n in fps_by[True] if n <= cores)
        pinned = fps_by[True]
        gains = [(pinned[b] - pinned[a]) / (b - a) / pinned[allowed[0]] for a, b in itertools.pairwise(allowed)]
        if gains:
            status = f"{'met' if min(gains) >= 0.8 else 'not met'} (pinned, up to {allowed[-1]} actors)"
        else:
            status = "not measurable: only one actor count fits the cores"
        measured = "frames/s by actors: " + "; ".join(texts)
        if gains:
            measured += "; pinned gain per added actor " + ", ".join(f"{g:+.2f}" for g in gains)
        rows.append(["actors scale ≥ 0.8 per added actor while cores allow", measured, status])
    if "node" in t:
        device, frames, wall, target_s, cuda = t["node"]
        status = (
            ("met" if wall <= target_s else "not met") if cuda else "reference only: the target is for an H100 node"
        )
        measured = f"{frames} frames in {wall:,.1f} s = {rate(frames, wall):.1f} frames/s on {device}"
        rows.append([f"one node, Wav2Lip, cached track, ≤ {target_s:g} s", measured, status])
    return table(["target", "measured", "status"], rows) if rows else ""


def append_results(
    path: Path, command: str, machine: str, load: tuple[str, str], sections: list[str], targets: str
) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"\n### {stamp} — `{command}`\n\nMachine: {machine}. Load average (1/5/15 min) at start {load[0]}, at end "
        f"{load[1]}: the machine was shared with other work, treat figures as ±20 %.\n\n"
    )
    if targets:
        block += "#### Targets\n\n" + targets + "\n\n"
    block += "\n".join(sections)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    at = text.find("\n" + HEADING + "\n")
    if at < 0:
        text = (
            text.rstrip("\n")
            + f"\n\n{HEADING}\n\nFrom `python -m benchmarks.run` (see its docstring). Newest run last.\n"
            + block
        )
    else:
        nxt = text.find("\n## ", at + len(HEADING) + 2)
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n" + block + ("\n" + text[end:].lstrip("\n") if nxt >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="measurements to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the runner (figures meaningless)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    p.add_argument("--results", default=str(RESULTS), help="markdown file to append to")
    p.add_argument("--defaults-rows", type=int, default=4, help="rows of the defaults campaign")
    p.add_argument("--defaults-audio-seconds", type=float, default=12.0, help="audio per row in `defaults`")
    p.add_argument("--defaults-height", type=int, default=720, help="height of the still in `defaults`")
    p.add_argument(
        "--defaults-official",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the official batch-128 flow per video in `defaults`",
    )
    p.add_argument(
        "--defaults-inline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time `cluster=inline` (no Ray) in `defaults`",
    )
    p.add_argument("--avatar-height", type=int, nargs="+", default=[720], help="stage avatar heights, e.g. 720 1080")
    p.add_argument("--avatar-seconds", type=float, default=10.0, help="stage avatar clip length")
    p.add_argument("--audio-seconds", type=float, default=30.0, help="stage/end-to-end audio length")
    p.add_argument("--wav2lip-width", type=int, default=256, help="avatar width for the Wav2Lip comparison")
    p.add_argument("--wav2lip-audio-seconds", type=float, default=15.0)
    p.add_argument(
        "--cpu-batch",
        type=int,
        default=8,
        help="renderer.batch_size of the int8 rows and CPU node runs (8 suits CPU caches; GPUs want 128)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add renderer.compile=true to the int8 rows (int8 stays eager and says so; for trying compile elsewhere)",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs of the naive and segment paths (best counts)"
    )
    p.add_argument("--wav2lip-stage-frames", type=int, default=32, help="frames for the Wav2Lip split in `stages`")
    p.add_argument("--short-audio-minutes", type=float, default=1.0)
    p.add_argument("--long-audio-minutes", type=float, default=10.0)
    p.add_argument("--rss-width", type=int, default=256, help="avatar width for the RSS campaigns")
    p.add_argument("--second-audio-seconds", type=float, default=10.0)
    p.add_argument("--scaling-actors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--scaling-rows", type=int, default=8)
    p.add_argument("--scaling-audio-seconds", type=float, default=30.0)
    p.add_argument("--scaling-segment-seconds", type=float, default=5.0)
    p.add_argument("--node-minutes", type=float, default=3.0, help="avatar and audio length of the one-node run")
    p.add_argument("--node-height", type=int, default=1080, help="avatar height of the one-node run")
    p.add_argument("--node-segment-seconds", type=float, default=5.0)
    p.add_argument("--node-detect-stride", type=int, default=10, help="detector.stride of the (untimed) face track")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch/x264 threads in the Wav2Lip comparison"
    )
    p.add_argument("--device", default="auto", help="Wav2Lip device: auto | cpu | cuda")
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    args.session_cpus = None
    if args.quick:  # one Ray session for everything, tiny inputs
        args.defaults_rows, args.defaults_audio_seconds, args.defaults_height = 2, 1.0, 360
        args.defaults_official = False
        args.avatar_height, args.avatar_seconds, args.audio_seconds = [360], 1.0, 2.0
        args.wav2lip_width, args.wav2lip_audio_seconds, args.wav2lip_stage_frames = 160, 0.4, 4
        args.short_audio_minutes, args.long_audio_minutes, args.rss_width = 0.05, 0.1, 128
        args.second_audio_seconds = 1.0
        args.scaling_actors, args.scaling_rows, args.scaling_audio_seconds, args.scaling_segment_seconds = (
            [1, 2],
            2,
            1.0,
            0.5,
        )
        args.node_minutes, args.node_height = 0.05, 360
        args.session_cpus = 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = machine_line()
    load_start = load_average()
    print(
        f"heygem_ray pipeline benchmarks: {command.strip()}\nMachine: {machine}; load average {load_start}", flush=True
    )
    work = args.workdir or tempfile.mkdtemp(prefix="heygem-bench-")
    ctx = Context(args, Inputs(os.path.join(work, "inputs")), work, Report())
    failed = []
    steps: list[tuple[str, Callable[[], None]]] = []
    if "stages" in args.only:
        steps += [(f"stages {h}p", lambda h=h: bench_stages(ctx, h)) for h in args.avatar_height]
    if "defaults" in args.only:
        steps.insert(0, ("defaults", lambda: bench_defaults(ctx)))
    steps += [
        (name, lambda fn=fn: fn(ctx))
        for name, fn in (
            ("wav2lip", bench_wav2lip),
            ("rss", bench_rss),
            ("second", bench_second),
            ("scaling", bench_scaling),
            ("node", bench_node),
        )
        if name in args.only
    ]
    try:
        for name, step in steps:
            start = time.perf_counter()
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one broken measurement must not hide the others
                traceback.print_exc()
                failed.append(name)
                ctx.report.sections.append(f"#### {name}: failed\n\n`{type(exc).__name__}: {exc}`\n")
            print(f"({name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    targets = target_summary(ctx.report, args)
    if targets:
        print("\n#### Targets\n\n" + targets, flush=True)
    if not args.no_append and ctx.report.sections:
        append_results(
            Path(args.results), command.strip(), machine, (load_start, load_average()), ctx.report.sections, targets
        )
        print(f"\nappended to {args.results}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
