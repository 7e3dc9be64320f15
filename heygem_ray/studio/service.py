"""What the studio does, apart from its pages: make a campaign from uploads, submit it as a Ray job,
report on it from its progress feed, results and job, cancel it, re-run its failed rows, hand out
its videos. Every call names the user, and reaches that user's campaigns only."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from heygem_ray import storage
from heygem_ray.config import StudioConfig
from heygem_ray.daemon_threads import DaemonThreads
from heygem_ray.manifest import is_safe_id
from heygem_ray.studio.cluster import Cluster, ClusterUnavailable, JobUnknown, NotReached, Refused
from heygem_ray.studio.store import MAX_UPLOADS, CampaignRecord, StudioStore, UploadError

#: the weights-free renderer: every studio offers it
BUILTIN_MODELS: dict[str, list[str]] = {"classic (no weights)": ["renderer=classic"]}
#: quality -> encoder settings (the default encoder is "standard")
QUALITIES: dict[str, list[str]] = {
    "standard": [],
    "draft (small, fast)": ["encoder.crf=28", "render.max_side=1280"],  # 720p: 0.44x the pixels of 1080p
    "best (large)": ["encoder.crf=14", "encoder.preset=medium", "encoder.x264_params="],  # medium as x264 has it
}


#: the quality presets of campaigns made before campaigns kept their settings (a record whose
#: `settings` is None): their re-runs render as those were made, not with today's presets (the
#: draft's max_side), which would render every finished video again
LEGACY_QUALITIES: dict[str, list[str]] = {
    "standard": [],
    "draft (small, fast)": ["encoder.crf=28", "encoder.preset=superfast"],
    "best (large)": QUALITIES["best (large)"],
}

#: the campaigns a page lists with their progress, newest first: older ones are opened from its
#: chooser (a page read every campaign's progress feed every 3 s)
LISTED = 50

#: a campaign's states that will not change until it is submitted again
ENDED = ("finished", "failed", "cancelled")


def hydra_quoted(value: str) -> str:
    """`value` as a quoted Hydra override value: a store path with a space, parenthesis, quote or
    bracket ("/data/studio (prod)") made every job's command line fail to parse. Hydra unescapes a
    backslash only before a quote."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


#: a job whose submit's answer was lost, not known to the cluster yet: it may yet start
UNCONFIRMED_JOB = "submitted, but the cluster has not confirmed it yet: it may still start (try again in a few minutes)"
#: why a user's second campaign waits for their first to be saved
SAVING = "your last campaign is still being saved: wait for it, then look at the Campaigns tab"


class StoreFailed(RuntimeError):
    """The studio's store failed (an OSError: a file system or object store that did not answer)
    while a campaign was made: nothing was submitted. `saved` is the campaign where its record
    was kept (its page opens it, to re-run once the store answers), else None: nothing was kept."""

    def __init__(self, cause: OSError, saved: str | None = None):
        # the cause's reason, not its text: that names the store's folders, which are no user's business
        reason = os.strerror(cause.errno) if cause.errno else type(cause).__name__
        super().__init__(f"the studio's store failed ({reason})")
        self.saved = saved


class SubmitUnconfirmed(ClusterUnavailable):
    """A submit whose answer was lost, to a cluster that could not be asked after: its job may run.
    The campaign keeps the job's id, so its pages show it once the cluster answers."""


@dataclass
class CampaignView:
    record: CampaignRecord
    #: not submitted | queued | running | finished | cancelled | failed | unknown (the cluster does
    #: not answer, or no longer knows the job)
    status: str
    rows_total: int
    rows_done: int = 0
    rows_failed: int = 0
    frames_done: int = 0
    frames_planned: int = 0
    eta_seconds: float | None = None
    rows: list[dict] = field(default_factory=list)  # id, status, seconds, error: from the results or the feed
    note: str = ""
    #: the latest job's driver has written nothing yet: the counts and rows are the run before's
    earlier: bool = False


#: how long the web server keeps an upload no campaign took (Gradio's cache: see server.sweep_uploads)
UPLOAD_WINDOW_SECONDS = 900
#: how often the watcher looks for users' caches past `studio.user_cache_gb` (a walk of each cache) and
#: for campaign folders a cut-short save left (`remove_unrecorded`)
CACHE_TRIM_SECONDS = 3600.0
#: seconds after its id's time that a campaign folder without a record (a save cut short) is
#: removed: far longer than any save takes
UNRECORDED_SECONDS = 6 * 3600.0
#: how often the server sweeps Gradio's cache of uploads past UPLOAD_WINDOW_SECONDS: an upload lives up to
#: their sum, and counts against its user's quota as long
CACHE_SWEEP_SECONDS = 60
#: seconds an upload's quota check trusts the last count of the user's store (a walk of every file of
#: theirs: many small uploads at once walked it each, in the web server's shared threads); uploads
#: since are counted exactly, and a campaign's creation counts the store anew
USAGE_SECONDS = 10.0
#: campaigns saved at once (each copies its uploads into the store, mostly waiting on it): more wait
#: their turn in the studio (`Studio.save_later`), where a closed page does not drop them
SAVE_THREADS = 16

Saved = TypeVar("Saved")


@dataclass
class RecentUpload:
    """One upload request a user's quota counts (`Studio.admit_upload`): its bytes until it has
    arrived, then its files, each counted once however often it was sent again (Gradio names an
    upload by its content: the same file sent again after a refresh is the same file)."""

    when: float
    size: int
    #: the real paths of its files in the web server's cache, once it has arrived (None: counted by size)
    paths: tuple[str, ...] | None = None
    arrived: bool = False


def _arriving(uploads: list[RecentUpload], size: int) -> int | None:
    """The index of the oldest of `uploads` (oldest first) of `size` bytes still arriving: the one
    a request of that size that ends now was booked as."""
    return next((i for i, u in enumerate(uploads) if u.size == size and not u.arrived), None)


def pending_bytes(uploads: list[RecentUpload]) -> int:
    """What `uploads` (oldest first) hold: the size of each one still arriving, and each file once."""
    seen: set[str] = set()
    total = 0
    for upload in uploads:
        if not upload.paths:
            total += upload.size
            continue
        new = [p for p in upload.paths if p not in seen]
        total += upload.size * len(new) // len(upload.paths)
        seen.update(upload.paths)
    return total


def distinct_uploads(paths: list[str], what: str) -> list[str]:
    """`paths` without repeats (one file given twice is one upload: Gradio names an upload by its
    content), in order; UploadError past MAX_UPLOADS."""
    distinct = list(dict.fromkeys(os.path.realpath(p) for p in paths))
    if len(distinct) > MAX_UPLOADS:
        raise UploadError(f"{len(distinct):,} {what}: a campaign takes {MAX_UPLOADS:,} at most")
    return distinct


class Studio:
    def __init__(self, cfg: StudioConfig, cluster: Cluster, log: logging.Logger):
        self.cfg, self.cluster, self.log = cfg, cluster, log
        self.store = StudioStore(cfg.store)
        self.models = {**BUILTIN_MODELS, **{name: list(o) for name, o in cfg.models.items()}}
        self._ended: set[str] = set()  # jobs whose end is in the log already (since this studio started)
        self._watched: dict[str, CampaignRecord] = {}  # campaigns whose job may still end, by id
        self._campaign_locks: dict[str, threading.Lock] = {}  # see _acting_on
        self._uploads: dict[str, list[RecentUpload]] = {}  # user -> recent uploads, oldest first
        self._usage: dict[str, tuple[float, int]] = {}  # user -> (when begun, bytes) of the last count of their store
        self._changed: dict[str, float] = {}  # user -> when their store last changed (a count begun before: stale)
        self._counting: dict[str, threading.Lock] = {}  # see _store_usage
        self._lock = threading.Lock()
        self._creating: set[str] = set()  # users whose campaign is being saved and submitted now
        self._saving: set[str] = set()  # users with a save handed to `save_later`, waiting or under way
        self._savers = DaemonThreads("campaign-saver", SAVE_THREADS)
        self._held: Counter[str] = Counter()  # real path -> Renders being saved that hold it (`held`)
        self._admitting: dict[str, threading.Lock] = {}  # see _admission

    def watch(self, interval: float = 10.0) -> threading.Thread:
        """Log each campaign's end (finish, failure, cancel) as it happens, whether or not anyone
        has its page open: the campaigns found unfinished in the store when it starts, and every
        one submitted from then on. Runs on a thread of its own."""

        def loop() -> None:
            try:
                found = list(self.store.all_campaigns())
            except Exception as exc:  # noqa: BLE001 - the store is down: watch what is submitted from now on
                self.log.info("watch: cannot list the store: %s", exc)
                found = []
            # a store no studio noted ends in before (one from before the notes): its ends were logged
            # live then, so they are noted now, not logged again
            upgraded = not self.store.ends_noted()
            for record in found:
                with contextlib.suppress(Exception):  # a record it cannot read stays unwatched
                    if not record.jobs:
                        continue
                    if self.store.end_logged(record):  # it ended: no call to the cluster (one per campaign)
                        with self._lock:
                            self._ended.add(record.jobs[-1])
                        continue
                    view = self._view(record, rows=False, log_end=False)
                    if view.status not in ENDED or view.note:  # running, or the cluster did not say
                        with self._lock:
                            self._watched.setdefault(record.id, record)
                    elif not self.store.end_logged(record):  # it ended while no studio watched
                        if upgraded:
                            self.store.note_end_logged(record)
                        else:
                            self._log_end(record, view, late=True)
            with contextlib.suppress(Exception):
                self.store.note_ends_noted()
            trimmed_at = -math.inf
            while True:
                if time.monotonic() - trimmed_at >= CACHE_TRIM_SECONDS:
                    trimmed_at = time.monotonic()
                    with contextlib.suppress(Exception):  # logged inside; a watcher must outlive it
                        self.trim_caches()
                    with contextlib.suppress(Exception):
                        self.remove_unrecorded()
                with self._lock:
                    records = list(self._watched.values())
                for record in records:
                    try:
                        if self._view(record, rows=False).status in ENDED:
                            with self._lock:
                                if self._watched.get(record.id) is record:  # not re-run meanwhile
                                    del self._watched[record.id]
                    except Exception as exc:  # noqa: BLE001 - a watcher must outlive a bad record
                        self.log.info("watch campaign=%s: %s", record.id, exc)
                time.sleep(interval)

        thread = threading.Thread(target=loop, name="campaign-watcher", daemon=True)
        thread.start()
        return thread

    def trim_caches(self) -> list[str]:
        """Remove each user's cache past `user_cache_gb` while none of their campaigns is queued or
        running (held from their next submit meanwhile): outside the quota, it grew with every
        narration and presenter they ever used. Returns the users whose cache went."""
        limit = self.cfg.user_cache_gb * 2**30
        trimmed: list[str] = []
        if not limit:
            return trimmed
        for user in self.store.users_with_caches():
            try:
                size = storage.usage(self.store.cache(user))  # a walk of it: not while holding their submits
                if size <= limit:
                    continue
                with self._admission(user):
                    if self._runs_a_campaign(user):
                        continue
                    storage.remove(self.store.cache(user), recursive=True)
            except (ValueError, OSError, ClusterUnavailable) as exc:  # ValueError: a folder no user's
                self.log.info("cache user=%s: not trimmed: %s", user, exc)
                continue
            trimmed.append(user)
            self.log.info(
                "cache user=%s removed: %.1f GiB, over studio.user_cache_gb=%g",
                user,
                size / 2**30,
                self.cfg.user_cache_gb,
            )
        return trimmed

    def remove_unrecorded(self) -> list[tuple[str, str]]:
        """Remove the campaign folders a save cut short left without a record, UNRECORDED_SECONDS
        after they were begun (`StudioStore.unrecorded`): a studio stopped while it copied uploads
        left them in the user's quota for good, on no page to delete them from. Returns (user,
        campaign id) of those removed."""
        removed: list[tuple[str, str]] = []
        try:
            found = self.store.unrecorded(UNRECORDED_SECONDS)
        except OSError as exc:
            self.log.info("unrecorded campaigns: not listed: %s", exc)
            return removed
        for user, campaign_id in found:
            with self._lock:
                saving = self._campaign_locks.get(campaign_id)
            if saving is not None and saving.locked():  # being saved by this studio still
                continue
            try:
                if self.store.recorded(user, campaign_id):
                    continue
                self.store.discard(user, campaign_id)
            except OSError as exc:
                self.log.info("campaign user=%s campaign=%s: unrecorded, not removed: %s", user, campaign_id, exc)
                continue
            self._store_changed(user)
            removed.append((user, campaign_id))
            self.log.info("campaign user=%s campaign=%s: removed, its save cut short (no record)", user, campaign_id)
        return removed

    def _runs_a_campaign(self, user: str) -> bool:
        """Whether a campaign of the user's is queued or running (the cluster asked; raises
        ClusterUnavailable where it cannot say)."""
        for record in self.store.campaigns(user):
            if not record.jobs:
                continue
            try:
                job, _ = self._last_job(record)
            except JobUnknown:  # a job the cluster forgot (a restarted head): not running,
                if self._submitted_lately(record):  # unless a lost submit may start it
                    return True
                continue
            if job in ("PENDING", "RUNNING"):
                return True
        return False

    # ------------------------------------------------------------ creating
    def save_later(self, user: str, uploads: list[str], save: Callable[[], Saved]) -> Future[Saved]:
        """Run `save` (a page's Render: `create`, then the page's `uploads` let go) on the studio's
        own threads, SAVE_THREADS at once, whether or not the page that asked is still open: a
        Render waiting in Gradio's queue was dropped by a refresh, its campaign never made. One
        at a time per user, from when it is asked for (UploadError: a double click); its uploads
        are `held` from the sweep of old uploads until it ends."""
        with self._lock:
            if user in self._saving:
                raise UploadError(SAVING)
            self._saving.add(user)
            held = [os.path.realpath(p) for p in uploads]
            self._held.update(held)
        future = self._savers.submit(save)
        future.add_done_callback(lambda done: self._saved(user, held, done))
        return future

    def finish_saves(self, wait: float) -> list[str]:
        """At the studio's stop, once it takes no more requests: wait up to `wait` seconds for the
        Renders being saved (their pages said "being saved: it is listed once saved"), then log
        each user whose save is still waiting or under way, whom the operator must tell to Render
        again (a save cut short leaves no record: its folder goes 6 h on). Returns those users."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                left = sorted(self._saving)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for user in left:
            self.log.warning(
                "stop user=%s: a campaign being saved is cut short by the studio's stop: Render it again", user
            )
        return left

    def held(self) -> set[str]:
        """The real paths of the uploads whose Render is being saved (`save_later`), or waits to be:
        the server's sweep of old uploads leaves them."""
        with self._lock:
            return set(self._held)

    def held_elsewhere(self, path: str, own: int = 1) -> bool:
        """Whether a Render other than the one asking (holding `path` `own` times) holds it: Gradio
        names an upload by its content, so two users' Renders may hold one file."""
        with self._lock:
            return self._held[os.path.realpath(path)] > own

    def _saved(self, user: str, held: list[str], done: Future) -> None:
        with self._lock:
            self._saving.discard(user)
            self._held.subtract(held)
            self._held = +self._held  # counts at 0 dropped
        if not done.cancelled() and done.exception() is not None:  # its page may be gone: logged here too
            self.log.info("create user=%s: failed: %r", user, done.exception())

    def being_saved(self, user: str) -> bool:
        """Whether a campaign of the user's is being saved (listed once its uploads are in the store)."""
        with self._lock:
            return user in self._saving or user in self._creating

    def create(
        self,
        user: str,
        name: str,
        audios: list[str],
        avatars: list[str],
        manifest: str | None = None,
        model: str = "",
        quality: str = "standard",
    ) -> CampaignRecord:
        """A campaign from uploaded files (local paths the web server received): every avatar with
        every narration, or the rows of an uploaded manifest; stored, then submitted. Raises
        UploadError (nothing submitted) when an upload or a choice is refused, StoreFailed when the
        store fails."""
        model = model or next(iter(self.models))
        if model not in self.models:
            raise UploadError(f"unknown model {model!r}")
        if quality not in QUALITIES:
            raise UploadError(f"unknown quality {quality!r}")
        audios, avatars = distinct_uploads(audios, "narrations"), distinct_uploads(avatars, "presenters")
        with self._lock:  # one at a time per user: a double click made two campaigns of one upload
            if user in self._creating:
                raise UploadError(SAVING)
            self._creating.add(user)
        uploads = [*audios, *avatars, *([manifest] if manifest else [])]
        saved: str | None = None
        try:
            self._check_active(user)  # refused before its uploads are copied; checked again at its submit
            self._check_quota(user, uploads)
            campaign_id = self.store.new_id()
            with self._lock:
                held = self._campaign_locks.setdefault(campaign_id, threading.Lock())
            # held from its record's save to its submit: a re-run or delete of the campaign listed
            # meanwhile (not yet submitted) waits, rather than submit a second job or delete it under us
            with held:
                try:
                    record = self._store_campaign(user, campaign_id, name, audios, avatars, manifest, model, quality)
                except BaseException:  # a refused upload leaves no files that no page lists (and the quota counts)
                    self._discard(user, campaign_id)
                    raise
                saved = record.id
                with self._admission(user):
                    try:
                        self._check_active(user, campaign_id)  # a re-run from another page may have started
                    except UploadError:
                        self._discard(user, campaign_id)
                        raise
                    self._taken(user, uploads)
                    try:
                        self.submit(record)
                    except ClusterUnavailable as exc:
                        exc.saved = record.id
                        raise
            return record
        except OSError as exc:  # its page says so (it was Gradio's bare "Error"); the log has the whole of it
            self.log.warning("create user=%s: the store failed: %r", user, exc)
            raise StoreFailed(exc, saved) from exc
        finally:
            with self._lock:
                self._creating.discard(user)

    def _discard(self, user: str, campaign_id: str) -> None:
        """Remove a campaign that was refused while it was made (nothing was submitted); what a
        failing store keeps goes later (`remove_unrecorded`)."""
        try:
            self.store.discard(user, campaign_id)
        except Exception as exc:  # noqa: BLE001 - the refusal is what the page must say
            self.log.warning("create user=%s campaign=%s: not removed: %r", user, campaign_id, exc)

    def _store_campaign(
        self,
        user: str,
        campaign_id: str,
        name: str,
        audios: list[str],
        avatars: list[str],
        manifest: str | None,
        model: str,
        quality: str,
    ) -> CampaignRecord:
        limit = int(self.cfg.max_upload_mb * 2**20)
        by_name = bool(manifest)  # the manifest names them
        audio_uris = self.store.save_uploads(user, campaign_id, audios, "audio", limit, by_name)
        avatar_uris = self.store.save_uploads(user, campaign_id, avatars, "avatar", limit, by_name)
        for uri in [*audio_uris, *avatar_uris]:
            self.log.info("upload user=%s campaign=%s file=%s", user, campaign_id, storage.basename(uri))
        if manifest:
            uploads = {"audio": audio_uris, "avatar": avatar_uris}
            manifest_uri, rows = self.store.uploaded_manifest(user, campaign_id, manifest, uploads)
        elif audio_uris and avatar_uris:
            manifest_uri, rows = self.store.pairs_manifest(user, campaign_id, audio_uris, avatar_uris)
        else:
            raise UploadError("give at least one narration and one avatar (or a manifest)")
        record = CampaignRecord(
            id=campaign_id,
            user=user,
            name=(name or "").strip()[:120] or campaign_id,
            created=time.time(),
            rows=rows,
            model=model,
            quality=quality,
            manifest=manifest_uri,
            output=self.store.output(user, campaign_id),
            settings=self._settings(model, quality),
        )
        self.store.save(record)
        return record

    def admit_upload(self, user: str, size: int) -> str | None:
        """Whether the user may upload `size` more bytes now (None), or why not: what the user's
        campaigns hold, plus what they uploaded in the last UPLOAD_WINDOW_SECONDS (kept by the web
        server until a campaign takes it, or it expires), must stay within the quota. Without this
        the quota was met only when a campaign was made: uploads alone could fill the disk."""
        if not self.cfg.user_quota_gb:
            return None
        quota, now = self.cfg.user_quota_gb * 2**30, time.time()
        used = self._store_usage(user, now)
        with self._lock:
            kept = UPLOAD_WINDOW_SECONDS + CACHE_SWEEP_SECONDS
            recent = [u for u in self._uploads.get(user, []) if now - u.when < kept]
            if used + pending_bytes(recent) + size > quota:
                self._uploads[user] = recent
                return (
                    f"this upload ({_size(size)}) would take your campaigns and recent uploads past your "
                    f"{self.cfg.user_quota_gb:g} GiB: delete campaigns you no longer need (Campaigns tab)"
                )
            self._uploads[user] = [*recent, RecentUpload(now, size)]
        return None

    def upload_arrived(self, user: str, size: int, paths: list[str] | None = None) -> None:
        """An upload `admit_upload` let in has arrived whole, as `paths` in the web server's cache:
        it counts from now (its file is kept UPLOAD_WINDOW_SECONDS from its last write), not from
        when it began to arrive, and a file this user sent before counts once."""
        now = time.time()
        real = tuple(os.path.realpath(p) for p in paths) if paths else None
        with self._lock:
            recent = self._uploads.get(user, [])
            i = _arriving(recent, size)
            if i is not None:
                recent[i] = RecentUpload(max(recent[i].when, now), size, real, True)
                recent.sort(key=lambda u: u.when)  # counted once, by its latest copy's expiry

    def upload_ended(self, user: str, size: int) -> None:
        """An upload `admit_upload` let in whose request ended without it (cut off by a refresh or
        a dropped line, refused by the web server): it counts no more. Counted for the upload
        window, it kept the user's next uploads out for a quarter of an hour."""
        with self._lock:
            recent = self._uploads.get(user, [])
            i = _arriving(recent, size)
            if i is not None:
                del recent[i]

    def _store_usage(self, user: str, now: float) -> int:
        """What the user's store holds, counted at most every USAGE_SECONDS, one count at a time:
        uploads sent at once while the count is old each walked the whole store (seconds each, in
        the web server's shared threads). While it is being counted again, the last count is used."""
        with self._lock:
            counted = self._usage.get(user)
            counter = self._counting.setdefault(user, threading.Lock())
        if counted is not None and now - counted[0] <= USAGE_SECONDS:
            return counted[1]
        if counted is None:
            counter.acquire()  # the first count of theirs: every upload waits for it
        elif not counter.acquire(blocking=False):  # counted again now, by another upload
            return counted[1]
        try:
            with self._lock:
                counted = self._usage.get(user)
            if counted is not None and now - counted[0] <= USAGE_SECONDS:  # counted meanwhile
                return counted[1]
            return self._count(user)
        finally:
            counter.release()

    def _count(self, user: str) -> int:
        """Count the user's store now, and keep the count unless the store changed meanwhile (a
        campaign deleted, or uploads taken in, while it walked: counted again once)."""
        for _ in range(2):
            begun = time.time()
            used = self.store.usage(user)
            with self._lock:
                if begun > self._changed.get(user, 0.0):
                    self._usage[user] = (begun, used)
                    break
        return used

    def _store_changed(self, user: str) -> None:
        """The user's store changed: the next upload counts it anew (a count under way is not kept)."""
        with self._lock:
            self._usage.pop(user, None)
            self._changed[user] = time.time()

    def _taken(self, user: str, uploads: list[str]) -> None:
        """The user's `uploads` are in the store now, where its usage counts them: they leave the
        recent uploads, and the others stay counted. (Those not known by path, their bytes from the
        uploads counted by size, oldest first.)"""
        sizes = {os.path.realpath(p): os.path.getsize(p) for p in uploads}
        self._store_changed(user)  # the store's count before they went in: counted anew
        with self._lock:
            recent = self._uploads.get(user, [])
            known = {p for u in recent for p in u.paths or ()}
            unknown = sum(n for p, n in sizes.items() if p not in known)
            kept = []
            for upload in recent:
                if upload.paths:
                    left = tuple(p for p in upload.paths if p not in sizes)
                    upload.size, upload.paths = upload.size * len(left) // len(upload.paths), left
                    if not left:
                        continue
                else:
                    taken = min(unknown, upload.size)
                    upload.size, unknown = upload.size - taken, unknown - taken
                    if not upload.size:
                        continue
                kept.append(upload)
            self._uploads[user] = kept

    @contextlib.contextmanager
    def _admission(self, user: str) -> Iterator[None]:
        """One new job of the user's at a time, from the check of their limits to its submit:
        re-runs from two pages at once each passed the check before either was submitted."""
        with self._lock:
            lock = self._admitting.setdefault(user, threading.Lock())
        with lock:
            yield

    def _check_active(self, user: str, other_than: str | None = None) -> None:
        """Refuse one more campaign while the user has `max_active_campaigns` queued or running:
        counted from their campaigns in the store, whose jobs the cluster is asked about (it
        remembers those that ended), not from the watcher's, which a studio just started has not
        filled yet."""
        limit = self.cfg.max_active_campaigns
        if not limit:
            return
        active = 0
        for record in self.store.campaigns(user):  # newest first: the likeliest to run, and enough
            if active >= limit:
                break
            if not record.jobs or record.id == other_than:
                continue
            try:
                job, _ = self._last_job(record)
            except ClusterUnavailable:  # asked no more (each ask would wait): the submit will say so
                return
            except JobUnknown:  # a job the cluster forgot (a restarted head): not running
                continue
            active += job in ("PENDING", "RUNNING")
        if active >= limit:
            raise UploadError(
                f"you have {active} campaign(s) queued or running, the most at once: wait for one to end, "
                "or cancel one (Campaigns tab)"
            )

    def _check_quota(self, user: str, uploads: list[str], rerun: bool = False) -> None:
        """Refuse `uploads` that would take the user past their quota, or a re-run (`rerun`) while
        their campaigns are past it already (its videos would add more)."""
        if not self.cfg.user_quota_gb:
            return
        quota = self.cfg.user_quota_gb * 2**30
        used = self._count(user)
        incoming = sum(os.path.getsize(p) for p in uploads if os.path.exists(p))
        if rerun and used >= quota:
            raise UploadError(
                f"your campaigns take {_size(used)}, past your {self.cfg.user_quota_gb:g} GiB: delete "
                "campaigns you no longer need (Campaigns tab) before re-running one"
            )
        if used + incoming >= quota:  # its videos need room too
            raise UploadError(
                f"your campaigns take {_size(used)} of your {self.cfg.user_quota_gb:g} GiB and these uploads "
                f"{_size(incoming)} more: delete campaigns you no longer need (Campaigns tab)"
            )

    def _settings(self, model: str, quality: str) -> list[str]:
        return [*self.models.get(model, []), *QUALITIES.get(quality, [])]

    def job_overrides(self, record: CampaignRecord) -> list[str]:
        """The `heygem-ray render` overrides of the campaign's job: its files, the model and quality
        settings it was made with (re-runs included), and the operator's `render_overrides` as they
        are now (where and how it runs: they do not change its videos)."""
        return [
            f"manifest={hydra_quoted(record.manifest)}",
            f"output={hydra_quoted(record.output)}",
            # the user's own cache: their avatars and narrations are tracked and decoded once
            f"cache={hydra_quoted(storage.join(self.store.root, record.user, '_cache'))}",
            "render.progress=false",
            *(record.settings if record.settings is not None else self._legacy_settings(record)),
            *self.cfg.render_overrides,
        ]

    def _output_limit(self, user: str) -> list[str]:
        """`limits.max_output_gb`: the user's quota left now, so a job's videos stop at it (the
        quota is checked when a campaign is made, and its videos count only once rendered); none
        without a quota or where the operator's `render_overrides` set one (theirs holds). Campaigns
        running at once each get what is left at their submit, and rows under way finish: a soft
        limit, as the quota is."""
        if not self.cfg.user_quota_gb or self._operator_sets("limits.max_output_gb"):
            return []
        left = self.cfg.user_quota_gb * 2**30 - self.store.usage(user)
        return [f"limits.max_output_gb={max(left, 1.0) / 2**30:.9f}"]  # 0 would mean no limit

    def _cache_limit(self) -> list[str]:
        """`limits.max_cache_gb`: `user_cache_gb`, what a job may decode into the user's cache
        (outside the quota: a few MB of narrations uploaded decode to GBs, and the cache is trimmed
        only while no campaign of theirs runs); none without it or where `render_overrides` set one."""
        if not self.cfg.user_cache_gb or self._operator_sets("limits.max_cache_gb"):
            return []
        return [f"limits.max_cache_gb={self.cfg.user_cache_gb:g}"]

    def _operator_sets(self, key: str) -> bool:
        """Whether the operator's `render_overrides` set `key` (theirs holds)."""
        return key in (o.lstrip("+~").split("=", 1)[0] for o in self.cfg.render_overrides)

    def _legacy_settings(self, record: CampaignRecord) -> list[str]:
        """The settings of a campaign made before campaigns kept theirs: its model as offered now,
        never another renderer in place of one no longer offered."""
        if record.model not in self.models:
            raise UploadError(
                f"campaign {record.name!r} was made with model {record.model!r}, which this studio no longer offers: "
                "make a new campaign with the same files"
            )
        return [*self.models[record.model], *LEGACY_QUALITIES.get(record.quality, [])]

    def submit(self, record: CampaignRecord) -> str:
        """Start (or resume) the campaign as a new Ray job: finished rows are skipped by the driver."""
        # unique even when a submit whose record could not be saved left its id taken
        submission_id = f"heygem-{record.user}-{record.id}-{len(record.jobs) + 1}-{secrets.token_hex(2)}"
        overrides = [*self.job_overrides(record), *self._output_limit(record.user), *self._cache_limit()]
        # recorded before the submit: a job the cluster took while its answer was lost (a read
        # timeout) is this campaign's, to show, cancel, and keep a delete from; taken back only
        # where it surely did not go in
        before = record.submitted
        record.jobs.append(submission_id)
        record.submitted = time.time()
        self.store.save(record)
        try:
            self.cluster.submit(submission_id, overrides, {"heygem_user": record.user, "heygem_campaign": record.id})
        except ClusterUnavailable as exc:
            went_in = self._went_in(submission_id, exc)
            if went_in is False:
                record.jobs.remove(submission_id)
                record.submitted = before
                self.store.save(record)
                raise
            if went_in is None:
                raise SubmitUnconfirmed(str(exc)) from None
        with self._lock:
            self._watched[record.id] = record
        self.log.info("submit user=%s campaign=%s rows=%d job=%s", record.user, record.id, record.rows, submission_id)
        return submission_id

    def _last_job(self, record: CampaignRecord) -> tuple[str, float | None]:
        """`Cluster.job` of the campaign's last job, its submit time told first (`_submitted_lately`)."""
        if record.submitted is not None:
            self.cluster.note_submitted(record.jobs[-1], record.submitted)
        return self.cluster.job(record.jobs[-1])

    def _submitted_lately(self, record: CampaignRecord) -> bool:
        """Whether the campaign's last job was submitted lately, by this studio or by one before
        its restart (the record says when): a lost submit's job may yet come in."""
        if record.submitted is not None:
            self.cluster.note_submitted(record.jobs[-1], record.submitted)
        return self.cluster.submitted_lately(record.jobs[-1])

    def _went_in(self, submission_id: str, failed: ClusterUnavailable) -> bool | None:
        """Whether a submit that failed with `failed` started its job after all: False where no
        connection was made or the job server refused it (4xx); True where the cluster, asked
        after, knows the job; None where it does not, or cannot be asked: the answer may have been
        lost with the job still to come in (a job server slow enough for a read timeout)."""
        if isinstance(failed, (NotReached, Refused)):
            return False
        try:
            self.cluster.job(submission_id)
        except (JobUnknown, ClusterUnavailable):
            return None
        return True

    # ------------------------------------------------------------ reading
    def campaigns(self, user: str) -> tuple[list[CampaignView], list[CampaignRecord]]:
        """The user's campaigns, newest first: the views of the LISTED newest (each reads its
        progress, every few seconds while a page is open), and every record (a page offers them all)."""
        records = self.store.campaigns(user)
        return [self._view(record, rows=False) for record in records[:LISTED]], records

    def campaign(self, user: str, campaign_id: str) -> CampaignView | None:
        record = self.store.load(user, campaign_id)
        return None if record is None else self._view(record, rows=True)

    def job_log(self, user: str, campaign_id: str) -> str:
        record = self.store.load(user, campaign_id)
        if record is None or not record.jobs:
            return ""
        try:
            return self.cluster.logs(record.jobs[-1])
        except ClusterUnavailable as exc:
            return str(exc)
        except JobUnknown:  # a job the cluster no longer knows (it was restarted)
            return "(the cluster no longer has this job's log)"

    def _log_end(self, record: CampaignRecord, view: CampaignView, late: bool = False) -> None:
        """One log line for the end of the campaign's latest job, noted in the store so a studio
        started later neither repeats it nor, when it ended while none ran, leaves it out."""
        event = {"finished": "finish", "failed": "failure", "cancelled": "stopped"}[view.status]
        self.log.info(
            "%s user=%s campaign=%s rows=%d failed=%d job=%s%s%s",
            event,
            record.user,
            record.id,
            0 if view.earlier else view.rows_done,  # the run before's are not this job's
            0 if view.earlier else view.rows_failed,
            record.jobs[-1],
            " (before its driver started)" if view.earlier else "",
            " (ended while the studio was down)" if late else "",
        )
        try:
            self.store.note_end_logged(record)
        except OSError as exc:  # the line is written; a studio started later may write it again
            self.log.info("campaign=%s: end not noted in the store: %s", record.id, exc)

    def _view(self, record: CampaignRecord, rows: bool, log_end: bool = True) -> CampaignView:
        started: float | None = None
        note = ""
        try:
            job, started = self._last_job(record) if record.jobs else ("NOT_SUBMITTED", None)
        except ClusterUnavailable as exc:
            job, note = "UNKNOWN", str(exc)
        except JobUnknown:  # a job the cluster no longer knows (a new cluster): the feed says it all,
            job = "UNKNOWN"  # unless its submit's answer was lost lately: it may be on its way in
            if self._submitted_lately(record):
                job, note = "PENDING", UNCONFIRMED_JOB
        feed = self.store.progress(record, rows) or {}
        # the run before's, where this job's driver has not written one yet (a re-run queued, or
        # stopped or failed before it started): its rows and videos stay shown, its state is not this job's
        earlier = started is not None and bool(feed) and feed.get("started_at", 0) < started - 1
        state = None if earlier else feed.get("state")
        counts = feed.get("rows", {})
        view = CampaignView(record, "queued", counts.get("total", record.rows), note=note, earlier=earlier)
        view.rows_done = sum(counts.get(s, 0) for s in ("ok", "failed", "skipped"))
        view.rows_failed = counts.get("failed", 0)
        view.frames_done = feed.get("frames", {}).get("done", 0)
        view.frames_planned = feed.get("frames", {}).get("planned", 0)
        eta, updated = feed.get("eta_seconds"), feed.get("updated_at")
        # as of now, not of the feed's writing (every few seconds; a driver gone quiet: far longer)
        view.eta_seconds = (
            None if eta is None or earlier else max(0.0, eta - max(0.0, time.time() - (updated or time.time())))
        )
        view.status = _status(job, state)
        # the job ended but its driver never wrote its last feed (killed, its node lost): nothing
        # is under way, whatever that feed still says
        # (and a re-run waiting behind such a one shows its rows alike)
        orphaned = (view.status in ENDED or earlier) and feed.get("state") == "running"
        if orphaned:
            view.eta_seconds = None
        with self._lock:  # an end the cluster did not confirm (it does not answer) is not one yet
            ended = view.status in ENDED and not view.note and bool(record.jobs) and record.jobs[-1] not in self._ended
            if ended:
                self._ended.add(record.jobs[-1])
        if ended and log_end:
            self._log_end(record, view)
        if rows:
            # the results table is this run's once its feed says the run ended
            results = (
                self.store.results(record.output) if feed.get("state") in ("finished", "interrupted", "failed") else []
            )
            if results:
                # the store's paths off the page (its folders, an S3 bucket's name): a file by its name
                root = self.store.campaign_root(record.user, record.id)
                view.rows = [
                    {
                        "id": r["id"],
                        "status": r["status"],
                        "seconds": r["render_seconds"],
                        "error": _without_folders(r["error"] or "", root),
                    }
                    for r in results
                ]
            else:
                # an orphaned job's rows that finished after its last feed are in its results parts
                finished = self.store.finished_rows(record.output) if orphaned else frozenset()
                view.rows = [
                    {"id": row_id, "status": s, "seconds": None, "error": ""}
                    if not orphaned or s in ("ok", "failed", "skipped")
                    else {"id": row_id, "status": "ok", "seconds": None, "error": ""}
                    if row_id in finished
                    else {"id": row_id, "status": "not finished", "seconds": None, "error": NOT_FINISHED}
                    for row_id, s in feed.get("row_status", {}).items()
                ]
        return view

    # ------------------------------------------------------------ acting
    def cancel(self, user: str, campaign_id: str) -> bool:
        """Stop the campaign's latest job; False when none runs (or it is not the user's). Not while
        a re-run from another page submits: that one's job is the one to stop."""
        with self._acting_on(user, campaign_id):
            record = self.store.load(user, campaign_id)
            if record is None or not record.jobs:
                return False
            try:
                stopped = self.cluster.stop(record.jobs[-1])
            except ClusterUnavailable:  # the job may well be running: say so, not "nothing to cancel"
                raise
            except JobUnknown:  # a job the cluster no longer knows: nothing runs to stop,
                if self._submitted_lately(record):  # unless it is on its way in
                    raise ClusterUnavailable(UNCONFIRMED_JOB) from None
                return False
            if stopped:  # the log says what was done: a cancel of a finished campaign stops nothing
                self.log.info("cancel user=%s campaign=%s job=%s", user, campaign_id, record.jobs[-1])
            return stopped

    def delete(self, user: str, campaign_id: str) -> bool:
        """Delete one of the user's campaigns with its uploads and videos; False when there is none
        or it is still queued or running (cancel it first: its job would go on writing). Raises
        ClusterUnavailable when the cluster cannot say whether its job still runs."""
        with self._acting_on(user, campaign_id):
            view = self.campaign(user, campaign_id)
            if view is None or view.status in ("queued", "running"):
                return False
            if view.note:  # the cluster did not answer (a job it no longer knows cannot be writing)
                raise ClusterUnavailable(view.note)
            self.store.delete(view.record)
            with self._lock:
                self._watched.pop(campaign_id, None)
            self._store_changed(user)  # room made: the next upload counts it
        self.log.info("delete user=%s campaign=%s", user, campaign_id)
        return True

    def rerun(self, user: str, campaign_id: str) -> str | None:
        """Submit the campaign again (or for the first time, if the cluster did not answer then): its
        finished rows are skipped, the failed and unfinished ones render. None when it is still
        running (or not the user's)."""
        with self._acting_on(user, campaign_id):
            view = self.campaign(user, campaign_id)
            if view is None or view.status in ("queued", "running"):
                return None
            if view.note:  # the cluster cannot say whether the campaign's job runs: not a second one
                raise ClusterUnavailable(view.note)
            if view.status == "finished" and not view.rows_failed and view.rows_done >= view.rows_total:
                # a job's start (seconds) and one of the user's active campaigns, to skip every row
                raise UploadError("nothing to re-run: every video of this campaign is done")
            with self._admission(user):
                self._check_active(user, campaign_id)
                self._check_quota(user, [], rerun=True)
                return self.submit(view.record)

    @contextlib.contextmanager
    def _acting_on(self, user: str, campaign_id: str) -> Iterator[None]:
        """One re-run, cancel or delete of a campaign at a time (pages act concurrently): a re-run
        between a delete's check and its removal would start a job writing into a deleted campaign,
        and a cancel during a re-run's submit would stop the old job, not the new one. Locks
        are kept for the user's own campaigns only, not for any name a client sends."""
        if self.store.load(user, campaign_id) is None:
            yield
            return
        with self._lock:
            lock = self._campaign_locks.setdefault(campaign_id, threading.Lock())
        with lock:
            yield

    def videos(self, user: str, campaign_id: str) -> list[str]:
        record = self.store.load(user, campaign_id)
        return [] if record is None else self.store.videos(record.output)

    def has_campaign(self, user: str, campaign_id: str) -> bool:
        return self.store.has(user, campaign_id)

    def _output(self, user: str, campaign_id: str) -> str | None:
        """Where the user's campaign writes (None when they have no such campaign). Not read from
        its record: the file routes ask for every poster and every seek of a video, and a
        campaign's output folder is its user's and its id's, whatever its record says now."""
        return self.store.output(user, campaign_id) if self.store.has(user, campaign_id) else None

    def video(self, user: str, campaign_id: str, name: str) -> str | None:
        """The URI of one of the campaign's videos by file name, if it is one."""
        output = self._output(user, campaign_id)
        return None if output is None else self.store.finished_videos(output).get(name)

    def thumbnail(self, user: str, campaign_id: str, row_id: str) -> bytes | None:
        """A row's thumbnail from the user's own campaign (a row id is a plain file name: checked
        as the manifest checks it, not looked up among every result on each poster a page asks for)."""
        output = self._output(user, campaign_id)
        if output is None or not is_safe_id(row_id):
            return None
        try:
            return storage.read_bytes(storage.join(output, "_thumbs", f"{row_id}.jpg"))
        except FileNotFoundError:
            return None

    def zip(self, user: str, campaign_id: str) -> tuple[int, Iterator[bytes]] | None:
        """The user's campaign's videos as a zip: its length and its bytes (`StudioStore.zip_stream`)."""
        record = self.store.load(user, campaign_id)
        if record is None:
            return None
        self.log.info("download user=%s campaign=%s", user, campaign_id)
        return self.store.zip_stream(record)


#: a row the ended job's driver left unfinished without reporting it
NOT_FINISHED = "its job ended before this row finished: re-run the campaign"


def _status(job: str, feed_state: str | None) -> str:
    """A campaign's state from its latest job's and its progress feed's (the feed may be the
    previous run's until the new driver writes one)."""
    if job == "NOT_SUBMITTED":
        return "not submitted"
    if job == "PENDING":
        return "queued"
    if job == "RUNNING":
        return "running"
    if feed_state == "failed":  # an error ended the driver (its rows say which), not a cancel
        return "failed"
    if job == "STOPPED" or feed_state == "interrupted":
        return "cancelled"
    if feed_state == "finished":  # the job SUCCEEDED, or FAILED because some rows did (exit 1)
        return "finished"
    if job == "FAILED":
        return "failed"
    return "finished" if job == "SUCCEEDED" else "unknown"


def _size(size: float) -> str:
    """`size` bytes as a person reads it: "340 KiB", "12.5 MiB", "3.20 GiB" (a small upload was "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}" if unit == "GiB" else f"{size / scale:.1f} {unit}"
    return f"{max(1, round(size / 2**10))} KiB"


def _without_folders(error: str, root: str) -> str:
    """A row's error with the campaign's folder (`root`, in any of the forms a message names it)
    left out of the paths it names: "avatar inputs/avatar/noface.mp4: no face found ...", not the
    store's whole path."""
    for shown in {root, storage.display(root), storage.normalize(root)}:
        error = error.replace(shown.rstrip("/") + "/", "")
    return error
