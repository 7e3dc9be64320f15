"""The stop flag of a stage task that runs on a thread (`InlineExecutor`): a thread cannot be
killed, so a stage the campaign abandoned checks the flag before it publishes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class StageStopped(Exception):
    """A stage task the campaign stopped: at its deadline (`render.stage_timeout`), or where it
    would never run (`Executor.stranded`)."""


#: the stop flag of the stage task this thread runs, where it has one
_running = threading.local()


def given_up() -> bool:
    """True inside a stage task the campaign abandoned (`Executor.abandon`: past
    `render.stage_timeout`, or its output root lost) that runs on: a Ray task is killed, an inline
    executor's thread cannot be. A stage about to publish checks it, so a row reported failed gets
    no output afterwards (nor the output root's next campaign a writer it does not know of)."""
    stop = getattr(_running, "stop", None)
    return stop is not None and stop.is_set()


@contextlib.contextmanager
def stoppable(stop: threading.Event) -> Iterator[None]:
    """Run the body as a stage task that `stop` gives up (`given_up`)."""
    _running.stop = stop
    try:
        yield
    finally:
        _running.stop = None
