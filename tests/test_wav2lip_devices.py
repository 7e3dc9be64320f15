"""Device choice of the GPU stages inside Ray: with device="auto", a Wav2Lip renderer or S3FD
detector in a worker that Ray gave no GPU stays on the CPU even where torch sees a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def test_auto_device_follows_rays_gpu_assignment(ray_local, recipe_checkpoints):
    ray = ray_local

    @ray.remote(num_gpus=0)
    def auto_devices(checkpoint: str) -> tuple[str, str]:
        import torch

        from heygem_ray.detect.s3fd import S3FDDetector
        from heygem_ray.models.s3fd import S3FD
        from heygem_ray.render.wav2lip import Wav2LipRenderer

        # a GPU node as torch sees it: current Ray no longer hides the GPUs from a process that
        # asked for none. (The worker process is reused by later tasks: restored below.)
        real = torch.cuda.is_available
        torch.cuda.is_available = lambda: True
        try:
            detector = S3FDDetector(S3FD(), device="auto")
            renderer = Wav2LipRenderer(checkpoint, batch_size=1, precision="fp32")
            return str(detector.device), str(renderer.device)
        finally:
            torch.cuda.is_available = real

    assert ray.get(auto_devices.remote(recipe_checkpoints["wav2lip"])) == ("cpu", "cpu")


def test_blocking_sync_is_left_alone_without_a_cuda_driver():
    """Renderers ask the driver for a context that sleeps while it waits for the GPU (not a spin
    per wait on a node bound by its CPUs); without a driver that is a no-op, never an error. The
    GPU kit's node step reports the mode a GPU's renderers got (`cuda_sync`)."""
    import ctypes

    from heygem_ray.devices import prefer_blocking_sync

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert prefer_blocking_sync(0) is False
        return
    if not torch.cuda.is_available():
        assert prefer_blocking_sync(0) is False  # a driver, no GPU: cuInit refuses
        return
    # a GPU: in a fresh process (this one may hold a context already), the context torch makes
    # after the call waits by blocking
    code = (
        "import torch\n"
        "from heygem_ray.devices import prefer_blocking_sync\n"
        "from benchmarks.gpu.common import context_sync\n"
        "took = prefer_blocking_sync(0)\n"
        "torch.zeros(1, device='cuda:0')\n"
        "print(took, context_sync())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "blocking"], out.stderr[-2000:]


def test_the_cuda_index_is_the_gpu_ray_assigned(monkeypatch):
    """Ray gives a GPU actor a node's GPU id and, normally, CUDA_VISIBLE_DEVICES of just it (index
    0 as the process sees it); where it leaves that variable alone
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1) every GPU is visible, and "cuda" put every
    actor of the node on GPU 0."""
    from heygem_ray import devices

    monkeypatch.setattr(devices, "assigned_gpus", lambda: ["3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert devices.cuda_index() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert devices.cuda_index() == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.cuda_index() == 3
    monkeypatch.setattr(devices, "assigned_gpus", lambda: None)  # outside Ray: the first it sees
    assert devices.cuda_index() == 0
