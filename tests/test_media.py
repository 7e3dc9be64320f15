"""Real files through PyAV: audio in many formats, seeking reads, segment join without re-encode."""

import os
import struct
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from heygem_ray import demo
from heygem_ray.config import EncoderConfig
from heygem_ray.errors import InputError
from heygem_ray.media import mux, video
from heygem_ray.media.audio import SAMPLE_RATE, LevelMeter, iter_pcm16k


def decode_all(path):
    return np.concatenate(list(iter_pcm16k(path)))


@pytest.mark.parametrize(
    "suffix, rate, channels",
    [
        (".wav", 16000, 1),
        (".wav", 48000, 2),
        (".mp3", 44100, 2),
        (".m4a", 44100, 1),
        (".flac", 22050, 1),
        (".ogg", 48000, 2),
    ],
)
def test_audio_formats_decode_to_16k_mono(tmp_path, suffix, rate, channels):
    seconds = 1.5
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = str(tmp_path / f"a{suffix}")
    demo.write_audio(path, tone, sample_rate=rate, channels=channels)
    pcm = decode_all(path)
    assert pcm.dtype == np.float32
    assert abs(len(pcm) / 16000 - seconds) < 0.08  # lossy codecs pad a frame or so
    spectrum = np.abs(np.fft.rfft(pcm[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) < 3  # the tone survives at the right pitch


def test_a_stereo_narration_is_the_mean_of_its_channels_as_the_official_flow_hears_it(tmp_path):
    """The official Wav2Lip loads a narration as librosa's mono: the mean of its channels. FFmpeg's
    own downmix adds them at -3 dB each: a narration in two identical channels (common from TTS)
    came out 3 dB louder, every mel value off by ~0.24 from what the model was trained on."""

    t = np.arange(16000) / 16000
    left, right = 0.5 * np.sin(2 * np.pi * 220 * t), 0.1 * np.sin(2 * np.pi * 330 * t)
    for name, pair in (("dual.wav", (left, left)), ("two.wav", (left, right))):
        path = _stereo_wav(tmp_path / name, pair)
        np.testing.assert_allclose(decode_all(path), (pair[0] + pair[1]) / 2, atol=2 / 32768)


def test_which_channels_are_heard_follows_the_narration_not_its_start(tmp_path):
    """Decided once from the start, an intro in phase kept the mean (silence) for a flipped voice
    after it, and a quiet lead-in that cancelled kept one channel for an interview panned left and
    right after it (the other speaker lost). The last half second or so decides."""
    t = np.arange(64000) / 16000
    voice = 0.4 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    intro = t < 0.5
    flipped = _stereo_wav(tmp_path / "intro.wav", (voice, np.where(intro, voice, -voice)))
    heard = decode_all(flipped)
    np.testing.assert_allclose(heard[:8000], voice[:8000], atol=2 / 32768)  # the intro: the mean
    np.testing.assert_allclose(heard[-16000:], voice[-16000:], atol=2 / 32768)  # the voice: one channel
    lead_in = t < 0.5
    left, right = np.where(lead_in, 0.001, voice * (t < 2.5)), np.where(lead_in, -0.001, voice * (t >= 2.5))
    heard = decode_all(_stereo_wav(tmp_path / "interview.wav", (left, right)))
    np.testing.assert_allclose(heard[-16000:], right[-16000:] / 2, atol=2 / 32768)  # the right speaker, in the mean


def _stereo_wav(path: Path, pair: tuple[np.ndarray, np.ndarray]) -> str:
    """A 16 kHz 16-bit stereo WAV of the two channels `pair`; its path."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.array(pair, np.float32), format="fltp", layout="stereo")
        frame.sample_rate, frame.time_base, frame.pts = 16000, Fraction(1, 16000), 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def test_a_narration_whose_channels_cancel_in_the_mean_is_heard_from_one_of_them(tmp_path):
    """A stereo narration recorded with one channel's phase flipped (a mic lead wired backwards)
    plays aloud, but the mean of its channels is silence: the mouth stayed shut for the whole video,
    reported ok. Where the mean is 20 dB under the channels, one channel is heard instead."""

    t = np.arange(16000) / 16000
    voice = 0.4 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    spoken = voice * (np.sin(2 * np.pi * 2 * t) > 0)
    hiss = np.random.default_rng(0).normal(0, 0.003, (2, len(t)))
    for name, pair, heard in (
        ("opposite.wav", (voice, -voice), voice),
        ("mostly.wav", (voice, -0.99 * voice), voice),
        ("wide.wav", (voice, 0.3 * voice), 0.65 * voice),  # no cancelling: the mean, as before
        # nearly opposite, with each mic's own hiss, and pauses: one channel throughout, not the
        # mean in the pauses (where the hiss does not cancel) and a channel in the words
        ("hiss.wav", (spoken + hiss[0], -0.82 * spoken + hiss[1]), spoken + hiss[0]),
    ):
        path = _stereo_wav(tmp_path / name, pair)
        np.testing.assert_allclose(decode_all(path), heard, atol=2 / 32768)


def test_8bit_pcm_and_nan_float_wav(tmp_path):
    path = str(tmp_path / "u8.wav")
    with wave.open(path, "wb") as fh:
        fh.setnchannels(1), fh.setsampwidth(1), fh.setframerate(8000)
        fh.writeframes((128 + 60 * np.sin(np.arange(8000) / 5)).astype(np.uint8).tobytes())
    pcm = decode_all(path)
    assert len(pcm) == 16000 and 0.3 < np.abs(pcm).max() < 0.6

    samples = np.sin(np.arange(16000) / 7).astype(np.float32) * 0.3
    samples[100:200] = np.nan
    samples[300:400] = np.inf
    samples[500:600] = -np.inf
    path = str(tmp_path / "nan.wav")
    demo.write_audio(path, samples, codec="pcm_f32le")
    pcm = decode_all(path)
    assert np.isfinite(pcm).all() and len(pcm) == 16000
    assert np.abs(pcm[310:390]).max() < 0.05 and np.abs(pcm[510:590]).max() < 0.05  # silence, not full scale


def test_audio_that_changes_format_midway_or_has_nine_channels(tmp_path):
    """TTS chunks joined into one file (48 kHz mono, then 16 kHz stereo), and a 9-channel float
    WAV (more channels than FFmpeg mixes by itself): both decode whole, and encode for the output."""
    joined = tmp_path / "joined.aac"
    parts = []
    for rate, channels in ((48_000, 1), (16_000, 2)):
        demo.write_audio(str(tmp_path / "part.aac"), _tone(1.0, rate), rate, "aac", channels)
        parts.append((tmp_path / "part.aac").read_bytes())
    joined.write_bytes(b"".join(parts))
    nine = tmp_path / "nine.wav"
    data = np.repeat(_tone(1.0, 16_000)[:, None], 9, axis=1).astype("<f4").tobytes()
    nine.write_bytes(_wav_header(9, 16_000, len(data)) + data)
    for path in (joined, nine):
        pcm = decode_all(str(path))
        assert abs(len(pcm) / 16_000 - (2.0 if path == joined else 1.0)) < 0.15, (path, len(pcm))
        assert 0.3 < np.abs(pcm[4000:12000]).max() < 0.9, path  # the tone, not silence or a mix gone wrong
        assert mux.encode_audio(str(path), str(tmp_path / "out.m4a")) > 0


def test_mp3s_joined_with_cat_decode_whole_and_a_broken_file_is_refused(tmp_path):
    """TTS chunks joined with `cat` (each MP3 with its ID3 tag, one now mid-file, which the decoder
    refuses as a packet): the whole narration, for the lips and for the AAC track alike, as players
    and ffmpeg read it; a file of damaged packets is still refused, as unreadable audio."""
    joined = tmp_path / "joined.mp3"
    parts = []
    for rate, channels in ((24_000, 1), (44_100, 2)):
        demo.write_audio(str(tmp_path / "part.mp3"), _tone(1.0, rate), rate, channels=channels)
        parts.append((tmp_path / "part.mp3").read_bytes())
    assert parts[1].startswith(b"ID3")
    joined.write_bytes(b"".join(parts))
    pcm = decode_all(str(joined))
    assert abs(len(pcm) / 16_000 - 2.0) < 0.1, len(pcm)
    assert 0.3 < np.abs(pcm[20_000:28_000]).max() < 0.9  # the second chunk, heard
    samples = mux.encode_audio(str(joined), str(tmp_path / "out.m4a"))
    assert abs(samples / 48_000 - len(pcm) / 16_000) < 0.03  # the same packets skipped: in step
    # one sentence a chunk (each with its tag: one packet the decoder refuses), twelve of them
    demo.write_audio(str(tmp_path / "part.mp3"), _tone(1.5, 24_000), 24_000)
    joined.write_bytes((tmp_path / "part.mp3").read_bytes() * 12)
    assert 18.0 <= len(decode_all(str(joined))) / 16_000 < 18.0 + 12 * 0.06  # each chunk's encoder delay kept
    # tags with a picture: many packets refused, the parser resyncing inside the next chunk's first
    # frames (lost, as ffmpeg loses them): tags, not damage
    art = np.random.default_rng(1).integers(0, 256, 30_000, dtype=np.uint8).tobytes()
    picture = b"image/jpeg\x00\x03\x00" + art
    frame = b"APIC" + struct.pack(">I", len(picture)) + b"\x00\x00" + picture
    tag = b"ID3\x03\x00\x00" + bytes((len(frame) >> shift) & 127 for shift in (21, 14, 7, 0)) + frame
    demo.write_audio(str(tmp_path / "part.mp3"), _tone(20.0, 24_000), 24_000)
    chunk = (tmp_path / "part.mp3").read_bytes()
    chunk = chunk[10 + sum((b & 127) << shift for b, shift in zip(chunk[6:10], (21, 14, 7, 0), strict=True)) :]
    joined.write_bytes((tag + chunk) * 3)
    assert abs(len(decode_all(str(joined))) / 16_000 - 60.0) < 1.0
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="is not readable audio"):
        decode_all(str(broken))


def _tone(seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _wav_header(channels: int, rate: int, size: int) -> bytes:
    """An IEEE-float WAV header without a channel mask (the channels in no known order)."""
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * 4, channels * 4, 32)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", size)
    )


def test_audio_errors_name_the_input(tmp_path):
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(InputError, match="audio .*text.wav: is not readable audio"):
        decode_all(str(tmp_path / "text.wav"))
    demo.write_avatar_clip(str(tmp_path / "v.mp4"), 0.2)
    with pytest.raises(InputError, match="has no audio stream"):
        decode_all(str(tmp_path / "v.mp4"))


def _frames(path, info):
    return [f for _, f in video.iter_frames(path, info)]


def test_sampled_frames_are_every_nth_of_all_frames_with_every_timestamp(media_dir):
    """What a detector stride reads: every frame's timestamp, and only each third frame converted."""
    path = str(media_dir / "clip6.mp4")
    info = video.probe(path, 25)
    every = list(video.iter_frames(path, info))
    sampled = list(video.iter_sampled_frames(path, info, 3))
    assert [p for p, _ in sampled] == [p for p, _ in every]
    for i, ((_, got), (_, want)) in enumerate(zip(sampled, every, strict=True)):
        if i % 3:
            assert got is None, i
        else:
            assert got is not None and np.array_equal(got, want), i


def test_reader_seeks_to_exact_frames(media_dir):
    path = str(media_dir / "clip6.mp4")
    info = video.probe(path, 25)
    assert (info.fps, info.width, info.height, info.still) == (25.0, 256, 300, False)
    every = list(video.iter_frames(path, info))
    pts = np.array([p for p, _ in every])
    with video.FrameReader(path, info, pts[100:], first_index=100) as reader:
        for wanted in ([140, 141, 142], [120, 119, 118], [143], [149, 100]):
            got = reader.read(np.array(wanted))
            for i in wanted:
                assert np.array_equal(got[i], every[i][1]), i
        with pytest.raises(IndexError):
            reader.read(np.array([99]))


def _numbered_clip(path: str, frames: int, options: dict[str, str], codec: str = "libx264") -> None:
    """A small clip whose frames all differ (brightness by number, a noise corner)."""
    rng = np.random.default_rng(0)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), i * 3 % 256, np.uint8)
            image[:8, :8] = rng.integers(0, 255, (8, 8, 3))
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_a_held_clip_is_read_in_chunks_decoding_each_frame_once(tmp_path, monkeypatch):
    """A slow clip on a steady timeline (`prepare._held`): a frame of the file held across two
    reads made the second seek back to its keyframe, so a segment decoded its GOP again at nearly
    every chunk (17x the file at batch 16). A pause is held for 4 usual steps, not its length."""
    from dataclasses import replace
    from fractions import Fraction

    from heygem_ray import prepare

    path = str(tmp_path / "slow.mkv")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=5, options={"g": "100", "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 4, np.uint8), format="bgr24")
            frame.pts, frame.time_base = i * 200 + (60_000 if i >= 30 else 0), Fraction(1, 1000)  # a minute's pause
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe(path, 25)
    stamps = prepare._frame_timestamps(path, info, path)
    held, pts = prepare._held(prepare._at_timed_rate(info, stamps.pts, stamps.time_base), stamps, 25.0)
    assert held.held and held.fps == 25 and len(pts) == round(25 * (58 * 0.2 + 4 * 0.2 + 0.2))  # the pause 0.8 s
    seeks = []
    seek = video.FrameReader._seek
    monkeypatch.setattr(video.FrameReader, "_seek", lambda self, index: seeks.append(index) or seek(self, index))
    levels = []
    with video.FrameReader(path, held, pts) as reader:
        for start in range(0, len(pts), 8):
            got = reader.read(np.arange(start, min(start + 8, len(pts))))
            levels += [int(got[i].mean()) for i in sorted(got)]
    assert seeks == [0]
    expected = [int(f.mean()) for _, f in video.iter_frames(path, replace(info, held=False))]
    assert levels == [expected[i] for i in np.searchsorted(stamps.pts, pts)]


def test_reader_seeks_into_open_gops(tmp_path):
    """In an open GOP (x265's default) the frames shown just before a keyframe decode from the GOP
    before it; a seek that lands on that keyframe loses them, so the reader goes further back."""
    path = str(tmp_path / "open-gop.mp4")
    _numbered_clip(path, 72, {"x264-params": "open-gop=1:keyint=24:min-keyint=24:scenecut=0:bframes=3"})
    info = video.probe(path, 25)
    every = list(video.iter_frames(path, info))
    pts = np.array([p for p, _ in every])
    assert len(every) == 72
    for i in range(72):  # each from a fresh reader: a seek to that frame
        with video.FrameReader(path, info, pts) as reader:
            assert np.array_equal(reader.read(np.array([i]))[i], every[i][1]), i
        with video.FrameReader(path, info, pts[i:], first_index=i) as reader:  # a segment starting there
            assert np.array_equal(reader.read(np.array([i]))[i], every[i][1]), i


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_a_clip_cut_short_past_its_probe_is_named_the_avatars_damage(tmp_path, threads):
    """A presenter clip cut short (a download stopped midway) whose index, at its start, promises
    every frame: its first frames decode, so it passes the probe; the reader then raises
    AvatarDecodeError, which fails the row naming the avatar, however FFmpeg shows the damage: an
    unthreaded decoder ends early, a threaded one (a renderer's) raised InvalidDataError, which was
    retried on every actor as a renderer's fault."""
    path = str(tmp_path / "whole.mp4")
    image = np.zeros((120, 160, 3), np.uint8)
    image[..., 0], image[..., 1] = np.arange(160) * 255 // 160, (np.arange(120) * 255 // 120)[:, None]
    with av.open(path, "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(50):
            image[100:, :, 2] = np.repeat([(i >> k & 1) * 255 for k in range(8)], 20)  # the frame's number
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(path) as container:
        pts = np.array(sorted(p.pts for p in container.demux(video=0) if p.size))
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    info = video.probe(str(cut), 25)
    with video.FrameReader(str(cut), info, pts, threads=threads) as reader:
        assert len(reader.read(np.arange(0, 10))) == 10
        with pytest.raises(video.AvatarDecodeError):
            for first in range(10, 50, 10):
                reader.read(np.arange(first, first + 10))


@pytest.mark.parametrize("codec", ["libx264", "mpeg2video"])
def test_reader_seeks_in_mpeg_ts_which_has_no_index(tmp_path, codec):
    """A .ts/.mts clip (camcorders, broadcast): a seek lands on no keyframe, and the decoder skips to
    the next one, which the last GOP lacks. Every frame, the last GOP's too, is read exactly, and a
    detection chunk over them gets its frames."""
    path = str(tmp_path / "clip.ts")
    options = {"x264-params": "keyint=50:min-keyint=50:scenecut=0"} if codec == "libx264" else {"g": "50"}
    _numbered_clip(path, 150, options, codec)
    info = video.probe(path, 25)
    every = list(video.iter_frames(path, info))
    pts = np.array([p for p, _ in every])
    assert len(every) == 150
    for i in (0, 49, 50, 99, 103, 120, 141, 149):
        with video.FrameReader(path, info, pts) as reader:
            assert np.array_equal(reader.read(np.array([i, min(i + 1, 149)]))[i], every[i][1]), i
    with video.FrameReader(path, info, pts) as reader:
        assert [n for n, _ in reader.frames_between(110, 150)] == list(range(110, 150))


def _ts_part(path: str, width: int, height: int, first_pts: int, shade: int) -> None:
    """Twelve frames of `shade` with a white top-left quarter, as MPEG-TS, from `first_pts`."""
    with av.open(path, "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(12):
            image = np.full((height, width, 3), shade, np.uint8)
            image[: height // 4, : width // 4] = 255
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = first_pts + i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def test_a_clip_whose_resolution_changes_partway_is_read_at_its_first_size(tmp_path):
    """A saved HLS stream or browser recording that adapted its quality, or two .ts files joined:
    the frames after the change came out at their own size (a smaller one crashed the I420 path,
    a larger one was cropped to its top-left corner; the face track and the encoder work at one
    size). They are scaled to the size the clip was probed at, on every read path."""
    first, second = str(tmp_path / "a.ts"), str(tmp_path / "b.ts")
    _ts_part(first, 96, 72, 0, shade=60)
    _ts_part(second, 64, 48, 14, shade=160)  # the timestamps go on
    path = tmp_path / "joined.ts"
    path.write_bytes(Path(first).read_bytes() + Path(second).read_bytes())
    info = video.probe(str(path), 25)
    assert (info.width, info.height) == (96, 72)
    every = list(video.iter_frames(str(path), info))
    assert len(every) == 24 and {image.shape for _, image in every} == {(72, 96, 3)}
    later = every[20][1]
    assert abs(int(later[60, 80].mean()) - 160) < 8 and later[5, 10].min() > 240  # scaled, not cropped
    pts = np.array([p for p, _ in every])
    with video.FrameReader(str(path), info, pts) as reader:
        frames = reader.read(np.array([3, 20]))
    assert frames[20].shape == (72, 96, 3) and np.abs(frames[20].astype(int) - later).max() <= 2
    with video.FrameReader(str(path), info, pts, pixel_format="yuv420p") as reader:
        i420 = reader.read(np.array([3, 20]))
    assert {a.shape for a in i420.values()} == {(108, 96)}
    assert abs(int(i420[20][60, 80]) - int(i420[3][60, 80])) > 60  # the second part's shade


def test_a_trimmed_clip_is_tracked_by_the_frames_it_shows(tmp_path):
    """A stream-copy trim (ffmpeg -ss ... -c copy, a phone's trim) keeps the packets before the cut
    behind an edit list: demuxed, never shown. A fixed box's track counts the frames shown."""
    from heygem_ray.config import DetectorConfig
    from heygem_ray.prepare import prepare_avatar

    source, trimmed = str(tmp_path / "source.mp4"), str(tmp_path / "trimmed.mp4")
    _numbered_clip(source, 30, {"x264-params": "keyint=10:scenecut=0:bframes=2"})
    with av.open(source) as src, av.open(trimmed, "w") as dst:  # the first 3 frames before the edit
        src_stream = src.streams.video[0]
        dst_stream = dst.add_stream_from_template(src_stream)
        step = int(1 / (src_stream.average_rate * src_stream.time_base))
        for packet in src.demux(src_stream):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - 3 * step, packet.dts - 3 * step, dst_stream
                dst.mux(packet)
    info = video.probe(trimmed, 25)
    shown = _frames(trimmed, info)
    assert len(shown) == 27
    track = prepare_avatar(trimmed, (8, 8, 40, 40), DetectorConfig(name="box"), str(tmp_path / "cache"), 25.0)
    assert len(track.pts) == len(track.boxes) == 27
    with video.FrameReader(trimmed, info, track.pts) as reader:
        got = reader.read(np.arange(27))
    assert all(np.array_equal(got[i], shown[i]) for i in range(27))


def test_a_clip_cut_inside_a_group_of_pictures_is_tracked_by_the_frames_it_decodes(tmp_path):
    """A clip cut between keyframes without re-encoding starts with packets that decode to nothing
    (their reference frames were cut away): the track counts from the first frame the decoder gives,
    so every frame it indexes can be read (frames demuxed but never decoded failed every segment
    that showed them)."""
    from heygem_ray.config import DetectorConfig
    from heygem_ray.prepare import prepare_avatar

    source, cut = str(tmp_path / "source.mp4"), str(tmp_path / "cut.mkv")
    _numbered_clip(source, 40, {"x264-params": "keyint=20:scenecut=0:bframes=0"})
    with av.open(source) as src, av.open(cut, "w") as dst:
        src_stream = src.streams.video[0]
        dst_stream = dst.add_stream_from_template(src_stream)
        for k, packet in enumerate(src.demux(src_stream)):
            if packet.dts is not None and k >= 5:  # from the 6th packet of the first GOP
                packet.stream = dst_stream
                dst.mux(packet)
    info = video.probe(cut, 25)
    decoded = _frames(cut, info)
    assert len(decoded) == 20  # the first GOP's 15 remaining packets decode to nothing
    track = prepare_avatar(cut, (8, 8, 40, 40), DetectorConfig(name="box"), str(tmp_path / "cache"), 25.0)
    assert len(track.pts) == len(track.boxes) == 20
    with video.FrameReader(cut, info, track.pts) as reader:
        got = reader.read(np.arange(20))
        streamed = list(reader.frames_between(0, 20, 3))  # as a detector reads them
    assert all(np.array_equal(got[i], decoded[i]) for i in range(20))
    assert [i for i, _ in streamed] == list(range(20))
    assert all((frame is None) == (i % 3 != 0) for i, frame in streamed)
    assert all(np.array_equal(frame, decoded[i]) for i, frame in streamed if frame is not None)


@pytest.mark.parametrize("detector", ["box", "haar"])
def test_an_avi_whose_timestamps_are_not_in_display_order_is_refused(tmp_path, detector):
    """AVI keeps no presentation times: with B-frames the decoder's frames come in display order with
    their timestamps out of it. Frames are found by timestamp, so such a clip would play out of
    order with each frame's box from another: the row fails with what to do instead."""
    from heygem_ray.config import DetectorConfig
    from heygem_ray.prepare import prepare_avatar

    path = str(tmp_path / "bframes.avi")
    _numbered_clip(path, 20, {"x264-params": "bframes=2:keyint=10"})
    cfg = DetectorConfig(name=detector, box=[8, 8, 40, 40] if detector == "box" else None)
    with pytest.raises(InputError, match="not in display order .* remux it to MP4"):
        prepare_avatar(path, None, cfg, str(tmp_path / "cache"), 25.0)
    mp4 = str(tmp_path / "bframes.mp4")  # the same frames in MP4, which keeps them: fine
    _numbered_clip(mp4, 20, {"x264-params": "bframes=2:keyint=10"})
    assert len(prepare_avatar(mp4, (8, 8, 40, 40), DetectorConfig(name="box"), str(tmp_path / "cache"), 25.0).pts) == 20


@pytest.mark.parametrize("spare_bytes, most_seeks", [(video.SPARE_BYTES, 2), (0, 6)])
def test_a_looped_clips_backward_half_is_read_without_a_seek_per_chunk(tmp_path, monkeypatch, spare_bytes, most_seeks):
    """Ping-pong plays a short clip backward in renderer-sized chunks, each ending just before the
    last one began: the frames decoded on the way to one chunk serve the next ones, and every frame
    is right and the caller's own (the renderer pastes into it)."""
    monkeypatch.setattr(video, "SPARE_BYTES", spare_bytes)
    path = str(tmp_path / "one-gop.mp4")
    _numbered_clip(path, 48, {"x264-params": "keyint=250:scenecut=0"})  # one GOP, as x264 makes short clips
    info = video.probe(path, 25)
    every = list(video.iter_frames(path, info))
    pts = np.array([p for p, _ in every])
    order = list(range(47, -1, -1))  # the backward half
    seen: list[int] = []
    with video.FrameReader(path, info, pts) as reader:
        seek = reader._seek
        monkeypatch.setattr(reader, "_seek", lambda i: seen.append(i) or seek(i))
        handed: list[np.ndarray] = []  # kept alive, so no two can share an id
        for k in range(0, 48, 8):
            got = reader.read(np.array(order[k : k + 8]))
            for i, frame in got.items():
                assert np.array_equal(frame, every[i][1]), i
                assert all(frame is not other and not np.shares_memory(frame, other) for other in handed)
                handed.append(frame)
    assert len(seen) <= most_seeks, seen
    if spare_bytes == 0:
        assert len(seen) == 6  # one per chunk: what a looped clip cost before


def test_an_mjpeg_video_in_a_container_without_a_frame_count_is_a_video(tmp_path):
    """MKV does not say how many frames a stream holds: an image codec there may be a video."""
    path = str(tmp_path / "camera.mkv")
    with av.open(path, "w") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe(path, 25)
    assert not info.still and (info.width, info.height) == (64, 48)
    assert len(_frames(path, info)) == 10


def test_reader_gives_the_decoders_own_planes_as_i420(media_dir, tmp_path):
    from heygem_ray.media.yuv import bgr_to_i420

    path = str(media_dir / "clip2.mp4")
    info = video.probe(path, 25)
    with av.open(path) as container:
        planes = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    pts = np.array([p for p, _ in video.iter_frames(path, info)])
    with video.FrameReader(path, info, pts, pixel_format="yuv420p") as reader:
        got = reader.read(np.array([3, 30, 31]))
    for i in (3, 30, 31):
        assert got[i].shape == (info.height * 3 // 2, info.width)
        np.testing.assert_array_equal(got[i], planes[i])  # exactly as decoded: no colour conversion
    # rotated sources turn each plane; a still is converted once
    turned = str(tmp_path / "rot.mp4")
    demo.write_avatar_clip(turned, 0.2, seed=3, rotation=90)
    tinfo = video.probe(turned, 25)
    tpts = np.array([p for p, _ in video.iter_frames(turned, tinfo)])
    with video.FrameReader(turned, tinfo, tpts) as bgr:
        a = bgr.read(np.array([2]))[2]
    with video.FrameReader(turned, tinfo, tpts, pixel_format="yuv420p") as yuv:
        b = yuv.read(np.array([2]))[2]
    assert np.abs(bgr_to_i420(a).astype(int) - b).mean() < 1.0  # the same upright picture
    still = str(media_dir / "still.png")
    sinfo = video.probe(still, 25)
    with video.FrameReader(still, sinfo, None, pixel_format="yuv420p") as reader:
        np.testing.assert_array_equal(reader.read(np.array([0]))[0], bgr_to_i420(video.read_image(still)))
    with pytest.raises(ValueError, match="pixel_format"):
        video.FrameReader(still, sinfo, None, pixel_format="rgb24")


def test_reader_takes_nv12_planes_as_nvdec_gives_them(tmp_path):
    """NVDEC's frames come back as NV12 (chroma interleaved): the reader splits them into the same
    I420 planes, with no colour conversion. Shown here with an NV12 raw video, which software
    decodes to NV12 frames too."""
    rng = np.random.default_rng(5)
    planes = [rng.integers(16, 236, (72, 64), dtype=np.uint8) for _ in range(4)]
    path = str(tmp_path / "nv12.nut")
    with av.open(path, "w") as container:
        stream = container.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "nv12"
        for i, i420 in enumerate(planes):
            y, u, v = i420[:48], i420[48:60].reshape(24, 32), i420[60:].reshape(24, 32)
            nv12 = np.concatenate([y, np.stack([u, v], axis=2).reshape(24, 64)])
            frame = av.VideoFrame.from_ndarray(nv12, format="nv12")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe(path, 25)
    pts = np.array([p for p, _ in video.iter_frames(path, info)])
    with video.FrameReader(path, info, pts, pixel_format="yuv420p") as reader:
        got = reader.read(np.array([0, 3]))
    for i in (0, 3):
        np.testing.assert_array_equal(got[i], planes[i])


def test_nvdec_is_taken_only_where_it_decodes():
    """No GPU here: auto decodes in software, a named CUDA device refuses to start with the reason."""
    from heygem_ray.segment import nvdec_device

    assert nvdec_device("cpu") is None
    assert nvdec_device("auto") is None
    assert video.nvdec_problem(0)  # says why, does not raise
    with pytest.raises(RuntimeError, match=r"decoder\.device=cuda: NVDEC cannot decode here \("):
        nvdec_device("cuda")


def test_rotation_metadata_is_applied(tmp_path):
    upright, turned = str(tmp_path / "up.mp4"), str(tmp_path / "rot.mp4")
    demo.write_avatar_clip(upright, 0.2, seed=3)
    demo.write_avatar_clip(turned, 0.2, seed=3, rotation=90)
    a, b = video.probe(upright, 25), video.probe(turned, 25)
    assert b.rotation == 90 and (b.width, b.height) == (a.width, a.height)
    diff = np.abs(_frames(upright, a)[0].astype(int) - _frames(turned, b)[0].astype(int)).mean()
    assert diff < 4  # same picture up to codec noise, not a sideways one


_U, _W = 1 << 16, 1 << 30  # a display matrix's 1.0 in its 16.16 and 2.30 entries


@pytest.mark.parametrize(
    "matrix, corner",
    [
        ([_U, 0, 0, 0, _U, 0, 0, 0, _W], (0, 0)),  # as stored
        ([-_U, 0, 0, 0, _U, 0, 0, 0, _W], (0, 1)),  # mirrored left to right (a front camera)
        ([_U, 0, 0, 0, -_U, 0, 0, 0, _W], (1, 0)),  # upside down, not turned
        ([-_U, 0, 0, 0, -_U, 0, 0, 0, _W], (1, 1)),  # a half turn
        ([0, _U, 0, -_U, 0, 0, 0, 0, _W], (0, 1)),  # a quarter turn clockwise
        ([0, _U, 0, _U, 0, 0, 0, 0, _W], (0, 0)),  # transposed: turned and mirrored
        ([0, -_U, 0, -_U, 0, 0, 0, 0, _W], (1, 1)),  # transposed the other way
    ],
)
def test_a_display_matrix_that_mirrors_is_shown_as_ffmpeg_shows_it(tmp_path, matrix, corner):
    """A matrix that mirrors was read for its angle alone: a mirrored clip came out upside down, an
    upside-down one as stored. The frames (BGR and the renderer's I420) show what FFmpeg's own
    autorotation shows: the stored clip's white top-left corner lands where it does there."""
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_matrix(matrix)
        for i in range(3):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:12, :16] = 255
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    info = video.probe(path, 25)
    [(pts, first), *_] = list(video.iter_frames(path, info))
    with video.FrameReader(path, info, np.array([pts]), pixel_format="yuv420p") as reader:
        luma = reader.read(np.array([0]))[0][: info.height]
    for white in (first[..., 0] > 128, luma > 128):
        h, w = white.shape
        assert (h, w) == (info.height, info.width)
        quadrants = [[white[: h // 2, : w // 2].sum(), white[: h // 2, w // 2 :].sum()]]
        quadrants.append([white[h // 2 :, : w // 2].sum(), white[h // 2 :, w // 2 :].sum()])
        assert np.unravel_index(np.argmax(quadrants), (2, 2)) == corner


def test_odd_sizes_are_cropped_even_and_images_with_dots(tmp_path):
    import cv2

    path = str(tmp_path / "my.photo.v2.png")
    cv2.imwrite(path, np.full((101, 77, 3), 128, np.uint8))
    info = video.probe(path, 25)
    assert info.still and (info.width, info.height) == (76, 100)


def test_a_transparent_still_is_shown_over_white(tmp_path):
    """A cut-out portrait (PNG or WebP with alpha): its transparent background comes out white,
    half-transparent pixels half way, opaque ones as they are; a JPEG is read as it is."""
    import cv2

    image = np.zeros((40, 60, 4), np.uint8)
    image[..., :3] = (0, 0, 200)  # red, under every pixel: opaque, half and fully transparent
    image[:, :20, 3], image[:, 20:40, 3], image[:, 40:, 3] = 255, 128, 0
    for name in ("cut-out.png", "cut-out.webp"):
        path = str(tmp_path / name)
        cv2.imwrite(path, image, [cv2.IMWRITE_WEBP_QUALITY, 101] if name.endswith("webp") else [])
        got = video.read_image(path).astype(int)
        assert np.abs(got[:, :20] - (0, 0, 200)).max() <= 2, name
        assert np.abs(got[:, 20:40] - (127, 127, 227)).max() <= 2, name
        assert np.abs(got[:, 40:] - 255).max() <= 2, name
    cv2.imwrite(str(tmp_path / "photo.jpg"), image[..., :3])
    assert np.abs(video.read_image(str(tmp_path / "photo.jpg")).astype(int) - (0, 0, 200)).max() <= 3
    # a GIF of one frame (a still, as `probe` takes it): its transparent colour, black here, was shown
    from PIL import Image

    cut_out = Image.new("P", (60, 40), 0)  # palette: 0 black, 1 red; black is the transparent one
    cut_out.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    cut_out.paste(1, (0, 0, 20, 40))
    cut_out.save(tmp_path / "cut-out.gif", transparency=0)
    info = video.probe(str(tmp_path / "cut-out.gif"), 25.0)
    got = video.read_image(str(tmp_path / "cut-out.gif")).astype(int)
    assert info.still and np.abs(got[:, :20] - (0, 0, 200)).max() <= 2 and (got[:, 20:] == 255).all()


def _rgba_clip(path: str, codec: str, pix_fmt: str, frames: int) -> np.ndarray:
    """A clip of `frames` frames, each red where opaque (left half) and transparent elsewhere."""
    image = np.zeros((48, 64, 4), np.uint8)
    image[:, :32] = (200, 0, 0, 255)  # RGBA
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgba").reformat(format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return image


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "suffix"),
    [
        ("qtrle", "argb", "mov"),
        ("png", "rgba", "mov"),
        ("prores_ks", "yuva444p10le", "mov"),
        ("libvpx-vp9", "yuva420p", "webm"),
    ],
)
def test_a_transparent_video_avatar_is_shown_over_white(tmp_path, codec, pix_fmt, suffix):
    """A cut-out presenter exported with alpha (QuickTime Animation, PNG frames, ProRes 4444, VP9
    in WebM, whose alpha FFmpeg's own decoder drops): its transparent pixels come out white, as a
    transparent photo's do, not black."""
    path = str(tmp_path / f"cut-out-{codec}.{suffix}")
    _rgba_clip(path, codec, pix_fmt, frames=3)
    info = video.probe(path, 25)
    assert not info.still and info.decoding == "over-white"
    (_, frame), *_ = video.iter_frames(path, info, limit=1)
    assert np.abs(frame[:, :30].astype(int) - (0, 0, 200)).max() <= 4  # opaque red, as it was
    assert frame[:, 34:].min() >= 250  # transparent: white


def test_a_stills_rate_given_in_decimals_is_the_ntsc_rate_it_names(tmp_path):
    """`render.still_fps=29.97` is 30000/1001, as editors and platforms know it, not 2997/100;
    other rates are as given."""
    import cv2

    path = str(tmp_path / "face.png")
    cv2.imwrite(path, np.full((48, 64, 3), 90, np.uint8))
    rates = {fps: video.probe(path, fps).fps_fraction for fps in (29.97, 23.976, 59.94, 25.0, 24.5)}
    assert rates == {29.97: "30000/1001", 23.976: "24000/1001", 59.94: "60000/1001", 25.0: "25/1", 24.5: "49/2"}


def test_a_video_of_one_frame_is_a_still_and_cover_art_is_no_avatar(tmp_path):
    """One frame in a container (a photo saved as a QuickTime file, a GIF of one frame with a
    delay of a second): a still at `render.still_fps`, read from the container (it is no image
    file OpenCV reads), not a video at 1 frame a second. An MP3 with cover art given as an avatar
    (audio and avatar swapped) says so."""
    import cv2
    from PIL import Image

    png = str(tmp_path / "photo.mov")
    _rgba_clip(png, "png", "rgb24", frames=1)
    gif = str(tmp_path / "still.gif")
    Image.new("RGB", (64, 48), (200, 0, 0)).save(gif, duration=1000)
    fragmented = str(tmp_path / "all-intra.mp4")  # its header counts the first fragment's frame only
    with av.open(fragmented, "w", options={"movflags": "frag_keyframe"}) as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="bgr24")
            container.mux(stream.encode(frame.reformat(format="yuvj420p")))
        container.mux(stream.encode(None))
    with av.open(fragmented) as container:
        assert container.streams.video[0].frames == 1
    assert not video.probe(fragmented, 25).still
    for path in (png, gif):
        info = video.probe(path, 25)
        assert info.still and info.fps == 25 and (info.width, info.height) == (64, 48), path
        image = video.read_still(path, info)
        assert image.shape == (48, 64, 3) and np.abs(image[:, :30].astype(int) - (0, 0, 200)).max() <= 4, path
    cover = str(tmp_path / "narration.mp3")
    with av.open(cover, "w", format="mp3") as container:
        speech = container.add_stream("libmp3lame", rate=44100, layout="mono")
        art = container.add_stream("mjpeg")
        art.width, art.height, art.pix_fmt = 64, 64, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        packet = av.Packet(cv2.imencode(".jpg", np.full((64, 64, 3), 120, np.uint8))[1].tobytes())
        packet.stream, packet.pts, packet.dts = art, 0, 0
        container.mux(packet)
        tone = av.AudioFrame.from_ndarray(_tone(0.5, 44100)[None], format="fltp", layout="mono")
        tone.sample_rate, tone.pts = 44100, 0
        container.mux(speech.encode(tone))
        container.mux(speech.encode(None))
    with pytest.raises(InputError, match="only cover art"):
        video.probe(cover, 25)


def _combing(image: np.ndarray) -> float:
    """How far each odd row is from the mean of the rows around it (two fields of different
    moments woven together: high on a moving edge; ~0 on a progressive frame)."""
    rows = image.astype(np.float32)
    return float(np.abs(rows[1:-1:2] - (rows[:-2:2] + rows[2::2]) / 2).mean())


def test_an_interlaced_avatar_is_deinterlaced_wherever_its_frames_are_read_from(tmp_path):
    """A broadcast camera's interlaced clip (its two fields a moment apart, a bar moving across):
    its frames come out progressive, not combed on every movement, and the same whether read in one
    pass or after a seek; a progressive clip's frames pass unchanged."""
    height, width = 96, 128
    interlaced = str(tmp_path / "1080i.mp4")
    with av.open(interlaced, "w") as container:
        options = {"x264-params": "interlaced=1:tff=1:keyint=5", "preset": "ultrafast"}
        stream = container.add_stream("libx264", rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(15):
            image = np.zeros((height, width, 3), np.uint8)
            image[::2, 10 + 4 * i : 40 + 4 * i] = 255  # the first field
            image[1::2, 12 + 4 * i : 42 + 4 * i] = 255  # the second, 1/50 s later: moved on
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode(None))
    with av.open(interlaced) as container:
        raw = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert min(_combing(f) for f in raw[1:]) > 5  # woven fields, as decoded
    info = video.probe(interlaced, 25)
    assert info.decoding == "deinterlaced"  # its segments join none decoded otherwise
    pts = np.arange(15) * 512  # 1/12800 s: the muxer's time base for 25 fps
    whole = video.FrameReader(interlaced, info, pts).read(np.arange(15))
    assert max(_combing(whole[i]) for i in range(15)) < 0.3 * min(_combing(f) for f in raw[1:])
    for start in (10, 11):  # a keyframe (every 5th frame), and a frame after one
        sought = video.FrameReader(interlaced, info, pts).read(np.array([start, start + 1]))
        assert all(np.array_equal(sought[i], whole[i]) for i in (start, start + 1)), start
    # a GPU actor's reader decodes it in software too (NVDEC's frames skipped the deinterlacer):
    # asked for NVDEC on this machine, which has none, opening the device would fail
    on_gpu = video.FrameReader(interlaced, info, pts, nvdec=0).read(np.arange(15))
    assert all(np.array_equal(on_gpu[i], whole[i]) for i in range(15))
    progressive = str(tmp_path / "progressive.mp4")
    _tagged_clip(progressive, "yuv420p", 1, full_range=False)
    with av.open(progressive) as container:
        plain = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert video.probe(progressive, 25).decoding == ""
    frames = video.FrameReader(progressive, video.probe(progressive, 25), np.arange(5) * 512).read(np.arange(5))
    assert all(np.array_equal(frames[i], plain[i]) for i in range(5))


def test_an_interlaced_avatar_that_changes_size_midway_is_deinterlaced_frame_for_frame(tmp_path):
    """Two interlaced recordings joined (96x72, then 64x48): each frame of the second came out only
    once the first's last frame had, at the clip's end: every frame of the rest of the clip held in
    memory (~3 MB a 1080 frame), and passed on combed. Each shape gets a deinterlacer of its own."""
    joined = tmp_path / "joined.ts"
    for width, height, start, count in ((96, 72, 0, 20), (64, 48, 22, 60)):
        part = tmp_path / f"{width}.ts"
        with av.open(str(part), "w", format="mpegts") as out:
            options = {"preset": "ultrafast", "x264-params": "interlaced=1:tff=1:keyint=10"}
            stream = out.add_stream("libx264", rate=25, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(count):
                image = np.zeros((height, width, 3), np.uint8)
                image[::2, 4 + i % 20 : 14 + i % 20] = 255  # the first field
                image[1::2, 6 + i % 20 : 16 + i % 20] = 255  # the second, moved on
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts = start + i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        with open(joined, "ab") as whole:
            whole.write(part.read_bytes())
    with av.open(str(joined)) as container:
        stream = container.streams.video[0]
        decoded = 0

        def counted() -> Iterator[av.VideoFrame]:
            nonlocal decoded
            for frame in video.decoded(container, stream):
                decoded += 1
                yield frame

        out = []
        for frame in video.deinterlaced(counted(), stream.time_base):
            out.append(frame.to_ndarray(format="bgr24"))
            assert decoded <= len(out) + 2, (len(out), decoded)  # a frame or two ahead, never the clip
    assert [f.shape[:2] for f in out] == [(72, 96)] * 20 + [(48, 64)] * 60
    with av.open(str(joined)) as container:
        raw = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    # the second part deinterlaced too, not passed on combed as decoded
    assert max(_combing(f) for f in out[20:]) < 0.6 * min(_combing(f) for f in raw[20:])


def _tagged_clip(
    path: str, pix_fmt: str, tags: int | tuple[int, int, int], full_range: bool, codec: str = "libx264"
) -> None:
    """Five frames in `pix_fmt` tagged (colorspace, primaries, transfer) = `tags` (one number: all three)."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        context = stream.codec_context
        context.colorspace, context.color_primaries, context.color_trc = (
            tags if isinstance(tags, tuple) else (tags,) * 3
        )
        context.color_range = 2 if full_range else 1
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="bgr24")
            frame = frame.reformat(format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(
    "pix_fmt, colorspace, full_range, expected",
    [
        ("yuv420p", 1, False, (1, 1, 1)),  # BT.709 planes encoded as they are: their tags go with them
        ("yuv420p", 2, False, (2, 2, 2)),  # untagged stays untagged
        ("yuvj420p", 1, True, (6, 1, 1)),  # full range: through BGR, so BT.601's matrix, video range
        ("yuv444p", 1, False, (6, 1, 1)),  # on BT.709's primaries and transfer (BT.601's would shift colours)
        ("yuv444p", 2, False, (6, 1, 1)),  # untagged, through BGR: BT.709's, as players take HD
        # a 10-bit BT.2020 SDR clip, through BGR: its gamut and curve kept (BT.709's played it desaturated)
        ("yuv420p10le", (9, 9, 14), False, (6, 9, 14)),
    ],
)
def test_the_output_is_tagged_with_the_colours_its_frames_have(tmp_path, pix_fmt, colorspace, full_range, expected):
    """Players take an untagged HD video for BT.709; frames made from BGR here have BT.601's matrix,
    and the planes of an 8-bit 4:2:0 source keep the source's: each output says which."""
    from heygem_ray.config import EncoderConfig

    source = str(tmp_path / "source.mp4")
    _tagged_clip(source, pix_fmt, colorspace, full_range)
    info = video.probe(source, 25)
    out = str(tmp_path / "out.mp4")
    with (
        video.SegmentWriter(out, 64, 48, "25", "libx264", EncoderConfig(), color=info.color) as writer,
        video.FrameReader(
            source, info, np.array([p for p, _ in video.iter_frames(source, info)]), pixel_format="yuv420p"
        ) as reader,
    ):
        frames = reader.read(np.arange(5))
        for i in range(5):
            writer.write_i420(frames[i])
        writer.close()
    with av.open(out) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_primaries, context.color_trc) == expected
        assert context.color_range in (0, 1)  # video range (0: unspecified, what x264 leaves for it)
    still = str(tmp_path / "still.png")
    import cv2

    cv2.imwrite(still, np.full((48, 64, 3), 90, np.uint8))
    assert video.probe(still, 25).color == ""
    # planes of known colours made through BGR (another encoder pixel format) keep their gamut and curve
    assert video.output_tags("1,9,14", i420=False) == "6,9,14" and video.output_tags("1,9,14", i420=True) == "1,9,14"


def test_an_animated_png_is_a_video_and_an_animated_webp_is_refused(tmp_path):
    """Read as stills, both showed their first frame only, frozen, without a word. An APNG is a
    video FFmpeg decodes; an animated WebP, which it cannot decode, fails its row saying so."""
    from PIL import Image

    frames = [Image.new("RGB", (64, 48), (60 * i, 100, 50)) for i in range(3)]
    for suffix in ("png", "webp"):
        frames[0].save(tmp_path / f"anim.{suffix}", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "still.webp")
    info = video.probe(str(tmp_path / "anim.png"), 25)
    assert not info.still and info.fps == 10
    shown = [image[20, 30] for _, image in video.iter_frames(str(tmp_path / "anim.png"), info)]
    assert len(shown) == 3 and len({int(bgr[2]) for bgr in shown}) == 3  # red: 0, 60, 120
    with pytest.raises(InputError, match="animated WebP"):
        video.probe(str(tmp_path / "anim.webp"), 25)
    assert video.probe(str(tmp_path / "still.webp"), 25).still


def test_a_file_is_a_photo_or_a_clip_by_what_it_holds_not_its_name(tmp_path):
    """A clip saved under a photo's name (".png", ".jpg": a mislabelled export) played as its first
    frame, frozen, and reported ok; it plays. A photo saved as ".mp4" stays a photo."""
    import cv2

    _numbered_clip(str(tmp_path / "clip.mp4"), 6, {})
    (tmp_path / "presenter.png").write_bytes((tmp_path / "clip.mp4").read_bytes())
    info = video.probe(str(tmp_path / "presenter.png"), 25)
    assert not info.still and info.fps == 25
    shown = [image for _, image in video.iter_frames(str(tmp_path / "presenter.png"), info)]
    played = [image for _, image in video.iter_frames(str(tmp_path / "clip.mp4"), info)]
    assert len(shown) == 6 and all(np.array_equal(a, b) for a, b in zip(shown, played, strict=True))
    assert not np.array_equal(shown[0], shown[-1])
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.full((48, 64, 3), 90, np.uint8))
    (tmp_path / "photo.jpg").replace(tmp_path / "photo.mp4")
    assert video.probe(str(tmp_path / "photo.mp4"), 25).still


def test_not_a_video(tmp_path):
    path = str(tmp_path / "audio_only.m4a")
    demo.write_audio(path, np.zeros(16000, np.float32))
    with pytest.raises(InputError, match="has no video stream"):
        video.probe(path, 25)


def test_segments_join_without_reencoding(tmp_path, media_dir):
    src = str(media_dir / "clip2.mp4")
    info = video.probe(src, 25)
    frames = _frames(src, info)
    bounds = [(0, 20), (20, 40), (40, 50)]
    packets_in = 0
    for k, (a, b) in enumerate(bounds):
        writer = video.SegmentWriter(
            str(tmp_path / f"s{k}.mp4"), info.width, info.height, info.fps_fraction, "libx264", EncoderConfig()
        )
        for frame in frames[a:b]:
            writer.write(frame)
        assert writer.close() == b - a
        with av.open(str(tmp_path / f"s{k}.mp4")) as seg:
            packets_in += sum(1 for p in seg.demux(video=0) if p.size)
    track = str(tmp_path / "audio.m4a")
    samples = mux.encode_audio(str(media_dir / "speech3.wav"), track, "aac", 96_000, 44_100)
    assert samples == 3 * 44_100
    out = str(tmp_path / "out.mp4")
    stats = mux.stitch(
        lambda i: open(tmp_path / f"s{i}.mp4", "rb"),  # noqa: SIM115 - stitch closes each file it opens
        3,
        track,
        out,
        info.fps_fraction,
    )
    assert stats.frames == 50 == packets_in
    with av.open(out) as c:
        decoded = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
        assert {s.type for s in c.streams} == {"video", "audio"}
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.audio[0].rate == 44_100
    assert _audio_packets(out) == _audio_packets(track)  # the track is copied, not re-encoded
    assert len(decoded) == 50
    for i in (0, 19, 20, 39, 40, 49):  # segment boundaries in order, nothing dropped or doubled
        assert np.abs(decoded[i].astype(int) - frames[i].astype(int)).mean() < 4
    assert (
        np.abs(decoded[20].astype(int) - frames[19].astype(int)).mean()
        > np.abs(decoded[20].astype(int) - frames[20].astype(int)).mean()
    )
    head = Path(out).read_bytes()[:64]
    assert head.index(b"moov") < 64  # faststart: the index precedes the media data


def test_segments_whose_encoder_delays_differ_are_refused_with_why(tmp_path, media_dir):
    """x264 delays a segment of 1-2 frames by nothing and a longer one by its B-frame depth: joined
    as they are, the second would start before the first ends (the planner never cuts them)."""
    rng = np.random.default_rng(0)
    for k, n in enumerate([2, 3]):
        with video.SegmentWriter(str(tmp_path / f"s{k}.mp4"), 64, 64, "25", "libx264", EncoderConfig()) as writer:
            for _ in range(n):
                writer.write(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            writer.close()
    track = str(tmp_path / "a.m4a")
    mux.encode_audio(str(media_dir / "speech3.wav"), track)
    with pytest.raises(RuntimeError, match="segment 1 starts before segment 0 ends"):
        mux.stitch(lambda i: open(tmp_path / f"s{i}.mp4", "rb"), 2, track, str(tmp_path / "o.mp4"), "25")  # noqa: SIM115


def test_the_narration_starts_when_the_video_does(tmp_path, media_dir):
    """AAC puts 1024 samples of priming before the sound; the output's edit list must hide them, or
    every video's narration starts 21 ms late (at 48 kHz)."""
    rate = 16_000
    click = np.zeros(2 * rate, np.int16)
    click[rate // 2] = 30_000  # at 0.5 s
    with wave.open(str(tmp_path / "click.wav"), "wb") as fh:
        fh.setnchannels(1), fh.setsampwidth(2), fh.setframerate(rate)
        fh.writeframes(click.tobytes())
    track = str(tmp_path / "click.m4a")
    mux.encode_audio(str(tmp_path / "click.wav"), track, "aac", 128_000, 48_000)
    src = str(media_dir / "clip2.mp4")
    info = video.probe(src, 25)
    with video.SegmentWriter(
        str(tmp_path / "s.mp4"), info.width, info.height, "25", "libx264", EncoderConfig()
    ) as writer:
        for frame in _frames(src, info)[:50]:
            writer.write(frame)
        writer.close()
    out = str(tmp_path / "out.mp4")
    mux.stitch(lambda i: open(tmp_path / "s.mp4", "rb"), 1, track, out, "25")  # noqa: SIM115 - closed by stitch
    with av.open(out) as c:
        sound = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert abs(np.argmax(np.abs(sound)) / 48_000 - 0.5) < 0.001


def _audio_packets(path: str) -> list[tuple[int | None, bytes]]:
    with av.open(path) as c:
        return [(p.pts, bytes(p)) for p in c.demux(audio=0) if p.size]


def test_encoder_probe_and_options():
    assert video.encoder_works("libx264")
    assert not video.encoder_works("no_such_encoder")
    # an encoder is tried with the pixel format it will get (NVENC takes no yuv422p: a renderer
    # checked with 4:2:0 started, then failed every segment); mpeg4 here, which takes 4:2:0 alone
    assert video.encoder_works("mpeg4") and not video.encoder_works("mpeg4", pix_fmt="yuv422p")
    assert video.encoder_works("libx264", pix_fmt="yuv422p")
    assert "does not open" in (video.encoder_problem("mpeg4", EncoderConfig(pix_fmt="yuv444p")) or "")
    fast = EncoderConfig(crf=20, preset="fast", x264_params="")
    assert video.encoder_options("libx264", fast) == {"crf": "20", "preset": "fast"}
    assert video.encoder_options("libx264", EncoderConfig(x264_params="ref=2"))["x264-params"] == "ref=2"
    assert video.encoder_options("h264_nvenc", EncoderConfig(crf=20, x264_params="ref=2")) == {
        "rc": "vbr",
        "cq": "20",
        "preset": "p4",
        "tune": "hq",
        "gpu": "0",
    }


def test_nvenc_encodes_on_the_gpu_ray_gave_the_actor(monkeypatch):
    """NVENC took the first GPU, not the one its actor's renderer and NVDEC use (with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES every actor of a node encoded on GPU 0)."""
    from heygem_ray import devices

    monkeypatch.setattr(devices, "assigned_gpus", lambda: ["3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert video.encoder_options("h264_nvenc", EncoderConfig())["gpu"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert video.encoder_options("h264_nvenc", EncoderConfig())["gpu"] == "0"


def test_nvdec_is_given_only_the_streams_it_decodes_itself(tmp_path):
    """H.264 and HEVC in 8-bit 4:2:0 go to NVDEC; another stream (10-bit or 4:2:2 H.264, MPEG-2) was
    decoded by FFmpeg in software after all, on the one thread a reader gives NVDEC: it is read in
    software with the reader's threads (asked for NVDEC on this machine, which has none, opening
    the device would fail)."""
    for name, codec, pix_fmt, taken in (
        ("plain.mp4", "libx264", "yuv420p", True),
        ("422.mp4", "libx264", "yuv422p", False),
        ("10bit.mp4", "libx264", "yuv420p10le", False),
        ("mpeg2.mp4", "mpeg2video", "yuv420p", False),
    ):
        path = str(tmp_path / name)
        _tagged_clip(path, pix_fmt, 1, full_range=False, codec=codec)
        with av.open(path) as container:
            assert video.nvdec_takes(container.streams.video[0].codec_context) is taken, name
        if not taken:
            info = video.probe(path, 25)
            reader = video.FrameReader(path, info, _pts(path), nvdec=0)
            assert not reader.on_nvdec
            frames = reader.read(np.arange(5))
            plain = video.FrameReader(path, info, _pts(path)).read(np.arange(5))
            assert all(np.array_equal(frames[i], plain[i]) for i in range(5)), name


@pytest.mark.parametrize("decoding", [None, "deinterlaced"])
def test_nvdec_is_not_given_a_stream_decoded_with_more_than_ffmpegs_decoder(tmp_path, decoding):
    """NVDEC gives the decoder's frames as they are: a stream the face track saw deinterlaced, or
    one whose decoding is not known (a probe cached before it was recorded), is read in software as
    it was tracked (asked for NVDEC on this machine, which has none, opening the device fails)."""
    import dataclasses

    path = str(tmp_path / "plain.mp4")
    _tagged_clip(path, "yuv420p", 1, full_range=False, codec="libx264")
    info = dataclasses.replace(video.probe(path, 25), decoding=decoding)
    with video.FrameReader(path, info, _pts(path), nvdec=0) as reader:
        assert not reader.on_nvdec
        frames = reader.read(np.arange(3))
    assert all(frame.shape == (info.height, info.width, 3) for frame in frames.values())


def _pts(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.array(sorted(p.pts for p in container.demux(video=0) if p.pts is not None))


def _x264_settings(path: str) -> str:
    """The options line x264 writes into the stream it encodes (an SEI message)."""
    data = Path(path).read_bytes()
    start = data.index(b"options: ")
    return data[start : data.index(b"\0", start)].decode()


@pytest.mark.parametrize("params", ["", "mbtree=1:rc-lookahead=10"])
def test_x264_params_reach_the_encoder(tmp_path, params):
    """The default's rate control is really x264's: superfast alone has mb-tree off and no lookahead."""
    path = str(tmp_path / "seg.mp4")
    enc = EncoderConfig(preset="superfast", x264_params=params)
    writer = video.SegmentWriter(path, 64, 48, "25", "libx264", enc)
    for k in range(3):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.close()
    settings = _x264_settings(path)
    assert ("mbtree=1" in settings and "rc_lookahead=10" in settings) == bool(params)
    assert "subme=1" in settings  # still superfast's search


def test_encoder_settings_are_checked_by_the_encoder_itself():
    """x264 skips options it cannot parse and says so only in its log: the check reads that log,
    and also opens the encoder, which some parsed settings stop."""
    assert video.encoder_problem("libx264", EncoderConfig()) is None
    assert video.encoder_problem("libx264", EncoderConfig(x264_params="")) is None
    for _ in range(2):  # the same complaint again (a second actor in one process): FFmpeg would skip it
        problem = video.encoder_problem("libx264", EncoderConfig(x264_params="mbtree=1:no-such-option=3"))
        assert problem and "x264 says" in problem and "no-such-option" in problem
    assert video.encoder_problem("libx264", EncoderConfig(x264_params="me=diamond"))  # a value x264 does not take
    assert "does not open" in (video.encoder_problem("libx264", EncoderConfig(x264_params="level=99")) or "")


def _held_open(path: Path) -> bool:
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir() if fd.is_symlink())


def test_a_writer_a_failure_left_lets_its_file_and_encoder_go(tmp_path):
    """A segment whose rendering fails must not keep its encoder, threads and file in a long-lived
    actor until the garbage collector comes."""
    path = tmp_path / "segment.mp4"
    with (
        pytest.raises(RuntimeError, match="render failed"),
        video.SegmentWriter(str(path), 64, 48, "25", "libx264", EncoderConfig()) as writer,
    ):
        for k in range(60):  # past x264's lookahead: packets reach the file
            writer.write(np.full((48, 64, 3), k, np.uint8))
        assert _held_open(path)
        raise RuntimeError("render failed")
    assert not _held_open(path)
    with video.SegmentWriter(str(path), 64, 48, "25", "libx264", EncoderConfig()) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        assert writer.close() == 1
    assert not _held_open(path) and video.probe(str(path), 25).width == 64


@pytest.mark.parametrize("stated, paused", [(None, False), (30, False), (None, True)])
def test_a_webm_whose_container_belies_its_timestamps_plays_at_the_rate_they_keep(tmp_path, stated, paused):
    """A WebM without a frame duration (Chrome's MediaRecorder writes none) gave its timestamps'
    millisecond tick as its rate: 1000 fps, the presenter 38 times too fast (every 17th frame at
    `render.max_fps`); one stating 30 fps while its frames come every 40 ms on average moved 20 %
    too fast. The rate is the average its timestamps keep, written at the standard one near it; a
    pause in the recording (10 s without a frame) is left out, not taken for slow motion."""
    from heygem_ray import prepare
    from heygem_ray.config import DetectorConfig

    source = tmp_path / "recorded.webm"
    with av.open(str(source), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=stated or 30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(60):  # 25 fps on average, each frame's time varying as a browser's recording's
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="bgr24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += (33, 47, 25, 55, 40)[i % 5] + (10_000 if paused and i == 30 else 0)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    if stated is None:  # the DefaultDuration element, renamed to one no reader knows
        data = source.read_bytes()
        assert data.count(bytes.fromhex("23E383")) == 1
        source.write_bytes(data.replace(bytes.fromhex("23E383"), bytes.fromhex("23E384")))
    with av.open(str(source)) as container:
        assert container.streams.video[0].average_rate == (stated or None)
    box = DetectorConfig(name="box", box=[0, 0, 32, 32])
    track = prepare.prepare_avatar(str(source), None, box, str(tmp_path / "cache"), 25.0)
    assert track.info.fps_fraction == "25/1" and len(track.pts) == len(track.boxes) == 60


@pytest.mark.parametrize("rotation", [0, 90])
def test_a_clip_over_max_side_is_read_at_its_fitted_size(tmp_path, rotation):
    """A 4K phone clip renders at render.max_side on its longest side: every reader (the renderer's
    I420 and BGR frames, the detector's sampled ones) gives its frames at that size, upright, the
    picture an area filter makes of the whole frame; a clip within the bound is read as it is."""
    import cv2

    from heygem_ray.media.yuv import bgr_to_i420

    path = str(tmp_path / "clip.mp4")
    demo.write_avatar_clip(path, 0.2, seed=3, rotation=rotation)  # 256x300 shown
    native = video.probe(path, 25)
    assert video.fitted(native, path, 300) is native and video.fitted(native, path, 0) is native
    info = video.fitted(native, path, 150)
    assert (info.width, info.height) == (128, 150) and info.scale == pytest.approx(0.5)
    pts = np.array([p for p, _ in video.iter_frames(path, native)])
    with video.FrameReader(path, native, pts) as reader:
        full = reader.read(np.array([2]))[2]
    expected = cv2.resize(full, (128, 150), interpolation=cv2.INTER_AREA)
    with video.FrameReader(path, info, pts) as reader:
        bgr = reader.read(np.array([2]))[2]
    with video.FrameReader(path, info, pts, pixel_format="yuv420p") as reader:
        i420 = reader.read(np.array([2]))[2]
    sampled = [f for _, f in video.iter_sampled_frames(path, info, 2)]
    assert bgr.shape == sampled[2].shape == (150, 128, 3) and i420.shape == (225, 128)
    assert np.abs(bgr.astype(int) - expected).mean() < 1.5
    assert np.abs(bgr_to_i420(expected).astype(int) - i420).mean() < 1.5  # swscale's area filter: the same picture
    np.testing.assert_array_equal(sampled[2], bgr)


def test_a_clip_that_would_shrink_to_nothing_is_bad_input(tmp_path):
    info = video.VideoInfo(False, 25.0, "25/1", 2000, 8, 0, 10)
    assert video.fitted(info, "strip.mp4", 960).height == 2
    with pytest.raises(InputError, match=r"frames are 2000x8: shrunk to fit the limits it would be 480x0"):
        video.fitted(info, "strip.mp4", 480)


def test_a_rows_speech_level_is_the_same_however_it_is_fed_and_its_memory_stays_small():
    """Decoders hand over ~340 samples at a time: the meter kept one small array per chunk (7 MB for
    18 minutes of narration, 100 MB at the 4-hour limit). Gathered to a second, kept in one array:
    the same level, from a few bytes per 20 ms."""
    import tracemalloc

    rng = np.random.default_rng(7)
    speech = (rng.standard_normal(SAMPLE_RATE * 20) * np.repeat(rng.random(400), SAMPLE_RATE // 20)).astype(np.float32)

    def level(sizes) -> float:
        meter, at = LevelMeter(), 0
        for size in sizes:
            meter.feed(speech[at : at + size])
            at += size
        return meter.level()

    whole = level([len(speech)])
    assert level([341] * (len(speech) // 341 + 1)) == whole
    assert level(rng.integers(1, 5000, size=len(speech) // 100)) == whole
    assert np.isfinite(level([1]))  # a single sample is measured, not refused
    assert LevelMeter().level() == 0.0  # no audio: no level

    minutes = 20
    tracemalloc.start()
    meter = LevelMeter()
    chunk = speech[:341]
    for _ in range(minutes * 60 * SAMPLE_RATE // len(chunk)):
        meter.feed(chunk)
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert kept < 1.5 * 2**20, kept  # 60,000 values: under 1 MB, whatever the chunking
    assert meter.level() > 0


@pytest.mark.parametrize("bframes", ["0", "2"])
def test_an_mpeg_program_stream_reads_the_frames_asked_for_wherever_a_segment_starts(tmp_path, bframes):
    """After a seek into an MPEG program stream (.mpg, .vob: a DVD rip, a capture card's file)
    FFmpeg stamps the frames a fraction of a frame or more off the times a read from its start
    gives them: a segment starting past the first GOPs failed ("not found in the stream") or showed
    the frame before the one asked for, silently. Such a stream is read from its start."""
    from heygem_ray.prepare import _frame_timestamps

    path = str(tmp_path / "tape.mpg")
    _numbered_clip(path, 200, {"bf": bframes, "g": "15"}, codec="mpeg2video")
    info = video.probe(path, 25)
    every = list(video.iter_frames(path, info))
    pts = _frame_timestamps(path, info, path).pts
    assert len(every) == len(pts) == 200
    for start in (0, 30, 70, 90, 140):
        with video.FrameReader(path, info, pts[start:], first_index=start) as reader:
            got = reader.read(np.arange(start, start + 20))
            for i in range(start, start + 20):
                assert np.array_equal(got[i], every[i][1]), (start, i)
            assert [i for i, _ in reader.frames_between(start + 40, start + 45)] == list(range(start + 40, start + 45))


def test_a_stream_whose_frames_mostly_carry_no_timestamps_is_refused_with_a_way_out(tmp_path):
    """H.264 in an MPEG program stream: only the packet starting each PES block carries a
    timestamp. The rest were left out unsaid, and a 200-frame clip was taken for one of 4 frames."""
    from heygem_ray.errors import InputError
    from heygem_ray.prepare import _frame_timestamps

    path = str(tmp_path / "camcorder.mpg")
    _numbered_clip(path, 200, {"bf": "3", "g": "30"})
    with av.open(path) as container:
        assert sum(p.pts is None for p in container.demux(video=0) if p.size) > 100  # as described
    info = video.probe(path, 25)
    with pytest.raises(InputError, match="of its 200 frames carry no timestamps.*libx264"):
        _frame_timestamps(path, info, path)
