"""Scratch space a killed process left on its node (a stitch's whole output, a decoded narration)
is found by the process id in its name and removed once it has not changed for a while; what
live processes use, what changed lately and what is not ours stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from heygem_ray import scratch


def _killed_with_scratch(root: Path) -> tuple[str, str]:
    """A process that made a scratch folder (with a file in it) and a scratch file, then was
    SIGKILLed before it could remove them: their paths."""
    code = (
        "import os, signal, tempfile\n"
        f"tempfile.tempdir = {str(root)!r}\n"
        "from heygem_ray import scratch\n"
        "cm = scratch.folder('stitch'); folder = cm.__enter__()\n"
        "open(os.path.join(folder, 'out.mp4'), 'wb').write(b'x' * 1000)\n"
        "print(folder); print(scratch.file('pcm', '.f32'), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    folder, file = proc.stdout.split()
    return folder, file


def _age(path: str | Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [Path(path), *(Path(path).iterdir() if Path(path).is_dir() else [])]:
        os.utime(p, (then, then))


def test_a_killed_processs_scratch_goes_once_idle_and_nothing_else(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder, file = _killed_with_scratch(tmp_path)
    assert os.path.isfile(os.path.join(folder, "out.mp4")) and os.path.isfile(file)
    assert scratch.sweep() == 0  # just written: maybe another container's live process
    for path in (folder, file):
        _age(path, 7200)
    busy, busy_file = _killed_with_scratch(tmp_path)
    _age(busy, 7200)
    os.utime(os.path.join(busy, "out.mp4"))  # a file in it written lately: not idle
    other = tmp_path / "heygem-stitch-notapid-x"  # not a scratch name
    other.mkdir()
    _age(other, 7200)
    no_process = tmp_path / "heygem-seg-99999999999999999999-x"  # no process has that number: left
    no_process.write_bytes(b"")
    _age(no_process, 7200)
    with scratch.folder("seg") as mine:  # this process's own, however old
        assert Path(mine).parent == tmp_path and f"-{os.getpid()}-" in mine
        _age(mine, 7200)
        assert scratch.sweep() == 2  # the killed process's idle folder and file
        assert not os.path.exists(folder) and not os.path.exists(file)
        assert os.path.exists(busy) and os.path.exists(busy_file) and other.exists() and os.path.exists(mine)
        assert no_process.exists()
    assert not os.path.exists(mine)
