"""Step (d): one of the existing benchmark scripts, run as it is, its printed tables kept.

    python -m benchmarks.gpu.bench --out DIR --name NAME [--dry-run] MODULE [ARGS...]

e.g. `--name bench_wav2lip_net benchmarks.bench_wav2lip --skip-e2e --batches 32 128`. The script runs in
this process (`runpy`, as `python -m MODULE ARGS` would), so the dry run's node-import guard covers
it too; what it prints is echoed and stored as the step's markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import sys
from collections.abc import Sequence
from typing import TextIO

from benchmarks.gpu import common


class Tee(io.TextIOBase):
    """Writes to the real stdout (so the orchestrator's log gets it as it comes) and keeps a copy."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        return self.copy.write(text)


def body(result: common.StepResult, args: argparse.Namespace) -> None:
    tee = Tee(sys.stdout)
    argv = sys.argv
    sys.argv = [args.module, *args.args]
    try:
        with contextlib.redirect_stdout(tee):
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # argparse errors and explicit exits end the script, not this step
        if exc.code not in (None, 0):
            raise RuntimeError(f"{args.module} exited with {exc.code}") from None
    finally:
        sys.argv = argv
    command = " ".join(["python -m", args.module, *args.args])
    result.figures = {"command": command}
    result.markdown = f"`{command}`\n\n" + tee.copy.getvalue().strip()


def main(argv: Sequence[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", required=True, help="the step's name (its JSON file)")
        parser.add_argument("module", help="the benchmark module, e.g. benchmarks.bench_wav2lip")
        parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")

    args = common.step_args(argv, "bench", __doc__, options)
    return common.run_step(args.name, args, lambda result: body(result, args))


if __name__ == "__main__":
    sys.exit(main())
