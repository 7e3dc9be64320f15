"""Wav2Lip generator throughput (frames/s) at several batch sizes on the current device.

    python -m benchmarks.bench_wav2lip [--batches 1 32 128] [--seconds S] [--device auto|cpu|cuda]

Times the network alone, as Wav2LipRenderer runs it (eval, channels_last, inference_mode,
autocast for fp16/bf16): fp32 everywhere; on CUDA also fp16 and bf16, each with and without
torch.compile. Uses the deterministic recipe weights (tests/recipe_weights.py), so no checkpoint
is needed; the cost of a dense convnet does not depend on its weight values. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import time
from pathlib import Path

import torch

from heygem_ray.models.wav2lip import Wav2Lip

ROOT = Path(__file__).resolve().parents[1]
AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _model(device: torch.device) -> Wav2Lip:
    spec = importlib.util.spec_from_file_location("recipe_weights", ROOT / "tests" / "recipe_weights.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    model = Wav2Lip()
    keys = recipe.read_keys(ROOT / "tests" / "data" / "wav2lip_state_dict.tsv")
    model.load_state_dict(recipe.recipe_state_dict(keys, seed=0), strict=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per cell")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model = _model(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        runs = [(p, c) for c in (False, True) for p in ("fp32", "fp16", "bf16")]
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
        runs = [("fp32", False)]
    print(f"Wav2Lip generator, {name}, torch {torch.__version__}\n")
    print("| precision | torch.compile | batch | frames/s | ms/batch |")
    print("|---|---|---|---|---|")
    for precision, compiled in runs:
        net = torch.compile(model) if compiled else model
        for batch in args.batches:
            # compile traces per shape; warm up enough for autotuning and cudnn algorithm choice
            fps, ms = _frames_per_second(net, device, precision, batch, args.seconds, warmup=3 if compiled else 1)
            print(f"| {precision} | {'yes' if compiled else 'no'} | {batch} | {fps:,.1f} | {ms:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
