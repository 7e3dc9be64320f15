"""The segments waiting for a renderer: which actor gets the next one, how many may be out at once,
and whether a failed one goes again (the campaign's retry policy for segments)."""

from __future__ import annotations

import logging
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


class SegmentQueue:
    def __init__(self, cfg: Config, actors: ActorPool, executor: Executor):
        self.cfg, self.actors, self.executor = cfg, actors, executor
        self._queue: deque[tuple[str, int]] = deque()
        self.by_node: dict[str, int] = {}  # where segments were rendered (for operators and tests)
        self.by_actor: dict[int, int] = {}  # which actor rendered them
        self.broken: dict[str, str] = {}  # rows whose segment could not be made: why (the campaign fails them)
        self._failed_on: dict[tuple[str, int], set[int]] = {}  # queued retries: the actors they failed on

    def __len__(self) -> int:
        return len(self._queue)

    def cap(self) -> int:
        """Segments out on the actors at once (the rest wait here)."""
        render = self.cfg.render
        return render.max_inflight_segments or render.segments_per_actor * max(1, len(self.actors))

    def add(self, row_id: str, indexes: list[int]) -> None:
        self._queue.extend((row_id, index) for index in indexes)

    def rows(self) -> set[str]:
        return {row_id for row_id, _ in self._queue}

    def clear(self) -> None:
        self._queue.clear()
        self._failed_on.clear()

    def dispatch(self, states: Mapping[str, RowState]) -> Iterator[tuple[Any, SegmentCall]]:
        """Hand queued segments to the actors `ActorPool.pick` chooses, up to `cap` in all: the rest
        wait for whichever actor frees up first, so actors that start late (a GPU node still
        joining) or run faster get their share. Yields each call's handle and what it is about."""
        cap = self.cap()
        while self._queue and self.actors.inflight < cap:
            actor = self.actors.pick(len(self._queue), avoid=self._failed_on.get(self._queue[0], ()))
            if actor is None:
                break
            row_id, index = self._queue.popleft()
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
            yield self.executor.call(actor, "render_segment", job), (row_id, index, actor)

    def rendered(self, call: SegmentCall, result: SegmentResult) -> None:
        row_id, index, actor = call
        self.actors.actors[actor].load -= 1
        self.actors.rendered(actor, self._failed_on.pop((row_id, index), ()))
        if result.node:
            self.by_node[result.node] = self.by_node.get(result.node, 0) + 1
        if not result.reused:
            self.by_actor[actor] = self.by_actor.get(actor, 0) + 1

    def take_back(self, call: SegmentCall, state: RowState | None) -> str | None:
        """A segment left with an actor that was lost and has not come back: queued for the others (its
        call, should the actor ever run it, writes the same file). The row's failure reason when
        the segment has had its `render.max_attempts` tries."""
        row_id, index, actor = call
        self.actors.actors[actor].load -= 1
        if state is None:
            return None
        if state.attempts.get(index, 0) >= self.cfg.render.max_attempts:
            return f"segment {index} failed after {state.attempts[index]} attempt(s): its renderer was lost"
        log.warning("row %s segment %d: its renderer actor %d is lost; sent to another", row_id, index, actor)
        self._queue.appendleft((row_id, index))
        return None

    def failed(self, call: SegmentCall, state: RowState | None, exc: BaseException) -> str | None:
        """A segment call raised: the row's failure reason, or None when the segment goes again (or
        its row has a result already). A renderer that lost its model is not the segment's fault:
        the segment goes to another actor as if never sent, and the actor is asked `ready` again;
        a bad input or a storage error that `storage` retried already fails the row at once;
        anything else (an actor or node lost, a renderer's own failure) is tried
        `render.max_attempts` times."""
        row_id, index, actor = call
        self.actors.actors[actor].load -= 1
        cause = self.executor.cause(exc)
        if self.executor.actor_lost(exc) and self.actors.actors[actor].failed is not None:
            # the driver stopped that actor itself (retired, given up): no try of this segment's
            if state is not None:
                state.attempts[index] -= 1
                self._queue.appendleft((row_id, index))
            return None
        if self.executor.actor_lost(exc):
            self.actors.lost(actor)
        if isinstance(cause, RendererStartError):  # restarted without its model: asked `ready` again,
            self.actors.lost(actor)  # which tries a load that failed for a passing reason once more
            if state is not None:
                state.attempts[index] -= 1
                self._queue.appendleft((row_id, index))
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
        if not self.executor.actor_lost(exc):  # a lost actor is no longer asked; a living one may be broken
            self._failed_on.setdefault((row_id, index), set()).add(actor)
        self._queue.appendleft((row_id, index))
        return None
