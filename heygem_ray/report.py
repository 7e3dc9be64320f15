"""The campaign report ({output}/_report.html): one self-contained HTML page.

Everything the page shows is inside the file: inline CSS, thumbnails as `data:` URIs and a short
inline script, with a Content-Security-Policy that forbids any other request, so the report can be
mailed, archived or opened from a bucket and looks the same. The layout is a Jinja template
(`heygem_ray/templates/report.html`) with autoescaping: ids, outputs and error texts are user data
and are HTML-escaped everywhere.

A report written mid-campaign (`total_rows` larger than the rows so far) says "N of M rows done"
and refreshes itself every 30 seconds.

A campaign of more than `PAGE_ROWS` rows gets pages (`PagedReport`): `_report.html` keeps the
summary, the failed rows' links and the pages' links, and `_report/page-NNNN.html` the rows, each page
rewritten only while its rows change. So a rewrite costs the summary and a page or two, not the
whole campaign, and the driver holds thumbnails only for pages still changing.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import pathlib
import posixpath
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2

from heygem_ray import storage
from heygem_ray.results import RowResult

log = logging.getLogger("heygem_ray")

#: seconds between automatic reloads of an unfinished campaign's report
REFRESH_SECONDS = 30
#: link schemes a browser would execute or that could smuggle content; never emitted as a link
_UNSAFE_SCHEMES = {"javascript", "vbscript", "data", "blob"}
_STATUS_CLASSES = {"ok": "ok", "failed": "failed", "skipped": "skipped"}
#: failed rows linked from the summary (the rest are counted)
_FAILED_LINKS = 50
#: rows per page of a large campaign's report
PAGE_ROWS = 500
#: the page layout (heygem_ray/templates/report.html); autoescaping HTML-escapes every value in it
_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("heygem_ray", "templates"),
    autoescape=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
).get_template("report.html")


# --------------------------------------------------------------------------- links


def video_href(output: str, report_uri: str | None) -> str | None:
    """The href for a row's video as seen from the report: relative when both are local paths or
    share a scheme and bucket, otherwise the output URI itself (credentials removed); None when
    the output cannot be linked safely."""
    if not output:
        return None
    if report_uri:
        if storage.is_local(output) and storage.is_local(report_uri):
            rel = os.path.relpath(storage.local_path(output), os.path.dirname(storage.local_path(report_uri)))
            return _quote_relative(rel.replace(os.sep, "/"))
        out_scheme, out_bucket, out_key = _split(output)
        rep_scheme, rep_bucket, rep_key = _split(report_uri)
        if out_scheme == rep_scheme and out_bucket == rep_bucket and out_scheme != "file":
            rel = posixpath.relpath("/" + out_key, posixpath.dirname("/" + rep_key))
            return _quote_relative(rel)
    if storage.is_local(output):
        return pathlib.Path(storage.local_path(output)).as_uri()
    if storage.protocol(output) in _UNSAFE_SCHEMES:
        return None
    return storage.display(output)


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a remote URI, an HTTP(S) query string dropped (in an object store's
    key a '?' is a character of the name: `o/a?b.mp4` was linked as `o/a`); ('file', '', path) for local."""
    if storage.is_local(uri):
        return "file", "", storage.local_path(uri)
    rest = uri.split("://", 1)[1]
    if storage.protocol(uri) in ("http", "https"):
        rest = rest.split("?", 1)[0]
    rest = re.sub(r"/+", "/", rest)
    rest = re.sub(r"^[^/@]*@", "", rest)  # user:password@
    bucket, _, key = rest.partition("/")
    return storage.protocol(uri), bucket, key


def _quote_relative(rel: str) -> str:
    # Percent-encode everything but '/', so a name like "javascript:x" stays a path, never a scheme.
    return urllib.parse.quote(rel, safe="/")


# --------------------------------------------------------------------------- rendering


@dataclass
class Totals:
    """What the summary shows, kept as rows finish (a report of 100,000 rows never recounts them)."""

    rows: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STATUS_CLASSES, 0))
    ok_audio_seconds: float = 0.0
    #: rows whose lip sync is flagged (heygem_ray.qa)
    flagged: int = 0
    #: the first failed rows: (id, link to its card)
    failed_links: list[tuple[str, str]] = field(default_factory=list)
    #: the first flagged rows: (id, link to its card), those flagged on a page written before first
    flagged_links: list[tuple[str, str]] = field(default_factory=list)
    unmarked: int = 0  # of those links, the first rows flagged on a page written before (no mark on their card)

    def add(self, r: RowResult, href: str) -> None:
        self.rows += 1
        self.counts[r.status] = self.counts.get(r.status, 0) + 1
        if r.status == "ok":
            self.ok_audio_seconds += r.audio_seconds or 0.0
        if r.qa_flag:
            self.flag(r.id, href)
        if r.status == "failed" and len(self.failed_links) < _FAILED_LINKS:
            self.failed_links.append((r.id, href))

    def flag(self, row_id: str, href: str, unmarked: bool = False) -> None:
        """One more row flagged (as it finished, or at the end: `PagedReport.flagged_late`);
        `unmarked`: its card, on a page written before, does not show it, so its link comes first."""
        self.flagged += 1
        if unmarked:
            self.flagged_links.insert(self.unmarked, (row_id, href))
            self.unmarked += 1
            del self.flagged_links[_FAILED_LINKS:]
        elif len(self.flagged_links) < _FAILED_LINKS:
            self.flagged_links.append((row_id, href))

    @classmethod
    def of(cls, rows: Sequence[RowResult]) -> Totals:
        totals = cls()
        for r in rows:
            totals.add(r, f"#{_anchor(r.id)}")
        return totals


def render_report(
    rows: Sequence[RowResult],
    thumbnails: Mapping[str, bytes],
    wall_seconds: float,
    title: str,
    report_uri: str | None = None,
    total_rows: int | None = None,
    generated_at: float | None = None,
    totals: Totals | None = None,
    pages: Sequence[tuple[str, str]] = (),
    summary_only: bool = False,
    stopped: bool = False,
    ended_by: str | None = None,
) -> str:
    """The report page for `rows` (shown in the given order, which should be manifest order).

    `thumbnails` maps row id to JPEG bytes (rows without one get a placeholder). `report_uri` is
    where the page will live, for relative video links. `total_rows` is the manifest's row count:
    when more than the rows done the campaign is reported as in progress ("N of M rows done") and
    the page refreshes itself; None means the campaign is finished. `totals`: the summary of every
    row done when `rows` are only the first page's (default: `rows`' own); `pages`: (label, href)
    of the other pages; `summary_only`: no cards (a large campaign's, whose rows are all on pages);
    `stopped`: the campaign was stopped before its end (its rows the stop caught failed), by the
    error `ended_by` where one ended it."""
    totals = totals or Totals.of(rows)
    done = totals.rows
    total = max(int(total_rows), done) if total_rows is not None else done
    finished = done >= total
    counts = totals.counts
    audio_hours = totals.ok_audio_seconds / 3600
    wall_hours = wall_seconds / 3600 if wall_seconds and wall_seconds > 0 else 0.0
    per_hour = counts.get("ok", 0) / wall_hours if wall_hours else 0.0
    realtime = audio_hours / wall_hours if wall_hours else 0.0
    stats = [
        ("Rows", f"{done}" if finished else f"{done} of {total}"),
        ("OK", str(counts["ok"])),
        ("Failed", str(counts["failed"])),
        ("Skipped", str(counts["skipped"])),
        ("Audio rendered", _hours(audio_hours)),
        ("Wall time", _clock(wall_seconds)),
        ("Videos per hour", f"{per_hour:.1f}"),
        ("Realtime factor", f"{realtime:.2f}x"),
    ]
    others = sorted(s for s in counts if s not in _STATUS_CLASSES and counts[s])
    stats[4:4] = [(s.capitalize(), str(counts[s])) for s in others]
    if not finished:
        progress, state = f"In progress: {done} of {total} rows done", "running"
    elif stopped and ended_by:
        progress = f"Ended by an error before its end ({ended_by}): {done} rows; run it again to finish the rest"
        state = "stopped"
    elif stopped:
        progress, state = f"Stopped before its end: {done} rows; run it again to finish the rows it caught", "stopped"
    elif ended_by:  # every row done, the end not (the results table refused)
        progress, state = f"{done} rows done, then an error ({ended_by}): run it again to finish", "stopped"
    else:
        progress, state = f"Finished: {done} rows", "done"
    summary = {
        "finished": finished,
        "state": state,
        "progress": progress,
        "stats": stats,
        "failed": counts.get("failed", 0),
        "failed_links": totals.failed_links,
        "flagged": totals.flagged,
        "flagged_links": totals.flagged_links,
    }
    stamp = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated_at if generated_at is not None else time.time())
    )
    return _page(
        title,
        not finished,
        rows,
        thumbnails,
        report_uri,
        pages,
        summary=summary,
        stamp=stamp,
        summary_only=summary_only,
    )


def render_page(
    rows: Sequence[RowResult],
    thumbnails: Mapping[str, bytes],
    title: str,
    report_uri: str,
    pages: Sequence[tuple[str, str]],
    complete: bool,
) -> str:
    """One page of a large campaign's report: its rows' cards under the links to the summary and to
    every page; refreshes itself until `complete`."""
    return _page(title, not complete, rows, thumbnails, report_uri, pages)


def _page(
    title: str,
    refresh: bool,
    rows: Sequence[RowResult],
    thumbnails: Mapping[str, bytes],
    report_uri: str | None,
    pages: Sequence[tuple[str, str]],
    summary: dict[str, Any] | None = None,
    stamp: str | None = None,
    summary_only: bool = False,
) -> str:
    return _TEMPLATE.render(
        summary_only=summary_only,
        title=title,
        refresh=refresh,
        refresh_seconds=REFRESH_SECONDS,
        csp=_CSP,
        script=_SCRIPT,
        summary=summary,
        pages=pages,
        stamp=stamp,
        cards=[_card(r, thumbnails.get(r.id), report_uri) for r in rows],
    )


def _card(r: RowResult, thumb: bytes | None, report_uri: str | None) -> dict[str, Any]:
    """What the template shows of one row (it escapes every value)."""
    href = video_href(r.output, report_uri) if r.status != "failed" else None
    return {
        "id": r.id,
        "anchor": _anchor(r.id),
        "status": r.status,
        "status_class": _STATUS_CLASSES.get(r.status, "other"),
        "thumbnail": base64.b64encode(thumb).decode("ascii") if thumb else None,
        "placeholder": "no video" if r.status == "failed" else "no thumbnail",
        "facts": [
            ("Audio", _seconds(r.audio_seconds)),
            ("Frames", _int(r.frames)),
            ("Segments", _int(r.segments)),
            ("Render", _seconds(r.render_seconds)),
            ("Attempts", _int(r.attempts)),
            ("Lip sync", _sync(r)),
            *([("No face", f"{r.frames_without_face} fr")] if r.frames_without_face else []),
        ],
        "sync": "" if r.sync_score is None else f"{r.sync_score:.4f}",
        "qa_flag": r.qa_flag,
        "error": r.error,
        "video_href": href,
        "video_name": storage.basename(storage.display(r.output)) if href else None,
        "output": storage.display(r.output) if r.output else None,
    }


def _sync(r: RowResult) -> str:
    """The lip-sync score as a card shows it: the score, and the offset when it is not 0."""
    if r.sync_score is None:
        return "\u2013"
    offset = f" ({r.sync_offset_frames:+d} fr)" if r.sync_offset_frames else ""
    return f"{r.sync_score:.2f}{offset}"


def _anchor(row_id: str) -> str:
    return f"row-{row_id}"


def _seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    return f"{value:.1f} s" if value < 60 else f"{_clock(value)}"


def _int(value: int | None) -> str:
    return "\u2013" if value is None else str(int(value))


def _clock(seconds: float | None) -> str:
    if not seconds or seconds < 0:
        return "0:00:00"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _hours(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 0.1 else f"{hours * 60:.1f} min"


def write_report(uri: str, html_text: str) -> None:
    """Publish the page at `uri` atomically (readers see the old page or the new one, never half)."""
    storage.write_bytes(uri, html_text.encode("utf-8"))


class PagedReport:
    """A campaign's report, written as its rows finish: `uri` holds the summary and, for a campaign
    of `page_rows` rows at most, every row; a larger campaign's rows are on pages of `page_rows`
    (`pages_dir`/page-NNNN.html), each rewritten only while rows on it finish, letting go of its
    thumbnails once all of them have, and `uri` holds the summary alone, kilobytes (rewritten with
    the first page's cards, megabytes, every 10 s of a day-long campaign)."""

    def __init__(
        self, uri: str, pages_dir: str, title: str, row_ids: Sequence[str], page_rows: int = PAGE_ROWS
    ) -> None:
        self.uri, self.pages_dir, self.title, self.page_rows = uri, pages_dir, title, page_rows
        self.total = len(row_ids)
        self._index = {rid: i for i, rid in enumerate(row_ids)}
        self.pages = max(1, math.ceil(self.total / page_rows))
        self.totals = Totals()
        self._done: dict[int, dict[str, RowResult]] = {}  # page -> its rows done, while the page changes
        self._thumbs: dict[str, bytes] = {}
        # every page at the first write: the summary links them all, and a rerun into this output
        # must not link the last run's pages, final and never refreshed, until a row there finishes
        self._changed: set[int] = set(range(self.pages))
        self._first = True  # the first write removes the pages an earlier run of more rows left

    def page_uri(self, page: int) -> str:
        return self.uri if self.pages == 1 else storage.join(self.pages_dir, f"page-{page + 1:04d}.html")

    def _href(self, page: int, from_summary: bool) -> str:
        """A link to `page` as written in the summary or in a page (they sit in a folder beside it)."""
        if self.pages == 1:
            return ""
        name = f"page-{page + 1:04d}.html"
        return f"{self.pages_dir.rstrip('/').rsplit('/', 1)[-1]}/{name}" if from_summary else name

    def _nav(self, from_summary: bool) -> list[tuple[str, str]]:
        if self.pages == 1:
            return []
        summary = [] if from_summary else [("summary", "../" + self.uri.rsplit("/", 1)[-1])]
        last = self.total
        return summary + [
            (f"{k * self.page_rows + 1}\u2013{min(last, (k + 1) * self.page_rows)}", self._href(k, from_summary))
            for k in range(self.pages)
        ]

    @property
    def held_thumbnails(self) -> int:
        return len(self._thumbs)

    def add(self, result: RowResult, thumbnail: bytes | None) -> None:
        page = self._index[result.id] // self.page_rows
        self._done.setdefault(page, {})[result.id] = result
        if thumbnail:
            self._thumbs[result.id] = thumbnail
        self._changed.add(page)
        self.totals.add(result, f"{self._href(page, from_summary=True)}#{_anchor(result.id)}")

    def flagged_late(self, result: RowResult, newly: bool) -> None:
        """`result` (added before) flagged once every row was done (`results.flag_outliers`: far
        below the campaign's median); `newly`: it had no flag before. Its card shows it where its
        page is still held (every row's, in a report of one page); the summary links it, before
        the rows whose cards show their flags where its page was written before."""
        page = self._index[result.id] // self.page_rows
        held = self._done.get(page, {})
        if result.id in held:
            held[result.id] = result
            self._changed.add(page)
        if newly:
            href = f"{self._href(page, from_summary=True)}#{_anchor(result.id)}"
            self.totals.flag(result.id, href, unmarked=result.id not in held)

    def _rows(self, page: int) -> list[RowResult]:
        return sorted(self._done.get(page, {}).values(), key=lambda r: self._index[r.id])

    def write(self, wall_seconds: float, final: bool, stopped: bool = False, ended_by: str | None = None) -> None:
        """Rewrite the report and every page whose rows changed since the last call. A page that
        cannot be written is tried again at the next call; the summary is written still (its
        totals, at the last call, are the campaign's), then the page's error raised. `stopped`:
        the final one of a campaign stopped before its end (by the error `ended_by`, where one did)."""
        paged = self.pages > 1
        if self._first:
            self._first = False
            self._remove_pages_past(self.pages if paged else 0)
        try:
            for page in sorted(self._changed) if paged else ():
                self._write_page(page)
                self._changed.discard(page)  # written: a later page that fails to write leaves this one be
        finally:
            self._write_summary(wall_seconds, final, paged, stopped, ended_by)
        self._changed.clear()

    def _remove_pages_past(self, pages: int) -> None:
        """Remove the pages past the first `pages` (an earlier run's, of more rows: final, never
        refreshed, linked from nowhere now)."""
        try:
            names = [storage.basename(uri) for uri in storage.listdir(self.pages_dir)]
        except FileNotFoundError:
            return
        for name in names:
            number = name.removeprefix("page-").removesuffix(".html")
            if name != number and number.isdigit() and int(number) > pages:
                try:
                    storage.remove(storage.join(self.pages_dir, name))
                except OSError as exc:  # a stale page left is no reason to stop the report
                    log.warning("could not remove %s: %s", name, exc)

    def _write_page(self, page: int) -> None:
        rows = self._rows(page)
        complete = len(rows) == min(self.page_rows, self.total - page * self.page_rows)
        first = page * self.page_rows
        title = f"{self.title}: rows {first + 1}\u2013{first + min(self.page_rows, self.total - first)}"
        write_report(
            self.page_uri(page),
            render_page(rows, self._thumbs, title, self.page_uri(page), self._nav(from_summary=False), complete),
        )
        if complete:  # written for good: its rows' thumbnails are in the page now
            for r in rows:
                self._thumbs.pop(r.id, None)
            self._done.pop(page, None)

    def _write_summary(
        self, wall_seconds: float, final: bool, paged: bool, stopped: bool, ended_by: str | None = None
    ) -> None:
        html_text = render_report(
            [] if paged else self._rows(0),
            self._thumbs,
            wall_seconds,
            self.title,
            report_uri=self.uri,
            total_rows=None if final else self.total,
            totals=self.totals,
            pages=self._nav(from_summary=True),
            summary_only=paged,
            stopped=stopped,
            ended_by=ended_by,
        )
        write_report(self.uri, html_text)


_SCRIPT = (
    "(function(){"
    "function mark(img){var card=img.closest('.card');if(!card)return;"
    "card.setAttribute('data-thumb',img.complete&&img.naturalWidth>0?'loaded':'broken');}"
    "function check(){var imgs=document.querySelectorAll('.card img');"
    "for(var i=0;i<imgs.length;i++){var img=imgs[i];"
    "if(img.complete){mark(img);}else{"
    "img.addEventListener('load',function(e){mark(e.target);});"
    "img.addEventListener('error',function(e){mark(e.target);});}}}"
    "if(document.readyState==='complete'){check();}else{window.addEventListener('load',check);}"
    # sort the cards by lip-sync score (lowest first, unscored last) or back to manifest order
    "function sort(by){var main=document.querySelector('main');if(!main)return;"
    "var cards=Array.prototype.slice.call(main.querySelectorAll('.card'));"
    "cards.sort(function(a,b){if(by==='sync'){"
    "var x=a.getAttribute('data-sync'),y=b.getAttribute('data-sync');"
    "if(x!==y){if(x==='')return 1;if(y==='')return -1;return parseFloat(x)-parseFloat(y);}}"
    "return parseInt(a.getAttribute('data-order'))-parseInt(b.getAttribute('data-order'));});"
    "for(var i=0;i<cards.length;i++){main.appendChild(cards[i]);}"
    "document.documentElement.setAttribute('data-sorted',by);}"
    "var buttons=document.querySelectorAll('button[data-sort]');"
    "for(var j=0;j<buttons.length;j++){buttons[j].addEventListener('click',function(e){"
    "sort(e.target.getAttribute('data-sort'));});}"
    "})();"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
# No network at all: images only from data: URIs, styles inline, and only our own script (by hash).
_CSP = (
    f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)
