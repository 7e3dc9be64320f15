"""The campaign report ({output}/_report.html): one self-contained HTML page.

Everything the page shows is inside the file: inline CSS, thumbnails as `data:` URIs and a short
inline script, with a Content-Security-Policy that forbids any other request, so the report can be
mailed, archived or opened from a bucket and looks the same. Ids, outputs and error texts are user
data and are HTML-escaped everywhere. The page is built with plain string joins, so thousands of
rows render in well under a second.

A report written mid-campaign (`total_rows` larger than the rows so far) says "N of M rows done"
and refreshes itself every 30 seconds.

A campaign of more than `PAGE_ROWS` rows gets pages (`PagedReport`): `_report.html` keeps the
summary, the failed rows' links and the first rows, and `_report/page-K.html` the rest, each page
rewritten only while its rows change. So a rewrite costs one page or two, not the whole campaign,
and the driver holds thumbnails only for pages still changing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
import pathlib
import posixpath
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from heygem_ray import storage
from heygem_ray.results import RowResult

#: seconds between automatic reloads of an unfinished campaign's report
REFRESH_SECONDS = 30
#: link schemes a browser would execute or that could smuggle content; never emitted as a link
_UNSAFE_SCHEMES = {"javascript", "vbscript", "data", "blob"}
_STATUS_CLASSES = {"ok": "ok", "failed": "failed", "skipped": "skipped"}
#: failed rows linked from the summary (the rest are counted)
_FAILED_LINKS = 50
#: rows per page of a large campaign's report
PAGE_ROWS = 500


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
    """(scheme, bucket, key) of a remote URI, query string dropped; ('file', '', path) for local."""
    if storage.is_local(uri):
        return "file", "", storage.local_path(uri)
    rest = re.sub(r"/+", "/", uri.split("://", 1)[1].split("?", 1)[0])
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
    #: the first failed rows: (id, link to its card)
    failed_links: list[tuple[str, str]] = field(default_factory=list)

    def add(self, r: RowResult, href: str) -> None:
        self.rows += 1
        self.counts[r.status] = self.counts.get(r.status, 0) + 1
        if r.status == "ok":
            self.ok_audio_seconds += r.audio_seconds or 0.0
        if r.status == "failed" and len(self.failed_links) < _FAILED_LINKS:
            self.failed_links.append((r.id, href))

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
) -> str:
    """The report page for `rows` (shown in the given order, which should be manifest order).

    `thumbnails` maps row id to JPEG bytes (rows without one get a placeholder). `report_uri` is
    where the page will live, for relative video links. `total_rows` is the manifest's row count:
    when more than the rows done the campaign is reported as in progress ("N of M rows done") and
    the page refreshes itself; None means the campaign is finished. `totals`: the summary of every
    row done when `rows` are only the first page's (default: `rows`' own); `pages`: (label, href)
    of the other pages."""
    esc = html.escape
    totals = totals or Totals.of(rows)
    done = totals.rows
    total = max(int(total_rows), done) if total_rows is not None else done
    finished = done >= total
    counts = totals.counts
    audio_hours = totals.ok_audio_seconds / 3600
    wall_hours = wall_seconds / 3600 if wall_seconds and wall_seconds > 0 else 0.0
    per_hour = counts.get("ok", 0) / wall_hours if wall_hours else 0.0
    realtime = audio_hours / wall_hours if wall_hours else 0.0
    stamp = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated_at if generated_at is not None else time.time())
    )

    progress = f"Finished: {done} rows" if finished else f"In progress: {done} of {total} rows done"
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

    out = _head(title, refresh=not finished) + [
        f"<header>\n<h1>{esc(title)}</h1>\n",
        f'<p class="progress {"done" if finished else "running"}" data-finished="{str(finished).lower()}">',
        f"{esc(progress)}",
        "" if finished else f" &middot; this page refreshes every {REFRESH_SECONDS} s",
        '</p>\n<dl class="summary">\n',
    ]
    for label, value in stats:
        out.append(f"<div><dt>{esc(label)}</dt><dd>{esc(value)}</dd></div>\n")
    out.append("</dl>\n")
    failed = counts.get("failed", 0)
    if failed:
        links = ", ".join(f'<a href="{esc(href)}">{esc(rid)}</a>' for rid, href in totals.failed_links)
        more = f" and {failed - len(totals.failed_links)} more" if failed > len(totals.failed_links) else ""
        out.append(f'<p class="failed-list">Failed: {links}{more}</p>\n')
    out.append(_nav(pages))
    out.append(f'<p class="stamp">Generated {esc(stamp)}</p>\n</header>\n')
    out += _cards(rows, thumbnails, report_uri)
    return "".join(out)


def render_page(
    rows: Sequence[RowResult],
    thumbnails: Mapping[str, bytes],
    title: str,
    report_uri: str,
    pages: Sequence[tuple[str, str]],
    complete: bool,
) -> str:
    """One more page of a large campaign's report: its rows' cards under the links to every page
    (the first, with the summary, is the report itself); refreshes itself until `complete`."""
    esc = html.escape
    out = _head(title, refresh=not complete)
    out += [f"<header>\n<h1>{esc(title)}</h1>\n", _nav(pages), "</header>\n"]
    out += _cards(rows, thumbnails, report_uri)
    return "".join(out)


def _head(title: str, refresh: bool) -> list[str]:
    out = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n',
    ]
    if refresh:
        out.append(f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n')
    out.append(f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n")
    return out


def _nav(pages: Sequence[tuple[str, str]]) -> str:
    if not pages:
        return ""
    links = " ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in pages)
    return f'<nav class="pages">Pages: {links}</nav>\n'


def _cards(rows: Sequence[RowResult], thumbnails: Mapping[str, bytes], report_uri: str | None) -> list[str]:
    out = ["<main>\n", *(_card(r, thumbnails.get(r.id), report_uri) for r in rows)]
    if not rows:
        out.append('<p class="empty">No rows yet.</p>\n')
    out.append(f"</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")
    return out


def _card(r: RowResult, thumb: bytes | None, report_uri: str | None) -> str:
    esc = html.escape
    status_class = _STATUS_CLASSES.get(r.status, "other")
    rid = esc(r.id)
    if thumb:
        data = base64.b64encode(thumb).decode("ascii")
        media = f'<img src="data:image/jpeg;base64,{data}" alt="Middle frame of {rid}" decoding="async">'
        state = "pending"
    else:
        reason = "no video" if r.status == "failed" else "no thumbnail"
        media = f'<div class="placeholder" role="img" aria-label="{esc(reason)} for {rid}">{esc(reason)}</div>'
        state = "none"
    details = [
        ("Audio", _seconds(r.audio_seconds)),
        ("Frames", _int(r.frames)),
        ("Segments", _int(r.segments)),
        ("Render", _seconds(r.render_seconds)),
        ("Attempts", _int(r.attempts)),
    ]
    parts = [
        (
            f'<article class="card {status_class}" id="{esc(_anchor(r.id))}" data-status="{esc(r.status)}" '
            f'data-thumb="{state}">\n{media}\n<div class="body">\n'
        ),
        f'<h2><span class="rid">{rid}</span> <span class="badge {status_class}">{esc(r.status)}</span></h2>\n',
        '<dl class="facts">',
    ]
    for label, value in details:
        parts.append(f"<div><dt>{label}</dt><dd>{esc(value)}</dd></div>")
    parts.append("</dl>\n")
    if r.error:
        parts.append(f'<pre class="error">{esc(r.error)}</pre>\n')
    href = video_href(r.output, report_uri) if r.status != "failed" else None
    if href:
        parts.append(
            f'<a class="video" href="{esc(href)}">Open video '
            f'<span class="path">{esc(storage.basename(storage.display(r.output)))}</span></a>\n'
        )
    elif r.output:
        parts.append(f'<p class="path">{esc(storage.display(r.output))}</p>\n')
    parts.append("</div>\n</article>\n")
    return "".join(parts)


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
    """A campaign's report, written as its rows finish: `uri` holds the summary and the first
    `page_rows` rows; each further page (`pages_dir`/page-NNNN.html) holds the next, is rewritten
    only while rows on it finish, and lets go of its thumbnails once all of them have."""

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
        self._changed: set[int] = set()
        self._complete: set[int] = set()

    def page_uri(self, page: int) -> str:
        return self.uri if page == 0 else storage.join(self.pages_dir, f"page-{page + 1:04d}.html")

    def _href(self, page: int, from_page: int) -> str:
        """A link to `page` as written in `from_page` (the pages sit in a folder beside the report)."""
        folder = self.pages_dir.rstrip("/").rsplit("/", 1)[-1]
        if page == 0:
            return "../" + self.uri.rsplit("/", 1)[-1] if from_page else "#"
        name = f"page-{page + 1:04d}.html"
        return name if from_page else f"{folder}/{name}"

    def _nav(self, from_page: int) -> list[tuple[str, str]]:
        if self.pages == 1:
            return []
        last = self.total
        return [
            (f"{k * self.page_rows + 1}\u2013{min(last, (k + 1) * self.page_rows)}", self._href(k, from_page))
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
        anchor = f"#{_anchor(result.id)}"
        self.totals.add(result, anchor if page == 0 else self._href(page, 0) + anchor)

    def _rows(self, page: int) -> list[RowResult]:
        return sorted(self._done.get(page, {}).values(), key=lambda r: self._index[r.id])

    def write(self, wall_seconds: float, final: bool) -> None:
        """Rewrite the report and every page whose rows changed since the last call."""
        for page in sorted(self._changed - {0}):
            rows = self._rows(page)
            complete = len(rows) == min(self.page_rows, self.total - page * self.page_rows)
            first = page * self.page_rows
            title = f"{self.title}: rows {first + 1}\u2013{first + min(self.page_rows, self.total - first)}"
            write_report(
                self.page_uri(page),
                render_page(rows, self._thumbs, title, self.page_uri(page), self._nav(page), complete),
            )
            if complete:  # written for good: its rows' thumbnails are in the page now
                for r in rows:
                    self._thumbs.pop(r.id, None)
                self._done.pop(page, None)
                self._complete.add(page)
        self._changed.clear()
        html_text = render_report(
            self._rows(0),
            self._thumbs,
            wall_seconds,
            self.title,
            report_uri=self.uri,
            total_rows=None if final else self.total,
            totals=self.totals,
            pages=self._nav(0),
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
    "})();"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
# No network at all: images only from data: URIs, styles inline, and only our own script (by hash).
_CSP = (
    f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)

_CSS = """
:root{--ok:#1a7f37;--failed:#cf222e;--skipped:#6e7781;--other:#9a6700;--fg:#1f2328;--muted:#59636e;
--bg:#f6f8fa;--card:#fff;--line:#d1d9e0}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:20px 24px;background:var(--card);border-bottom:1px solid var(--line)}
h1{margin:0 0 6px;font-size:22px}
.progress{margin:0 0 12px;font-weight:600}
.progress.running{color:var(--other)}
.progress.done{color:var(--ok)}
.summary{display:flex;flex-wrap:wrap;gap:10px;margin:0}
.summary div{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:110px}
dt{color:var(--muted);font-size:12px}
dd{margin:0;font-weight:600}
.summary dd{font-size:18px}
.failed-list{margin:10px 0 0;color:var(--failed);overflow-wrap:anywhere}
.failed-list a{color:var(--failed)}
.stamp{margin:10px 0 0;color:var(--muted);font-size:12px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:14px;padding:20px 24px}
.card{background:var(--card);border:1px solid var(--line);border-left:5px solid var(--other);border-radius:6px;overflow:hidden}
.card.ok{border-left-color:var(--ok)}
.card.failed{border-left-color:var(--failed)}
.card.skipped{border-left-color:var(--skipped)}
.card img,.placeholder{display:block;width:100%;height:220px;object-fit:contain;background:#eaeef2}
.placeholder{display:flex;align-items:center;justify-content:center;color:var(--muted);font-style:italic}
.card[data-thumb=broken] img{min-height:80px;outline:2px dashed var(--failed)}
.body{padding:10px 12px}
h2{margin:0 0 8px;font-size:15px;display:flex;gap:8px;align-items:baseline;justify-content:space-between}
.rid{overflow-wrap:anywhere}
.badge{font-size:12px;font-weight:600;color:#fff;background:var(--other);border-radius:10px;padding:1px 8px}
.badge.ok{background:var(--ok)}
.badge.failed{background:var(--failed)}
.badge.skipped{background:var(--skipped)}
.facts{display:grid;grid-template-columns:repeat(3,1fr);gap:4px 10px;margin:0 0 8px}
.error{margin:0 0 8px;padding:6px 8px;background:#ffebe9;color:#82071e;border-radius:4px;white-space:pre-wrap;
overflow-wrap:anywhere;font-size:12px;max-height:12em;overflow:auto}
.video{color:#0969da}
.path{color:var(--muted);font-size:12px;overflow-wrap:anywhere;margin:0}
.empty{color:var(--muted)}
.pages{margin:10px 0 0;overflow-wrap:anywhere}
.pages a{margin-right:6px;color:#0969da}
"""
