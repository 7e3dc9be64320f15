"""Wav2LipRenderer: official preprocessing, untouched pixels outside the box, hard vs feathered paste,
the torch (device) image path against the OpenCV one (its feather mask, its recovery from a failed
batch), and the torch.compile option: its fallback, compile_now() and the compile worker cap."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from heygem_ray.media.audio import AudioWindow
from heygem_ray.render.wav2lip import (
    MASK_ZERO_ABOVE,
    Wav2LipRenderer,
    _feather_mask,
    _feather_mask_torch,
    _feather_weights,
    _resize,
)
from recipe_weights import read_keys, recipe_state_dict

DATA = Path(__file__).parent / "data"
H, W = 160, 200
BOXES = np.array([[60, 30, 140, 130], [58, 32, 141, 128], [-5, 90, 70, 175]])  # the last sticks out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("w2l") / "wav2lip.pth"
    torch.save({"state_dict": recipe_state_dict(read_keys(DATA / "wav2lip_state_dict.tsv"), seed=0)}, path)
    return str(path)


@pytest.fixture(scope="module")
def hard(checkpoint) -> Wav2LipRenderer:
    return Wav2LipRenderer(checkpoint, batch_size=8, precision="fp32", blend="hard", device="cpu")


@pytest.fixture(scope="module")
def feather(checkpoint) -> Wav2LipRenderer:
    return Wav2LipRenderer(checkpoint, batch_size=2, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 3)
    return [np.roll(base, 3 * i, axis=1) for i in range(3)]


@pytest.fixture(scope="module")
def features(hard) -> np.ndarray:
    t = np.arange(16_000) / 16_000
    wav = (0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32)
    return hard.features(AudioWindow(wav, 0, len(wav), 0.1), np.arange(3), 25.0)


def _inside(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], W), min(box[3], H)
    mask = np.zeros((H, W), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _official(model: torch.nn.Module, frame: np.ndarray, box: np.ndarray, mel: np.ndarray) -> np.ndarray:
    """Spec §4 steps 6-10 written out the official way (numpy float64 /255, hard paste)."""
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], W), min(box[3], H)
    face = cv2.resize(frame[y1:y2, x1:x2], (96, 96))[None]
    masked = face.copy()
    masked[:, 48:] = 0
    inp = np.transpose(np.concatenate((masked, face), axis=3) / 255.0, (0, 3, 1, 2))
    with torch.inference_mode():
        pred = model(torch.from_numpy(mel[None, None]).float(), torch.FloatTensor(inp))
    pred = pred.numpy().transpose(0, 2, 3, 1)[0] * 255.0
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(pred.astype(np.uint8), (x2 - x1, y2 - y1))
    return out


def test_features_are_mel_windows(features):
    assert features.shape == (3, 80, 16) and features.dtype == np.float32
    assert features.min() >= -4 and features.max() <= 4 and features.std() > 0.5


def test_hard_paste_is_the_official_pipeline(hard, frames, features):
    out = hard.render([f.copy() for f in frames], BOXES, features)
    assert len(out) == 3
    for frame, box, mel, got in zip(frames, BOXES, features, out):
        assert got.shape == (H, W, 3) and got.dtype == np.uint8
        inside = _inside(box)
        np.testing.assert_array_equal(got[~inside], frame[~inside])
        changed = np.abs(got.astype(int) - frame).max(axis=2) > 8
        assert changed[inside].mean() > 0.5
        want = _official(hard.model, frame, box, mel)
        assert np.abs(got.astype(int) - want).max() <= 1  # truncation may flip one level
        assert (got == want).mean() > 0.99


def test_feather_differs_from_hard_only_inside_the_box(hard, feather, frames, features):
    hard_out = hard.render([f.copy() for f in frames], BOXES, features)
    soft_out = feather.render([f.copy() for f in frames], BOXES, features)
    for frame, box, h, s in zip(frames, BOXES, hard_out, soft_out):
        inside = _inside(box)
        np.testing.assert_array_equal(s[~inside], frame[~inside])
        differs = np.abs(s.astype(int) - h).max(axis=2) > 1
        assert differs.any() and not differs[~inside].any()
        x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], W), min(box[3], H)
        upper = y1 + int(MASK_ZERO_ABOVE * (y2 - y1)) - 1
        np.testing.assert_array_equal(s[y1:upper, x1:x2], frame[y1:upper, x1:x2])  # eyes kept
        cy, cx = y1 + int(0.75 * (y2 - y1)), (x1 + x2) // 2  # the mouth is fully generated
        assert np.abs(s[cy - 2 : cy + 3, cx - 5 : cx + 5].astype(int) - h[cy - 2 : cy + 3, cx - 5 : cx + 5]).max() <= 1
        # no seam: along the box's left and bottom edges the result stays close to the original
        edge = np.abs(s[y1 : y2 - 1, x1].astype(int) - frame[y1 : y2 - 1, x1]).max()
        assert edge <= 3, edge


def test_feather_blend_is_the_weighted_sum_rounded():
    """The CPU paste (cv2.blendLinear with the cached weights) is original * (1 - mask) + generated
    * mask rounded to the nearest level: off by one level at most, on a few pixels, and exact where
    the mask is 0 (the eyes) or 1."""
    rng = np.random.default_rng(5)
    height, width = 301, 256
    original = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    keep, mask = _feather_weights(height, width)
    assert not keep.flags.writeable and not mask.flags.writeable
    got = cv2.blendLinear(original, generated, keep, mask).astype(int)
    want = np.rint(original * (1.0 - mask[..., None]) + generated * mask[..., None]).astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    np.testing.assert_array_equal(got[mask == 0], original[mask == 0])
    np.testing.assert_array_equal(got[mask == 1], generated[mask == 1])
    assert (mask == 0).any() and (mask == 1).any()


def test_empty_box_and_read_only_frames(hard, frames, features):
    frozen = [f.copy() for f in frames[:2]]
    for f in frozen:
        f.flags.writeable = False
    boxes = np.array([[10, 10, 10, 50], [60, 30, 140, 130]])  # first has no width
    out = hard.render(frozen, boxes, features[:2])
    np.testing.assert_array_equal(out[0], frames[0])
    assert not np.array_equal(out[1], frames[1]) and np.array_equal(frozen[1], frames[1])


def test_mismatched_lengths_are_rejected(hard, frames, features):
    with pytest.raises(ValueError, match="3 frames, 2 boxes"):
        hard.render([f.copy() for f in frames], BOXES[:2], features)


def test_options_are_validated(checkpoint):
    with pytest.raises(ValueError, match="precision"):
        Wav2LipRenderer(checkpoint, precision="int4")
    with pytest.raises(ValueError, match="blend"):
        Wav2LipRenderer(checkpoint, blend="poisson")
    with pytest.raises(ValueError, match="image_ops"):
        Wav2LipRenderer(checkpoint, image_ops="gpu")


# --- the device image path (torch crop / resize / blend), run here on the CPU ---------------------

# Boxes of different sizes, two of the same size (resized together), at every frame border, one
# covering the whole frame, one tiny (upscaled) and one empty; batch_size 3 splits them 3 + 3 + 2.
MIXED = np.array(
    [
        [60, 30, 140, 130],
        [58, 32, 141, 128],
        [60, 30, 140, 130],
        [-5, 90, 70, 175],
        [150, -10, 230, 60],
        [0, 0, W, H],
        [10, 10, 40, 30],
        [10, 10, 10, 50],
    ]
)
# Tolerance of the device path against the cv2 path, inside the boxes. cv2 resizes uint8 with
# 11-bit fixed-point weights, torch in float32; sampling positions and edge clamping are the same
# (test_resize_matches_cv2), so resized pixels differ by at most one level. Those one-level input
# differences pass through the generator and are truncated, resized and blended again: measured
# with the recipe weights, mean |diff| <= 0.15 levels, max 2, and < 0.1% of pixels off by > 1.
MEAN_TOL, MAX_TOL, WITHIN_ONE = 0.5, 8, 0.98


def _box_slices(box: np.ndarray) -> tuple[slice, slice]:
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], W), min(box[3], H)
    return slice(y1, max(y1, y2)), slice(x1, max(x1, x2))


@pytest.fixture(scope="module")
def mixed_frames() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    base = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 3)
    return [np.roll(base, (2 * i, 5 * i), axis=(0, 1)) for i in range(len(MIXED))]


@pytest.fixture(scope="module")
def mixed_features(hard) -> np.ndarray:
    t = np.arange(24_000) / 16_000
    wav = (0.5 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    return hard.features(AudioWindow(wav, 0, len(wav), 0.1), np.arange(len(MIXED)), 25.0)


def test_auto_image_ops_is_cpu_off_cuda(hard, checkpoint):
    assert hard.image_ops == "cpu" and not hard.compiled
    assert Wav2LipRenderer(checkpoint, device="cpu", image_ops="device").image_ops == "device"


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((100, 80), (96, 96)),
        ((96, 96), (100, 80)),
        ((420, 320), (96, 96)),
        ((96, 96), (420, 320)),
        ((192, 192), (96, 96)),
        ((20, 30), (96, 96)),
    ],
)
def test_resize_matches_cv2(src, dst):
    """torch bilinear (align_corners=False) samples where cv2.INTER_LINEAR does, edges included;
    only cv2's fixed-point rounding differs, by at most one level."""
    img = np.random.default_rng(1).integers(0, 256, (*src, 3), dtype=np.uint8)
    want = cv2.resize(img, dst[::-1]).astype(int)
    got = _resize(torch.from_numpy(img).permute(2, 0, 1)[None].float(), *dst).round()[0].permute(1, 2, 0).numpy()
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and diff.mean() < 0.2


@pytest.mark.parametrize("blend", ["hard", "feather"])
def test_device_path_matches_cv2_path(checkpoint, blend, mixed_frames, mixed_features):
    reference = Wav2LipRenderer(checkpoint, batch_size=3, precision="fp32", blend=blend, device="cpu", image_ops="cpu")
    device = Wav2LipRenderer(checkpoint, batch_size=3, precision="fp32", blend=blend, device="cpu", image_ops="device")
    want = reference.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    got = device.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    for frame, box, w, g in zip(mixed_frames, MIXED, want, got):
        assert g.shape == frame.shape and g.dtype == np.uint8
        rows, cols = _box_slices(box)
        outside = np.ones((H, W), bool)
        outside[rows, cols] = False
        np.testing.assert_array_equal(g[outside], frame[outside])  # exactly untouched
        if not outside.all():
            diff = np.abs(g[rows, cols].astype(int) - w[rows, cols])
            assert diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, (box, diff.mean(), diff.max())
            assert (diff <= 1).mean() > WITHIN_ONE, box
            changed = np.abs(g[rows, cols].astype(int) - frame[rows, cols]).max(axis=2) > 8
            assert changed.mean() > (0.5 if blend == "hard" else 0.1), box
        else:
            np.testing.assert_array_equal(g, frame)  # the empty box
        if blend == "feather" and not outside.all():
            top = rows.start + int(MASK_ZERO_ABOVE * (rows.stop - rows.start)) - 1
            np.testing.assert_array_equal(g[rows.start : top, cols], frame[rows.start : top, cols])  # eyes kept


def test_device_path_read_only_frames_and_no_boxes(checkpoint, frames, features):
    device = Wav2LipRenderer(checkpoint, batch_size=4, precision="fp32", blend="hard", device="cpu", image_ops="device")
    frozen = [f.copy() for f in frames]
    for f in frozen:
        f.flags.writeable = False
    out = device.render(frozen, BOXES, features)
    assert all(np.array_equal(f, o) for f, o in zip(frames, frozen))
    assert not any(np.array_equal(f, o) for f, o in zip(frames, out))
    empty = np.array([[10, 10, 10, 50], [-50, -50, -1, -1], [W, 0, W + 9, 20]])  # no area in the frame
    out = device.render([f.copy() for f in frames], empty, features)
    assert all(np.array_equal(f, o) for f, o in zip(frames, out))


@pytest.mark.parametrize(("height", "width"), [(1, 1), (7, 5), (96, 96), (117, 90), (301, 256)])
def test_device_feather_mask_is_the_numpy_mask(checkpoint, height, width):
    want = _feather_mask(height, width)[:, :, None]
    got = _feather_mask_torch(height, width, torch.device("cpu"))
    assert got.shape == want.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    device = Wav2LipRenderer(checkpoint, batch_size=2, precision="fp32", device="cpu", image_ops="device")
    mask, keep = device._device_mask(height, width)
    np.testing.assert_allclose(mask.numpy(), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(keep.numpy(), 1.0 - want, rtol=0, atol=1e-6)


def test_device_path_recovers_after_a_failed_batch(checkpoint, mixed_frames, mixed_features):
    """A batch that fails after its upload (here: mel windows of the wrong height) leaves the
    staging buffers usable. (On CUDA the failure path also waits for the in-flight upload before
    the next call rewrites the pinned buffer; a CPU cannot show that race.)"""
    device = Wav2LipRenderer(checkpoint, batch_size=4, precision="fp32", device="cpu", image_ops="device")
    fresh = Wav2LipRenderer(checkpoint, batch_size=4, precision="fp32", device="cpu", image_ops="device")
    with pytest.raises(RuntimeError):
        device.render([f.copy() for f in mixed_frames], MIXED, mixed_features[:, :40])
    got = device.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    want = fresh.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# --- torch.compile ---------------------------------------------------------------------------------


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's "eager" backend: traces the generator as a real compile does but
    skips inductor's C++ code generation (about 55 s on 2 CPU cores)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))


@pytest.mark.slow  # ~30 s of dynamo tracing on 2 cores; compile is opt-in (renderer.compile)
def test_compile_runs_and_matches_eager(checkpoint, eager_backend, mixed_frames, mixed_features):
    eager = Wav2LipRenderer(checkpoint, batch_size=3, precision="fp32", blend="hard", device="cpu", image_ops="device")
    compiled = Wav2LipRenderer(
        checkpoint, batch_size=3, precision="fp32", blend="hard", device="cpu", image_ops="device", compile=True
    )
    want = eager.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    got = compiled.render([f.copy() for f in mixed_frames], MIXED, mixed_features)  # 3 + 3 + 2 (padded)
    assert compiled.compiled
    for w, g in zip(want, got):
        # the padded tail batch may pick another conv algorithm: truncation can flip a level
        assert np.abs(g.astype(int) - w).max() <= 1 and (g == w).mean() > 0.999


def test_compile_failure_falls_back_to_eager(checkpoint, monkeypatch, caplog, frames, features, hard):
    def broken(model, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    renderer = Wav2LipRenderer(checkpoint, batch_size=8, precision="fp32", blend="hard", device="cpu", compile=True)
    with caplog.at_level(logging.WARNING, logger="heygem_ray.render.wav2lip"):
        out = renderer.render([f.copy() for f in frames], BOXES, features)
    assert not renderer.compiled and "running eager" in caplog.text and "no C++ compiler" in caplog.text
    for w, g in zip(hard.render([f.copy() for f in frames], BOXES, features), out):
        np.testing.assert_array_equal(g, w)

    def refused(model, **kw):
        raise RuntimeError("dynamo unsupported on this Python")

    monkeypatch.setattr(torch, "compile", refused)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heygem_ray.render.wav2lip"):
        renderer = Wav2LipRenderer(checkpoint, batch_size=8, precision="fp32", blend="hard", device="cpu", compile=True)
    assert not renderer.compiled and "dynamo unsupported" in caplog.text
    assert len(renderer.render([f.copy() for f in frames], BOXES, features)) == 3


@pytest.mark.slow  # inductor's compile (C++ kernels: needs a compiler) takes ~55 s on 2 CPU cores
def test_compile_with_inductor(checkpoint, frames, features, hard):
    renderer = Wav2LipRenderer(checkpoint, batch_size=8, precision="fp32", blend="hard", device="cpu", compile=True)
    out = renderer.render([f.copy() for f in frames], BOXES, features)
    assert renderer.compiled
    for w, g in zip(hard.render([f.copy() for f in frames], BOXES, features), out):
        assert np.abs(g.astype(int) - w).max() <= 2  # inductor may reorder float sums


@pytest.mark.slow  # ~15 s of dynamo tracing on 2 cores
def test_compile_now_compiles_a_built_renderer_once(checkpoint, eager_backend, mixed_frames, mixed_features):
    renderer = Wav2LipRenderer(
        checkpoint, batch_size=3, precision="fp32", blend="hard", device="cpu", image_ops="device"
    )
    want = renderer.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    assert not renderer.compiled
    assert renderer.compile_now() and renderer.compiled
    halves = renderer._encode, renderer._decode
    assert renderer.compile_now() and (renderer._encode, renderer._decode) == halves  # idempotent
    got = renderer.render([f.copy() for f in mixed_frames], MIXED, mixed_features)
    assert renderer.compiled
    for w, g in zip(want, got):  # the same tolerance as test_compile_runs_and_matches_eager
        assert np.abs(g.astype(int) - w).max() <= 1 and (g == w).mean() > 0.999


def test_compile_now_falls_back_to_eager_once(checkpoint, monkeypatch, caplog, frames, features, hard):
    def refused(model, **kw):
        raise RuntimeError("dynamo unsupported on this Python")

    monkeypatch.setattr(torch, "compile", refused)
    renderer = Wav2LipRenderer(checkpoint, batch_size=8, precision="fp32", blend="hard", device="cpu")
    with caplog.at_level(logging.WARNING, logger="heygem_ray.render.wav2lip"):
        assert not renderer.compile_now()
        assert not renderer.compile_now()  # no second attempt, no second warning
    assert caplog.text.count("dynamo unsupported") == 1 and not renderer.compiled
    for w, g in zip(
        hard.render([f.copy() for f in frames], BOXES, features),
        renderer.render([f.copy() for f in frames], BOXES, features),
    ):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    ("threads", "before", "after"),
    [  # each traces the generator twice (~7 s on 2 cores): one capping case runs by default
        pytest.param(1, 8, 1, marks=pytest.mark.slow),
        (3, 8, 3),
        pytest.param(16, 8, 8, marks=pytest.mark.slow),
        pytest.param(0, 8, 8, marks=pytest.mark.slow),
    ],
)
def test_threads_caps_the_inductor_compile_workers(checkpoint, eager_backend, threads, before, after):
    from torch._inductor import config

    with config.patch(compile_threads=before):  # restores the process's setting after
        renderer = Wav2LipRenderer(
            checkpoint, batch_size=8, precision="fp32", device="cpu", compile=True, threads=threads
        )
        assert renderer.compiled and config.compile_threads == after
    lazy = Wav2LipRenderer(checkpoint, batch_size=8, precision="fp32", device="cpu", threads=threads)
    with config.patch(compile_threads=before):
        assert lazy.compile_now() and config.compile_threads == after


def test_cpu_fp32_runs_the_fused_generator_within_rounding_of_the_plain_one(checkpoint, mixed_frames, mixed_features):
    """The default CPU renderer fuses its conv units; the frames it paints are the plain generator's
    but for a rare truncated level, and only fp32 on the CPU is fused."""
    fused = Wav2LipRenderer(checkpoint, batch_size=3, precision="fp32", device="cpu")
    plain = Wav2LipRenderer(checkpoint, batch_size=3, precision="fp32", device="cpu", fuse=False)
    assert fused.fused and not plain.fused
    assert not Wav2LipRenderer(checkpoint, batch_size=3, precision="bf16", device="cpu").fused
    a = fused.render([f.copy() for f in mixed_frames], np.array(MIXED), mixed_features)
    b = plain.render([f.copy() for f in mixed_frames], np.array(MIXED), mixed_features)
    diff = np.concatenate([np.abs(x.astype(int) - y.astype(int)).ravel() for x, y in zip(a, b)])
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3


@pytest.mark.parametrize("image_ops", ["cpu", "device"])
def test_feather_paste_decodes_only_the_rows_it_shows(checkpoint, mixed_frames, mixed_features, monkeypatch, image_ops):
    """The feather paste runs the decoder on the rows its mask can show (FEATHER_FIRST_ROW on): the
    frames are those of a full decode, in both image paths."""
    import heygem_ray.render.wav2lip as w2l

    renderer = Wav2LipRenderer(checkpoint, batch_size=4, precision="fp32", device="cpu", image_ops=image_ops)
    assert renderer.blend == "feather" and w2l.FEATHER_FIRST_ROW == 40
    lower = renderer.render([f.copy() for f in mixed_frames], np.array(MIXED), mixed_features)
    monkeypatch.setattr(w2l, "FEATHER_FIRST_ROW", 0)  # decode every row
    full = renderer.render([f.copy() for f in mixed_frames], np.array(MIXED), mixed_features)
    diff = np.concatenate([np.abs(a.astype(int) - b.astype(int)).ravel() for a, b in zip(lower, full)])
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-4
