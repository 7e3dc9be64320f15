"""S3FD detection speed per frame at 360p / 720p / 1080p, at full resolution and with the default
max_side=720 downscale, on the current device. Prints a markdown table.

    python -m benchmarks.bench_s3fd [--frames N] [--repeats R] [--device auto|cpu|cuda]

Uses the deterministic recipe weights (tests/recipe_weights.py), so no checkpoint is needed. The
network time is what real weights cost too; post-processing is NOT representative: random weights
put thousands of cells just above 0.5 (real weights: a handful per face), so NMS time here is a
pessimistic upper bound and is reported in its own column.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from heygem_ray.detect.s3fd import S3FDDetector

ROOT = Path(__file__).resolve().parents[1]
RESOLUTIONS = ((640, 360), (1280, 720), (1920, 1080))


def _recipe_state_dict() -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("recipe_weights", ROOT / "tests" / "recipe_weights.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe.recipe_state_dict(recipe.read_keys(ROOT / "tests" / "data" / "s3fd_state_dict.tsv"), seed=0)


def _frame(width: int, height: int) -> np.ndarray:
    """A smooth random BGR frame (content does not change the network cost)."""
    small = np.random.default_rng(0).integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


class _NetTimer:
    """Times the model's forward passes (device-synchronised) through module hooks, so the
    detector is measured exactly as the pipeline calls it."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self.input_hw = device, 0.0, (0, 0)
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, _module, args) -> None:
        self._sync()
        self.input_hw = tuple(args[0].shape[-2:])
        self._t0 = time.perf_counter()

    def _stop(self, _module, _args, _output) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=None, help="frames per batch (default 4 on GPU, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="timed detect() calls per setting")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    state_dict = _recipe_state_dict()
    header = False
    for max_side in (None, 720):
        detector = S3FDDetector(state_dict, device=args.device, max_side=max_side)
        frames_per_batch = args.frames or (4 if detector.device.type == "cuda" else 2)
        detector.batch_size = frames_per_batch
        if not header:  # each row printed as it is measured: a run stopped midway keeps those before
            header = True
            device = detector.device
            name = (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"CPU, {torch.get_num_threads()} threads"
            )
            print(
                f"S3FD, recipe weights, fp32, {name}, {frames_per_batch} frames per batch, {args.repeats} repeat(s)\n"
            )
            print(
                "| frame | max_side | net input (h×w) | detect ms/frame | of which network ms/frame "
                "| rest (resize, decode, NMS) ms/frame |"
            )
            print("|---|---|---|---:|---:|---:|", flush=True)
        timer = _NetTimer(detector.model, detector.device)
        for width, height in RESOLUTIONS:
            frame = _frame(width, height)
            detector.detect([frame])  # warm-up: lazy init, allocator, kernel selection
            timer.seconds = 0.0
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                detector.detect([frame] * frames_per_batch)
            total = time.perf_counter() - t0
            n = args.repeats * frames_per_batch
            net = timer.seconds / n
            (h, w), per_frame = timer.input_hw, total / n
            print(
                f"| {width}×{height} | {max_side or 'none'} | {h}×{w} | {per_frame * 1e3:.1f} | {net * 1e3:.1f} "
                f"| {(per_frame - net) * 1e3:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
