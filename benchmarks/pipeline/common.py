"""Shared helpers of the pipeline benchmarks (`python -m benchmarks.run`, one module per measurement
beside this one): markdown output (table, f1/f2/mib/rate, Report, append_results), the machine line and
load average, the /proc + psutil samplers (Poller, RssSampler, CpuSampler), the synthetic Inputs, the
Context every measurement gets, the local Ray session, the campaign config as the CLI composes it, timed
campaigns, the actor's segment path in this process, and timed whole commands (timed_command,
startup_steps)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import math
import os
import shlex
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import psutil
import ray

from heygem_ray import demo, storage
from heygem_ray.campaign import Campaign
from heygem_ray.executors.ray_cluster import RayExecutor
from heygem_ray.media.yuv import bgr_to_i420
from heygem_ray.prepare import prepare_avatar

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HEADING = "## Pipeline (issue 6)"
FPS = 25
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


SESSION: dict[str, int | None] = {"cpus": None}


def ray_session(cpus: int, fresh: bool = False) -> None:
    """A local Ray with `cpus` logical CPUs; restarted when the CPU count differs or `fresh`."""
    if ray.is_initialized() and (fresh or SESSION["cpus"] != cpus):
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        SESSION["cpus"] = cpus


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
        self.started = time.monotonic()  # as the pool's `first_ready_at`

    def run(self) -> Any:
        self.started = time.monotonic()  # as the pool's `first_ready_at`
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


# --------------------------------------------------------------------------------------- commands
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


# --------------------------------------------------------------------------------------- RESULTS.md
def append_results(
    path: Path, command: str, machine: str, load: tuple[str, str], sections: list[str], targets: str
) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
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
