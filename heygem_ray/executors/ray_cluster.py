"""The Ray executor: stage functions as Ray tasks, renderers as a pool of Ray actors (restarted
when they die, their model loaded once), on a local Ray started for the run or a cluster it joins.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from heygem_ray.config import Config
from heygem_ray.devices import gpu_room, gpu_slots
from heygem_ray.errors import ClusterConfigError
from heygem_ray.executors import Expired, StageStopped
from heygem_ray.segment import RenderWorker

if TYPE_CHECKING:
    from heygem_ray.startup import Startup

log = logging.getLogger("heygem_ray")

#: how often a campaign waiting for its room on the cluster says so
RESERVE_WAIT_LOG_SECONDS = 60.0
#: how long a campaign waits for its room where no other campaign's is there (then it goes without)
ROOM_ALONE_SECONDS = 60.0
#: what a campaign's room (placement group) is named: then its job's id
ROOM_PREFIX = "heygem_ray-room-"
#: how often a campaign looks whether its room still stands
ROOM_CHECK_SECONDS = 5.0
#: how long a room with none of its bundles placed (their nodes gone) stands before it is given up
ROOM_LOST_SECONDS = 60.0


def _job_id() -> str:
    try:
        return str(ray.get_runtime_context().get_job_id())
    except Exception:  # noqa: BLE001 - a name for people, not a key
        return str(os.getpid())


def _placed_bundles(room: PlacementGroup) -> dict[int, bool] | None:
    """Whether each bundle of the room is on a node now (None where Ray cannot say)."""
    try:
        info = ray.util.placement_group_table(room)
    except Exception as exc:  # noqa: BLE001 - Ray internals
        log.debug("placement group not read: %r", exc)
        return None
    return {int(i): bool(node) for i, node in info.get("bundles_to_node_id", {}).items()}


def _other_rooms(own: PlacementGroup) -> bool:
    """Whether another campaign's room is placed on the cluster now (this one waits behind it)."""
    try:
        table = ray.util.placement_group_table()
    except Exception as exc:  # noqa: BLE001 - Ray internals: taken for yes, waiting on as before
        log.debug("placement groups not listed: %r", exc)
        return True
    mine = own.id.hex()
    return any(
        pg_id != mine and str(info.get("name", "")).startswith(ROOM_PREFIX) and info.get("state") == "CREATED"
        for pg_id, info in table.items()
    )


class RayExecutor:
    """Tasks and renderer actors on the Ray this process is connected to.

    Before its actors, a campaign of an auto-sized pool reserves (a placement group) room for its
    CPU tasks (the CPUs its renderers leave on each node) and for its first renderer
    (`reserved_bundles`): its CPU tasks run in that room, its other renderers where they fit. Each
    sized from the whole cluster, two campaigns at once (two users of the studio, two `ray job
    submit`s) placed renderers on every CPU, and neither's tasks ever ran: both hung. Now the
    second waits for its room, and one that has it always goes on."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._actors: list[Any] = []
        self._tasks: dict[tuple[Callable[..., Any], float, bool], Any] = {}
        self._room: PlacementGroup | None = None
        self._in_room: set[Any] = set()  # stage tasks sent into the room, not yet seen done
        self._room_checked = 0.0  # when the room was last looked at (time.monotonic)
        self._room_lost_since: float | None = None  # since when none of its bundles is placed
        self._first_bundle: int | None = None  # the room's bundle the first renderer is held in
        self._first_lost_since: float | None = None  # since when that bundle is not placed
        # restarts of the actors an index had before its current one (`_first_out_of_room`): the
        # pool counts an actor's deaths from its restarts when it last answered
        self._restarts_before: dict[int, int] = {}
        self._stopped: set[int] = set()  # actors stopped for good (`stop`)

    def _remote(self, fn: Callable[..., Any], num_gpus: float, in_room: bool) -> Any:
        # re-run when the worker process dies; an exception is final here (storage retried it already)
        options: dict[str, Any] = {"max_retries": TASK_RETRIES, "retry_exceptions": False}
        if in_room:  # any of its bundles with room for it (the first renderer's too, while that is not held)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._room)
        return ray.remote(fn).options(num_cpus=self.cfg.cluster.task_cpus, num_gpus=num_gpus, **options)

    def submit(self, fn: Callable[..., Any], *args: Any, num_gpus: float = 0.0) -> Any:
        # a CPU task in the room (one sent wherever Ray finds a CPU waited for ever where renderers
        # held them all); a GPU detection task where a GPU share is free (`fit_actors` leaves one)
        in_room = self._room is not None and not num_gpus
        key = (fn, num_gpus, in_room)
        if key not in self._tasks:
            self._tasks[key] = self._remote(fn, num_gpus, in_room)
        handle = self._tasks[key].remote(*args)
        if in_room:
            self._in_room.add(handle)
        return handle

    def stranded(self) -> list[Any]:
        """Stage tasks that will never run: sent into this campaign's room, every node of which
        went (a spot GPU worker reclaimed, the only worker of a cluster whose head has no CPUs).
        Ray places a room's lost bundles again only all together, and those pinned to a node
        (`reserved_bundles`) only on it, so its tasks waited for ever, and a replacement node sat
        idle. Once no bundle of the room has been placed for ROOM_LOST_SECONDS, the room is given
        up: its tasks still out are returned (the campaign fails their rows, a rerun does them),
        and new tasks go wherever they fit. The first renderer, held in the room, is started again
        outside it once its own bundle has been unplaced that long (its node alone went: the tasks
        go on in the room's bundles left; it waited, restarting, for `cluster.actor_start_timeout`)."""
        now = time.monotonic()
        if self._room is None or now - self._room_checked < ROOM_CHECK_SECONDS:
            return []
        self._room_checked = now
        placed = _placed_bundles(self._room) or {}
        lost = bool(placed) and not any(placed.values())
        first_lost = self._first_bundle is not None and not placed.get(self._first_bundle, True)
        self._room_lost_since = (now if self._room_lost_since is None else self._room_lost_since) if lost else None
        self._first_lost_since = (
            (now if self._first_lost_since is None else self._first_lost_since) if first_lost else None
        )
        if self._first_lost_since is not None and now - self._first_lost_since >= ROOM_LOST_SECONDS:
            log.warning(
                "this campaign's first renderer lost its place on the cluster with its node: it starts where it fits"
            )
            self._first_out_of_room()
        if self._room_lost_since is None or now - self._room_lost_since < ROOM_LOST_SECONDS:
            return []
        log.warning(
            "the room reserved on the cluster for this campaign's tasks is gone with its nodes: the tasks waiting "
            "in it fail their rows (run the campaign again for them); tasks and renderers go where they fit now"
        )
        room, self._room = self._room, None
        self._tasks = {key: task for key, task in self._tasks.items() if not key[2]}
        remove_placement_group(room)
        stranded, self._in_room = list(self._in_room), set()
        return stranded

    def _first_out_of_room(self) -> None:
        """Start the first renderer again outside the room (its bundle there is lost)."""
        self._first_bundle = self._first_lost_since = None
        if self._actors and 0 not in self._stopped:
            self._restarts_before[0] = self.restarts(0)  # the new one's count from 0 went under the pool's baseline
            ray.kill(self._actors[0])
            self._actors[0] = ray.remote(RenderWorker).options(**self._actor_options()).remote(self.cfg)

    def _actor_options(self) -> dict[str, Any]:
        shape = self.cfg.cluster.actor
        return {
            "num_cpus": shape.num_cpus,
            "num_gpus": shape.num_gpus,
            "max_restarts": -1,  # a crashed actor comes back with its model; the campaign re-sends the segment
            "max_task_retries": 0,
        }

    def start_actors(self, count: int) -> None:
        options = self._actor_options()
        alive = [node for node in ray.nodes() if node.get("Alive")]
        room = reserved_bundles(self.cfg, [n["Resources"] for n in alive], count, [n["NodeID"] for n in alive])
        first: dict[str, Any] = {}
        if room is not None and self._reserve(room) and renderer_bundle(self.cfg):
            self._first_bundle = len(room) - 1
            first = {"scheduling_strategy": PlacementGroupSchedulingStrategy(self._room, self._first_bundle)}
        actor_cls = ray.remote(RenderWorker)
        self._actors = [
            actor_cls.options(**options, **(first if i == 0 else {})).remote(self.cfg) for i in range(count)
        ]

    def _reserve(self, bundles: list[tuple[dict[str, float], dict[str, str]]]) -> bool:
        """Reserve `bundles` (each on the node its labels name) as this campaign's room, once the
        cluster holds it: while another campaign's room is there, this one waits for it (saying so
        every minute); where none is and the room is still not placed after ROOM_ALONE_SECONDS
        (other work holds part of a node, a node went), none is kept and the campaign goes on
        without one, as before rooms. Waits in short slices: a stop (Ctrl-C, `ray job stop`) is
        not held up by Ray's wait. Whether the room is there."""
        self._room = placement_group(
            [b for b, _ in bundles], bundle_label_selector=[on for _, on in bundles], name=ROOM_PREFIX + _job_id()
        )
        started = said = time.monotonic()
        while not self._room.wait(1):
            waited = time.monotonic() - started
            if waited > ROOM_ALONE_SECONDS and not _other_rooms(self._room):
                log.warning(
                    "no room reserved on the cluster for this campaign's tasks (%s): other work holds part of it; "
                    "tasks and renderers go where they fit",
                    _shown([b for b, _ in bundles]),
                )
                remove_placement_group(self._room)
                self._room = None
                return False
            if time.monotonic() - said >= RESERVE_WAIT_LOG_SECONDS:
                said = time.monotonic()
                log.warning(
                    "waited %.0f s for room on the cluster for this campaign's tasks and first renderer (%s): "
                    "another campaign holds it (`ray status` shows what); this one starts once that ends",
                    waited,
                    _shown([b for b, _ in bundles]),
                )
        return True

    def call(self, actor: int, method: str, *args: Any) -> Any:
        return getattr(self._actors[actor], method).remote(*args)

    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        """Every call of `handles` ended by now, once one has (the driver handles them in one turn:
        a turn a call, with thousands in flight, rebuilt its list and scanned the actors each time)."""
        ready, rest = ray.wait(list(handles), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        self._in_room.difference_update(ready)
        return ready

    def get(self, handle: Any) -> Any:
        if isinstance(handle, Expired):
            raise StageStopped(handle.why)
        return ray.get(handle)

    def cancel(self, handle: Any) -> bool:
        self._in_room.discard(handle)
        ray.cancel(handle, force=True)  # a task killed with its worker is not retried
        return True

    def abandon(self, handle: Any) -> None:
        self.cancel(handle)  # its worker killed: nothing runs on

    def close(self) -> None:
        actors, self._actors = self._actors, []
        for actor in actors:  # free their CPUs/GPUs now, not at garbage collection
            try:
                ray.kill(actor)
            except Exception as exc:  # noqa: BLE001 - one not killed (a GCS hiccup) stops no other's kill
                log.warning("renderer actor not stopped (%s: %s): it goes with the driver", type(exc).__name__, exc)
        room, self._room = self._room, None
        if room is not None:  # the next campaign waiting for it starts now, not at this job's end
            remove_placement_group(room)

    def stop(self, actor: int) -> None:
        self._stopped.add(actor)
        ray.kill(self._actors[actor])  # no_restart: Ray's default for ray.kill

    def restart(self, actor: int) -> bool:
        ray.kill(self._actors[actor], no_restart=False)  # max_restarts=-1: Ray starts it again
        return True

    def restarts(self, actor: int) -> int:
        # the GCS's own count: a death while starting fails no call (calls wait for the restart)
        return self._restarts_before.get(actor, 0) + int(self._gcs_record(actor).get("NumRestarts", 0))

    def all_restarts(self) -> list[int]:
        # the pool asks after every actor every couple of seconds: one GCS request for each took a
        # large cluster's driver loop most of its time (560 actors: 560 requests); this job's
        # actor table comes in one
        try:
            table = ray._private.state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id()))
        except Exception as exc:  # noqa: BLE001 - Ray internals
            log.debug("could not read this job's actor table: %r", exc)
            table = {}
        records = [table.get(a._actor_id.hex()) if isinstance(table, dict) else None for a in self._actors]
        return [
            self._restarts_before.get(i, 0) + int(record.get("NumRestarts", 0))
            if isinstance(record, dict)
            else self.restarts(i)
            for i, record in enumerate(records)
        ]

    def dead(self, actor: int) -> bool:
        # DEAD is final: the actor restarts for ever otherwise (max_restarts=-1)
        return self._gcs_record(actor).get("State") == "DEAD"

    def _gcs_record(self, actor: int) -> dict[str, Any]:
        """What the GCS says of the actor; empty when it cannot be read (Ray internals: without it,
        no actor is given up)."""
        try:
            info = ray._private.state.actors(actor_id=self._actors[actor]._actor_id.hex())
        except Exception as exc:  # noqa: BLE001
            log.debug("could not read renderer actor %d's record: %r", actor, exc)
            return {}
        return info if isinstance(info, dict) else {}

    def actor_count(self) -> int:
        return actor_count(self.cfg)

    def resources(self) -> dict[str, float]:
        return ray.cluster_resources()

    def cause(self, exc: BaseException) -> BaseException:
        if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
            return exc.cause
        return exc

    def actor_lost(self, exc: BaseException) -> bool:
        # Ray's memory monitor killing the actor's worker, or its node going, is no RayActorError
        return isinstance(self.cause(exc), (RayActorError, OutOfMemoryError, NodeDiedError, WorkerCrashedError))


@contextlib.contextmanager
def open_ray(cfg: Config, startup: Startup) -> Iterator[RayExecutor]:
    """Join or start Ray for the run (a Ray started here is shut down after it)."""
    own_ray = not cfg.cluster.address and not os.environ.get("RAY_ADDRESS")  # else ray.init joins a cluster
    planned = local_resources(cfg) if own_ray and not ray.is_initialized() else None
    if planned is not None:  # refused before Ray starts (seconds on a small machine), not after
        check_local_fit(cfg, planned)
    startup.ray_called = time.time()
    started_ray = connect(cfg)
    startup.ray_ready = time.time()
    executor = RayExecutor(cfg)
    try:
        if started_ray and own_ray and planned is None:  # no node will join it: what does not fit never will
            check_local_fit(cfg, ray.cluster_resources())
        yield executor
    finally:
        try:
            executor.close()
        finally:
            if started_ray:
                shutdown(local=own_ray)


def connect(cfg: Config) -> bool:
    """Join or start Ray; True when this call started it (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    with _sigterm_handler_kept():
        _init(cfg)
    return True


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """ray.init makes SIGTERM exit the process at once (sys.exit) in the main thread. A handler
    of this process's own (the CLI's: stop, report every row, exit 130) is put back after it."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


#: times Ray runs a stage task again after its worker process died (a node lost, a crash) or
#: Ray's memory monitor killed it
TASK_RETRIES = 3


def _init(cfg: Config) -> None:
    # Ray retries a task its memory monitor killed for ever (`task_oom_retries` -1), whatever its
    # max_retries: an avatar too big for its node's memory never answered, so its rows waited for
    # render.stage_timeout (2 hours) and failed "hung", and the next row tried again. The owner of
    # a task decides its retries: this process, which reads the setting when it connects (a
    # cluster's own settings are the raylets'; a local Ray's system config says it to all).
    os.environ.setdefault("RAY_task_oom_retries", str(TASK_RETRIES))
    kwargs: dict[str, Any] = {"include_dashboard": cfg.cluster.include_dashboard, "log_to_driver": True}
    given = os.environ.get("RAY_ADDRESS", "")
    if cfg.cluster.address in (None, "", "auto") and given.lower().startswith(("http://", "https://")):
        # the job server's address, as `ray job submit` takes it (deploy.md's tip exports it): Ray
        # failed with "Invalid Ray address" and a traceback (`address: auto` reads it too)
        raise ClusterConfigError(
            f"RAY_ADDRESS={given} is a job server's address, for `ray job submit`; a render started here cannot "
            "join it: unset RAY_ADDRESS for a run on this machine, submit it as a job, or give "
            "cluster.address=<head>:6379"
        )
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, **kwargs)
    elif given:  # ray.init joins that cluster, which sizes itself
        ray.init(**kwargs)
    else:
        # "local": a Ray of its own even when another runs on this machine (`ray start`, the studio's
        # head), which ray.init would otherwise join
        ray.init(
            address="local",
            num_cpus=cfg.cluster.local_cpus(),
            num_gpus=cfg.cluster.num_gpus,
            _system_config=local_system_config(cfg),
            **kwargs,
        )


def local_system_config(cfg: Config) -> dict[str, Any]:
    """Ray settings for a local Ray started for one run. Its start and the actors' start keep every
    core busy, and two of Ray's defaults spend CPU there for nothing: a worker process started when
    the driver connects, which the actors and tasks do not use (they start their own), and metrics
    collection, which nothing shows without the dashboard. Together ~1 s of a one-row run on 2 cores
    (benchmarks/RESULTS.md, "Speed by default").

    And one waits for nothing: the raylet connects to its object store, which a thread of its own
    is still opening as often as not on a busy machine, and retries a refused connection after a
    whole second (Ray start 3.3 s instead of 2.3). Retries every 0.1 s, as many times more, keep
    the same ten seconds of patience."""
    return {
        "prestart_worker_first_driver": False,
        "enable_metrics_collection": cfg.cluster.include_dashboard,
        "raylet_client_connect_timeout_milliseconds": LOCAL_CONNECT_RETRY_MS,
        "raylet_client_num_connect_attempts": max(1, 10 * 1000 // LOCAL_CONNECT_RETRY_MS),
        "task_oom_retries": _task_oom_retries(),  # `_init`
    }


def _task_oom_retries() -> int:
    """The retries of a task Ray's memory monitor killed: the environment's (`_init` sets it where
    the user did not), TASK_RETRIES where that is no number."""
    try:
        return int(os.environ.get("RAY_task_oom_retries", TASK_RETRIES))
    except ValueError:
        return TASK_RETRIES


#: how long a local Ray's raylet (and its workers) wait before trying a refused socket again
LOCAL_CONNECT_RETRY_MS = 100


def shutdown(local: bool) -> None:
    """ray.shutdown(); for a Ray this process started on this machine (`local`), its autoscaler
    monitor is stopped first (`stop_local_monitor`)."""
    if local:
        stop_local_monitor()
    ray.shutdown()


def stop_local_monitor() -> None:
    """Kill the autoscaler monitor of the Ray this process started. ray.shutdown() stops Ray's
    processes one by one, giving each a second to exit on SIGTERM, and the monitor always takes
    that whole second (1.0 of the 1.35 s a shutdown took); a local Ray has nothing for it to scale."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        if node is not None and node.is_head():
            node.kill_monitor(check_alive=False)
    except Exception as exc:  # noqa: BLE001 - Ray internals: the plain shutdown still runs
        log.debug("could not stop the local Ray's monitor early: %r", exc)


def local_resources(cfg: Config) -> dict[str, float] | None:
    """The CPUs and GPUs a local Ray started for this run will have, as far as its actors' fit
    goes; None when that turns on GPUs Ray must count itself (`cluster.num_gpus` unset, and the
    actors want GPU shares)."""
    gpus = cfg.cluster.num_gpus
    if gpus is None and cfg.cluster.actor.num_gpus > 0:
        return None
    return {"CPU": float(cfg.cluster.local_cpus()), "GPU": float(gpus or 0)}


def actor_count(cfg: Config, nodes: list[dict[str, float]] | None = None) -> int:
    """`cluster.actors`, or when 0, as many actors as the nodes can host (`fit_actors`): `nodes`'
    resources, by default those of the live nodes."""
    if cfg.cluster.actors > 0:
        return cfg.cluster.actors
    if nodes is None:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    actor = cfg.cluster.actor
    return fit_actors(nodes, actor.num_cpus, actor.num_gpus, cfg.cluster.reserve_cpus, _detection(cfg))


def _detection(cfg: Config) -> tuple[float, float] | None:
    """(CPUs, GPU share) of a GPU detection task, which GPU actors must leave room for (holding
    every share, they would starve it for ever); None where detection takes no GPU beside them."""
    share = cfg.detector.gpu_share
    return (cfg.cluster.task_cpus, share) if cfg.cluster.actor.num_gpus > 0 and share else None


def fit_actors(
    nodes: list[dict[str, float]],
    num_cpus: float,
    num_gpus: float,
    reserve_cpus: float,
    detect: tuple[float, float] | None = None,
) -> int:
    """Actors of `num_cpus` CPUs and `num_gpus` GPUs that fit on nodes with these resources, leaving
    `reserve_cpus` of each node's CPUs for prepare/stitch tasks (so the room for them grows with
    the cluster), and with `detect` (CPUs, GPU share) room for one GPU detection task on the GPU
    node with the most GPUs. Counted per node, since an actor cannot span nodes: CPU-only nodes
    host no GPU actors, and a GPU node hosts as many as both its GPU shares and its CPUs allow (on
    a 16-core, 1-GPU node: 7 actors of 2 CPUs and 1/8 GPU, not 8; an 8-CPU pod: 3). At least 1, so
    a cluster that cannot host any yet gets the driver's "no actor could start" warning."""
    return max(1, sum(actors_per_node(nodes, num_cpus, num_gpus, reserve_cpus, detect)))


def actors_per_node(
    nodes: list[dict[str, float]],
    num_cpus: float,
    num_gpus: float,
    reserve_cpus: float,
    detect: tuple[float, float] | None = None,
) -> list[int]:
    """`fit_actors`' count on each node."""
    per_node = []
    for res in nodes:
        fits = math.floor(max(0.0, res.get("CPU", 0.0) - reserve_cpus) / max(num_cpus, 1e-3) + 1e-9)
        if num_gpus > 0:
            fits = min(fits, gpu_slots(res.get("GPU", 0.0), num_gpus))
        per_node.append(fits)
    if detect is not None and nodes and num_gpus > 0:
        task_cpus, share = detect
        node = max(range(len(nodes)), key=lambda i: nodes[i].get("GPU", 0.0))
        res = nodes[node]
        while per_node[node] > 0 and (
            not gpu_room(res.get("GPU", 0.0), per_node[node], num_gpus, share)
            or res.get("CPU", 0.0) - per_node[node] * num_cpus < task_cpus - 1e-9
        ):
            per_node[node] -= 1
    return per_node


#: the label Ray gives every node, naming it: a bundle of a node's task room is pinned to it
NODE_LABEL = "ray.io/node-id"


def reserved_bundles(
    cfg: Config, nodes: list[dict[str, float]], actors: int, ids: list[str] | None = None
) -> list[tuple[dict[str, float], dict[str, str]]] | None:
    """The room a campaign reserves before its `actors` (`RayExecutor`), as (bundle, the labels of
    the node it must be on) pairs: on each node, the CPUs its renderers there leave
    (`actors_per_node`: at least `cluster.reserve_cpus`; less what renderers over those take on the
    nodes that can host one), for its prepare/stitch tasks, as they had when nothing else ran, each
    on its node (`ids`: the nodes' ids), less a GPU detection task's CPUs, left free beside its GPU
    share; and its first renderer's, last, wherever it fits. None with `cluster.actors` set (sized
    for nodes to come: an autoscaling cluster's), or where the cluster (`nodes`, their whole
    resources) could not hold the room: tasks and renderers then go where they fit, as before."""
    cluster, actor = cfg.cluster, cfg.cluster.actor
    if cluster.actors:  # sized for nodes still to come (an autoscaling cluster's): tasks go where they fit
        return None
    ids = ids or [""] * len(nodes)
    fitted = actors_per_node(nodes, actor.num_cpus, actor.num_gpus, cluster.reserve_cpus, _detection(cfg))
    left = [node.get("CPU", 0.0) - fits * actor.num_cpus for node, fits in zip(nodes, fitted, strict=True)]
    renderer = renderer_bundle(cfg)
    hosts = [i for i, node in enumerate(nodes) if all(node.get(k, 0.0) >= v - 1e-9 for k, v in renderer.items())]
    # renderers over what fits (one, where none fits) take theirs from the tasks' where they can run
    extra = (actors - sum(fitted)) * actor.num_cpus
    for i in sorted(hosts, key=lambda i: -left[i]):
        taken = min(max(extra, 0.0), left[i])
        left[i], extra = left[i] - taken, extra - taken
    share = cfg.detector.gpu_share  # as `SharedWork` asks for it: its CPUs free beside the share
    if share and nodes and gpu_room(sum(n.get("GPU", 0.0) for n in nodes), actors, actor.num_gpus, share):
        left[max(range(len(nodes)), key=lambda i: nodes[i].get("GPU", 0.0))] -= cluster.task_cpus
    room = [({"CPU": cpus}, _on(ids[i])) for i, cpus in enumerate(left) if cpus >= cluster.task_cpus - 1e-9]
    if not room:
        room.append(({"CPU": cluster.task_cpus}, {}))
    if renderer:  # on a node with room for it beside the tasks' pinned there
        pinned = {i: sum(b.get("CPU", 0.0) for b, on in room if on == _on(ids[i])) for i in range(len(nodes))}
        if not any(nodes[i].get("CPU", 0.0) - pinned[i] >= renderer.get("CPU", 0.0) - 1e-9 for i in hosts):
            return None
        room.append((renderer, {}))
    fits = all(any(all(node.get(k, 0.0) >= v - 1e-9 for k, v in b.items()) for node in nodes) for b, _ in room)
    total = sum(b.get("CPU", 0.0) for b, _ in room) <= sum(node.get("CPU", 0.0) for node in nodes) + 1e-9
    return room if fits and total else None


def _on(node_id: str) -> dict[str, str]:
    return {NODE_LABEL: node_id} if node_id else {}


def renderer_bundle(cfg: Config) -> dict[str, float]:
    """What a renderer actor holds (empty: nothing Ray counts)."""
    actor = cfg.cluster.actor
    return {name: amount for name, amount in (("CPU", actor.num_cpus), ("GPU", actor.num_gpus)) if amount > 0}


def _shown(bundles: list[dict[str, float]]) -> str:
    """ "2 CPUs, 0.125 GPU" for a placement group of `bundles`."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return ", ".join(
        f"{amount:g} {name}{'s' if name == 'CPU' and amount != 1 else ''}" for name, amount in total.items()
    )


def check_local_fit(cfg: Config, resources: dict[str, float]) -> None:
    """On a local Ray of these `resources` (a single node), refuse actors that could never all
    start, or that would leave no CPU for a prepare/stitch task: either would hang the campaign
    instead of failing it."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    actor, count = cfg.cluster.actor, actor_count(cfg, [resources])
    need_cpus = count * actor.num_cpus + cfg.cluster.task_cpus
    if need_cpus > cpus + 1e-9:
        raise ClusterConfigError(
            f"{count} renderer actor(s) of {actor.num_cpus:g} CPU(s) plus a prepare/stitch task of "
            f"{cfg.cluster.task_cpus:g} need {need_cpus:g} CPUs, but this local Ray has {cpus:g}: lower "
            "cluster.actors or cluster.actor.num_cpus, or raise cluster.num_cpus (cluster.actors=0 leaves "
            "cluster.reserve_cpus free: keep it at least cluster.task_cpus)"
        )
    if actor.num_gpus > 0 and count > gpu_slots(gpus, actor.num_gpus):
        raise ClusterConfigError(
            f"{count} renderer actor(s) of {actor.num_gpus:g} GPU do not fit this local Ray's {gpus:g} GPU(s), "
            f"which host {gpu_slots(gpus, actor.num_gpus)} (Ray places a fraction of a GPU on one GPU): lower "
            "cluster.actors, or take cluster.actor.num_gpus that divides a GPU (1/2, 1/4, 1/8)"
        )
