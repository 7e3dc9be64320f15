"""The campaign executor: runs the stages on Ray and keeps the books.

    row ─► prepare_row (task: fingerprints, done-marker check, audio decode)
        ─► prepare_avatar (task, once per avatar: probe + face track, cached)
        ─► segments (calls on a fixed pool of warm renderer actors)
           ∥ prepare_audio_track (task, once per narration: the output's AAC, cached)
        ─► stitch_row (task: join segments + audio track by packet copy, publish, marker)

Only small metadata crosses the object store; frames stay inside the actor and segment files go
through storage. The driver admits rows lazily and caps queued segments, so a campaign of any size
runs in bounded memory, and it records one result per row whatever happens to the others.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from heygem_ray import metrics, storage
from heygem_ray.config import Config
from heygem_ray.errors import ClusterConfigError, InputError
from heygem_ray.manifest import Row, read_manifest
from heygem_ray.plan import SegmentSpan, avatar_frame_indices, output_frame_count, plan_segments
from heygem_ray.prepare import AudioInfo, AvatarTrack, RowPrep, prepare_audio_track, prepare_avatar, prepare_row
from heygem_ray.report import render_report, write_report
from heygem_ray.results import RowResult, Summary, write_results
from heygem_ray.segment import RenderWorker, SegmentJob, SegmentResult, WorkerInfo
from heygem_ray.stitch import Marker, Stitched, StitchJob, stitch_row

log = logging.getLogger("heygem_ray")

#: seconds between rewrites of the campaign report while rows finish
REPORT_INTERVAL = 10.0

#: seconds without any ready renderer actor before the driver says why it may be waiting
ACTOR_WAIT_WARNING = 60.0

#: narrations whose encode task the driver remembers, so rows sharing one wait on the same task;
#: an older one is found in the cache by the task that a later row starts
AUDIO_TRACK_REFS = 1024

#: task exceptions worth another try (flaky storage, network); bad input is never retried
TRANSIENT = (OSError, TimeoutError, ConnectionError)


@dataclass
class _RowState:
    row: Row
    started: float
    prep: RowPrep | None = None
    track: AvatarTrack | None = None
    spans: list[SegmentSpan] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)
    audio_track: ray.ObjectRef | None = None  # the row's encoded audio, made while it renders
    finished: bool = False


def connect(cfg: Config) -> bool:
    """Join or start Ray; True when this call started it (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": cfg.cluster.include_dashboard, "log_to_driver": True}
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):  # ray.init joins that cluster, which sizes itself
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=local_cpus(cfg), num_gpus=cfg.cluster.num_gpus, **kwargs)
    return True


def shutdown(local: bool) -> None:
    """ray.shutdown(); for a Ray this process started on this machine (`local`), its autoscaler
    monitor is stopped first (`stop_local_monitor`)."""
    if local:
        stop_local_monitor()
    ray.shutdown()


def stop_local_monitor() -> None:
    """Kill the autoscaler monitor of the Ray this process started. ray.shutdown() stops Ray's
    processes one by one, giving each a second to exit on SIGTERM, and the monitor always takes
    that whole second (1.0 of the 1.35 s a shutdown took); a local Ray has nothing for it to scale."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        if node is not None and node.is_head():
            node.kill_monitor(check_alive=False)
    except Exception as exc:  # noqa: BLE001 - Ray internals: the plain shutdown still runs
        log.debug("could not stop the local Ray's monitor early: %r", exc)


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of a local Ray: `cluster.num_cpus`, or this machine's cores plus the CPUs kept
    for prepare/stitch tasks. Those tasks are short and light next to rendering, so they share the
    actors' cores: on a 2-core machine two actors render instead of one actor beside an idle core."""
    if cfg.cluster.num_cpus is not None:
        return cfg.cluster.num_cpus
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + math.ceil(cfg.cluster.reserve_cpus)


def actor_count(cfg: Config) -> int:
    """`cluster.actors`, or when 0, as many actors as the live nodes can host (`fit_actors`)."""
    if cfg.cluster.actors > 0:
        return cfg.cluster.actors
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return fit_actors(nodes, cfg.cluster.actor.num_cpus, cfg.cluster.actor.num_gpus, cfg.cluster.reserve_cpus)


def fit_actors(nodes: list[dict[str, float]], num_cpus: float, num_gpus: float, reserve_cpus: float) -> int:
    """Actors of `num_cpus` CPUs and `num_gpus` GPUs that fit on nodes with these resources, leaving
    `reserve_cpus` of the cluster's CPUs for prepare/stitch tasks. Counted per node, since an actor
    cannot span nodes: CPU-only nodes host no GPU actors, and a GPU node hosts as many as both its GPU
    shares and its CPUs allow (on a 16-core, 1-GPU node: 7 actors of 2 CPUs and 1/8 GPU, not 8). At
    least 1, so a cluster that cannot host any yet gets the driver's "no actor could start" warning."""
    per_node = []
    for res in nodes:
        fits = math.floor(res.get("CPU", 0.0) / max(num_cpus, 1e-3) + 1e-9)
        if num_gpus > 0:
            fits = min(fits, math.floor(res.get("GPU", 0.0) / num_gpus + 1e-9))
        per_node.append(fits)
    total = sum(per_node)
    spare_cpus = sum(res.get("CPU", 0.0) for res in nodes) - reserve_cpus
    total = min(total, math.floor(spare_cpus / max(num_cpus, 1e-3) + 1e-9))
    return max(1, total)


@dataclass
class Startup:
    """Wall-clock marks (time.time()) of a campaign's start, up to its first rendered frames: what
    a short campaign pays before rendering, broken down for operators and the benchmarks."""

    driver_started: float = field(default_factory=metrics.process_started)
    ray_called: float = 0.0
    ray_ready: float = 0.0
    #: the actor that rendered the first segment, and that segment
    actor: WorkerInfo | None = None
    segment: SegmentResult | None = None

    def breakdown(self) -> dict[str, float]:
        """Seconds per step, in order; empty until a segment was rendered."""
        if self.actor is None or self.segment is None or not self.ray_ready:
            return {}
        marks = [
            ("driver", self.driver_started),
            ("ray start", self.ray_called),
            ("actor start", self.ray_ready),
            ("model load", self.actor.init_started),
            ("wait for work", self.actor.model_loaded),
            ("first batch", self.segment.started_at),
            ("", self.segment.first_batch_at),
        ]
        steps = {name: max(0.0, nxt - at) for (name, at), (_, nxt) in itertools.pairwise(marks)}
        steps["first frames after launch"] = self.segment.first_batch_at - self.driver_started
        return steps


class Campaign:
    def __init__(self, cfg: Config, rows: list[Row], startup: Startup | None = None):
        self.cfg = cfg
        self.startup = startup or Startup()
        self.rows = rows
        self.results: dict[str, RowResult] = {}
        self._states: dict[str, _RowState] = {}
        self._pending = deque(rows)
        self._inflight: dict[ray.ObjectRef, tuple[str, Any]] = {}
        self._avatar_refs: dict[tuple, ray.ObjectRef] = {}
        self._audio_track_refs: dict[str, ray.ObjectRef] = {}  # by audio fingerprint, oldest first
        self._avatar_tracks: dict[tuple, AvatarTrack | BaseException] = {}
        self._avatar_waiters: dict[tuple, list[str]] = {}
        self._segment_queue: deque[tuple[str, int]] = deque()
        self._rows_by_id = {row.id: row for row in rows}
        self._actors: list[Any] = []
        self._actor_load: list[int] = []
        self._actor_healthy: list[bool] = []
        self._probe_after: dict[int, float] = {}  # actor -> time to ask again whether it is back
        self.actor_pids: list[int | None] = []
        self._workers: dict[int, WorkerInfo] = {}  # what each actor said when it answered
        self._actor_failed: dict[int, str] = {}  # actors whose constructor raised (bad checkpoint...)
        self._renderer_error: str | None = None  # set when no actor could start at all
        # `encoder.codec=auto` is decided by the first actor that answers (NVENC if its GPU has an
        # encoder), so rows prepare meanwhile and nothing waits on a node that may never start.
        # Every segment then uses that one codec, so a row's segments join without re-encoding.
        self.codec: str | None = None if cfg.encoder.codec == "auto" else cfg.encoder.codec
        self._waiting_warned = False
        self._frames_rendered = 0
        self.segments_by_node: dict[str, int] = {}  # where segments were rendered (for operators and tests)
        self.segments_by_actor: dict[int, int] = {}  # which actor rendered them
        self._thumbnails: dict[str, bytes] = {}
        self._started = time.time()
        self._report_written = 0.0

    # ----------------------------------------------------------------- setup
    def _start_actors(self) -> None:
        cfg = self.cfg
        actor_cls = ray.remote(RenderWorker).options(
            num_cpus=cfg.cluster.actor.num_cpus,
            num_gpus=cfg.cluster.actor.num_gpus,
            max_restarts=-1,  # a crashed actor comes back with its model; the driver re-sends the segment
            max_task_retries=0,
        )
        self._actors = [actor_cls.remote(cfg) for _ in range(actor_count(cfg))]
        self._actor_load = [0] * len(self._actors)
        # Each actor gets work once it answers (model loaded). Waiting for all of them up front would
        # hang a campaign whose cluster cannot fit every actor yet (GPU nodes still being added).
        self._actor_healthy = [False] * len(self._actors)
        self._probe_after = {i: 0.0 for i in range(len(self._actors))}
        self.actor_pids = [None] * len(self._actors)

    def _detector_gpus(self) -> float:
        detector = self.cfg.detector
        if detector.name != "s3fd" or detector.device == "cpu" or not detector.num_gpus:
            return 0.0
        return detector.num_gpus if ray.cluster_resources().get("GPU", 0.0) >= detector.num_gpus else 0.0

    def _task(self, fn: Any, num_gpus: float = 0.0) -> Any:
        return ray.remote(fn).options(
            num_cpus=self.cfg.cluster.task_cpus, num_gpus=num_gpus, max_retries=3, retry_exceptions=list(TRANSIENT)
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> Summary:
        started = self._started = time.time()
        self._prepare_row = self._task(prepare_row)
        # S3FD runs on a GPU only when Ray gave its task one (heygem_ray.devices): ask for a share
        # where the cluster has GPUs, so detection is scheduled and accounted like rendering
        self._prepare_avatar = self._task(prepare_avatar, num_gpus=self._detector_gpus())
        self._prepare_audio_track = self._task(prepare_audio_track)
        self._stitch_row = self._task(stitch_row)
        progress = _progress(len(self.rows), self.cfg.render.progress)
        try:
            self._start_actors()
            # until every row has its result: a probe of an actor that never starts (no node can host
            # it) or a finished row's segments still queued must not keep a finished campaign waiting
            while len(self.results) < len(self.rows):
                self._probe_actors()
                self._admit_rows()
                self._dispatch_segments()
                if not self._inflight:
                    time.sleep(0.2)  # only restarting actors to wait for
                    continue
                ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    kind, key = self._inflight.pop(ref)
                    getattr(self, f"_on_{kind}")(key, ref)
                metrics.segments_in_flight(sum(self._actor_load))
                progress.update(len(self.results) - progress.n)
                progress.set_postfix_str(self._postfix(), refresh=False)
        finally:
            progress.close()
            for actor in self._actors:  # free their CPUs/GPUs now, not at garbage collection
                ray.kill(actor)
            for row in self.rows:  # interrupted: whatever did not finish is reported, not lost
                if row.id not in self.results:
                    self._fail(row.id, "campaign interrupted before this row finished")
            self._write_report(final=True)
        return Summary.of([self.results[r.id] for r in self.rows], time.time() - started, self.startup.breakdown())

    def _admit_rows(self) -> None:
        """Prepare rows lazily: while fewer are preparing than `render.max_prepared_rows` and the driver's
        queue holds less than one more round of segments than the actors may hold."""
        preparing = sum(1 for s in self._states.values() if not s.finished and not s.spans)
        while (
            self._pending
            and preparing < self.cfg.render.max_prepared_rows
            and len(self._segment_queue) < self._inflight_cap()
        ):
            row = self._pending.popleft()
            self._states[row.id] = _RowState(row, time.time())
            self._inflight[self._prepare_row.remote(row, self.cfg)] = ("prepared", row.id)
            preparing += 1

    def _inflight_cap(self) -> int:
        render = self.cfg.render
        return render.max_inflight_segments or render.segments_per_actor * max(1, len(self._actors))

    def _dispatch_segments(self) -> None:
        """Hand queued segments to healthy actors, at most `render.segments_per_actor` each: an actor
        keeps its next segment ready, and the rest wait here for whichever actor frees up first, so
        actors that start late (a GPU node still joining) or run faster get their share. A busy
        actor is sent its next segment only while the queue holds more than the actors still
        starting can take: a small campaign's last segments wait for an actor that is about to
        answer instead of queueing behind the first one."""
        render = self.cfg.render
        inflight, cap = sum(self._actor_load), self._inflight_cap()
        healthy = [i for i, ok in enumerate(self._actor_healthy) if ok]
        starting = sum(1 for i, ok in enumerate(self._actor_healthy) if not ok and i not in self._actor_failed)
        while self._segment_queue and healthy and inflight < cap:
            actor = min(healthy, key=lambda i: self._actor_load[i])
            load = self._actor_load[actor]
            if load >= render.segments_per_actor or (load and len(self._segment_queue) <= starting):
                break
            row_id, index = self._segment_queue.popleft()
            state = self._states[row_id]
            if state.finished:
                continue
            ref = self._actors[actor].render_segment.remote(self._segment_job(state, index))
            self._actor_load[actor] += 1
            state.attempts[index] = state.attempts.get(index, 0) + 1
            self._inflight[ref] = ("segment", (row_id, index, actor))
            inflight += 1

    # -------------------------------------------------------------- handlers
    def _on_prepared(self, row_id: str, ref: ray.ObjectRef) -> None:
        state = self._states[row_id]
        try:
            state.prep = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this row's result
            return self._fail(row_id, _reason(exc))
        if state.prep.skipped:
            if state.prep.thumbnail:
                self._thumbnails[row_id] = state.prep.thumbnail
            return self._finish(row_id, "skipped", marker=state.prep.marker)
        assert state.prep.audio is not None
        state.audio_track = self._audio_track(state.prep.audio)
        key = (state.row.avatar, state.row.box)
        if key in self._avatar_tracks:
            return self._on_track(state, self._avatar_tracks[key])
        self._avatar_waiters.setdefault(key, []).append(row_id)
        if key not in self._avatar_refs:
            cfg = self.cfg
            ref = self._prepare_avatar.remote(
                state.row.avatar,
                state.row.box,
                cfg.detector,
                cfg.cache_uri,
                cfg.render.still_fps,
                cfg.limits.max_avatar_pixels,
                cfg.storage.options,
            )
            self._avatar_refs[key] = ref
            self._inflight[ref] = ("avatar", key)

    def _audio_track(self, audio: AudioInfo) -> ray.ObjectRef:
        """The task encoding this narration for the output: one per distinct audio content, started
        now so it runs while the row renders; the stitch takes its result."""
        ref = self._audio_track_refs.pop(audio.fingerprint, None)
        if ref is None:
            cfg = self.cfg
            ref = self._prepare_audio_track.remote(audio, cfg.cache_uri, cfg.encoder, cfg.storage.options)
        self._audio_track_refs[audio.fingerprint] = ref  # now the most recent
        while len(self._audio_track_refs) > AUDIO_TRACK_REFS:
            del self._audio_track_refs[next(iter(self._audio_track_refs))]
        return ref

    def _on_avatar(self, key: tuple, ref: ray.ObjectRef) -> None:
        try:
            track: AvatarTrack | BaseException = ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            track = exc
        self._avatar_tracks[key] = track
        for row_id in self._avatar_waiters.pop(key, []):
            self._on_track(self._states[row_id], track)

    def _on_track(self, state: _RowState, track: AvatarTrack | BaseException) -> None:
        if isinstance(track, BaseException):
            return self._fail(state.row.id, _reason(track))
        if self._renderer_error:
            return self._fail(state.row.id, self._renderer_error)
        assert state.prep is not None and state.prep.audio is not None
        state.track = track
        total = output_frame_count(state.prep.audio.seconds, track.info.fps)
        # a campaign of fewer rows than actors spreads each row over several, so none idles
        spread = math.ceil(len(self._actors) / max(1, len(self.rows)))
        state.spans = plan_segments(total, track.info.fps, self.cfg.render.segment_seconds, spread)
        self._segment_queue.extend((state.row.id, span.index) for span in state.spans)

    def _on_segment(self, key: tuple[str, int, int], ref: ray.ObjectRef) -> None:
        row_id, index, actor = key
        self._actor_load[actor] -= 1
        state = self._states[row_id]
        try:
            result: SegmentResult = ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            if state.finished:
                return
            cause = _cause(exc)
            if isinstance(cause, RayActorError):
                self._actor_lost(actor)  # no more work for it until it answers again
            if isinstance(cause, InputError) or state.attempts.get(index, 0) >= self.cfg.render.max_attempts:
                return self._fail(
                    row_id, _reason(exc, f"segment {index} failed after {state.attempts[index]} attempt(s)")
                )
            log.warning("row %s segment %d: %s; retrying", row_id, index, _reason(exc))
            self._segment_queue.appendleft((row_id, index))
            return
        if state.finished:
            return
        state.done.add(index)
        self._frames_rendered += 0 if result.reused else result.frames
        if self.startup.segment is None and not result.reused and actor in self._workers:
            self.startup.actor, self.startup.segment = self._workers[actor], result
        if result.node:
            self.segments_by_node[result.node] = self.segments_by_node.get(result.node, 0) + 1
        if not result.reused:
            self.segments_by_actor[actor] = self.segments_by_actor.get(actor, 0) + 1
        if len(state.done) == len(state.spans):
            self._submit_stitch(state)

    # ---------------------------------------------------------- actor health
    def _actor_lost(self, actor: int) -> None:
        """Stop sending work to an actor that died or is restarting until it answers again."""
        self.actor_pids[actor] = None
        if self._actor_healthy[actor]:
            self._actor_healthy[actor] = False
            self._probe_after[actor] = time.time()

    def _probe_actors(self) -> None:
        now = time.time()
        if not any(self._actor_healthy) and now - self._started > ACTOR_WAIT_WARNING and not self._waiting_warned:
            shape = self.cfg.cluster.actor
            log.warning(
                "no renderer actor has started after %.0f s: each needs %g CPU and %g GPU on one node; "
                "the cluster has %s",
                now - self._started,
                shape.num_cpus,
                shape.num_gpus,
                ray.cluster_resources(),
            )
            self._waiting_warned = True
        for actor, when in list(self._probe_after.items()):
            if when <= now:
                del self._probe_after[actor]
                self._inflight[self._actors[actor].ready.remote()] = ("actor_ready", actor)

    def _on_actor_ready(self, actor: int, ref: ray.ObjectRef) -> None:
        try:
            info = ray.get(ref)
        except RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):  # its constructor raised: no restart will help
                return self._actor_unusable(actor, _init_error(exc))
            self._probe_after[actor] = time.time() + 1.0  # still restarting (maybe waiting for a node)
            return
        if self.codec is None:
            self.codec = info.codec
            log.info("encoder.codec=auto resolved to %s by renderer actor %d", info.codec, actor)
        elif info.codec != self.codec:
            return self._actor_unusable(
                actor,
                f"its node encodes with {info.codec} but this campaign's segments "
                f"use {self.codec} (a cluster of mixed GPUs: name encoder.codec)",
            )
        self._actor_healthy[actor] = True
        self.actor_pids[actor] = info.pid
        self._workers[actor] = info
        pinned = f", cores {info.cores}" if info.cores is not None else ""
        log.info("renderer actor %d ready (pid %s%s)", actor, info.pid, pinned)

    def _actor_unusable(self, actor: int, reason: str) -> None:
        """An actor that will never render (constructor failed, wrong encoder): once no actor is
        left, every row still waiting for one fails with the reason."""
        self._actor_failed[actor] = reason
        log.warning("renderer actor %d gets no segments: %s", actor, reason)
        if len(self._actor_failed) == len(self._actors):
            self._renderer_error = f"renderer could not start: {reason}"
            for row_id in {row_id for row_id, _ in self._segment_queue}:
                self._fail(row_id, self._renderer_error)
            self._segment_queue.clear()

    def _submit_stitch(self, state: _RowState) -> None:
        assert state.prep is not None and state.prep.audio is not None and state.track is not None
        work = self._work_uri(state)
        job = StitchJob(
            row_id=state.row.id,
            output=state.row.output,
            segment_uris=[_segment_uri(work, s.index) for s in state.spans],
            work_uri=work,
            fps_fraction=state.track.info.fps_fraction,
            frames=state.spans[-1].stop,
            marker_uri=self.cfg.layout.marker(state.row.id),
            thumbnail_uri=self.cfg.layout.thumbnail(state.row.id),
            fingerprint=state.prep.fingerprint,
            storage_options=self.cfg.storage.options,
        )
        self._inflight[self._stitch_row.remote(job, state.audio_track)] = ("stitched", state.row.id)

    def _on_stitched(self, row_id: str, ref: ray.ObjectRef) -> None:
        try:
            stitched: Stitched = ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            return self._fail(row_id, _reason(exc))
        if stitched.thumbnail:
            self._thumbnails[row_id] = stitched.thumbnail
        self._finish(row_id, "ok", marker=stitched.marker)

    # ------------------------------------------------------------ bookkeeping
    def _work_uri(self, state: _RowState) -> str:
        """Where a row's segment files wait for its stitch; keyed by the row's fingerprint, the codec
        and the segment count, so an unfinished row's segments are reused by a rerun only if nothing
        about the row changed, `auto` chose the same encoder (segments of two encoders cannot be
        joined) and the row was cut the same way (another segment length or actor count cuts it
        into other spans)."""
        assert state.prep is not None and self.codec is not None
        key = f"{state.row.id}-{state.prep.fingerprint[:16]}-{self.codec}-n{len(state.spans)}"
        return self.cfg.layout.work(key)

    def _segment_job(self, state: _RowState, index: int) -> SegmentJob:
        assert state.track is not None and state.prep is not None and state.prep.audio is not None
        assert self.codec is not None  # segments go to actors that answered, and the first decided it
        span, track, audio = state.spans[index], state.track, state.prep.audio
        avatar_frames = avatar_frame_indices(np.arange(span.start, span.stop), track.frames, track.info.still)
        lo, hi = int(avatar_frames.min()), int(avatar_frames.max())
        return SegmentJob(
            row_id=state.row.id,
            index=index,
            out_uri=_segment_uri(self._work_uri(state), index),
            avatar_uri=state.row.avatar,
            info=track.info,
            start=span.start,
            avatar_frames=avatar_frames,
            pts=track.pts[lo : hi + 1],
            pts_offset=lo,
            boxes=track.boxes[avatar_frames],
            pcm_uri=audio.pcm_uri,
            audio_samples=audio.samples,
            audio_level=audio.level,
            codec=self.codec,
        )

    def _finish(self, row_id: str, status: str, marker: Marker | None) -> None:
        self._conclude(row_id, status, None, marker)

    def _fail(self, row_id: str, reason: str) -> None:
        self._conclude(row_id, "failed", reason, None)

    def _conclude(self, row_id: str, status: str, error: str | None, marker: Marker | None) -> None:
        """Record a row's one result (later calls for the same row are ignored by _record)."""
        state = self._states.get(row_id)
        if state:
            state.finished = True
        audio = state.prep.audio if state and state.prep else None
        self._record(
            RowResult(
                id=row_id,
                status=status,
                output=self._rows_by_id[row_id].output,
                error=error,
                audio_seconds=marker.audio_seconds if marker else (audio.seconds if audio else None),
                frames=marker.frames if marker else None,
                segments=len(state.spans) if state and state.spans else None,
                render_seconds=round(time.time() - state.started, 3) if state and status == "ok" else None,
                attempts=max(state.attempts.values(), default=0) if state else 0,
                finished_at=time.time(),
            )
        )

    def _record(self, result: RowResult) -> None:
        if result.id in self.results:
            return
        self.results[result.id] = result
        metrics.row_finished(result.status)
        seconds = f"{result.render_seconds:.1f}s" if result.render_seconds is not None else "-"
        detail = storage.display(result.output) if result.status != "failed" else result.error
        _write_line(f"[{result.status}] {result.id} {seconds} {detail}")
        if time.time() - self._report_written >= REPORT_INTERVAL:
            self._write_report(final=False)

    def _write_report(self, final: bool) -> None:
        """{output}/_report.html: rewritten as rows finish, so it can be refreshed during a run."""
        uri = self.cfg.layout.report
        done = [self.results[r.id] for r in self.rows if r.id in self.results]
        html = render_report(
            done,
            self._thumbnails,
            time.time() - self._started,
            title=f"heygem_ray campaign {storage.display(self.cfg.output)}",
            report_uri=uri,
            total_rows=None if final else len(self.rows),
        )
        try:
            write_report(uri, html)
        except OSError as exc:  # a report that cannot be written must not stop the campaign
            log.warning("could not write %s: %s", storage.display(uri), exc)
        self._report_written = time.time()

    def _postfix(self) -> str:
        counts = {s: sum(1 for r in self.results.values() if r.status == s) for s in ("ok", "failed", "skipped")}
        queued = len(self._segment_queue)
        return (
            f"ok={counts['ok']} failed={counts['failed']} skipped={counts['skipped']} "
            f"frames={self._frames_rendered} segments_in_flight={sum(self._actor_load)} queued={queued}"
        )


def _segment_uri(work_uri: str, index: int) -> str:
    return storage.join(work_uri, f"seg-{index:05d}.mp4")


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    return exc


def _reason(exc: BaseException, prefix: str | None = None) -> str:
    cause = _cause(exc)
    if isinstance(cause, InputError):
        text = str(cause)
    elif isinstance(cause, RayActorError):
        text = f"renderer actor died ({type(cause).__name__})"
    else:
        text = f"{type(cause).__name__}: {cause}".strip()
    text = text.splitlines()[0] if text else type(cause).__name__
    return f"{prefix}: {text}" if prefix and not isinstance(cause, InputError) else text


def _init_error(exc: BaseException) -> str:
    """The exception line ("CheckpointError: ...") from an actor constructor's traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return line.split(": ", 1)[0].rsplit(".", 1)[-1] + ": " + line.split(": ", 1)[1]
    return lines[-1] if lines else type(exc).__name__


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # a plain line per update when not on a terminal (e.g. `ray job logs -f`), redrawn in place otherwise
    return tqdm(
        total=total,
        unit="row",
        desc="campaign",
        disable=not enabled,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 10.0,
        dynamic_ncols=True,
    )


def _write_line(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)


def run(cfg: Config, launched: float | None = None) -> Summary:
    """Read the manifest, render every row, write the results table, return the summary.
    `launched`: when the run was asked for (time.time()), where the start-up breakdown begins;
    None = when this process started."""
    storage.configure(cfg.storage.options)
    # a bad manifest stops here, before any rendering
    rows = read_manifest(cfg.manifest, cfg.output, cfg.storage.allow_outside_output)
    own_ray = not cfg.cluster.address and not os.environ.get("RAY_ADDRESS")  # else ray.init joins a cluster
    startup = Startup(ray_called=time.time())
    if launched is not None:
        startup.driver_started = launched
    started_ray = connect(cfg)
    startup.ray_ready = time.time()
    job = None
    try:
        if started_ray and own_ray:  # no node will join it, so what does not fit now never will
            check_local_fit(cfg)
        job = Campaign(cfg, rows, startup)
        summary = job.run()
    finally:
        if started_ray:
            shutdown(local=own_ray)
        if job is not None:
            # written even when interrupted: every row has a result by now (unfinished ones as failed)
            write_results(cfg.layout.results, [job.results[r.id] for r in rows if r.id in job.results])
            storage.remove_empty_dir(cfg.layout.work_root)
    return summary


def check_local_fit(cfg: Config) -> None:
    """On a local Ray, refuse actors that could never all start, or that would leave no CPU for a
    prepare/stitch task: either would hang the campaign instead of failing it."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    actor, count = cfg.cluster.actor, actor_count(cfg)
    need_cpus = count * actor.num_cpus + cfg.cluster.task_cpus
    if need_cpus > cpus + 1e-9:
        raise ClusterConfigError(
            f"{count} renderer actor(s) of {actor.num_cpus:g} CPU(s) plus a prepare/stitch task of "
            f"{cfg.cluster.task_cpus:g} need {need_cpus:g} CPUs, but this local Ray has {cpus:g}: lower "
            "cluster.actors or cluster.actor.num_cpus, or raise cluster.num_cpus (cluster.actors=0 leaves "
            "cluster.reserve_cpus free: keep it at least cluster.task_cpus)"
        )
    if count * actor.num_gpus > gpus + 1e-9:
        raise ClusterConfigError(
            f"{count} renderer actor(s) of {actor.num_gpus:g} GPU need {count * actor.num_gpus:g} GPUs, but this "
            f"local Ray has {gpus:g}: lower cluster.actors or cluster.actor.num_gpus"
        )
