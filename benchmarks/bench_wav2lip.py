"""Wav2Lip generator throughput (frames/s) at several batch sizes on the current device.

    python -m benchmarks.bench_wav2lip [--batches 1 32 128] [--seconds S] [--device auto|cpu|cuda]
                                       [--e2e-batches 32 128] [--boxes tracked fixed] [--skip-net | --skip-e2e]

First table: the network alone, as Wav2LipRenderer runs it (eval, channels_last, inference_mode,
autocast for fp16/bf16): fp32 everywhere; on CUDA also fp16 and bf16, each with and without
torch.compile.

Second table: Wav2LipRenderer.render() end to end on 1080p BGR frames with one face box each
(crop, resize, generator, resize back, feather blend, paste), with image_ops "cpu" (OpenCV on the
host) against "device" (torch on the model's device: only the box regions are uploaded and
downloaded), fp32, and on CUDA also fp16. Boxes are "tracked" (a 320x420 box jittered by a few
pixels per frame, as a smoothed face track gives: most boxes differ in size) or "fixed" (one box
for every frame, as the `box` detector gives: same-sized boxes are resized in one call).

Uses the deterministic recipe weights (tests/recipe_weights.py), so no checkpoint is needed; the
cost of a dense convnet does not depend on its weight values. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from heygem_ray.models.wav2lip import Wav2Lip

ROOT = Path(__file__).resolve().parents[1]
AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _recipe_state_dict() -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("recipe_weights", ROOT / "tests" / "recipe_weights.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    keys = recipe.read_keys(ROOT / "tests" / "data" / "wav2lip_state_dict.tsv")
    return recipe.recipe_state_dict(keys, seed=0)


def _model(device: torch.device) -> Wav2Lip:
    model = Wav2Lip()
    model.load_state_dict(_recipe_state_dict(), strict=True)
    return model.eval().to(device, memory_format=torch.channels_last)


def _frames_per_second(
    net: torch.nn.Module, device: torch.device, precision: str, batch: int, seconds: float, warmup: int
) -> tuple[float, float]:
    """(frames/s, ms per batch) over at least `seconds` of timed calls after `warmup` calls."""
    mel = torch.rand(batch, 1, 80, 16, device=device) * 8 - 4
    faces = torch.rand(batch, 6, 96, 96, device=device).contiguous(memory_format=torch.channels_last)
    dtype = AMP[precision]
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode(), amp:
        for _ in range(warmup):
            net(mel, faces)
        sync()
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < seconds:
            net(mel, faces)
            calls += 1
            sync()
        elapsed = time.perf_counter() - start
    return batch * calls / elapsed, 1000 * elapsed / calls


def bench_network(device: torch.device, runs: list[tuple[str, bool]], batches: list[int], seconds: float) -> None:
    model = _model(device)
    print("| precision | torch.compile | batch | frames/s | ms/batch |")
    print("|---|---|---|---|---|")
    for precision, compiled in runs:
        # fp32 as the renderer runs it: cuDNN would take TF32 (a 10-bit mantissa) on Ampere and later
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        net = torch.compile(model) if compiled else model
        for batch in batches:
            # compile traces per shape; warm up enough for autotuning and cudnn algorithm choice
            fps, ms = _frames_per_second(net, device, precision, batch, seconds, warmup=3 if compiled else 1)
            print(f"| {precision} | {'yes' if compiled else 'no'} | {batch} | {fps:,.1f} | {ms:,.1f} |", flush=True)


FRAME_H, FRAME_W = 1080, 1920
FACE_BOX = (800, 300, 1120, 720)  # x1, y1, x2, y2: 320x420, a 1080p talking-head face with pads


def _boxes(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    box = np.tile(np.array(FACE_BOX), (n, 1))
    return box if kind == "fixed" else box + rng.integers(-4, 5, (n, 4))


def _render_frames_per_second(renderer, batch: int, boxes: str, seconds: float) -> tuple[float, float]:
    """(frames/s, ms per frame) of render() over at least `seconds` after one warm-up call.
    Frames are drawn in place call after call, as the actor's decoded frames would be."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (FRAME_H, FRAME_W, 3), dtype=np.uint8)
    frames = [base.copy() for _ in range(batch)]
    box = _boxes(batch, boxes, rng)
    features = (rng.standard_normal((batch, 80, 16)) * 2).clip(-4, 4).astype(np.float32)
    renderer.render(frames, box, features)  # warm-up: cudnn choice, staging buffers, masks
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        renderer.render(frames, box, features)  # synchronous: the pasted frames are on the host
        calls += 1
    elapsed = time.perf_counter() - start
    return batch * calls / elapsed, 1000 * elapsed / (batch * calls)


def bench_end_to_end(device: torch.device, batches: list[int], boxes: list[str], seconds: float) -> None:
    from heygem_ray.render.wav2lip import Wav2LipRenderer

    precisions = ("fp32", "fp16", "bf16") if device.type == "cuda" else ("fp32",)  # bf16: CUDA's `auto`
    print(f"\nWav2LipRenderer.render(), {FRAME_W}x{FRAME_H} frames, one face box each, feather blend\n")
    print("| image_ops | precision | boxes | batch | frames/s | ms/frame |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "wav2lip.pth")
        torch.save({"state_dict": _recipe_state_dict()}, checkpoint)
        for precision in precisions:
            for image_ops in ("cpu", "device"):
                for batch in batches:
                    renderer = Wav2LipRenderer(
                        checkpoint, batch_size=batch, precision=precision, device=str(device), image_ops=image_ops
                    )
                    for kind in boxes:
                        fps, ms = _render_frames_per_second(renderer, batch, kind, seconds)
                        print(f"| {image_ops} | {precision} | {kind} | {batch} | {fps:,.1f} | {ms:,.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per cell")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--e2e-batches", type=int, nargs="+", default=[32, 128], help="render() batch sizes of the end-to-end table"
    )
    parser.add_argument(
        "--boxes",
        nargs="+",
        choices=("tracked", "fixed"),
        default=["tracked", "fixed"],
        help="face boxes of the end-to-end table",
    )
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-net", action="store_true", help="only the end-to-end table")
    skip.add_argument("--skip-e2e", action="store_true", help="only the network table")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        runs = [(p, c) for c in (False, True) for p in ("fp32", "fp16", "bf16")]
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
        runs = [("fp32", False)]
    print(f"Wav2Lip generator, {name}, torch {torch.__version__}\n")
    if not args.skip_net:
        bench_network(device, runs, args.batches, args.seconds)
    if not args.skip_e2e:
        bench_end_to_end(device, args.e2e_batches, args.boxes, args.seconds)


if __name__ == "__main__":
    main()
