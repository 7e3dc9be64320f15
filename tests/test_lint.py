"""The lint and type gate, inside the README's test command: ruff (lint and format) over the whole
repository and mypy over the package, the job entry points and the infra checker, as configured in
pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command", [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("mypy",)], ids=" ".join
)
def test_the_repository_passes(command: tuple[str, ...]) -> None:
    proc = _run(*command)
    assert proc.returncode == 0, f"`{' '.join(command)}` found problems:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
