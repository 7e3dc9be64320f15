"""Step (a): the node's facts: GPU, driver, torch/CUDA, cores, memory, OpenCV, PyAV's hardware codecs,
the versions of what the kit imports, and whether heygem_ray's stages import without Ray.

    python -m benchmarks.gpu.env --out DIR [--dry-run]
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
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
    "hydra-core",
    "omegaconf",
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


def body(result: common.StepResult) -> None:
    facts = {**cpu_facts(), **gpu_facts()}
    facts.update(media_facts())
    facts["versions"] = versions()
    facts.update(stage_imports())
    result.figures = facts
    for key, value in facts.items():
        print(f"  {key}: {value}", flush=True)
    if not result.dry_run:
        result.check("CUDA is available", facts["cuda_available"])
    result.check("heygem_ray stages import without Ray", not facts["ray_imported"])
    result.markdown = markdown(facts)


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
        f"{'yes' if f['h264_nvenc_opens'] else 'no'}, encoder.codec=auto → {f['encoder_auto']}), "
        f"hydra-core {v.get('hydra-core')}. Ray installed: "
        f"{'yes' if f['ray_installed'] else 'no'}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = common.step_args(argv, "env", __doc__)
    return common.run_step("env", args, body)


if __name__ == "__main__":
    sys.exit(main())
