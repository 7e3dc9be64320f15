"""Login sessions: a cookie holding the user name, an expiry and a random session id, signed with a
key kept on disk (so sessions survive a restart of the studio) and with the user's stored password
hash (so a new password, or a user removed from the users file, ends every session they had).
Signing out ends the session on the server too: its id is kept among the ended ones (on disk,
beside the key, until it would have expired), so a copy of the cookie taken before is refused.
Nothing else identifies a user: not a campaign id, a path or a URL."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

COOKIE = "heygem_studio_session"
#: how long a login lasts, seconds
LIFETIME = 12 * 3600
#: a browser a user signed in from: its tries as that user are not slowed by the failures others
#: made as them (`LoginGuard`'s name-wide delay), so no one can keep a user out by failing as them
DEVICE_COOKIE = "heygem_studio_device"
#: how long a browser stays known after its last sign-in, seconds
DEVICE_LIFETIME = 90 * 86400
KEY_BYTES = 32
#: ended sessions kept one by one per user; past that, all of theirs until then end at once
ENDED_PER_USER = 50


class SessionKeyError(RuntimeError):
    """The session key file cannot be trusted (too short, readable by others)."""


def load_key(path: str) -> bytes:
    """The signing key at `path`; made (readable by its owner only, never overwritten) when it
    does not exist. A key file that is short, unreadable or readable by others stops the studio:
    a weak key would let anyone forge a login."""
    file = Path(os.path.expanduser(path))
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES).hex())
    if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SessionKeyError(f"{file} is readable by other users: chmod 600 it (or remove it to make a new key)")
    try:
        key = bytes.fromhex(file.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise SessionKeyError(f"{file} does not hold a {KEY_BYTES}-byte key: remove it to make a new one")
    return key


class Sessions:
    """Issues and checks session cookies; `ended_file`: where ended sessions are kept across restarts
    (None: in memory only)."""

    def __init__(self, key: bytes, ended_file: str | None = None):
        if len(key) < KEY_BYTES:
            raise SessionKeyError(f"a session key needs {KEY_BYTES} bytes")
        self._key = key
        self._ended_file = Path(os.path.expanduser(ended_file)) if ended_file else None
        self._lock = threading.Lock()
        #: session id -> (its user, when it would have expired); user -> sessions issued before this
        #: time are ended (what ENDED_PER_USER ended sessions of one user are folded into)
        self._ended, self._ended_before = self._load_ended()

    def issue(self, user: str, stored_hash: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + LIFETIME)
        body = f"{user}|{expires}|{secrets.token_hex(16)}"
        return f"{body}|{self._sign(body, stored_hash)}"

    def user(self, cookie: str | None, stored_hash_of: dict[str, str], now: float | None = None) -> str | None:
        """The user a cookie was issued to, if it is genuine, not expired, not signed out, and the user
        is still in the users file with the password they had then (`stored_hash_of`: name -> hash)."""
        session = self._session(cookie, stored_hash_of, now)
        return session[0] if session else None

    def end(self, cookie: str | None, stored_hash_of: dict[str, str], now: float | None = None) -> str | None:
        """Sign a session out: from now on its cookie, and every copy of it, is refused. Returns the
        user whose session it was (None: the cookie was no live session)."""
        session = self._session(cookie, stored_hash_of, now)
        if session is None:
            return None
        user, session_id, expires = session
        with self._lock:
            now_s = int(now or time.time())
            self._ended = {sid: (u, until) for sid, (u, until) in self._ended.items() if until >= now_s}
            self._ended_before = {u: t for u, t in self._ended_before.items() if t + LIFETIME >= now_s}
            self._ended[session_id] = (user, expires)
            mine = [sid for sid, (u, _) in self._ended.items() if u == user]
            if len(mine) > ENDED_PER_USER:  # the file stays small however often one user signs in and out
                for sid in mine:
                    del self._ended[sid]
                self._ended_before[user] = now_s + 1  # this one too, and every other of theirs until now
            self._save_ended()
        return user

    def device(self, user: str, stored_hash: str, now: float | None = None) -> str:
        """The cookie that makes this browser known as one `user` signed in from (`DEVICE_COOKIE`),
        signed with their password hash as sessions are: a new password forgets every browser (one
        whose cookie was copied with the password that leaked)."""
        body = f"{user}|{int((now or time.time()) + DEVICE_LIFETIME)}"
        return f"{body}|{self._sign('device|' + body, stored_hash)}"

    def known_device(
        self, cookie: str | None, user: str, stored_hash_of: dict[str, str], now: float | None = None
    ) -> bool:
        """Whether `cookie` is a genuine, unexpired `device` cookie of `user`'s, of their password now."""
        if not cookie or cookie.count("|") != 2 or user not in stored_hash_of:
            return False
        name, expires, signature = cookie.split("|")
        expected = self._sign(f"device|{name}|{expires}", stored_hash_of[user])
        return (
            hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode())
            and name == user
            and expires.isdigit()
            and int(expires) >= (now or time.time())
        )

    def _session(
        self, cookie: str | None, stored_hash_of: dict[str, str], now: float | None
    ) -> tuple[str, str, int] | None:
        if not cookie or cookie.count("|") != 3:
            return None
        user, expires, session_id, signature = cookie.split("|")
        stored = stored_hash_of.get(user)
        if stored is None:
            return None
        expected = self._sign(f"{user}|{expires}|{session_id}", stored)
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
            return None
        if not expires.isdigit() or int(expires) < (now or time.time()) or session_id in self._ended:
            return None
        if int(expires) - LIFETIME < self._ended_before.get(user, 0):
            return None
        return user, session_id, int(expires)

    def _sign(self, body: str, stored_hash: str) -> str:
        return hmac.new(self._key, f"{body}|{stored_hash}".encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    def _load_ended(self) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
        if self._ended_file is None:
            return {}, {}
        try:
            data = json.loads(self._ended_file.read_text())
            ended = {str(sid): (str(user), int(until)) for sid, (user, until) in data["sessions"].items()}
            before = {str(user): int(t) for user, t in data["users"].items()}
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:  # signed-out sessions stay out
            raise SessionKeyError(
                f"{self._ended_file} cannot be read ({exc!r}): remove it and the key file (every user signs in again)"
            ) from None
        now = time.time()
        return (
            {sid: entry for sid, entry in ended.items() if entry[1] >= now},
            {user: t for user, t in before.items() if t + LIFETIME >= now},
        )

    def _save_ended(self) -> None:
        """Written whole, flushed to the disk, then renamed over the old file: a crash leaves the old
        list or the new one."""
        if self._ended_file is None:
            return
        fd, temporary = tempfile.mkstemp(prefix=f".{self._ended_file.name}.", dir=self._ended_file.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"sessions": self._ended, "users": self._ended_before}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, self._ended_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


#: how long a page (a Gradio session) stays its user's after its last request: an open page asks
#: every few seconds (its refresh timer), so only a page long closed is forgotten
PAGE_IDLE_SECONDS = 24 * 3600.0
#: pages remembered at most, the least recently used forgotten first
MOST_PAGES = 100_000


class PageOwners:
    """Which user each page is: the first signed-in user to name its Gradio session hash (made by
    the page's script). Gradio serves a session to anyone signed in who names it: another user who
    learnt a page's hash (a proxy's log of `/heartbeat/<hash>` or `?session_hash=`) read that
    page's event results, and through a deep link its state."""

    def __init__(self, idle: float = PAGE_IDLE_SECONDS, most: int = MOST_PAGES):
        self.idle, self.most = idle, most
        self._lock = threading.Lock()
        self._pages: OrderedDict[str, tuple[str, float]] = OrderedDict()  # hash -> (user, last seen)

    def owner(self, page: str) -> str | None:
        """The user the page is, while it is remembered."""
        with self._lock:
            owner = self._pages.get(page)
        return owner[0] if owner is not None else None

    def allows(self, page: str, user: str) -> bool:
        """Whether `user` may use the page `page`: it is theirs, or no one's yet (then theirs)."""
        now = time.monotonic()
        with self._lock:
            owner = self._pages.get(page)
            if owner is not None and owner[0] != user and owner[1] > now - self.idle:
                return False
            self._pages[page] = (user, now)
            self._pages.move_to_end(page)
            while len(self._pages) > self.most or next(iter(self._pages.values()))[1] <= now - self.idle:
                self._pages.popitem(last=False)
            return True
