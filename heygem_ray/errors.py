"""Error kinds. The split decides retries: an InputError is the row's own fault (bad file, no face,
over a limit) and is reported, never retried; anything else is treated as infrastructure and retried
within a bound."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class HeygemError(Exception):
    """Base class for errors heygem_ray raises on purpose."""


class InputError(HeygemError):
    """A row's input is missing, unreadable or unusable. Not retried."""

    def __init__(self, what: str, uri: str | None, problem: str):
        from heygem_ray.storage import display

        self.what, self.uri, self.problem = what, uri, problem
        where = f" {display(uri)}" if uri else ""
        super().__init__(f"{what}{where}: {problem}")

    def __reduce__(self):  # keep the three fields across Ray's pickling
        return (InputError, (self.what, self.uri, self.problem))


class ManifestError(HeygemError):
    """The manifest as a whole is invalid; raised before any rendering starts."""


class CheckpointError(HeygemError):
    """A model file is missing, of the wrong kind, corrupt, or unsafe to load."""


@contextlib.contextmanager
def reading(what: str, uri: str) -> Iterator[None]:
    """Turn storage errors about a row's own input into InputErrors naming that input."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(what, uri, "does not exist") from None
    except IsADirectoryError:
        raise InputError(what, uri, "is a directory, not a file") from None
    except PermissionError:
        raise InputError(what, uri, "cannot be read (permission denied)") from None
