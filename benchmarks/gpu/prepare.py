"""Download the wheels the GPU node lacks (run here, with network), and check they fit the device
tool's carry limit together with the repository.

    python -m benchmarks.gpu.prepare [--dest benchmarks/gpu/wheels] [--sizes-only]

Wheels are for the node's interpreter (CPython 3.12, manylinux x86_64), pinned to the versions
installed in this environment (what this checkout's tests ran), downloaded with
`pip download --no-deps --only-binary=:all:`. The device tool copies the working tree plus carried
paths, 64 MiB in all; this script fails when wheels + repository reach 60 MiB.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu.packages import CARRIED, Carried, normalize

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / "benchmarks" / "gpu" / "wheels"
MIB = 1024 * 1024
#: wheels + repository must stay under this (the tool carries 64 MiB; keep room for untracked files)
LIMIT_BYTES = 60 * MIB
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class Budget:
    wheels: dict[str, int]  # wheel file name -> bytes
    repo_bytes: int
    repo_files: int
    limit: int = LIMIT_BYTES

    @property
    def wheel_bytes(self) -> int:
        return sum(self.wheels.values())

    @property
    def total(self) -> int:
        return self.wheel_bytes + self.repo_bytes

    @property
    def fits(self) -> bool:
        return self.total < self.limit

    def table(self) -> str:
        lines = ["| wheel | MiB |", "|---|---:|"]
        lines += [f"| {name} | {size / MIB:.2f} |" for name, size in sorted(self.wheels.items())]
        lines += [
            f"| **wheels** ({len(self.wheels)}) | {self.wheel_bytes / MIB:.2f} |",
            f"| repository ({self.repo_files} files: tracked + untracked, not ignored) | {self.repo_bytes / MIB:.2f} |",
            f"| **total** (limit {self.limit / MIB:.0f}) | {self.total / MIB:.2f} |",
        ]
        return "\n".join(lines)


def sum_sizes(paths: Iterable[Path]) -> int:
    """Bytes of the files that exist (a file listed by git but deleted in the tree counts 0)."""
    return sum(p.stat().st_size for p in paths if p.is_file())


def repo_files(root: Path = ROOT, exclude: Path | None = None) -> list[Path]:
    """What the device tool copies: tracked files and untracked files git does not ignore,
    without anything under `exclude` (the wheel folder, counted separately)."""
    names = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    files = {root / n for n in names if n}
    if exclude is not None:
        files = {f for f in files if not f.resolve().is_relative_to(exclude.resolve())}
    return sorted(files)


def wheel_sizes(dest: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}


def budget(dest: Path, root: Path = ROOT) -> Budget:
    files = repo_files(root, exclude=dest)
    return Budget(wheel_sizes(dest), sum_sizes(files), len(files))


def is_ignored(path: Path, root: Path = ROOT) -> bool:
    """Whether git ignores the folder `path`, made or not (a "folder/" pattern matches a folder
    that exists, or a name asked about with its trailing slash)."""
    name = f"{path}/"
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=root).returncode == 0


def requirement(item: Carried) -> str:
    """'name==version' pinned to this environment, or the bare name when it is not installed here."""
    try:
        return f"{item.dist}=={importlib.metadata.version(item.dist)}"
    except importlib.metadata.PackageNotFoundError:
        return item.dist


def download_command(requirements: Sequence[str], dest: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + list(requirements)


def fetch(dest: Path) -> None:
    """Fill `dest` with exactly the carried wheels (older files there are removed first)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    subprocess.run(download_command([requirement(c) for c in CARRIED], dest), check=True)
    check_complete(dest)


def check_complete(dest: Path) -> None:
    """One wheel per carried distribution, nothing else."""
    found = {normalize(name.split("-")[0]) for name in wheel_sizes(dest)}
    wanted = {normalize(c.dist) for c in CARRIED}
    if found != wanted:
        raise RuntimeError(f"wheels in {dest}: missing {sorted(wanted - found)}, unexpected {sorted(found - wanted)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST, help="wheel folder (carried to the node)")
    parser.add_argument("--sizes-only", action="store_true", help="no download: only print the size accounting")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    if not args.sizes_only:
        fetch(dest)
    result = budget(dest)
    print(f"\nCarried wheels ({dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}):\n")
    print(result.table())
    if dest.is_relative_to(ROOT) and not is_ignored(dest):
        print(
            f"\nnote: {dest.relative_to(ROOT)} is not git-ignored: it would travel as untracked files "
            f"(and risk a commit); ignore it and pass it as a carry path instead."
        )
    verdict = "fits" if result.fits else "DOES NOT FIT"
    print(f"\n{verdict}: {result.total / MIB:.2f} MiB of {result.limit / MIB:.0f} MiB")
    try:  # without every wheel the node's run stops before its first step: a device start for nothing
        check_complete(dest)
    except RuntimeError as exc:
        print(f"\nnot ready: {exc}: run `python -m benchmarks.gpu.prepare` (without --sizes-only)")
        return 1
    return 0 if result.fits else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
