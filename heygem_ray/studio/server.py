"""`heygem-ray studio`: start the web front end on a cluster (the given one, or a local Ray head that
outlives the studio), and `heygem-ray studio adduser NAME`."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

from heygem_ray import storage
from heygem_ray.config import StudioConfig
from heygem_ray.studio.cluster import Cluster, ClusterUnavailable, local_head
from heygem_ray.studio.service import CACHE_SWEEP_SECONDS, UPLOAD_WINDOW_SECONDS, Studio
from heygem_ray.studio.sessions import SessionKeyError, Sessions, load_key
from heygem_ray.studio.users import UsersFile, add_user

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: seconds a stopping studio lets requests in flight finish: an upload still arriving over a slow
#: line (or a zip download) would otherwise hold the stop until the supervisor kills it
STOP_GRACE_SECONDS = 10
#: seconds a stopping studio then waits for the Renders being saved (their pages were told so): a
#: supervisor's stop timeout must allow both (systemd's default is 90 s, Docker's 10: `-t 60`)
STOP_SAVE_SECONDS = 40


def studio_log(path: str) -> logging.Logger:
    """One line per upload, submit, finish, failure, cancel, download: for `tail -f`."""
    log = logging.getLogger("heygem_ray.studio")
    log.setLevel(logging.INFO)
    file = os.path.expanduser(path)
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(file) for h in log.handlers):
        handler = logging.FileHandler(file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
        log.addHandler(handler)
    return log


def connect(cfg: StudioConfig) -> tuple[Cluster, str]:
    """The cluster campaigns go to, and a line for the operator about it."""
    if cfg.ray_address:
        address = cfg.ray_address if "://" in cfg.ray_address else f"http://{cfg.ray_address}"
        host = urlsplit(address).hostname or ""
        return Cluster(
            cfg.ray_address, local=host in LOOPBACK
        ), f"campaigns run on the Ray cluster at {storage.display(cfg.ray_address)}"
    address, started = local_head(cfg.dashboard_port)
    how = "started a local Ray head" if started else "using the local Ray head already running"
    about = f"{how} ({address}, dashboard included); it keeps running when the studio stops, so campaigns go on: "
    return Cluster(address, local=True), about + "`ray stop` ends it"


def private_upload_cache(
    cache: str = "~/.heygem_ray/uploads", expire: float = UPLOAD_WINDOW_SECONDS, keep_out: Iterable[str] = ()
) -> str:
    """Gradio's upload cache in a folder only this account can open (its default, /tmp/gradio, is
    open to every account on the host): a GRADIO_TEMP_DIR set for Gradio when it is such a folder
    (on a larger disk, say), else `cache`; emptied of the uploads an earlier studio left older
    than `expire` seconds (Gradio empties only what it uploaded itself). Returns the folder.
    None of the local paths `keep_out` (the store, the session key, the users file) may be in it:
    Gradio serves that folder to every signed-in user, and what is old there is removed. Raises
    ValueError when `cache` itself holds one of them."""
    cache = os.path.expanduser(cache)
    inside = [p for p in keep_out if _within(os.path.expanduser(p), cache)]
    if inside:
        raise ValueError(f"the upload cache {cache} holds {inside[0]}: every signed-in user could read it")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    os.chmod(cache, 0o700)
    given = os.environ.get("GRADIO_TEMP_DIR")
    if given and os.path.realpath(given) != os.path.realpath(cache):
        st = os.stat(given) if os.path.isdir(given) else None
        holds = [p for p in keep_out if _within(os.path.expanduser(p), given)]
        if st is not None and st.st_uid == os.getuid() and not st.st_mode & 0o077 and not holds:
            cache = given  # private, the operator's own, and holding nothing of the studio's
        else:
            why = f"it holds {holds[0]}" if holds else "not a folder only this account can open"
            logging.getLogger("heygem_ray.studio").warning(
                "GRADIO_TEMP_DIR=%s is not used (%s): uploads wait in %s", given, why, cache
            )
    os.environ["GRADIO_TEMP_DIR"] = cache
    sweep_uploads(cache, expire)
    return cache


def sweep_uploads(cache: str, expire: float, held: Callable[[], set[str]] = set) -> int:
    """Remove the files in the upload cache last written over `expire` seconds ago, and the folders
    that held only those (or were left empty as long): what an earlier studio left, and uploads cut
    off mid-transfer (a refreshed page, a dropped line), which Gradio never lists to sweep and
    which would stay until a restart, outside every quota. A file still arriving is being written,
    so it is never that old; a folder Gradio just made for one is kept; so is a file `held`
    names (real paths: a Render waiting its turn, `Studio.held`). Returns the files removed."""
    now, removed, keep = time.time(), 0, held()
    for folder, _, names in os.walk(cache, topdown=False):
        try:
            old_folder = now - os.path.getmtime(folder) > expire
        except OSError:
            continue
        emptied = False
        for name in names:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(path) > expire and os.path.realpath(path) not in keep:
                    os.remove(path)
                    removed, emptied = removed + 1, True
        if folder != cache and (old_folder or emptied):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
    return removed


def forget_removed(listed: Iterable[set[str]], missing_before: set[str]) -> set[str]:
    """Leave Gradio's lists of the files it holds (`Blocks.temp_file_sets`) without those removed
    (taken by a campaign, swept): Gradio drops only what it removed itself, and its lists grew with
    every upload until a restart. A path goes once missing at two sweeps, as Gradio lists an upload a
    moment before moving its file in. Returns the paths missing now, for the next sweep."""
    missing: set[str] = set()
    for files in listed:
        # a copy, never the set itself, is walked: the server adds uploads to it meanwhile
        missing.update(path for path in list(files) if not os.path.exists(path))
        files.difference_update(missing & missing_before)
    return missing


def _sweeping(cache: str, listed: list[set[str]], held: Callable[[], set[str]]) -> None:
    missing: set[str] = set()
    while True:
        time.sleep(CACHE_SWEEP_SECONDS)
        with contextlib.suppress(Exception):  # a sweep that fails is tried again at the next
            sweep_uploads(cache, UPLOAD_WINDOW_SECONDS, held)
            missing = forget_removed(listed, missing)


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _private_store(root: str) -> None:
    """A local store made now is the studio's account's alone (every user's uploads and videos are
    in it, and files are created readable by all under the usual umask); one that other accounts
    on this host may enter is left as it is (a cluster's workers may run as another account), with
    a warning."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    if os.stat(root).st_mode & 0o077:
        print(
            f"heygem-ray studio: warning: the store {root} may be entered by other accounts on this host, "
            "which can then read every user's uploads and videos: `chmod 700` it unless the cluster's "
            "workers run as another account",
            file=sys.stderr,
        )


def serve(cfg: StudioConfig) -> int:
    studio_files = [storage.local_path(p) for p in (cfg.store, cfg.session_key, cfg.auth) if p and storage.is_local(p)]
    try:
        uploads = private_upload_cache(keep_out=studio_files)  # before Gradio and OpenCV read their settings
    except ValueError as exc:
        print(f"heygem-ray: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from heygem_ray.studio.app import build_app

    if cfg.auth is None and cfg.host not in LOOPBACK:
        print(
            f"heygem-ray: error: studio.host={cfg.host} needs studio.auth (a users file): without one the studio "
            "has a single user and listens on 127.0.0.1 only",
            file=sys.stderr,
        )
        return 2
    if cfg.auth is not None:  # a users file that cannot be read would refuse every request
        try:
            UsersFile(cfg.auth).hashes()
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            print(f"heygem-ray: error: studio.auth={cfg.auth}: cannot be read ({exc})", file=sys.stderr)
            return 2
    log = studio_log(cfg.log_file)
    if storage.is_local(cfg.store):
        _private_store(storage.local_path(cfg.store))
    try:
        cluster, about = connect(cfg)
    except (ClusterUnavailable, OSError, ValueError) as exc:  # ValueError: an address that is none
        print(f"heygem-ray: error: no Ray cluster for the studio: {exc}", file=sys.stderr)
        return 2
    try:
        sessions = Sessions(load_key(cfg.session_key), ended_file=f"{cfg.session_key}.ended")
    except (SessionKeyError, OSError) as exc:
        print(f"heygem-ray: error: studio.session_key: {exc}", file=sys.stderr)
        return 2
    studio = Studio(cfg, cluster, log)
    studio.watch()
    app = build_app(studio, cfg.auth, sessions)
    listed = app.state.gradio_pages.temp_file_sets
    threading.Thread(target=_sweeping, args=(uploads, listed, studio.held), name="upload-sweeper", daemon=True).start()
    print(f"heygem-ray studio: {about}")
    if cfg.auth is None:
        print("heygem-ray studio: no studio.auth: one local user, listening on 127.0.0.1 only")
    print(f"heygem-ray studio: store {storage.display(cfg.store)}; log {cfg.log_file}")
    print(f"heygem-ray studio: open http://{cfg.host}:{cfg.port}/")
    log.info("start store=%s cluster=%s", storage.display(cfg.store), cluster.shown)
    # uvicorn stops serving at SIGTERM, then sends itself the signal again: by default that ended
    # the process there, before the Renders being saved were waited for
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        uvicorn.run(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            timeout_graceful_shutdown=STOP_GRACE_SECONDS,
            # without users the connection's own end says who asks (`app._from_this_account`): a
            # loopback client's X-Forwarded-For would name a client no socket matches
            proxy_headers=cfg.auth is not None,
        )
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C, once uvicorn has stopped serving
        pass
    finally:
        try:
            left = studio.finish_saves(STOP_SAVE_SECONDS)
            log.info("stop saves_cut_short=%d", len(left))
        except KeyboardInterrupt:  # a second signal: stop now
            log.warning("stop: not waiting for the Renders being saved (a second signal)")
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def adduser_main(argv: Sequence[str], default_file: str | None) -> int:
    parser = argparse.ArgumentParser(
        prog="heygem-ray studio adduser", description="Add a studio user (or set a password)."
    )
    parser.add_argument("name")
    parser.add_argument("--auth", default=default_file, help="the users file (default: studio.auth, else users.toml)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args(list(argv))
    password = (
        sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass(f"password for {args.name}: ")
    )
    path = args.auth or "users.toml"
    try:
        add_user(path, args.name, password)
    except ValueError as exc:
        print(f"heygem-ray: error: {exc}", file=sys.stderr)
        return 2
    print(f"heygem-ray: user {args.name} saved in {path}")
    return 0
