import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from heygem_ray.plan import (
    MIN_SEGMENT_FRAMES,
    avatar_frame_indices,
    frame_center_samples,
    frame_step,
    output_frame_count,
    plan_segments,
    stable_hash,
)


def test_output_covers_whole_audio_within_one_frame():
    assert output_frame_count(10.0, 25) == 250
    assert output_frame_count(10.01, 25) == 251
    assert output_frame_count(1.5, 29.97) == 45  # 44.955 frames -> 45
    assert output_frame_count(0.01, 25) == 1
    with pytest.raises(ValueError):
        output_frame_count(0, 25)


def test_ping_pong_when_audio_is_longer():
    got = avatar_frame_indices(np.arange(12), avatar_frames=4, still=False)
    assert got.tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert np.abs(np.diff(got)).max() == 1  # never a jump cut


def test_truncate_when_audio_is_shorter():
    assert avatar_frame_indices(np.arange(5), avatar_frames=100, still=False).tolist() == [0, 1, 2, 3, 4]


def test_still_image_repeats_its_frame():
    assert avatar_frame_indices(np.arange(7), avatar_frames=1, still=True).tolist() == [0] * 7
    assert avatar_frame_indices(np.arange(3), avatar_frames=1, still=False).tolist() == [0, 0, 0]


def test_segments_split_consecutively_into_equal_spans():
    spans = plan_segments(63, 25, 1.0)
    assert [(s.start, s.stop) for s in spans] == [(0, 21), (21, 42), (42, 63)]
    assert [s.index for s in spans] == [0, 1, 2]
    # never under MIN_SEGMENT_FRAMES (x264's timestamps lead by its B-frame depth only from the
    # third frame: a 2-frame segment and a 3-frame one could not be joined), a short row one segment
    assert [s.frames for s in plan_segments(5, 25, 0.001)] == [5]
    assert [s.frames for s in plan_segments(40, 25, 0.001)] == [8] * 5
    # a 12 s row in 10 s segments: two of 6 s, not 10 s and a 2 s tail
    assert [s.frames for s in plan_segments(300, 25, 10.0)] == [150, 150]
    # spread over at least `min_segments` (4 actors, one row), never below MIN_SEGMENT_FRAMES each
    assert [s.frames for s in plan_segments(300, 25, 10.0, min_segments=4)] == [75, 75, 75, 75]
    assert [s.frames for s in plan_segments(5, 25, 10.0, min_segments=2)] == [5]
    assert [s.frames for s in plan_segments(20, 25, 10.0, min_segments=8)] == [10, 10]


@given(
    total=st.integers(1, 20_000),
    fps=st.sampled_from([12.0, 24.0, 25.0, 29.97, 30.0, 60.0]),
    seconds=st.floats(0.01, 120.0),
    avatar=st.integers(1, 5_000),
    still=st.booleans(),
)
def test_every_output_frame_planned_exactly_once(total, fps, seconds, avatar, still):
    spans = plan_segments(total, fps, seconds, min_segments=1 + total % 5)
    sizes = [s.frames for s in spans]
    length = max(MIN_SEGMENT_FRAMES, round(seconds * fps))
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= max(length, 2 * MIN_SEGMENT_FRAMES - 1)
    assert len(spans) == 1 or min(sizes) >= MIN_SEGMENT_FRAMES
    covered = np.concatenate([np.arange(s.start, s.stop) for s in spans])
    assert np.array_equal(covered, np.arange(total))
    mapped = avatar_frame_indices(covered, avatar, still)
    assert mapped.min() >= 0 and mapped.max() < avatar


def test_frame_center_samples():
    # frame i is shown during [i/fps, (i+1)/fps); its loudness is measured at the middle
    assert frame_center_samples(np.array([0, 1, 24]), 25, 16000).tolist() == [320, 960, 15680]


def test_stable_hash_is_order_and_process_stable():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash("x", 1) != stable_hash("x", 2)
    assert stable_hash("x") == "cd65ea2c2ad99e94"  # a fixed value: must not change between releases


@pytest.mark.parametrize(
    "fps, max_fps, step",
    [
        (240, 60, 4),
        (120, 60, 2),
        (119.88, 60, 2),
        (100, 60, 2),
        (90, 60, 2),
        (60, 60, 1),
        (59.94, 60, 1),
        (25, 60, 1),
        (240, 0, 1),
        (60, 30, 2),
        (50, 30, 2),
        (30.0000001, 30, 1),
        (60.4, 60, 1),  # a phone's variable-rate 60 fps clip: not halved
        (61, 60, 1),
        (62, 60, 2),
    ],
)
def test_frame_step_keeps_the_rate_at_or_under_the_cap(fps, max_fps, step):
    assert frame_step(fps, max_fps) == step
    assert max_fps == 0 or fps / step <= max_fps * 1.02


@pytest.mark.parametrize(
    ("rate", "written"),
    [
        ("1800000/60261", "30000/1001"),  # a phone's variable-rate 30 fps clip, averaging 29.87
        ("30", "30"),
        ("30000/1001", "30000/1001"),
        ("2997/100", "30000/1001"),
        ("24.1", "24"),
        ("60.4", "60"),
        ("25", "25"),
        ("12.5", "12.5"),  # between standard rates: its own
        ("23.4", "23.4"),
        ("1000", "1000"),
    ],
)
def test_a_rate_near_a_standard_one_is_written_at_it(rate, written):
    from fractions import Fraction

    from heygem_ray.plan import standard_rate

    assert standard_rate(Fraction(rate)) == Fraction(written)
