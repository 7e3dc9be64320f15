"""One run at a time per output root. Two drivers on one output (a job submitted twice, a rerun
while the first still runs) would remove each other's results parts, stitch away segments the
other reused and overwrite each other's table and report. A run holds `{output}/_lock.json` while
it renders, refreshing it every HEARTBEAT_SECONDS; another run refuses to start while the holder
is alive, and takes over a lock its holder left (a killed driver): one not refreshed for
STALE_SECONDS, or one of a process that is gone from this host's process namespace. A holder that
finds its lock taken over (its store unreachable for a minute) stops refreshing it and says so.
Best effort on object stores: two runs started within the same instant can both get in."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator

from heygem_ray import storage
from heygem_ray.errors import HeygemError, writing
from heygem_ray.layout import CampaignLayout

HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 60.0

log = logging.getLogger("heygem_ray")

#: tokens of the locks this process holds
_HELD: set[str] = set()


class OutputBusyError(HeygemError):
    """Another run holds the output root."""


@contextlib.contextmanager
def output_lock(layout: CampaignLayout) -> Iterator[None]:
    """Hold the output root's lock for the block, or raise OutputBusyError."""
    uri = layout.lock
    with writing(layout.output):  # an output root that cannot be written: exit 2, saying so
        holder = _read(uri)
    if holder is not None and _alive(holder):
        seen = time.time() - float(holder.get("heartbeat", 0))
        raise OutputBusyError(
            f"output {storage.display(layout.output)} is being written by another run (host "
            f"{holder.get('host')}, pid {holder.get('pid')}, seen {seen:.0f} s ago): wait for it to finish or stop "
            f"it; a run that ended without letting go is taken over {STALE_SECONDS:.0f} s after it was last seen"
        )
    token = secrets.token_hex(8)
    mine = {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(), "token": token}
    with writing(layout.output):
        _write(uri, mine)
    _HELD.add(token)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(uri, mine, stop), name="heygem-output-lock", daemon=True)
    beat.start()
    try:
        # what an earlier run killed mid-publish left: no other run writes here now (after the
        # heartbeat started: the walk of a large output root on a slow disk takes a while)
        removed = storage.remove_parts(layout.output, skip=layout.cache)  # a cache other runs may share
        if removed:
            log.info("removed %d half-published file(s) an earlier, killed run left", removed)
        yield
    finally:
        stop.set()
        _HELD.discard(token)
        beat.join(timeout=5.0)  # a beat stuck on the store must not hold the exit
        with contextlib.suppress(OSError, ValueError):
            if (_read(uri) or {}).get("token") == token:
                storage.remove(uri)


def _heartbeat(uri: str, mine: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            holder = _read(uri)
            if holder is not None and holder.get("token") != mine["token"]:
                log.error(
                    "another run (host %s, pid %s) took over output %s's lock after this run's store did not "
                    "answer: both now write there",
                    holder.get("host"),
                    holder.get("pid"),
                    storage.display(uri),
                )
                return
            _write(uri, mine)
        except OSError:  # a store hiccup: the next beat, well within STALE_SECONDS
            continue


def _write(uri: str, mine: dict) -> None:
    storage.write_bytes(uri, json.dumps({**mine, "heartbeat": time.time()}).encode())


def _read(uri: str) -> dict | None:
    try:
        data = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(holder: dict) -> bool:
    if time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS:
        return False
    # only in the holder's own process namespace does its pid say whether it runs (containers on
    # one host may share its name, and a restarted container's new driver may get the old pid)
    if holder.get("host") == socket.gethostname() and holder.get("pidns") == _pid_namespace():
        pid = int(holder.get("pid", 0))
        if pid == os.getpid():  # this process's own, or an earlier life's with the same pid
            return holder.get("token") in _HELD
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
    return True


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
