"""`{output}/_progress.json`: a campaign's progress as JSON, for tools that poll it (the studio,
dashboards, scripts), rewritten atomically while the campaign runs and once at its end.

    {"state": "running" | "finished" | "interrupted" | "failed",   # failed: an error ended it
     "started_at": 1764460800.0, "updated_at": ..., "finished_at": null,
     "rows": {"total": 6, "queued": 1, "preparing": 1, "rendering": 2, "ok": 1, "failed": 1, "skipped": 0},
     "frames": {"done": 900, "planned": 1500},   # planned: of the rows cut into segments so far
     "eta_seconds": 12.5,                          # at `updated_at`, from the rows rendered since the first; null until one has
     "row_status": {"row-id": "rendering", ...},   # every row: queued, preparing, rendering, or its result
     "qa": {"scored": 4, "flagged": 1, "median_sync": 0.71}}  # lip sync of the rows done (heygem_ray.qa)

Written at most every `interval` seconds, never more often than five times its own cost, so a
campaign of 100,000 rows spends a bounded share of the driver's time on it, and at most every
SECONDS_PER_ROW per row: that campaign's feed (3-4 MB, every row's status) every 10 s, not each
2-3 s (a day of it was over 100 GB sent from the head node).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from heygem_ray import storage

log = logging.getLogger("heygem_ray")

#: seconds between rewrites while the campaign runs
INTERVAL = 2.0
#: and at least this many seconds per row between them (the feed grows with the rows)
SECONDS_PER_ROW = 1e-4


@dataclass
class ProgressFeed:
    uri: str
    started_at: float
    interval: float = INTERVAL
    _written: float = -math.inf  # time.monotonic()
    #: `started_at` on the monotonic clock: the time left is reckoned on it (a clock's step skews nothing)
    _started: float = field(default_factory=lambda: time.monotonic())  # this module's clock, as tests set it
    _every: float = INTERVAL
    #: when the first worked row was seen finished, and how many had then: the rate is reckoned
    #: from there, past the start-up (Ray, the models: minutes, once) that the first row carries
    _first_worked: tuple[float, int] | None = None

    def start(self) -> None:
        """The campaign starts now."""
        self.started_at, self._started = time.time(), time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._written >= max(self.interval, self._every)  # a clock's step stops no feed

    def write(
        self,
        state: str,
        row_status: Mapping[str, str],
        counts: Mapping[str, int],
        frames_done: int,
        frames_planned: int,
        qa: Mapping[str, object] | None = None,
        worked: int | None = None,
    ) -> None:
        """`worked`: the rows finished that took work (None: every ok and failed one); the time
        left is reckoned from them."""
        began, clock = time.time(), time.monotonic()
        finished = sum(counts.get(s, 0) for s in ("ok", "failed", "skipped"))
        total = len(row_status)
        # from the rows that took work: skipped rows (a rerun's) and refused ones finish at once and
        # would say "done soon"
        if worked is None:
            worked = counts.get("ok", 0) + counts.get("failed", 0)
        if worked and self._first_worked is None:
            self._first_worked = (clock, worked)
        eta = None
        if state == "running" and worked and self._first_worked is not None:
            since, then = self._first_worked
            # from the rows finished since the first (not the start-up its time held), until there are some
            eta = (clock - since) / (worked - then) if worked > then else (clock - self._started) / worked
            eta *= total - finished
        doc = {
            "state": state,
            "started_at": round(self.started_at, 3),
            "updated_at": round(began, 3),
            "finished_at": None if state == "running" else round(began, 3),
            "rows": {"total": total, **{s: counts.get(s, 0) for s in STATUSES}},
            "frames": {"done": frames_done, "planned": frames_planned},
            "eta_seconds": None if eta is None else round(eta, 1),
            "row_status": dict(row_status),
            "qa": dict(qa or {}),
        }
        try:
            storage.write_bytes(self.uri, json.dumps(doc, separators=(",", ":")).encode())
        except OSError as exc:  # a feed that cannot be written must not stop the campaign
            log.warning("could not write %s: %s", storage.display(self.uri), exc)
        self._every = max(5 * (time.monotonic() - clock), SECONDS_PER_ROW * total)
        self._written = time.monotonic()


#: a row's states in order, then its results
STATUSES = ("queued", "preparing", "rendering", "ok", "failed", "skipped")
