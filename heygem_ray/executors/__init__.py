"""Executors: what runs the campaign's stages. The campaign (`heygem_ray.campaign`) decides what to
run and when; an executor runs it and says when it is done.

* `ray` (`ray_cluster.RayExecutor`): tasks and a pool of renderer actors on a Ray cluster (a local
  one started for the run, or one it joins).
* `inline` (`inline.InlineExecutor`): the same stages in this process, on threads, with no Ray at
  all: for debugging, single videos on a laptop and tests of the campaign's scheduling.

Both hand out opaque handles: `submit` runs a stage function, `call` a method of a renderer, and
`wait` returns the handles that finished. A handle given as an argument is resolved first, so a
stage can depend on another's result without the campaign waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from heygem_ray import storage
from heygem_ray.config import EXECUTORS, Config, registered
from heygem_ray.errors import InputError
from heygem_ray.startup import Startup
from heygem_ray.stopping import StageStopped as StageStopped  # the campaign and executors raise it by this name


@dataclass(frozen=True)
class Expired:
    """What stands for a stage task the campaign stopped: an executor's `get` raises StageStopped."""

    handle: Any
    why: str


class Executor(Protocol):
    def submit(self, fn: Callable[..., Any], *args: Any, num_gpus: float = 0.0) -> Any:
        """Run a stage function; `num_gpus`: its GPU share where the cluster has GPUs."""

    def start_actors(self, count: int) -> None:
        """Start `count` renderer actors (`heygem_ray.segment.RenderWorker`), numbered from 0."""

    def call(self, actor: int, method: str, *args: Any) -> Any:
        """Call a method of a renderer actor; calls to one actor run one at a time, in order."""

    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        """The handles that are done, waiting up to `timeout` seconds for at least one."""

    def get(self, handle: Any) -> Any:
        """The result of a finished handle, or its exception raised (StageStopped for `Expired`)."""

    def stranded(self) -> list[Any]:
        """Stage tasks submitted earlier that will never run (where they had to run is gone): the
        campaign answers them as failed. Asked on every turn of its loop."""

    def cancel(self, handle: Any) -> bool:
        """Stop a submitted stage; True when it will not run on (not started, or its worker killed),
        False when it may (a stage already running on a thread)."""

    def abandon(self, handle: Any) -> None:
        """Stop a stage for good (its deadline passed, or another run owns the output root now): as
        `cancel`, and one that runs on regardless (a thread) publishes nothing (`stopping.given_up`)."""

    def close(self) -> None:
        """Stop the actors now (their CPUs and GPUs are freed)."""

    def stop(self, actor: int) -> None:
        """Stop one actor for good (its resources are freed; it is not restarted)."""

    def restart(self, actor: int) -> bool:
        """Kill a hung actor's process so the executor starts it again (its calls out fail); False
        when this executor cannot (the actor is then given up)."""

    def restarts(self, actor: int) -> int:
        """How many times the executor restarted this actor after its process died."""

    def all_restarts(self) -> list[int]:
        """`restarts` of every actor, in order, asked at once."""

    def dead(self, actor: int) -> bool:
        """Whether the actor is gone for good: the executor will not restart it (it was killed, or
        its process could not be made)."""

    def actor_count(self) -> int:
        """`cluster.actors`, or when 0, as many as this executor can host."""

    def resources(self) -> dict[str, float]:
        """CPUs and GPUs this executor has, for operators' messages and GPU shares."""

    def cause(self, exc: BaseException) -> BaseException:
        """The stage's own exception inside what `get` raised."""

    def actor_lost(self, exc: BaseException) -> bool:
        """Whether `exc` says the actor died (the executor may restart it)."""


def open_executor(cfg: Config, startup: Startup) -> AbstractContextManager[Executor]:
    """The executor `cluster.executor` names, ready to use; it is shut down on exit. Marks when
    the executor was asked for and ready in `startup`."""
    opened: AbstractContextManager[Executor] = registered(EXECUTORS[cfg.cluster.executor])(cfg, startup)
    return opened


def failure_reason(executor: Executor, exc: BaseException, prefix: str | None = None) -> str:
    """One line for a row's result: a bad input's own message, else the error (after `prefix`)."""
    cause = executor.cause(exc)
    if isinstance(cause, InputError):
        return storage.display(str(cause).splitlines()[0])
    if executor.actor_lost(exc):
        # an actor's death (RayActorError and its kinds), or a worker's, a task's too: killed for
        # memory, crashed, its node gone
        died = "renderer actor died" if "Actor" in type(cause).__name__ else "its worker was lost"
        text = f"{died} ({type(cause).__name__})"
    else:
        text = f"{type(cause).__name__}: {cause}".strip()
    text = storage.display(text.splitlines()[0]) if text else type(cause).__name__  # a signed URL's secrets
    return f"{prefix}: {text}" if prefix else text
