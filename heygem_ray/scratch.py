"""A process's scratch files and folders on its node (a segment being encoded, a row being stitched,
a narration being decoded), named after the process, so those a killed process left behind are
found and removed.

A stitch holds the whole output (~0.5 GB for 3 minutes of 1080p) in its scratch folder, and a
process that Ray's memory monitor kills, or that dies with a segfault, never runs its clean-up: on a
cluster that lives for months those folders filled the workers' disks. `sweep` removes the ones
whose process is gone, once they have not changed for a while, and runs where a renderer starts
and where the driver starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger("heygem_ray")

#: scratch names: "heygem-{kind}-{pid}-{random}"
_NAME = re.compile(r"heygem-[a-z]+-(\d+)-[^/]+")
#: how long a scratch entry must have gone unchanged before a sweep takes it for left behind (its
#: process's id may be another live process's by then, in another container sharing the folder)
IDLE_SECONDS = 3600.0


def _prefix(kind: str) -> str:
    return f"heygem-{kind}-{os.getpid()}-"


@contextlib.contextmanager
def folder(kind: str) -> Iterator[str]:
    """A scratch folder of this process, removed with what it holds when the block ends."""
    with tempfile.TemporaryDirectory(prefix=_prefix(kind)) as path:
        yield path


def file(kind: str, suffix: str = "") -> str:
    """The path of a new, empty scratch file of this process; the caller removes it."""
    handle, path = tempfile.mkstemp(prefix=_prefix(kind), suffix=suffix)
    os.close(handle)
    return path


def sweep(root: str | None = None, idle: float = IDLE_SECONDS) -> int:
    """Remove the scratch entries under `root` (the temp folder) of processes that are gone and
    that have not changed for `idle` seconds; returns how many. What cannot be removed is left."""
    root = root or tempfile.gettempdir()
    removed, before = 0, time.time() - idle
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(root, name)
        try:
            if _changed(path) > before:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
        except OSError as exc:
            log.debug("scratch %s not removed: %s", path, exc)
    if removed:
        log.info("removed %d scratch file(s) or folder(s) that killed processes left in %s", removed, root)
    return removed


def _changed(path: str) -> float:
    """When `path` last changed: a folder's own time, or its newest entry's (a file being written
    in a folder does not change the folder's)."""
    changed = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    changed = max(changed, entry.stat(follow_symlinks=False).st_mtime)
    return changed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this process namespace runs; True where that cannot be told
    (another user's, a number no process can have: what it names is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True
