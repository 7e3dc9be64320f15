"""The official 5-frame box smoothing, against the spec's measured vectors (WAV2LIP_SPEC.md §4.4)."""

from __future__ import annotations

import numpy as np
import pytest

from heygem_ray.detect.smoothing import smooth_boxes_official


def _boxes(x1: list[int]) -> np.ndarray:
    """Boxes whose four columns are offsets of x1, so every column must smooth the same way."""
    x1 = np.asarray(x1, dtype=np.int64)
    return np.stack([x1, x1 + 100, x1 + 1000, x1 + 2000], axis=1)


def test_six_frames_measured_vector_with_in_place_tail():
    out = smooth_boxes_official(_boxes([1, 11, 21, 31, 41, 51]))
    assert out[:, 0].tolist() == [21, 31, 35, 37, 39, 38]
    assert out[:, 1].tolist() == [121, 131, 135, 137, 139, 138]
    assert out.dtype == np.int64


def test_three_frames_use_last_two_rows():
    assert smooth_boxes_official(_boxes([1, 11, 21]))[:, 0].tolist() == [16, 16, 18]


def test_four_frames_all_become_the_last_box():
    boxes = _boxes([3, 8, 20, 7])
    assert (smooth_boxes_official(boxes) == boxes[-1]).all()


def test_two_and_one_frames_average_everything():
    # n = 2: row 0 = mean(1, 12) = 6 (6.5 truncated), row 1 = mean(6, 12) = 9
    assert smooth_boxes_official(_boxes([1, 12]))[:, 0].tolist() == [6, 9]
    assert smooth_boxes_official(_boxes([7]))[:, 0].tolist() == [7]
    assert smooth_boxes_official(np.zeros((0, 4), np.int64)).shape == (0, 4)


def test_mean_truncates_toward_zero():
    # negative coordinates can happen before clipping: -7.5 → -7 (not floor's -8)
    out = smooth_boxes_official(_boxes([-10, -5]))
    assert out[0, 0] == -7
    # n = 5 with no tail quirk on row 0: (0+0+0+0+9)/5 = 1.8 → 1
    assert smooth_boxes_official(_boxes([0, 0, 0, 0, 9]))[0, 0] == 1


def test_caller_array_is_not_modified():
    boxes = _boxes([1, 11, 21, 31, 41, 51])
    before = boxes.copy()
    smooth_boxes_official(boxes)
    assert (boxes == before).all()


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        smooth_boxes_official(np.zeros((3, 5), np.int64))
