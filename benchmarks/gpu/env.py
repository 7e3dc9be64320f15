"""Step (a): the node's facts: GPU, driver, torch/CUDA, cores, memory, OpenCV, PyAV's hardware codecs,
the versions of what the kit imports, and whether heygem_ray's stages import without Ray; and what
one core does with 1080p H.264 (decode, x264 per preset) and whether NVDEC decodes it, as the CPU
side of a segment is what bounds a GPU node.

    python -m benchmarks.gpu.env --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu import common
from benchmarks.gpu.packages import CARRIED

#: modules whose versions the report names
VERSIONS = (
    "torch",
    "numpy",
    "av",
    "opencv-python-headless",
    "opencv-python",
    "pyarrow",
    "fsspec",
    "scipy",
    "numba",
    "triton",
)


def cpu_facts() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem_gib = round(kb / 1024 / 1024, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
    }


def gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if not torch.cuda.is_available():
        return facts
    props = torch.cuda.get_device_properties(0)
    facts.update(
        gpu=props.name,
        gpu_count=torch.cuda.device_count(),
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        cudnn=torch.backends.cudnn.version(),
        bf16_supported=torch.cuda.is_bf16_supported(),
    )
    facts.update(nvidia_smi())
    return facts


def nvidia_smi() -> dict[str, Any]:
    """Driver version and MIG mode from nvidia-smi, when it is there."""
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,mig.mode.current,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {"driver": None}
    parts = [p.strip() for p in line.splitlines()[0].split(",")] if line.strip() else []
    return dict(zip(("driver", "mig_mode", "power_limit"), parts)) if parts else {"driver": None}


def media_facts() -> dict[str, Any]:
    import av
    import cv2

    from heygem_ray.media.video import auto_codec, encoder_works

    codecs = set(av.codecs_available)
    return {
        "opencv": cv2.__version__,
        "opencv_haar": hasattr(cv2, "CascadeClassifier"),
        "pyav": av.__version__,
        "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
        **{f"pyav_has_{name}": name in codecs for name in ("h264_nvenc", "h264_cuvid", "hevc_nvenc", "libx264")},
        "h264_nvenc_opens": encoder_works("h264_nvenc") if "h264_nvenc" in codecs else False,
        "encoder_auto": auto_codec(),
    }


#: x264 settings timed on one core: the product's default, then x264's presets
X264_SETTINGS = ("default", "veryfast", "superfast", "ultrafast")


def codec_speeds(work: Path, height: int, frames: int, report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Per frame on one thread: H.264 decode, x264 encode per setting (CRF 18) and the size each
    gives; NVDEC (the renderer's `decoder.device` path) where it opens. Decoders get wall and CPU milliseconds: NVDEC
    is worth having for the CPU it leaves to x264. The clip is node.py's avatar. The software figures
    go to `report` before NVDEC is tried: a path never run on a GPU before, which may hang or crash."""
    import time

    import av

    from benchmarks.bench_encoder import encode, x264_options
    from benchmarks.gpu.node import FPS, make_avatar
    from heygem_ray.media.video import nvdec_accel, nvdec_problem

    clip = work / "codec-clip.mp4"
    make_avatar(clip, frames / FPS, height, os.cpu_count() or 1)
    out: dict[str, Any] = {"codec_height": height, "codec_frames": frames}

    def decode(nvdec: int | None) -> tuple[float, float, list[Any]]:
        accel = None if nvdec is None else nvdec_accel(nvdec)  # the product's NVDEC path (FrameReader)
        with av.open(str(clip), "r", hwaccel=accel) as container:
            stream = container.streams.video[0]
            if nvdec is not None and not stream.codec_context.is_hwaccel:
                raise ValueError("the H.264 decoder opened without CUDA")
            stream.codec_context.thread_count, stream.codec_context.thread_type = 1, "NONE"
            start, cpu, planes = time.perf_counter(), time.process_time(), []
            for frame in container.decode(stream):
                if nvdec is not None and frame.format.name != "nv12":
                    raise ValueError(f"FFmpeg fell back to software decoding ({frame.format.name} frames)")
                planes.append(frame.to_ndarray(format="yuv420p"))
            count = max(1, len(planes))
            return (time.perf_counter() - start) * 1000 / count, (time.process_time() - cpu) * 1000 / count, planes

    soft_ms, soft_cpu_ms, planes = decode(None)
    out["decode_ms"], out["decode_cpu_ms"] = round(soft_ms, 2), round(soft_cpu_ms, 2)
    for name in X264_SETTINGS:  # CPU time on one thread (x264 as a one-thread renderer runs it)
        sink = work / f"codec-{name}.mp4"
        out[f"x264_{name}_ms"] = round(encode(planes, x264_options(name), str(sink)) * 1000 / len(planes), 2)
        out[f"x264_{name}_kib_per_frame"] = round(sink.stat().st_size / 1024 / len(planes), 1)
    report(out)
    # as a GPU actor does (heygem_ray.segment.nvdec_device): the context waits by blocking (set as
    # the step began: FFmpeg shares only such a context), torch's context, then NVDEC's probe in it
    try:
        common.hold_gpu_context(0)
        problem = nvdec_problem(0)
        if problem:
            raise ValueError(problem)
        nvdec_ms, nvdec_cpu_ms, nvdec = decode(0)
        out["nvdec_ms"], out["nvdec_cpu_ms"] = round(nvdec_ms, 2), round(nvdec_cpu_ms, 2)
        out["nvdec_frames"] = len(nvdec)
        out["nvdec_matches"] = len(nvdec) == len(planes) and all((a == b).all() for a, b in zip(nvdec, planes))
    except (av.error.FFmpegError, ValueError, OSError, NotImplementedError, RuntimeError, AssertionError) as exc:
        out["nvdec_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in (*VERSIONS, *(c.dist for c in CARRIED)):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def stage_imports() -> dict[str, Any]:
    """Import every stage the node benchmark runs; whether Ray came along."""
    import heygem_ray.prepare
    import heygem_ray.render.wav2lip
    import heygem_ray.segment
    import heygem_ray.stitch  # noqa: F401
    from heygem_ray.models.wav2lip_audio import _mel_basis

    _mel_basis()  # the saved filterbank, read as the renderer reads it
    imported = "ray" in sys.modules  # before the probe below, which imports Ray where it is installed
    return {"ray_imported": imported, "ray_installed": _installed("ray")}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def body(result: common.StepResult, args: argparse.Namespace) -> None:
    from heygem_ray.devices import prefer_blocking_sync

    # before any CUDA context: FFmpeg takes the GPU's primary context for NVDEC only while it is not
    # yet active or when it waits by blocking (heygem_ray.segment.nvdec_device); so the codecs,
    # NVDEC last of all (never run on a GPU in this form), can come after the GPU facts
    prefer_blocking_sync(0)
    facts: dict[str, Any] = {}

    def report(figures: dict[str, Any]) -> None:
        common.write_partial(args.out, "env", {**facts, **figures})

    # each group's facts written as they come: a step stopped at its budget (or one group raising,
    # or NVDEC crashing the process) still reports the GPU, driver and versions
    groups: tuple[Callable[[], dict[str, Any]], ...] = (
        cpu_facts,
        gpu_facts,
        media_facts,
        lambda: {"versions": versions()},
        stage_imports,
        lambda: codec_speeds(work, 180 if result.dry_run else 1080, 10 if result.dry_run else 100, report),
    )
    with common.scratch(args, "env") as work:
        for group in groups:
            try:
                facts.update(group())
            except Exception as exc:  # noqa: BLE001 - the other groups' facts still count
                facts.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}"[:500])
            common.write_partial(args.out, "env", facts)
    result.figures = facts
    for key, value in facts.items():
        print(f"  {key}: {value}", flush=True)
    if not result.dry_run:
        result.check("CUDA is available", bool(facts.get("cuda_available")))
    result.check("heygem_ray stages import without Ray", facts.get("ray_imported") is False)
    try:
        result.markdown = markdown(facts)
    except KeyError:  # a group failed: its facts are not there to be written up
        result.markdown = (
            "Facts (a group failed):\n\n```\n" + json.dumps(facts, indent=1, default=str)[:20_000] + "\n```"
        )


def markdown(f: dict[str, Any]) -> str:
    gpu = (
        f"{f.get('gpu')} ({f.get('gpu_memory_gib')} GiB, compute {f.get('capability')}, driver {f.get('driver')}, "
        f"MIG {f.get('mig_mode')})"
        if f.get("cuda_available")
        else "no GPU"
    )
    v = f["versions"]
    hw = ", ".join(f"{k.removeprefix('pyav_has_')} {'yes' if f[k] else 'no'}" for k in f if k.startswith("pyav_has_"))
    return (
        f"Machine: {f['cpu']}, {f['cores']} cores ({f['usable_cores']} usable), {f['memory_gib']} GiB RAM; {gpu}; "
        f"Python {f['python']}, torch {f['torch']} (CUDA {f['torch_cuda']}, cuDNN {f.get('cudnn')}), "
        f"numpy {v.get('numpy')}, OpenCV {f['opencv']} (Haar cascade {'yes' if f['opencv_haar'] else 'no'}), "
        f"PyAV {f['pyav']} (libavcodec {f['ffmpeg']}; {hw}; h264_nvenc opens: "
        f"{'yes' if f['h264_nvenc_opens'] else 'no'}, encoder.codec=auto → {f['encoder_auto']}). "
        "Ray installed: "
        f"{'yes' if f['ray_installed'] else 'no'}.\n\n" + codec_markdown(f)
    )


def codec_markdown(f: dict[str, Any]) -> str:
    """One line: what one core does with the node's H.264 (and NVDEC, where it decodes)."""
    x264 = ", ".join(
        f"{p} {f[f'x264_{p}_ms']} ms ({f[f'x264_{p}_kib_per_frame']} KiB/frame)"
        for p in X264_SETTINGS
        if f"x264_{p}_ms" in f
    )
    nvdec = (
        f"NVDEC {f['nvdec_ms']} ms/frame, {f.get('nvdec_cpu_ms', '?')} ms of CPU ({f['nvdec_frames']} frames, "
        f"identical to software: {'yes' if f['nvdec_matches'] else 'no'})"
        if "nvdec_ms" in f
        else f"NVDEC: {f.get('nvdec_error', 'not tried')}"
    )
    return (
        f"One core, {f['codec_height']}p H.264 ({f['codec_frames']} frames of the node clip): decode "
        f"{f['decode_ms']} ms/frame ({f.get('decode_cpu_ms', '?')} ms of CPU); x264 CRF 18: {x264}; {nvdec}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = common.step_args(argv, "env", __doc__)
    return common.run_step("env", args, lambda result: body(result, args))


if __name__ == "__main__":
    sys.exit(main())
