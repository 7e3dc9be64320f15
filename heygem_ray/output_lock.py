"""One run at a time per output root. Two drivers on one output (a job submitted twice, a rerun
while the first still runs) would remove each other's results parts, stitch away segments the
other reused and overwrite each other's table and report. A run holds `{output}/_lock.json` while
it renders, refreshing it every HEARTBEAT_SECONDS; another run refuses to start while the holder
is alive, and takes over a lock its holder left (a killed driver): one not refreshed for
STALE_SECONDS, or one of a process that is gone from this host's process namespace.

Taking and refreshing the lock change it only if it is still what was read, so two runs starting
at the same moment cannot both get in: on S3 the store checks (a conditional PUT: If-None-Match
to take a free lock, If-Match with the ETag read to take over or refresh one); on a local or
mounted disk the read and the write happen under an flock of the output folder. Other fsspec
stores get the plain read-then-write, best effort. A holder that finds its lock taken over (its
store unreachable for a minute) stops refreshing it and sets `lost`: the campaign stops."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

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


class OutputLostError(HeygemError):
    """Another run took the output root over while this one rendered."""


@dataclass
class HeldLock:
    """The lock a run holds: `lost` is set when another run took it over."""

    output: str
    lost: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise OutputLostError once the lock is lost: the run stops writing where another run writes."""
        if self.lost.is_set():
            raise OutputLostError(
                f"another run took output {storage.display(self.output)} over while this one rendered (this run's "
                f"store did not answer for {STALE_SECONDS:.0f} s): this run stopped, the other writes there now"
            )


@contextlib.contextmanager
def output_lock(layout: CampaignLayout) -> Iterator[HeldLock]:
    """Hold the output root's lock for the block, or raise OutputBusyError."""
    uri = layout.lock
    token = secrets.token_hex(8)
    mine = {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(), "token": token}
    _HELD.add(token)  # before it is written: from then on, this process's lock is alive
    try:
        with writing(layout.output), _serialized(layout.output):  # an output root that cannot be written: exit 2
            holder, version = _read(uri)
            if holder is not None and _alive(holder):
                raise _busy(layout, holder)
            if not _put(uri, mine, version):
                raise _busy(layout, _read(uri)[0] or {})
    except BaseException:
        _HELD.discard(token)
        raise
    held, stop = HeldLock(layout.output), threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(layout, mine, stop, held), name="heygem-output-lock", daemon=True)
    beat.start()
    try:
        # what an earlier run killed mid-publish left: no other run writes here now (after the
        # heartbeat started: the walk of a large output root on a slow disk takes a while)
        removed = storage.remove_parts(layout.output, skip=layout.cache)  # a cache other runs may share
        if removed:
            log.info("removed %d half-published file(s) an earlier, killed run left", removed)
        yield held
    finally:
        stop.set()
        _HELD.discard(token)
        beat.join(timeout=5.0)  # a beat stuck on the store must not hold the exit
        with contextlib.suppress(OSError, ValueError), _serialized(layout.output):
            if (_read(uri)[0] or {}).get("token") == token:
                storage.remove(uri)


def _busy(layout: CampaignLayout, holder: dict) -> OutputBusyError:
    seen = time.time() - float(holder.get("heartbeat", time.time()))
    return OutputBusyError(
        f"output {storage.display(layout.output)} is being written by another run (host "
        f"{holder.get('host')}, pid {holder.get('pid')}, seen {seen:.0f} s ago): wait for it to finish or stop "
        f"it; a run that ended without letting go is taken over {STALE_SECONDS:.0f} s after it was last seen"
    )


def _heartbeat(layout: CampaignLayout, mine: dict, stop: threading.Event, held: HeldLock) -> None:
    uri = layout.lock
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            with _serialized(layout.output):
                holder, version = _read(uri)
                # a lock someone removed is made again; one another run holds is theirs
                if (holder or mine).get("token") == mine["token"] and _put(uri, mine, version):
                    continue
                holder = _read(uri)[0] or {}
        except OSError:  # a store hiccup: the next beat, well within STALE_SECONDS
            continue
        log.error(
            "another run (host %s, pid %s) took over output %s's lock after this run's store did not answer: "
            "this run stops",
            holder.get("host"),
            holder.get("pid"),
            storage.display(layout.output),
        )
        held.lost.set()
        return


@contextlib.contextmanager
def _serialized(output: str) -> Iterator[None]:
    """On a local or mounted disk, an flock of the output folder around a read and write of the lock:
    no other run's read and write of it come between. Elsewhere (and where the disk has no flock)
    nothing: the store's conditional writes, or best effort."""
    if not storage.is_local(output):
        yield
        return
    folder = storage.local_path(output)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # e.g. NFS, where a folder cannot be locked: best effort
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # lets the flock go


def _put(uri: str, mine: dict, version: str | None) -> bool:
    """Write the lock, on S3 only if it is still what was read: absent (`version` None) or of that ETag.
    False when another run wrote it first."""
    data = json.dumps({**mine, "heartbeat": time.time()}).encode()
    if storage.protocol(uri) not in ("s3", "s3a"):
        storage.write_bytes(uri, data)
        return True
    fs, path = storage.url_to_fs(uri)
    try:
        if version is None:
            fs.pipe_file(path, data, mode="create")
        else:
            fs.pipe_file(path, data, IfMatch=version)
    except FileExistsError:  # If-None-Match: another run created it first
        pass
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # s3fs's PreconditionFailed (If-Match) is EINVAL
            raise
    else:
        return True
    # a try that reached the store though its answer was lost looks the same: the token says
    return (_read(uri)[0] or {}).get("token") == mine["token"]


def _read(uri: str) -> tuple[dict | None, str | None]:
    """The lock's holder (None: none, or unreadable) and, on S3, the ETag it had before it was read
    (a write in between makes a conditional write on that ETag fail, as it should)."""
    version = None
    try:
        if storage.protocol(uri) in ("s3", "s3a"):
            fs, path = storage.url_to_fs(uri)
            version = fs.info(path).get("ETag")
        data = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None, version
    return (data if isinstance(data, dict) else None), version


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
