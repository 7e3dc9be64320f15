"""A campaign's start, up to its first rendered frames, broken down for operators and benchmarks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from heygem_ray import metrics
from heygem_ray.segment import SegmentResult, WorkerInfo


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

    def rendered(self, actor: WorkerInfo | None, segment: SegmentResult) -> None:
        """A segment was rendered by `actor`: the first one that was not reused ends the start-up."""
        if self.segment is None and not segment.reused and actor is not None:
            self.actor, self.segment = actor, segment

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
