"""The campaign: decides what runs when, and keeps one result per row. An executor
(`heygem_ray.executors`: Ray, or inline in this process) runs the stages.

    row ─► prepare_row (task: fingerprints, done-marker check, audio decode)
        ─► prepare_avatar (task per avatar, one at a time: probe + face track as far as its
           narrations show, in chunks, cached)
        ─► segments (calls on a fixed pool of warm renderer actors)
           ∥ prepare_audio_track (task, once per narration: the output's AAC, cached)
        ─► stitch_row (task: join segments + audio track by packet copy, publish, marker)

Only small metadata crosses between processes; frames stay inside the actor and segment files go
through storage. The driver admits rows lazily and caps queued segments, so a campaign of any size
runs in bounded memory, and it records one result per row whatever happens to the others. Its
books on the actors are `actor_pool.ActorPool`; what it reports is `observers.CampaignObservers`.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from heygem_ray import scratch, storage
from heygem_ray.actor_pool import LOST_ACTOR_SECONDS, ActorPool
from heygem_ray.config import Config, in_ray_job
from heygem_ray.errors import CacheError, CheckpointError, InputError, ManifestError, SettingsError
from heygem_ray.executors import Executor, Expired, failure_reason, open_executor
from heygem_ray.manifest import Row, read_manifest
from heygem_ray.markers import Marker
from heygem_ray.media.audio import SAMPLE_RATE
from heygem_ray.media.video import encoder_problem
from heygem_ray.observers import CampaignObservers
from heygem_ray.output_lock import OutputLostError
from heygem_ray.prepare import AvatarTrack, RowPrep, model_versions, prepare_row
from heygem_ray.release import code_version
from heygem_ray.results import UNCHECKED, ResultsTable, RowResult, Summary
from heygem_ray.rows import RowState, remove_old_work
from heygem_ray.segment import SegmentResult
from heygem_ray.segment_queue import SegmentCall, SegmentQueue
from heygem_ray.shared_work import AvatarKey, SharedWork
from heygem_ray.startup import Startup
from heygem_ray.stitch import QAError, Stitched, stitch_row

log = logging.getLogger("heygem_ray")

#: the error of a row a stop caught before it finished
INTERRUPTED = "campaign interrupted before this row finished"
#: the error of a row the driver's own failure caught, that failure in it
ENDED_BY_ERROR = "campaign ended by an error before this row finished ({}): run it again to resume"
#: seconds a stop spends checking the rows an earlier run published that this run had not reached,
#: and on how many threads (`_checked`)
STOP_CHECK_SECONDS = 1.0
STOP_CHECKERS = 16
#: how many times more rows may be preparing while each of those prepared lately was skipped
SKIPPING_RATE = 8

#: at a stop, how long the stitches under way may go on (most take a second or two) before they are
#: stopped; `ray job stop` kills the driver 3 s after its SIGTERM by default
STITCH_GRACE_SECONDS = 1.5
#: a stage task out this long is said to be so (`Campaign._watch_stages`), looked for this often
STAGE_WARN_SECONDS = 600.0
STAGE_WATCH_SECONDS = 30.0
#: the stage tasks watched, as the log names them (renderer calls have their own deadline)
STAGES_WATCHED = {
    "prepared": "preparing row {}",
    "avatar": "tracking the face of avatar {}",
    "audio_track": "encoding the narration of content {}",
    "stitched": "stitching row {}",
}
#: then how long the stopped ones' results are waited for: a cancel (Ray's kill of the worker)
#: takes effect a moment later, and a stitch may publish meanwhile
CANCEL_SECONDS = 0.5
#: and how long one that cannot be stopped (an inline run's, on a thread) is waited for: one that
#: hung (a store that never answers) held the stop, and the process, for ever
STITCH_WAIT_SECONDS = 30.0


class Campaign:
    """One campaign's rows through prepare, render and stitch on an executor, each row ending with
    exactly one result."""

    def __init__(
        self,
        cfg: Config,
        rows: list[Row],
        executor: Executor,
        startup: Startup | None = None,
        guard: Callable[[], None] | None = None,
    ):
        self.cfg, self.rows, self.executor = cfg, rows, executor
        #: called on every turn of the loop: what it raises stops the campaign (the output lock lost)
        self.guard = guard
        self.startup = startup or Startup()
        self.actors = ActorPool(cfg, executor)
        self.observers = CampaignObservers(cfg, rows)
        self.results = ResultsTable(cfg.layout.results, cfg.layout.results_parts)
        self._outputs = {row.id: row.output for row in rows}
        self._refused = [row for row in rows if row.refused]  # the manifest says why they cannot run
        self.input_faults: set[str] = set()  # rows failed for their own inputs (`_fail`)
        self._pending = deque(row for row in rows if not row.refused)
        self._states: dict[str, RowState] = {}  # rows admitted and not finished
        self._inflight: dict[Any, tuple[str, Any]] = {}  # executor handle -> (event, key)
        self.segments = SegmentQueue(cfg, self.actors, executor)
        self._stitching = 0  # stitches submitted and not yet answered
        self._skipped_since_work = 0  # rows prepared and skipped since the last that went on to render
        self.shared = SharedWork(cfg, executor)
        self._published_bytes = 0  # of the videos this run published (`limits.max_output_gb`)
        self._ended_by: str | None = None  # the error that ended the campaign's loop (None: it ran out, or a stop)
        self._decoded_bytes = 0  # of the narrations this run decoded into the cache (`limits.max_cache_gb`)
        self.run_token = secrets.token_hex(8)  # what this run's markers hold (`Marker.run`)
        # stage task handle -> (when it was sent, its time allowed): `_watch_stages`, `_expire_stages`
        self._stages: dict[Any, tuple[float, float]] = {}
        self._warned: set[Any] = set()  # stage tasks said to be out long
        self._watched_at = time.monotonic()

    # ------------------------------------------------------------------ loop
    def run(self) -> Summary:
        started = time.time()
        self._handlers: dict[str, Callable[[Any, Any], None]] = {
            "prepared": self._on_prepared,
            "avatar": self._on_avatar,
            "audio_track": self.shared.audio_track_done,
            "segment": self._on_segment,
            "actor_ready": lambda actor, ref: self.actors.answered(actor, lambda: self.executor.get(ref)),
            "stitched": self._on_stitched,
        }
        lost = False
        try:
            if self.guard is not None:  # once before anything: from here a stop reports every row
                self.guard()
            self.observers.open()
            for row in self._refused:  # their results say why; the others go on
                self._fail(row.id, row.refused or "", input_fault=True)
            self.actors.start()
            # until every row has its result: a probe of an actor that never starts (no node can host
            # it) or a finished row's segments still queued must not keep a finished campaign waiting
            while len(self.results) < len(self.rows):
                if self.guard is not None:
                    self.guard()
                for actor in self.actors.due_probes():
                    self._inflight[self.executor.call(actor, "ready")] = ("actor_ready", actor)
                for actor in self.actors.stalled(LOST_ACTOR_SECONDS):
                    self._take_back(actor)
                for actor in self.segments.hung(self.cfg.render.segment_deadline()):
                    self._restart_hung(actor)
                self._admit_rows()
                for key, handle, seconds in self.shared.start_held(self.actors.settled):
                    self._stage(handle, "avatar", key, seconds)
                self._dispatch_segments()
                if not self._inflight:
                    time.sleep(0.2)  # only restarting actors to wait for
                for ref in self.executor.wait(list(self._inflight), timeout=1.0) if self._inflight else ():
                    self._stages.pop(ref, None)
                    self._answered(ref, *self._inflight.pop(ref))
                self._expire_stages()
                if self.actors.error:  # no actor can ever render: nothing queued will be
                    for row_id in self.segments.rows():
                        self._fail(row_id, self.actors.error)
                    self.segments.clear()
                self.observers.tick(self.actors.inflight, len(self.segments))
                self.results.tick()
                self._watch_stages()
        except OutputLostError:
            lost = True
            raise
        except Exception as exc:  # not a stop: its rows, feed and report say what ended it
            self._ended_by = storage.display(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if lost:  # another run writes this output root now: its table, feed, report and segments are
                _wind_down(  # its own; a rerun finds what we published
                    ("stop the stitches under way", self._cancel_stitches),
                    ("stop the renderers", self.executor.close),
                )
            else:
                results = self._wind_up()
        return Summary.of(results, time.time() - started, self.startup.breakdown())

    def _answered(self, ref: Any, event: str, key: Any) -> None:
        row_id = key if event in ("prepared", "stitched") else key[0] if event == "segment" else None
        self._for_row(row_id, self._handlers[event], key, ref)

    def _stage(self, handle: Any, event: str, key: Any, media_seconds: float = 0.0) -> None:
        """A stage task out: watched (`_watch_stages`), and stopped at its deadline (`_expire_stages`)."""
        self._inflight[handle] = (event, key)
        self._stages[handle] = (time.monotonic(), self.cfg.render.stage_deadline(media_seconds))

    def _expire_stages(self) -> None:
        """Stop each stage task out past its deadline (`render.stage_timeout`), or that the
        executor says will never run (`Executor.stranded`), and answer it as failed (`Expired`):
        the rows it serves fail saying so, and the campaign goes on. A read or decoder that never
        ended, or a task no node ever had room for, held the campaign for ever."""
        now = time.monotonic()
        for handle in [h for h, (sent, allowed) in self._stages.items() if now - sent >= allowed]:
            allowed = self._stages[handle][1]
            self._give_up(
                handle,
                f"was stopped after {allowed:g} s (render.stage_timeout): it hung (a read or decoder that never "
                "ends) or no node had room for it; run the campaign again",
            )
        for handle in self.executor.stranded():
            if handle in self._stages:
                self._give_up(handle, "waited on nodes of the cluster that went; run the campaign again")

    def _give_up(self, handle: Any, why: str) -> None:
        """Stop a stage task and answer it as failed: `why` follows its name. A stitch that ends
        before its stop takes effect (Ray's kill is not at once) counts by its result: it may have
        published as it was stopped, and its row was reported failed with its video out, skipped by
        the next run."""
        del self._stages[handle]
        event, key = self._inflight.pop(handle)
        self.executor.abandon(handle)  # a thread's stage runs on, its answer forgotten, publishing nothing
        if event == "stitched" and self._ended_well(handle):
            return self._answered(handle, event, key)
        why = f"{_stage_named(event, key)} {why}"
        log.warning("%s", why)
        self._answered(Expired(handle, why), event, key)

    def _ended_well(self, handle: Any) -> bool:
        """Whether a stopped task ended with a result within CANCEL_SECONDS (else the stop took it)."""
        if not self.executor.wait([handle], timeout=CANCEL_SECONDS):
            return False
        try:
            self.executor.get(handle)
        except Exception:  # noqa: BLE001 - stopped, or failed: answered as given up
            return False
        return True

    def _watch_stages(self) -> None:
        """Say so, once, of a stage task (a row's preparation, an avatar's face track, a narration's
        encode, a stitch) still out after STAGE_WARN_SECONDS: Ray may have no node to place it on
        (every CPU held by actors, a GPU share no GPU has left), or it hangs (a decoder, a read that
        never ends). Renderer calls have their own deadline (`render.segment_timeout`)."""
        now = time.monotonic()
        if now - self._watched_at < STAGE_WATCH_SECONDS:
            return
        self._watched_at = now
        for handle, (sent, _) in self._stages.items():
            if now - sent >= STAGE_WARN_SECONDS and handle not in self._warned:
                self._warned.add(handle)
                log.warning(
                    "%s has been under way for over %.0f s: no node may have room for it (CPUs all held by "
                    "renderer actors, a GPU share no GPU has left: see the Ray dashboard's pending tasks), or "
                    "it hangs (a decoder, a read that never ends)",
                    _stage_named(*self._inflight[handle]),
                    STAGE_WARN_SECONDS,
                )
        self._warned &= set(self._stages)

    def _cancel_stitches(self) -> None:
        """Stop the stitches under way (their videos and markers would land in an output root
        another run owns now)."""
        for handle, (event, _) in list(self._inflight.items()):
            if event == "stitched":
                self.executor.abandon(handle)

    def _wind_up(self) -> list[RowResult]:
        """Every row its result, the whole table written, then the rest (renderers stopped, report,
        feed, old segments removed), each step going on when one before fails."""
        # every row has a result and the table is written before anything that may fail on a
        # cluster that is going away (killing actors, the report, the feed)
        interrupted = len(self.results) < len(self.rows)
        table_error: str | None = None
        try:
            if interrupted:  # whatever did not finish is reported, not lost
                self.results.flush()  # first: `ray job stop` kills a driver 3 s after its SIGTERM
                try:
                    self._settle_stitches()
                except Exception as exc:  # noqa: BLE001 - the executor itself failing (its cluster gone)
                    # a stitch it could not wait for counts by its marker, as one the stop caught
                    log.warning("stitches under way not waited for: %s: %s", type(exc).__name__, exc)
                self._interrupted([row.id for row in self.rows if row.id not in self.results])
            try:
                table = self.results.finish([r.id for r in self.rows])
            except BaseException as exc:  # a stop too: the feed and report must not say "finished"
                table_error = storage.display(f"results table not written: {type(exc).__name__}: {exc}")
                raise
            for row in table:  # flags only the whole campaign gives, in the final report and feed
                if row.qa_flag != self.results[row.id].qa_flag:
                    self.observers.flagged_late(self.results[row.id], row)
            return table
        finally:  # a table the store refuses still leaves the renderers stopped and the feed final
            done = ("ok", "skipped")
            finished = [r.id for r in self.rows if r.id in self.results and self.results[r.id].status in done]
            _wind_down(
                ("stop the renderers", self.executor.close),  # frees their CPUs/GPUs now
                (
                    "write the final report and progress feed",
                    lambda: self.observers.close(interrupted, self._ended_by or table_error),
                ),
                ("remove finished rows' old segments", lambda: remove_old_work(self.cfg.layout, finished)),
                ("remove the empty work folder", lambda: storage.remove_empty_dir(self.cfg.layout.work_root)),
            )

    def prepare_limit(self) -> int:
        """Rows that may be preparing at once: `render.max_prepared_rows`, or (0) twice the actors,
        at least 8; and while the rows prepared lately were all skipped (a rerun going over the rows
        an earlier run finished: a few requests each, no work), up to SKIPPING_RATE times that (a
        rerun of 50,000 finished rows spent half an hour on them, eight at a time)."""
        if self.cfg.render.max_prepared_rows:
            return self.cfg.render.max_prepared_rows
        base = max(8, 2 * len(self.actors))
        return base * min(SKIPPING_RATE, 1 + self._skipped_since_work // base)

    def _admit_rows(self) -> None:
        """Prepare rows lazily: while fewer are preparing than `prepare_limit`, the driver's queue
        holds less than one more round of segments than the actors may hold, and fewer rows wait
        for their stitch than twice the actors (at least 8)."""
        while (
            self._pending
            and self.observers.counts["preparing"] < self.prepare_limit()
            and len(self.segments) < self.segments.cap()
            and self._stitching < max(8, 2 * len(self.actors))  # stitches slower than renders: no pile of rows
        ):
            row = self._pending.popleft()
            self._states[row.id] = RowState(row, time.time())
            self.observers.status(row.id, "preparing")
            # a row that will not render is still asked whether it is done (skipped), but its
            # narration is not decoded for nothing
            decode = self._not_decoding() is None
            self._stage(self.executor.submit(prepare_row, row, self.cfg, decode), "prepared", row.id)

    def _dispatch_segments(self) -> None:
        if self._output_limit_reached():  # the rows waiting for their first segment go no further
            for row_id in self.segments.rows():
                state = self._states.get(row_id)
                if state is not None and not state.attempts:
                    self._fail(row_id, self._output_limit_reason())
        for handle, call in self.segments.dispatch(self._states):
            self._inflight[handle] = ("segment", call)
        for row_id, reason in self.segments.broken.items():
            self._fail(row_id, reason)
        self.segments.broken.clear()

    def _take_back(self, actor: int, hung: str | None = None) -> None:
        """The segments an actor holds, lost or `hung` (why), for the others: their calls are
        forgotten (an answer that comes one day changes nothing)."""
        calls = []
        for handle, (event, key) in list(self._inflight.items()):
            if event == "segment" and key[2] == actor:
                del self._inflight[handle]
                calls.append(key)
        for row_id, failure in self.segments.take_back(actor, calls, self._states, hung).items():
            self._fail(row_id, failure)

    def _restart_hung(self, actor: int) -> None:
        """An actor that has worked on one segment past `render.segment_timeout`: restarted (its
        model loaded again), its segments sent to the others."""
        deadline = self.cfg.render.segment_deadline()
        why = f"hung (no segment back in {deadline:g} s)"
        log.warning("renderer actor %d %s: restarting it", actor, why)
        if self.executor.restart(actor):
            self.actors.lost(actor)  # asked `ready` again once restarted
        else:
            self.actors.unusable(actor, why)
        self._take_back(actor, why)

    def _for_row(self, row_id: str | None, step: Callable[..., None], *args: Any) -> None:
        """Run a step about one row (None: about several, or none); a defect it hits fails that row,
        not the campaign."""
        if row_id is None:
            return step(*args)
        try:
            step(*args)
        except Exception as exc:  # the rest of the campaign goes on
            log.exception("row %s: internal error", row_id)
            self._fail(row_id, f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])

    # -------------------------------------------------------------- handlers
    def _on_prepared(self, row_id: str, ref: Any) -> None:
        state = self._states[row_id]
        try:
            state.prep = self.executor.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this row's result
            if not isinstance(self.executor.cause(exc), InputError):  # a store failing, say: not a rerun's pace
                self._skipped_since_work = 0
            return self._fail(row_id, failure_reason(self.executor, exc), input_fault=self._lasting(exc))
        if state.prep.skipped:
            self._skipped_since_work += 1
            return self._conclude(state.row.id, "skipped", None, state.prep.marker, state.prep.thumbnail)
        if state.prep.audio is None:  # not decoded: admitted past a limit (`_not_decoding`), no work
            self._skipped_since_work += 1  # as cheap as a skipped row: the rest go at a rerun's pace
            return self._fail(row_id, self._not_decoding() or "not rendered")
        self._skipped_since_work = 0
        if state.prep.audio.decoded:
            self._decoded_bytes += 4 * state.prep.audio.samples
        if self.actors.error:  # no renderer will ever take it: no face tracking for nothing
            return self._fail(row_id, self.actors.error)
        if self._output_limit_reached():
            return self._fail(row_id, self._output_limit_reason())
        track, started = self.shared.avatar(state.row, state.prep.audio.seconds, state.prep.avatar_fingerprint)
        if started is not None:
            key, handle = started
            self._stage(handle, "avatar", key, state.prep.audio.seconds)
        if track is not None:
            self._on_track(state, track)

    def _not_rendering(self) -> str | None:
        """Why rows not rendering yet will not (None: they may): no renderer can start, or this
        run's new videos reached `limits.max_output_gb`. Each holds for the rest of the run."""
        if self.actors.error:
            return self.actors.error
        return self._output_limit_reason() if self._output_limit_reached() else None

    def _not_decoding(self) -> str | None:
        """Why rows not prepared yet will not render (None: they may), their narrations left
        undecoded: `_not_rendering`, or the narrations this run decoded reached `limits.max_cache_gb`."""
        if (why := self._not_rendering()) is not None:
            return why
        limit = self.cfg.limits.max_cache_gb * 2**30
        if limit and self._decoded_bytes >= limit:
            return (
                f"not rendered: the narrations this run decoded reached its cache limit of {_size(limit)} "
                f"(limits.max_cache_gb, about {limit / (4 * SAMPLE_RATE * 3600):.0f} hours of audio; the studio sets "
                "it to studio.user_cache_gb): run the campaign again to render the rest"
            )
        return None

    def _output_limit_reached(self) -> bool:
        """Whether the videos this run published reached `limits.max_output_gb`: rows not yet
        rendering stop there (checked as a row is prepared and before its first segment goes out)."""
        limit = self.cfg.limits.max_output_gb
        return bool(limit) and self._published_bytes >= limit * 2**30

    def _output_limit_reason(self) -> str:
        limit = self.cfg.limits.max_output_gb * 2**30
        return (
            f"not rendered: this run's new videos reached its limit of {_size(limit)} (limits.max_output_gb, which the "
            "studio sets to your storage quota left): free space (in the studio, delete campaigns you no longer "
            "need), then run the campaign again to render the rest"
        )

    def _on_avatar(self, key: AvatarKey, ref: Any) -> None:
        # no more tracking for rows no renderer will take
        track, waiting, started = self.shared.avatar_done(key, ref, more=self._not_rendering() is None)
        if started is not None:
            self._stage(started[1], "avatar", key, self.shared.seconds_tracked(key))
        for row_id in waiting:
            if row_id in self._states:
                self._for_row(row_id, self._on_track, self._states[row_id], track)

    def _on_track(self, state: RowState, track: AvatarTrack | BaseException) -> None:
        assert state.prep is not None and state.prep.audio is not None
        seconds = state.prep.audio.seconds
        # past the output limit no more tracking is done: a track, or a damaged frame's fault, that
        # does not reach the row answers it too; the limit is its reason
        fault = self.executor.cause(track) if isinstance(track, BaseException) else None
        if (why := self._not_rendering()) is not None and not _concerns(fault, seconds):
            return self._fail(state.row.id, why)
        if isinstance(track, BaseException):
            return self._fail(state.row.id, failure_reason(self.executor, track), input_fault=self._lasting(track))
        if state.prep.avatar_fingerprint and track.fingerprint != state.prep.avatar_fingerprint:
            # the file changed between the row's fingerprint and its tracking: rendered, its marker
            # would name the old bytes for a video of the new
            return self._fail(state.row.id, str(InputError("avatar", state.row.avatar, storage.REPLACED)))
        if not track.shows_a_face(seconds):
            faceless = f"no face found in the {track.shown(seconds)} frame(s) this narration shows"
            return self._fail(state.row.id, str(InputError("avatar", state.row.avatar, faceless)), input_fault=True)
        state.audio_track, new = self.shared.audio_track(state.prep.audio)
        if new:  # watched, so a failed encode is forgotten and the next row with that narration tries again
            self._stage(state.audio_track, "audio_track", state.prep.audio.fingerprint, seconds)
        # a campaign of fewer rows than actors spreads each row over several, so none idles
        spread = math.ceil(len(self.actors) / max(1, len(self.rows) - len(self._refused)))
        self.observers.frames_planned += state.plan(track, self.cfg.render.segment_seconds, spread)
        self.observers.status(state.row.id, "rendering")
        self.segments.add(state.row.id, [span.index for span in state.spans])

    def _on_segment(self, call: SegmentCall, ref: Any) -> None:
        row_id, index, actor = call
        state = self._states.get(row_id)
        try:
            result: SegmentResult = self.executor.get(ref)
        except Exception as exc:  # noqa: BLE001
            failure = self.segments.failed(call, state, exc)
            return self._fail(row_id, failure, input_fault=self._lasting(exc)) if failure else None
        self.segments.rendered(call, result)
        if state is None:
            return
        state.done.add(index)
        self.observers.segment_done(result.frames, result.reused)
        self.startup.rendered(self.actors.actors[actor].info, result)
        if state.rendered:
            assert self.actors.codec is not None
            cfg = self.cfg
            job = state.stitch_job(
                cfg.layout, self.actors.codec, cfg.qa, cfg.storage.options, cfg.model_versions, self.run_token
            )
            seconds = state.prep.audio.seconds if state.prep and state.prep.audio else 0.0
            self._stage(self.executor.submit(stitch_row, job, state.audio_track), "stitched", row_id, seconds)
            self._stitching += 1

    def _on_stitched(self, row_id: str, ref: Any) -> None:
        self._stitching -= 1
        try:
            stitched: Stitched = self.executor.get(ref)
        except Exception as exc:  # noqa: BLE001
            state = self._states.get(row_id)
            try:  # a stitch that failed after publishing (its clean-up, a lost worker): the video is out
                marker = state.published_by(self.cfg.layout, self.run_token) if state is not None else None
            except Exception:  # noqa: BLE001 - the stitch's own failure is the row's reason
                marker = None
            if marker is not None:
                return self._conclude(row_id, "ok", None, marker, None)
            encode = self.shared.audio_track_failure(state.audio_track) if state is not None else None
            return self._fail(row_id, encode or failure_reason(self.executor, exc), input_fault=self._lasting(exc))
        self._conclude(row_id, "ok", None, stitched.marker, stitched.thumbnail)

    # ------------------------------------------------------------ results
    def _settle_stitches(self) -> None:
        """At a stop, the stitches under way get STITCH_GRACE_SECONDS to finish, then the rest are
        stopped: a row reported interrupted must not have its video published after the report (a
        stitch on a thread, which cannot be stopped, is waited for, up to STITCH_WAIT_SECONDS)."""
        stitching = {handle: key for handle, (event, key) in self._inflight.items() if event == "stitched"}
        for handle in stitching:
            del self._inflight[handle]
            self._stages.pop(handle, None)
        deadline, stopped = time.monotonic() + STITCH_GRACE_SECONDS, False
        while stitching:
            left = deadline - time.monotonic()
            if stopped and left < -STITCH_WAIT_SECONDS:
                # their rows are reported interrupted: a thread that ends later publishes nothing
                log.warning("%d stitch(es) that cannot be stopped did not end: abandoned", len(stitching))
                for handle in stitching:
                    self.executor.abandon(handle)
                return
            if left <= 0 and not stopped:
                stopped = True  # what it had published before its stop, `_interrupted` finds by its marker
                cancelled = {handle: key for handle, key in stitching.items() if self.executor.cancel(handle)}
                stitching = {handle: key for handle, key in stitching.items() if handle not in cancelled}
                # a cancel takes effect a moment later: a stitch that ended first (its marker written
                # after `_interrupted` looked) counts by its result
                until = time.monotonic() + CANCEL_SECONDS
                while cancelled and (wait := until - time.monotonic()) > 0:
                    for handle in self.executor.wait(list(cancelled), timeout=wait):
                        row_id = cancelled.pop(handle)
                        self._for_row(row_id, self._on_cancelled_stitch, row_id, handle)
                continue
            for handle in self.executor.wait(list(stitching), timeout=max(left, 1.0) if stopped else left):
                row_id = stitching.pop(handle)
                self._for_row(row_id, self._on_stitched, row_id, handle)

    def _on_cancelled_stitch(self, row_id: str, ref: Any) -> None:
        try:
            stitched: Stitched = self.executor.get(ref)
        except Exception:  # noqa: BLE001 - stopped: `_interrupted` reports it (by its marker, if it published)
            return
        self._conclude(row_id, "ok", None, stitched.marker, stitched.thumbnail)

    def _interrupted(self, row_ids: list[str]) -> None:
        """The rows the stop caught. One being rendered: ok when its video was published before the
        stop (its marker, written since the row started, says so, though the driver had not heard
        yet: with `force` an earlier run's marker matches too), else failed. One never started, or
        still being fingerprinted, that an earlier run published is checked as a
        rerun checks it (`prepare_row`: its inputs, settings and video still those of its marker),
        within STOP_CHECK_SECONDS: skipped when current (a stopped re-run of a finished campaign
        must not report its videos lost), else failed, saying whether it was checked. Taken on the
        earlier run's word, a row whose narration had changed was reported skipped with the old
        video."""
        unstarted = {row_id for row_id in row_ids if row_id not in self._states or self._states[row_id].prep is None}
        earlier: dict[str, RowResult] = {}
        if unstarted:
            try:
                earlier = self.results.published_earlier()
            except Exception as exc:  # noqa: BLE001 - a table unreadable now: reported failed, as before
                log.warning("earlier results not read: %s: %s", type(exc).__name__, exc)
        # whatever output the earlier result names (a moved root's hold the old root's URIs): the
        # check is the row's marker against the row as it is now, its output where it is now
        published = [row for row in self.rows if row.id in unstarted and row.id in earlier]
        checked = _checked(published, self.cfg, STOP_CHECK_SECONDS)
        unchecked = {row.id for row in published} - checked.keys()
        # one line for them all, no part written: a campaign of 100,000 rows stopped early reports
        # them in a second, and the table that follows holds them
        stopped: list[str] = []
        current = 0
        for row_id in row_ids:
            state = self._states.get(row_id)
            try:
                # only a row whose stitch was sent can have published: no read of the marker of
                # one still waiting for its face track or its segments (a stop catches thousands)
                marker = (
                    state.published_by(self.cfg.layout, self.run_token)
                    if state is not None and state.rendered
                    else None
                )
            except Exception:  # noqa: BLE001 - the store failing too: reported failed, and a rerun finds the marker
                marker = None
            prep = checked.get(row_id)
            if marker is not None:
                self._conclude(row_id, "ok", None, marker, None)
            elif prep is not None and prep.skipped:
                current += 1
                self._conclude(row_id, "skipped", None, prep.marker, prep.thumbnail, quiet=True)
            else:
                stopped.append(row_id)
                why = INTERRUPTED if self._ended_by is None else ENDED_BY_ERROR.format(self._ended_by)
                self._conclude(row_id, "failed", UNCHECKED if row_id in unchecked else why, None, None, True)
        self.observers.stopped(stopped, current, len(unchecked))

    def _lasting(self, exc: BaseException) -> bool:
        """Whether `exc` is a fault of the row that a rerun meets again: its own input's
        (`InputError.lasting`), or its lip sync below `qa.fail_below` (rendered again, the same)."""
        cause = self.executor.cause(exc)
        return isinstance(cause, QAError) or (isinstance(cause, InputError) and cause.lasting)

    def _fail(self, row_id: str, reason: str, input_fault: bool = False) -> None:
        """`input_fault`: the row's own inputs are at fault (a refused manifest row, a file that
        is not audio, an avatar with no face, its lip sync below `qa.fail_below`): a rerun would
        fail it the same way."""
        if input_fault and row_id not in self.results:
            self.input_faults.add(row_id)
        self._conclude(row_id, "failed", reason, None, None)

    def _conclude(
        self,
        row_id: str,
        status: str,
        error: str | None,
        marker: Marker | None,
        thumbnail: bytes | None,
        quiet: bool = False,
    ) -> None:
        """Record a row's one result (a row that has one keeps it) and let go of its state: what a
        finished row leaves in the driver is its result. `quiet`: no line, part or report of its own
        (the stop's rows)."""
        if row_id in self.results:
            return
        state = self._states.pop(row_id, None) or RowState(Row(row_id, "", "", self._outputs[row_id]), time.time())
        if status == "ok" and marker is not None:
            self._published_bytes += marker.bytes or 0
        result = state.result(status, error, marker, self.cfg.qa)
        self.results.add(result, flush=not quiet)
        self.observers.finished(result, thumbnail, quiet=quiet)


def _checked(rows: list[Row], cfg: Config, seconds: float) -> dict[str, RowPrep | None]:
    """`prepare_row` of each row, not decoding, by row id, for as many as answer within `seconds`
    (`ray job stop` kills the driver 3 s after its SIGTERM), on STOP_CHECKERS threads left behind
    at the deadline (a store that does not answer, a changed input being hashed anew). None: the
    check failed (an input gone, the store refusing): the row is not taken for done."""
    todo = deque(rows)
    answers: dict[str, RowPrep | None] = {}
    lock = threading.Lock()

    def check() -> None:
        while time.monotonic() < deadline:  # left behind at it: no more checks (the table is written)
            try:
                row = todo.popleft()
            except IndexError:
                return
            try:
                prep: RowPrep | None = prepare_row(row, cfg, decode=False)
            except Exception:  # noqa: BLE001 - not known to be done: reported failed, a rerun checks it again
                prep = None
            with lock:
                answers[row.id] = prep

    deadline = time.monotonic() + seconds
    # daemon threads: none is waited for at exit
    checkers = [threading.Thread(target=check, name="stop-check", daemon=True) for _ in rows[:STOP_CHECKERS]]
    for checker in checkers:
        checker.start()
    for checker in checkers:
        checker.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return dict(answers)


def _wind_down(*steps: tuple[str, Callable[[], object]]) -> None:
    """Each step, after the results table (written or refused): one that fails is logged and the next
    still runs."""
    for step, action in steps:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - the results are written; say what failed and go on
            log.warning("could not %s: %s: %s", step, type(exc).__name__, exc)


#: why a row without a box cannot run under `detector=box` with no `detector.box`
NO_BOX = "detector=box needs a box: detector.box=[x1,y1,x2,y2] or the row's `box` column"


def _boxed(rows: list[Row], cfg: Config) -> list[Row]:
    """`rows`, those without a box refused where the detector is a fixed box given nowhere else (each
    failed in its avatar task, after the cluster started); ManifestError when that is all of them."""
    if cfg.detector.name != "box" or cfg.detector.box is not None:
        return rows
    rows = [row if row.box is not None or row.refused else replace(row, refused=NO_BOX) for row in rows]
    if all(row.refused for row in rows):
        raise ManifestError(f"{storage.display(cfg.manifest)} has no row that can run: {NO_BOX}")
    return rows


def run(
    cfg: Config,
    launched: float | None = None,
    guard: Callable[[], None] | None = None,
    accepted: Callable[[], None] | None = None,
) -> Summary:
    """Read the manifest, render every row, write the results table, return the summary.
    `launched`: when the run was asked for (time.time()), where the start-up breakdown begins;
    None = when this process started. `guard`: called on every turn of the campaign's loop, what it
    raises stops the campaign. `accepted`: called once the manifest and model files are found
    fit, before anything renders (a run refused before that leaves the output root as it was)."""
    cfg = cfg.anchored()
    storage.configure(cfg.storage.options)
    scratch.sweep()  # what killed processes on this node left
    # a manifest no row of which can run stops here, before any rendering
    rows = _boxed(read_manifest(cfg.manifest, cfg.output, cfg.storage.allow_outside_output), cfg)
    if in_the_way := cfg.layout.folders_in_the_way():
        raise InputError("output", in_the_way[0], "is a folder where the campaign keeps its own file: move it away")
    cfg = replace(cfg, model_versions=model_versions(cfg))
    _check_models(cfg)
    check_encoder(cfg)
    _check_cache(cfg.cache_uri)  # the last check: its probe makes the cache's folder
    if accepted is not None:
        accepted()
    storage.configure(cfg.storage.options, cfg.model_versions)
    for uri, version in cfg.model_versions.items():
        log.info("model file %s: this run uses version %s", storage.display(uri), version[:16])
    refused = [row.refused for row in rows if row.refused]
    if refused:
        log.warning(
            "%d of %d manifest rows cannot run; their results say why, the others go on. %s",
            len(refused),
            len(rows),
            "; ".join(refused[:5]) + (" ..." if len(refused) > 5 else ""),
        )
    if cfg.force:
        cfg = replace(cfg, forced_by=_forced_runs(cfg))
    startup = Startup()
    if launched is not None:
        startup.driver_started = launched
    try:
        with open_executor(cfg, startup) as executor:
            campaign = Campaign(cfg, rows, executor, startup, guard)
            if cfg.force:  # before anything renders: a stop from here on is resumed by the next forced run
                forced = {"runs": [*cfg.forced_by, campaign.run_token], "code": code_version()}
                storage.write_bytes(cfg.layout.forced, json.dumps(forced).encode())
            summary = campaign.run()
            _forced_run_done(cfg, summary, campaign.input_faults, guard)
            return summary
    finally:
        storage.configure(cfg.storage.options, {})  # this process's next campaign pins its own


def _stage_named(event: str, key: Any) -> str:
    """A stage task as the log and a row's error name it (`STAGES_WATCHED`)."""
    subject = storage.display(key[0]) if event == "avatar" else key[:12] if event == "audio_track" else key
    return STAGES_WATCHED[event].format(subject)


def _forced_runs(cfg: Config) -> list[str]:
    """The runs of a forced rerun of this output root that left rows unfinished, made by this code
    (none: this forced run renders everything again). Another release's are not gone on with: one
    kept months ago by a row whose input could not be read made `force=true` after an upgrade
    (what ops.md advises) skip every row the old code had published."""
    where = storage.display(cfg.layout.forced)
    try:
        kept = json.loads(storage.read_bytes(cfg.layout.forced))
        runs, code = kept.get("runs", []), kept.get("code")
    except FileNotFoundError:
        return []
    except (ValueError, AttributeError) as exc:
        log.warning("%s not read (%s): every row renders again", where, exc)
        return []
    if code != code_version():
        log.info("force=true renders every row again: the forced rerun in %s was made by other code", where)
        return []
    if runs:
        log.warning(
            "force=true goes on with the forced rerun of this output root that left rows unfinished: the rows it "
            "published stay done (remove %s to render every row again)",
            where,
        )
    return [str(run) for run in runs]


def _forced_run_done(cfg: Config, summary: Summary, input_faults: set[str], guard: Callable[[], None] | None) -> None:
    """After a run with every row done (none failed but for its own inputs: a limit reached or a
    stage stopped fails rows the next run renders, a bad file the same way again), no forced rerun
    is left to go on with: the next `force=true` renders everything again. A plain run's too (its
    user left the forced one unfinished). Not where another run holds the output root now. One bad
    row kept the file for ever: every later `force=true` skipped what the old forced runs made."""
    if any(r.status == "failed" and r.id not in input_faults for r in summary.rows):
        return
    try:
        if guard is not None:
            guard()
    except OutputLostError:
        return
    storage.remove(cfg.layout.forced)


def check_encoder(cfg: Config) -> None:
    """SettingsError for x264 settings x264 refuses, found by every renderer as it started (after
    the cluster and its actors had), each row failing with it: with `encoder.codec=libx264` any
    setting x264 will not open with (a level it cannot keep); with `auto`, which is x264 but on
    nodes with NVENC, an option x264 does not know (a typo in `encoder.x264_params`)."""
    codec = cfg.encoder.codec
    problem = encoder_problem("libx264", cfg.encoder) if codec in ("libx264", "auto") else None
    if problem and (codec == "libx264" or problem.startswith("encoder.x264_params=")):
        raise SettingsError(problem)


def _check_cache(cache: str) -> None:
    """CacheError for a cache in a bucket or below a file that does not exist: every row failed
    with it, one by one, after its inputs were read. Found by writing an empty probe there, left
    (a store may grant no deletes). A cache that cannot be written is let be: one warmed before
    serves every row that only reads it."""
    try:
        storage.write_bytes(storage.join(cache, CACHE_PROBE), b"")
    except (FileNotFoundError, NotADirectoryError) as exc:
        detail = getattr(exc, "strerror", None) or "no such bucket or folder"
        raise CacheError(f"cache {storage.display(cache)}: cannot be used ({detail})") from None
    except OSError as exc:
        if storage.retried(exc):  # the store is down: said as such, the run tried again later
            raise
        log.debug("cache %s not writable (%s): rows that need to write it will say so", cache, exc)


#: the empty file a campaign writes into its cache to find the cache's bucket there
CACHE_PROBE = "heygem-probe"


def _check_models(cfg: Config) -> None:
    """CheckpointError for a model file the campaign names that is not there (`model_versions` found
    none): every row failed, one by one, "renderer could not start"."""
    named = {
        "renderer.checkpoint": getattr(cfg.renderer, "checkpoint", None),
        "detector.checkpoint": cfg.detector.checkpoint,
        "qa.syncnet": cfg.qa.syncnet,
    }
    for key, uri in named.items():
        if uri and uri not in cfg.model_versions:
            why = (
                " (a relative path in a Ray job names a file in Ray's copy of its working directory, which "
                "infra/runtime_env.yaml ships without model files: give an absolute path or a URI)"
                if storage.is_relative(uri) and in_ray_job()
                else ""
            )
            raise CheckpointError(f"{key} {storage.display(uri)} does not exist{why}")


def _size(limit: float) -> str:
    """Bytes as a limit is said: GiB, or MiB under one."""
    return f"{limit / 2**30:.2f} GiB" if limit >= 2**30 else f"{limit / 2**20:.1f} MiB"


def _concerns(fault: BaseException | None, seconds: float) -> bool:
    """Whether the fault an avatar's tracking met (None: none) is a row's own: any, unless a damaged
    frame its narration of `seconds` stops short of (`InputError.from_seconds`)."""
    return fault is not None and not (isinstance(fault, InputError) and seconds < fault.from_seconds)
