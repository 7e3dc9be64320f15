"""One run at a time per output root. Two drivers on one output (a job submitted twice, a rerun
while the first still runs) would remove each other's results parts, stitch away segments the
other reused and overwrite each other's table and report. A run holds `{output}/_lock.json` while
it renders, refreshing it every HEARTBEAT_SECONDS; another run refuses to start while the holder
is alive, and takes over a lock its holder left (a killed driver): one not refreshed for
STALE_SECONDS, or one of a process that is gone from this host's process namespace. The clocks of
two hosts may differ by minutes, so a lock another host wrote is judged stale only after watching
it go unrefreshed for WATCH_HEARTBEATS heartbeats; a lock that looks fresh is trusted at once.

Taking and refreshing the lock change it only if it is still what was read, so two runs starting
at the same moment cannot both get in: on S3 the store checks (a conditional PUT: If-None-Match
to take a free lock, If-Match with the ETag read to take over or refresh one); on a local or
mounted disk the read and the write happen under an flock of the output folder. Other fsspec
stores get the plain read-then-write, best effort. A holder that finds its lock taken over (its
store unreachable for a minute) stops refreshing it and sets `lost`: the campaign stops."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from heygem_ray import storage
from heygem_ray.errors import HeygemError, InputError, writing
from heygem_ray.layout import CampaignLayout
from heygem_ray.scratch import pid_alive

HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 60.0
#: age past which a half-published file in the campaign cache, which runs on other outputs may
#: publish into meanwhile, was left by a killed process (a publish takes seconds)
CACHE_PART_SECONDS = 6 * 3600.0
#: longest wait for another process's read and write of a local lock (they take milliseconds)
FLOCK_WAIT_SECONDS = 30.0
#: heartbeats a run watches another host's lock that this host's clock calls stale before taking
#: it over: a live holder on a clock behind this one's refreshes it meanwhile, and one that could
#: not for that long has stopped itself (`HeldLock.check`)
WATCH_HEARTBEATS = STALE_SECONDS / HEARTBEAT_SECONDS

log = logging.getLogger("heygem_ray")

#: tokens of the locks this process holds
_HELD: set[str] = set()


class OutputBusyError(HeygemError):
    """Another run holds the output root."""


class OutputLostError(HeygemError):
    """Another run took the output root over while this one rendered."""


@dataclass
class HeldLock:
    """The lock a run holds: `lost` is set when another run took it over; `refreshed_at` is when
    its heartbeat last wrote it (time.monotonic)."""

    output: str
    lost: threading.Event = field(default_factory=threading.Event)
    refreshed_at: float = field(default_factory=time.monotonic)

    def check(self) -> None:
        """Raise OutputLostError once the lock is lost, or not refreshed for so long that another
        run may take it over from now on (the store refusing this run's writes, a heartbeat stuck
        on it, the process paused): the run stops writing where another run may write."""
        if self.lost.is_set():
            raise OutputLostError(
                f"another run took output {storage.display(self.output)} over while this one rendered (this run's "
                f"store did not answer for {STALE_SECONDS:.0f} s): this run stopped, the other writes there now"
            )
        silent = time.monotonic() - self.refreshed_at
        if silent > STALE_SECONDS - HEARTBEAT_SECONDS:
            raise OutputLostError(
                f"this run could not refresh its lock on output {storage.display(self.output)} for {silent:.0f} s "
                f"(another run may take it over after {STALE_SECONDS:.0f} s): this run stopped; run it again "
                "once the store answers"
            )


@contextlib.contextmanager
def output_lock(layout: CampaignLayout) -> Iterator[HeldLock]:
    """Hold the output root's lock for the block, or raise OutputBusyError."""
    uri = layout.lock
    token = secrets.token_hex(8)
    mine = {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "pid": os.getpid(),
        "token": token,
    }
    with writing(layout.output):  # its refusals said as the writes' would be
        if layout.root_is_a_file():  # said as "a parent of it is a file", of the root itself
            raise InputError(
                "output", layout.output, "is a file: the output root is the folder the videos and results go in"
            )
    made = _folders_to_make(layout.output)
    _HELD.add(token)  # before it is written: from then on, this process's lock is alive
    try:
        with writing(layout.output):  # an output root that cannot be written: exit 2
            _take(layout, mine)
    except TimeoutError as exc:
        _HELD.discard(token)
        raise OutputBusyError(f"output {storage.display(layout.output)} is busy: {exc}") from None
    except BaseException:
        _HELD.discard(token)
        raise
    held, stop = HeldLock(layout.output), threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(layout, mine, stop, held), name="heygem-output-lock", daemon=True)
    beat.start()
    try:
        # what an earlier run killed mid-publish left: no other run writes here now (after the
        # heartbeat started: the walk of a large output root on a slow disk takes a while)
        # a cache other runs may share, and the output roots of other campaigns below this one
        removed = storage.remove_parts(layout.output, skip=layout.cache, lock_name=storage.basename(layout.lock))
        removed += storage.remove_parts(layout.cache, older_than=CACHE_PART_SECONDS)
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
            for folder in made:  # a run refused before it wrote anything leaves the disk as it was
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _folders_to_make(root: str) -> list[str]:
    """The folders of a local output root that do not exist yet, deepest first: the lock's write
    makes them, and they go again if nothing else was put in them (a manifest refused)."""
    if not storage.is_local(root):
        return []
    missing, path = [], os.path.abspath(storage.local_path(root))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _take(layout: CampaignLayout, mine: dict) -> None:
    """Write this run's lock over none, or over one whose run is gone; raise OutputBusyError else."""
    uri, watched = layout.lock, None
    while True:
        with _serialized(layout.output):
            holder, version = _read(uri)
            verdict = _verdict(holder, watched)
            if verdict == "busy":
                raise _busy(layout, holder or {})
            if verdict == "take":
                if not _put(uri, mine, version):
                    raise _busy(layout, _read(uri)[0] or {})
                return
        watched = holder or {}  # watched outside the flock: other runs' beats go on meanwhile
        seconds = HEARTBEAT_SECONDS * WATCH_HEARTBEATS
        log.info(
            "output %s's lock (host %s, pid %s) looks stale by this host's clock: watching it for %.0f s before "
            "taking it over, as hosts' clocks may differ",
            storage.display(layout.output),
            watched.get("host"),
            watched.get("pid"),
            seconds,
        )
        time.sleep(seconds)


def _verdict(holder: dict | None, watched: dict | None) -> str:
    """take (no lock, or one unchanged while watched: its run is gone), busy, or watch (only watching
    it can tell)."""
    if holder is None or holder == watched:
        return "take"
    if watched is not None and holder.get("token") == watched.get("token"):
        return "busy"  # refreshed while watched: alive, on a clock that differs from this host's
    alive = _alive(holder)
    return "watch" if alive is None else "busy" if alive else "take"


def _busy(layout: CampaignLayout, holder: dict) -> OutputBusyError:
    seen = time.time() - float(holder.get("heartbeat", time.time()))
    # a live holder whose heartbeat this clock puts far off: the two hosts' clocks differ
    when = f"seen {seen:.0f} s ago" if abs(seen) <= STALE_SECONDS else "refreshing it on a clock unlike this host's"
    return OutputBusyError(
        f"output {storage.display(layout.output)} is being written by another run (host "
        f"{holder.get('host')}, pid {holder.get('pid')}, {when}): wait for it to finish or stop "
        f"it; a run that ended without letting go is taken over {STALE_SECONDS:.0f} s after it was last seen"
    )


def _heartbeat(layout: CampaignLayout, mine: dict, stop: threading.Event, held: HeldLock) -> None:
    uri = layout.lock
    beaten = time.monotonic()  # when this run's lock was last written
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            with _serialized(layout.output):
                holder, version = _read(uri)
                # one another run holds is theirs; a lock someone removed is made again, unless this
                # run was silent long enough for another to take it over, finish and let it go
                silent = time.monotonic() - beaten
                gone_after_silence = holder is None and silent > STALE_SECONDS / 2
                ours = not gone_after_silence and (holder or mine).get("token") == mine["token"]
                if stop.is_set():  # the run ended meanwhile: its lock is being let go, not made again
                    return
                # fresh from when the write is stamped, not when it returns: a write that takes a
                # while on a struggling store counts from the heartbeat others read in it
                stamp = time.monotonic()
                if ours and _put(uri, mine, version, recreate=lambda: not stop.is_set()):
                    beaten = held.refreshed_at = stamp
                    continue
                if stop.is_set():  # refused as the run let its lock go: no takeover
                    return
                holder = _read(uri)[0] or {}
        except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat, well within STALE_SECONDS
            log.warning("output lock not refreshed: %s: %s", type(exc).__name__, exc)
            continue
        if gone_after_silence:
            log.error(
                "output %s's lock was gone after this run wrote none for %.0f s: another run may have taken the "
                "output over and finished meanwhile: this run stops",
                storage.display(layout.output),
                silent,
            )
        else:
            log.error(
                "another run (host %s, pid %s) took over output %s's lock after this run's store did not "
                "answer: this run stops",
                holder.get("host"),
                holder.get("pid"),
                storage.display(layout.output),
            )
        held.lost.set()
        return


@contextlib.contextmanager
def _serialized(output: str) -> Iterator[None]:
    """On a local disk, an flock of the output folder around a read and write of the lock: no other
    run's read and write of it come between. Elsewhere nothing: the store's conditional writes, or
    best effort (NFS, where a folder opened for reading cannot be locked, too). A folder locked for
    longer than FLOCK_WAIT_SECONDS (a process stopped inside, a hung mount) raises TimeoutError."""
    if not storage.is_local(output):
        yield
        return
    folder = storage.local_path(output)
    deadline = time.monotonic() + FLOCK_WAIT_SECONDS
    vanished = 0
    while True:
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            # a parent removed meanwhile by a run that had made it and left it empty: made again, a
            # few times; a folder that cannot be made at all (under /proc, a dead link) raises at once
            vanished += 1
            if vanished > VANISHED_TRIES:
                raise
            time.sleep(0.01)
            continue
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{folder} stayed locked by another process for {FLOCK_WAIT_SECONDS:.0f} s"
                        ) from None
                    time.sleep(0.01)
                except OSError:  # a file system without flock on folders: best effort
                    break
            if _same_folder(folder, fd):
                yield
                return
        finally:
            os.close(fd)  # lets the flock go
        # removed while this waited (the run before left a root it had made and not used): again
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder} was removed and made again for {FLOCK_WAIT_SECONDS:.0f} s")


#: tries of an output root whose parent vanished as it was made (`_serialized`)
VANISHED_TRIES = 3


def _same_folder(path: str, fd: int) -> bool:
    """Whether the folder at `path` is still the one open as `fd`."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


class _Refused(Exception):
    """The store refused a conditional write: the lock is not what was read."""


def _put(uri: str, mine: dict, version: str | None, recreate: Callable[[], bool] = lambda: True) -> bool:
    """Write the lock, on S3 only if it is still what was read: absent (`version` None) or of that ETag.
    False when another run wrote it first; True once this write, or an earlier one of ours, is on
    the store. `recreate`: whether a lock removed meanwhile is made anew (not by a run that is
    letting its lock go)."""
    lock = {**mine, "heartbeat": time.time()}
    data = json.dumps(lock).encode()
    if not recreate():  # a run letting its lock go writes none (a plain write would make it again)
        return False
    if storage.protocol(uri) not in ("s3", "s3a"):
        storage.write_bytes(uri, data)
        return True
    for _ in range(2):
        try:
            _conditional_put(uri, data, version)
            return True
        except _Refused:
            holder, version = _read(uri)
            if holder is None:  # removed meanwhile (its run ended): created anew, if none is first
                if not recreate():
                    return False
                continue
            if holder.get("token") != mine["token"]:
                return False
            # ours: an earlier try of this very write landed though its answer was lost, or the ETag
            # read was already old: written again over our own
    holder = _read(uri)[0]  # twice refused: ours all the same where this write landed unanswered
    return holder is not None and holder.get("token") == mine["token"] and holder.get("heartbeat") == lock["heartbeat"]


@storage.retrying
def _conditional_put(uri: str, data: bytes, version: str | None) -> None:
    """One PUT of the lock with If-None-Match (`version` None) or If-Match; raises _Refused when the
    store refuses it for its condition. A store that knows no conditional PUT gets a plain one."""
    fs, path = storage.url_to_fs(uri)
    bucket = path.split("/", 1)[0]
    if bucket in _UNCONDITIONAL:
        fs.pipe_file(path, data)
        return
    try:
        if version is None:
            fs.pipe_file(path, data, mode="create")
        else:
            fs.pipe_file(path, data, IfMatch=version)
    except FileExistsError:  # If-None-Match: another run created it first
        raise _Refused from None
    except FileNotFoundError:
        if version is None:
            raise  # no bucket: the output cannot be written
        raise _Refused from None  # If-Match on a lock removed meanwhile (404): another run's move
    except Exception as exc:
        code = _s3_error_code(exc)
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            raise _Refused from None
        if (
            code in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest")
            or "ParamValidation" in type(exc).__name__
        ):
            log.warning(
                "the store of %s takes no conditional PUT (%s): two runs starting at the same instant on this "
                "output could both get in",
                storage.display(uri),
                code or type(exc).__name__,
            )
            _UNCONDITIONAL.add(bucket)
            fs.pipe_file(path, data)
            return
        raise


#: buckets whose store answered that it knows no conditional PUT: plain ones from then on
_UNCONDITIONAL: set[str] = set()


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs raised (it keeps botocore's error as the cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
        seen = seen.__cause__
    return None


def _read(uri: str) -> tuple[dict | None, str | None]:
    """The lock's holder (None: none, or unreadable) and, on S3, the ETag it had before it was read
    (a write in between makes a conditional write on that ETag fail, as it should)."""
    version = None
    try:
        if storage.protocol(uri) in ("s3", "s3a"):
            version = _etag(uri)
        data = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None, version
    return (data if isinstance(data, dict) else None), version


@storage.retrying
def _etag(uri: str) -> str | None:
    fs, path = storage.url_to_fs(uri)
    return fs.info(path, refresh=True).get("ETag")  # not s3fs's listing cache: the store's answer now


def _alive(holder: dict) -> bool | None:
    """Whether the lock's run is alive; None where only watching the lock can tell: another host's
    whose heartbeat this host's clock puts over STALE_SECONDS away (a dead run, or a live one on a
    clock that differs)."""
    age = time.time() - float(holder.get("heartbeat", 0))
    # a host name alone does not tell machines apart (cloned VMs, a container's fixed `hostname:`,
    # "localhost"), nor does the initial pid namespace: the boot id does
    # (a lock written before boot ids were kept has none: judged by its host name, as then)
    if holder.get("host") != socket.gethostname() or holder.get("boot", _boot_id()) != _boot_id():
        return True if abs(age) <= STALE_SECONDS else None
    # only in the holder's own process namespace does its pid say whether it runs (containers on
    # one host share its name, and a restarted container's new driver may get the old pid)
    pid = int(holder.get("pid", 0)) if holder.get("pidns") == _pid_namespace() else None
    if pid == os.getpid():  # this process's own, or an earlier life's with the same pid
        return holder.get("token") in _HELD
    if age > STALE_SECONDS:  # this host's clock, the holder's too
        # unless its process runs on (this clock stepped forward, a VM resumed; or its pid is
        # another's now): watched, a live run refreshes it
        return None if pid is not None and pid_alive(pid) else False
    return True if pid is None else pid_alive(pid)


def _boot_id() -> str:
    """This machine's boot id (Linux's, new at every boot; "" where there is none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
