"""Step (c): the one-node target without Ray: a 3-minute 1080p25 avatar + 3 minutes of audio through
Wav2Lip to a finished mp4, face track cached; target ≤ 15 s from start to the published mp4.

    python -m benchmarks.gpu.node --out DIR [--dry-run] [--variants 7x2 15x1] [--precision bf16]

Ray's wheel does not fit the device tool's 64 MiB carry limit, so this runs the campaign's stages
in plain processes: N worker processes (multiprocessing spawn), each holding one
`heygem_ray.segment.RenderWorker` (model loaded once, `cluster.actor.num_cpus` = its threads, the
GPU shared), pull the row's segments from one queue as they free up; this process prepares the
audio (`prepare_audio`) and loads the cached face track (`prepare_avatar`) while they load, then
encodes the audio track (`prepare_audio_track`) while they render, then joins the segments and the
track with `heygem_ray.stitch.stitch_row` (packet copy, moov first, marker, thumbnail). Wall
time runs from before the workers are spawned to the published mp4: process start, imports and
model load included. Input generation and the face track (detector=box, a fixed box as a cached
track would give) are done before the clock starts and reported apart.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import resource
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu import common

FPS = 25
GOP = 50  # keyframe every 2 s, as a camera file has (x264's default is 250)
TARGET_SECONDS_PER_3_MIN = 15.0
_CHUNK = 64  # frames composed ahead of the encoder


# --------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Inputs:
    avatar: str
    audio: str
    checkpoint: str
    box: tuple[int, int, int, int]
    seconds: float
    width: int
    height: int
    generate_s: float


def make_avatar(path: Path, seconds: float, height: int, threads: int) -> tuple[tuple[int, int, int, int], int]:
    """A 16:9 H.264 clip (GOP of GOP frames) of the demo stage (`heygem_ray.demo.Stage`: the
    portrait at 90 % of the height, swaying on a grey ramp); frames are composed on `threads`
    threads while x264 encodes. Returns the face box and the width."""
    import av

    from heygem_ray import demo
    from heygem_ray.media.yuv import bgr_to_i420

    stage = demo.Stage.of_height(height)
    height, width = stage.canvas.shape[:2]

    def compose(i: int) -> np.ndarray:
        return bgr_to_i420(stage.frame(i / FPS))

    count = int(round(seconds * FPS))
    with av.open(str(path), "w") as container, ThreadPoolExecutor(max(1, threads)) as pool:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = GOP
        stream.options = {"crf": "18", "preset": "veryfast"}
        ahead = pool.map(compose, range(min(_CHUNK, count)))
        for lo in range(0, count, _CHUNK):
            frames = list(ahead)
            nxt = lo + _CHUNK
            ahead = pool.map(compose, range(nxt, min(nxt + _CHUNK, count)))  # composed while this chunk encodes
            for k, i420 in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(i420, format="yuv420p")
                frame.pts = lo + k
                container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    x1, y1, x2, y2 = stage.face_box()
    return (x1, y1, x2, y2), width


def make_inputs(work: Path, seconds: float, height: int, threads: int) -> Inputs:
    from heygem_ray import demo

    start = time.perf_counter()
    avatar, audio = work / f"avatar-{height}p-{seconds:g}s.mp4", work / f"speech-{seconds:g}s.wav"
    box, width = make_avatar(avatar, seconds, height, threads)
    demo.write_wav(str(audio), demo.speech_like(seconds, seed=61))
    checkpoint = common.wav2lip_checkpoint(work / "wav2lip_recipe.pth")
    return Inputs(
        str(avatar), str(audio), checkpoint, box, seconds, width, height, round(time.perf_counter() - start, 2)
    )


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Variant:
    """One timed run's shape: processes × threads, and what it changes from the defaults."""

    procs: int
    threads: int
    preset: str | None = None  # x264 preset (x264_params then ""); None: the encoder's defaults
    segment_seconds: float | None = None  # None: the step's --segment-seconds
    decode: str | None = None  # decoder.device; None: its default (auto: NVDEC where CUDA is)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """'15x1', or with changes: '15x1,preset=veryfast,segment=2.5,decode=cpu'."""
        shape, *changes = spec.lower().split(",")
        procs, threads = (int(x) for x in shape.split("x"))
        options = dict(change.split("=", 1) for change in changes)
        unknown = set(options) - {"preset", "segment", "decode"}
        if unknown:
            raise ValueError(f"variant {spec!r}: unknown {sorted(unknown)} (preset=, segment=, decode=)")
        segment = options.get("segment")
        return cls(procs, threads, options.get("preset"), float(segment) if segment else None, options.get("decode"))

    @property
    def name(self) -> str:
        name = f"{self.procs}x{self.threads}"
        if self.preset:
            name += f",preset={self.preset}"
        if self.segment_seconds:
            name += f",segment={self.segment_seconds:g}"
        if self.decode:
            name += f",decode={self.decode}"
        return name


def node_config(
    inputs: Inputs, root: Path, variant: Variant, precision: str, segment_seconds: float, device: str
) -> Any:
    """The campaign config of this run, from the product's dataclasses, every speed option named."""
    from heygem_ray.config import (
        ActorConfig,
        ClusterConfig,
        Config,
        DecoderConfig,
        DetectorConfig,
        EncoderConfig,
        RenderConfig,
        Wav2LipRendererConfig,
    )
    from heygem_ray.media.video import auto_codec

    renderer = Wav2LipRendererConfig(checkpoint=inputs.checkpoint, precision=precision, device=device, image_ops="auto")
    return Config(
        manifest=str(root / "no-manifest.parquet"),
        output=str(root / "out"),
        cache=str(root / "cache"),
        renderer=renderer,
        detector=DetectorConfig(name="box", box=list(inputs.box)),
        cluster=ClusterConfig(actor=ActorConfig(num_cpus=float(variant.threads), threads=variant.threads)),
        # codec: what `auto` decides here (libx264 without NVENC); a named preset as x264 defines it
        encoder=EncoderConfig(
            codec=auto_codec(), **({"preset": variant.preset, "x264_params": ""} if variant.preset else {})
        ),
        decoder=DecoderConfig(**({"device": variant.decode} if variant.decode else {})),
        render=RenderConfig(segment_seconds=variant.segment_seconds or segment_seconds, progress=False),
    )


# --------------------------------------------------------------------------------------- workers
def _worker_main(cfg: Any, jobs: Any, results: Any) -> None:
    """One renderer process: a RenderWorker, then segments from `jobs` until None arrives."""
    pid = os.getpid()
    try:
        from heygem_ray.segment import RenderWorker

        worker = RenderWorker(cfg)
        ray_imported = "ray" in sys.modules  # before the probe below, which imports Ray where it is installed
        results.put(
            (
                "ready",
                pid,
                {
                    "at": time.time(),
                    "info": worker.ready(),
                    "batch_size": worker.renderer.batch_size,
                    "precision": getattr(worker.renderer, "precision", cfg.renderer.precision),
                    "ray_imported": ray_imported,
                    "cuda_sync": common.context_sync(),
                },
            )
        )
        while (job := jobs.get()) is not None:
            segment = worker.render_segment(job)
            results.put(("done", pid, {"at": time.time(), "result": segment, **_gpu_memory_mib()}))
    except BaseException:  # noqa: BLE001 - the parent reports it and stops the run
        results.put(("error", pid, traceback.format_exc()[-4000:]))


def _gpu_memory_mib() -> dict[str, float | None]:
    """This process's peak of torch's allocations, and the memory in use on its GPU (every process's:
    contexts, NVDEC's buffers and torch's cache included), in MiB; None without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"gpu_mib": None, "device_used_mib": None}
    free, total = torch.cuda.mem_get_info()
    return {
        "gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "device_used_mib": round((total - free) / 2**20, 1),
    }


class WorkerPool:
    """N spawned processes sharing one job queue: each takes the next segment when it is free."""

    def __init__(self, cfg: Any, procs: int):
        ctx = multiprocessing.get_context("spawn")
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker_main, args=(cfg, self.jobs, self.results), daemon=True) for _ in range(procs)
        ]
        self.ready: dict[int, dict[str, Any]] = {}
        self.done: list[tuple[int, dict[str, Any]]] = []

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def wait(self, count: int, timeout: float) -> None:
        """Wait until `count` queued jobs are done (and every worker has said it is ready)."""
        deadline = time.monotonic() + timeout
        while len(self.done) < count or len(self.ready) < len(self.procs):
            try:
                kind, pid, payload = self.results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self.done)} of {count} segments done in {timeout:.0f} s") from None
                # workers leave only when close() tells them: one that is gone crashed (its segment with it)
                dead = {p.pid: p.exitcode for p in self.procs if p.exitcode is not None}
                if dead:
                    raise RuntimeError(f"worker processes exited while rendering (pid: exit code): {dead}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"worker {pid} failed:\n{payload}")
            if kind == "ready":
                self.ready[pid] = payload
            else:
                self.done.append((pid, payload))

    def close(self, finished: bool = True) -> None:
        """Let the workers go: told to stop once every job is done; stopped at once after a failure
        (jobs still queued would each be rendered first, past the step's budget)."""
        if finished:
            for _ in self.procs:
                self.jobs.put(None)
        else:
            # the jobs left in the queue would keep its feeder thread, and this process, from exiting
            self.jobs.cancel_join_thread()
            for p in self.procs:
                p.terminate()
        # one deadline for them all: waited for one at a time, 15 stuck workers took minutes
        deadline = time.monotonic() + (20 if finished else 5)
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [p for p in self.procs if p.is_alive()]
        for p in stuck:
            p.kill()
        deadline = time.monotonic() + 10  # one stuck in the GPU driver outlives SIGKILL: the figures still go out
        for p in stuck:
            p.join(timeout=max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------- one run
def run_variant(
    inputs: Inputs,
    root: Path,
    variant: Variant,
    precision: str,
    segment_seconds: float,
    device: str,
    timeout: float,
) -> dict[str, Any]:
    """One timed run: spawn → prepare → render every segment → stitch → published mp4."""
    from heygem_ray import storage
    from heygem_ray.manifest import Row
    from heygem_ray.prepare import prepare_audio, prepare_audio_track, prepare_avatar
    from heygem_ray.rows import RowState
    from heygem_ray.stitch import stitch_row

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = node_config(inputs, root, variant, precision, segment_seconds, device)
    procs, threads = variant.procs, variant.threads
    shown = (cfg.render.still_fps, cfg.render.max_fps, cfg.render.max_side)  # the frames a campaign renders
    t = time.perf_counter()
    prepare_avatar(inputs.avatar, None, cfg.detector, cfg.cache_uri, *shown)  # the cached track
    track_s = time.perf_counter() - t
    marks: dict[str, float] = {}
    cpu0 = _cpu_seconds()
    start, wall0 = time.perf_counter(), time.time()
    pool = WorkerPool(cfg, procs)
    try:
        pool.start()
        marks["spawned"] = time.perf_counter() - start
        audio = prepare_audio(inputs.audio, cfg.cache_uri)
        marks["audio_prepared"] = time.perf_counter() - start
        track = prepare_avatar(inputs.avatar, None, cfg.detector, cfg.cache_uri, *shown)
        marks["track_loaded"] = time.perf_counter() - start
        row = RowState.prepared(
            Row("node", inputs.audio, inputs.avatar, storage.join(cfg.output, "node.mp4")), audio, "gpu-kit"
        )
        row.plan(track, cfg.render.segment_seconds, spread=procs)  # as a campaign of one row cuts it
        jobs = [row.segment_job(i, cfg.layout, cfg.encoder.codec) for i in range(len(row.spans))]
        for job in jobs:  # queued before the audio is encoded: the campaign starts both at once
            pool.jobs.put(job)
        audio_track = prepare_audio_track(audio, cfg.cache_uri, cfg.encoder)
        marks["audio_track_encoded"] = time.perf_counter() - start
        pool.wait(len(jobs), timeout)
        marks["segments_done"] = time.perf_counter() - start
        stitched = stitch_row(row.stitch_job(cfg.layout, cfg.encoder.codec, cfg.qa, None), audio_track)
        marks["published"] = wall = time.perf_counter() - start
        # at "published", as the wall time: the workers' teardown and exit are not the row's
        cpu = _cpu_seconds() - cpu0
    finally:
        pool.close(finished="segments_done" in marks)
    return summarize(cfg, inputs, pool, jobs, stitched, marks, wall, wall0, cpu, track_s, procs, threads, root)


def _cpu_seconds() -> float:
    """CPU seconds of this process, of its children that have been waited for, and of those still
    running (psutil, on the node as here)."""
    import psutil

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    running = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # gone meanwhile: counted by RUSAGE_CHILDREN once waited for
            continue
        running += times.user + times.system
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + running


def summarize(
    cfg: Any,
    inputs: Inputs,
    pool: WorkerPool,
    jobs: list[Any],
    stitched: Any,
    marks: dict[str, float],
    wall: float,
    wall0: float,
    cpu: float,
    track_s: float,
    procs: int,
    threads: int,
    root: Path,
) -> dict[str, Any]:
    from heygem_ray import storage

    results = [payload["result"] for _, payload in pool.done]
    stages: dict[str, float] = {}
    for r in results:
        for stage, seconds in r.seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    ready_at = sorted(p["at"] - wall0 for p in pool.ready.values())
    done_at = sorted(p["at"] - wall0 for _, p in pool.done)
    first_ready = next(iter(pool.ready.values()), {})
    frames = stitched.marker.frames
    target = TARGET_SECONDS_PER_3_MIN * inputs.seconds / 180.0
    output = storage.local_path(stitched.marker.output)
    thumb = root / "out" / "_thumbs" / "node.jpg"
    return {
        "procs": procs,
        "threads": threads,
        "precision": first_ready.get("precision"),
        "batch_size": first_ready.get("batch_size"),
        "codec": cfg.encoder.codec,
        "preset": cfg.encoder.preset,
        "x264_params": cfg.encoder.x264_params,
        "decoder": first_ready["info"].decoder if first_ready else None,
        "cuda_sync": sorted({str(p.get("cuda_sync")) for p in pool.ready.values()}),
        "crf": cfg.encoder.crf,
        "segment_seconds": cfg.render.segment_seconds,
        "segments": len(jobs),
        "frames": frames,
        "audio_seconds": stitched.marker.audio_seconds,
        "wall_s": round(wall, 2),
        "frames_per_s": round(frames / wall, 1),
        "realtime": round(stitched.marker.audio_seconds / wall, 2),
        "target_s": round(target, 2),
        "met": wall <= target,
        "timeline_s": {
            **{k: round(v, 2) for k, v in marks.items()},
            "first_worker_ready": round(ready_at[0], 2) if ready_at else None,
            "last_worker_ready": round(ready_at[-1], 2) if ready_at else None,
            "first_segment_done": round(done_at[0], 2) if done_at else None,
        },
        "stitch_s": round(marks["published"] - marks["segments_done"], 2),
        "segment_stage_s": {k: round(v, 2) for k, v in sorted(stages.items())},
        "segments_per_worker": sorted(sum(1 for pid, _ in pool.done if pid == w) for w in pool.ready),
        "gpu_peak_mib_per_worker": max((p["gpu_mib"] for _, p in pool.done if p["gpu_mib"] is not None), default=None),
        # the whole GPU's use over the workers: an upper bound on what a worker holds, its context
        # and NVDEC's buffers included (the driver's reserve and any other process count too)
        "gpu_device_mib_per_worker": max(
            (round(p["device_used_mib"] / procs, 1) for _, p in pool.done if p["device_used_mib"] is not None),
            default=None,
        ),
        "cpu_cores_busy": round(cpu / wall, 2),
        "track_before_s": round(track_s, 2),
        "output_mib": round(os.path.getsize(output) / 2**20, 2) if os.path.exists(output) else None,
        "thumbnail": str(thumb) if thumb.exists() else None,
        "workers_imported_ray": any(p["ray_imported"] for p in pool.ready.values()),
    }


# --------------------------------------------------------------------------------------- step
#: seconds one run may take on a GPU (the H200 took 22–28 s): a hang leaves the step time for the next runs
RUN_TIMEOUT_S = 60.0
#: the product's `cluster=gpu` actors (conf/cluster/gpu.yaml): 2 CPUs each, a core kept for the
#: prepare and stitch tasks (`executors.ray_cluster.fit_actors`: 7 on a 16-core node)
GPU_ACTOR_CPUS, GPU_RESERVE_CPUS = 2, 1


def variants(spec: Sequence[str] | None, cores: int, dry: bool) -> list[Variant]:
    """The runs: given (see Variant.parse), or from the core count: first the product's defaults
    (`cluster=gpu`'s two-CPU actors, 10 s segments: what the target is judged on), then one
    one-thread renderer per core but one with 5 s segments (the fastest shape on the H200 node:
    7 × 2 took 28.0 s where 15 × 1 took 26.8), the same without NVDEC and with x264's veryfast
    (each saving alone)."""
    if spec:
        return [Variant.parse(s) for s in spec]
    if dry:
        return [Variant(2, 1)]
    procs = max(1, cores - 1)
    return [
        Variant(max(1, (cores - GPU_RESERVE_CPUS) // GPU_ACTOR_CPUS), GPU_ACTOR_CPUS),
        Variant(procs, 1, segment_seconds=5.0),
        Variant(procs, 1, segment_seconds=5.0, decode="cpu"),
        Variant(procs, 1, segment_seconds=5.0, preset="veryfast"),
    ]


def room_for_another(runs: Sequence[dict[str, Any]], left: float) -> bool:
    """Whether `left` seconds of the step hold one more run: like the last that finished (a hung or
    failed one took its timeout and measured nothing: by it, a hang skipped every run after)."""
    last = next((r["wall_s"] for r in reversed(runs) if "wall_s" in r), 30.0)
    return not runs or left >= 1.5 * last + 20


def body(result: common.StepResult, args: argparse.Namespace) -> None:
    import torch

    from heygem_ray.config import RenderConfig

    started = time.monotonic()
    dry = result.dry_run
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    precision = args.precision or (common.GPU_PRECISION if cuda else "fp32")
    seconds = args.seconds or (1.2 if dry else 180.0)
    height = args.height or (180 if dry else 1080)
    segment_seconds = args.segment_seconds or (0.6 if dry else RenderConfig().segment_seconds)
    runs: list[dict[str, Any]] = []
    with common.scratch(args, "node") as work:
        inputs = make_inputs(Path(work), seconds, height, cores)
        print(
            f"  inputs: {inputs.width}x{inputs.height} {seconds:g} s avatar (GOP {GOP}) + audio, face box "
            f"{inputs.box}, made in {inputs.generate_s} s (not timed)",
            flush=True,
        )
        for k, variant in enumerate(variants(args.variants, cores, dry)):
            left = args.budget - (time.monotonic() - started)
            shape = {"variant": variant.name, "procs": variant.procs, "threads": variant.threads}
            if not room_for_another(runs, left):
                runs.append({**shape, "skipped": f"{left:.0f} s of the step budget left"})
                continue
            try:
                run = {
                    **shape,
                    **run_variant(
                        inputs,
                        Path(work) / f"run-{k}",
                        variant,
                        precision,
                        segment_seconds,
                        device,
                        # on a GPU, one run that hangs (a new decoder path) leaves time for the next
                        timeout=max(30.0, min(RUN_TIMEOUT_S, left - 15) if cuda else left - 15),
                    ),
                }
            except Exception as exc:  # noqa: BLE001 - a variant that fails is recorded; the next may work
                run = {**shape, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
            runs.append(run)
            print(f"  {variant.name}: {run}", flush=True)
            # every run's figures so far, should the step be stopped at its budget (run.py reads it then)
            common.write_partial(args.out, "node", {"runs": runs})
        done = [r for r in runs if "wall_s" in r]
        best = min(done, key=lambda r: r["wall_s"]) if done else None
        # the target is the defaults' (the first run), as a user runs them; the fastest is reported beside
        default = runs[0] if runs and "wall_s" in runs[0] else None
        if best is not None and best["thumbnail"]:  # a look at what was rendered
            shutil.copy(best["thumbnail"], args.out / "node_thumbnail.jpg")
    result.figures = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "cores": cores,
        "inputs": inputs.__dict__,
        "runs": runs,
        "best": best,
        "default": default,
    }
    result.check("a finished mp4 with every planned frame", bool(done))
    if best is not None:
        result.check("renderer processes never imported Ray", not any(r["workers_imported_ray"] for r in done))
    if default is not None:
        # a target, not a check of the kit: reported either way, so a slow run is not a broken one
        result.check(
            f"one node ≤ {default['target_s']:g} s to the finished mp4, defaults (target)",
            None,
            f"≤ {default['target_s']:g} s",
            met=default["met"] if cuda else "no GPU",
            wall_s=default["wall_s"],
            variant=default["variant"],
            fastest=f"{best['variant']} {best['wall_s']:.1f} s" if best is not None else None,
        )
    result.markdown = markdown(result.figures, cuda)


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def markdown(f: dict[str, Any], cuda: bool) -> str:
    i = f["inputs"]
    rows = []
    for r in f["runs"]:
        if "wall_s" not in r:
            rows.append([r["variant"], r.get("skipped") or f"failed: {r.get('error', '')[:200]}"] + ["—"] * 9)
            continue
        tl, st = r["timeline_s"], r["segment_stage_s"]
        rows.append(
            [
                r["variant"],
                f"{r['precision']}, batch {r['batch_size']}, {r['codec']} {r['preset']}"
                + (f" ({r['x264_params']})" if r.get("x264_params") else "")
                + f", decoding {r.get('decoder')}, {r['segment_seconds']:g} s segments"
                + (f", CUDA waits {'/'.join(r['cuda_sync'])}" if r.get("cuda_sync") not in (None, ["None"]) else ""),
                r["frames"],
                r["segments"],
                f"**{r['wall_s']:.1f}**",
                f"{r['frames_per_s']:.0f}",
                f"{r['realtime']:.1f}×",
                f"{tl['first_worker_ready']} / {tl['last_worker_ready']}",
                f"{tl['audio_prepared']} / {tl['audio_track_encoded']} / {tl['segments_done']} / {r['stitch_s']}",
                " · ".join(f"{k} {v:.0f}" for k, v in st.items()),
                (
                    f"{r['cpu_cores_busy']} / {_mib(r['gpu_peak_mib_per_worker'])} "
                    f"(≤ {_mib(r.get('gpu_device_mib_per_worker'))})"
                ),
            ]
        )
    best, default = f["best"], f.get("default")
    verdict = (
        "the defaults' run did not finish"
        if default is None
        else f"defaults ({default['variant']}) {default['wall_s']:.1f} s vs target {default['target_s']:g} s: "
        f"**{'met' if default['met'] else 'not met'}**" + ("" if cuda else " (no GPU: the target does not apply)")
    )
    if best is not None and best is not default:
        verdict += f"; fastest {best['variant']} {best['wall_s']:.1f} s"
    notes = (
        f"Avatar {i['width']}×{i['height']}, {i['seconds']:g} s, GOP {GOP}, + {i['seconds']:g} s of speech-like "
        f"audio, recipe Wav2Lip weights, fixed face box {list(i['box'])} (face track cached before the clock). "
        f"Inputs made in {i['generate_s']} s (not counted). No Ray: N spawned processes × one "
        "`RenderWorker` each (`num_cpus` = threads; the GPU shared), segments from one queue, "
        "`prepare_audio` + cached `prepare_avatar` in the parent while they load, `prepare_audio_track` while "
        "they render, then `stitch_row`. Wall s: "
        "spawn → published mp4 (process start, imports, model load, audio decode, render, stitch); not in it: "
        "the parent's own start (Python, torch and heygem_ray imports, ~1.4 s on a CPU), and what a whole "
        "`heygem-ray render` adds (config, manifest, Ray's start). The avatar is synthetic and smooth (no "
        "grain): real footage costs x264 about a third more CPU a frame, and more to decode. Segment "
        "stage seconds are summed over segments and overlap (helper threads). " + verdict + "."
    )
    return (
        common.table(
            [
                "processes × threads, changes",
                "renderer",
                "frames",
                "segments",
                "wall s",
                "frames/s",
                "× realtime",
                "workers ready s (first / last)",
                "audio ready / audio track / segments done / stitch s",
                "segment stage s (summed)",
                "cores busy / GPU MiB per worker: torch's peak (the GPU's use ÷ workers, a bound on the mean)",
            ],
            rows,
        )
        + "\n\n"
        + notes
    )


def main(argv: Sequence[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--variants", nargs="+", default=None, help="runs as PROCSxTHREADS, e.g. 7x2 15x1")
        parser.add_argument("--precision", default=None, help="renderer.precision (bf16 on CUDA, fp32 on CPU)")
        parser.add_argument("--seconds", type=float, default=None, help="avatar and audio length (180; 1.2 dry)")
        parser.add_argument("--height", type=int, default=None, help="avatar height (1080; 180 dry)")
        parser.add_argument(
            "--segment-seconds", type=float, default=None, help="render.segment_seconds (the product's 10; 0.6 dry)"
        )

    args = common.step_args(argv, "node", __doc__, options)
    return common.run_step("node", args, lambda result: body(result, args))


if __name__ == "__main__":
    sys.exit(main())
