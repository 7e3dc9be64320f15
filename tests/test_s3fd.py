"""S3FD: checkpoint layout and raw outputs against the official net (reference data made with the
recipe weights), and the official pre-/post-processing on hand-made head outputs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from heygem_ray.detect.s3fd import (
    MEAN_RGB,
    S3FDDetector,
    decode_outputs,
    detections_from_outputs,
    nms,
    preprocess,
    s3fd_expected_keys,
)
from heygem_ray.models.s3fd import S3FD

DATA = Path(__file__).parent / "data"
TSV = DATA / "s3fd_state_dict.tsv"


def _recipe():
    # Loaded by path so it works whether or not tests/ is a package.
    path = Path(__file__).parent / "recipe_weights.py"
    spec = importlib.util.spec_from_file_location("recipe_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    recipe = _recipe()
    return recipe.recipe_state_dict(recipe.read_keys(TSV), seed=0)


@pytest.fixture(scope="module")
def detector(state_dict) -> S3FDDetector:
    return S3FDDetector(state_dict, device="cpu", max_side=None)


def _frame(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random BGR frame with a skin-coloured ellipse: gives the recipe net detections."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.ellipse(frame, (width // 2, height // 2), (width // 5, height // 4), 0, 0, 360, (90, 140, 200), -1)
    return frame


# --- network -------------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_equal_official_in_order():
    official = [(name, shape) for name, shape in _recipe().read_keys(TSV)]
    assert list(s3fd_expected_keys().items()) == official
    assert len(official) == 65
    assert sum(math.prod(shape) for _, shape in official) == 22_459_110


def test_raw_outputs_match_official_reference(state_dict):
    model = S3FD().eval()
    model.load_state_dict(state_dict, strict=True)
    ref = np.load(DATA / "s3fd_reference.npz")
    with torch.inference_mode():
        outputs = model(torch.from_numpy(ref["image"]))
    assert len(outputs) == 12
    for i, out in enumerate(outputs):
        expected = ref[f"out{i}"]
        assert out.shape == expected.shape, i
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=0, err_msg=f"out{i}")
    # the fc7 level (padding-3 fc6) has the largest activations: make sure they are not trivial
    assert np.abs(ref["out6"]).max() > 1.0


def test_strict_load_rejects_missing_and_prefixed_keys(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != "conv3_3_norm.weight"}
    with pytest.raises(RuntimeError, match="conv3_3_norm.weight"):
        S3FDDetector(missing, device="cpu")
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        S3FDDetector(prefixed, device="cpu")


# --- pre-processing ------------------------------------------------------------------------------


def test_preprocess_flips_to_rgb_then_subtracts_bgr_means():
    frame = np.zeros((2, 3, 3), dtype=np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 250  # B, G, R
    x = preprocess(frame[None])
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 3)
    # channel 0 is red minus 104, channel 2 is blue minus 123: the official (odd) pairing
    expected = np.array([250 - MEAN_RGB[0], 20 - MEAN_RGB[1], 10 - MEAN_RGB[2]], dtype=np.float32)
    np.testing.assert_array_equal(x[0, :, 1, 2].numpy(), expected)
    with pytest.raises(ValueError):
        preprocess(frame.astype(np.float32)[None])


# --- post-processing on hand-made head outputs ---------------------------------------------------

_LEVEL_SIZES = (16, 8, 4, 2, 1, 1)  # as for a 64×64 input


def _blank_outputs(batch: int) -> list[torch.Tensor]:
    """Head outputs where every cell is confidently background and regression is zero."""
    outputs = []
    for size in _LEVEL_SIZES:
        cls = torch.zeros(batch, 2, size, size)
        cls[:, 0] = 10.0
        cls[:, 1] = -10.0
        outputs += [cls, torch.zeros(batch, 4, size, size)]
    return outputs


def _set_face(outputs, image, level, row, col, prob, loc=(0.0, 0.0, 0.0, 0.0)):
    cls = outputs[2 * level]
    cls[image, 0, row, col] = 0.0
    cls[image, 1, row, col] = math.log(prob / (1 - prob))  # softmax → prob
    outputs[2 * level + 1][image, :, row, col] = torch.tensor(loc)


def test_decode_anchor_stride_and_variances():
    outputs = _blank_outputs(batch=2)
    # image 0, level 1 (stride 8, anchor side 32), cell row 2 col 3: anchor centre (28, 20).
    # loc x +1 → +0.1·32, loc y −1 → −3.2, loc w = 5·ln2 → side·2, loc h = 0 → side.
    _set_face(outputs, 0, level=1, row=2, col=3, prob=0.9, loc=(1.0, -1.0, 5 * math.log(2), 0.0))
    # image 1, level 0 (stride 4, side 16), cell (0, 0): the bare anchor around (2, 2)
    _set_face(outputs, 1, level=0, row=0, col=0, prob=0.6)
    cands = decode_outputs(outputs, threshold=0.05)
    assert [len(c) for c in cands] == [1, 1]
    np.testing.assert_allclose(cands[0][0], [31.2 - 32, 16.8 - 16, 31.2 + 32, 16.8 + 16, 0.9], atol=1e-5)
    np.testing.assert_allclose(cands[1][0], [-6, -6, 10, 10, 0.6], atol=1e-5)
    assert cands[0].dtype == np.float32


def test_nms_threshold_and_order():
    outputs = _blank_outputs(batch=1)
    # level 2: stride 16, side 64. Two neighbouring anchors overlap with IoU 0.605 (+1 convention).
    _set_face(outputs, 0, level=2, row=1, col=1, prob=0.9)  # (-8, -8, 56, 56)
    _set_face(outputs, 0, level=2, row=1, col=2, prob=0.8)  # (8, -8, 72, 56): suppressed
    _set_face(outputs, 0, level=0, row=15, col=15, prob=0.7)  # (54, 54, 70, 70): barely overlaps
    _set_face(outputs, 0, level=0, row=0, col=15, prob=0.3)  # (54, -6, 70, 10): below 0.5
    _set_face(outputs, 0, level=0, row=8, col=0, prob=0.04)  # below the 0.05 candidate threshold

    (dets,) = detections_from_outputs(outputs)
    np.testing.assert_allclose(dets, [[-8, -8, 56, 56, 0.9], [54, 54, 70, 70, 0.7]], atol=1e-5)

    (low,) = detections_from_outputs(outputs, score_threshold=0.2)
    np.testing.assert_allclose(low[:, 4], [0.9, 0.7, 0.3], atol=1e-6)

    (loose,) = detections_from_outputs(outputs, nms_threshold=0.7)
    np.testing.assert_allclose(loose[:, 4], [0.9, 0.8, 0.7], atol=1e-6)
    np.testing.assert_allclose(loose[1, :4], [8, -8, 72, 56], atol=1e-5)


def test_nms_uses_plus_one_areas():
    # +1 convention: IoU = 5·10 / (100 + 100 − 50) = 0.333 > 0.3 → suppressed
    # (without +1 it would be 36 / 126 = 0.286 and both would stay)
    dets = np.array([[5, 0, 14, 9, 0.8], [0, 0, 9, 9, 0.9]], dtype=np.float32)
    assert nms(dets, 0.3).tolist() == [1]
    # one pixel further apart: IoU = 40 / 160 = 0.25 → both kept, highest score first
    dets[0, [0, 2]] = [6, 15]
    assert nms(dets, 0.3).tolist() == [1, 0]
    assert nms(np.zeros((0, 5), np.float32), 0.3).shape == (0,)


# --- detector ------------------------------------------------------------------------------------


def test_no_face_gives_empty_float32_arrays(state_dict):
    background = dict(state_dict)
    for name, value in background.items():
        if name.endswith("_mbox_conf.weight"):
            background[name] = torch.zeros_like(value)
        elif name.endswith("_mbox_conf.bias"):
            bias = torch.full_like(value, 5.0)
            bias[-1] = -5.0  # face logit last (channel 1, or channel 3 for conv3_3)
            background[name] = bias
    det = S3FDDetector(background, device="cpu", max_side=None)
    results = det.detect([_frame(64, 96, 0), _frame(64, 96, 1)])
    assert len(results) == 2
    for r in results:
        assert r.shape == (0, 5) and r.dtype == np.float32


def test_detect_finds_boxes_sorted_by_score(detector):
    (dets,) = detector.detect([_frame(160, 160, 1)])
    assert dets.dtype == np.float32 and dets.ndim == 2 and dets.shape[1] == 5
    assert len(dets) > 10  # random weights fire a lot; the point is that something comes back
    assert (dets[:, 4] > 0.5).all()
    assert (np.diff(dets[:, 4]) <= 0).all()
    assert (dets[:, 2] > dets[:, 0]).all() and (dets[:, 3] > dets[:, 1]).all()


def test_max_side_returns_full_resolution_boxes(detector, state_dict):
    small = _frame(96, 160, 2)
    (reference,) = detector.detect([small])
    # 2× nearest upscale, then max_side=160 makes the detector area-downscale it back exactly
    big = cv2.resize(small, (320, 192), interpolation=cv2.INTER_NEAREST)
    capped = S3FDDetector(state_dict, device="cpu", max_side=160)
    (scaled,) = capped.detect([big])
    assert len(reference) > 0 and scaled.shape == reference.shape
    np.testing.assert_allclose(scaled[:, :4], reference[:, :4] * 2, atol=1e-3)
    np.testing.assert_allclose(scaled[:, 4], reference[:, 4], atol=1e-6)


def test_batches_and_mixed_sizes_match_single_frames(state_dict):
    det = S3FDDetector(state_dict, device="cpu", max_side=None, batch_size=2)
    frames = [_frame(96, 128, 3), _frame(96, 128, 4), _frame(96, 128, 5), _frame(64, 96, 6)]
    batched = det.detect(frames)
    assert len(batched) == 4
    for frame, got in zip(frames, batched):
        (alone,) = det.detect([frame])
        # Batch splits move CPU fp32 results by ~1e-6, which can flip boxes scored within that of
        # 0.5 (random weights put many there): compare the confident prefix.
        confident = alone[alone[:, 4] > 0.6]
        assert len(confident) > 0
        np.testing.assert_allclose(got[: len(confident)], confident, atol=1e-3)


def test_out_of_gpu_memory_the_batch_is_halved_not_the_row_failed(state_dict, monkeypatch):
    """A 720p batch of 16 takes ~11 GB and detection tasks share a GPU: out of memory, the batch
    is halved (for the calls after it too), as the official code does; one frame that does not fit
    fails as it is."""
    det = S3FDDetector(state_dict, device="cpu", max_side=None, batch_size=8)
    frames = [_frame(96, 128, seed) for seed in range(8)]
    expected = [det.detect([frame])[0] for frame in frames]
    forward = det.model.forward
    seen: list[int] = []

    def small_gpu(x):
        seen.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    monkeypatch.setattr(det.model, "forward", small_gpu)
    got = det.detect(frames)
    assert len(got) == 8 and det.batch_size == 2 and max(seen[-4:]) == 2
    for mine, alone in zip(got, expected, strict=True):
        confident = alone[alone[:, 4] > 0.6]
        np.testing.assert_allclose(mine[: len(confident)], confident, atol=1e-3)
    monkeypatch.setattr(det.model, "forward", lambda x: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        det.detect(frames[:1])
