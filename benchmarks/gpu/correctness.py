"""Step (b): numbers on the GPU against the references the CPU tests use.

    python -m benchmarks.gpu.correctness --out DIR [--dry-run] [--procs 4]

1. Wav2Lip generator (recipe weights) vs tests/data/wav2lip_reference.npz (the official code's
   outputs), as the renderer runs it (channels_last, autocast for half precisions), at fp32 with
   TF32 off, fp16 and bf16. Tolerances on |output - reference| (outputs are in [0, 1]):
   fp32 max <= 1e-4 (the CPU test's); fp16 mean <= 1e-3, max <= 1.5e-2; bf16 mean <= 6e-3,
   max <= 6e-2 (about 3x what the CPU's autocast gives: fp16 2.7e-4 / 3.4e-3, bf16 2.2e-3 / 2.3e-2).
2. `renderer.image_ops=device` (torch crops, resizes and paste on the GPU) vs `cpu` (OpenCV, the
   official numerics), same model at fp32, same frames and boxes (edges, partly outside, the whole
   frame, tiny, empty): outside the boxes identical; inside mean <= 0.5 levels, max <= 8, > 98 %
   within one level (tests/test_wav2lip_renderer.py's bounds). bf16 device vs fp32 cpu reported.
3. S3FD raw head outputs vs tests/data/s3fd_reference.npz at fp32, TF32 off: |diff| <= 1e-4 + 1e-4·|ref|.
   NVDEC: `decoder.device=auto` takes it exactly where CUDA is usable; a renderer's reads of a 1080p
   clip through it (seeks included) give the same I420 planes as software, CPU ms a frame for both.
4. Several processes sharing the GPU (4 by default, each with its own model, rendering at the same
   moment, bf16 + device image ops as the node benchmark runs) give exactly the frames one
   process gives.
5. The node's own CPU: the int8 generator CPU actors run by default, at the ranges this CPU sums
   exactly (`wav2lip_cpu.int8_range`: the full ones where it has VNNI, which the CI machines lack,
   so only here are they checked against the reference), vs the same reference: PSNR >= 38 dB and
   max < 0.12 at the full ranges, >= 36 dB and < 0.16 at the narrowed ones (the CPU tests' bounds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu import common

#: precision -> (mean, max) tolerance of |generator output - reference|
GENERATOR_TOLERANCE = {"fp32": (None, 1e-4), "fp16": (1e-3, 1.5e-2), "bf16": (6e-3, 6e-2)}
IMAGE_OPS_TOLERANCE = {"mean": 0.5, "max": 8, "within_one": 0.98}
S3FD_ATOL = S3FD_RTOL = 1e-4
#: the int8 generator's ranges -> (min PSNR dB, max |diff|) against the reference
#: (tests/test_wav2lip_model.py's bounds; measured 40.4 dB / 0.078 full, 37.3 dB / 0.115 narrowed)
INT8_TOLERANCE = {"full": (38.0, 0.12), "narrowed": (36.0, 0.16)}
#: boxes as fractions of the frame: a face, a near twin, the same again (resized together), one past
#: the left edge, one past the top, the whole frame, a tiny one (upscaled), an empty one
BOX_FRACTIONS = np.array(
    [
        [0.40, 0.20, 0.57, 0.60],
        [0.40, 0.21, 0.571, 0.59],
        [0.40, 0.20, 0.57, 0.60],
        [-0.02, 0.40, 0.20, 0.80],
        [0.60, -0.05, 0.85, 0.30],
        [0.0, 0.0, 1.0, 1.0],
        [0.05, 0.05, 0.09, 0.10],
        [0.05, 0.05, 0.05, 0.20],
    ]
)


def frames_and_boxes(width: int, height: int, seed: int = 11) -> tuple[list[np.ndarray], np.ndarray]:
    """Smooth random frames (one per box, each shifted) and their pixel boxes."""
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    frames = [np.roll(base, (2 * i, 5 * i), axis=(0, 1)) for i in range(len(BOX_FRACTIONS))]
    boxes = np.round(BOX_FRACTIONS * [width, height, width, height]).astype(np.int64)
    return frames, boxes


def features(renderer: Any, count: int) -> np.ndarray:
    from heygem_ray.media.audio import AudioWindow

    t = np.arange(24_000) / 16_000
    wav = (0.5 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    return renderer.features(AudioWindow(wav, 0, len(wav), 0.1), np.arange(count), 25.0)


def renderer(checkpoint: str, device: str, precision: str, image_ops: str, blend: str = "feather") -> Any:
    """A Wav2Lip renderer through the product's config and factory, every option named."""
    from heygem_ray.config import Wav2LipRendererConfig
    from heygem_ray.render import build_renderer

    return build_renderer(
        Wav2LipRendererConfig(
            checkpoint=checkpoint,
            batch_size=len(BOX_FRACTIONS),
            precision=precision,
            blend=blend,
            device=device,
            image_ops=image_ops,
        )
    )


# --------------------------------------------------------------------------------------- 1. generator
def check_generator(result: common.StepResult, device: Any, precisions: Sequence[str]) -> None:
    import torch

    from heygem_ray.models.wav2lip import Wav2Lip

    common.no_tf32()  # a renderer built before may have allowed TF32 for its precision
    ref = np.load(common.DATA / "wav2lip_reference.npz")
    model = Wav2Lip()
    model.load_state_dict(common.recipe_state_dict("wav2lip_state_dict.tsv"), strict=True)
    model = model.eval().to(device, memory_format=torch.channels_last)
    cases = [("4-d", "mel", "faces", "output"), ("5-d", "mel5", "faces5", "output5")]
    for precision in precisions:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        mean_tol, max_tol = GENERATOR_TOLERANCE[precision]
        for shape, mel, faces, output in cases if precision == "fp32" else cases[:1]:
            x = torch.from_numpy(ref[faces]).to(device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
            with torch.inference_mode(), amp:
                out = model(torch.from_numpy(ref[mel]).to(device), x).float().cpu().numpy()
            diff = common.levels(out - ref[output])
            ok = diff["max"] <= max_tol and (mean_tol is None or diff["mean"] <= mean_tol)
            tolerance = f"max <= {max_tol:g}" + (f", mean <= {mean_tol:g}" if mean_tol else "")
            result.check(
                f"Wav2Lip generator {precision} {shape} vs official reference",
                ok,
                tolerance,
                mean=diff["mean"],
                max=diff["max"],
                max_levels=round(diff["max"] * 255, 3),
            )


def check_cpu_int8(result: common.StepResult, device: Any) -> None:
    """The int8 generator on this node's CPU (whatever `device` the other checks use)."""
    import torch

    from heygem_ray.devices import cpu_int8_is_faster
    from heygem_ray.models.wav2lip import Wav2Lip
    from heygem_ray.models.wav2lip_cpu import FULL_RANGE, int8_range, quantize_for_cpu

    levels = int8_range()
    ranges = "full" if levels == FULL_RANGE else "narrowed"
    ref = np.load(common.DATA / "wav2lip_reference.npz")
    model = Wav2Lip()
    model.load_state_dict(common.recipe_state_dict("wav2lip_state_dict.tsv"), strict=True)
    int8 = quantize_for_cpu(model.eval().to(memory_format=torch.channels_last), levels)
    faces = torch.from_numpy(ref["faces"]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        err = int8(torch.from_numpy(ref["mel"]), faces).numpy() - ref["output"]
    psnr = float(10 * np.log10(1.0 / max(float(np.mean(err**2)), 1e-20)))
    worst = float(np.abs(err).max())
    min_db, max_error = INT8_TOLERANCE[ranges]
    result.check(
        f"CPU int8 generator ({ranges} ranges) vs official reference",
        psnr >= min_db and worst < max_error,
        f"PSNR >= {min_db:g} dB, max < {max_error:g}",
        psnr_db=round(psnr, 2),
        max=round(worst, 4),
        int8_is_cpu_default=cpu_int8_is_faster(),
    )


# --------------------------------------------------------------------------------------- 2. image ops
def compare_paths(
    reference: list[np.ndarray], got: list[np.ndarray], frames: list[np.ndarray], boxes: np.ndarray
) -> dict[str, float]:
    """Worst per-box figures inside the boxes, and changed pixels outside them (must be 0)."""
    height, width = frames[0].shape[:2]
    worst = {"mean": 0.0, "max": 0.0, "within_one": 1.0, "outside_changed": 0}
    for frame, box, want, have in zip(frames, boxes, reference, got):
        x1, y1 = max(int(box[0]), 0), max(int(box[1]), 0)
        x2, y2 = min(int(box[2]), width), min(int(box[3]), height)
        outside = np.ones((height, width), bool)
        if x2 > x1 and y2 > y1:
            outside[y1:y2, x1:x2] = False
            diff = np.abs(have[y1:y2, x1:x2].astype(int) - want[y1:y2, x1:x2])
            worst["mean"] = max(worst["mean"], float(diff.mean()))
            worst["max"] = max(worst["max"], float(diff.max()))
            worst["within_one"] = min(worst["within_one"], float((diff <= 1).mean()))
        worst["outside_changed"] += int((have[outside] != frame[outside]).sum())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in worst.items()}


def check_image_ops(
    result: common.StepResult, device: Any, checkpoint: str, size: tuple[int, int], blends: Sequence[str]
) -> None:
    frames, boxes = frames_and_boxes(*size)
    tol = IMAGE_OPS_TOLERANCE
    for blend in blends:
        cpu = renderer(checkpoint, str(device), "fp32", "cpu", blend)
        feats = features(cpu, len(frames))
        want = cpu.render([f.copy() for f in frames], boxes, feats)
        dev = renderer(checkpoint, str(device), "fp32", "device", blend)
        got = dev.render([f.copy() for f in frames], boxes, feats)
        w = compare_paths(want, got, frames, boxes)
        ok = (
            w["outside_changed"] == 0
            and w["mean"] <= tol["mean"]
            and w["max"] <= tol["max"]
            and w["within_one"] >= tol["within_one"]
        )
        result.check(
            f"image_ops=device vs cpu, fp32, {blend}, {size[0]}x{size[1]}",
            ok,
            f"outside unchanged, worst box mean <= {tol['mean']}, max <= {tol['max']} levels, "
            f">= {tol['within_one']:.0%} within one",
            **w,
        )
    if device.type == "cuda":  # what the node runs (half precision on the GPU) against the official numerics
        half = renderer(checkpoint, str(device), common.GPU_PRECISION, "device", "feather")
        got = half.render([f.copy() for f in frames], boxes, feats)
        cpu = renderer(checkpoint, str(device), "fp32", "cpu", "feather")
        want = cpu.render([f.copy() for f in frames], boxes, feats)
        result.check(
            f"image_ops=device {common.GPU_PRECISION} vs cpu fp32, feather (reported)",
            None,
            **compare_paths(want, got, frames, boxes),
        )


# --------------------------------------------------------------------------------------- 3. s3fd
def check_s3fd(result: common.StepResult, device: Any) -> None:
    import torch

    from heygem_ray.models.s3fd import S3FD

    common.no_tf32()  # a renderer built before may have allowed TF32 for its precision
    ref = np.load(common.DATA / "s3fd_reference.npz")
    model = S3FD().eval()
    model.load_state_dict(common.recipe_state_dict("s3fd_state_dict.tsv"), strict=True)
    model = model.to(device)
    with torch.inference_mode():
        outputs = [o.float().cpu().numpy() for o in model(torch.from_numpy(ref["image"]).to(device))]
    worst_abs, worst_excess, shapes_ok = 0.0, -np.inf, len(outputs) == 12
    for i, out in enumerate(outputs):
        expected = ref[f"out{i}"]
        shapes_ok &= out.shape == expected.shape
        if out.shape == expected.shape:
            diff = np.abs(out - expected)
            worst_abs = max(worst_abs, float(diff.max()))
            worst_excess = max(worst_excess, float((diff - S3FD_ATOL - S3FD_RTOL * np.abs(expected)).max()))
    result.check(
        "S3FD raw outputs fp32 vs official reference",
        shapes_ok and worst_excess <= 0,
        f"|diff| <= {S3FD_ATOL:g} + {S3FD_RTOL:g}·|ref|",
        max_abs=worst_abs,
        outputs=len(outputs),
    )


def check_nvdec(result: common.StepResult, device: Any, work: Path, height: int) -> None:
    """`decoder.device=auto` takes NVDEC exactly where CUDA is usable, and a renderer's reads through
    it (seeks included) give the same I420 planes as software decoding, at less CPU a frame."""
    from benchmarks.gpu.node import FPS, make_avatar
    from heygem_ray.media import video
    from heygem_ray.segment import nvdec_device

    chosen = nvdec_device("auto")
    result.check(
        "decoder.device=auto takes NVDEC where CUDA is usable", (chosen is not None) == (device.type == "cuda")
    )
    if chosen is None:
        return
    # nvdec_device made torch's context on that GPU: the readers below share it
    clip = work / "nvdec.mp4"
    make_avatar(clip, 60 / FPS, height, os.cpu_count() or 1)  # keyframes at 0 and 50
    info = video.probe(str(clip), FPS)
    pts = np.array([p for p, _ in video.iter_frames(str(clip), info)])
    reads = [np.arange(40, 60), np.arange(10, 21), np.arange(0, 6)]  # forward, back, back to the start
    frames, cpu_ms, on_nvdec = {}, {}, {}
    for name, nvdec in (("software", None), ("nvdec", chosen)):
        start, got = time.process_time(), []
        with video.FrameReader(str(clip), info, pts, threads=1, pixel_format="yuv420p", nvdec=nvdec) as reader:
            on_nvdec[name] = reader.on_nvdec
            for indices in reads:
                got.append(reader.read(indices))
        cpu_ms[name] = round((time.process_time() - start) * 1000 / sum(len(r) for r in reads), 2)
        frames[name] = got
    same = all(
        a.keys() == b.keys() and all(np.array_equal(a[i], b[i]) for i in a)
        for a, b in zip(frames["software"], frames["nvdec"])
    )
    result.check(
        f"NVDEC reads = software reads ({height}p, seeks included)",
        same and on_nvdec == {"software": False, "nvdec": True},
        "identical I420 planes",
        cpu_ms_per_frame_software=cpu_ms["software"],
        cpu_ms_per_frame_nvdec=cpu_ms["nvdec"],
    )


# --------------------------------------------------------------------------------------- 4. sharing
Prepared = tuple[Any, list[np.ndarray], np.ndarray, np.ndarray]


def prepare_render(checkpoint: str, device: str, precision: str, size: tuple[int, int]) -> Prepared:
    """The node benchmark's renderer (image_ops auto: device on CUDA) with the check frames, warmed up
    (cuDNN's algorithm choice, staging buffers) so timed rounds measure rendering alone."""
    r = renderer(checkpoint, device, precision, "auto")
    frames, boxes = frames_and_boxes(*size)
    feats = features(r, len(frames))
    r.render([f.copy() for f in frames], boxes, feats)
    return r, frames, boxes, feats


def render_rounds(prepared: Prepared, rounds: int) -> tuple[list[list[np.ndarray]], float]:
    """The box regions of each of `rounds` renders of the same frames, and the seconds taken."""
    r, frames, boxes, feats = prepared
    start = time.perf_counter()
    regions = []
    for _ in range(rounds):
        out = r.render([f.copy() for f in frames], boxes, feats)
        regions.append([o[max(b[1], 0) : max(b[3], 0), max(b[0], 0) : max(b[2], 0)].copy() for o, b in zip(out, boxes)])
    return regions, time.perf_counter() - start


def _sharing_worker(
    checkpoint: str,
    device: str,
    precision: str,
    size: tuple[int, int],
    rounds: int,
    barrier: Any,
    results: Any,
    wait: float = 120.0,
) -> None:
    """One of the processes sharing the GPU: load, wait (up to `wait` s) for the others, render at
    the same moment."""
    try:
        if device == "cpu":  # the dry run: processes sharing a small CPU would oversubscribe it
            import torch

            torch.set_num_threads(1)
        prepared = prepare_render(checkpoint, device, precision, size)
        barrier.wait(timeout=wait)
        regions, seconds = render_rounds(prepared, rounds)
        results.put(("ok", regions, seconds))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        barrier.abort()  # the others stop waiting for this one now, not at their timeout
        results.put(("error", repr(exc), 0.0))


def collect(answers: Any, workers: list[Any], timeout: float) -> list[tuple[str, Any, float]]:
    """One answer per worker; a worker that died without answering (killed, crashed in native
    code) counts as an error instead of leaving this process waiting."""
    out: list[tuple[str, Any, float]] = []
    deadline = time.monotonic() + timeout
    while len(out) < len(workers) and time.monotonic() < deadline:
        try:
            out.append(answers.get(timeout=1.0))
        except queue.Empty:
            silent = [w for w in workers if not w.is_alive() and w.exitcode != 0]
            if len(out) + len(silent) >= len(workers):
                out += [("error", f"process {w.pid} exited with {w.exitcode}", 0.0) for w in silent]
    out += [("error", "no answer in time", 0.0)] * (len(workers) - len(out))
    for w in workers:  # those that answered exit at once; the others are killed, within the budget
        w.join(timeout=max(0.5, min(10.0, deadline - time.monotonic())))
        if w.is_alive():
            w.kill()
            w.join(timeout=2)
    return out


def check_sharing(
    result: common.StepResult,
    device: Any,
    checkpoint: str,
    procs: int,
    precision: str,
    size: tuple[int, int],
    rounds: int = 3,
    seconds: float = 300.0,
) -> None:
    """`seconds`: what the step has left for this check (its workers' waits end within it)."""
    import torch

    deadline = time.monotonic() + seconds

    threads = torch.get_num_threads()
    if device.type == "cpu":  # CPU numerics depend on the thread count: the reference uses the workers' one
        torch.set_num_threads(1)
    try:
        alone, alone_s = render_rounds(prepare_render(checkpoint, str(device), precision, size), rounds)
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("spawn")
    barrier, answers_q = ctx.Barrier(procs), ctx.Queue()
    left = max(1.0, deadline - time.monotonic())
    workers = [
        ctx.Process(
            target=_sharing_worker,
            args=(checkpoint, str(device), precision, size, rounds, barrier, answers_q, 0.8 * left),
        )
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    answers = collect(answers_q, workers, timeout=0.9 * left)
    errors = [a[1] for a in answers if a[0] != "ok"]
    worst, identical = 0, not errors
    for _, regions, _ in (a for a in answers if a[0] == "ok"):
        for round_regions in regions:
            for want, have in zip(alone[0], round_regions):
                if want.shape != have.shape or not np.array_equal(want, have):
                    identical = False
                    if want.shape == have.shape and want.size:
                        worst = max(worst, int(np.abs(want.astype(int) - have).max()))
    shared_s = [round(a[2], 3) for a in answers if a[0] == "ok"]
    result.check(
        f"{procs} processes sharing the {device.type.upper()} render the frames one process renders "
        f"({precision}, {rounds} rounds each)",
        identical,
        "identical bytes",
        processes=procs,
        max_level_diff=worst,
        seconds_alone=round(alone_s, 3),
        seconds_each_shared=shared_s,
        errors=errors,
    )


# --------------------------------------------------------------------------------------- step
#: seconds kept for the NVDEC check, run last
NVDEC_SECONDS = 20.0


def body(result: common.StepResult, args: argparse.Namespace) -> None:
    from heygem_ray.devices import prefer_blocking_sync

    # before any CUDA context: FFmpeg shares the primary context with NVDEC only where it waits by
    # blocking (heygem_ray.segment.nvdec_device), so NVDEC's check may come last, after torch's
    prefer_blocking_sync(0)
    device = common.cuda_device()
    dry = result.dry_run
    procs = args.procs or (2 if dry else 4)
    seconds: dict[str, float] = {}
    started = time.monotonic()

    def timed(name: str, check: Callable[..., None], *check_args: Any) -> None:
        """One group of checks; one that raises is a failed check, and the next group still runs.
        The checks so far are written after each (what is reported if the step is stopped at its
        budget, instead of the last lines of its log)."""
        start = time.perf_counter()
        try:
            check(result, device, *check_args)
        except Exception as exc:  # noqa: BLE001 - recorded with its cause
            result.check(f"{name} raised", False, error=f"{type(exc).__name__}: {exc}"[:1000])
        seconds[name] = round(time.perf_counter() - start, 2)
        checks = [c.__dict__ for c in result.checks]
        common.write_partial(args.out, "correctness", {"device": str(device), "seconds": seconds, "checks": checks})

    with common.scratch(args, "correctness") as work:
        checkpoint = common.wav2lip_checkpoint(Path(work) / "wav2lip_recipe.pth")
        # the dry run keeps every code path but skips what is slow on a CPU (emulated half precision)
        timed("generator", check_generator, ("fp32",) if dry else ("fp32", "fp16", "bf16"))
        timed(
            "image_ops",
            check_image_ops,
            checkpoint,
            (320, 240) if dry else (1920, 1080),
            ("feather",) if dry else ("feather", "hard"),
        )
        timed("s3fd", check_s3fd)
        timed("cpu_int8", check_cpu_int8)
        timed(
            "sharing",
            check_sharing,
            checkpoint,
            procs,
            common.GPU_PRECISION if device.type == "cuda" else "fp32",
            (256, 192) if dry else (1920, 1080),
            1 if dry else 3,
            # what the step's budget leaves (5 s kept for writing its result, and NVDEC's time)
            min(300.0, args.budget - (time.monotonic() - started) - 5.0 - NVDEC_SECONDS),
        )
        # last: a path never run on a GPU in this form, which may hang or crash the process; every
        # check before it is written by then
        timed("nvdec", check_nvdec, Path(work), 180 if dry else 1080)
    result.figures = {"device": str(device), "seconds": seconds}
    result.markdown = markdown(result, device)


def markdown(result: common.StepResult, device: Any) -> str:
    rows = []
    for c in result.checks:
        figures = ", ".join(f"{k} {v}" for k, v in c.figures.items() if k not in ("errors",) and v not in ([], None))
        rows.append(
            [c.name, figures, c.tolerance or "—", {True: "pass", False: "**FAIL**", None: "reported"}[c.passed]]
        )
    return common.table(["check", "measured", "tolerance", "result"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--procs", type=int, default=None, help="processes sharing the GPU (4; 2 in a dry run)")

    args = common.step_args(argv, "correctness", __doc__, options)
    return common.run_step("correctness", args, lambda result: body(result, args))


if __name__ == "__main__":
    sys.exit(main())
