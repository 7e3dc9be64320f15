"""What every step of the GPU check kit shares: its result file, the node-import simulation of the
dry run, running `heygem_ray` without Ray, recipe weights and small helpers.

Each step runs as its own process (`python -m benchmarks.gpu.<step> --out DIR [--dry-run]`) so the
orchestrator can kill one that overruns; it writes `DIR/<step>.json` whatever happens.
"""

from __future__ import annotations

import os

from benchmarks.gpu.packages import NodeImports, blocked_modules

#: set by the orchestrator's --dry-run: make this machine's imports look like the node's
SIMULATE_ENV = "HEYGEM_GPU_KIT_SIMULATE_NODE"
_GUARD: NodeImports | None = None
if os.environ.get(SIMULATE_ENV) == "1":  # before anything below imports numpy, torch or heygem_ray
    _GUARD = NodeImports(blocked_modules())
    _GUARD.install()

import argparse
import contextlib
import functools
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
#: the precision the node benchmark renders at on CUDA, named (not "auto"): what renderer.precision=auto
#: picks on a GPU with bf16 (compute capability 8.0+, the H100/H200)
GPU_PRECISION = "bf16"


# --------------------------------------------------------------------------------------- results
@dataclass
class Check:
    """One pass/fail comparison with the figures it was decided on."""

    name: str
    passed: bool | None  # None: reported only, no tolerance applies
    figures: dict[str, Any]
    tolerance: str = ""


@dataclass
class StepResult:
    step: str
    dry_run: bool
    status: str = "running"  # ok | failed (a check failed) | error (an exception)
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""
    error: str = ""
    modules: list[str] = field(default_factory=list)  # top-level modules this process imported
    refused_imports: list[str] = field(default_factory=list)  # what the dry run's node simulation blocked

    def check(self, name: str, passed: bool | None, tolerance: str = "", **figures: Any) -> bool | None:
        self.checks.append(Check(name, None if passed is None else bool(passed), figures, tolerance))
        print(
            f"  [{_mark(passed)}] {name}: "
            + ", ".join(f"{k}={_short(v)}" for k, v in figures.items())
            + (f"  (tolerance: {tolerance})" if tolerance else ""),
            flush=True,
        )
        return passed

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "checks"}
        out["checks"] = [c.__dict__ for c in self.checks]
        return out


def _mark(passed: bool | None) -> str:
    return "info" if passed is None else ("ok" if passed else "FAIL")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def imported_top_modules() -> list[str]:
    return sorted({name.partition(".")[0] for name in sys.modules if not name.startswith("__")})


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain, allow_nan=True) + "\n")
    tmp.replace(path)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, paths and the like, as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return value.__dict__
    return str(value)


def step_args(
    argv: Sequence[str] | None, name: str, doc: str, options: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The options every step takes, plus the step's own (`options` adds them)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.gpu.{name}", description=doc.splitlines()[0])
    if options is not None:
        options(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for <step>.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny inputs on CPU")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--budget",
        type=float,
        default=float("inf"),
        help="seconds this step has (the orchestrator kills it after them); optional parts skip",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def run_step(name: str, args: argparse.Namespace, body: Callable[[StepResult], None]) -> int:
    """Run `body`, then write `<out>/<name>.json` (also after an exception). Exit status 0 when
    every check passed, 1 when one failed, 2 on an exception."""
    result = StepResult(name, args.dry_run)
    start = time.perf_counter()
    try:
        body(result)
        failed = [c.name for c in result.checks if c.passed is False]
        result.status = "failed" if failed else "ok"
    except BaseException as exc:  # noqa: BLE001 - recorded, and the orchestrator goes on
        result.status = "error"
        result.error = "".join(traceback.format_exception(exc))[-6000:]
        traceback.print_exc()
    result.seconds = round(time.perf_counter() - start, 3)
    result.modules = imported_top_modules()
    result.refused_imports = sorted(_GUARD.refused) if _GUARD else []
    write_json(args.out / f"{name}.json", result.to_json())
    return {"ok": 0, "failed": 1}.get(result.status, 2)


# --------------------------------------------------------------------------------------- inputs
@functools.lru_cache(maxsize=2)
def recipe_state_dict(tsv: str) -> dict[str, Any]:
    """The deterministic recipe weights of tests/recipe_weights.py for `tests/data/<tsv>` (made once
    per process: 36 M random numbers take a second or two; callers copy before changing them)."""
    spec = importlib.util.spec_from_file_location("recipe_weights", ROOT / "tests" / "recipe_weights.py")
    recipe = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(recipe)
    return recipe.recipe_state_dict(recipe.read_keys(DATA / tsv), seed=0)


def wav2lip_checkpoint(path: Path) -> str:
    """The recipe generator as an official-layout training dict (like wav2lip_gan.pth)."""
    import torch

    if not path.exists():
        state = recipe_state_dict("wav2lip_state_dict.tsv")
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "global_step": 0}, path)
    return str(path)


def write_partial(out: Path, name: str, figures: dict[str, Any]) -> None:
    """A step's figures so far (`<out>/<name>.partial.json`): what the orchestrator reports when it
    has to stop the step at its budget, instead of the last lines of its log."""
    write_json(out / f"{name}.partial.json", figures)


def scratch(args: argparse.Namespace, name: str) -> contextlib.AbstractContextManager[Path]:
    """The step's scratch folder: --work/<name> (kept), else a temporary folder (removed)."""
    if args.work is not None:
        path = args.work / name
        path.mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext(path)
    import tempfile

    return _temporary(tempfile.mkdtemp(prefix=f"heygem-gpu-{name}-"))


@contextlib.contextmanager
def _temporary(path: str) -> Iterator[Path]:
    import shutil

    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cuda_device() -> Any:
    """The device the kit measures: CUDA when torch sees one, else the CPU (the dry run here)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hold_gpu_context(device: int) -> None:
    """Make CUDA device `device`'s primary context through torch (which keeps it while the process
    lives), as a renderer does once its model is on the GPU: NVDEC readers then only share it, and
    their timings leave out a context's creation. Set the context's flags first
    (`heygem_ray.devices.prefer_blocking_sync`: FFmpeg shares only a context that waits by blocking),
    as `heygem_ray.segment.nvdec_device` does."""
    import torch

    torch.zeros(1, device=f"cuda:{device}")


def context_sync() -> str | None:
    """How the current CUDA context waits for the GPU ("blocking", "spin", "yield", "auto"), or
    None without one: renderers should block (`devices.prefer_blocking_sync`), spinning costs a
    core a wait on a node whose CPUs bound it."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    flags = ctypes.c_uint()
    if driver.cuCtxGetFlags(ctypes.byref(flags)) != 0:
        return None
    return {0: "auto", 1: "spin", 2: "yield", 4: "blocking"}.get(flags.value & 0x7, str(flags.value & 0x7))


def no_tf32() -> None:
    """fp32 means fp32: Ampere+ GPUs would otherwise run convolutions in TF32 (10-bit mantissa)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def levels(diff: Any) -> dict[str, float]:
    """mean / max of an absolute difference array, rounded for reports."""
    import numpy as np

    diff = np.abs(np.asarray(diff, dtype=np.float64))
    if diff.size == 0:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": round(float(diff.mean()), 6), "max": round(float(diff.max()), 6)}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; a '|' inside a cell (|diff|) is escaped and line breaks (error messages)
    become spaces, so each cell stays one cell."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)
