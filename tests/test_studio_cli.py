"""`heygem-ray studio adduser` and the studio's refusal to listen beyond 127.0.0.1 without users."""

from __future__ import annotations

import os
import subprocess
import sys

from heygem_ray.studio.users import authenticate


def _studio(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heygem_ray.cli", "studio", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=120,
    )


def test_adduser_writes_a_user_who_can_log_in(tmp_path):
    users = tmp_path / "users.toml"
    out = _studio("adduser", "alice", "--auth", str(users), "--password-stdin", stdin="pw-of-alice\n")
    assert out.returncode == 0, out.stderr
    assert authenticate(users, "alice", "pw-of-alice") and "pw-of-alice" not in users.read_text()
    out = _studio("adduser", "../bob", "--auth", str(users), "--password-stdin", stdin="x\n")
    assert out.returncode == 2 and "user name" in out.stderr


def test_adduser_takes_the_file_from_studio_auth(tmp_path):
    users = tmp_path / "from-config.toml"
    out = _studio("adduser", "carol", f"studio.auth={users}", "--password-stdin", stdin="pw\n")
    assert out.returncode == 0, out.stderr
    assert authenticate(users, "carol", "pw")


def test_without_users_the_studio_refuses_to_listen_beyond_loopback(tmp_path):
    out = _studio("studio.host=0.0.0.0", f"studio.store={tmp_path}/store", f"studio.log_file={tmp_path}/log")
    assert out.returncode == 2
    assert "studio.host=0.0.0.0 needs studio.auth" in out.stderr


def test_a_studio_typo_exits_2_naming_it():
    out = _studio("studio.prot=8080")
    assert out.returncode == 2 and "studio.prot" in out.stderr
