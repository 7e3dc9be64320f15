"""The studio's users: a TOML file of names and salted password hashes (scrypt, from the standard
library), written by `heygem-ray studio adduser NAME` and read by the studio at each login.

    [users.alice]
    password = "scrypt$16384$8$1$<salt hex>$<hash hex>"
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
import tomllib
from pathlib import Path

#: what a user name may be: it names the user's folder in the store, so nothing that could climb out
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_N, _R, _P = 2**14, 8, 1  # scrypt's cost: ~50 ms and 16 MiB a check


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"user name {name!r}: lower-case letters, digits, '_', '.', '-' (up to 63)")
    return name


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def read_users(path: str | Path) -> dict[str, str]:
    """name -> stored hash; an absent file has no users."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    return {check_name(name): entry["password"] for name, entry in data.get("users", {}).items()}


def add_user(path: str | Path, name: str, password: str) -> None:
    """Add a user or change one's password (the file is rewritten whole, readable by its owner only)."""
    if not password:
        raise ValueError("an empty password is not allowed")
    users = read_users(path)
    users[check_name(name)] = hash_password(password)
    text = "".join(f'[users."{n}"]\npassword = "{h}"\n\n' for n, h in sorted(users.items()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on the disk before its name: a crash must not leave an empty user file
    os.replace(tmp, path)


def authenticate(path: str | Path, name: str, password: str) -> bool:
    stored = read_users(path).get(name)
    if stored is None:
        hash_password(password)  # as slow as a real check: the time says nothing about which names exist
        return False
    return password_matches(password, stored)


class UsersFile:
    """The users file, read again whenever it changes on disk (so `adduser` and removals apply to a
    running studio, and sessions of removed users end)."""

    def __init__(self, path: str | Path):
        self.path = Path(os.path.expanduser(str(path)))
        self._seen: tuple[float, int] | None = None
        self._hashes: dict[str, str] = {}
        self._read_once = False
        self._lock = threading.Lock()

    def hashes(self) -> dict[str, str]:
        try:
            st = self.path.stat()
            seen = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                try:
                    self._hashes = read_users(self.path)
                except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
                    if not self._read_once:  # never read yet: nothing to keep (the studio checks it at start)
                        raise
                    # an edit that broke it must not refuse every request, sign-ins included
                    logging.getLogger("heygem_ray.studio").error(
                        "users file %s cannot be read (%s: %s): keeping the users it had; fix it",
                        self.path,
                        type(exc).__name__,
                        exc,
                    )
                self._seen, self._read_once = seen, True
            return self._hashes


class LoginGuard:
    """Slows down password guessing: at most `parallel` password checks at once (each costs ~50 ms
    and 16 MiB of scrypt), and after `free` failures from a client address (for any name, or for
    one name), each further try waits out a delay that doubles, up to `longest` seconds. A name
    tried from many addresses slows down only after `name_free` failures: with `free` alone,
    anyone could keep a user from signing in by failing five times as them now and then (and a
    browser the user signed in from, `Sessions.known_device`, is not slowed by the name's at all).

    A right password clears the failures of its name, not its address's: else anyone with an
    account could guess four times at other names, sign in as themselves, and go on unslowed. An
    address's failures are forgotten an hour after its last (an office behind one address is not
    slowed for ever by its typos). IPv6 clients count by their /64, which one host commonly has."""

    #: failures a key holds are forgotten this long after its last one
    FORGET_SECONDS = 3600.0
    #: keys kept at most: at the guard's pace (`parallel` checks of ~50 ms, three keys a try) a flood
    #: of new addresses takes longer than `longest` to push out the oldest, so no key is dropped
    #: while its delay still holds
    MAX_KEYS = 100_000

    def __init__(self, parallel: int = 4, free: int = 5, longest: float = 300.0, name_free: int = 50):
        self._checks = threading.BoundedSemaphore(parallel)
        self._failures: dict[tuple[str, ...], tuple[int, float]] = {}  # key -> (failures, last failure time)
        self.free, self.longest, self.name_free = free, longest, name_free
        self._lock = threading.Lock()

    @staticmethod
    def keys(name: str, client: str) -> tuple[tuple[str, ...], ...]:
        """What a try from `client` as `name` counts against (tuples: no name can pass for another
        key, as "alice@10.0.0.5" could in a joined string)."""
        client = _client_group(client)
        return ("client", client), ("name at client", name, client), ("name", name)

    def wait_seconds(self, *keys: tuple[str, ...]) -> float:
        """How long these keys must still wait before another try (0 = may try now)."""
        with self._lock:
            return self._wait(time.time(), keys)

    def _wait(self, now: float, keys: tuple[tuple[str, ...], ...]) -> float:
        waits = []
        for key in keys:
            count, last = self._failures.get(key, (0, 0.0))
            free = self.name_free if key[0] == "name" else self.free
            if count >= free and now - last < self.FORGET_SECONDS:
                waits.append(min(self.longest, 2.0 ** (count - free)) - (now - last))
        return max([0.0, *waits])

    def begin(self, *keys: tuple[str, ...]) -> float:
        """Start a try: how long it must wait first (it is not started then), else 0, and the try
        counts as a failure until `check` says it succeeded. Counted before the check, so tries
        sent all at once (each waits for a check slot) cannot all get past the limit."""
        now = time.time()
        with self._lock:
            wait = self._wait(now, keys)
            if wait > 0:
                return wait
            for key in keys:
                count, last = self._failures.pop(key, (0, 0.0))
                count = 0 if now - last >= self.FORGET_SECONDS else count
                self._failures[key] = (count + 1, now)  # most recent last
            while len(self._failures) > self.MAX_KEYS:  # forget the oldest: memory stays bounded
                del self._failures[next(iter(self._failures))]
        return 0.0

    def check(self, users: UsersFile, name: str, password: str, *keys: tuple[str, ...]) -> bool:
        """The password check of a try `begin` started; a right one clears the keys' failures."""
        with self._checks:
            stored = users.hashes().get(name)
            if stored is None:
                hash_password(password)  # as slow as a real check: the time says nothing about which names exist
                ok = False
            else:
                ok = password_matches(password, stored)
        if ok:
            with self._lock:
                for key in keys:
                    count, last = self._failures.pop(key, (0, 0.0))
                    if key[0] == "client" and count > 1:  # this try is no failure; the address's others stand
                        self._failures[key] = (count - 1, last)
        return ok


def _client_group(client: str) -> str:
    """What an address counts as: an IPv6 address its /64, any other as it is."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:10.0.0.1, as a dual-stack server may see 10.0.0.1
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


#: the kernel's tables of TCP sockets (Linux), with each socket's owner
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


#: `loopback_peer_uid` of a connection the tables do not hold (made on another host, or named by
#: a proxy's header): no account of this host's
NOBODY = -1


def loopback_peer_uid(client: tuple[str, int] | None, server: tuple[str, int] | None) -> int | None:
    """The user id owning the other end of a TCP connection from `client` to `server` made on this
    host (the kernel's socket tables), NOBODY where they hold none such; None where that cannot be
    told (not Linux, not addresses)."""
    if client is None or server is None:
        return None
    try:
        ends = (_address(client[0]), int(client[1])), (_address(server[0]), int(server[1]))
    except ValueError:
        return None
    # only this connection's ports parsed: a busy host's tables have thousands of lines, read
    # for every request
    ports = f":{ends[0][1]:04X}", f":{ends[1][1]:04X}"
    read = False
    for table in _TCP_TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            matched = len(fields) > 7 and fields[1].endswith(ports[0]) and fields[2].endswith(ports[1])
            if matched and (_end(fields[1]), _end(fields[2])) == ends:
                return int(fields[7])
    return NOBODY if read else None


def _end(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An "ADDR:PORT" of the kernel's table: the address in 32-bit words of host byte order."""
    address, port = field.split(":")
    raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
    return _address(str(ipaddress.ip_address(raw))), int(port, 16)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address, an IPv4 one mapped into IPv6 taken as itself."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
