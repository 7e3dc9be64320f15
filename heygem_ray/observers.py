"""What watches a campaign and changes nothing in it: the log lines and progress bar, the report, the
progress feed and the metrics. Everything they show is kept up to date as rows change state, never
recounted, so a driver event costs the same in a campaign of ten rows or of 100,000."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from heygem_ray import metrics, qa, storage
from heygem_ray.config import Config
from heygem_ray.manifest import Row
from heygem_ray.progress import ProgressFeed
from heygem_ray.report import PagedReport
from heygem_ray.results import RowResult

log = logging.getLogger("heygem_ray")

#: seconds between rewrites of the campaign report while rows finish (at least: a report that takes
#: long to write, on a campaign of many rows, waits five times its own cost)
REPORT_INTERVAL = 10.0


class CampaignObservers:
    def __init__(self, cfg: Config, rows: Sequence[Row]):
        self.cfg = cfg
        # every row's state (queued, preparing, rendering, then its result), and how many are in each
        self.row_status: dict[str, str] = dict.fromkeys((r.id for r in rows), "queued")
        self.counts: Counter[str] = Counter(queued=len(self.row_status))
        self.frames_done = self.frames_planned = self.frames_rendered = 0
        self.sync_scores: list[float] = []  # of the rows done, for the feed's median
        self._refused = {r.id for r in rows if r.refused}  # failed at once: no work to reckon time by
        self.worked = 0  # rows finished ok or failed after work
        self.flagged = 0
        self.started = time.time()
        self.report = PagedReport(
            cfg.layout.report,
            cfg.layout.report_pages,
            f"heygem_ray campaign {storage.display(cfg.output)}",
            [r.id for r in rows],
        )
        self._report_written, self._report_every = -math.inf, REPORT_INTERVAL
        self.progress = ProgressFeed(cfg.layout.progress, self.started)
        self._bar: Any = None

    def open(self) -> None:
        self.progress.start()
        self.started = self.progress.started_at
        self._bar = _progress_bar(len(self.row_status), self.cfg.render.progress)
        # at once: a rerun's report was the last run's final page, "Finished", unrefreshed, until a row finished
        self._write_report(final=False)

    def status(self, row_id: str, status: str) -> None:
        self.counts[self.row_status[row_id]] -= 1
        self.counts[status] += 1
        self.row_status[row_id] = status

    def segment_done(self, frames: int, reused: bool) -> None:
        self.frames_done += frames
        self.frames_rendered += 0 if reused else frames

    def finished(self, result: RowResult, thumbnail: bytes | None, quiet: bool = False) -> None:
        """A row's result; `quiet`: no line of its own and no report written for it (`stopped`
        says those of a stop at once)."""
        self.status(result.id, result.status)
        self.worked += result.status in ("ok", "failed") and result.id not in self._refused
        if result.sync_score is not None:
            self.sync_scores.append(result.sync_score)
        self.flagged += bool(result.qa_flag)
        self.report.add(result, thumbnail)
        metrics.row_finished(result.status)
        if quiet:
            return
        seconds = f"{result.render_seconds:.1f}s" if result.render_seconds is not None else "-"
        detail = storage.display(result.output) if result.status != "failed" else result.error
        _write_line(f"[{result.status}] {result.id} {seconds} {detail}")
        if time.monotonic() - self._report_written >= self._report_every:
            self._write_report(final=False)

    def flagged_late(self, before: RowResult, after: RowResult) -> None:
        """A row's flag as the results table has it once every row was done (far below the
        campaign's median: `results.flag_outliers`), for the final report and feed."""
        newly = not before.qa_flag
        self.flagged += newly
        self.report.flagged_late(after, newly)

    def stopped(self, failed: list[str], current: int, unchecked: int) -> None:
        """The rows a stop caught: one line for them all; `current`: those an earlier run published
        found current, `unchecked`: those of the failed it left no time to check."""
        if failed:
            shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            _write_line(f"[failed] {len(failed)} row(s) the stop caught before they finished: {shown}")
        if unchecked:
            _write_line(
                f"[failed] {unchecked} of them an earlier run published, not checked before the stop: a rerun checks them"
            )
        if current:
            _write_line(f"[skipped] {current} row(s) the stop caught have an earlier run's video, checked current")

    def tick(self, segments_in_flight: int, segments_queued: int) -> None:
        """After each driver event."""
        metrics.segments_in_flight(segments_in_flight)
        c = self.counts
        self._bar.update(c["ok"] + c["failed"] + c["skipped"] - self._bar.n)
        self._bar.set_postfix_str(
            f"ok={c['ok']} failed={c['failed']} skipped={c['skipped']} frames={self.frames_rendered} "
            f"segments_in_flight={segments_in_flight} queued={segments_queued}",
            refresh=False,
        )
        if self.progress.due():
            self._write_progress("running")

    def close(self, interrupted: bool, ended_by: str | None = None) -> None:
        """Once every row has its result: the final feed and report. `ended_by`: the error that
        ended the campaign, its rows done or not (None: a stop, or none)."""
        if self._bar is not None:
            self._bar.close()
        self._write_progress("failed" if ended_by else "interrupted" if interrupted else "finished")
        self._write_report(final=True, stopped=interrupted, ended_by=ended_by)

    def _write_progress(self, state: str) -> None:
        median = qa.campaign_median(self.sync_scores)
        scores = {
            "scored": len(self.sync_scores),
            "flagged": self.flagged,
            "median_sync": None if median is None else round(median, 4),
        }
        self.progress.write(
            state, self.row_status, self.counts, self.frames_done, self.frames_planned, scores, self.worked
        )

    def _write_report(self, final: bool, stopped: bool = False, ended_by: str | None = None) -> None:
        began = time.monotonic()
        try:
            self.report.write(time.time() - self.started, final, stopped, ended_by)
        except OSError as exc:  # a report that cannot be written must not stop the campaign
            log.warning("could not write %s: %s", storage.display(self.cfg.layout.report), exc)
        self._report_written = time.monotonic()  # intervals: a clock's step stops no report
        self._report_every = max(REPORT_INTERVAL, 5 * (self._report_written - began))


def _progress_bar(total: int, enabled: bool) -> Any:
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
