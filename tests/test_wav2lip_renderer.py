"""Wav2LipRenderer: official preprocessing, untouched pixels outside the box, hard vs feathered paste."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from recipe_weights import read_keys, recipe_state_dict

from heygem_ray.render.base import AudioWindow
from heygem_ray.render.wav2lip import MASK_ZERO_ABOVE, Wav2LipRenderer

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
    return Wav2LipRenderer(checkpoint, batch_size=8, blend="hard", device="cpu")


@pytest.fixture(scope="module")
def feather(checkpoint) -> Wav2LipRenderer:
    return Wav2LipRenderer(checkpoint, batch_size=2, device="cpu")


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
        Wav2LipRenderer(checkpoint, precision="int8")
    with pytest.raises(ValueError, match="blend"):
        Wav2LipRenderer(checkpoint, blend="poisson")
