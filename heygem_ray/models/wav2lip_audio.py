"""Wav2Lip's audio front end (WAV2LIP_SPEC.md §2-§3): log-mel features and per-frame mel windows.

The numbers match the official audio.py as the models were trained (librosa 0.7: STFT with
*reflect* padding), not what the official code gives on librosa >= 0.9 (zero padding, different
first/last two columns). Frame alignment is the official inference indexing, with one deliberate
fix: every output frame gets a window, so the video covers the whole audio (the official loop stops
3-4 frames short), and audio shorter than one window is padded with silence instead of crashing.

The pipeline renders a row in segments and only holds a slice of its audio at a time, so
`mel_chunks` computes a segment's windows from an `AudioWindow` alone, equal to slicing the mel of
the whole row: reflect padding where the window touches the true start or end, real context
elsewhere.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from heygem_ray.errors import InputError
from heygem_ray.media.audio import SAMPLE_RATE, AudioWindow

N_FFT = 800  # = window length: 50 ms
HOP = 200  # 12.5 ms: 80 mel columns per second
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MEL_STEP = 16  # mel columns per video frame's window (200 ms)
#: shortest audio (in samples) that yields one full window: T = 1 + n // HOP >= MEL_STEP
MIN_SAMPLES = (MEL_STEP - 1) * HOP
_MIN_LEVEL = 1e-5  # -100 dB
_REF_DB = 20.0
_MAX_ABS = 4.0
_HALF = N_FFT // 2


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """The official (80, T) float64 log-mel of 16 kHz mono audio, T = 1 + len(wav) // 200."""
    y = _preemphasis(np.asarray(wav, dtype=np.float32))
    return _log_mel(np.pad(y, _HALF, mode="reflect"), 1 + len(y) // HOP)


def chunk_starts(num_frames: int, fps: float, num_cols: int) -> np.ndarray:
    """First mel column of each frame's 16-column window: min(int(i * 80/fps), T - 16).

    For the official frame count this is exactly inference.py's list (its tail chunk is the
    clamp); the extra frames up to ceil(duration * fps) all get the last window. `80/fps` is
    computed first and then multiplied by i, as the official code does, so truncation agrees.
    """
    return _starts(np.arange(num_frames), fps, num_cols)


def _starts(frames: np.ndarray, fps: float, num_cols: int) -> np.ndarray:
    if num_cols < MEL_STEP:
        raise ValueError(f"a mel of {num_cols} columns is shorter than one {MEL_STEP}-column window")
    starts = (np.asarray(frames, dtype=np.int64) * (80.0 / fps)).astype(np.int64)
    return np.minimum(starts, num_cols - MEL_STEP)


def mel_chunks(window: AudioWindow, frames: np.ndarray, fps: float) -> np.ndarray:
    """(len(frames), 80, 16) float32 mel windows for the row's output frames `frames`.

    Equal (to float rounding) to `melspectrogram(whole row)` sliced at `chunk_starts`, using only
    the samples in `window`. The row's audio is taken as padded with silence to MIN_SAMPLES when
    shorter. Raises InputError for non-finite samples and ValueError when the window lacks the
    context the frames need: from 25 ms before a frame's window start to 212.5 ms after it.
    """
    frames = np.asarray(frames, dtype=np.int64)
    samples = np.asarray(window.samples, dtype=np.float32)
    if window.sample_rate != SAMPLE_RATE:
        raise ValueError(f"Wav2Lip needs {SAMPLE_RATE} Hz audio, got {window.sample_rate} Hz")
    if not np.isfinite(samples).all():
        raise InputError("audio", None, "has NaN or infinite samples, so its mel features cannot be computed")
    if len(frames) == 0:
        return np.zeros((0, N_MELS, MEL_STEP), dtype=np.float32)
    start, end, total = window.start, window.start + len(samples), window.total
    if end == total and total < MIN_SAMPLES:
        samples = np.concatenate([samples, np.zeros(MIN_SAMPLES - total, dtype=np.float32)])
        end = total = MIN_SAMPLES
    starts = _starts(frames, fps, 1 + total // HOP)
    first_col, last_col = int(starts.min()), int(starts.max()) + MEL_STEP - 1
    y = _preemphasis(samples)  # y[0] is exact only at the true start (it needs the sample before)
    signal = _padded_span(y, start, end, total, first_col * HOP - _HALF, last_col * HOP + _HALF)
    mel = _log_mel(signal, last_col - first_col + 1)
    offsets = starts - first_col
    chunks = np.stack([mel[:, o : o + MEL_STEP] for o in offsets])
    return chunks.astype(np.float32)


def _padded_span(y: np.ndarray, start: int, end: int, total: int, lo: int, hi: int) -> np.ndarray:
    """Row samples [lo, hi) of the reflect-padded pre-emphasized signal, from the window [start, end)."""
    first_valid = start if start == 0 else start + 1
    need_lo, need_hi = max(lo, 0), min(hi, total)
    if lo < 0:  # reflect about row sample 0: row[-k] = row[k]
        need_hi = max(need_hi, -lo + 1)
    if hi > total:  # reflect about the last sample: row[total - 1 + k] = row[total - 1 - k]
        need_lo = min(need_lo, total - 1 - (hi - total))
    if (lo < 0 and start != 0) or (hi > total and end != total) or need_lo < first_valid or need_hi > end:
        raise ValueError(
            f"audio window [{start}, {end}) of {total} samples lacks the context these frames need: "
            f"samples [{lo}, {hi}) (reflected at the audio's ends)"
        )
    parts = [y[max(lo, 0) - start : min(hi, total) - start]]
    if lo < 0:
        parts.insert(0, y[1 - start : 1 - lo - start][::-1])
    if hi > total:
        parts.append(y[total - 1 - (hi - total) - start : total - 1 - start][::-1])
    return np.concatenate(parts)


def _preemphasis(x: np.ndarray) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1] with zero initial state, in float64 like scipy's lfilter."""
    x64 = x.astype(np.float64)
    y = x64.copy()
    y[1:] -= PREEMPHASIS * x64[:-1]
    return y


def _log_mel(signal: np.ndarray, num_cols: int) -> np.ndarray:
    """Normalized log-mel of `num_cols` STFT frames; frame t is signal[t*HOP : t*HOP + N_FFT]."""
    frames = np.lib.stride_tricks.sliding_window_view(signal, N_FFT)[::HOP][:num_cols]
    magnitude = np.abs(np.fft.rfft(frames * _hann(), axis=1))
    mel = _mel_basis().astype(np.float64) @ magnitude.T
    db = 20.0 * np.log10(np.maximum(_MIN_LEVEL, mel)) - _REF_DB
    return np.clip((2 * _MAX_ABS) * (db + 100.0) / 100.0 - _MAX_ABS, -_MAX_ABS, _MAX_ABS)


@functools.cache
def _hann() -> np.ndarray:
    """Periodic Hann window (scipy's fftbins=True form, librosa's default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


MEL_BASIS_FILE = "wav2lip_mel_basis.npy"


@functools.cache
def _mel_basis() -> np.ndarray:
    """librosa's Slaney filterbank (float32, 80 x 401), as `librosa_mel_basis()` computes it, read
    from the copy saved next to this module: librosa builds it through scipy.signal, whose import
    alone cost each actor ~1 s of its first batch. A test keeps the copy equal to librosa's."""
    with resources.files(__package__).joinpath(MEL_BASIS_FILE).open("rb") as f:
        return np.load(f)


def librosa_mel_basis() -> np.ndarray:
    """The filterbank from librosa itself (keywords needed since librosa 0.10); regenerate the
    saved copy with `np.save(MEL_BASIS_FILE, librosa_mel_basis())` in this directory."""
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
