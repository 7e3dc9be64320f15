"""The inline executor (`cluster=inline`): the campaign's stages in this process, no Ray at all.

Stage functions run on a small thread pool (they spend their time in PyAV, OpenCV and storage,
which release the GIL); each renderer is one `RenderWorker` on a thread of its own, so its calls
run one at a time, in order, as an actor's do. One renderer by default (`cluster.actors`), using
every core of this process (`cluster.actor.threads`, 0 = all): torch's thread count is per
process, so renderers here share it rather than split the cores as separate actors would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

from heygem_ray.config import Config
from heygem_ray.daemon_threads import DaemonThreads
from heygem_ray.executors import Expired, StageStopped
from heygem_ray.stopping import stoppable

if TYPE_CHECKING:
    from heygem_ray.segment import RenderWorker
    from heygem_ray.startup import Startup


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class InlineExecutor:
    def __init__(self, cfg: Config):
        actor = cfg.cluster.actor
        # one process, one torch thread count: the renderers get every core unless told otherwise
        self.cfg = dataclasses.replace(
            cfg,
            cluster=dataclasses.replace(
                cfg.cluster, actor=dataclasses.replace(actor, threads=actor.threads or _cores(), pin_cpus=False)
            ),
        )
        self._tasks = DaemonThreads("heygem-task", max(2, _cores()))
        self._actors: list[DaemonThreads] = []
        self._workers: list[Future[RenderWorker]] = []
        self._stops: dict[Future[Any], threading.Event] = {}  # each stage task's, until it is done

    def submit(self, fn: Callable[..., Any], *args: Any, num_gpus: float = 0.0) -> Future[Any]:
        stop = threading.Event()
        handle = self._tasks.submit(_resolved, fn, args, stop)
        self._stops[handle] = stop
        handle.add_done_callback(self._forget)
        return handle

    def _forget(self, handle: Future[Any]) -> None:
        self._stops.pop(handle, None)

    def start_actors(self, count: int) -> None:
        from heygem_ray.segment import RenderWorker

        for i in range(count):
            thread = DaemonThreads(f"heygem-renderer-{i}")
            self._actors.append(thread)
            self._workers.append(thread.submit(RenderWorker, self.cfg))

    def call(self, actor: int, method: str, *args: Any) -> Future[Any]:
        worker = self._workers[actor]
        return self._actors[actor].submit(lambda: getattr(worker.result(), method)(*_values(args)))

    def wait(self, handles: Sequence[Future[Any]], timeout: float) -> list[Future[Any]]:
        done, _ = wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def get(self, handle: Future[Any] | Expired) -> Any:
        if isinstance(handle, Expired):
            raise StageStopped(handle.why)
        return handle.result()

    def cancel(self, handle: Future[Any]) -> bool:
        return handle.cancel() or handle.done()

    def abandon(self, handle: Future[Any]) -> None:
        stop = self._stops.get(handle)
        if stop is not None:  # one running goes on, but publishes nothing (`stopping.given_up`)
            stop.set()
        self.cancel(handle)

    def close(self) -> None:
        """Stop taking work: queued calls are cancelled, those running go on (a segment's file is
        published whole, so one the process's end cuts short leaves nothing half-written)."""
        self._tasks.shutdown()
        for renderer in self._actors:
            renderer.shutdown()

    def stranded(self) -> list[Any]:
        return []  # its threads are always there

    def stop(self, actor: int) -> None:
        pass  # a thread cannot be killed, nor holds anything another renderer could use: it ends with the process

    def restart(self, actor: int) -> bool:
        """A thread cannot be killed: the hung renderer is left to its call (its queued calls
        cancelled) and a new one, with a renderer of its own, takes its place. Given up instead,
        the only renderer of a default inline run failed every row after the one it hung on."""
        from heygem_ray.segment import RenderWorker

        self._actors[actor].shutdown()
        thread = DaemonThreads(f"heygem-renderer-{actor}")
        self._actors[actor] = thread
        self._workers[actor] = thread.submit(RenderWorker, self.cfg)
        return True

    def restarts(self, actor: int) -> int:
        return 0  # a renderer here dies only with the process

    def all_restarts(self) -> list[int]:
        return [0] * len(self._workers)

    def dead(self, actor: int) -> bool:
        return False

    def actor_count(self) -> int:
        return self.cfg.cluster.actors or 1

    def resources(self) -> dict[str, float]:
        return {"CPU": float(_cores())}

    def cause(self, exc: BaseException) -> BaseException:
        return exc

    def actor_lost(self, exc: BaseException) -> bool:
        return False  # a renderer here dies only with the process


def _values(args: tuple[Any, ...]) -> list[Any]:
    """Arguments with every handle replaced by its result (as Ray passes an ObjectRef's value)."""
    return [a.result() if isinstance(a, Future) else a for a in args]


def _resolved(fn: Callable[..., Any], args: tuple[Any, ...], stop: threading.Event) -> Any:
    with stoppable(stop):
        return fn(*_values(args))


@contextlib.contextmanager
def open_inline(cfg: Config, startup: Startup) -> Iterator[InlineExecutor]:
    startup.ray_called = time.time()
    executor = InlineExecutor(cfg)
    startup.ray_ready = time.time()
    try:
        yield executor
    finally:
        executor.close()
