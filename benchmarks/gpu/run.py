"""The GPU node check: the one command to run on a lent GPU node, and its CPU dry run here.

    bash benchmarks/gpu/run.sh [--only STEP ...] [--budget S]      # on the node (see README.md)
    python -m benchmarks.gpu.run --dry-run [--out DIR]              # here: every step, tiny, on the CPU

On the node it installs the carried wheels (`--wheels`: `pip install --no-index --no-deps --target`,
or plain unzipping where the interpreter has no pip) into a temporary folder put first on
PYTHONPATH, then runs the steps in order of value, each in its own process group with its own time
budget, the whole capped at `--budget` (540 s): a step that overruns is killed and recorded, and
the next one runs. OUT (the folder the device tool returns, at most eight files) gets four:
summary.md (markdown for benchmarks/RESULTS.md), results.json (every step's record: checks and
figures), log.txt (every step's output) and node_thumbnail.jpg (a frame of the rendered video),
rewritten after each step. Standard library only: this runs before any wheel is installed.

The dry run uses this environment as it is (no wheels) with imports restricted to what the node
will have (benchmarks/gpu/packages.py), so a missing wheel or a new `import ray` fails here first.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.gpu.packages import CARRIED, normalize

ROOT = Path(__file__).resolve().parents[2]
TOTAL_BUDGET = 540.0  # 9 minutes: the device tool allows 10 per command
_RESERVE = 8.0  # seconds kept for the summary after the last step
_KILL_GRACE = 3.0


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    what: str
    budget: float  # seconds on the node
    args: tuple[str, ...] = ()
    dry_args: tuple[str, ...] | None = ()  # None: skipped in a dry run
    dry_budget: float = 120.0


def _bench(
    name: str, module: str, args: tuple[str, ...], dry_args: tuple[str, ...] | None
) -> tuple[tuple, tuple | None]:
    """The bench wrapper's arguments for running `module` with `args` (or `dry_args`)."""
    head = ("--name", name, module)
    return head + args, None if dry_args is None else head + dry_args


_E2E = _bench(
    "bench_wav2lip_e2e",
    "benchmarks.bench_wav2lip",
    ("--skip-net", "--seconds", "1", "--e2e-batches", "128"),
    ("--skip-net", "--seconds", "0.05", "--e2e-batches", "2", "--boxes", "fixed"),
)
_NET = _bench(
    "bench_wav2lip_net",
    "benchmarks.bench_wav2lip",
    ("--skip-e2e", "--seconds", "1", "--batches", "32", "128"),
    ("--skip-e2e", "--seconds", "0.05", "--batches", "1", "2"),
)
# S3FD at 1080p without downscaling takes ~25 s a frame on a 2-core CPU: no dry run
_S3FD = _bench("bench_s3fd", "benchmarks.bench_s3fd", ("--frames", "4"), None)

STEPS: tuple[Step, ...] = (
    Step("env", "benchmarks.gpu.env", "(a) environment facts", 45),
    Step("correctness", "benchmarks.gpu.correctness", "(b) CUDA numbers vs the CPU references", 75),
    Step("node", "benchmarks.gpu.node", "(c) one node, 3-min 1080p Wav2Lip to a finished mp4, no Ray", 210),
    Step("bench_wav2lip_e2e", "benchmarks.gpu.bench", "(d) Wav2LipRenderer.render on 1080p frames", 50, *_E2E),
    Step("bench_wav2lip_net", "benchmarks.gpu.bench", "(d) Wav2Lip generator alone, eager and compiled", 90, *_NET),
    Step("bench_s3fd", "benchmarks.gpu.bench", "(e) S3FD detector speed", 60, *_S3FD),
)


# --------------------------------------------------------------------------------------- wheels
def install_wheels(wheels: Path, target: Path) -> dict[str, Any]:
    """Install the carried wheels into `target` without network or dependency resolution: pip when
    the interpreter has it, else (or when pip fails) by unzipping them. Never raises: the steps
    then show what is missing."""
    files = sorted(wheels.glob("*.whl"))
    found = {normalize(f.name.split("-")[0]) for f in files}
    missing = sorted(normalize(c.dist) for c in CARRIED if normalize(c.dist) not in found)
    start = time.monotonic()
    target.mkdir(parents=True, exist_ok=True)
    method, log = "none (no wheels found)", ""
    if files and importlib.util.find_spec("pip") is not None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--target",
                str(target),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
        )
        method, log = ("pip", "") if proc.returncode == 0 else ("pip failed", (proc.stdout + proc.stderr)[-2000:])
    if files and method != "pip":  # a venv made without pip: a wheel is a zip laid out for site-packages
        try:
            for wheel in files:
                unpack_wheel(wheel, target)
            method = "unzip" if method.startswith("none") else f"{method}, then unzip"
        except (OSError, zipfile.BadZipFile) as exc:
            method, log = f"{method}, unzip failed", f"{log}\n{exc!r}"
    return {
        "method": method,
        "wheels": [f.name for f in files],
        "missing": missing,
        "target": str(target),
        "seconds": round(time.monotonic() - start, 2),
        "log": log,
    }


def unpack_wheel(wheel: Path, target: Path) -> None:
    """What `pip install --target` does for our wheels: the archive into `target`, with the
    `<name>.data/purelib|platlib` trees merged in (scripts and headers are not needed)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            tree = data / kind
            if tree.is_dir():
                shutil.copytree(tree, target, dirs_exist_ok=True)
        shutil.rmtree(data)


# --------------------------------------------------------------------------------------- steps
def step_command(step: Step, out: Path, budget: float, dry: bool, more: Sequence[str] = ()) -> list[str]:
    common = ["--out", str(out), "--budget", f"{budget:.0f}", *(["--dry-run"] if dry else [])]
    return [sys.executable, "-m", step.module, *common, *((step.dry_args or ()) if dry else step.args), *more]


def run_step(
    step: Step, out: Path, budget: float, env: dict[str, str], dry: bool, more: Sequence[str] = ()
) -> dict[str, Any]:
    """Run one step in its own process group; kill the group when it overruns `budget`."""
    result_file, log_file = out / f"{step.name}.json", out / f"{step.name}.log"
    result_file.unlink(missing_ok=True)
    (out / f"{step.name}.partial.json").unlink(missing_ok=True)
    print(f"\n=== {step.name}: {step.what} (budget {budget:.0f} s) ===", flush=True)
    start = time.monotonic()
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            step_command(step, out, budget, dry, more),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
        pump.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _kill_group(proc)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers (worker processes) must not load the next step
        pump.join(timeout=5)
    seconds = round(time.monotonic() - start, 1)
    partial = _read_json(out / f"{step.name}.partial.json") or {}
    record = _read_json(result_file) or {
        "step": step.name,
        "status": "timeout" if timed_out else "error",
        "checks": [],
        "figures": partial,
        "error": f"killed after its {budget:.0f} s budget" if timed_out else f"exited with {rc} without a result",
        "markdown": (
            "Figures it had written:\n\n```\n" + json.dumps(partial, indent=1)[:20_000] + "\n```\n\n" if partial else ""
        )
        + "Output before it ended:\n\n```\n"
        + _tail(log_file, 3000)
        + "\n```",
    }
    if timed_out:
        record["status"] = "timeout"
    record.update(rc=rc, wall_s=seconds, budget_s=round(budget, 1))
    _write_json(result_file, record)
    print(f"=== {step.name}: {record['status']} in {seconds} s ===", flush=True)
    return record


def _pump(stream: IO[str], log: IO[str]) -> None:
    """Echo a step's output as it comes (the device tool returns stdout's tail) and keep it."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM the step's process group (worker processes included), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _signal_group(proc.pid, sig):
            break
        try:
            return proc.wait(timeout=_KILL_GRACE)
        except subprocess.TimeoutExpired:
            continue
    try:  # a process stuck in the GPU driver outlives SIGKILL: the next steps must still run
        return proc.wait(timeout=_KILL_GRACE)
    except subprocess.TimeoutExpired:
        print(f"step process {proc.pid} outlived SIGKILL (stuck in the driver?): left behind", flush=True)
        return -9


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal the step's own process group (it was started in a session of its own); False when
    nothing is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def step_env(site: Path | None, scratch: Path, dry: bool) -> dict[str, str]:
    """The steps' environment: carried wheels first on the path, caches in the scratch folder."""
    env = dict(os.environ)
    paths = [str(site)] if site else []
    paths += [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HEYGEM_CACHE_DIR", str(scratch / "node-cache"))
    env.setdefault("MPLCONFIGDIR", str(scratch / "matplotlib"))
    if dry:
        env["HEYGEM_GPU_KIT_SIMULATE_NODE"] = "1"
    return env


@functools.cache  # asked at every write of the outputs: a hung nvidia-smi costs its timeout once
def _gpu_name() -> str | None:
    """The first GPU's name as nvidia-smi says it (standard library only), or None."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return names[0].strip() if names else None


# --------------------------------------------------------------------------------------- summary
def summary(records: list[dict[str, Any]], install: dict[str, Any] | None, dry: bool, command: str) -> str:
    env = next((r for r in records if r["step"] == "env"), {})
    # a rerun of some steps without `env` (the README's --only node) still names the device
    device = env.get("figures", {}).get("gpu") or _gpu_name() or "no GPU"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = " (DRY RUN on the CPU: tiny inputs, figures meaningless)" if dry else ""
    lines = [f"### {stamp} — GPU node check on {device}{note} — `{command}`", ""]
    if env.get("markdown"):
        lines += [env["markdown"], ""]
    if install:
        lines += [
            f"Carried wheels: {len(install['wheels'])} installed with {install['method']} in "
            f"{install['seconds']} s"
            + (f"; missing: {', '.join(install['missing'])}" if install["missing"] else "")
            + ".",
            "",
        ]
    rows = [
        [
            r["step"],
            _what(r["step"]),
            r["status"],
            f"{r.get('wall_s', '—')} ({r.get('budget_s', '—')})",
            _check_counts(r),
        ]
        for r in records
    ]
    lines += [_table(["step", "what", "status", "seconds (budget)", "checks passed"], rows), ""]
    for r in records:
        if (r["step"] == "env" and r["status"] == "ok") or not (r.get("markdown") or r.get("error")):
            continue  # a good env step is the header above
        lines += [f"#### {_what(r['step'])}" + (f" — {r['status'].upper()}" if r["status"] != "ok" else ""), ""]
        if r.get("markdown"):
            lines += [r["markdown"].strip(), ""]
        if r.get("error") and r["status"] in ("error", "timeout"):
            lines += ["```", r["error"].strip()[-1500:], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _what(name: str) -> str:
    return next((s.what for s in STEPS if s.name == name), name)


def _check_counts(record: dict[str, Any]) -> str:
    decided = [c for c in record.get("checks", []) if c.get("passed") is not None]
    return f"{sum(c['passed'] for c in decided)} / {len(decided)}" if decided else "—"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="tiny inputs on this machine's CPU, no wheels installed")
    p.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="carried wheel folder to install first (run.sh: benchmarks/gpu/wheels)",
    )
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], default=None, help="steps to run")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="seconds for everything (default 540)")
    p.add_argument("--step-budget", action="append", default=[], metavar="STEP=S", help="one step's budget")
    p.add_argument(
        "--step-args",
        action="append",
        default=[],
        metavar="STEP=ARGS",
        help="more arguments for one step, e.g. node='--variants 15x1 15x1,preset=superfast'",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    began = time.monotonic()
    args = parse_args(argv)
    out = (args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="heygem-gpu-out-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="heygem-gpu-work-", dir=args.work))
    steps_dir = scratch / "steps"  # each step's JSON and log; OUT gets them gathered (the tool returns 8 files)
    steps_dir.mkdir()
    overrides = {k: float(v) for k, v in (item.split("=", 1) for item in args.step_budget)}
    more = {k: shlex.split(v) for k, v in (item.split("=", 1) for item in args.step_args)}
    command = shlex.join(["python", "-m", "benchmarks.gpu.run", *(sys.argv[1:] if argv is None else argv)])
    install = None
    records: list[dict[str, Any]] = []
    try:
        if args.wheels and not args.dry_run:
            install = install_wheels(args.wheels.resolve(), scratch / "site")
            print(
                f"wheels: {install['method']}, {len(install['wheels'])} in {install['seconds']} s"
                + (f"; missing {install['missing']}" if install["missing"] else "")
                + install["log"],
                flush=True,
            )
            if install["missing"]:  # the node has none of them: every step would fail on its imports
                print(
                    f"error: the carried wheels lack {', '.join(install['missing'])}: run "
                    "`python -m benchmarks.gpu.prepare` on a machine with network and carry "
                    f"{args.wheels} (see benchmarks/gpu/README.md); no step was run",
                    file=sys.stderr,
                    flush=True,
                )
                return 2
        env = step_env(scratch / "site" if install else None, scratch, args.dry_run)
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            left = args.budget - (time.monotonic() - began) - _RESERVE
            if args.dry_run and step.dry_args is None:
                records.append(_skipped(step, "not run in a dry run (too slow on a CPU)"))
            elif left < 5:
                records.append(_skipped(step, f"{max(left, 0):.0f} s of the run's budget left"))
            else:
                budget = min(overrides.get(step.name, step.dry_budget if args.dry_run else step.budget), left)
                records.append(run_step(step, steps_dir, budget, env, args.dry_run, more.get(step.name, [])))
            # after every step: if the device tool's own limit cuts the run short, what ran is in OUT
            write_outputs(out, steps_dir, records, install, args.dry_run, command, began)
        text = write_outputs(out, steps_dir, records, install, args.dry_run, command, began)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        "\n" + text + f"\n(results in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}; "
        f"{time.monotonic() - began:.1f} s)",
        flush=True,
    )
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


def _skipped(step: Step, why: str) -> dict[str, Any]:
    return {"step": step.name, "status": "skipped", "checks": [], "markdown": "", "error": why}


def write_outputs(
    out: Path,
    steps_dir: Path,
    records: list[dict[str, Any]],
    install: dict[str, Any] | None,
    dry: bool,
    command: str,
    began: float,
) -> str:
    """OUT holds four files: summary.md (for RESULTS.md), results.json (every step's record),
    log.txt (every step's output) and node_thumbnail.jpg (a frame of the node run's video)."""
    text = summary(records, install, dry, command)
    (out / "summary.md").write_text(text)
    _write_json(
        out / "results.json",
        {
            "dry_run": dry,
            "command": command,
            "seconds": round(time.monotonic() - began, 1),
            "install": install,
            "steps": {r["step"]: r for r in records},
        },
    )
    with (out / "log.txt").open("w") as log:
        for r in records:
            log.write(
                f"===== {r['step']}: {r['status']} =====\n{_tail(steps_dir / (r['step'] + '.log'), 2_000_000)}\n\n"
            )
    thumbnail = steps_dir / "node_thumbnail.jpg"
    if thumbnail.exists():
        shutil.copy(thumbnail, out / thumbnail.name)
    return text


if __name__ == "__main__":
    sys.exit(main())
