"""Wav2Lip audio front end: official numbers, frame alignment, and segment == whole-row features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from heygem_ray.errors import InputError
from heygem_ray.media.audio import AUDIO_CONTEXT_SECONDS, AudioWindow
from heygem_ray.models import wav2lip_audio as wa
from heygem_ray.plan import audio_span, output_frame_count

REF = np.load(Path(__file__).parent / "data" / "wav2lip_mel_reference.npz")
SR = 16_000


def _official_num_frames(num_cols: int, fps: float) -> int:
    """inference.py's frame count: one per full window starting at int(i * 80/fps), plus a tail."""
    step, count = 80.0 / fps, 0
    while int(count * step) + wa.MEL_STEP <= num_cols:
        count += 1
    return count + 1


def _whole_row_chunks(wav: np.ndarray, frames: np.ndarray, fps: float) -> np.ndarray:
    """The straightforward definition: mel of the whole row, sliced per frame."""
    mel = wa.melspectrogram(wav)
    starts = wa.chunk_starts(int(frames.max()) + 1, fps, mel.shape[1])
    return np.stack([mel[:, s : s + wa.MEL_STEP] for s in starts[frames]]).astype(np.float32)


def _window(wav: np.ndarray, frames: np.ndarray, fps: float) -> AudioWindow:
    """The slice an actor hands over (`plan.audio_span`)."""
    lo, hi = audio_span(int(frames.min()), int(frames.max()), fps, SR, int(AUDIO_CONTEXT_SECONDS * SR), len(wav))
    return AudioWindow(samples=wav[lo:hi].copy(), start=lo, total=len(wav), level=0.1)


def test_mel_matches_official_reflect_padding():
    mel = wa.melspectrogram(REF["signal"])
    assert mel.shape == (80, 121)
    np.testing.assert_allclose(mel, REF["mel"], rtol=0, atol=1e-6)
    # and it is not the zero-padded variant current librosa gives by default
    assert np.abs(mel - REF["mel_librosa_pad_constant"]).max() > 0.1


def test_mel_basis_is_librosa_slaney():
    """The saved filterbank is the official one and what the installed librosa computes."""
    np.testing.assert_array_equal(wa._mel_basis(), REF["mel_basis"])
    np.testing.assert_array_equal(wa._mel_basis(), wa.librosa_mel_basis())
    assert wa._mel_basis().dtype == np.float32


@pytest.mark.parametrize(("fps", "key", "count"), [(25, "fps25", 35), (30, "fps30", 41), (29.97, "fps29_97", 41)])
def test_chunk_starts_match_official(fps, key, count):
    expected = REF[f"chunk_starts_{key}"]
    assert _official_num_frames(121, fps) == count == len(expected)
    np.testing.assert_array_equal(wa.chunk_starts(count, fps, 121), expected)


@pytest.mark.parametrize("fps", [25, 30, 29.97, 24, 60])
def test_video_covers_whole_audio(fps):
    n_samples = 24_000  # 1.5 s -> T = 121
    n = output_frame_count(n_samples / SR, fps)
    assert n == int(np.ceil(1.5 * fps - 1e-9))
    assert n / fps >= 1.5 and n > _official_num_frames(121, fps)  # the official run stops short
    starts = wa.chunk_starts(n, fps, 121)
    assert len(starts) == n
    expected = [min(int(i * (80.0 / fps)), 121 - 16) for i in range(n)]
    np.testing.assert_array_equal(starts, expected)
    assert starts.max() == 121 - 16 and (np.diff(starts) >= 0).all()


def test_short_audio_is_padded_not_a_crash():
    wav = np.random.default_rng(1).normal(0, 0.1, 1_600).astype(np.float32)  # 0.1 s: T = 9 < 16
    frames = np.arange(output_frame_count(len(wav) / SR, 25))
    chunks = wa.mel_chunks(AudioWindow(wav, 0, len(wav), 0.1), frames, 25)
    assert chunks.shape == (3, 80, 16) and chunks.dtype == np.float32
    padded = np.concatenate([wav, np.zeros(wa.MIN_SAMPLES - len(wav), np.float32)])
    np.testing.assert_allclose(chunks, _whole_row_chunks(padded, frames, 25), atol=1e-6)
    assert chunks[0, :, :4].mean() > chunks[0, :, 12:].mean() + 1  # speech first, then silence
    empty = wa.mel_chunks(AudioWindow(np.zeros(0, np.float32), 0, 0, 0.0), np.arange(1), 25)
    assert empty.shape == (1, 80, 16) and np.all(empty == -4.0)


@pytest.mark.parametrize("fps", [25, 29.97])
def test_segment_chunks_equal_whole_row_slicing(fps):
    rng = np.random.default_rng(7)
    t = np.arange(int(3.3 * SR)) / SR
    wav = 0.4 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.normal(size=t.size)
    wav = wav.astype(np.float32)
    n = output_frame_count(len(wav) / SR, fps)
    segments = {
        "start": np.arange(0, 20),
        "middle": np.arange(35, 52),
        "end": np.arange(n - 18, n),
        "all": np.arange(n),
    }
    for name, frames in segments.items():
        window = _window(wav, frames, fps)
        if name == "middle":
            assert window.start > 0 and window.start + len(window.samples) < len(wav)
        got = wa.mel_chunks(window, frames, fps)
        want = _whole_row_chunks(wav, frames, fps)
        assert got.shape == (len(frames), 80, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("fps", [1.0, 0.5])
def test_frames_a_second_or_longer_get_their_context_too(fps):
    """A slideshow's frame (`render.still_fps=1`) starts half a second or more before its centre."""
    wav = np.random.default_rng(5).normal(0, 0.1, 24 * SR).astype(np.float32)
    frames = np.arange(5, 9)
    np.testing.assert_allclose(
        wa.mel_chunks(_window(wav, frames, fps), frames, fps), _whole_row_chunks(wav, frames, fps), rtol=0, atol=1e-6
    )


def test_segment_at_start_uses_reflect_padding():
    wav = REF["signal"]
    frames = np.arange(5)
    got = wa.mel_chunks(_window(wav, frames, 25), frames, 25)
    np.testing.assert_allclose(got[0], REF["mel"][:, :16], atol=1e-6)
    assert np.abs(got[0] - REF["mel_librosa_pad_constant"][:, :16]).max() > 0.1


def test_window_without_enough_context_is_refused():
    wav = np.random.default_rng(3).normal(0, 0.1, 3 * SR).astype(np.float32)
    frames = np.arange(20, 30)
    tight = AudioWindow(wav[int(0.8 * SR) : int(1.2 * SR)].copy(), int(0.8 * SR), len(wav), 0.1)
    with pytest.raises(ValueError, match="lacks the context"):
        wa.mel_chunks(tight, frames, 25)


def test_nan_audio_is_an_input_error():
    wav = np.zeros(SR, np.float32)
    wav[100] = np.nan
    with pytest.raises(InputError, match="NaN"):
        wa.mel_chunks(AudioWindow(wav, 0, len(wav), 0.1), np.arange(5), 25)
