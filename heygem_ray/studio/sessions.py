"""Login sessions: a cookie holding the user name and an expiry, signed with a key kept on disk
(so sessions survive a restart of the studio) and with the user's stored password hash (so a new
password, or a user removed from the users file, ends every session they had). Nothing else
identifies a user: not a campaign id, a path or a URL."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
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
    def __init__(self, key: bytes):
        if len(key) < KEY_BYTES:
            raise SessionKeyError(f"a session key needs {KEY_BYTES} bytes")
        self._key = key

    def issue(self, user: str, stored_hash: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + LIFETIME)
        body = f"{user}|{expires}"
        return f"{body}|{self._sign(body, stored_hash)}"

    def user(self, cookie: str | None, stored_hash_of: dict[str, str], now: float | None = None) -> str | None:
        """The user a cookie was issued to, if it is genuine, not expired, and the user is still
        in the users file with the password they had then (`stored_hash_of`: name -> hash)."""
        if not cookie or cookie.count("|") != 2:
            return None
        user, expires, signature = cookie.split("|")
        stored = stored_hash_of.get(user)
        if stored is None:
            return None
        expected = self._sign(f"{user}|{expires}", stored)
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
            return None
        if not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        return user

    def _sign(self, body: str, stored_hash: str) -> str:
        return hmac.new(self._key, f"{body}|{stored_hash}".encode("utf-8", "replace"), hashlib.sha256).hexdigest()
