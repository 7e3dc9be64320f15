"""Pin a renderer actor to cores of its own (`cluster.actor.pin_cpus`).

Ray counts CPUs but does not assign them: an actor with `num_cpus=2` may run its decode, render and
x264 threads on any core of the node, next to every other actor's. Capping thread counts (segment.py)
keeps the total in line, but the threads still wander over all cores and an actor that overlaps
decode, render and encode uses more than its share. Pinned, each actor owns whole cores: it cannot
slow its neighbours down, its caches stay warm, and throughput grows with actors as long as cores
remain.

Cores are claimed through one lock file per core in a node-local folder: the first actors to start
get the first free cores among those the process may use. The kernel drops a lock when its holder
exits, however it dies, so a restarted actor finds its predecessor's cores free. When fewer free
cores remain than an actor needs (more actors than cores), it runs unpinned and says so.

Off by default: it is right where the process's CPU mask is the machine's or the container's own
(bare metal, VMs, containers with a cpuset such as Kubernetes' static CPU manager). A container
limited by a CPU quota alone sees every host core, and several such containers on one host would
pin their actors to the same first cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from typing import IO

log = logging.getLogger("heygem_ray.pinning")

#: where the per-core lock files live (shared by every process of the node)
LOCK_DIR = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), "heygem-ray-cores")

_held: list[IO[bytes]] = []  # lock files of this process's cores, open for the process's life


def pin_to_free_cores(count: int, lock_dir: str = LOCK_DIR) -> list[int] | None:
    """Claim `count` cores no other process of this node has claimed and restrict the calling thread
    (and every thread it starts from now on) to them. Returns the cores, or None when the platform
    cannot pin or not enough cores are free (the caller then runs unpinned)."""
    if not hasattr(os, "sched_setaffinity") or count < 1:
        return None
    claimed: list[tuple[int, IO[bytes]]] = []
    try:
        _make_shared_dir(lock_dir)
        for core in sorted(os.sched_getaffinity(0)):
            if len(claimed) == count:
                break
            handle = open(os.path.join(lock_dir, f"core-{core}.lock"), "ab")  # noqa: SIM115 - held for life
            with contextlib.suppress(OSError):  # other users' actors lock the same files
                os.fchmod(handle.fileno(), 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            claimed.append((core, handle))
    except OSError as exc:  # e.g. another user's lock folder: pinning is an optimisation, never a failure
        for _, held in claimed:
            held.close()
        log.warning("cannot claim cores in %s (%s): running unpinned", lock_dir, exc)
        return None
    if len(claimed) < count:
        for _, held in claimed:
            held.close()  # closing releases the lock
        log.warning("only %d of the %d cores this actor needs are unclaimed: running unpinned", len(claimed), count)
        return None
    cores = [core for core, _ in claimed]
    os.sched_setaffinity(0, cores)
    _held.extend(handle for _, handle in claimed)
    return cores


def _make_shared_dir(path: str) -> None:
    """The lock folder, writable by every user of the node (sticky, like /tmp)."""
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        with contextlib.suppress(OSError):  # someone else's folder: its mode is theirs to set
            os.chmod(path, 0o1777)
