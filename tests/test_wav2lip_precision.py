"""Wav2LipRenderer numerics: precision and batch size "auto", bf16 against fp32 in the mouth region of
a real-looking face, the TF32 decision for fp32 on CUDA, and the guard that keeps NaN/inf generator
output from reaching the uint8 conversion."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import pytest
import torch

from heygem_ray import demo
from heygem_ray.devices import cpu_bf16_is_faster, cpu_int8_is_faster
from heygem_ray.media.audio import AudioWindow
from heygem_ray.models import wav2lip_cpu
from heygem_ray.models.wav2lip_cpu import FULL_RANGE, NARROW_RANGE
from heygem_ray.render import wav2lip as wav2lip_module
from heygem_ray.render.wav2lip import (
    CPU_BATCH,
    MASK_ZERO_ABOVE,
    Wav2LipRenderer,
    resolve_precision,
)

BOX = np.array([76, 56, 190, 172])  # the face on the demo portrait at width 256, padded as the track does
# bf16 autocast against fp32, PSNR over the lower half of the face box (where the mouth is generated)
# of 4 portrait frames. Measured with the recipe weights: 51.3-52.0 dB per frame, max |diff| 6 levels,
# for the cpu and device image paths on three head-motion clips; the bound leaves ~6 dB (4x the MSE).
BF16_MIN_PSNR_DB = 45.0
# int8 (face and audio encoders, decoder) against fp32, same region and frames: measured 42.7-43.2 dB
# per frame, max |diff| 23 levels, on three head-motion clips and both image paths; the bound leaves ~3 dB
INT8_MIN_PSNR_DB = 40.0
# int8 at the narrowed ranges of CPUs without VNNI (wav2lip_cpu.NARROW_RANGE): measured 39.5-40.1 dB,
# max |diff| 26 levels, same clips and paths; the same ~3 dB margin
INT8_NARROW_MIN_PSNR_DB = 37.0


@pytest.fixture(scope="module")
def portrait_frames() -> list[np.ndarray]:
    base = demo.portrait(256)
    return [demo.head_motion_frame(base, i / 25, seed=3) for i in range(4)]


@pytest.fixture(scope="module")
def mels(recipe_checkpoints) -> np.ndarray:
    wav = demo.speech_like(1.0, seed=3)
    renderer = Wav2LipRenderer(recipe_checkpoints["wav2lip"], device="cpu")
    return renderer.features(AudioWindow(wav, 0, len(wav), 0.1), np.arange(4), 25.0)


def test_auto_precision_and_batch_size_on_the_cpu(recipe_checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="heygem_ray.render.wav2lip"):
        renderer = Wav2LipRenderer(recipe_checkpoints["wav2lip"], device="cpu")
    want = resolve_precision("auto", torch.device("cpu"))  # what this CPU's flags give (below)
    assert renderer.precision == want and renderer.batch_size == CPU_BATCH == 8
    logged = [r for r in caplog.records if "precision" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO and want in logged[0].getMessage()
    explicit = Wav2LipRenderer(recipe_checkpoints["wav2lip"], batch_size=5, precision="fp16", device="cpu")
    assert explicit.precision == "fp32" and explicit.batch_size == 5  # no fast fp16 convolutions on CPUs
    with pytest.raises(ValueError, match="batch_size"):
        Wav2LipRenderer(recipe_checkpoints["wav2lip"], batch_size=-1, device="cpu")


@pytest.mark.parametrize(
    ("flags", "auto"),
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids
        ({"avx2", "avx512f", "avx512_vnni"}, "int8"),  # Cascade Lake
        ({"avx2", "fma"}, "int8"),  # Zen 3
        ({"avx", "sse4_2"}, "fp32"),  # Sandy Bridge
        (set(), "fp32"),  # not x86: an Arm /proc/cpuinfo has no "flags"
    ],
)
def test_resolve_precision(monkeypatch, flags, auto):
    monkeypatch.setattr("heygem_ray.devices.cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == auto
    assert [resolve_precision(p, cpu) for p in ("fp32", "int8", "fp16", "bf16")] == ["fp32", "int8", "fp32", "bf16"]
    assert resolve_precision("int8", torch.device("meta")) == "fp32"  # int8 is a CPU precision


def test_which_cpus_get_bf16_and_int8():
    sapphire_rapids = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"})
    cascade_lake = frozenset({"avx2", "avx512f", "avx512_vnni"})
    alder_lake = frozenset({"avx2", "avx_vnni"})
    skylake_sp = frozenset({"avx2", "fma", "avx512f", "avx512bw"})
    zen3 = frozenset({"avx2", "fma", "sse4_2"})
    sandy_bridge = frozenset({"avx", "sse4_2"})
    not_x86 = frozenset()  # an Arm /proc/cpuinfo has "Features", not "flags"
    cpus = (sapphire_rapids, cascade_lake, alder_lake, skylake_sp, zen3, sandy_bridge, not_x86)
    assert [cpu_bf16_is_faster(f) for f in cpus] == [True, False, False, False, False, False, False]
    assert [cpu_int8_is_faster(f) for f in cpus] == [True, True, True, True, True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_precision_on_cuda():
    cuda = torch.device("cuda")
    native_bf16 = torch.cuda.get_device_capability(cuda) >= (8, 0)
    assert resolve_precision("auto", cuda) == ("bf16" if native_bf16 else "fp16")
    assert resolve_precision("fp16", cuda) == "fp16"
    assert resolve_precision("int8", cuda) == resolve_precision("auto", cuda)  # int8 is a CPU precision


@pytest.fixture
def tf32_on():
    """TF32 allowed for the test, the process's flags restored after (they are properties of torch's
    backend modules, which monkeypatch cannot restore)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_official_models_run_fp32_on_cuda_without_tf32(tf32_on):
    """On Ampere and later, torch runs fp32 convolutions in TF32 by default: S3FD's boxes and the
    expert's scores were not the official models' (only the fp32 generator turned it off, and the
    GPU check kit certified S3FD with it off). Each turns it off on CUDA; on a CPU the flags stay."""
    from heygem_ray.detect.s3fd import S3FDDetector
    from heygem_ray.devices import exact_fp32
    from heygem_ray.models.s3fd import S3FD

    exact_fp32(torch.device("cpu"))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    exact_fp32(torch.device("cuda", 1))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    with contextlib.suppress(RuntimeError, AssertionError):  # no CUDA on this machine: the flags come first
        S3FDDetector(S3FD(), device=torch.device("cuda"))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_cpu_renderer_leaves_tf32_flags_alone(recipe_checkpoints, tf32_on):
    Wav2LipRenderer(recipe_checkpoints["wav2lip"], precision="fp32", device="cpu")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_renderer_on_cuda_turns_tf32_off(recipe_checkpoints, tf32_on):
    Wav2LipRenderer(recipe_checkpoints["wav2lip"], precision="fp32", device="cuda")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.fixture(scope="module")
def fp32_frames(recipe_checkpoints, portrait_frames, mels):
    """The fp32 renderer's frames for each image_ops, made once for every reduced precision."""
    made: dict[str, list[np.ndarray]] = {}

    def frames(image_ops: str) -> list[np.ndarray]:
        if image_ops not in made:
            fp32 = Wav2LipRenderer(
                recipe_checkpoints["wav2lip"], precision="fp32", batch_size=4, device="cpu", image_ops=image_ops
            )
            boxes = np.tile(BOX, (len(portrait_frames), 1))
            made[image_ops] = fp32.render([f.copy() for f in portrait_frames], boxes, mels[: len(portrait_frames)])
        return made[image_ops]

    return frames


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("image_ops", ["cpu", "device"])
@pytest.mark.parametrize("precision", ["bf16", "int8", "int8-narrow"])
def test_reduced_precision_stays_close_to_fp32_in_the_mouth(
    recipe_checkpoints, portrait_frames, mels, fp32_frames, image_ops, precision, monkeypatch
):
    """bf16 autocast runs on any CPU (emulated where there is no bf16 hardware: slower, same
    numbers); int8 on any x86 CPU (oneDNN's int8 kernels, fast with VNNI), at this CPU's ranges
    and at the narrowed ones a CPU without VNNI gets (exact on every CPU)."""
    if precision == "int8-narrow":
        if wav2lip_cpu.int8_range() == NARROW_RANGE:
            pytest.skip("this CPU's int8 already runs at the narrowed ranges: the int8 case is this one")
        monkeypatch.setattr(wav2lip_cpu, "int8_range", lambda: NARROW_RANGE)
        precision, bound = "int8", INT8_NARROW_MIN_PSNR_DB
    elif precision == "int8":
        bound = INT8_MIN_PSNR_DB if wav2lip_cpu.int8_range() == FULL_RANGE else INT8_NARROW_MIN_PSNR_DB
    else:
        bound = BF16_MIN_PSNR_DB
    frames = portrait_frames
    if precision == "bf16" and not cpu_bf16_is_faster():
        frames = frames[:2]  # emulated bf16 (~2 s a frame here) gives the same numbers, slowly
    reduced = Wav2LipRenderer(
        recipe_checkpoints["wav2lip"], precision=precision, batch_size=4, device="cpu", image_ops=image_ops
    )
    assert reduced.precision == precision
    boxes = np.tile(BOX, (len(frames), 1))
    want = fp32_frames(image_ops)[: len(frames)]
    got = reduced.render([f.copy() for f in frames], boxes, mels[: len(frames)])
    x1, y1, x2, y2 = BOX
    mouth = np.s_[(y1 + y2) // 2 : y2, x1:x2]
    for frame, w, g in zip(frames, want, got):
        assert np.abs(w[mouth].astype(int) - frame[mouth]).mean() > 20  # the region is generated
        assert not np.array_equal(g, w)  # the reduced precision really ran
        assert _psnr(g[mouth], w[mouth]) >= bound, _psnr(g[mouth], w[mouth])


def test_int8_that_strays_from_fp32_on_the_probe_falls_back_to_fp32(recipe_checkpoints, monkeypatch, caplog):
    monkeypatch.setattr(wav2lip_module, "INT8_MIN_PROBE_PSNR_DB", 99.0)  # no int8 generator is that close
    with caplog.at_level(logging.WARNING, logger="heygem_ray.render.wav2lip"):
        renderer = Wav2LipRenderer(recipe_checkpoints["wav2lip"], precision="int8", device="cpu")
    assert renderer.precision == "fp32" and renderer.fused
    assert any("int8 generator is" in r.getMessage() and "running fp32" in r.getMessage() for r in caplog.records)


def test_int8_is_not_compiled(recipe_checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="heygem_ray.render.wav2lip"):
        renderer = Wav2LipRenderer(recipe_checkpoints["wav2lip"], precision="int8", device="cpu", compile=True)
    assert renderer.precision == "int8" and not renderer.compiled
    assert any("does not apply to the int8" in r.getMessage() for r in caplog.records)


def nan_renderer(checkpoint: str, **options: Any) -> Wav2LipRenderer:
    """A renderer of the recipe weights with one NaN put into its output block once loaded (a file
    holding one is refused): the generator's green channel is NaN at every pixel, as an fp16
    overflow would give."""
    renderer = Wav2LipRenderer(checkpoint, **options)
    with torch.no_grad():
        renderer.model.output_block[1].weight[1, 0, 0, 0] = float("nan")
    return renderer


@pytest.mark.parametrize("image_ops", ["cpu", "device"])
@pytest.mark.parametrize("blend", ["hard", "feather"])
def test_nan_output_gives_valid_frames(recipe_checkpoints, portrait_frames, mels, image_ops, blend):
    renderer = nan_renderer(
        recipe_checkpoints["wav2lip"], batch_size=4, precision="fp32", blend=blend, device="cpu", image_ops=image_ops
    )
    boxes = np.tile(BOX, (len(portrait_frames), 1))
    out = renderer.render([f.copy() for f in portrait_frames], boxes, mels)
    x1, y1, x2, y2 = BOX
    outside = np.ones(portrait_frames[0].shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    for frame, got in zip(portrait_frames, out):
        assert got.shape == frame.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got[outside], frame[outside])
        cy, cx = y1 + int(0.8 * (y2 - y1)), (x1 + x2) // 2
        mouth = np.s_[cy - 3 : cy + 3, cx - 8 : cx + 8]
        assert (got[mouth][..., 1] == 0).all()  # the NaN channel became 0
        assert np.abs(got[mouth].astype(int) - frame[mouth])[..., [0, 2]].mean() > 5  # the others are generated
        if blend == "feather":  # the upper face, where the mask is 0, is the original: NaN * 0 leaked nowhere
            top = y1 + int(MASK_ZERO_ABOVE * (y2 - y1)) - 1
            np.testing.assert_array_equal(got[y1:top, x1:x2], frame[y1:top, x1:x2])
