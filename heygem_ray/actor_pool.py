"""The campaign's books on its renderer actors: one record per actor (segments it holds, whether it
answered, when to ask again, what it said), which actor gets the next segment, and the encoder the
campaign's segments use."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from heygem_ray.config import Config
from heygem_ray.errors import RendererStartError
from heygem_ray.executors import Executor
from heygem_ray.release import code_version
from heygem_ray.segment import WorkerInfo

log = logging.getLogger("heygem_ray")

#: seconds without any ready renderer actor before the driver says why it may be waiting
ACTOR_WAIT_WARNING = 60.0

#: restarts an actor may go through without answering `ready` before it gets no more work: Ray
#: restarts a renderer that dies while starting (out of memory loading the model, a native crash)
#: for ever, and the calls waiting for it wait as long, so the campaign would never end
START_DEATHS = 3
#: seconds between checks of the starting actors' restart counts
RESTART_CHECK_SECONDS = 2.0
#: seconds from the first actor ready until the pool counts as settled (`ActorPool.settled`)
SETTLE_SECONDS = 60.0
#: seconds a lost actor may keep segments before they go to the others
LOST_ACTOR_SECONDS = 60.0
#: segments that failed on an actor and then rendered on others, with none rendered by it in
#: between, before it gets no more work: a process that is up but fails every call (a broken CUDA
#: context, a full disk on its node) would otherwise take every retry, as it frees up first
MISSES = 3


@dataclass
class Actor:
    index: int
    load: int = 0  # segments sent to it and not answered yet
    healthy: bool = False  # answered `ready` since it (re)started
    probe_at: float | None = 0.0  # when to ask `ready` next; None while a question is out or it is healthy
    info: WorkerInfo | None = None  # its answer: pid, cores, encoder, start times
    failed: str | None = None  # why it will never render
    restarts_at_ready: int = 0  # its restart count when it last answered `ready`
    lost_at: float | None = None  # when it was last seen lost, until it answers again
    waiting_since: float | None = None  # when it was started or lost, until it answers `ready`
    misses: int = 0  # segments that failed on it and rendered elsewhere since it last rendered one
    last_error: str = ""  # why its last failed segment failed

    @property
    def pid(self) -> int | None:
        return self.info.pid if self.info and self.healthy else None


class ActorPool:
    def __init__(self, cfg: Config, executor: Executor):
        self.cfg, self.executor = cfg, executor
        self.actors: list[Actor] = []
        # `encoder.codec=auto` is decided by the first actor that answers (NVENC if its GPU has an
        # encoder), so rows prepare meanwhile and nothing waits on a node that may never start.
        # Every segment then uses that one codec, so a row's segments join without re-encoding.
        self.codec: str | None = None if cfg.encoder.codec == "auto" else cfg.encoder.codec
        #: the driver's code: segments are keyed by it (`rows`), so every actor must run the same
        self.code = code_version()
        #: set once no actor can ever render: every row waiting for one fails with it
        self.error: str | None = None
        #: when the first actor answered (time.monotonic()), for start-up figures
        self.first_ready_at: float | None = None
        self._started = time.monotonic()
        self._warned = False
        self._restarts_checked_at = 0.0

    def start(self) -> None:
        """Start the actors. Each gets work once it answers (model loaded): waiting for all of them
        up front would hang a campaign whose cluster cannot fit every actor yet (GPU nodes still
        being added)."""
        count = self.executor.actor_count()
        self.executor.start_actors(count)
        self._started = time.monotonic()
        self.actors = [Actor(i, waiting_since=self._started) for i in range(count)]

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def inflight(self) -> int:
        return sum(a.load for a in self.actors)

    @property
    def pids(self) -> list[int | None]:
        return [a.pid for a in self.actors]

    def pick(self, queued: int, avoid: Collection[int] = ()) -> int | None:
        """The actor for the next of `queued` segments, or None to keep it queued: the least loaded
        healthy actor below `render.segments_per_actor`, not one in `avoid` (where the segment
        failed) while there are others, and a busy one only while the queue holds more than the
        actors still starting can take (a small campaign's last segments wait for an actor about to
        answer rather than queue behind the first one)."""
        healthy = [a for a in self.actors if a.healthy]
        if not healthy:
            return None
        actor = min([a for a in healthy if a.index not in avoid] or healthy, key=lambda a: a.load)
        starting = sum(1 for a in self.actors if not a.healthy and a.failed is None)
        if actor.load >= self.cfg.render.segments_per_actor or (actor.load and queued <= starting):
            return None
        return actor.index

    def due_probes(self) -> list[int]:
        """Actors to ask `ready` now (each is asked again only after its answer)."""
        now = time.monotonic()
        if not any(a.healthy for a in self.actors) and now - self._started > ACTOR_WAIT_WARNING and not self._warned:
            shape = self.cfg.cluster.actor
            log.warning(
                "no renderer actor has started after %.0f s: each needs %g CPU and %g GPU on one node; "
                "the cluster has %s",
                now - self._started,
                shape.num_cpus,
                shape.num_gpus,
                self.executor.resources(),
            )
            self._warned = True
        if now - self._restarts_checked_at >= RESTART_CHECK_SECONDS:
            self._restarts_checked_at = now
            self._watch_restarts()
            self._give_up_waiting(now)
        due = [a for a in self.actors if a.probe_at is not None and a.probe_at <= now]
        for a in due:
            a.probe_at = None
        return [a.index for a in due]

    def _watch_restarts(self) -> None:
        """Actors restarted since they last answered: a healthy one died while idle (no call of
        it failed to say so) and is asked again; one that keeps dying before it answers is given up."""
        restarts = self.executor.all_restarts()
        for a in self.actors:
            if a.failed is not None:
                continue
            deaths = restarts[a.index] - a.restarts_at_ready
            if a.healthy and deaths > 0:
                self.lost(a.index)
            elif deaths >= START_DEATHS:
                self.unusable(
                    a.index,
                    f"its process died {deaths} times while starting; its log on the node says why "
                    "(out of memory loading the model?)",
                )

    def _give_up_waiting(self, now: float) -> None:
        """Actors not ready `cluster.actor_start_timeout` seconds after they were started or lost:
        no node had room for them, or their start never ended (given up: stopped, no more work)."""
        limit = self.cfg.cluster.actor_start_timeout
        for a in self.actors:
            if limit and a.failed is None and not a.healthy and a.waiting_since and now - a.waiting_since > limit:
                shape = self.cfg.cluster.actor
                self.unusable(
                    a.index,
                    f"not ready {limit:g} s after it was {'lost' if a.lost_at else 'started'} "
                    f"(cluster.actor_start_timeout): no node had room for {shape.num_cpus:g} CPU and "
                    f"{shape.num_gpus:g} GPU (the cluster has {self.executor.resources()}), or loading its "
                    "model never ended",
                )

    def rendered(self, actor: int, failed_on: Collection[int]) -> None:
        """`actor` rendered a segment that failed on the actors `failed_on` first: each of those
        misses one more (`MISSES` of them retire it); `actor` misses none now."""
        self.actors[actor].misses = 0
        for other in set(failed_on) - {actor}:
            a = self.actors[other]
            a.misses += 1
            if a.misses >= MISSES:
                self.unusable(other, f"{a.misses} segments that failed on it rendered on other actors ({a.last_error})")

    def lost(self, actor: int) -> None:
        """An actor died (Ray restarts it): no more work for it until it answers again."""
        a = self.actors[actor]
        if a.healthy:
            a.healthy, a.probe_at = False, time.monotonic()
            a.lost_at = a.waiting_since = time.monotonic()

    def answered(self, actor: int, get: Callable[[], WorkerInfo]) -> None:
        """Take an actor's answer to `ready` (`get` returns it or raises what the call raised)."""
        a = self.actors[actor]
        if a.failed is not None:  # given up on: a late answer changes nothing
            return None
        try:
            info = get()
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this actor's, not the campaign's
            cause = self.executor.cause(exc)
            if isinstance(cause, RendererStartError):  # no restart will help
                return self.unusable(actor, str(cause))
            if not self.executor.actor_lost(exc) or self.executor.dead(actor):
                # no answer the campaign knows, or a process that will not come back (its class could
                # not be made on its node, or it was killed): this actor only, not the campaign
                log.warning("renderer actor %d: %s: %s", actor, type(cause).__name__, cause)
                return self.unusable(actor, f"{type(cause).__name__}: {cause}".splitlines()[0])
            a.probe_at = time.monotonic() + 1.0  # still restarting (maybe waiting for a node)
            return None
        if info.code != self.code:
            # a worker image or an installed package unlike the driver's (a node not yet upgraded):
            # its segments would join one video with segments of another release, under a key that
            # says they are the driver's. A release before this check says no code at all.
            return self.unusable(
                actor,
                f"it runs heygem_ray code {info.code or 'of an older release'} but the driver runs {self.code} "
                "(its node's image or installed package differs from the driver's: install the same release on "
                "every node)",
            )
        if self.codec is None:
            self.codec = info.codec
            log.info("encoder.codec=auto resolved to %s by renderer actor %d", info.codec, actor)
        elif info.codec != self.codec:
            return self.unusable(
                actor,
                f"its node encodes with {info.codec} but this campaign's segments "
                f"use {self.codec} (a cluster of mixed GPUs: name encoder.codec)",
            )
        a.healthy, a.info, a.lost_at, a.waiting_since = True, info, None, None
        a.restarts_at_ready = self.executor.restarts(actor)
        self.first_ready_at = self.first_ready_at or time.monotonic()
        pinned = f", cores {info.cores}" if info.cores is not None else ""
        log.info("renderer actor %d ready (pid %s%s, decoding: %s)", actor, info.pid, pinned, info.decoder)
        return None

    def settled(self) -> bool:
        """Whether the pool is as large as it will be soon: every actor ready (or given up), none
        able to start, or SETTLE_SECONDS since the first was ready (an autoscaler's nodes for them
        come up together; the rest may wait for room for ever)."""
        if self.error is not None or all(a.healthy or a.failed is not None for a in self.actors):
            return True
        return self.first_ready_at is not None and time.monotonic() - self.first_ready_at >= SETTLE_SECONDS

    def stalled(self, after: float) -> list[int]:
        """Lost actors still holding segments `after` seconds on: their restart waits for room no
        node may ever have, and Ray keeps the calls queued on them as long."""
        now = time.monotonic()
        return [
            a.index
            for a in self.actors
            if a.load > 0 and not a.healthy and a.lost_at is not None and now - a.lost_at > after
        ]

    def unusable(self, actor: int, reason: str) -> None:
        """An actor that will never render (its renderer cannot start, or its node's encoder is not
        the campaign's): no more segments or probes for it."""
        a = self.actors[actor]
        if a.failed is not None:
            return
        a.failed, a.healthy, a.probe_at = reason, False, None
        log.warning("renderer actor %d gets no segments: %s", actor, reason)
        try:  # its CPUs and GPU share go back to the cluster; a crash-looping one stops
            self.executor.stop(actor)
        except Exception as exc:  # noqa: BLE001 - it gets no work either way
            log.debug("could not stop renderer actor %d: %r", actor, exc)
        if all(x.failed is not None for x in self.actors):
            started = self.first_ready_at is not None
            self.error = f"{'no renderer actor is left' if started else 'renderer could not start'}: {reason}"
