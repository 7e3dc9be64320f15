"""Which device a stage may use, and what the CPU can do fast.

Current Ray no longer hides GPUs from processes that asked for none (it used to set an empty
CUDA_VISIBLE_DEVICES), so `torch.cuda.is_available()` is true in every task and actor on a GPU
node. A stage that counts as GPU-free for Ray's scheduler must then stay off the GPU: inside Ray
the device follows the GPUs Ray assigned to this process (`ray.get_gpu_ids()`); outside Ray (a
laptop run, a test, the GPU check kit) it follows what torch sees.

torch is imported only where a question needs it: a Ray worker that Ray gave no GPU learns that
without it, so a weights-free campaign's actors never load torch (~3 s of each one's start on a
small CPU).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def assigned_gpus() -> list[str] | None:
    """The GPU ids Ray gave this worker process, or None when this process is not a Ray worker."""
    ray = sys.modules.get("ray")  # not imported here: processes outside Ray never need it
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        if global_worker.mode != WORKER_MODE:
            return None  # the driver: no GPU was assigned to it, it uses what it sees
    except ImportError:  # a Ray without these internals: trust get_gpu_ids alone
        pass
    return [str(g) for g in ray.get_gpu_ids()]


def cuda_usable() -> bool:
    """Whether this process may run CUDA work: a GPU Ray assigned to it (inside Ray), or any GPU
    torch sees (outside Ray)."""
    gpus = assigned_gpus()
    if gpus is not None and not gpus:
        return False
    import torch

    return torch.cuda.is_available()


#: CU_CTX_SCHED_BLOCKING_SYNC: a thread waiting for the GPU sleeps instead of spinning on a core
_BLOCKING_SYNC = 0x4


def prefer_blocking_sync(index: int) -> bool:
    """Make CUDA device `index`'s primary context (the one torch and FFmpeg share) wait for the GPU
    by blocking, not spinning: with one context per process, CUDA's default spins a core in every
    wait, and a GPU node's renderers are bound by its CPUs (x264, decode). Call it before the
    context exists. Returns whether the driver took it (False without a CUDA driver)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    set_flags = getattr(driver, "cuDevicePrimaryCtxSetFlags_v2", None) or getattr(
        driver, "cuDevicePrimaryCtxSetFlags", None
    )
    device = ctypes.c_int()
    if set_flags is None or driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(device), index) != 0:
        return False
    return bool(set_flags(device, _BLOCKING_SYNC) == 0)


def exact_fp32(device: torch.device) -> None:
    """On CUDA, this process's fp32 convolutions and matmuls in full fp32: Ampere and later run them
    in TF32 by default (a 10-bit mantissa), and the official models' numbers (the Wav2Lip
    generator's at fp32, S3FD's boxes, the SyncNet expert's scores) would no longer be theirs; one
    setting for the process, which autocast's bf16/fp16 convolutions do not use."""
    if device.type != "cuda":
        return
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def set_torch_threads(threads: int) -> None:
    """torch's thread count for this process: set now where torch is loaded, else through
    OMP_NUM_THREADS, which torch reads when it is first imported (so a process that never needs
    it, a weights-free renderer's, is spared loading it)."""
    if "torch" in sys.modules:
        import torch  # waits for an import another thread may still be running

        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def cuda_index() -> int:
    """The CUDA index, as this process sees its devices, of the GPU Ray gave it. Ray's ids are the
    node's: where Ray set CUDA_VISIBLE_DEVICES to them the process sees them from 0; where it left
    the variable alone (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1) it sees every GPU, and a
    plain "cuda" put every actor of the node on GPU 0. 0 outside Ray."""
    gpus = assigned_gpus()
    if not gpus:
        return 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return int(gpus[0]) if gpus[0].isdigit() else 0
    return visible.index(gpus[0]) if gpus[0] in visible else 0


def torch_device(requested: str = "auto") -> torch.device:
    """`auto` → the CUDA device Ray gave this process when `cuda_usable()`, else CPU; any other
    value is taken as a torch device."""
    import torch

    if requested == "auto":
        return torch.device(f"cuda:{cuda_index()}" if cuda_usable() else "cpu")
    return torch.device(requested)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_is_faster(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 runs the Wav2Lip generator faster than fp32 on this CPU (or one with `flags`):
    only with AMX tiles (Sapphire Rapids and later). Measured with batch 16 on one thread: on a Xeon
    with AVX512-BF16 but no AMX, bf16 autocast gives 10.6 frames/s against fp32's 14.4 (0.7x);
    without AVX-512 it is emulated and ~13x slower."""
    return "amx_bf16" in (cpu_flags() if flags is None else flags)


def cpu_int8_is_faster(flags: frozenset[str] | None = None) -> bool:
    """Whether the int8 generator (`models.wav2lip_cpu`) beats fused fp32 on this CPU (or one with
    `flags`): on any x86 CPU with AVX2, where it was measured faster (below AVX2, unmeasured).
    Decoder frames/s, one thread, batch 8, on one Xeon with oneDNN limited to each ISA
    (`ONEDNN_MAX_CPU_ISA`; not on Haswell or Zen hardware itself): with VNNI 49.4 against fp32's
    18.6 (2.7x); AVX-512 without VNNI (Skylake-SP) 25.4 against 18.6 (1.4x); AVX2 (Haswell to
    Zen 3) 20.2 against 10.9 (1.9x); on AMD EPYC Zen 3 hardware (family 25, AVX2) the whole
    generator 16.6 against 8.5 (1.9x), though one other AMD host found them alike. Without VNNI
    the int8 ranges are narrowed so no sum saturates (`wav2lip_cpu.int8_range`)."""
    return "avx2" in (cpu_flags() if flags is None else flags)


def gpu_slots(gpus: float, per_actor: float) -> int:
    """Actors of `per_actor` GPU that `gpus` GPUs host. Ray places a fraction of a GPU on one GPU,
    so each hosts floor(1 / per_actor) of them (3 of 0.3, not 3.33: 4 GPUs host 12, not 13), and
    whole-GPU actors take whole GPUs."""
    whole = math.floor(gpus + 1e-9)
    if per_actor >= 1:
        return math.floor(whole / per_actor + 1e-9)
    return whole * math.floor(1 / per_actor + 1e-9)


def gpu_room(gpus: float, actors: int, per_actor: float, share: float) -> bool:
    """Whether a task of `share` of a GPU finds room beside `actors` actors of `per_actor` GPU on
    `gpus` GPUs wherever Ray put them: it needs that much on one GPU, so what counts is the GPU with
    the fewest actors (at most actors // GPUs of them), not the sum left over (0.2 of 2 GPUs can be
    0.1 on each)."""
    whole = math.floor(gpus + 1e-9)
    if whole < 1:
        return False
    if per_actor >= 1:
        return whole - actors * per_actor >= 1 - 1e-9  # a GPU no actor holds
    return 1 - per_actor * (actors // whole) >= share - 1e-9
