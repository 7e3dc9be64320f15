"""Login sessions: a cookie holding the user name and an expiry, signed with a key kept on disk
(so sessions survive a restart of the studio). Nothing else identifies a user: not a campaign id,
a path or a URL."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

COOKIE = "heygem_studio_session"
#: how long a login lasts, seconds
LIFETIME = 12 * 3600


def load_key(path: str) -> bytes:
    """The signing key at `path`, made (readable by its owner only) when missing."""
    file = Path(os.path.expanduser(path))
    try:
        return bytes.fromhex(file.read_text().strip())
    except (FileNotFoundError, ValueError):
        file.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex())
        return key


class Sessions:
    def __init__(self, key: bytes):
        self._key = key

    def issue(self, user: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + LIFETIME)
        body = f"{user}|{expires}"
        return f"{body}|{self._sign(body)}"

    def user(self, cookie: str | None, now: float | None = None) -> str | None:
        """The user a cookie was issued to, if it is genuine and not expired."""
        if not cookie or cookie.count("|") != 2:
            return None
        user, expires, signature = cookie.split("|")
        if not hmac.compare_digest(signature, self._sign(f"{user}|{expires}")):
            return None
        if not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        return user

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
