"""The embedded demo campaign: avatars and narrations made on the fly, so the whole product runs on a
fresh machine with no downloads. The portrait is Grace Hopper's public-domain photo that ships
with matplotlib (`sample_data/grace_hopper.jpg`); clips give it gentle head motion, and the audio
is synthetic speech-like sound with syllable rhythm and pauses."""

from __future__ import annotations

import functools
import os
import wave
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np


def portrait(width: int = 256) -> np.ndarray:
    """The demo portrait (BGR), resized to `width` keeping its aspect, even-sized."""
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(f"matplotlib's sample portrait is missing or unreadable: {path}")
    height = int(round(image.shape[0] * width / image.shape[1] / 2)) * 2
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def head_motion_frame(base: np.ndarray, t: float, seed: int) -> np.ndarray:
    """The portrait at time t with a slow sway, nod and breathing zoom (a few pixels, smooth)."""
    h, w = base.shape[:2]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    dx = 3.0 * np.sin(2 * np.pi * 0.31 * t + phase[0])
    dy = 2.0 * np.sin(2 * np.pi * 0.23 * t + phase[1])
    angle = 1.2 * np.sin(2 * np.pi * 0.17 * t + phase[2])
    scale = 1.02 + 0.01 * np.sin(2 * np.pi * 0.11 * t)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(base, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


#: the portrait's face box as fractions of the photo (x1, y1, x2, y2)
FACE_FRACTIONS = (0.30, 0.17, 0.74, 0.57)


@dataclass(frozen=True)
class Stage:
    """A 16:9 frame of a given height: the portrait at 90 % of the height, centred on a grey ramp
    (how a presenter sits in a wide shot). For benchmark avatars at 720p, 1080p and more."""

    canvas: np.ndarray  # BGR background
    portrait: np.ndarray  # BGR, at its size on the canvas
    x0: int
    y0: int

    @classmethod
    def of_height(cls, height: int) -> Stage:
        height -= height % 2
        width = (height * 16 // 9) // 2 * 2
        base = portrait(512)
        ph = int(0.9 * height) // 2 * 2
        pw = int(round(base.shape[1] * ph / base.shape[0])) // 2 * 2
        base = cv2.resize(base, (pw, ph), interpolation=cv2.INTER_CUBIC if ph > base.shape[0] else cv2.INTER_AREA)
        ramp = np.linspace(40, 90, width, dtype=np.float32)
        canvas = np.repeat(np.repeat(ramp[None, :, None], height, 0), 3, 2).astype(np.uint8)
        return cls(canvas, base, (width - pw) // 2, (height - ph) // 2)

    def frame(self, t: float | None = None, seed: int = 0) -> np.ndarray:
        """The stage at time t (head motion), or the portrait still when t is None."""
        out = self.canvas.copy()
        ph, pw = self.portrait.shape[:2]
        out[self.y0 : self.y0 + ph, self.x0 : self.x0 + pw] = (
            self.portrait if t is None else head_motion_frame(self.portrait, t, seed)
        )
        return out

    def face_box(self) -> list[int]:
        """x1, y1, x2, y2 of the still portrait's face, for `detector=box`: Haar's box on the photo
        with the official bottom pad, as fractions of it (Haar itself misses the face at some sizes)."""
        ph, pw = self.portrait.shape[:2]
        fx1, fy1, fx2, fy2 = FACE_FRACTIONS
        return [self.x0 + int(fx1 * pw), self.y0 + int(fy1 * ph), self.x0 + int(fx2 * pw), self.y0 + int(fy2 * ph)]


def write_avatar_clip(
    path: str, seconds: float, fps: int = 25, width: int = 256, seed: int = 0, rotation: int = 0
) -> int:
    """An H.264 mp4 of the moving portrait; returns its frame count. `rotation` stores the frames
    turned and sets display-matrix metadata, like a phone recording, so players show them upright."""
    base = portrait(width)
    count = int(round(seconds * fps))
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        h, w = base.shape[:2]
        if rotation in (90, 270):
            h, w = w, h
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "16", "preset": "veryfast"}
        if rotation:
            stream.set_display_rotation(-rotation)  # counter-clockwise degrees, FFmpeg's convention
        for i in range(count):
            frame = head_motion_frame(base, i / fps, seed)
            if rotation:
                frame = np.ascontiguousarray(np.rot90(frame, k=rotation // 90))  # stored turned back
            video_frame = av.VideoFrame.from_ndarray(frame, format="bgr24")
            video_frame.pts = i
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return count


def write_avatar_image(path: str, width: int = 256) -> None:
    cv2.imwrite(path, portrait(width))


def speech_like(seconds: float, sample_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Float32 mono speech-like audio: voiced syllables (4-6 per second) with formant-ish harmonics,
    grouped into words and phrases separated by silent pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    out = np.zeros(n, np.float32)
    t = 0.15
    while t < seconds - 0.1:
        for _ in range(rng.integers(2, 6)):  # syllables in a word
            length = rng.uniform(0.12, 0.24)
            if t + length > seconds - 0.05:
                break
            start, stop = int(t * sample_rate), int((t + length) * sample_rate)
            time = np.arange(stop - start) / sample_rate
            f0 = rng.uniform(110, 190) * (1 + 0.08 * np.sin(2 * np.pi * 3 * time))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            formants = rng.uniform([500, 1200, 2400], [800, 1800, 3000])
            voice = sum(
                np.sin(k * phase) / k * (1.0 + 2.0 * np.exp(-((k * f0.mean() - formants) ** 2 / 2e5)).sum())
                for k in range(1, 16)
            )
            envelope = np.sin(np.pi * time / length) ** 1.5
            out[start:stop] += (0.25 * rng.uniform(0.6, 1.0) * envelope * voice / 4).astype(np.float32)
            t += length + rng.uniform(0.02, 0.08)
        t += rng.uniform(0.25, 0.6) if rng.random() < 0.7 else rng.uniform(0.6, 1.0)
    return np.clip(out, -1, 1)


def write_wav(path: str, samples: np.ndarray, sample_rate: int = 16_000) -> None:
    """16-bit PCM mono wav."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sample_rate)
        fh.writeframes(pcm.tobytes())


def write_audio(
    path: str, samples: np.ndarray, sample_rate: int = 16_000, codec: str | None = None, channels: int = 1
) -> None:
    """Encode audio with PyAV in whatever format the suffix implies (mp3, m4a, flac, ogg, wav)."""
    suffix = os.path.splitext(path)[1].lower()
    codec = (
        codec
        or {
            ".mp3": "libmp3lame",
            ".m4a": "aac",
            ".flac": "flac",
            ".ogg": "libopus" if sample_rate == 48000 else "vorbis",
            ".wav": "pcm_s16le",
        }[suffix]
    )
    layout = "stereo" if channels == 2 else "mono"
    data = np.repeat(samples[None, :], channels, axis=0).astype(np.float32)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        assert isinstance(stream, av.AudioStream)  # every codec above is an audio codec
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.time_base = Fraction(1, sample_rate)
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@dataclass(frozen=True)
class DemoAssets:
    audios: list[str]
    avatars: list[str]


def make_demo_assets(
    directory: str,
    audio_seconds: tuple[float, ...] = (6.0, 9.0),
    clip_seconds: tuple[float, ...] = (4.0, 12.0),
    width: int = 256,
) -> DemoAssets:
    """Narrations and avatars (clips plus one still image) under `directory`; existing files are kept."""
    os.makedirs(directory, exist_ok=True)
    audios, avatars = [], []
    for i, seconds in enumerate(audio_seconds):
        path = os.path.join(directory, f"narration_{i + 1}.wav")
        _made(path, functools.partial(_write_speech, seconds=seconds, seed=100 + i))
        audios.append(path)
    for i, seconds in enumerate(clip_seconds):
        path = os.path.join(directory, f"presenter_{i + 1}.mp4")
        _made(path, functools.partial(write_avatar_clip, seconds=seconds, seed=i, width=width))
        avatars.append(path)
    still = os.path.join(directory, "presenter_still.jpg")
    _made(still, functools.partial(write_avatar_image, width=width))
    avatars.append(still)
    return DemoAssets(audios, avatars)


def _write_speech(path: str, seconds: float, seed: int) -> None:
    write_wav(path, speech_like(seconds, seed=seed))


def _made(path: str, write: Callable[[str], object]) -> None:
    """The file at `path`, written by `write` unless it is there: under another name first, so a
    demo stopped midway leaves no half-made input (kept by every later demo, its rows failing)."""
    if os.path.exists(path):
        return
    folder, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    # hidden (no manifest glob takes it), the suffix kept (the writers take the format from it)
    part = os.path.join(folder, f".{stem}.part{suffix}")
    write(part)
    os.replace(part, path)
