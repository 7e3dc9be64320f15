"""A campaign meets every kind of broken or unusual input (all generated here). Each row either
renders correctly or fails with a message naming the input and the problem; the others finish;
no partial file is left at any output."""

from __future__ import annotations

import os
import shutil
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import compose_config, write_faceless_clip
from heygem_ray import campaign, demo
from heygem_ray.errors import InputError
from heygem_ray.prepare import prepare_audio, prepare_avatar

FPS = 25


def write_clip(path, frames, pts_ms=None, rotation=0, pix_fmt="yuv420p"):
    """Encode BGR frames; `pts_ms` gives variable frame timing."""
    h, w = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(-rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            frame.pts = int(pts_ms[i]) if pts_ms is not None else i
            if pts_ms is not None:
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    p = lambda name: str(d / name)
    speech = demo.speech_like(1.2, seed=11)
    demo.write_wav(p("speech.wav"), speech)
    base = demo.portrait(160)
    moving = [demo.head_motion_frame(base, i / FPS, 5) for i in range(25)]
    write_clip(p("clip.mp4"), moving)

    open(p("empty.wav"), "wb").close()
    open(p("empty.mp4"), "wb").close()
    data = Path(p("clip.mp4")).read_bytes()
    Path(p("truncated.mp4")).write_bytes(data[: len(data) // 3])
    demo.write_audio(p("audio_only.m4a"), speech)
    noise = np.random.default_rng(0).integers(60, 200, base.shape, dtype=np.uint8)
    write_clip(p("face_leaves.mp4"), [noise if 8 <= i < 20 else f for i, f in enumerate(moving)])
    demo.write_wav(p("silent.wav"), np.zeros(16000, np.float32))
    demo.write_wav(p("tiny.wav"), speech[:1600])  # 0.1 s
    nan = speech.copy()
    nan[2000:2600], nan[5000] = np.nan, np.inf
    demo.write_audio(p("nan.wav"), nan, codec="pcm_f32le")
    big = cv2.copyMakeBorder(cv2.resize(base, (1620, 1900)), 130, 130, 1110, 1110, cv2.BORDER_REFLECT)
    write_clip(p("uhd.mp4"), [big] * 6)  # 3840x2160
    write_clip(p("phone.mp4"), [np.ascontiguousarray(np.rot90(f, k=1)) for f in moving], rotation=90)
    write_clip(p("vfr.mp4"), moving, pts_ms=list(np.cumsum([0] + [33 if i % 2 else 50 for i in range(24)])))
    write_clip(p("odd.mp4"), [cv2.resize(f, (159, 187)) for f in moving], pix_fmt="yuv444p")  # 4:4:4 allows odd sizes
    cv2.imwrite(p("my.photo.v2.png"), base)
    for name, rate, channels in (
        ("speech.mp3", 44100, 2),
        ("speech.m4a", 44100, 1),
        ("speech.flac", 22050, 1),
        ("speech.ogg", 48000, 2),
        ("stereo48k.wav", 48000, 2),
    ):
        demo.write_audio(
            p(name),
            np.interp(np.arange(int(1.2 * rate)) / rate, np.arange(len(speech)) / 16000, speech).astype(np.float32),
            sample_rate=rate,
            channels=channels,
        )
    with wave.open(p("u8.wav"), "wb") as fh:
        fh.setnchannels(1), fh.setsampwidth(1), fh.setframerate(8000)
        fh.writeframes(np.clip(128 + speech[::2] * 127, 0, 255).astype(np.uint8).tobytes())
    write_faceless_clip(p("noface.mp4"), frames=10)
    write_clip(p("bare.h264"), moving[:10])  # an elementary stream: no container, no timestamps
    return d


# id -> (audio, avatar, expected error substrings or None for "renders")
CASES = {
    "missing_avatar": ("speech.wav", "nowhere.mp4", ["avatar", "nowhere.mp4", "does not exist"]),
    "empty_audio": ("empty.wav", "clip.mp4", ["audio", "empty.wav", "is empty (0 bytes)"]),
    "empty_avatar": ("speech.wav", "empty.mp4", ["avatar", "empty.mp4", "is empty (0 bytes)"]),
    "truncated_avatar": ("speech.wav", "truncated.mp4", ["avatar", "truncated.mp4", "not a readable video"]),
    "audio_as_avatar": ("speech.wav", "audio_only.m4a", ["avatar", "audio_only.m4a", "has no video stream"]),
    "text_as_audio": ("not_audio.wav", "clip.mp4", ["audio", "not_audio.wav", "not readable audio"]),
    "no_face": ("speech.wav", "noface.mp4", ["avatar", "noface.mp4", "no face found in any of 10 frames"]),
    "unwritable_output": ("speech.wav", "clip.mp4", ["output", "blocker/x.mp4", "a parent of it is a file"]),
    # cells the manifest refuses: the row fails with why, the campaign goes on
    "bad_box": ("speech.wav", "clip.mp4", ["manifest row 8: box '1,2,3' must be x1, y1, x2, y2"]),
    "reserved_output": ("speech.wav", "clip.mp4", ["manifest row 9: output", "is where the campaign keeps _markers"]),
    "face_leaves_frame": ("speech.wav", "face_leaves.mp4", None),
    "silent_audio": ("silent.wav", "clip.mp4", None),
    "tiny_audio": ("tiny.wav", "clip.mp4", None),
    "nan_audio": ("nan.wav", "clip.mp4", None),
    "uhd_avatar": ("speech.wav", "uhd.mp4", None),
    "phone_rotated": ("speech.wav", "phone.mp4", None),
    "vfr_avatar": ("speech.wav", "vfr.mp4", None),
    "odd_size": ("speech.wav", "odd.mp4", None),
    "dotted_image": ("speech.wav", "my.photo.v2.png", None),
    "mp3": ("speech.mp3", "clip.mp4", None),
    "m4a": ("speech.m4a", "clip.mp4", None),
    "flac": ("speech.flac", "clip.mp4", None),
    "ogg": ("speech.ogg", "clip.mp4", None),
    "stereo48k": ("stereo48k.wav", "clip.mp4", None),
    "pcm_u8": ("u8.wav", "clip.mp4", None),
    "bare_h264": ("speech.wav", "bare.h264", ["avatar", "bare.h264", "carry no timestamps", "ffmpeg -r 25"]),
}


@pytest.fixture(scope="module")
def campaign_results(ray_local, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-out")
    (inputs / "not_audio.wav").write_text("this is not audio")
    (out / "blocker").write_text("a file where a folder should be")
    ids = list(CASES)
    outputs = [str(out / "blocker" / "x.mp4") if i == "unwritable_output" else None for i in ids]
    outputs[ids.index("reserved_output")] = "_markers/x.mp4"
    assert ids.index("bad_box") == 8  # as its expected error says
    manifest = str(out / "m.parquet")
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "audio": [str(inputs / CASES[i][0]) for i in ids],
                "avatar": [str(inputs / CASES[i][1]) for i in ids],
                "output": outputs,
                "box": ["1,2,3" if i == "bad_box" else None for i in ids],
            }
        ),
        manifest,
    )
    cfg = compose_config(f"manifest={manifest}", f"output={out}", "render.segment_seconds=0.5", "render.progress=false")
    summary = campaign.run(cfg)
    assert [r.id for r in summary.rows] == ids  # one result per manifest row, in its order
    return out, {r.id: r for r in summary.rows}


@pytest.mark.parametrize("row_id", list(CASES))
def test_each_input_renders_or_fails_with_a_reason(campaign_results, row_id):
    _out, results = campaign_results
    result = results[row_id]
    expected = CASES[row_id][2]
    if expected is None:
        assert result.status == "ok", result.error
        with av.open(result.output) as c:
            fps = c.streams.video[0].average_rate
            frames = [f for f in c.decode(video=0)]
            assert frames and frames[0].width % 2 == 0 and frames[0].height % 2 == 0
            assert c.streams.audio
        # every frame it reports is in the file, and they cover the narration, at most a frame over
        assert len(frames) == result.frames
        assert 0 <= len(frames) / fps - result.audio_seconds < 1 / fps, (len(frames), fps, result.audio_seconds)
    else:
        assert result.status == "failed"
        for part in expected:
            assert part in result.error, result.error
        assert not os.path.exists(result.output)


def test_no_partial_files_anywhere(campaign_results):
    out, _ = campaign_results
    for root, _, files in os.walk(out):
        assert not [f for f in files if ".part" in f or f.startswith(".")], root


def test_rotated_and_odd_avatars_come_out_upright_and_even(campaign_results):
    _, results = campaign_results
    with av.open(results["phone_rotated"].output) as c:
        first = next(c.decode(video=0)).to_ndarray(format="bgr24")
    upright = demo.head_motion_frame(demo.portrait(160), 0, 5)
    assert first.shape[:2] == upright.shape[:2] == (188, 160)  # portrait, like the scene that was filmed
    assert np.abs(first[:60].astype(int) - upright[:60].astype(int)).mean() < 8  # top of the frame, not sideways
    with av.open(results["odd_size"].output) as c:
        frame = next(c.decode(video=0))
    assert (frame.width, frame.height) == (158, 186)
    with av.open(results["vfr_avatar"].output) as c:  # 33 and 50 ms frames in turn: 24.1 fps on average
        assert c.streams.video[0].average_rate == 24


def test_a_narration_of_a_few_samples_is_refused_as_too_short(tmp_path):
    path = tmp_path / "blip.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\x01\x00" * 10)
    with pytest.raises(InputError, match=r"blip.wav: is 0.001 s long: too short \(at least 0.1 s\)"):
        prepare_audio(str(path), str(tmp_path / "c"))
    with pytest.raises(InputError, match="too short"):  # the same once its PCM is cached
        prepare_audio(str(path), str(tmp_path / "c"))


def test_a_cache_that_refuses_writes_is_named_not_the_input(inputs, tmp_path):
    """A cache the job cannot use is named as such, not as "audio ...: cannot be read"."""
    from heygem_ray.errors import CacheError

    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "fingerprints").write_text("a file where the cache's folder should be")
    with pytest.raises(CacheError, match=r"cache .*/c/fingerprints/.*: cannot be used"):
        prepare_audio(str(inputs / "speech.wav"), str(cache))


def test_a_cached_narration_whose_data_went_is_decoded_again(inputs, tmp_path):
    """A clean-up of the cache (an `rm -r` that listed before the `.json` came, a bucket's lifecycle
    rule) can take an entry's data and leave its `.json`: every later row with that narration failed
    on the missing (or cut) file, in every campaign on the cache. Such an entry is made again."""
    from heygem_ray.config import EncoderConfig
    from heygem_ray.prepare import prepare_audio_track, read_pcm

    cache = str(tmp_path / "c")
    audio = prepare_audio(str(inputs / "speech.wav"), cache)
    whole = read_pcm(audio.pcm_uri, 0, audio.samples)
    assert audio.decoded and not prepare_audio(str(inputs / "speech.wav"), cache).decoded  # found: no bytes added
    os.remove(audio.pcm_uri)
    assert prepare_audio(str(inputs / "speech.wav"), cache) == audio
    assert np.array_equal(read_pcm(audio.pcm_uri, 0, audio.samples), whole)
    with open(audio.pcm_uri, "r+b") as cut:
        cut.truncate(1000)
    prepare_audio(str(inputs / "speech.wav"), cache)
    assert os.path.getsize(audio.pcm_uri) == audio.samples * 4
    track = prepare_audio_track(audio, cache, EncoderConfig())
    size = os.path.getsize(track.uri)
    os.remove(track.uri)
    assert prepare_audio_track(audio, cache, EncoderConfig()) == track and os.path.getsize(track.uri) == size


def _peak_rss_mib_of(code: str) -> float:
    """Run `code` in a fresh Python; its peak RSS in MiB (it must exit 0). From /proc: getrusage's
    figure survives exec, so a child would report this test's own peak."""
    import subprocess
    import sys

    script = code + (
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


def test_limits_reject_rows_instead_of_running_out_of_memory(inputs, tmp_path):
    cfg = compose_config("manifest=m", f"output={tmp_path}")
    with pytest.raises(
        InputError, match=r"uhd.mp4: frames are 3840x2160 = 8294400 pixels, over limits.max_avatar_pixels=2073600"
    ):
        prepare_avatar(str(inputs / "uhd.mp4"), None, cfg.detector, str(tmp_path / "c"), 25.0, max_pixels=1920 * 1080)
    # a 16K PNG, as a still or named as a video: refused from its headers, never decoded (1 GiB of frame)
    huge = np.zeros((16000, 16000), np.uint8)
    cv2.imwrite(str(tmp_path / "huge.png"), huge)
    shutil.copy(tmp_path / "huge.png", tmp_path / "huge.mp4")
    for name in ("huge.png", "huge.mp4"):
        peak = _peak_rss_mib_of(
            "from heygem_ray.media.video import probe\n"
            "from heygem_ray.errors import InputError\n"
            f"try: probe({str(tmp_path / name)!r}, 25.0, max_pixels=4096 * 2304)\n"
            "except InputError as e: assert '16000x16000 = 256000000 pixels, over the 64000000' in str(e), e\n"
            "else: raise SystemExit('not refused')\n"
        )
        assert peak < 300, (name, peak)  # the frame alone would be 732 MiB as BGR
    with pytest.raises(InputError, match=r"speech.wav: is longer than limits.max_audio_seconds=0.5 s"):
        prepare_audio(str(inputs / "speech.wav"), str(tmp_path / "c"), max_seconds=0.5)
    prepare_audio(str(inputs / "speech.wav"), str(tmp_path / "c2"))  # cached now, the limit still holds
    with pytest.raises(InputError, match="over limits.max_audio_seconds=1 s"):
        prepare_audio(str(inputs / "speech.wav"), str(tmp_path / "c2"), max_seconds=1.0)
    shutil.rmtree(tmp_path / "c2")


def _ts_clip(path: Path, first_pts: int, frames: int = 25) -> bytes:
    """An MPEG-TS clip of `frames` frames at 25 fps whose timestamps start at `first_pts` (1/25 s)."""
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 4 * i, np.uint8), format="bgr24")
            frame.pts, frame.time_base = first_pts + i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


@pytest.mark.parametrize("second_at", [0, -150], ids=["repeating", "going-back"])
def test_recordings_joined_end_to_end_are_refused_saying_so(tmp_path, second_at):
    """Two recordings joined byte for byte (`cat a.ts b.ts`): their timestamps start over midway.
    Frames that shared one were mapped to each other's places ("no face found in any of N frames",
    "cannot be decoded this far"), and a second part timed before the first was cut off unsaid."""
    joined = tmp_path / "joined.ts"
    joined.write_bytes(_ts_clip(tmp_path / "a.ts", 200, 50) + _ts_clip(tmp_path / "b.ts", 200 + second_at, 50))
    cfg = compose_config("manifest=m", f"output={tmp_path}", "detector=box", "detector.box=[10,10,60,60]")
    with pytest.raises(InputError, match="its timestamps start over or repeat midway"):
        prepare_avatar(str(joined), (10, 10, 60, 60), cfg.detector, str(tmp_path / "c"), 25.0)
    alone = prepare_avatar(str(tmp_path / "a.ts"), (10, 10, 60, 60), cfg.detector, str(tmp_path / "c"), 25.0)
    assert len(alone.boxes) == 50


def _millisecond_clip(path: Path, stamps: list[int], codec: str, options: dict[str, str] | None = None) -> str:
    """A clip of one frame per timestamp of `stamps`, in 1/1000 s ticks (a browser's recording);
    its path."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30, options=options or {})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, at in enumerate(stamps):
            frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 6 * i, np.uint8), format="bgr24")
            frame.pts, frame.time_base = at, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def test_a_recording_with_frames_stamped_alike_is_refused_for_that_not_as_joined(tmp_path):
    """A browser's recording (1/1000 s ticks) whose recorder stamped two frames of a burst with one
    millisecond: refused as "recordings joined end to end", which it is not, with a fix (FFmpeg's
    concat demuxer) that does nothing for it."""
    stamps = [round(i * 1000 / 30) for i in range(30)]
    stamps[20] = stamps[19]
    path = _millisecond_clip(tmp_path / "burst.webm", stamps, "libvpx")
    cfg = compose_config("manifest=m", f"output={tmp_path}", "detector=box", "detector.box=[10,10,60,60]")
    with pytest.raises(InputError, match=r"1 of its frames carry the timestamp of another \(a recorder's glitch\)"):
        prepare_avatar(path, (10, 10, 60, 60), cfg.detector, str(tmp_path / "c"), 25.0)


def test_a_clip_that_pauses_for_seconds_between_b_frames_is_no_restart(tmp_path):
    """A screen or webcam recording that stalls: a B-frame demuxed after a frame seconds later. The
    restart check measured that in time (seconds behind, against 32 frames' worth) and refused it."""
    stamps = [i * 33 + 5000 * (i // 10) for i in range(40)]  # bursts of 10 frames, 5 s apart
    path = _millisecond_clip(tmp_path / "stalls.mkv", stamps, "libx264", {"preset": "ultrafast", "bf": "3"})
    cfg = compose_config("manifest=m", f"output={tmp_path}", "detector=box", "detector.box=[10,10,60,60]")
    track = prepare_avatar(path, (10, 10, 60, 60), cfg.detector, str(tmp_path / "c"), 25.0)
    assert len(track.boxes) == 40
