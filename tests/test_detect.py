"""The default face detector (`detector=haar`) on the labelled set of benchmarks/bench_detect.py:
every face found (720p and 4K, stretched, dark, small in the frame, turned a little), and no face
in blurred noise, textures, an empty room or a cartoon background."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from benchmarks.bench_detect import labelled_set
from heygem_ray import demo
from heygem_ray.detect.haar import REPROBE, REPROBE_MAX, REVERIFY, VIEWS, HaarDetector, every_view_due

CASES = labelled_set()


@pytest.mark.parametrize(("name", "frame", "has_face"), CASES, ids=[c[0] for c in CASES])
def test_labelled_set(name, frame, has_face):
    found = HaarDetector().detect([frame])[0]
    if not has_face:
        assert len(found) == 0, found
        return
    assert len(found) >= 1, name
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = found[0][:4]
    assert 0 <= x1 < x2 <= w * 1.05 and 0 <= y1 < y2 <= h * 1.05, found
    assert (x2 - x1) >= 0.04 * w and (y2 - y1) >= 0.04 * h, found


def test_a_view_that_found_the_face_is_kept_for_the_avatar():
    stretched = next(frame for name, frame, _ in CASES if name == "stretched 2x across")
    detector = HaarDetector()
    assert len(detector.detect([stretched])[0]) == 1
    assert detector.view is not None and detector.view.sx < 1  # found squeezed back across
    calls = _counting_looks(detector)
    assert len(detector.detect([stretched])[0]) == 1
    assert len(calls) == 1  # the next frame looks through that view alone, no search of the others


def test_a_faceless_stretch_stops_searching_every_view_but_finds_a_face_that_comes_back():
    """After probe_frames frames without a face two views are looked through (the last, and one
    other in turn), but for a search through every view REPROBE frames later; the face is found
    again when it returns."""
    face = next(frame for name, frame, _ in CASES if name == "720p")
    noise = np.full_like(face, 128)  # faceless, and searched in a moment (blurred noise: 3.5 s a full search)
    detector = HaarDetector(probe_frames=2)
    looks: list[int] = []
    look = detector._look

    def counted(grey, view):
        looks[-1] += 1
        return look(grey, view)

    detector._look = counted  # type: ignore[method-assign]
    for _ in range(REPROBE + 2):
        looks.append(0)
        assert len(detector.detect([noise])[0]) == 0
    assert looks == [len(VIEWS)] * 2 + [2] * (REPROBE - 1) + [len(VIEWS)]
    looks.append(0)
    assert len(detector.detect([face])[0]) == 1


def _counting_looks(detector: HaarDetector) -> list[tuple]:
    """Record the (near, trusted) faces of every look the detector takes from now on."""
    calls: list[tuple] = []
    look = detector._look

    def counted(grey, view, near=(), trusted=()):
        calls.append((near, trusted))
        return look(grey, view, near, trusted)

    detector._look = counted  # type: ignore[method-assign]
    return calls


def test_after_a_face_the_next_frame_is_searched_at_its_size_first():
    face = next(frame for name, frame, _ in CASES if name == "720p")
    detector = HaarDetector()
    (first,) = detector.detect([face])[0][:1]
    calls = _counting_looks(detector)
    (tracked,) = detector.detect([face])[0][:1]
    assert len(calls) == 1  # one look, at the last face's size: no full search
    (near,), _ = calls[0]
    side = first[2] - first[0]
    assert near[2] - near[0] == pytest.approx(side * detector.max_side / face.shape[1], rel=0.01)  # the view's pixels
    np.testing.assert_allclose(tracked[:4], first[:4], atol=0.03 * side)


def test_a_tracked_face_is_verified_again_every_few_frames():
    """Between full verifications (second cascade, two eyes) a candidate where the last frame's
    face was is taken as that face; every REVERIFY frames it is verified again."""
    face = next(frame for name, frame, _ in CASES if name == "720p")
    detector = HaarDetector()
    assert len(detector.detect([face])[0]) == 1
    confirm, checks = detector._confirm, []

    class Counting:
        def detectMultiScale(self, *args, **kwargs):
            checks.append(1)
            return confirm.detectMultiScale(*args, **kwargs)

    detector._confirm = Counting()  # type: ignore[assignment]
    per_frame = []
    for _ in range(2 * REVERIFY):
        before = len(checks)
        assert len(detector.detect([face])[0]) == 1
        per_frame.append(len(checks) - before)
    assert per_frame == ([0] * (REVERIFY - 1) + [1]) * 2


def test_a_candidate_only_the_main_cascade_sees_where_the_face_was_lasts_until_the_next_check():
    """The presenter gone, and the main cascade firing where the face was (a poster behind): taken
    as the face until the next full check, then refused, and every later frame searched in full."""
    face = next(frame for name, frame, _ in CASES if name == "720p")
    detector = HaarDetector()
    assert len(detector.detect([face])[0]) == 1
    ((x1, y1, x2, y2),) = detector._faces
    box = np.array([[x1, y1, x2 - x1, y2 - y1]], np.int32)

    class OnlyThere:  # the main cascade: that box in every image, at every size asked
        def detectMultiScale3(self, *args, **kwargs):
            return box, np.zeros(1, np.int32), np.ones(1)

    class Nothing:  # the second cascade: no face anywhere
        def detectMultiScale(self, *args, **kwargs):
            return ()

    detector._find, detector._confirm = OnlyThere(), Nothing()  # type: ignore[assignment]
    empty = np.full_like(face, 128)
    found = [len(detector.detect([empty])[0]) for _ in range(2 * REVERIFY)]
    assert found == [1] * (REVERIFY - 1) + [0] * (REVERIFY + 1)


def test_a_face_of_another_size_is_found_by_the_full_search():
    """A cut to another shot size: nothing at the last face's size, so every view is tried."""
    face = next(frame for name, frame, _ in CASES if name == "720p")
    small = next(frame for name, frame, _ in CASES if name == "small in a 4K frame")
    detector = HaarDetector()
    assert len(detector.detect([face])[0]) == 1
    calls = _counting_looks(detector)
    assert len(detector.detect([small])[0]) == 1
    assert calls[0][0] and any(not near for near, _ in calls[1:])  # tracked, then full


def test_a_tracked_clip_finds_the_face_a_full_search_finds_on_every_frame():
    """Over a swaying presenter the tracked search finds the face on every frame a full search
    does, boxed about the same: its centre within a tenth of the face, its area within 40 % (a
    face found through another view, squeezed across, is boxed wider and shorter)."""
    stage = demo.Stage.of_height(720)
    tracked, fresh = HaarDetector(), HaarDetector()
    for i in range(0, 50, 7):
        frame = stage.frame(i / 25)
        got = tracked.detect([frame])[0]
        fresh._faces = []  # forget the last frame's face: every frame searched in full
        want = fresh.detect([frame])[0]
        assert len(got) == len(want) == 1, (i, got, want)
        (gx1, gy1, gx2, gy2), (wx1, wy1, wx2, wy2) = got[0][:4], want[0][:4]
        side = wx2 - wx1
        assert abs((gx1 + gx2) - (wx1 + wx2)) / 2 < 0.1 * side and abs((gy1 + gy2) - (wy1 + wy2)) / 2 < 0.1 * side
        area = (gx2 - gx1) * (gy2 - gy1) / ((wx2 - wx1) * (wy2 - wy1))
        assert 1 / 1.4 < area < 1.4, (i, got, want)


def test_after_a_long_faceless_stretch_a_face_only_another_view_sees_is_found_soon():
    """Between the ever rarer searches through every view, one other view is tried each frame in
    turn: a face stretched by a wrong display aspect, seen only squeezed back, is found within as
    many frames as there are other views, not at the next search through all of them."""
    stretched = next(frame for name, frame, _ in CASES if name == "stretched 2x across")
    blank = np.full_like(stretched, 90)
    detector = HaarDetector(probe_frames=2)
    for _ in range(20):  # past the first searches through every view (0, 1, 6, 16; the next at 36)
        assert len(detector.detect([blank])[0]) == 0
    for frames in range(1, len(VIEWS)):
        if len(detector.detect([stretched])[0]):
            break
    else:
        raise AssertionError("the face was not found within len(VIEWS) - 1 frames")
    assert detector.view is not None and detector.view.sx < 1, (frames, detector.view)


def test_a_long_faceless_stretch_looks_through_every_view_ever_more_seldom():
    """The waits between searches through every view double, to REPROBE_MAX: a 3-minute face-less
    clip at the default stride (2,250 examined frames) pays for 66 of them, not ~450."""
    due = [m for m in range(2250) if every_view_due(m, 8)]
    assert due[:8] == list(range(8))
    waits = np.diff(due[7:]).tolist()
    assert waits[:4] == [REPROBE, 2 * REPROBE, 4 * REPROBE, 8 * REPROBE] and set(waits[4:]) == {REPROBE_MAX}
    assert len(due) < 70


def test_boxes_come_back_in_frame_coordinates_through_every_kind_of_view():
    """A face found through a squeezed or turned view is boxed where it is in the frame."""
    plain = next(frame for name, frame, _ in CASES if name == "720p")
    (reference,) = HaarDetector().detect([plain])[0][:1]
    center = np.array([(reference[0] + reference[2]) / 2, (reference[1] + reference[3]) / 2])
    turned = next(frame for name, frame, _ in CASES if name == "turned 10 degrees")
    box = HaarDetector().detect([turned])[0][0]
    moved = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    assert np.linalg.norm(moved - center) < 0.15 * (reference[2] - reference[0]), (box, reference)


def test_a_tilted_head_is_boxed_at_its_own_size_not_the_box_around_its_turned_box():
    """A head tilted 10-20 degrees, found through a turned view, is boxed at about the size of the
    upright face (the box around the turned box's corners was up to 1.3x it, and a squeezed view
    boxed it wide and short): the face fills the model's crop as it does upright, and the box does
    not pulse as the view that finds it changes."""
    import cv2

    plain = next(frame for name, frame, _ in CASES if name == "720p")
    (reference,) = HaarDetector().detect([plain])[0][:1]
    side = reference[2] - reference[0]
    centre = ((reference[0] + reference[2]) / 2, (reference[1] + reference[3]) / 2)
    h, w = plain.shape[:2]
    for angle in (10, 15, 20, -20):
        tilted = cv2.warpAffine(
            plain, cv2.getRotationMatrix2D(centre, angle, 1.0), (w, h), borderMode=cv2.BORDER_REPLICATE
        )
        detector = HaarDetector()
        (box,) = detector.detect([tilted])[0][:1]
        assert detector.view is not None and detector.view.angle, (angle, detector.view)
        for extent in (box[2] - box[0], box[3] - box[1]):
            assert abs(extent / side - 1) < 0.12, (angle, detector.view.name, box, side)


def test_a_blurred_noise_avatar_fails_with_no_face_found(tmp_path):
    """The issue's example, end to end through the avatar stage: a clip of blurred random noise is
    refused ("no face found"), so its row fails and nothing is rendered onto it."""
    import av
    import cv2

    from helpers import compose_config
    from heygem_ray.errors import InputError
    from heygem_ray.prepare import prepare_avatar

    rng = np.random.default_rng(1)
    clip = str(tmp_path / "noise.mp4")
    with av.open(clip, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 480, 270, "yuv420p"
        for _ in range(12):
            noise = cv2.GaussianBlur((rng.random((270, 480, 3)) * 255).astype(np.uint8), (31, 31), 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(noise, format="bgr24")))
        container.mux(stream.encode())
    with pytest.raises(InputError, match="no face found in any of 12 frames"):
        # the composed default detector, as a campaign runs it (every 2nd frame examined)
        prepare_avatar(clip, None, compose_config("manifest=m", "output=o").detector, str(tmp_path / "cache"), 25.0)


def test_the_default_stride_keeps_the_track_of_every_frame(tmp_path):
    """The composed default (`detector=haar`) detects on every 2nd frame and interpolates the rest:
    over a presenter swaying in a 720p clip (the benchmarks' stage) its track stays within a few
    pixels of detecting every frame. (Where the two runs come to find the face through different
    views, their boxes differ by the views' shapes, as any two runs would: not so on this clip.)"""
    from dataclasses import replace

    from helpers import compose_config
    from heygem_ray.prepare import prepare_avatar

    cfg = compose_config("manifest=m", "output=o").detector
    assert cfg.name == "haar" and cfg.stride == 2
    clip = _swaying_presenter(str(tmp_path / "presenter.mp4"), 720, 40, Fraction(25))
    strided = prepare_avatar(clip, None, cfg, str(tmp_path / "a"), 25.0).boxes.astype(float)
    every = prepare_avatar(clip, None, replace(cfg, stride=1), str(tmp_path / "b"), 25.0).boxes.astype(float)
    face = np.mean(every[:, 2] - every[:, 0])
    assert (strided != every).any()  # the stride is in force
    assert np.abs(strided - every).max() <= 0.03 * face, np.abs(strided - every).max()


def test_a_short_narration_tracks_only_the_chunks_it_shows_and_a_longer_one_the_rest(tmp_path, monkeypatch):
    """`prepare_avatar(seconds=...)` detects the chunks that the frames a narration shows (and the
    margin) fall in; a longer narration later detects only the chunks still missing; the frames
    the short narration shows get the boxes the whole clip's track gives; and the chunked track
    of every frame is the one a fresh cache makes; other pads reuse the detected chunks."""
    from dataclasses import replace

    from helpers import compose_config
    from heygem_ray import prepare
    from heygem_ray.detect import track

    monkeypatch.setattr(track, "CHUNK_FRAMES", 16)
    monkeypatch.setattr(prepare, "CHUNK_FRAMES", 16)
    clip = str(tmp_path / "presenter.mp4")
    frames = demo.write_avatar_clip(clip, 6.0, seed=3)  # 150 frames: 10 chunks
    cfg = compose_config("manifest=m", "output=o").detector  # haar, every 2nd frame: margin 47
    cache = str(tmp_path / "cache")

    def chunks() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("chunk-*.npz")}

    short = prepare.prepare_avatar(clip, None, cfg, cache, 25.0, seconds=1.0)  # shows 25 frames
    assert len(short.boxes) == 80 and short.settled == 80 - track.track_margin(2)  # 25 + 47 -> 5 chunks
    assert short.serves(1.0) and not short.serves(2.0) and short.frames == frames
    first = chunks()
    assert sorted(first) == [f"chunk-{i}.npz" for i in range(5)]
    whole = prepare.prepare_avatar(clip, None, cfg, cache, 25.0)
    assert len(whole.boxes) == frames and whole.settled is None and whole.serves(600.0)
    after = chunks()
    assert len(after) == 10 and all(after[name] == first[name] for name in first)  # not detected again
    np.testing.assert_array_equal(short.boxes[: short.settled], whole.boxes[: short.settled])
    fresh = prepare.prepare_avatar(clip, None, cfg, str(tmp_path / "fresh"), 25.0)
    np.testing.assert_array_equal(fresh.boxes, whole.boxes)
    assert (whole.boxes[:, 2] > whole.boxes[:, 0]).all()  # the presenter in every frame
    again = prepare.prepare_avatar(clip, None, cfg, cache, 25.0, seconds=1.0)  # the cached track
    np.testing.assert_array_equal(again.boxes, short.boxes)
    for damaged in ("track-80.npz", "chunk-2.npz"):  # a damaged entry is made again
        next((tmp_path / "cache").rglob(damaged)).write_bytes(b"not an npz")
    remade = prepare.prepare_avatar(clip, None, cfg, cache, 25.0, seconds=1.0)
    np.testing.assert_array_equal(remade.boxes, short.boxes)
    assert chunks()["chunk-1.npz"] == after["chunk-1.npz"] and chunks()["chunk-2.npz"] != after["chunk-2.npz"]
    before = chunks()
    padded = prepare.prepare_avatar(clip, None, replace(cfg, pads=[0, 30, 0, 0]), cache, 25.0)  # detects nothing
    assert chunks() == before
    assert (padded.boxes[:, 3] >= whole.boxes[:, 3]).all() and (padded.boxes[:, 3] > whole.boxes[:, 3]).any()
    # a chunk that does not fit its frames (the clip's frame list made again, counting otherwise) is
    # detected again rather than shift every box after it
    last = next((tmp_path / "cache").rglob("chunk-9.npz"))  # 6 frames
    (last.parent / "chunk-3.npz").write_bytes(last.read_bytes())  # where 16 belong
    deeper = prepare.prepare_avatar(clip, None, replace(cfg, pads=[0, 20, 0, 0]), cache, 25.0)
    assert len(deeper.boxes) == frames and chunks()["chunk-3.npz"] != before["chunk-3.npz"]
    assert (deeper.boxes[:, 3] >= whole.boxes[:, 3]).all()


def test_a_held_frame_is_detected_once_for_all_its_ticks(tmp_path, monkeypatch):
    """A clip under 10 fps plays on a steady timeline, each frame held for several ticks
    (`prepare._held`): the detector saw each picture once per tick (a 2.5 fps clip ten times over);
    now once, and every tick of it gets that picture's candidates."""
    from dataclasses import replace

    from helpers import compose_config
    from heygem_ray.prepare import prepare_avatar

    clip = _swaying_presenter(str(tmp_path / "slow.mp4"), 360, 6, Fraction(5, 2))
    seen: list[bytes] = []
    detect = HaarDetector.detect
    monkeypatch.setattr(
        HaarDetector, "detect", lambda self, frames: seen.extend(f.tobytes() for f in frames) or detect(self, frames)
    )
    cfg = replace(compose_config("manifest=m", "output=o").detector, stride=1, smooth=False)
    boxes = prepare_avatar(clip, None, cfg, str(tmp_path / "cache"), 25.0).boxes
    assert len(boxes) == 60  # 6 pictures, 0.4 s each at 25 fps
    assert len(seen) == len(set(seen)) == 6
    # each picture's ticks alike: the box changes only where the picture does, and it does
    changes = sum((boxes[i] != boxes[i - 1]).any() for i in range(1, 60))
    assert 0 < changes <= 5


def _swaying_presenter(path: str, height: int, frames: int, rate: Fraction) -> str:
    """An H.264 clip of the benchmarks' stage at `height`: the presenter swaying, `frames` at `rate`."""
    import av

    from heygem_ray.media.yuv import bgr_to_i420

    stage = demo.Stage.of_height(height)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": "18", "preset": "ultrafast"})
        stream.height, stream.width = stage.canvas.shape[:2]
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(bgr_to_i420(stage.frame(float(i / rate))), format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
