"""Stage work that rows share, started once and waited on by every row that needs it: the face track
of an avatar (`prepare_avatar` tasks per avatar and box, one at a time, each reaching as far as the
longest narration waiting needs) and the encoded audio of a narration (one `prepare_audio_track`
task per audio content)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from heygem_ray.config import Config
from heygem_ray.devices import gpu_room
from heygem_ray.errors import CacheError, InputError
from heygem_ray.executors import Executor, Expired, failure_reason
from heygem_ray.manifest import Row
from heygem_ray.prepare import AudioInfo, AvatarTrack, prepare_audio_track, prepare_avatar

#: narrations whose encode task is remembered, so rows sharing one wait on the same task; an older
#: one is found in the cache by the task that a later row starts
AUDIO_TRACK_REFS = 1024
#: avatar tracks the driver keeps, most recently used, and the most bytes they may take together;
#: an older one is loaded from the cache again by the task the next row needing it starts (a track
#: is 24 bytes a frame, 6.5 MB for a 3-hour clip: by count alone, 256 of those took 1.7 GB)
AVATAR_TRACKS = 256
AVATAR_TRACK_BYTES = 256 * 2**20
#: `prepare_avatar` tasks of one avatar that may lose their worker (each after Ray's own retries)
#: before the avatar is taken as the cause (a clip that runs its tracker out of memory, a file
#: that crashes its decoder): else every batch of rows waiting on it killed workers again, and
#: Ray's memory monitor took renderers on the same node with them
AVATAR_CRASHES = 2

log = logging.getLogger("heygem_ray")

AvatarKey = tuple[str, tuple[int, int, int, int] | None]


@dataclass
class _Tracking:
    """A `prepare_avatar` task running, the narration seconds it was asked to reach, the rows
    (id, narration seconds, the avatar's fingerprint as the row found it: "" not known) waiting
    for it, and the avatar's bytes as the row that started it found them."""

    handle: Any
    seconds: float
    rows: list[tuple[str, float, str]]
    fingerprint: str = ""


def _track_bytes(known: _Known) -> int:
    return 0 if known.track is None else known.track.pts.nbytes + known.track.boxes.nbytes


@dataclass
class _Known:
    """What the driver knows of an avatar: its longest track, and the avatar's own fault (InputError,
    or a cache that refuses it) for narrations of `fault_from` seconds or more: a track that failed
    past a shorter one still serves the rows that one reaches."""

    track: AvatarTrack | None = None
    fault: BaseException | None = None
    fault_from: float = 0.0
    fault_of: str = ""  # the fingerprint of the bytes at fault ("" not known)
    crashes: int = 0  # its tasks that lost their worker

    def of_other_bytes(self, fingerprint: str) -> bool:
        """Whether the track or the fault kept is of other bytes than `fingerprint` (the avatar was
        replaced: a presenter without a face mended in place gets tracked again)."""
        if self.track is not None and self.track.fingerprint != fingerprint:
            return True
        return self.fault is not None and bool(self.fault_of) and self.fault_of != fingerprint

    def answer(self, seconds: float) -> AvatarTrack | BaseException | None:
        if self.fault is not None and seconds >= self.fault_from:
            return self.fault
        if self.track is not None and self.track.serves(seconds):
            return self.track
        return None


class SharedWork:
    def __init__(self, cfg: Config, executor: Executor):
        self.cfg, self.executor = cfg, executor
        self._known: OrderedDict[AvatarKey, _Known] = OrderedDict()  # most recently used last
        self._tracking: dict[AvatarKey, _Tracking] = {}
        self._audio_tracks: dict[str, Any] = {}  # by audio fingerprint, oldest first
        self._audio_failed: OrderedDict[Any, str] = OrderedDict()  # encode handle -> why it failed
        self._held: list[AvatarKey] = []  # avatars whose tracking waits for `_detect_gpus` (`start_held`)
        # S3FD runs on a GPU only when Ray gave its task one (heygem_ray.devices): ask for a share
        # where the cluster has GPUs, so detection is scheduled and accounted like rendering
        # where the actors leave one: else a detection task waits for ever (it detects on the CPU).
        # A cluster whose GPU workers scale from none has none yet: decided once the actors that
        # bring them are up (None until then), or every avatar was tracked on one CPU
        self._detect_gpus: float | None = 0.0
        if cfg.detector.gpu_share:
            no_gpus_yet = not executor.resources().get("GPU", 0.0) and cfg.cluster.actor.num_gpus > 0
            self._detect_gpus = None if no_gpus_yet else self._gpu_share()

    def _gpu_share(self) -> float:
        """The GPU share of a detection task, from the cluster's GPUs now."""
        share = self.cfg.detector.gpu_share
        gpus = self.executor.resources().get("GPU", 0.0)
        room = gpu_room(gpus, self.executor.actor_count(), self.cfg.cluster.actor.num_gpus, share)
        return share if room else 0.0

    def start_held(self, actors_settled: Callable[[], bool]) -> list[tuple[AvatarKey, Any, float]]:
        """The tracking tasks held until the GPU share of detection is known, started once the
        renderer actors are as many as they will be soon (`ActorPool.settled`, asked only while
        undecided): (avatar, handle, seconds) of each."""
        if self._detect_gpus is None:
            if not actors_settled():
                return []
            self._detect_gpus = self._gpu_share()
            log.info("face detection tasks ask for %g of a GPU each", self._detect_gpus)
        started = []
        for key in self._held:
            tracking = self._tracking.get(key)
            if tracking is not None and tracking.handle is None:
                tracking.handle = self._track(key, tracking.seconds)
                started.append((key, tracking.handle, tracking.seconds))
        self._held.clear()
        return started

    def avatar(self, row: Row, seconds: float, fingerprint: str = "") -> tuple[AvatarTrack | BaseException | None, Any]:
        """The track of the row's avatar as far as its narration of `seconds` shows (or why there is
        none) when known; else None, and the row waits for `avatar_done`. Also the handle of a
        `prepare_avatar` task started now, when no task for the avatar is running. One task at a
        time per avatar: rows that come meanwhile wait for it, and those it does not reach (longer
        narrations) share the next, which detects only the frames still missing. `fingerprint`:
        the avatar's bytes as the row found them: a kept track of others (the file was replaced
        meanwhile), or a fault of others, is forgotten, so the row is tracked on its own bytes."""
        key: AvatarKey = (row.avatar, row.box)
        known = self._known.get(key)
        if known is not None and fingerprint and known.of_other_bytes(fingerprint):
            del self._known[key]
            known = None
        if known is not None:
            self._known.move_to_end(key)
            answer = known.answer(seconds)
            if answer is not None:
                return answer, None
        tracking = self._tracking.get(key)
        if tracking is not None:  # one of other bytes too: `avatar_done` tracks it again after
            tracking.rows.append((row.id, seconds, fingerprint))
            return None, None
        handle = self._track(key, seconds)
        self._tracking[key] = _Tracking(handle, seconds, [(row.id, seconds, fingerprint)], fingerprint)
        return None, None if handle is None else (key, handle)

    def _track(self, key: AvatarKey, seconds: float) -> Any:
        """A `prepare_avatar` task's handle; None where it is held (`start_held`)."""
        if self._detect_gpus is None:
            self._held.append(key)
            return None
        cfg = self.cfg
        return self.executor.submit(
            prepare_avatar,
            key[0],
            key[1],
            cfg.detector,
            cfg.cache_uri,
            cfg.render.still_fps,
            cfg.render.max_fps,
            cfg.render.max_side,
            cfg.limits.max_avatar_pixels,
            cfg.storage.options,
            seconds,
            cfg.model_versions,
            num_gpus=self._detect_gpus,
        )

    def _forget_old_tracks(self) -> None:
        """Forget the least recently used avatars past AVATAR_TRACKS of them or AVATAR_TRACK_BYTES of
        their tracks (the newest is kept whatever its size)."""
        total = sum(_track_bytes(known) for known in self._known.values())
        while len(self._known) > 1 and (len(self._known) > AVATAR_TRACKS or total > AVATAR_TRACK_BYTES):
            total -= _track_bytes(self._known.popitem(last=False)[1])

    def avatar_done(
        self, key: AvatarKey, handle: Any, more: bool = True
    ) -> tuple[AvatarTrack | BaseException, list[str], tuple[AvatarKey, Any] | None]:
        """The finished `prepare_avatar` task's track (or its exception); the rows that waited for
        it and it answers; and the next task for this avatar, started now for the rows its track
        does not reach (none when not `more`: then every waiting row is answered with the track).
        A track, or the avatar's own fault (InputError), is kept for the next rows; any other failure
        (storage down past its retries, a lost worker) only fails the rows that waited, and the next
        row needing the avatar tries again. A cache that refuses the track (CacheError) refuses
        every row's: kept too. Rows that found other bytes than the task tracked (the file was
        replaced while it ran) are not answered: the next task tracks theirs."""
        tracking = self._tracking.pop(key)
        try:
            track: AvatarTrack | BaseException = self.executor.get(handle)
        except Exception as exc:  # noqa: BLE001 - each waiting row fails with it
            track = exc
        tracked = track.fingerprint if isinstance(track, AvatarTrack) else tracking.fingerprint
        # rows that found bytes newer than the task was started for and read: tracked again on
        # theirs (a row of the bytes it was started for, which it found replaced, is answered: the
        # campaign fails it, its bytes gone)
        known_bytes = {tracked, tracking.fingerprint}
        other = [r for r in tracking.rows if more and r[2] and tracked and r[2] not in known_bytes]
        rows = [r for r in tracking.rows if r not in other]
        known = self._known.setdefault(key, _Known())
        self._known.move_to_end(key)
        self._forget_old_tracks()
        if isinstance(track, BaseException):
            if self.executor.actor_lost(track):
                known.crashes += 1
                if known.crashes >= AVATAR_CRASHES:
                    why = f"lost the worker tracking its face {known.crashes} times (out of memory? see the node's log)"
                    track = InputError("avatar", key[0], why)
            cause = self.executor.cause(track)
            if isinstance(cause, (InputError, CacheError)):
                # past the frame at fault (a damaged one: its narrations longer than a track that stops
                # before it), else past a known track (the rows it reaches need no more frames than it
                # has); never past this task's reach, so its longest row is answered
                at = cause.from_seconds if isinstance(cause, InputError) else 0.0
                since = at or (tracking.seconds if known.track is not None else 0.0)
                known.fault, known.fault_from = track, min(since, tracking.seconds)
                known.fault_of = tracked
                # tracked anew, short of the frame (not once no renderer will take them: `more`)
                short = [r for r in rows if more and at and r[1] < known.fault_from]
                rows = [r for r in rows if r not in short]
                other += short
            return track, [row_id for row_id, _, _ in rows], self._follow(key, other, tracked)
        if (
            known.track is None
            or known.track.fingerprint != track.fingerprint
            or len(track.boxes) > len(known.track.boxes)
        ):
            # copies: arrays Ray hands over are views of its object store, held there while kept
            known.track = replace(track, pts=track.pts.copy(), boxes=track.boxes.copy())
        if known.fault is not None and known.fault_of and known.fault_of != track.fingerprint:
            known.fault, known.fault_of = None, ""  # the fault of bytes replaced since
        self._forget_old_tracks()
        reached = [not more or seconds <= tracking.seconds or track.serves(seconds) for _, seconds, _ in rows]
        served = [row_id for (row_id, _, _), ok in zip(rows, reached, strict=True) if ok]
        rest = [row for row, ok in zip(rows, reached, strict=True) if not ok]
        return track, served, self._follow(key, rest + other, tracked)

    def _follow(self, key: AvatarKey, rows: list[tuple[str, float, str]], tracked: str) -> tuple[AvatarKey, Any] | None:
        """The next task for an avatar, for the rows its last one did not answer (None: none left);
        of the bytes the newest of them found, where they found others than it tracked."""
        if not rows:
            return None
        fingerprint = next((fp for _, _, fp in reversed(rows) if fp and fp != tracked), tracked)  # the newest
        longest = max(seconds for _, seconds, _ in rows)
        handle = self._track(key, longest)
        self._tracking[key] = _Tracking(handle, longest, rows, fingerprint)
        return None if handle is None else (key, handle)

    def seconds_tracked(self, key: AvatarKey) -> float:
        """How many seconds of the avatar its task under way tracks (0: none is)."""
        tracking = self._tracking.get(key)
        return tracking.seconds if tracking is not None else 0.0

    def audio_track(self, audio: AudioInfo) -> tuple[Any, bool]:
        """The handle of the task encoding this narration for the output, one per distinct audio
        content, started when the first row needing it starts rendering (so it runs meanwhile); and
        whether it was started now."""
        handle = self._audio_tracks.pop(audio.fingerprint, None)
        new = handle is None
        if new:
            cfg = self.cfg
            handle = self.executor.submit(prepare_audio_track, audio, cfg.cache_uri, cfg.encoder, cfg.storage.options)
        self._audio_tracks[audio.fingerprint] = handle  # now the most recent
        while len(self._audio_tracks) > AUDIO_TRACK_REFS:
            del self._audio_tracks[next(iter(self._audio_tracks))]
        return handle, new

    def audio_track_done(self, fingerprint: str, handle: Any) -> None:
        """A finished encode task; a failed one is forgotten, so the next row with this narration
        starts another (the rows waiting on it fail at their stitch, with its cause:
        `audio_track_failure`)."""
        try:
            self.executor.get(handle)
        except Exception as exc:  # noqa: BLE001
            raw = handle.handle if isinstance(handle, Expired) else handle
            if self._audio_tracks.get(fingerprint) is raw:
                del self._audio_tracks[fingerprint]
            why = failure_reason(self.executor, exc)
            log.warning("audio track %s: %s", fingerprint[:16], why)
            self._audio_failed[raw] = why
            while len(self._audio_failed) > AUDIO_TRACK_REFS:
                self._audio_failed.popitem(last=False)

    def audio_track_failure(self, handle: Any) -> str | None:
        """Why the encode task `handle` failed (None: it did not, or long ago). A stitch waiting on
        an encode the campaign stopped failed with the stop's side effect (TaskCancelledError),
        not its reason."""
        return self._audio_failed.get(handle)
