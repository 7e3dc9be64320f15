"""The lint and type gate, inside the README's test command: ruff (lint and format) over the whole
repository and mypy over the package, the job entry points and the infra checker, as configured in
pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: checks started before their test runs (`start`): the process and the file it writes to
_started: dict[tuple[str, ...], tuple[subprocess.Popen[str], IO[str]]] = {}


def start(command: tuple[str, ...]) -> None:
    """Start a check now, for its test to take the result of: conftest starts mypy as the session's
    tests begin (a cold run is ~25 s of one core, which the suite, using about one of two cores on
    average, has to spare beside it)."""
    out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by the test that reads it (or stop_started)
    proc = subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    _started[command] = (proc, out)


def stop_started() -> None:
    """Stop checks whose test did not run (a session stopped early)."""
    while _started:
        proc, out = _started.popitem()[1]
        proc.kill()
        proc.wait()
        out.close()


def _run(command: tuple[str, ...]) -> tuple[int, str]:
    if command not in _started:
        proc = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout[-4000:] + proc.stderr[-2000:]
    started, out = _started.pop(command)
    with out:
        returncode = started.wait(timeout=600)
        out.seek(0)
        return returncode, out.read()[-6000:]


@pytest.mark.parametrize(
    "command", [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("mypy",)], ids=" ".join
)
def test_the_repository_passes(command: tuple[str, ...]) -> None:
    returncode, output = _run(command)
    assert returncode == 0, f"`{' '.join(command)}` found problems:\n{output}"
