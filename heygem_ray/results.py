"""The campaign's results table ({output}/_results.parquet) and its one-line summary."""

from __future__ import annotations

import calendar
import io
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, fields, replace

import pyarrow as pa
import pyarrow.parquet as pq

from heygem_ray import qa, storage

log = logging.getLogger("heygem_ray")

#: the error of a row an earlier run published that a stop left no time to check: it says
#: nothing of the video, which the next stop checks still (`published_earlier`)
UNCHECKED = (
    "campaign interrupted before this run checked the video an earlier run published for this row"
    " (a rerun checks it, and skips the row while it is current)"
)

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # ok | failed | skipped
        ("output", pa.string()),
        ("error", pa.string()),
        ("audio_seconds", pa.float64()),
        ("frames", pa.int64()),
        ("segments", pa.int64()),
        ("render_seconds", pa.float64()),  # wall seconds from admission to published output
        ("attempts", pa.int64()),  # most tries any one segment of the row needed
        ("finished_at", pa.timestamp("s", tz="UTC")),
        ("sync_score", pa.float64()),  # lip sync: correlation of mouth change and speech (heygem_ray.qa)
        ("sync_offset_frames", pa.int64()),  # the best offset between them, frames
        ("sync_method", pa.string()),  # how it was scored: motion-energy | syncnet
        ("sync_distance", pa.float64()),  # syncnet: mean embedding distance at the best offset (LSE-D)
        ("frames_without_face", pa.int64()),  # frames passed through: the face was lost
        ("qa_flag", pa.string()),  # why a look is needed ("" = it is not)
    ]
)


@dataclass(frozen=True)
class RowResult:
    id: str
    status: str
    output: str
    error: str | None
    audio_seconds: float | None
    frames: int | None
    segments: int | None
    render_seconds: float | None
    attempts: int
    finished_at: float
    sync_score: float | None = None
    sync_offset_frames: int | None = None
    sync_method: str | None = None
    sync_distance: float | None = None
    frames_without_face: int | None = None
    qa_flag: str = ""


@dataclass(frozen=True)
class Summary:
    rows: list[RowResult]
    wall_seconds: float
    #: seconds of each start-up step up to the first rendered frames (startup.Startup.breakdown)
    startup: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: list[RowResult], wall_seconds: float, startup: dict[str, float] | None = None) -> Summary:
        return cls(rows, wall_seconds, dict(startup or {}))

    def startup_line(self) -> str:
        """ "driver 0.6 s, ray start 3.1 s, ...; first frames 9.8 s after launch" (empty when nothing rendered)."""
        steps = dict(self.startup)
        total = steps.pop("first frames after launch", None)
        if total is None:
            return ""
        return (
            ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
            + f"; first frames {total:.1f} s after launch"
        )

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def line(self) -> str:
        audio = sum(r.audio_seconds or 0.0 for r in self.rows if r.status == "ok")
        speed = f", {audio / self.wall_seconds:.2f}x realtime" if audio and self.wall_seconds else ""
        return (
            f"{len(self.rows)} rows: {self.count('ok')} ok, {self.failed} failed, {self.count('skipped')} skipped; "
            f"{audio:.1f} s of audio rendered in {self.wall_seconds:.1f} s{speed}"
        )


def _parquet(rows: list[RowResult], parts_upto: str | None = None) -> bytes:
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in fields(RowResult)}
    columns["finished_at"] = [int(t) for t in columns["finished_at"]]
    schema = SCHEMA if parts_upto is None else SCHEMA.with_metadata({_PARTS_UPTO: parts_upto})
    table = pa.Table.from_pydict(columns, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


#: the whole table's metadata key: the name prefix of the parts of the run that wrote it; its
#: results supersede those parts and every earlier run's (the prefixes sort by start time)
_PARTS_UPTO = b"heygem_ray.parts_upto"


def write_results(uri: str, rows: list[RowResult], parts_upto: str | None = None) -> None:
    """Write the whole table; `parts_upto`: the prefix of the writing run's parts (`ResultsTable`)."""
    storage.write_bytes(uri, _parquet(rows, parts_upto))


def read_results(uri: str) -> list[dict]:
    return read_table(uri)[0]


def read_table(uri: str) -> tuple[list[dict], str | None]:
    """The rows of a results table, and the prefix of the parts it supersedes (None: none named)."""
    with storage.open_uri(uri) as fh:
        table = pq.ParquetFile(fh).read()
    upto = (table.schema.metadata or {}).get(_PARTS_UPTO)
    return table.to_pylist(), None if upto is None else upto.decode()


#: seconds added to the wait between parts for each part written: a day-long campaign left
#: ~8,600 parts at one per 10 s, which every reader of them (a stopped run's report, the studio
#: every 2 s) lists and reads; so ~1,300, each at most a few minutes after its rows
SECONDS_PER_PART = 0.1


class ResultsTable:
    """A campaign's results, on the store as rows finish: at most every `flush_seconds` (more as
    parts pile up, SECONDS_PER_PART each), or every `flush_rows` results, the results not yet
    written go to a new part, `{parts}/part-*.parquet`;
    `finish` writes the whole table, one row per manifest row in manifest order, to `uri` and
    removes the parts. A driver that is killed leaves its parts: every result up to the last
    flush is on the store (`read_parts`), and a rerun, which resumes the finished rows from their
    markers, writes the whole table again."""

    def __init__(self, uri: str, parts: str, flush_seconds: float = 10.0, flush_rows: int = 1000):
        self.uri, self.parts = uri, parts
        self.flush_seconds, self.flush_rows = flush_seconds, flush_rows
        self._results: dict[str, RowResult] = {}
        self._unwritten: list[RowResult] = []
        self._flushed_at = time.monotonic()
        # parts of this run sort after those an earlier run left, to the millisecond (and apart
        # from those of another table of this process, in the same millisecond), even where that
        # run's host's clock was ahead of this one's: its table then hid this run's parts
        ms = max(time.time_ns() // 10**6, _latest_part_ms(uri, parts) + 1)
        self._own = f"part-{_part_stamp(ms)}-{os.getpid()}-{secrets.token_hex(3)}-"
        self._written_parts = 0
        self._refused = False  # the last part was refused by the store

    def __contains__(self, row_id: str) -> bool:
        return row_id in self._results

    def __len__(self) -> int:
        return len(self._results)

    def __getitem__(self, row_id: str) -> RowResult:
        return self._results[row_id]

    def add(self, result: RowResult, flush: bool = True) -> None:
        """Keep a row's result; `flush` False: not written to a part of its own accord (the final
        table follows at once)."""
        self._results[result.id] = result
        self._unwritten.append(result)
        if not flush:
            return
        if len(self._unwritten) >= self.flush_rows and not self._refused:
            self.flush()
        self.tick()

    def tick(self) -> None:
        """Flush when results have waited long enough: called as results arrive and by the
        campaign's loop, so a result is on the store in time even when no other follows it."""
        wait = max(self.flush_seconds, SECONDS_PER_PART * self._written_parts)
        if self._unwritten and time.monotonic() - self._flushed_at >= wait:
            self.flush()

    def flush(self) -> None:
        """Write the results not yet on the store as one more part. A part that cannot be written
        (the store still failing after its retries) leaves its results for the next part and the
        final table: the parts only protect against a killed driver, and must not stop a campaign."""
        if not self._unwritten:
            self._flushed_at = time.monotonic()
            return
        name = f"{self._own}{self._written_parts + 1:05d}.parquet"
        try:
            storage.write_bytes(storage.join(self.parts, name), _parquet(self._unwritten))
        except OSError as exc:
            log.warning(
                "results part %s not written (%s): its %d result(s) go with the next part",
                name,
                storage.display(f"{type(exc).__name__}: {exc}"),
                len(self._unwritten),
            )
            self._refused = True  # till it is written: tried again when the next part is due, not every result
        else:
            self._unwritten, self._refused = [], False
            self._written_parts += 1
        self._flushed_at = time.monotonic()

    def finish(self, order: list[str]) -> list[RowResult]:
        """Write the whole table (every id of `order` must have its result) and remove the parts."""
        rows = flag_outliers([self._results[row_id] for row_id in order])
        try:
            write_results(self.uri, rows, parts_upto=self._own)
        except BaseException:
            # the table refused: the results not yet in a part go into one, if the store takes it
            # (a failed row's reason is in no marker: else it would be nowhere)
            self.flush()
            raise
        self._unwritten = []
        try:
            storage.remove(self.parts, recursive=True)
        except OSError as exc:  # the table supersedes them (`published_earlier`): the next run tries again
            log.warning("results parts %s not removed: %s: %s", storage.display(self.parts), type(exc).__name__, exc)
        return rows

    def published_earlier(self) -> dict[str, RowResult]:
        """The rows earlier runs on this output root published (ok or skipped, or a stop left
        unchecked), by id: their table,
        then the parts a killed run left (later results count), not this run's own parts (of
        results it holds, and on a long campaign thousands). Nothing when there is none."""
        return published_earlier(self.uri, self.parts, skip=self._own)


def flag_outliers(rows: list[RowResult]) -> list[RowResult]:
    """Rows whose lip-sync score is far below the campaign's median, flagged with the reason."""
    median = qa.campaign_median([r.sync_score for r in rows if r.sync_score is not None])
    if median is None:
        return rows
    reason = f"lip-sync score far below the campaign's median ({median:.2f})"
    return [
        replace(r, qa_flag="; ".join(filter(None, [r.qa_flag, reason])))
        if r.sync_score is not None and r.sync_score < median - qa.BELOW_MEDIAN
        else r
        for r in rows
    ]


def published_earlier(uri: str, parts: str, skip: str | None = None) -> dict[str, RowResult]:
    """The rows earlier runs on this output root published (ok or skipped, or a stop left unchecked:
    `UNCHECKED`), by id: their table, then the parts of a run that was killed after it (later results count), less the parts whose
    names start with `skip`. Parts the table supersedes (its run's or an earlier run's, left where
    their removal failed) are not read. Nothing when there is none."""
    rows: list[dict] = []
    upto = None
    try:
        rows, upto = read_table(uri)
    except FileNotFoundError:
        pass
    try:
        rows += read_parts(parts, skip, after=upto)
    except FileNotFoundError:
        pass
    earlier: dict[str, RowResult] = {}
    for row in rows:
        row["finished_at"] = row["finished_at"].timestamp() if row["finished_at"] else 0.0
        result = RowResult(**row)
        if result.status in ("ok", "skipped"):
            earlier[result.id] = result
        elif result.error == UNCHECKED:  # a stop that never checked the video: it is there still, to check
            earlier.setdefault(result.id, result)
        else:
            earlier.pop(result.id, None)
    return earlier


def read_parts(parts: str, skip: str | None = None, after: str | None = None) -> list[dict]:
    """The results an interrupted driver wrote before it stopped, oldest first (a row reported by
    two runs appears twice: the later one counts), less the parts whose names start with `skip`
    and, with `after` (a run's part prefix), those of that run and earlier ones."""
    rows: list[dict] = []
    for uri in sorted(storage.listdir(parts)):  # not a glob: the output root's name may hold "[1]"
        name = storage.basename(uri)
        if not is_part(name) or (skip and name.startswith(skip)) or superseded(name, after):
            continue
        rows += read_results(uri)
    return rows


def _part_stamp(ms: int) -> str:
    """A part name's time: UTC to the millisecond, sorting as it counts."""
    seconds, milliseconds = divmod(ms, 1000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f"{milliseconds:03d}"


def _stamp_ms(name: str) -> int:
    """The time of a part name (or a table's `parts_upto`), in ms since the epoch; 0 if it has none."""
    stamp = name[len("part-") :][:18]
    try:
        return calendar.timegm(time.strptime(stamp[:15], "%Y%m%dT%H%M%S")) * 1000 + int(stamp[15:])
    except ValueError:
        return 0


def _latest_part_ms(uri: str, parts: str) -> int:
    """The time of the latest part the store holds or its table supersedes (0: none): a host's
    clock behind an earlier run's would name parts that sort before them."""
    latest = 0
    try:
        with storage.open_uri(uri) as fh:
            upto = (pq.read_schema(fh).metadata or {}).get(_PARTS_UPTO)
        latest = _stamp_ms(upto.decode()) if upto else 0
    except (FileNotFoundError, pa.ArrowException):  # none, or unreadable: the run writes it anew
        pass
    try:
        names = [storage.basename(u) for u in storage.listdir(parts)]
    except FileNotFoundError:
        names = []
    return max([latest, *(_stamp_ms(n) for n in names if is_part(n))])


def is_part(name: str) -> bool:
    """Whether a file name in the parts folder is a results part."""
    return name.startswith("part-") and name.endswith(".parquet")


def superseded(name: str, upto: str | None) -> bool:
    """Whether a results table whose run's parts start with `upto` holds part `name`'s results
    (it is that run's or an earlier one's)."""
    return upto is not None and (name.startswith(upto) or name < upto)
