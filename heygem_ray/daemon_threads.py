"""A pool of daemon threads taking calls in order, each answered by a `concurrent.futures.Future`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class DaemonThreads:
    """Threads taking calls in order: one (an inline renderer's calls run one at a time, as an
    actor's do), or several (the inline executor's stage tasks, the studio's campaign saves).
    Daemon threads: a `ThreadPoolExecutor`'s are joined at the interpreter's exit, and one hung in
    a decoder or on the GPU, or a stage the campaign gave up (`render.stage_timeout`), kept the
    finished run's process, and its output root's lock, alive for ever."""

    def __init__(self, name: str, count: int = 1) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._count = count
        for i in range(count):
            threading.Thread(target=self._run, name=f"{name}-{i}" if count > 1 else name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._calls.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """No more calls: those still queued are cancelled, the one running finishes."""
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[0].cancel()
        for _ in range(self._count):
            self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's to see, as a pool's future
                future.set_exception(exc)
