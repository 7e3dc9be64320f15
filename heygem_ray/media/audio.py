"""Audio decoding with PyAV: any container/codec FFmpeg reads (wav, mp3, m4a/aac, flac, ogg, ...),
any rate, mono or multi-channel, 8- to 32-bit or float, streamed to 16 kHz mono float32 in chunks so
memory does not grow with the audio's length."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import av
import numpy as np
import numpy.typing as npt

from heygem_ray.errors import InputError

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class AudioWindow:
    """A slice of a row's decoded audio.

    samples: float32 mono at SAMPLE_RATE, the row's samples [start, start + len(samples)).
    total:   number of samples in the whole row's audio (so a renderer knows where the true
             start and end are, e.g. for reflect padding).
    level:   the row's speech level (95th percentile of per-frame speech-band RMS), for
             renderers that normalise loudness per row.
    """

    samples: np.ndarray
    start: int
    total: int
    level: float
    sample_rate: int = SAMPLE_RATE


#: seconds of audio context the actor reads on each side of a segment's frames
AUDIO_CONTEXT_SECONDS = 0.5

#: speech band used for loudness (fundamental and first formants)
SPEECH_BAND_HZ = (250.0, 4000.0)
#: loudness window: 40 ms, about one video frame at 25 fps
LOUDNESS_WINDOW = 640


def iter_pcm16k(path: str, display_uri: str | None = None) -> Iterator[np.ndarray]:
    """Decoded audio as float32 mono chunks at 16 kHz; non-finite samples become silence."""
    uri = display_uri or path
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise InputError("audio", uri, "has no audio stream")
            stream = container.streams.audio[0]
            resampler = Resampler("flt", "mono", SAMPLE_RATE)
            for frame in decoded(container, stream, uri):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1)
    except av.error.FFmpegError as exc:
        raise InputError("audio", uri, f"is not readable audio ({exc.strerror or exc})") from None


#: packets a narration's decoder may refuse and the narration still be read, when they are also
#: under 1 % of its packets: a few damaged bytes; players and ffmpeg skip them. More is a broken
#: file. The ID3 tags between MP3s joined with `cat` (a common way to join TTS chunks, a tag each,
#: some with a picture: many packets) are skipped as tags, not counted.
BAD_PACKETS = 8


def decoded(container: av.container.InputContainer, stream: av.AudioStream, uri: str) -> Iterator[av.AudioFrame]:
    """The audio stream's frames, past the packets its decoder refuses (ID3 tags, and up to
    BAD_PACKETS others, and 1 % of them): the same frames wherever a narration is decoded (its mel
    features, its AAC track), so what is heard and what the lips follow stay in step."""
    bad = good = 0
    any_frame = False
    in_tag = False  # passing the refused packets of an ID3 tag (its picture, cut where the parser resyncs)
    for packet in container.demux(stream):
        try:
            frames = stream.decode(packet)
        except av.error.InvalidDataError:
            in_tag = in_tag or bytes(memoryview(packet)[:3]) in (b"ID3", b"TAG")  # ID3v2, ID3v1
            if in_tag:
                continue
            bad += 1
            if bad > BAD_PACKETS and bad * 100 > bad + good:
                raise InputError("audio", uri, f"is not readable audio ({bad} of {bad + good} packets are damaged)")
            continue
        good += 1
        in_tag = False
        any_frame = any_frame or bool(frames)
        yield from frames
    if bad and not any_frame:
        raise InputError("audio", uri, f"is not readable audio (none of its {bad} packets decodes)")


class Resampler:
    """Decoded frames to one format, layout and rate, whatever the stream does: non-finite
    samples silenced (`finite_samples`), a stream whose rate or layout changes midway (TTS chunks
    joined into one file) followed, and channels averaged into mono by us (`_Downmix`) where the
    target is mono or FFmpeg cannot mix them (over 8, in no known order)."""

    def __init__(self, format: str, layout: str, rate: int):
        self._target = (format, layout, rate)
        self._source: tuple[str, str, int] | None = None
        self._resampler: av.AudioResampler | None = None
        self._downmix = _Downmix(to_mono=layout == "mono")

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """The frames ready so far; None: the rest."""
        if frame is None:
            return self._resampler.resample(None) if self._resampler else []
        frame = self._downmix(finite_samples(frame))
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        out: list[av.AudioFrame] = []
        if source != self._source:
            if self._resampler is not None:
                out += self._resampler.resample(None)  # the samples it holds, in the old setup
            format, layout, rate = self._target
            self._resampler, self._source = av.AudioResampler(format=format, layout=layout, rate=rate), source
        assert self._resampler is not None
        return out + self._resampler.resample(frame)


#: the most channels FFmpeg mixes down by itself (it knows no order for more)
MIXABLE_CHANNELS = 8
#: a mono mix this far below its channels' mean energy (20 dB) is channels cancelling each other,
#: and one back within 10 dB of it is channels that no longer do
CANCELLED = 0.01
RESTORED = 0.1
#: the time constant of the energies `_Downmix` compares: a word, not the whole narration
CHANNEL_MEMORY_SECONDS = 0.5


class _Downmix:
    """A stream's frames, or their channels averaged into one: for a mono target (the official
    Wav2Lip hears a narration as librosa's mono, the mean of its channels; FFmpeg's downmix adds them
    at -3 dB each, 3 dB louder for a narration in two identical channels, every mel value off by
    ~0.24), or where FFmpeg could not mix them. Where the mean falls CANCELLED under the channels
    over the last second or so (a mic lead wired with its phase flipped: the mouth stayed shut under
    a narration that plays aloud), one channel instead (the first, unless another is much louder),
    until the mean is RESTORED: a stream near the line is not switched frame by frame (its level
    jumped 20 dB between neighbouring frames), and an intro in phase or a quiet lead-in does not
    decide for the rest."""

    def __init__(self, to_mono: bool):
        self.to_mono = to_mono
        self._mixed = 0.0  # energy of the mean, and the channels' mean energy, lately (`CHANNEL_MEMORY_SECONDS`)
        self._heard = 0.0
        self._channel: int | None = None

    def __call__(self, frame: av.AudioFrame) -> av.AudioFrame:
        channels = frame.layout.nb_channels
        if channels == 1 or (channels <= MIXABLE_CHANNELS and not self.to_mono):
            return frame
        data = frame.to_ndarray()  # planar: (channels, samples); packed: (1, samples * channels)
        per_channel = data.reshape(channels, -1) if frame.format.is_planar else data.reshape(-1, channels).T
        mean = per_channel.mean(axis=0, dtype=np.float64)
        energy = np.square(per_channel, dtype=np.float64).sum(axis=1)
        kept = math.exp(-per_channel.shape[1] / (CHANNEL_MEMORY_SECONDS * frame.sample_rate))
        self._mixed = self._mixed * kept + float(np.square(mean).sum())
        self._heard = self._heard * kept + float(energy.mean())
        if self._channel is None and self._mixed < CANCELLED * self._heard:
            self._channel = 0 if energy[0] >= 0.5 * energy.max() else int(energy.argmax())
        elif self._channel is not None and (self._mixed > RESTORED * self._heard or self._channel >= channels):
            self._channel = None
        if self._channel is not None:
            mean = per_channel[self._channel].astype(np.float64)
        mono = mean.astype(data.dtype)[None, :]
        mixed = av.AudioFrame.from_ndarray(mono, format=frame.format.name, layout="mono")
        mixed.sample_rate, mixed.pts, mixed.time_base = frame.sample_rate, frame.pts, frame.time_base
        return mixed


def finite_samples(frame: av.AudioFrame) -> av.AudioFrame:
    """Float audio may carry NaN/inf (broken TTS output); they would poison resampling and AAC, and are
    silence here (an inf as full scale would open the mouth and click in the output)."""
    if frame.format.name not in ("flt", "fltp", "dbl", "dblp"):
        return frame
    data = frame.to_ndarray()
    if np.isfinite(data).all():
        return frame
    # float formats decode to float32 (flt) or float64 (dbl) arrays, and nan_to_num keeps the dtype
    cleaned = cast(
        "npt.NDArray[np.float32] | npt.NDArray[np.float64]", np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    )
    fixed = av.AudioFrame.from_ndarray(cleaned, format=frame.format.name, layout=frame.layout.name)
    fixed.sample_rate, fixed.pts, fixed.time_base = frame.sample_rate, frame.pts, frame.time_base
    return fixed


def speech_loudness(samples: np.ndarray, centers: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-band RMS of a Hann window around each center sample (indices into `samples`;
    windows reaching past either end see silence there)."""
    half = LOUDNESS_WINDOW // 2
    padded = np.concatenate([np.zeros(half, np.float32), samples.astype(np.float32), np.zeros(half, np.float32)])
    # sample c sits at c + half in `padded`, so its centred window starts at c
    starts = np.clip(np.asarray(centers, dtype=np.int64), 0, len(padded) - LOUDNESS_WINDOW)
    windows = padded[starts[:, None] + np.arange(LOUDNESS_WINDOW)[None, :]] * np.hanning(LOUDNESS_WINDOW)[None, :]
    spectrum = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    freqs = np.fft.rfftfreq(LOUDNESS_WINDOW, 1.0 / sample_rate)
    band = (freqs >= SPEECH_BAND_HZ[0]) & (freqs <= SPEECH_BAND_HZ[1])
    return np.sqrt(spectrum[:, band].sum(axis=1) * 2.0 / (LOUDNESS_WINDOW * np.sum(np.hanning(LOUDNESS_WINDOW) ** 2)))


class LevelMeter:
    """The row's speech level (95th percentile of 20 ms-spaced speech loudness), fed chunk by chunk.
    Decoders hand over a few hundred samples at a time: they are gathered to a second before being
    measured, and the loudness values kept in one array (8 bytes per 20 ms: 4 MB for 3 hours)."""

    HOP = SAMPLE_RATE // 50

    def __init__(self) -> None:
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._tail = np.zeros(0, np.float32)
        self._values = np.zeros(256)
        self._count = 0

    def feed(self, chunk: np.ndarray) -> None:
        self._pending.append(chunk)
        self._pending_samples += len(chunk)
        if self._pending_samples >= SAMPLE_RATE:
            self._measure()

    def _measure(self) -> None:
        buf = np.concatenate([self._tail, *self._pending])
        self._pending, self._pending_samples = [], 0
        n = (len(buf) - LOUDNESS_WINDOW) // self.HOP + 1
        if n <= 0:
            self._tail = buf
            return
        centers = np.arange(n) * self.HOP + LOUDNESS_WINDOW // 2
        self._keep(speech_loudness(buf, centers))
        self._tail = buf[n * self.HOP :]

    def _keep(self, values: np.ndarray) -> None:
        if self._count + len(values) > len(self._values):
            grown = np.zeros(max(2 * len(self._values), self._count + len(values)))
            grown[: self._count] = self._values[: self._count]
            self._values = grown
        self._values[self._count : self._count + len(values)] = values
        self._count += len(values)

    def level(self) -> float:
        self._measure()
        if self._tail.size:
            self._keep(speech_loudness(self._tail, np.array([len(self._tail) // 2])))
            self._tail = self._tail[:0]
        return float(np.percentile(self._values[: self._count], 95)) if self._count else 0.0
