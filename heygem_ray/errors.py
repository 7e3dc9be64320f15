"""Error kinds. The split decides retries: an InputError is the row's own fault (bad file, no face,
over a limit) and is reported, never retried; anything else is treated as infrastructure and retried
within a bound."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from heygem_ray import storage


class HeygemError(Exception):
    """Base class for errors heygem_ray raises on purpose."""


class InputError(HeygemError):
    """A row's input is missing, unreadable or unusable. Not retried. `lasting`: the file's own
    content is at fault (no face, not audio), so a rerun fails the same way; not so where it could
    not be reached (missing, permission denied: expired credentials too, replaced while read) or
    its output could not be written. `from_seconds`: an avatar's fault found past its start (a
    damaged frame) concerns only narrations longer than that, whose face track reaches it."""

    def __init__(self, what: str, uri: str | None, problem: str, lasting: bool = True, from_seconds: float = 0.0):
        self.what, self.uri, self.problem = what, uri, problem
        self.lasting = lasting and what != "output"
        self.from_seconds = from_seconds
        where = f" {storage.display(uri)}" if uri else ""
        super().__init__(f"{what}{where}: {problem}")

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (InputError, (self.what, self.uri, self.problem, self.lasting, self.from_seconds))


class ManifestError(HeygemError):
    """The manifest as a whole is invalid; raised before any rendering starts."""


class ClusterConfigError(HeygemError):
    """The configured actors cannot run on the cluster as it is (raised before any rendering)."""


class SettingsError(HeygemError):
    """A setting that cannot work, found before anything renders (an x264 option x264 refuses)."""


class RendererStartError(HeygemError):
    """A renderer actor could not start (bad checkpoint, no encoder on its node): no restart will
    help. Its `ready()` raises it, so the driver gets the cause as a typed exception."""


class CheckpointError(HeygemError):
    """A model file is missing, of the wrong kind, corrupt, or unsafe to load."""


@contextlib.contextmanager
def reading(what: str, uri: str) -> Iterator[None]:
    """Turn storage errors about a row's own input into InputErrors naming that input."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a parent is a file
        raise InputError(what, uri, "does not exist", lasting=False) from None
    except IsADirectoryError:
        raise InputError(what, uri, "is a directory, not a file", lasting=False) from None
    except PermissionError:
        raise InputError(what, uri, "cannot be read (permission denied)", lasting=False) from None
    except storage.ContentChanged as exc:
        raise InputError(what, uri, exc.reason, lasting=False) from None
    except OSError as exc:
        # its store unreachable through every try (a server that refuses, or keeps silent): said
        # of the input, as the rest are, not as a client's error with no name in it; still the
        # store's fault, not the input's (an avatar's rows are not failed for good by it)
        if not (storage.retried(exc) and getattr(exc, "storage_uri", None) == uri):
            raise
        detail = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        problem = (
            f"{what} {uri}: its store stayed unreachable through {storage.RETRIES} tries ({detail}); run again later"
        )
        unreachable = storage.StorageUnavailable(storage.display(problem))
        unreachable.storage_uri = uri  # type: ignore[attr-defined]
        raise unreachable from None


class CacheError(HeygemError):
    """The campaign's cache refused a read or write: not the row's input, and every row needing
    that cache meets it too."""


@contextlib.contextmanager
def caching(uri: str) -> Iterator[None]:
    """Cache reads and writes inside `reading`: a refusal there names the cache, not the input."""
    try:
        yield
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError, FileNotFoundError) as exc:
        detail = getattr(exc, "strerror", None) or type(exc).__name__
        raise CacheError(f"cache {storage.display(uri)}: cannot be used ({detail})") from None


@contextlib.contextmanager
def writing(uri: str) -> Iterator[None]:
    """Turn refusals to write a row's output into InputErrors naming it (not retried: writing again
    to a read-only place fails again)."""
    try:
        yield
    except PermissionError:
        raise InputError("output", uri, "cannot be written (permission denied)") from None
    except (NotADirectoryError, FileExistsError):
        raise InputError("output", uri, "cannot be written (a parent of it is a file, not a folder)") from None
    except IsADirectoryError:
        raise InputError("output", uri, "cannot be written (it is a folder)") from None
    except FileNotFoundError as exc:  # a folder that cannot be made there (/proc), a bucket that is none
        detail = exc.strerror or "no such folder or bucket"
        raise InputError("output", uri, f"cannot be written ({detail})") from None
    except storage.NotPublished as exc:  # the same store refuses again: not retried
        raise InputError("output", uri, f"cannot be published whole ({exc.detail})") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:  # a read-only mount (a container's): writing again fails again
            raise InputError("output", uri, "cannot be written (read-only file system)") from None
        raise


def check_writable(uri: str) -> None:
    """Fail early, before rendering, when a local output's folder cannot be created or written."""
    if not storage.is_local(uri):
        return  # object stores answer only to a real write; publishing reports it
    path = storage.local_path(uri)
    if os.path.isdir(path):
        raise InputError("output", uri, "cannot be written (it is a folder)")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError("output", uri, "cannot be written (a parent of it is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError("output", uri, "cannot be written (permission denied)")
