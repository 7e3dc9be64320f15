"""Every byte heygem_ray reads or writes goes through here: fsspec URIs, atomic publishing,
the node-local download cache, content fingerprints and credential-free display.

Local paths and any fsspec URI (s3://, gs://, memory://, ...) are accepted everywhere.
Per-protocol options (endpoint, credentials) come from the standard environment (for S3:
AWS_* variables and ~/.aws) or from `configure()`, which each Ray worker calls with the
campaign's `storage.options` before touching storage.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import glob as globlib
import hashlib
import logging
import os
import posixpath
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from heygem_ray import scratch

log = logging.getLogger("heygem_ray.storage")
T = TypeVar("T")

_OPTIONS: dict[str, dict[str, Any]] = {}
#: model file URI -> the version the running campaign took of it as it started (`configure`)
_PINNED: dict[str, str] = {}
# Other processes write the same prefixes (markers, segments); a cached listing would hide them.
# One layer of retries, `retrying` below: the S3 client makes one try per call (botocore's own
# retries and s3fs's would multiply ours), and Ray re-runs a task only when its worker dies.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False, "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}}}
}
_CHUNK = 4 << 20


#: tries of one storage operation before a transient error is given up on, and the first backoff;
#: the delays double (with jitter, 0.5-1x) up to _BACKOFF_MAX: 7.75-15.5 s of waiting between the tries,
#: plus each try's own time (the client's timeouts), is the outage ridden out. The only
#: retry layer: nothing below (the S3 client) or above (Ray tasks) retries an error again
RETRIES = 6
_BACKOFF = 0.5
_BACKOFF_MAX = 10.0
_TRANSIENT_ERRNOS = {
    errno.EBUSY,
    errno.EREMOTEIO,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


#: words in the names of the HTTP clients' errors for a connection or a response cut short
_CUT_SHORT = (
    "Connection",
    "Timeout",
    "Endpoint",
    "Disconnected",
    "Payload",
    "Streaming",  # aiobotocore's ResponseStreamingError: a GET's body cut off
    "HTTPClientError",
    "IncompleteRead",
    "ResponseParser",
    "Protocol",  # urllib3's ProtocolError
)
#: HTTP answers a later try may not get: too many requests, and the server's own errors but for
#: 501 (not implemented) and 505 (HTTP version)
_TRANSIENT_STATUS = {429, 500, 502, 503, 504, 507, 508, 509, 598, 599}


def is_transient(exc: BaseException) -> bool:
    """Errors a later try may not meet: throttling (S3 SlowDown/503 arrive as EBUSY; 429 and 5xx
    answers s3fs does not name arrive as EIO from the client's error), server errors, dropped or
    refused connections, responses cut short, timeouts. A missing or forbidden file is never
    transient: but fsspec's HTTP client says "not found" for any failed request (a 503, a refused
    connection), so there the cause decides."""
    if isinstance(exc, FileNotFoundError) and _masked(exc):
        return True
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if _http_status(exc) in _TRANSIENT_STATUS:
        return True
    kind = type(exc)
    return kind.__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "http") and any(
        word in kind.__name__ for word in _CUT_SHORT
    )


def _masked(exc: FileNotFoundError) -> bool:
    """Whether a "not found" hides a transient failure it was raised from (fsspec's HTTP client)."""
    cause = exc.__cause__
    return cause is not None and not isinstance(cause, FileNotFoundError) and is_transient(cause)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an error or its cause carries (aiohttp's `status`, botocore's response)."""
    seen: BaseException | None = exc
    for _ in range(3):
        if seen is None:
            return None
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            return status
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        seen = seen.__cause__
    return None


#: the packages of store clients whose own errors are no OSError (botocore's NoCredentialsError)
_CLIENT_PACKAGES = ("botocore", "aiobotocore", "s3fs", "google", "gcsfs", "azure", "adlfs", "fsspec")


def client_error(exc: BaseException) -> bool:
    """Whether `exc` is a store client's own error, not an OSError: missing credentials, a bad
    endpoint, a configuration the client refuses."""
    return not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] in _CLIENT_PACKAGES


def retried(exc: BaseException) -> bool:
    """Whether `exc` is a storage error raised after every try (`retrying`): trying the step again
    soon, on top, would only multiply the retries. (An attribute, kept when Ray pickles it.)"""
    return isinstance(exc, StorageUnavailable) or bool(getattr(exc, "storage_retried", False))


class StorageUnavailable(ConnectionError):
    """The store stayed unreachable through every try (`retrying`): raised from the client's own
    error (botocore's and aiohttp's connection errors are not OSErrors), so a caller that lets an
    unreachable store fail one step, not the campaign, catches it as an OSError."""


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry a storage operation on transient errors with exponential backoff and jitter; one still
    failing after the last try is raised as an OSError (`StorageUnavailable`, but for OSErrors)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(1, RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                target = str(args[-1] if fn.__name__ == "publish_file" else args[0]) if args else ""
                if attempt == RETRIES:
                    # a "not found" masking what failed (`_masked`) is said as what failed
                    failed = exc.__cause__ if isinstance(exc, FileNotFoundError) and exc.__cause__ else exc
                    final = exc if isinstance(exc, OSError) and failed is exc else None
                    if final is None:
                        text = f"{type(failed).__name__}: {failed}".strip().rstrip(":")
                        final = StorageUnavailable(display(text))
                    final.storage_retried = True  # type: ignore[attr-defined]  # see `retried`
                    final.storage_uri = target  # type: ignore[attr-defined]  # see `errors.reading`
                    if final is exc:
                        raise
                    raise final from exc
                delay = min(_BACKOFF_MAX, _BACKOFF * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning(
                    "storage %s %s: %s: %s; try %d of %d in %.1f s",
                    fn.__name__,
                    display(target),
                    type(exc).__name__,
                    display(str(exc)),
                    attempt + 1,
                    RETRIES,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


#: per-protocol fsspec options, as `storage.options` holds them: {"s3": {"endpoint_url": ...}}
StorageOptions = Mapping[str, Mapping[str, Any]]


def configure(options: StorageOptions | None, model_versions: Mapping[str, str] | None = None) -> None:
    """Set per-protocol fsspec options for this process, e.g. {"s3": {"endpoint_url": ...}}, and
    the versions of the model files its campaign pinned as it started (`Config.model_versions`:
    `pinned_version`; None leaves those as they are: a stage that loads no model need not carry
    them, and a process serves one campaign's stages)."""
    global _OPTIONS, _PINNED
    # one assignment each: a thread reading them (the inline executor runs stages on threads)
    # sees the old set or the new one, never a half-filled one
    _OPTIONS = {protocol: dict(opts or {}) for protocol, opts in (options or {}).items()}
    if model_versions is not None:
        _PINNED = dict(model_versions)


#: keys every fsspec filesystem takes before its own (the instance cache), and those s3fs passes to
#: its listings cache
_EVERY_FS_KEYS = frozenset({"skip_instance_cache"})
_LISTING_KEYS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths"})


def option_problems(options: Mapping[str, Any]) -> list[str]:
    """Why `storage.options` would fail a run (a typo'd protocol was ignored; a typo'd key failed
    the first storage call with a TypeError, after the run had started): a protocol fsspec does
    not know, or a key its filesystem takes neither by name (along its classes) nor through to its
    client session (s3fs passes its other keywords to aiobotocore's session). A protocol whose
    package is not installed is left unchecked (the campaign may use no such URI)."""
    import inspect

    problems = []
    for protocol, opts in options.items():
        if protocol not in fsspec.available_protocols():
            problems.append(f"storage.options.{protocol}: {protocol!r} is not a protocol fsspec knows")
            continue
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError):
            continue
        taken, loose = set(_EVERY_FS_KEYS), False
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            taken |= {p.name for p in params if p.kind is not p.VAR_KEYWORD}
            loose = loose or (klass is cls and any(p.kind is p.VAR_KEYWORD for p in params))
        if protocol in ("s3", "s3a"):
            import aiobotocore.session

            taken |= _LISTING_KEYS | set(inspect.signature(aiobotocore.session.AioSession.__init__).parameters)
            loose = False
        for key in [] if loose else sorted(set(opts or {}) - taken - {"self"}):
            problems.append(f"storage.options.{protocol}.{key}: {cls.__name__} takes no such option")
    return problems


def pinned_version(uri: str) -> str | None:
    """The version (`current_version`) the running campaign took of the model file at `uri` as it
    started, or None where it pinned none."""
    return _PINNED.get(uri)


def current_version(uri: str) -> str | None:
    """A key that changes when the model file at `uri` is replaced: `version_key`, or its content's
    fingerprint where its store names no version or the file is local (`local_fingerprint`: a
    byte-identical copy, re-downloaded at pod start or made on each node, has times of its own but
    is the same weights); None where there is no such object."""
    if is_local(uri):
        try:
            return local_fingerprint(local_path(uri))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:  # a folder, unreadable: versioned as the store describes it; its load says why
            pass
    try:
        key = stored_version_key(uri)
    except FileNotFoundError:
        return None
    # a server that names no version: the content (a fine-tuned checkpoint has the size of the
    # one it replaces)
    return key or fingerprint(uri)


@retrying
def stored_version_key(uri: str) -> str | None:
    """`version_key` of the object at `uri` as its store describes it now (FileNotFoundError
    where there is none)."""
    fs, path = url_to_fs(uri)
    return version_key(uri, fs.info(path))


_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")


def protocol(uri: str) -> str:
    match = _SCHEME.match(uri) if "://" in uri else None  # a plain path at once: asked millions of times a campaign
    return match.group(1).lower() if match else "file"


def is_local(uri: str) -> bool:
    return protocol(uri) in ("file", "local")


def scheme_problem(uri: str) -> str | None:
    """Why `uri`'s scheme cannot be read here (None: it can): one fsspec does not know, or one whose
    package is not installed (gs:// without gcsfs: the image ships s3fs alone)."""
    return _scheme_problem(protocol(uri))


@functools.lru_cache(maxsize=64)
def _scheme_problem(name: str) -> str | None:
    try:
        fsspec.get_filesystem_class(name)
    except ValueError:
        return f"{name}:// is no storage scheme fsspec knows"
    except ImportError as exc:
        return f"{name}:// needs a package not installed here ({str(exc).splitlines()[0]})"
    return None


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of `uri` (its scheme's, with the options given for it) and its path there.
    Never a chain: fsspec reads "a::b" as file system a over b, so a local folder "promo::v2" or an
    S3 key holding "::" was read, locked, listed and removed at the path before the "::" (another
    folder's files deleted; a second run let into the same output root), though written where named."""
    proto = protocol(uri)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    if scheme and scheme.group(1) != proto:  # "S3://": file systems strip their scheme as they write it
        uri = proto + uri[scheme.end(1) :]
    family = "s3" if proto in ("s3", "s3a") else proto  # s3a:// is s3fs too
    defaults = _http_defaults() if family in ("http", "https") else _DEFAULTS.get(family, {})
    options = _merged(defaults, _OPTIONS.get(proto) or _OPTIONS.get(family) or {})
    cls = fsspec.get_filesystem_class(proto)
    fs = cls(**{**cls._get_kwargs_from_urls(uri), **options})  # s3's ?versionId= asks for a version-aware one
    path = cls._strip_protocol(uri)
    if family == "s3":
        fs.retries = 1  # s3fs's own retry loop (a class attribute, 5 tries): ours is the one layer
    return fs, path


#: seconds an HTTP(S) server may keep silent (to connect, or between two reads of an answer)
#: before a try is given up: aiohttp waits 5 minutes for a whole answer, so a server that took the
#: connection and never answered held a task for RETRIES x 5 minutes (and on a small machine the
#: rows behind it, whose tasks waited for its thread)
HTTP_SILENCE_SECONDS = 60.0


def _http_defaults() -> dict[str, Any]:
    import aiohttp  # fsspec's HTTP client

    # no limit on the whole answer (a long clip downloads for minutes), only on silence
    silence = HTTP_SILENCE_SECONDS
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=silence, sock_read=silence)}}


def _merged(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`, nested dicts merged (a user's `config_kwargs` for MinIO's path-style
    addressing keeps the client's one try: else each of our tries would make several)."""
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def local_path(uri: str) -> str:
    """The OS path of a local URI (plain path or file://)."""
    if not is_local(uri):
        raise ValueError(f"not a local path: {display(uri)}")
    return os.path.abspath(os.path.expanduser(re.sub(r"^(file|local)://", "", uri)))


def is_relative(uri: str) -> bool:
    """Whether `uri` is a local path relative to the current folder."""
    return bool(uri) and is_local(uri) and not uri.startswith(("/", "~", "file://", "local://"))


def anchored(uri: str) -> str:
    """A relative local path made absolute against this process's folder; anything else as given.
    A campaign's workers may run elsewhere: those of a cluster it joins run in the folder the
    cluster's head was started in."""
    return os.path.abspath(uri) if is_relative(uri) else uri


def case_blind(uri: str) -> bool:
    """Whether the file system of a local folder takes names that differ only in case for one
    (macOS's APFS, Windows' NTFS, SMB shares): asked by making a file there. False for object
    stores and where nothing can be written (the campaign says why later)."""
    if not is_local(uri):
        return False
    folder = local_path(uri)
    name = f".heygem-case-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "xb"):
            pass
    except OSError:
        return False
    try:
        return os.path.exists(os.path.join(folder, name.swapcase()))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme; absolute local paths stay absolute."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def normalize(uri: str) -> str:
    """A canonical form for comparing URIs: local paths made absolute, one '/' between parts."""
    if is_local(uri):
        return local_path(uri)
    proto = protocol(uri)
    rest = re.sub(r"/+", "/", uri.split("://", 1)[1])
    return f"{proto}://{rest}".rstrip("/")


def dirname(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def display(uri: str) -> str:
    """The URI with any user:password@ or key=secret query part removed, for logs and errors."""
    uri = re.sub(r"(://)[^/@]*@", r"\1", uri)
    return re.sub(
        r"([?&](?:sig|[^=&]*(?:key|token|secret|signature|credential|password)[^=&]*)=)[^&]*",  # sig: Azure SAS
        r"\1***",
        uri,
        flags=re.IGNORECASE,
    )


#: a signed URL's parameters, by the one that says it is signed that way: those that change each
#: time it is signed (names lowercased; a name ending in "-" stands for all names it begins). Only
#: when that one is there: a bare "sp" or "x-oss-process" may be what the URL asks for
_SIGNATURES = {
    "x-amz-signature": ("x-amz-",),  # S3, SigV4
    "awsaccesskeyid": ("awsaccesskeyid", "signature", "expires", "x-amz-security-token"),  # S3, SigV2
    "x-goog-signature": ("x-goog-",),  # GCS, V4
    "googleaccessid": ("googleaccessid", "signature", "expires"),  # GCS, V2
    "key-pair-id": ("key-pair-id", "signature", "expires", "policy"),  # CloudFront
    "ossaccesskeyid": ("ossaccesskeyid", "signature", "expires", "security-token"),  # Alibaba OSS, V1
    "x-oss-signature": (
        "x-oss-signature",
        "x-oss-credential",
        "x-oss-date",
        "x-oss-expires",
        "x-oss-signature-version",
        "x-oss-security-token",
        "x-oss-additional-headers",
    ),  # OSS, V4
    "sig": (
        "sv",
        "ss",
        "srt",
        "sp",
        "se",
        "st",
        "spr",
        "sig",
        "si",
        "sr",
        "sdd",
        "ses",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
        "saoid",
        "suoid",
        "scid",
        "sduoid",
    ),  # Azure SAS
}


def unsigned(uri: str) -> str:
    """`uri` less the query parameters that sign it (`uri` itself where it has none): the same
    object's URL signed again, for a rerun after the first signatures expired, is the same input."""
    base, mark, query = uri.partition("?")
    params = query.split("&") if mark else []
    names = [p.split("=", 1)[0].lower() for p in params]
    signing = [n for key, found in _SIGNATURES.items() if key in names for n in found]
    if not signing:
        return uri
    kept = [
        p
        for p, n in zip(params, names, strict=True)
        if not any(n == s or (s.endswith("-") and n.startswith(s)) for s in signing)
    ]
    return base + ("?" + "&".join(kept) if kept else "")


@retrying
def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


@retrying
def info(uri: str) -> dict[str, Any]:
    """The store's facts about a file (fsspec's `info`: size, type, version fields)."""
    fs, path = url_to_fs(uri)
    return dict(fs.info(path))


@retrying
def fresh_info(uri: str) -> dict[str, Any]:
    """`info` as the store answers now, not from a listing the file system kept."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    return dict(fs.info(path))


@retrying
def size(uri: str) -> int:
    fs, path = url_to_fs(uri)
    return int(fs.size(path))


def open_uri(uri: str, mode: str = "rb") -> IO[bytes]:
    fs, path = url_to_fs(uri)
    return fs.open(path, mode)


@retrying
def read_bytes(uri: str) -> bytes:
    fs, path = url_to_fs(uri)
    return fs.cat_file(path)


def iter_range(uri: str, start: int, stop: int, chunk: int = 2**20) -> Iterator[bytes]:
    """Bytes [start, stop) of a file (fewer where it ends sooner) in pieces of `chunk`, each a
    ranged read: an opened file of an object store reads ahead up to 50 MiB per reader (every
    seek of a video in a browser, every video in a zip being sent)."""
    while start < stop and (piece := read_range(uri, start, min(stop, start + chunk))):
        start += len(piece)
        yield piece


@retrying
def read_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file (fewer where it ends sooner), in one ranged request: an opened
    file of an object store reads ahead a block of up to 50 MiB, a row's whole narration for every
    segment's second of it."""
    fs, path = url_to_fs(uri)
    if stop <= start:
        return b""
    if protocol(uri) in ("http", "https"):  # a server may ignore Range and send it all: streamed
        with fs.open(path, "rb", block_size=0) as fh:
            fh.read(start)
            return bytes(fh.read(stop - start))
    return fs.cat_file(path, start=start, end=stop)


@retrying
def remove(uri: str, recursive: bool = False) -> None:
    """Remove a file, or a folder and all under it; a name with glob characters ("run[1]") is taken
    as it is (fsspec's object stores expand them: they removed a sibling "run1")."""
    fs, path = url_to_fs(uri)
    local = isinstance(fs, LocalFileSystem)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path if local else globlib.escape(path), recursive=recursive)
            if local:
                return
            # an object store's batch delete answers 200 listing the keys it kept (throttled, an
            # internal error, denied), which s3fs drops: a campaign deleted that way left videos
            # no page shows, counted in its user's quota. What is still there is an error
            fs.invalidate_cache(path)
            if fs.exists(path):
                raise OSError(
                    errno.EREMOTEIO, f"{display(uri)}: the store kept it (or some of it) when asked to remove it"
                )


@retrying
def usage(uri: str, leaving_out: str | None = None) -> int:
    """Bytes stored under a folder (0 when there is none), less those under its subfolder
    `leaving_out`. A local folder is walked around that subfolder (a user's cache: more files than
    their campaigns, each a stat); elsewhere the sizes come from one listing of everything under
    the folder: fsspec's `du` asks for each file's info again, one HEAD per object on S3 (hundreds
    of thousands for a user's campaigns), and a listing per subfolder is a request per campaign."""
    if is_local(uri):
        skipped = os.path.normpath(local_path(leaving_out)) if leaving_out is not None else None
        total = 0
        for folder, subfolders, names in os.walk(os.path.normpath(local_path(uri))):
            subfolders[:] = [d for d in subfolders if os.path.join(folder, d) != skipped]
            for name in names:
                with contextlib.suppress(OSError):  # gone meanwhile
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total
    fs, path = url_to_fs(uri)
    skip = None if leaving_out is None else url_to_fs(leaving_out)[1].rstrip("/") + "/"
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)  # {} where there is no such folder
    except FileNotFoundError:
        return 0
    return sum(int(info.get("size") or 0) for name, info in found.items() if skip is None or not name.startswith(skip))


@retrying
def sizes(uris: list[str]) -> dict[str, int]:
    """The size of each of `uris` that exists, from one listing of each folder they are in (not a
    HEAD per object: a campaign's zip of 100,000 videos is sized before its first byte is sent)."""
    by_folder: dict[str, list[str]] = {}
    for uri in uris:
        by_folder.setdefault(dirname(uri), []).append(uri)
    found: dict[str, int] = {}
    for folder, inside in by_folder.items():
        fs, path = url_to_fs(folder)
        fs.invalidate_cache(path)  # what the store holds now, not s3fs's listing of a while ago
        try:
            listed = {basename(info["name"]): info for info in fs.ls(path, detail=True)}
        except FileNotFoundError:
            continue
        for uri in inside:
            info = listed.get(basename(uri))
            if info is not None and info.get("type") == "file":
                found[uri] = int(info.get("size") or 0)
    return found


def remove_empty_dir(uri: str) -> None:
    """Remove a folder that has nothing left in it (object stores have no empty folders to remove)."""
    fs, path = url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError, OSError):
        if fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)


@retrying
def listdir(uri: str) -> list[str]:
    """The URIs directly under a folder (none when there is no folder); unlike `glob`, a name with
    glob characters ("run[1]") is taken as it is."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)  # what the store holds now, not s3fs's listing of a while ago
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return [join(uri, str(name).rstrip("/").rsplit("/", 1)[-1]) for name in names]


@retrying
def glob(pattern: str) -> list[str]:
    """Expand a glob, returning URIs in the same form (scheme kept) in sorted order."""
    fs, path = url_to_fs(pattern)
    matches = sorted(fs.glob(path))
    if is_local(pattern):
        return matches
    return [f"{protocol(pattern)}://{m}" for m in matches]


@retrying
def versions(pattern: str) -> dict[str, str | None]:
    """The URIs a glob matches (as `glob` gives them) and each one's `version_key`, from the
    listings the glob makes (on an object store, a LIST per folder it walks, which reports each
    object's ETag): a caller that keeps what it read by version reads again only what changed."""
    fs, path = url_to_fs(pattern)
    found = fs.glob(path, detail=True)
    prefix = "" if is_local(pattern) else f"{protocol(pattern)}://"
    return {
        f"{prefix}{name}": version_key(f"{prefix}{name}", info)
        for name, info in sorted(found.items())
        if info.get("type") != "directory"
    }


@retrying
def publish_file(local_file: str, uri: str, move: bool = False, link: bool = False) -> None:
    """Put a finished local file at `uri` so readers never see a partial file; `move`: the caller
    is done with `local_file`, which a local destination on the same file system takes as it is
    (no copy: a 3-minute 1080p output is ~0.5 GB); `link`: the caller keeps `local_file` but no
    one will change it, so a local destination on the same file system shares it (a hard link).

    Local destination: copy next to it under a hidden temporary name, flush it to the disk, then
    rename (atomic on POSIX) and flush the folder: after a crash or power loss the path holds the
    old file or the whole new one, never an empty or partial one (a rename can reach the disk
    before the data it names). Object stores: a single PUT or a completed multipart upload is
    atomic to readers. Other stores (SFTP, WebDAV, FTP, SMB, HDFS, ...) write where they are told,
    as the bytes arrive: the file goes under a hidden temporary name beside the destination, then
    is renamed (replacing what was there; a server whose rename will not replace gets the old file
    removed first: the path is then briefly absent, never partial; a store that renames nothing at
    all, an SFTP server without posix-rename, gets nothing: `NotPublished`, the row failed).
    """
    if is_local(uri):
        dest = local_path(uri)
        folder = os.path.dirname(dest) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, _part_name(os.path.basename(dest)))
        moved = move and _renamed(local_file, tmp)
        try:
            if not moved and not (link and _linked(local_file, tmp)):
                shutil.copyfile(local_file, tmp)
            _sync(tmp)
            os.replace(tmp, dest)
        finally:
            if moved and os.path.exists(tmp):  # not published: the caller's file back, for a retry
                os.rename(tmp, local_file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with contextlib.suppress(OSError):  # some file systems cannot sync a folder; the file itself is
            _sync(folder)
        return
    fs, path = url_to_fs(uri)
    if protocol(uri) in OBJECT_STORES:
        fs.put_file(local_file, path)
        return
    folder, _, name = path.rpartition("/")
    with contextlib.suppress(Exception):  # an SFTP or WebDAV server needs the folder
        fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/{_part_name(name)}"
    try:
        fs.put_file(local_file, tmp)
        try:
            _rename(fs, tmp, path)
            refused: Exception | None = None if not fs.exists(tmp) else OSError("its rename left the file where it was")
        except Exception as exc:
            if is_transient(exc):
                raise
            refused = exc
        if refused is not None:
            # a rename that will not replace (SFTP's plain rename; WebHDFS's answers "false" and no
            # error), or none at all: the old file is moved aside only once the new one has been
            # renamed once, to a second hidden name, and comes back if the new one cannot follow
            second = f"{folder}/{_part_name(name)}"
            if not fs.exists(path) or not _renamed_on(fs, tmp, second) or fs.exists(tmp):
                raise NotPublished(display(f"the store renamed nothing into place: {refused}")) from refused
            tmp, old = second, f"{folder}/{_part_name(name)}"
            _rename(fs, path, old)
            try:
                _rename(fs, tmp, path)
                if fs.exists(tmp):
                    raise NotPublished(display("the store renamed nothing into place"))
            except BaseException:
                with contextlib.suppress(Exception):
                    if not fs.exists(path):
                        _rename(fs, old, path)  # the old file back: never neither
                raise
            with contextlib.suppress(Exception):
                fs.rm_file(old)
    finally:
        with contextlib.suppress(Exception):  # gone once renamed; a failed upload's leftovers
            if fs.exists(tmp):
                fs.rm_file(tmp)


class NotPublished(OSError):
    """A store that renames nothing (an SFTP server without posix-rename): outputs are published
    whole or not at all, never written in place where a reader or a crash could find half."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail

    def __reduce__(self):  # Ray pickles it across processes; OSError's own would lose `detail`
        return (NotPublished, (self.detail,))


def _renamed_on(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> bool:
    """Whether the store renamed `src` to `dst` (a name nothing holds); transient errors raised."""
    try:
        _rename(fs, src, dst)
    except Exception as exc:  # a store that renames nothing
        if is_transient(exc):
            raise
        return False
    return True


def _rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """The store's own rename; where it has none, fsspec's, one file's copy and removal (fsspec's
    `mv` takes glob characters in a name, "promo[1]", for a pattern)."""
    if getattr(fs.mv, "__func__", None) is not fsspec.AbstractFileSystem.mv:
        fs.mv(src, dst)
    else:
        fs.cp_file(src, dst)
        fs.rm_file(src)


#: stores of objects, not folders: nothing to make before a PUT, and their fsspec makedirs makes a
#: bucket (a mistyped bucket in a row's output would be created, not refused)
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"}


#: what names a file being published (".NAME.part-XXXXXXXX" beside NAME) until it is renamed
_PART = ".part-"
#: the bytes of NAME a part's name keeps: a file name may be 255 bytes, and the part's adds 15
_PART_KEEPS = 200


def _part_name(name: str) -> str:
    """A hidden name, new each time, for a file being published as `name` (`_PART_NAME`)."""
    kept = name.encode()[:_PART_KEEPS].decode(errors="ignore")
    return f".{kept}{_PART}{uuid.uuid4().hex[:8]}"


_PART_NAME = re.compile(r"\..+\.part-[0-9a-f]{8}")


def remove_parts(root: str, skip: str | None = None, older_than: float = 0.0, lock_name: str | None = None) -> int:
    """Remove the files that publishes under the local folder `root` left half-made when their
    process was killed (SIGKILL, a lost node); returns how many. Only for a folder no one else
    publishes into now (the output root, once its lock is held): a publish of a run that is still
    going there would fail. `skip`: a folder under it that others may write to meanwhile (a cache
    campaigns share). `older_than`: only files last written that many seconds ago (a folder
    others publish into: no publish takes that long). `lock_name`: a folder below holding a file
    of that name is another campaign's output root (given output=/out/c42 while this one has
    /out), left to that campaign. One that cannot be removed is logged and left. Object stores have
    none (a PUT is whole or absent)."""
    if not is_local(root):
        return 0
    removed = 0
    before = time.time() - older_than
    skipped = os.path.realpath(local_path(skip)) if skip is not None and is_local(skip) else None
    for folder, subfolders, names in os.walk(local_path(root)):
        if skipped is not None:
            subfolders[:] = [d for d in subfolders if os.path.realpath(os.path.join(folder, d)) != skipped]
        if lock_name is not None:
            subfolders[:] = [d for d in subfolders if not os.path.exists(os.path.join(folder, d, lock_name))]
        for name in names:
            if _PART_NAME.fullmatch(name):
                try:
                    if older_than and os.stat(os.path.join(folder, name)).st_mtime > before:
                        continue
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("%s not removed: %s", os.path.join(folder, name), exc)
    return removed


def _renamed(src: str, dst: str) -> bool:
    """Rename `src` to `dst`; False, doing nothing, where they are on different file systems."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True


def _linked(src: str, dst: str) -> bool:
    """Hard-link `src` as `dst`, with the mode a new file gets (a private upload's 0600 would keep
    the store's other readers out); False, doing nothing, where the file system cannot (another
    one, no hard links, a link count at its limit)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    os.chmod(dst, 0o666 & ~_UMASK)
    return True


def _umask() -> int:
    mask = os.umask(0o022)  # read by setting: at import, before any thread may create a file
    os.umask(mask)
    return mask


_UMASK = _umask()


def _sync(path: str) -> None:
    """Flush a file's or a folder's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object atomically (temp file + publish_file). The temp file has the object's
    extension: s3fs tells an object's Content-Type from it (a report stored as octet-stream was
    downloaded, not shown, when opened from the bucket)."""
    suffix = posixpath.splitext(basename(uri))[1]
    path = scratch.file("write", suffix=suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else "")
    try:
        with open(path, "wb") as tmp:
            tmp.write(data)
        publish_file(path, uri)
    finally:
        os.unlink(path)


@retrying
def fingerprint(uri: str) -> str:
    """BLAKE2b of the content: the same bytes give the same key on any storage."""
    digest = hashlib.blake2b(digest_size=16)
    with open_uri(uri) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


#: local fingerprints this process took, by `_stat_key` (most recent last)
_local_fingerprints: collections.OrderedDict[str, str] = collections.OrderedDict()
LOCAL_FINGERPRINTS_KEPT = 256


def local_fingerprint(path: str) -> str:
    """`fingerprint` of a local file, memoised (in this process and in the node cache) by its real
    path, size, inode, modification and change times: a 436 MB checkpoint is hashed once per node
    and version, not at every campaign start and actor load. Any rewrite changes its change time,
    which no one sets by hand, so a memo never names other bytes. Raises FileNotFoundError."""
    for _ in range(3):
        key = _stat_key(path)
        fp = _local_fingerprints.get(key)
        memo = os.path.join(node_cache_dir(), f"fingerprint-{key[:32]}.txt")  # trimmed as a copy is
        if fp is None:
            with contextlib.suppress(OSError, UnicodeDecodeError), open(memo, encoding="ascii") as fh:
                fp = fh.read().strip()
            fp = fp if fp and _FINGERPRINT.fullmatch(fp) else None  # a damaged memo: hashed again
        if fp is None:
            fp = fingerprint(path)
            if _stat_key(path) != key:  # rewritten while it was hashed: hash what is there now
                continue
            _write_memo(memo, fp)
        _local_fingerprints[key] = fp
        _local_fingerprints.move_to_end(key)
        while len(_local_fingerprints) > LOCAL_FINGERPRINTS_KEPT:
            _local_fingerprints.popitem(last=False)
        return fp
    raise ContentChanged(path, CHANGED_WHILE_READ)


_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def _write_memo(memo: str, fp: str) -> None:
    """Atomically (actors starting together hash the same file); a cache that cannot take it only
    costs the next process a hash."""
    tmp = f"{memo}{_PART}{uuid.uuid4().hex[:8]}"
    try:
        _make_cache(os.path.dirname(memo))
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(fp)
        os.replace(tmp, memo)
    except OSError as exc:
        log.debug("fingerprint memo %s not written (%s)", memo, exc)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _stat_key(path: str) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    return hashlib.sha256(
        f"{real}|{st.st_size}|{st.st_dev}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode()
    ).hexdigest()


def node_cache_dir() -> str:
    return os.environ.get("HEYGEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "heygem_ray")


def node_cache_bytes() -> int:
    """How large the node cache may grow (`HEYGEM_CACHE_GB`, default 20 GiB) before the copies used
    longest ago are removed."""
    return int(float(os.environ.get("HEYGEM_CACHE_GB") or 20) * 2**30)


#: a copy used this recently is never removed: a caller may be about to open the path it was given
CACHE_GRACE_SECONDS = 600.0


#: what fsspec's info() reports that changes when an object is replaced, in the order keys were
#: always made from (ETag: S3, GCS, Azure, HTTP; modification times: local files' mtime, S3's
#: LastModified, HTTP's Last-Modified, Azure's last_modified; digests and generations: HTTP's
#: Content-MD5 and Digest, GCS's md5Hash and generation; memory://'s created)
VERSION_FIELDS = (
    "ETag", "etag", "mtime", "LastModified", "Last-Modified", "last_modified",
    "Content-MD5", "Digest", "md5Hash", "generation", "updated", "created",
)  # fmt: skip


def version_key(uri: str, info: Mapping[str, Any]) -> str | None:
    """A key that changes when the object at `uri` changes: URI, size and version (the first of
    VERSION_FIELDS its store reports). None where the store reports no version (an HTTP endpoint
    that sends neither ETag nor Last-Modified, as a text-to-speech service's may): its bytes can
    change under the same URI and size, so nothing may be kept by that key."""
    version = next((info[k] for k in VERSION_FIELDS if info.get(k) not in (None, "")), None)
    if version is None:
        return None
    # surrogateescape: a local name that is not UTF-8 (a Windows zip's Latin-1) still has a key
    return hashlib.sha256(f"{normalize(uri)}|{info.get('size')}|{version}".encode(errors="surrogateescape")).hexdigest()


def change_key(uri: str, info: Mapping[str, Any]) -> str | None:
    """`version_key`, and for a local file its inode and change time too: a file replaced by one of
    the same size that keeps the old mtime (`cp -p`, `rsync -a`, an archive unpacked, `touch -r`)
    has a new inode or change time, which no one sets by hand. For what is kept by an input's bytes
    (its fingerprint), not for model versions pinned across nodes (each node's copy has its own
    inode)."""
    key = version_key(uri, info)
    if key is None or not is_local(uri):
        return key
    return hashlib.sha256(f"{key}|{info.get('ino')}|{info.get('created')}".encode()).hexdigest()


#: why a downloaded or hashed input is refused when the store holds another version after it
CHANGED_WHILE_READ = "changed while it was being read (another version is there now); run it again"

#: why an input the campaign fingerprinted is refused when it holds other bytes now
REPLACED = "was replaced while the campaign ran (the row was prepared from the file it replaced); run it again"


class ContentChanged(ValueError):
    """An input holds other bytes than when the campaign took its fingerprint: rendering on would
    mix the two. `reason` says so without the input's name (`errors.reading` adds it)."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{display(uri)}: {reason}")
        self.reason = reason


@retrying
def local_copy(
    uri: str, cache_dir: str | None = None, content: str | None = None, info: Mapping[str, Any] | None = None
) -> str:
    """A local path holding `uri`'s bytes: local files as they are, remote ones downloaded once per
    node into the node cache (keyed by URI, size and version/ETag), safe against concurrent callers.

    Where the store names no version, the copy is kept under its content's fingerprint: `content`,
    the fingerprint the caller took of `uri` (`prepare.content_fingerprint`), finds a copy of those
    bytes, and a download that finds others raises ContentChanged; without `content` it is
    downloaded at every call. `info`: the store's info of `uri`, where the caller just asked it."""
    if is_local(uri):
        return local_path(uri)
    fs, path = url_to_fs(uri)
    info = fs.info(path) if info is None else info
    suffix = os.path.splitext(basename(uri.split("?", 1)[0]))[1][:16]  # never a query string (tokens) on disk
    root = cache_dir or node_cache_dir()
    key = version_key(uri, info)
    if key is None:
        dest = os.path.join(root, f"content-{content}{suffix}")
        if content and _used(dest):
            return dest
        dest = _unversioned_copy(fs, path, uri, root, suffix, int(info.get("size") or 0))
        if content and dest != os.path.join(root, f"content-{content}{suffix}"):
            raise ContentChanged(
                uri,
                "changed while the campaign read it (its server names no version: no ETag or Last-Modified); "
                "run it again",
            )
    else:
        dest = os.path.join(root, key[:24] + suffix)
        if _used(dest):
            return dest
        _download_once(fs, path, dest, root, int(info.get("size") or 0), uri, key)
    try:
        trim_node_cache(root, node_cache_bytes())
    except OSError as exc:  # the copy is there: a cache that cannot be trimmed fails no row
        log.warning("node cache %s not trimmed: %s: %s", root, type(exc).__name__, exc)
    return dest


def _download_once(
    fs: fsspec.AbstractFileSystem, path: str, dest: str, root: str, size: int, uri: str, key: str
) -> None:
    """Download to `dest` unless a concurrent caller did meanwhile; the copy is kept under the
    version `key` only if the store still has that version once it is read (a download asks for
    no version, and a large one is many ranged reads: an object replaced meanwhile came down as the
    new bytes, or parts of both, kept for every later use of the old version on this node)."""
    with cache_lock(root, dest):
        if not os.path.exists(dest):
            tmp = f"{dest}{_PART}{uuid.uuid4().hex[:8]}"
            try:
                _get_with_room(fs, path, tmp, root, size)
                fs.invalidate_cache(path)  # asked of the store now; no retries of its own: the caller's are
                if (size and os.path.getsize(tmp) != size) or version_key(uri, fs.info(path)) != key:
                    raise ContentChanged(uri, CHANGED_WHILE_READ)
                _sync(tmp)  # a copy a crash left empty would fail every row that uses it
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


_unversioned_seen: set[str] = set()  # URIs whose lack of a version this process logged


def _unversioned_copy(fs: fsspec.AbstractFileSystem, path: str, uri: str, root: str, suffix: str, size: int) -> str:
    """A fresh copy of an object whose store names no version (a copy kept by URI and size would
    serve a replaced narration of the same length), kept under its content's fingerprint, so uses
    that find the same bytes share one copy."""
    if uri not in _unversioned_seen:
        _unversioned_seen.add(uri)
        log.info(
            "%s: its server names no version (no ETag or Last-Modified): copies are checked by content", display(uri)
        )
    tmp = os.path.join(root, f"unversioned{_PART}{uuid.uuid4().hex[:8]}")
    try:
        _make_cache(root)
        open(tmp, "wb").close()
    except OSError as exc:
        raise _unusable_cache(root, exc) from exc
    try:
        _get_with_room(fs, path, tmp, root, size)
        digest = hashlib.blake2b(digest_size=16)  # as `fingerprint` makes it
        with open(tmp, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        dest = os.path.join(root, f"content-{digest.hexdigest()}{suffix}")
        if not _used(dest):
            _sync(tmp)
            os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def _get_with_room(fs: fsspec.AbstractFileSystem, path: str, tmp: str, root: str, size: int) -> None:
    """Download to `tmp`, readable by this account only (the inputs of every user whose rows ran on
    the node); on a full disk the node cache's copies used longest ago make room (else every
    download on the node would fail until someone cleared it) and it goes again once."""
    try:
        fs.get_file(path, tmp)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        trim_node_cache(root, max(0, node_cache_bytes() - size))
        fs.get_file(path, tmp)
    os.chmod(tmp, 0o600)


def _make_cache(root: str) -> None:
    """The node cache's folder, made readable by this account only where this makes it."""
    os.makedirs(root, mode=0o700, exist_ok=True)


def _used(dest: str) -> bool:
    """Whether the node cache holds `dest`, marked used now (the copies used longest ago go first,
    never within the grace). False when another process trimmed it meanwhile."""
    try:
        os.utime(dest)
    except FileNotFoundError:
        return False
    except OSError:  # a read-only or another user's cache: used as it is
        return os.path.exists(dest)
    return True


def trim_node_cache(root: str, limit: int, grace: float | None = None) -> None:
    """Remove the node cache's copies used longest ago until they take at most `limit` bytes; a
    copy used within `grace` seconds (default `CACHE_GRACE_SECONDS`) stays (a reader with its path
    open keeps the file anyway). A partial file not written to for ABANDONED_PART_SECONDS (its
    writer killed mid-download) goes too."""
    grace = CACHE_GRACE_SECONDS if grace is None else grace
    copies = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.endswith(".lock"):
                continue
            if _PART in entry.name:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - entry.stat().st_mtime > ABANDONED_PART_SECONDS:
                        os.unlink(entry.path)
                continue
            with contextlib.suppress(FileNotFoundError):  # another process trimmed it meanwhile
                if entry.is_dir(follow_symlinks=False):  # not ours to trim (nor can unlink remove it)
                    continue
                stat = entry.stat()
                copies.append((stat.st_mtime, stat.st_size, entry.path))
    total = sum(size for _, size, _ in copies)
    for _, size, path in sorted(copies):
        if total <= limit:
            break
        try:
            if time.time() - os.stat(path).st_mtime < grace:  # used since the scan, or too recently
                continue
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # one that cannot go stops no other from going
            log.warning("node cache: %s not removed (%s)", path, exc)
            continue
        total -= size
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".lock")


#: a partial file in the node cache this long untouched was left by a writer that died
ABANDONED_PART_SECONDS = 6 * 3600.0


class NodeCacheError(OSError):
    """The node's download cache (HEYGEM_CACHE_DIR) cannot be made or written: every row on the
    node meets it, and it is not any input's fault."""


def _unusable_cache(root: str, exc: OSError) -> NodeCacheError:
    """The node's cache, not the input, said to be at fault (callers blame inputs for OSErrors)."""
    return NodeCacheError(f"node cache {root} cannot be used ({exc.strerror or exc}); set HEYGEM_CACHE_DIR")


@contextlib.contextmanager
def cache_lock(root: str, dest: str) -> Iterator[None]:
    """Hold the lock on one copy in the node cache `root` (its processes, this node's), made first
    if need be."""
    try:
        _make_cache(root)
        fh = open(dest + ".lock", "w")  # noqa: SIM115 - closed below, after the lock is let go
    except OSError as exc:
        raise _unusable_cache(root, exc) from exc
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
