"""Login sessions: a cookie holding the user name, an expiry and a random session id, signed with a
key kept on disk (so sessions survive a restart of the studio) and with the user's stored password
hash (so a new password, or a user removed from the users file, ends every session they had).
Signing out ends the session on the server too: its id is kept among the ended ones (on disk,
beside the key, until it would have expired), so a copy of the cookie taken before is refused.
Nothing else identifies a user: not a campaign id, a path or a URL."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
from pathlib import Path

COOKIE = "heygem_studio_session"
#: how long a login lasts, seconds
LIFETIME = 12 * 3600
KEY_BYTES = 32


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
        self._ended: dict[str, int] = self._load_ended()  # session id -> when it would have expired

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
            now_s = now or time.time()
            self._ended = {sid: until for sid, until in self._ended.items() if until >= now_s}
            self._ended[session_id] = expires
            self._save_ended()
        return user

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
        return user, session_id, int(expires)

    def _sign(self, body: str, stored_hash: str) -> str:
        return hmac.new(self._key, f"{body}|{stored_hash}".encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    def _load_ended(self) -> dict[str, int]:
        if self._ended_file is None:
            return {}
        try:
            ended = {str(sid): int(until) for sid, until in json.loads(self._ended_file.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # a signed-out session must stay out
            raise SessionKeyError(f"{self._ended_file} cannot be read ({exc}): remove it with the key file") from None
        return {sid: until for sid, until in ended.items() if until >= time.time()}

    def _save_ended(self) -> None:
        if self._ended_file is None:
            return
        temporary = self._ended_file.with_name(f".{self._ended_file.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self._ended, fh)
        os.replace(temporary, self._ended_file)
