"""The segments waiting for a renderer: which actor gets the next one, how many may be out at once,
and whether a failed one goes again (the campaign's retry policy for segments)."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from heygem_ray import storage
from heygem_ray.actor_pool import ActorPool
from heygem_ray.config import Config
from heygem_ray.errors import InputError, RendererStartError
from heygem_ray.executors import Executor, failure_reason
from heygem_ray.rows import RowState
from heygem_ray.segment import SegmentResult

log = logging.getLogger("heygem_ray")

#: (row id, segment index, actor): what a segment call in flight is about
SegmentCall = tuple[str, int, int]
#: queued segments looked at for one an idle actor may take, past retries kept from it
LOOK_AHEAD = 64


class SegmentQueue:
    def __init__(self, cfg: Config, actors: ActorPool, executor: Executor):
        self.cfg, self.actors, self.executor = cfg, actors, executor
        self._queue: deque[tuple[str, int]] = deque()
        self.by_node: dict[str, int] = {}  # where segments were rendered (for operators and tests)
        self.by_actor: dict[int, int] = {}  # which actor rendered them
        self.broken: dict[str, str] = {}  # rows whose segment could not be made: why (the campaign fails them)
        self._failed_on: dict[tuple[str, int], set[int]] = {}  # queued retries: the actors they failed on
        # each actor's calls out, by when they were sent: an actor runs them one at a time, oldest first
        self._out: dict[int, dict[tuple[str, int], int]] = {}
        self._sent = itertools.count()
        # per actor, its last death: (the last call sent before it, the call that was running)
        self._death: dict[int, tuple[int, int]] = {}
        # per actor with calls out: since when it works on its oldest (sent to it idle, or the
        # one before came back)
        self._busy_since: dict[int, float] = {}
        # rows a segment of which took its renderer down (`_suspect`): that segment, and the row's
        # other segments, held back here until it renders. Sent on together, a row whose input
        # kills every renderer it meets took down two actors for each of its segments (28 restarts,
        # each a model load, for a row of 10 segments) before one used up its tries.
        self._suspects: dict[str, int] = {}
        self._held: dict[str, list[int]] = {}

    def __len__(self) -> int:
        """Segments waiting to go (not those held back behind a suspect: `_suspect`)."""
        return len(self._queue)

    def cap(self) -> int:
        """Segments out on the actors at once (the rest wait here)."""
        render = self.cfg.render
        return render.max_inflight_segments or render.segments_per_actor * max(1, len(self.actors))

    def add(self, row_id: str, indexes: list[int]) -> None:
        self._queue.extend((row_id, index) for index in indexes)

    def rows(self) -> set[str]:
        return {row_id for row_id, _ in self._queue} | self._held.keys()

    def clear(self) -> None:
        self._queue.clear()
        self._failed_on.clear()
        self._suspects.clear()
        self._held.clear()

    def _suspect(self, row_id: str, index: int) -> None:
        """Segment `index` of a row took its renderer down (the actor died or hung on it): it goes
        again alone, the row's other segments held back until it renders (a row whose input kills
        its renderer then takes down one actor a try, not one for each of its segments at once)."""
        if row_id in self._suspects:
            return
        self._suspects[row_id] = index
        held = [i for r, i in self._queue if r == row_id and i != index]
        if held:
            self._queue = deque(segment for segment in self._queue if segment[0] != row_id or segment[1] == index)
            log.warning(
                "row %s segment %d took its renderer down: the row's %d other segment(s) wait until it renders",
                *(row_id, index, len(held)),
            )
        self._held[row_id] = held

    def _again(self, row_id: str, index: int) -> None:
        """A segment back in the queue, at its front: or held back, its row a suspect's."""
        if self._suspects.get(row_id, index) != index:
            self._held[row_id].append(index)
        else:
            self._queue.appendleft((row_id, index))

    def dispatch(self, states: Mapping[str, RowState]) -> Iterator[tuple[Any, SegmentCall]]:
        """Hand queued segments to the actors `ActorPool.pick` chooses, up to `cap` in all: the rest
        wait for whichever actor frees up first, so actors that start late (a GPU node still
        joining) or run faster get their share. Yields each call's handle and what it is about."""
        for row_id in [r for r in self._suspects if r not in states or r in self.broken]:  # rows ended
            del self._suspects[row_id], self._held[row_id]
        cap = self.cap()
        while self._queue and self.actors.inflight < cap:
            placed = self._next()
            if placed is None:
                break
            position, actor = placed
            row_id, index = self._queue[position]
            del self._queue[position]
            state = states.get(row_id)
            if state is None or row_id in self.broken:  # the row has its result already, or will
                self._failed_on.pop((row_id, index), None)
                continue
            assert self.actors.codec is not None  # decided by the first actor that answered
            try:
                # `force`: everything rendered again, segments an earlier run left too
                job = state.segment_job(index, self.cfg.layout, self.actors.codec, reuse=not self.cfg.force)
            except Exception as exc:  # a defect fails its row (`broken`), not the campaign
                log.exception("row %s segment %d: internal error", row_id, index)
                self.broken[row_id] = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
                self._failed_on.pop((row_id, index), None)
                continue
            self.actors.actors[actor].load += 1
            state.attempts[index] = state.attempts.get(index, 0) + 1
            if not self._out.get(actor):
                self._busy_since[actor] = time.monotonic()
            self._out.setdefault(actor, {})[(row_id, index)] = next(self._sent)
            yield self.executor.call(actor, "render_segment", job), (row_id, index, actor)

    def _next(self) -> tuple[int, int] | None:
        """Where in the queue the next segment to send is, and the actor it goes to: the first, or
        where that is a retry kept from the actors with room (it failed there; the others are full),
        the first of the next LOOK_AHEAD that one may go to. The first alone was looked at, and an
        actor sat idle behind a retry waiting for a busy one."""
        for position, segment in enumerate(itertools.islice(self._queue, LOOK_AHEAD)):
            avoid = self._failed_on.get(segment, ())
            actor = self.actors.pick(len(self._queue), avoid=avoid)
            if actor is not None:
                return position, actor
            if not avoid:  # no actor takes even a segment free to go anywhere
                return None
        return None

    def _back(self, call: SegmentCall) -> int | None:
        """A call is back from its actor (done, failed or taken back): when it was sent."""
        row_id, index, actor = call
        self.actors.actors[actor].load -= 1
        sent = self._out.get(actor, {}).pop((row_id, index), None)
        if self._out.get(actor):  # the next call starts now
            self._busy_since[actor] = time.monotonic()
        else:
            self._busy_since.pop(actor, None)
        return sent

    def hung(self, after: float) -> list[int]:
        """Actors that have worked on one segment for more than `after` seconds."""
        now = time.monotonic()
        return [actor for actor, since in self._busy_since.items() if now - since > after]

    def _was_running(self, actor: int, sent: int | None) -> bool:
        """Whether the call sent at `sent`, failed because its actor died, is the one the actor was
        running then: the oldest of its calls out at the death. The calls queued behind it failed
        only with it, so they are not charged a try: one bad input crashing its renderer (a
        decoder's segfault, an out-of-memory kill) would otherwise use up the tries of every
        segment waiting on that actor."""
        if sent is None:
            return True
        last, running = self._death.get(actor, (-1, -1))
        if sent > last:  # the first call back from a new death: those still out died with it
            out = [sent, *self._out.get(actor, {}).values()]
            last, running = max(out), min(out)
            self._death[actor] = (last, running)
        return sent == running

    def rendered(self, call: SegmentCall, result: SegmentResult) -> None:
        row_id, index, actor = call
        self._back(call)
        self.actors.rendered(actor, self._failed_on.pop((row_id, index), ()))
        if self._suspects.get(row_id) == index:  # not the row's fault after all: the rest go on, first
            del self._suspects[row_id]
            self._queue.extendleft(reversed([(row_id, i) for i in sorted(self._held.pop(row_id))]))
        if result.node:
            self.by_node[result.node] = self.by_node.get(result.node, 0) + 1
        if not result.reused:
            self.by_actor[actor] = self.by_actor.get(actor, 0) + 1

    def take_back(
        self, actor: int, calls: list[SegmentCall], states: Mapping[str, RowState], hung: str | None = None
    ) -> dict[str, str]:
        """The segments `calls` left with `actor`, queued for the others (a call, should the actor
        ever run it, writes the same file). An actor lost and not come back: none of them is
        charged a try (the call it was running when it died failed, and was charged, then; these
        waited behind it). One `hung` (why): the call it is stuck on keeps its try, those behind it
        never ran. Returns the failure reasons of rows a segment of which has had its
        `render.max_attempts` tries."""
        out = self._out.get(actor, {})
        sent = [out[(row_id, index)] for row_id, index, _ in calls if (row_id, index) in out]
        running = min(sent, default=None) if hung else None
        why = hung or "was lost"
        failures: dict[str, str] = {}
        for call in calls:
            row_id, index, _ = call
            sent_at = self._back(call)
            charged = running is not None and sent_at == running
            state = states.get(row_id)
            if state is None:
                continue
            if not charged:
                state.attempts[index] -= 1
            elif state.attempts.get(index, 0) >= self.cfg.render.max_attempts:
                self._failed_on.pop((row_id, index), None)
                failures[row_id] = (
                    f"segment {index} failed after {state.attempts[index]} attempt(s): its renderer {why}"
                )
                continue
            else:  # kept off it, and a miss of it once it renders elsewhere (as a failure is)
                self.actors.actors[actor].last_error = why
                self._failed_on.setdefault((row_id, index), set()).add(actor)
                self._suspect(row_id, index)
            log.warning("row %s segment %d: its renderer actor %d %s; sent to another", row_id, index, actor, why)
            self._again(row_id, index)
        return failures

    def failed(self, call: SegmentCall, state: RowState | None, exc: BaseException) -> str | None:
        """A segment call raised: the row's failure reason, or None when the segment goes again (or
        its row has a result already). A renderer that lost its model is not the segment's fault:
        the segment goes to another actor as if never sent, and the actor is asked `ready` again;
        a bad input or a storage error that `storage` retried already fails the row at once;
        anything else (an actor or node lost, a renderer's own failure) is tried
        `render.max_attempts` times."""
        row_id, index, actor = call
        sent = self._back(call)
        cause = self.executor.cause(exc)
        lost = self.executor.actor_lost(exc)
        if lost and self.actors.actors[actor].failed is None and self.executor.dead(actor):
            # killed for good (an operator's `ray kill`; Ray restarts one that crashes): not this
            # segment's doing
            self.actors.unusable(actor, f"{type(cause).__name__}: its process was ended for good (killed)")
        if lost and (self.actors.actors[actor].failed is not None or not self._was_running(actor, sent)):
            # the driver stopped that actor itself (retired, given up), the segment only waited
            # behind the one that took the actor down, or it was killed: no try of this segment's
            if self.actors.actors[actor].failed is None:
                self.actors.lost(actor)
            if state is not None:
                state.attempts[index] -= 1
                self._again(row_id, index)
            return None
        if lost:
            self.actors.lost(actor)
        if isinstance(cause, RendererStartError):  # restarted without its model: asked `ready` again,
            self.actors.lost(actor)  # which tries a load that failed for a passing reason once more
            if state is not None:
                state.attempts[index] -= 1
                self._again(row_id, index)
            return None
        if state is None:  # the row failed meanwhile
            self._failed_on.pop((row_id, index), None)
            return None
        # bad input fails the same way again, and a storage error has had its retries already (other
        # OSErrors, a node's full disk or its cache, may not meet another actor)
        final = isinstance(cause, InputError) or storage.retried(cause)
        if final or state.attempts.get(index, 0) >= self.cfg.render.max_attempts:
            self._failed_on.pop((row_id, index), None)
            return failure_reason(
                self.executor, exc, f"segment {index} failed after {state.attempts[index]} attempt(s)"
            )
        reason = failure_reason(self.executor, exc)
        log.warning("row %s segment %d: %s; retrying on another actor", row_id, index, reason)
        self.actors.actors[actor].last_error = reason
        # a lost actor too: it comes back, and one that died on every segment it ran (a broken GPU,
        # a node whose memory monitor kills it) took the retries too, and was never retired
        self._failed_on.setdefault((row_id, index), set()).add(actor)
        if lost:
            self._suspect(row_id, index)
        self._again(row_id, index)
        return None
