"""The studio's store: every user's campaigns under one root (a local folder or any fsspec URI),
one folder per user and campaign. A user reaches only their own folder: names and campaign ids are
checked before any path is built, and nothing a user sends is used as a path.

    {store}/{user}/{campaign}/campaign.json     what the studio knows (name, rows, model, jobs)
    {store}/{user}/{campaign}/inputs/           the uploads and the manifest
    {store}/{user}/{campaign}/output/           the campaign's output root (videos, _results, ...)
"""

from __future__ import annotations

import calendar
import contextlib
import copy
import functools
import glob
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from zipstream import ZipStream

from heygem_ray import storage
from heygem_ray.config import LimitsConfig
from heygem_ray.errors import InputError, ManifestError
from heygem_ray.layout import CampaignLayout
from heygem_ray.manifest import (
    build_manifest,
    column_name,
    is_text,
    misspelled,
    plain_name,
    refusals,
    rows_from_table,
)
from heygem_ray.media.audio import SAMPLE_RATE, iter_pcm16k
from heygem_ray.media.video import probe
from heygem_ray.prepare import MIN_AUDIO_SECONDS
from heygem_ray.results import is_part, read_results, read_table, superseded
from heygem_ray.studio.users import check_name

AUDIO_TYPES = (".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus")
AVATAR_TYPES = (
    *(".mp4", ".mov", ".mkv", ".webm", ".avi"),
    *(".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif", ".avif"),
    ".gif",  # played at a steady rate, each frame held for its delay (`prepare._held`)
)
MANIFEST_TYPES = (".parquet", ".csv")
#: an uploaded manifest's limits (it is read whole, on the web server)
MANIFEST_MAX_BYTES = 10 * 2**20
MANIFEST_MAX_ROWS = 100_000
#: narrations, or presenters, one campaign takes: each is checked (decoded) as it comes, in the
#: request, so one user's event must not hold a slot every user's events share for long
MAX_UPLOADS = 1000
CAMPAIGN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
_ZIP_CHUNK = 2**20


class UploadError(ValueError):
    """An upload the studio refuses, with a message for the person who sent it."""


@dataclass
class CampaignRecord:
    id: str
    user: str
    name: str
    created: float
    rows: int
    model: str
    quality: str
    manifest: str
    output: str
    #: Ray job submission ids, oldest first (a re-run of failed rows adds one)
    jobs: list[str] = field(default_factory=list)
    #: the render overrides of its model and quality when it was made: a re-run renders with them,
    #: so an operator's later edit of `studio.models` neither changes its renderer nor re-renders
    #: its finished rows (None: a record from before they were kept)
    settings: list[str] | None = None
    #: when its last job was submitted (time.time()): a studio restarted since still waits for a
    #: submit whose answer was lost (`Cluster.note_submitted`)
    submitted: float | None = None


log = logging.getLogger("heygem_ray.studio")

_RECORD_FIELDS = frozenset(f.name for f in fields(CampaignRecord))

#: results tables the store keeps read (the campaigns being looked at; up to ~100 MB each at
#: MANIFEST_MAX_ROWS)
RESULTS_KEPT = 8
#: the rows of a results table not written yet: one list, so what is worked out from a table
#: (`_finished_of`) is kept for it too (a campaign's first run has none until its end)
_NO_TABLE: list[dict] = []
#: how often a running campaign's results parts are listed again (a page refreshes every 3 s)
PARTS_LISTED_SECONDS = 2.0
#: campaigns whose progress counts are kept (a few hundred bytes each)
PROGRESS_KEPT = 4096
#: whole feeds kept read, every row's status (the campaigns being looked at; a 100,000-row
#: campaign's is megabytes, read again by each of its pages every 3 s while it had not changed)
FEEDS_KEPT = 8
#: how long a user's listing of campaigns is reused (a record another studio or a hand changed
#: shows this much later; this studio's own changes show at once), for each LISTED_CAMPAIGNS of
#: theirs (on an object store the listing is a LIST per campaign folder)
LISTED_SECONDS = 15.0
LISTED_CAMPAIGNS = 100
#: campaign records kept read, by version (a page lists its user's every 3 s)
RECORDS_KEPT = 16384


class StudioStore:
    def __init__(self, root: str):
        self.root = storage.normalize(os.path.expanduser(root))
        # the root in the store's listings, its glob characters taken as they are ("studio [eu]")
        self._root_pattern = glob.escape(self.root)
        # table URI -> (its version, its rows, the parts it supersedes)
        self._results: dict[str, tuple[str | None, list[dict], str | None]] = {}
        # parts folder -> (when listed, its parts' rows by part name)
        self._part_rows: dict[str, tuple[float, dict[str, list[dict]]]] = {}
        # output URI -> (the table's rows read, how many part rows, their finished videos, those by
        # name, the finished rows' ids)
        self._finished: dict[str, tuple[list[dict], int, list[str], dict[str, str], frozenset[str]]] = {}
        self._progress: dict[str, tuple[str | None, dict]] = {}  # feed URI -> (its version, its counts)
        self._feeds: dict[str, tuple[str | None, dict]] = {}  # feed URI -> (its version, the whole feed)
        self._records: dict[str, tuple[str, CampaignRecord | None]] = {}  # record URI -> (its version, it)
        self._listed: dict[str, tuple[float, dict[str, str | None]]] = {}  # user -> (when, their records' versions)
        self._changed: Counter[str] = Counter()  # user -> changes this studio made to their records
        self._lock = threading.Lock()
        self.checks = UploadChecks()  # the page's checks of uploads, which saving them reuses

    # ---------------------------------------------------------------- paths
    def campaign_root(self, user: str, campaign_id: str) -> str:
        if not CAMPAIGN_ID.fullmatch(campaign_id):
            raise KeyError(campaign_id)
        return storage.join(self.root, check_name(user), campaign_id)

    def inputs(self, user: str, campaign_id: str) -> str:
        return storage.join(self.campaign_root(user, campaign_id), "inputs")

    def output(self, user: str, campaign_id: str) -> str:
        return storage.join(self.campaign_root(user, campaign_id), "output")

    def usage(self, user: str) -> int:
        """Bytes the user's campaigns hold (uploads, videos), not counting the user's cache (decoded
        narrations, face tracks: derived, and shared by campaigns that outlive each other)."""
        return storage.usage(storage.join(self.root, check_name(user)), leaving_out=self.cache(user))

    def cache(self, user: str) -> str:
        """The user's cache of decoded narrations and face tracks, shared by their campaigns."""
        return storage.join(self.root, check_name(user), "_cache")

    def users_with_caches(self) -> list[str]:
        """The users who have a cache in the store."""
        found = storage.glob(storage.join(self._root_pattern, "*", "_cache"))
        return sorted(storage.basename(storage.dirname(uri)) for uri in found)

    def delete(self, record: CampaignRecord) -> None:
        """The campaign's uploads and videos, then its record, gone: a deletion that fails halfway
        leaves the campaign listed, to be deleted again, never files no page shows."""
        root = self.campaign_root(record.user, record.id)
        self._relist(record.user)
        try:
            storage.remove(storage.join(root, "output"), recursive=True)
            storage.remove(storage.join(root, "inputs"), recursive=True)
            storage.remove(root, recursive=True)
        finally:
            self._relist(record.user)

    def discard(self, user: str, campaign_id: str) -> None:
        """Whatever a campaign that was never submitted left: its uploads, and its record where
        one was saved (a listing kept from meanwhile named it)."""
        try:
            storage.remove(self.campaign_root(user, campaign_id), recursive=True)
        finally:
            self._relist(user)

    def unrecorded(self, older_than: float) -> list[tuple[str, str]]:
        """(user, campaign id) of the campaign folders that hold no record and were begun more than
        `older_than` seconds ago: what a save cut short left (the studio stopped midway, the store
        failing, its removal failing too). No page lists them, yet the user's quota counts them."""
        recorded = {
            storage.dirname(uri) for uri in storage.glob(storage.join(self._root_pattern, "*", "*", "campaign.json"))
        }
        found = []
        for uri in storage.glob(storage.join(self._root_pattern, "*", "*")):
            campaign_id, user = storage.basename(uri), storage.basename(storage.dirname(uri))
            if not CAMPAIGN_ID.fullmatch(campaign_id) or uri in recorded:
                continue
            with contextlib.suppress(ValueError):  # a folder that is no user's, an id of no real time
                begun = calendar.timegm(time.strptime(campaign_id[:15], "%Y%m%d-%H%M%S"))
                if time.time() - begun > older_than:
                    found.append((check_name(user), campaign_id))
        return found

    def recorded(self, user: str, campaign_id: str) -> bool:
        """Whether the campaign's folder holds its record, or videos (asked again just before an
        unrecorded folder goes: a store whose rename cannot replace a file has no record for a
        moment while one is rewritten)."""
        root = self.campaign_root(user, campaign_id)
        return storage.exists(storage.join(root, "campaign.json")) or storage.exists(storage.join(root, "output"))

    @staticmethod
    def new_id() -> str:
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)

    # -------------------------------------------------------------- uploads
    def save_uploads(
        self, user: str, campaign_id: str, uploads: list[str], kind: str, max_bytes: int, by_name: bool = False
    ) -> list[str]:
        """Check uploaded files (`check_upload`) and put them into the campaign's inputs (a hard link
        where the store is on the upload cache's file system: the web server never changes an
        upload); returns their URIs there. Two uploads of one name are both kept, the second as
        `name-2`, each its own rows; `by_name` (a manifest names them): refused, as the manifest
        could not tell them apart."""
        folder = storage.join(self.inputs(user, campaign_id), kind)
        taken: set[str] = set()
        uris = []
        for local in uploads:
            name = self.checks.name(local, kind, max_bytes)
            # by their names in any case: on a store that ignores case (macOS, SMB) Intro.wav and
            # intro.wav are one file, and the second replaced the first
            if by_name and name.casefold() in taken:
                raise UploadError(repeated_name(name, kind))
            stem, suffix = os.path.splitext(name)
            stored, n = name, 1
            while stored.casefold() in taken:  # the campaign's folder is new: what this loop put there is all it holds
                n += 1
                stored = f"{stem}-{n}{suffix}"
            taken.add(stored.casefold())
            uri = storage.join(folder, stored)
            storage.publish_file(local, uri, link=True)  # a local store beside the upload cache: no copy
            uris.append(uri)
        return uris

    def pairs_manifest(self, user: str, campaign_id: str, audios: list[str], avatars: list[str]) -> tuple[str, int]:
        """Every avatar with every narration (N x M rows); the manifest's URI and row count."""
        if len(audios) * len(avatars) > MANIFEST_MAX_ROWS:
            raise UploadError(
                f"{len(avatars):,} presenter(s) x {len(audios):,} narration(s) is {len(audios) * len(avatars):,} videos: "
                f"a campaign has {MANIFEST_MAX_ROWS:,} at most"
            )
        uri = storage.join(self.inputs(user, campaign_id), "manifest.parquet")
        return uri, build_manifest(audios, avatars, uri)

    def uploaded_manifest(
        self, user: str, campaign_id: str, local: str, uploads: Mapping[str, list[str]]
    ) -> tuple[str, int]:
        """A manifest the user wrote (Parquet or CSV with `audio` and `avatar` columns), its files
        named relative to the campaign's uploads (`uploads`: the URIs `save_uploads` stored, by
        column), or as URIs inside the user's own folder: stored as Parquet with every path
        resolved. Raises UploadError for anything outside that folder, or a name none of the
        uploads has (a typo, or a file not uploaded: each of its rows failed in the job)."""
        name = Path(local).name
        table = read_uploaded_manifest(local)
        repeated = _repeated(table.column_names)
        if repeated:
            raise UploadError(f"{name}: the column(s) {', '.join(repeated)} appear more than once")
        missing = {"audio", "avatar"} - set(table.column_names)
        if missing:
            raise UploadError(f"{name}: needs the columns audio and avatar (missing: {', '.join(sorted(missing))})")
        if not 0 < table.num_rows <= MANIFEST_MAX_ROWS:
            raise UploadError(f"{name}: a manifest has 1 to {MANIFEST_MAX_ROWS:,} rows, this one {table.num_rows:,}")
        columns, problems = resolve_uploads(table, uploads, self.own(user))
        if problems:
            raise UploadError(f"{name}: " + "; ".join(problems))
        if "id" in table.column_names:  # ids as text (a CSV reads 1, 2, 3 as numbers)
            columns["id"] = [None if v is None else str(v) for v in table.column("id").to_pylist()]
        keep = {"box": table.column("box")} if "box" in table.column_names else {}
        out = pa.table({**columns, **keep})
        try:  # the campaign's own checks, now, rather than in a job that fails
            output = self.output(user, campaign_id)
            # ids differing only in case are one video on a store that ignores case (the job refused them)
            refusals(rows_from_table(out, output, name, case_blind=self._case_blind()), name)
        except ManifestError as exc:
            raise UploadError(str(exc)) from None
        buf = io.BytesIO()
        pq.write_table(out, buf)
        uri = storage.join(self.inputs(user, campaign_id), "manifest.parquet")
        storage.write_bytes(uri, buf.getvalue())
        return uri, out.num_rows

    # -------------------------------------------------------------- records
    def own(self, user: str) -> str:
        """The user's folder, as every URI in it begins."""
        return storage.join(self.root, user) + "/"

    @functools.cache  # noqa: B019 - one answer per store, which lives as long as the studio
    def _case_blind(self) -> bool:
        """Whether the store's file system takes names differing only in case for one."""
        return storage.case_blind(self.root)

    def save(self, record: CampaignRecord) -> None:
        uri = storage.join(self.campaign_root(record.user, record.id), "campaign.json")
        try:
            storage.write_bytes(uri, json.dumps(asdict(record), indent=1).encode())
        finally:
            self._relist(record.user)

    def _relist(self, user: str) -> None:
        """The user's campaigns are listed anew at the next `campaigns`: this studio changed one."""
        with self._lock:
            self._listed.pop(user, None)
            self._changed[user] += 1

    def load(self, user: str, campaign_id: str) -> CampaignRecord | None:
        """The user's campaign, None when there is none (or it is not theirs). A record this version
        cannot read (cut short, edited by hand, lacking a field) is None too, with a warning: one bad
        record must not break its user's page or the watcher of every campaign. Fields it does
        not know (a newer version's) are left out."""
        try:
            uri = storage.join(self.campaign_root(user, campaign_id), "campaign.json")
            data = json.loads(storage.read_bytes(uri))
        except (KeyError, FileNotFoundError):
            return None
        except ValueError as exc:
            log.warning("campaign record %s/%s unreadable: %s", user, campaign_id, exc)
            return None
        try:
            record = CampaignRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
        except (TypeError, AttributeError) as exc:  # a field missing, or not a JSON object at all
            log.warning("campaign record %s/%s unreadable: %s", user, campaign_id, exc)
            return None
        return record if record.user == user else None

    def campaigns(self, user: str) -> list[CampaignRecord]:
        """The user's campaigns, newest first. Read from one listing of the user's folder, each
        record read again only when its version changed (every open page lists them every few
        seconds: a user with hundreds of campaigns on an object store cost as many GETs each time)."""
        found = self._listing(user)
        records = []
        for uri, version in found.items():
            with self._lock:
                kept = self._records.get(uri)
            if kept is not None and version is not None and kept[0] == version:
                record = copy.deepcopy(kept[1])  # the caller's to change, as a record read anew is
            else:
                record = self.load(user, storage.basename(storage.dirname(uri)))
                if version is not None:
                    with self._lock:
                        _keep(self._records, uri, (version, copy.deepcopy(record)), RECORDS_KEPT)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.created, reverse=True)

    def has(self, user: str, campaign_id: str) -> bool:
        """Whether the user has this campaign, from their listing (no read of its record: asked by
        every poster and every seek of a video; an id that is no campaign of theirs must not make
        the results kept for the campaigns being looked at go)."""
        try:
            self.campaign_root(user, campaign_id)
        except (KeyError, ValueError):
            return False
        return any(storage.basename(storage.dirname(uri)) == campaign_id for uri in self._listing(user))

    def _listing(self, user: str) -> dict[str, str | None]:
        """The user's records and their versions, listed at most every LISTED_SECONDS per
        LISTED_CAMPAIGNS campaigns of theirs (on an object store a LIST per campaign folder, and
        every open page asks every 3 s), and at once after this studio changed one of them."""
        now = time.monotonic()
        with self._lock:
            listed, changes = self._listed.get(user), self._changed[user]
        if listed is not None and now - listed[0] < LISTED_SECONDS * max(1.0, len(listed[1]) / LISTED_CAMPAIGNS):
            return listed[1]
        found = storage.versions(storage.join(self._root_pattern, check_name(user), "*", "campaign.json"))
        with self._lock:
            if self._changed[user] == changes:  # not one from before a change made meanwhile
                self._listed[user] = (now, found)
        return found

    def all_campaigns(self) -> Iterator[CampaignRecord]:
        """Every user's campaigns (for the studio's own watcher, never for a page)."""
        for uri in storage.glob(storage.join(self._root_pattern, "*", "*", "campaign.json")):
            user = storage.basename(storage.dirname(storage.dirname(uri)))
            with contextlib.suppress(ValueError):  # a folder that is no user's
                record = self.load(user, storage.basename(storage.dirname(uri)))
                if record is not None:
                    yield record

    # -------------------------------------------------------------- outputs
    def end_logged(self, record: CampaignRecord) -> bool:
        """Whether the end of the campaign's latest job is in the studio's log already."""
        return bool(record.jobs) and storage.exists(self._end_note(record))

    def note_end_logged(self, record: CampaignRecord) -> None:
        storage.write_bytes(self._end_note(record), b"")

    def ends_noted(self) -> bool:
        """Whether a studio has noted campaign ends in this store before (see `note_end_logged`)."""
        return storage.exists(storage.join(self.root, ".ends-noted"))

    def note_ends_noted(self) -> None:
        storage.write_bytes(storage.join(self.root, ".ends-noted"), b"")

    def _end_note(self, record: CampaignRecord) -> str:
        return storage.join(self.campaign_root(record.user, record.id), f".logged-end-{record.jobs[-1]}")

    def progress(self, record: CampaignRecord, rows: bool = True) -> dict | None:
        """The campaign's progress feed (not to be changed: it is shared); without `rows`, its
        counts alone (no `row_status`). Read again only when the feed changed: every page refresh
        lists every campaign of the user, and a 100,000-row campaign's feed is megabytes."""
        uri = storage.join(record.output, "_progress.json")
        fs, path = storage.url_to_fs(uri)
        try:
            version = storage.version_key(uri, fs.info(path))
            with self._lock:
                kept = (self._feeds if rows else self._progress).get(uri)
            if kept is not None and version is not None and kept[0] == version:
                return kept[1]
            feed: dict = json.loads(storage.read_bytes(uri))
        except (FileNotFoundError, ValueError):
            return None
        counts = {k: v for k, v in feed.items() if k != "row_status"}
        with self._lock:
            _keep(self._progress, uri, (version, counts), PROGRESS_KEPT)
            if rows:
                _keep(self._feeds, uri, (version, feed), FEEDS_KEPT)
        return feed if rows else counts

    def results(self, output: str) -> list[dict]:
        """The results table of the campaign writing to `output`, read again only when it changed: every poster and video of
        a page asks for it (a 100,000-row table read per request made a page's cost grow as N²)."""
        return self._table(output)[0]

    def _table(self, output: str) -> tuple[list[dict], str | None]:
        """The results table's rows and the prefix of the parts it supersedes (`results`)."""
        uri = storage.join(output, "_results.parquet")
        fs, path = storage.url_to_fs(uri)
        try:
            version = storage.version_key(uri, fs.info(path))
            with self._lock:
                kept = self._results.get(uri)
            if kept is not None and version is not None and kept[0] == version:
                return kept[1], kept[2]
            rows, upto = read_table(uri)
        except FileNotFoundError:
            return _NO_TABLE, None
        with self._lock:
            _keep(self._results, uri, (version, rows, upto), RESULTS_KEPT)
        return rows, upto

    def _parts(self, output: str, upto: str | None) -> list[dict]:
        """The results a running (or killed) driver has written since the table, oldest first: its
        parts, listed at most every PARTS_LISTED_SECONDS and each read once (a part is never
        rewritten), so a page shows a video as soon as its row is on the store, not at the end."""
        folder = CampaignLayout(output).results_parts
        with self._lock:
            kept = self._part_rows.get(folder)
        if kept is None or time.monotonic() - kept[0] >= PARTS_LISTED_SECONDS:
            try:
                names = sorted(n for n in map(storage.basename, storage.listdir(folder)) if is_part(n))
            except FileNotFoundError:
                names = []
            read = {} if kept is None else kept[1]
            parts = {}
            for name in names:
                if name in read:
                    parts[name] = read[name]
                    continue
                try:
                    parts[name] = read_results(storage.join(folder, name))
                except FileNotFoundError:  # removed since the listing: the table now has its rows
                    continue
            kept = (time.monotonic(), parts)
            with self._lock:
                _keep(self._part_rows, folder, kept, RESULTS_KEPT)
        return [row for name, rows in kept[1].items() if not superseded(name, upto) for row in rows]

    def videos(self, output: str) -> list[str]:
        """URIs of the finished videos of the campaign writing to `output` (rows ok or skipped), in the order they finished
        after the results table's manifest order."""
        return self._finished_of(output)[0]

    def finished_videos(self, output: str) -> dict[str, str]:
        """The campaign's finished videos by file name (the first of a name)."""
        return self._finished_of(output)[1]

    def finished_rows(self, output: str) -> frozenset[str]:
        """The ids of the campaign's rows whose video is finished (ok or skipped)."""
        return self._finished_of(output)[2]

    def _finished_of(self, output: str) -> tuple[list[str], dict[str, str], frozenset[str]]:
        """From the results table and the parts written after it; worked out again only when those
        change: every page's refresh and every seek in a video asked (0.7 s for 100,000 rows)."""
        table, upto = self._table(output)
        parts = self._parts(output, upto)
        with self._lock:
            kept = self._finished.get(output)
        if kept is not None and kept[0] is table and kept[1] == len(parts):
            return kept[2], kept[3], kept[4]
        own = output.rstrip("/") + "/"
        finished: dict[str, str] = {}  # row id -> its video; a later result of a row counts
        for r in [*table, *parts]:
            finished.pop(r["id"], None)
            if r["status"] in ("ok", "skipped") and storage.normalize(r["output"]).startswith(own):
                finished[r["id"]] = r["output"]
        videos, ids = list(finished.values()), frozenset(finished)
        by_name: dict[str, str] = {}
        for uri in videos:
            by_name.setdefault(storage.basename(uri), uri)
        with self._lock:
            _keep(self._finished, output, (table, len(parts), videos, by_name, ids), RESULTS_KEPT)
        return videos, by_name, ids

    def zip_stream(self, record: CampaignRecord) -> tuple[int, Iterator[bytes]]:
        """The campaign's videos as one zip (stored, not compressed: H.264 does not shrink) and its
        length in bytes, known before the first byte from the store's listing (a browser shows the
        download's progress and time left), produced piece by piece while it is sent, never whole
        in memory. A video gone from the store since its row finished is left out. (A studio
        campaign's finished video is never replaced: its inputs and settings are fixed, and a re-run
        renders its failed rows alone; one replaced by hand mid-download ends the download.)"""
        videos = self.videos(record.output)
        sizes = storage.sizes(videos)
        archive = ZipStream(sized=True)
        for uri in videos:
            if uri in sizes:
                archive.add(_Video(uri, sizes[uri]), storage.basename(uri), size=sizes[uri])
        return len(archive), iter(archive)


class _Video:
    """A video's bytes for the zip, read only when the zip reaches it, in ranged reads (no object
    store's read-ahead per download); a few dozen bytes for each of 100,000 videos until then."""

    __slots__ = ("size", "uri")

    def __init__(self, uri: str, size: int) -> None:
        self.uri, self.size = uri, size

    def __iter__(self) -> Iterator[bytes]:
        return storage.iter_range(self.uri, 0, self.size, _ZIP_CHUNK)


#: what an uploaded Parquet manifest's columns may take once decoded: a few KiB of Parquet can
#: hold millions of repeats of a long string (dictionary and run-length encodings)
MANIFEST_MAX_DECODED_BYTES = 64 * 2**20


#: columns an uploaded manifest may have: it needs five; a file of 170,000 (a megabyte of commas)
#: would take the web server's memory and minutes of its time
MANIFEST_MAX_COLUMNS = 64


def _repeated(names: list[str]) -> list[str]:
    return sorted(name for name, count in Counter(names).items() if count > 1)


def read_uploaded_manifest(local: str) -> pa.Table:
    """A manifest a user uploaded (a .parquet or .csv file of bounded size), as a table; UploadError
    saying why not."""
    name = Path(local).name
    if not name.lower().endswith(MANIFEST_TYPES):
        raise UploadError(f"{name}: a manifest is a .parquet or .csv file")
    try:
        size = os.path.getsize(local)
    except FileNotFoundError:  # the web server let it go (uploads wait so long for Render)
        raise UploadError(f"{name}: the upload expired: upload it again") from None
    if size > MANIFEST_MAX_BYTES:
        raise UploadError(f"{name}: a manifest may be {MANIFEST_MAX_BYTES // 2**20} MiB at most")
    try:
        table = _small_csv(local, name) if name.lower().endswith(".csv") else _small_parquet(local, name)
    except (pa.ArrowException, OSError) as exc:
        raise UploadError(f"{name}: cannot read it as a table ({str(exc).splitlines()[0]})") from None
    return table.rename_columns([column_name(c) for c in table.column_names])


#: bytes of an uploaded CSV its header must end within
_CSV_BLOCK = 1 << 16
#: the columns of an uploaded manifest the studio reads (`output`: the studio names the videos)
_READ_COLUMNS = ("audio", "avatar", "id", "box")


def _ours(names: list[str], name: str) -> list[str]:
    """The columns of `names` the studio reads, as the manifest names them (in any case, with blanks
    or a byte-order mark: `manifest.column_name`); UploadError for an `output` column (left aside,
    its paths went unsaid) or one a slip from a column we read."""
    read = [column_name(n) for n in names]
    if "output" in read:
        raise UploadError(f"{name}: the studio names the videos itself: drop the output column")
    problems = misspelled(read)
    if problems:
        raise UploadError(f"{name}: " + "; ".join(problems))
    return [n for n, r in zip(names, read, strict=True) if r in _READ_COLUMNS]


def _small_csv(local: str, name: str) -> pa.Table:
    """A CSV manifest, once its header shows at most MANIFEST_MAX_COLUMNS columns: read by Arrow's
    streaming reader, whose first block (64 KiB) must hold the header, as Arrow itself parses it
    (blank lines, quoted line breaks, a byte-order mark). Our columns are read as text: ids 007 and
    010 were read as numbers, and became rows 7 and 10."""
    encoding = _csv_encoding(local, name)
    with _csv_reader(local, name, encoding) as reader:
        names = reader.schema.names
    # among ours: a spreadsheet's trailing commas make columns of no name, which nothing reads
    repeated = _repeated([r for r in map(column_name, names) if r in _READ_COLUMNS])
    if repeated:  # before a column is looked up by its name
        raise UploadError(f"{name}: the column(s) {', '.join(repeated)} appear more than once")
    wanted = _ours(names, name)
    with _csv_reader(local, name, encoding, dict.fromkeys(wanted, pa.string()), wanted) as reader:
        return reader.read_all()


def _csv_encoding(local: str, name: str) -> str:
    """UTF-8, or else Windows' own (Excel's "CSV (Comma delimited)" on Windows writes cp1252: "é"
    one byte, which Arrow refused with a bare error); UploadError for neither."""
    with open(local, "rb") as fh:
        data = fh.read(MANIFEST_MAX_BYTES + 1)
    for encoding in ("utf8", "cp1252"):
        try:
            data.decode(encoding)
        except UnicodeDecodeError:
            continue
        return encoding
    raise UploadError(f'{name}: is not UTF-8 text: save it as "CSV UTF-8"')


def _csv_reader(
    local: str, name: str, encoding: str, text: dict[str, pa.DataType] | None = None, only: list[str] | None = None
) -> pacsv.CSVStreamingReader:
    """Arrow's streaming reader of a CSV of MANIFEST_MAX_COLUMNS columns at most, `text` its columns
    read as text, `only` those read (a column of the user's own, typed from its first rows as
    numbers, failed the upload where later rows held text)."""
    try:
        reader = pacsv.open_csv(
            local,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, encoding=encoding),
            convert_options=pacsv.ConvertOptions(column_types=text or {}, include_columns=only or []),
        )
    except pa.ArrowInvalid as exc:
        if "straddling" in str(exc) or "block" in str(exc):  # no header's end in the first block
            if os.path.getsize(local) < _CSV_BLOCK:  # the whole file: a header alone, not ended
                raise UploadError(f"{name}: has no rows under its header") from None
            raise UploadError(f"{name}: a manifest has {MANIFEST_MAX_COLUMNS} columns at most, this one more") from None
        raise
    if len(reader.schema) > MANIFEST_MAX_COLUMNS:
        reader.close()
        raise UploadError(f"{name}: a manifest has {MANIFEST_MAX_COLUMNS} columns at most, this one more")
    return reader


def _small_parquet(local: str, name: str) -> pa.Table:
    """The manifest's columns, decoded only as far as its footer and its dictionaries show they fit
    MANIFEST_MAX_ROWS and MANIFEST_MAX_DECODED_BYTES: the web server must not decode a bomb."""
    file = pq.ParquetFile(local)
    if file.metadata.num_columns > MANIFEST_MAX_COLUMNS:  # from the footer, before its schema is walked
        raise UploadError(f"{name}: a manifest has {MANIFEST_MAX_COLUMNS} columns at most, this one more")
    names = file.schema_arrow.names
    repeated = _repeated([r for r in map(column_name, names) if r in _READ_COLUMNS])
    if repeated:  # before a column is looked up by its name
        raise UploadError(f"{name}: the column(s) {', '.join(repeated)} appear more than once")
    meta = file.metadata
    if meta.num_rows > MANIFEST_MAX_ROWS:
        raise UploadError(f"{name}: a manifest has 1 to {MANIFEST_MAX_ROWS:,} rows, this one {meta.num_rows:,}")
    wanted = _ours(names, name)
    for column in wanted:  # only kinds whose decoded size is counted below, or fixed a row
        kind = file.schema_arrow.field(column).type
        column = column_name(column)
        numbers = pa.types.is_list(kind) and (
            pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
        )
        fixed = pa.types.is_null(kind) or (column == "id" and pa.types.is_integer(kind))
        if not (is_text(kind) or fixed or (column == "box" and numbers)):
            raise UploadError(
                f"{name}: column {column} must hold text{' or four numbers' if column == 'box' else ''}, not {kind}"
            )
    stored = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] in wanted:
                stored += chunk.total_uncompressed_size
                if chunk.num_values > 4 * group.num_rows:  # a box is four numbers; the rest one value a row
                    raise UploadError(f"{name}: {chunk.path_in_schema} holds more values than it has rows")
    texts = [c for c in wanted if is_text(file.schema_arrow.field(c).type)]
    table = (
        pq.read_table(local, columns=wanted, read_dictionary=texts) if stored <= MANIFEST_MAX_DECODED_BYTES else None
    )
    decoded = stored if table is None else sum(_text_bytes(table.column(c)) for c in texts)
    if table is None or decoded > MANIFEST_MAX_DECODED_BYTES:
        raise UploadError(
            f"{name}: its columns take {decoded / 2**20:,.0f} MiB or more once read; a manifest takes at most "
            f"{MANIFEST_MAX_DECODED_BYTES // 2**20} MiB"
        )
    return table


def _text_bytes(column: pa.ChunkedArray) -> int:
    """The bytes a dictionary-read text column takes once each row has its own value."""
    total = 0
    for chunk in column.chunks:
        lengths = pc.binary_length(chunk.dictionary)
        total += pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0
    return total


def check_upload(local: str, kind: str, max_bytes: int) -> str:
    """An uploaded file's name as it will be stored, once its type, size and that it decodes as
    `kind` (audio | avatar) are checked; else UploadError saying what is wrong."""
    name = _safe_name(Path(local).name)
    allowed = AUDIO_TYPES if kind == "audio" else AVATAR_TYPES
    if not name.lower().endswith(allowed):
        raise UploadError(f"{name}: not an accepted {kind} file (accepted: {', '.join(allowed)})")
    try:
        size = os.path.getsize(local)
    except OSError:
        raise UploadError(f"{name}: the upload is gone from the web server (it expired): upload it again") from None
    if size > max_bytes:
        raise UploadError(f"{name}: {size / 2**20:.0f} MiB is over the upload limit of {max_bytes / 2**20:.0f} MiB")
    try:
        if kind == "audio":
            _long_enough(local, name)
        else:
            # the campaign's own limit, before a frame is decoded: a 16K PNG named .mp4 is gigabytes
            probe(local, 25.0, display_uri=name, max_pixels=LimitsConfig().max_avatar_pixels)
    except UploadError:
        raise  # readable, and said why not usable
    except (InputError, OSError, ValueError) as exc:
        raise UploadError(f"{name}: not a readable {kind} file ({str(exc).splitlines()[0]})") from None
    return name


def repeated_name(name: str, kind: str) -> str:
    """Why a manifest's campaign refuses a second upload of `name` (`save_uploads`' `by_name`)."""
    return (
        f"{name}: two of your {kind} uploads have this name (in some case), and the manifest names files by "
        "their names: rename one"
    )


def repeated_names(names: list[str]) -> list[str]:
    """The stored names given more than once, in any case (the second of each)."""
    seen: set[str] = set()
    repeats = []
    for name in names:
        if name.casefold() in seen:
            repeats.append(name)
        seen.add(name.casefold())
    return repeats


def _long_enough(local: str, name: str) -> None:
    """UploadError for a narration too short to render (a header with no samples, a click): the
    campaign refused it only once it ran, after Render had said all was well."""
    heard = 0
    for chunk in iter_pcm16k(local, display_uri=name):
        heard += len(chunk)
        if heard >= MIN_AUDIO_SECONDS * SAMPLE_RATE:
            return
    why = (
        f"is {heard / SAMPLE_RATE:.2f} s long: too short (at least {MIN_AUDIO_SECONDS:g} s)"
        if heard
        else "has no audio samples"
    )
    raise UploadError(f"{name}: {why}")


class UploadChecks:
    """What `check_upload` said of each upload lately, by path, size and time: Gradio names an
    upload by its content, so a file is decoded once however many times the page asks, and not
    again when its campaign is made (a thousand presenters took minutes of a request)."""

    KEPT = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._said: dict[tuple[str, str, int, float], tuple[str, str]] = {}  # -> (name, problem)

    def name(self, path: str, kind: str, max_bytes: int) -> str:
        """`check_upload`'s answer for the upload at `path`: its stored name, or UploadError."""
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        key = (os.path.realpath(path), kind, stat.st_size if stat else -1, stat.st_mtime if stat else 0.0)
        with self._lock:
            said = self._said.get(key)
        if said is None:
            try:
                said = (check_upload(path, kind, max_bytes), "")
            except UploadError as exc:
                said = ("", str(exc))
            if stat is not None:  # a file that is gone may come back: asked again
                with self._lock:
                    _keep(self._said, key, said, self.KEPT)
        if said[1]:
            raise UploadError(said[1])
        return said[0]

    def problem(self, path: str, kind: str, max_bytes: int) -> str:
        """Why the upload at `path` is refused as `kind` ("" when it is not)."""
        try:
            self.name(path, kind, max_bytes)
        except UploadError as exc:
            return str(exc)
        return ""


#: how the page names an upload of each manifest column
_KINDS = {"audio": "narration", "avatar": "presenter"}


def resolve_uploads(
    table: pa.Table, uploads: Mapping[str, list[str]], own: str, most: int = 5
) -> tuple[dict[str, list[str | None]], list[str]]:
    """A manifest's `audio` and `avatar` cells (`read_uploaded_manifest`) as URIs: a name relative
    to the campaign's uploads (`uploads`: their stored URIs, or names, by column) as the upload it
    means (`_UploadIndex`), a URI as it is, inside the user's folder `own`; and why not, for the
    first `most` cells at fault (each value once, with how many rows name it): what Render refuses,
    and the upload check tells as the files are picked."""
    columns: dict[str, list[str | None]] = {}
    faults: dict[tuple[str, str], list[int]] = {}  # (why, value) -> rows, in order
    for column in ("audio", "avatar"):
        index, kind = _UploadIndex(uploads.get(column, [])), _KINDS[column]
        resolved: list[str | None] = []
        for row, cell in enumerate(table.column(column).to_pylist() if column in table.column_names else []):
            value, uri, why = str(cell or "").strip(), None, ""
            if not value:
                why = f"a row has no {column}"
            # "::" chains fsspec file systems: a URI inside the user's folder could name another
            elif ".." in value.split("/") or "::" in value:
                why = f"{value[:80]!r} is not among your uploads"
            elif "://" in value or value.startswith("/"):
                uri = value if storage.normalize(value).startswith(own) else None
                why = "" if uri else f"{value[:80]!r} is not among your uploads"
            else:  # a file of this campaign's uploads, named as it was uploaded
                found = index.named(value)
                uri = found[0] if len(found) == 1 else None
                if not found:
                    why = f"{value[:80]!r} is not among your {kind} uploads"
                elif uri is None:
                    names = ", ".join(storage.basename(u) for u in found)
                    why = f"{value[:80]!r} could be any of your {kind} uploads {names}: name one as it is"
            if why:
                faults.setdefault((why, value), []).append(row + 1)
            resolved.append(uri)
        columns[column] = resolved
    problems = []
    for (why, _), rows in list(faults.items())[:most]:
        more = f" and {len(rows) - 1:,} more" if len(rows) > 1 else ""
        problems.append(f"row {rows[0]}{more}: {why}")
    return columns, problems


class _UploadIndex:
    """Which of a campaign's uploads (their stored URIs, or names) a manifest's relative name may
    mean: the one stored under that name, or else those whose letters and digits it shares, in
    any case (the web server drops characters such as `!`, `?` and `$` from an upload's name
    before we see it, so "Take 2!.wav" is stored as "Take-2.wav"). One is the answer; none or
    several are not. Indexed once, each name answered once: a plan of 100,000 rows over 1,000
    uploads took 45 s to match name by name (530 s by loose names), at every file picked; 0.14 s."""

    def __init__(self, uris: list[str]):
        self._stored = {storage.basename(uri): uri for uri in uris}
        self._loose: dict[str, list[str]] = {}
        for name, uri in self._stored.items():
            self._loose.setdefault(_loose(name), []).append(uri)
        self._answers: dict[str, list[str]] = {}

    def named(self, value: str) -> list[str]:
        answer = self._answers.get(value)
        if answer is None:
            exact = self._stored.get(_safe_name(value))
            answer = self._answers[value] = [exact] if exact else self._loose.get(_loose(value), [])
        return answer


def _loose(name: str) -> str:
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFC", os.path.basename(name))).casefold()


def _safe_name(name: str) -> str:
    """An upload's file name as it is stored: its last part only, in one Unicode form (a Mac's
    "é" is two code points, a manifest's one), letters and digits of any script kept, other
    characters replaced. Kept to ASCII, "café.wav" and "cafè.wav" were one name (a manifest naming
    one got the other) and "张三.wav" none ("wav", refused)."""
    return plain_name(os.path.basename(name)).strip("-.") or "upload"


def _keep(cache: dict[Any, Any], key: Any, value: Any, most: int) -> None:
    """`value` under `key`, newest last: the oldest entries go past `most`."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > most:
        del cache[next(iter(cache))]
