"""Audio-to-frame feature indexing and the classic renderer's promises."""

import numpy as np

from heygem_ray.config import ClassicRendererConfig
from heygem_ray.media.audio import AudioWindow
from heygem_ray.render.classic import ClassicRenderer, openness


def test_loudness_lands_on_the_frame_that_shows_it():
    sr, fps = 16000, 25
    audio = np.zeros(sr * 2, np.float32)
    t = np.arange(sr // 25) / sr
    audio[int(1.0 * sr) : int(1.04 * sr)] = 0.5 * np.sin(2 * np.pi * 600 * t)  # frame 25 = [1.00, 1.04) s
    r = ClassicRenderer(ClassicRendererConfig())
    feats = r.features(AudioWindow(audio, 0, len(audio), level=0.1), np.arange(50), fps)
    assert int(np.argmax(feats)) == 25
    assert feats[:20].max() == 0.0 and feats[30:].max() == 0.0


def test_segment_windows_give_the_same_features_as_the_whole_row():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 3) * np.repeat(rng.uniform(0, 0.3, 75), 640)).astype(np.float32)
    r = ClassicRenderer(ClassicRendererConfig())
    frames = np.arange(75)
    whole = r.features(AudioWindow(audio, 0, len(audio), 0.1), frames, 25)
    for lo, hi in ((0, 25), (25, 50), (50, 75)):
        start = max(0, lo * 640 - 8000)
        stop = min(len(audio), hi * 640 + 8000)
        part = r.features(AudioWindow(audio[start:stop], start, len(audio), 0.1), frames[lo:hi], 25)
        np.testing.assert_allclose(part, whole[lo:hi], atol=1e-6)


def test_openness_is_relative_to_the_rows_level():
    assert openness(np.array([0.1]), 0.1)[0] == 1.0
    assert openness(np.array([0.1 / 10**1.5]), 0.1)[0] == 0.0  # 30 dB below the level: closed
    assert 0.45 < openness(np.array([0.1 / 10**0.75]), 0.1)[0] < 0.55


def test_render_changes_only_the_face_box_and_more_when_louder():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
    box = np.array([[20, 10, 80, 100]])
    r = ClassicRenderer(ClassicRendererConfig())
    quiet, loud, closed = (r.render([frame.copy()], box, np.array([o]))[0] for o in (0.3, 1.0, 0.0))
    outside = np.ones(frame.shape[:2], bool)
    outside[10:100, 20:80] = False
    for out in (quiet, loud):
        assert np.array_equal(out[outside], frame[outside])
    assert np.array_equal(closed, frame)
    change = [np.abs(o.astype(int) - frame.astype(int)).sum() for o in (quiet, loud)]
    assert change[1] > change[0] > 0


def test_render_accepts_and_ignores_sources():
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
    boxes = np.array([[20, 10, 80, 100]] * 2)
    r = ClassicRenderer(ClassicRendererConfig())
    plain = r.render([frame.copy(), frame.copy()], boxes, np.array([0.4, 0.9]))
    with_ids = r.render([frame.copy(), frame.copy()], boxes, np.array([0.4, 0.9]), sources=[("still", 0)] * 2)
    for p, s in zip(plain, with_ids):
        assert np.array_equal(p, s)
    assert not np.array_equal(with_ids[0], with_ids[1])  # each frame still follows its own feature
