"""Preparation stages, run as Ray tasks before rendering.

* Content fingerprints of inputs, memoised in the cache by (URI, size, version) so a rerun does not
  re-read every file.
* Audio: decoded once per distinct content to 16 kHz mono float32 PCM in the cache (renderers read
  only the window a segment needs), with the row's speech level; and encoded once per distinct
  content and audio settings to the output's codec (an audio-only mp4 the stitch copies packets
  from), while the row renders, so neither a row's last step nor the next row with the same
  narration encodes it again.
* Avatar: probed and face-tracked once per distinct content and detector config; the track (one box
  and one timestamp per frame) is cached and reused by every row and every rerun.

Cache layout under `cache`:  fingerprints/<key>.txt, audio/<fp>.f32 + .json,
audio/<fp>.<codec>-<bitrate>-<rate>.m4a + .json, avatars/<fp>/<key>.npz
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import av
import numpy as np

from heygem_ray import metrics, storage
from heygem_ray.config import Config, DetectorConfig, EncoderConfig
from heygem_ray.detect import build_detector
from heygem_ray.detect.track import TrackBuilder, fixed_track
from heygem_ray.errors import InputError, caching, check_writable, reading
from heygem_ray.manifest import Row
from heygem_ray.markers import Marker, read_marker
from heygem_ray.media.audio import SAMPLE_RATE, LevelMeter, iter_pcm16k
from heygem_ray.media.mux import encode_audio
from heygem_ray.media.video import VideoInfo, iter_sampled_frames, probe
from heygem_ray.plan import stable_hash
from heygem_ray.storage import StorageOptions


def content_fingerprint(uri: str, cache: str, what: str = "input") -> str:
    """BLAKE2b of the file's bytes, memoised under the cache by URI, size and version (mtime/ETag)."""
    fs, path = storage.url_to_fs(uri)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(path)
    if info.get("size") == 0:  # None: unknown (an HTTP server that sends no length), not empty
        raise InputError(what, uri, "is empty (0 bytes)")
    memo = storage.join(cache, "fingerprints", f"{storage.version_key(uri, info)[:32]}.txt")
    with caching(memo), contextlib.suppress(FileNotFoundError):
        return storage.read_bytes(memo).decode().strip()
    fp = storage.fingerprint(uri)
    with caching(memo):
        storage.write_bytes(memo, fp.encode())
    return fp


@dataclass(frozen=True)
class AudioInfo:
    uri: str
    fingerprint: str
    samples: int
    level: float
    pcm_uri: str

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def prepare_audio(uri: str, cache: str, max_seconds: float = float("inf")) -> AudioInfo:
    """Decode a row's audio into the PCM cache (once per distinct content); stop as soon as it
    runs past `max_seconds` rather than decode hours of an unwanted file."""
    with reading("audio", uri):
        fp = content_fingerprint(uri, cache, "audio")
        base = storage.join(cache, "audio", fp)
        with caching(base + ".json"), contextlib.suppress(FileNotFoundError):
            meta = json.loads(storage.read_bytes(base + ".json"))
            return _within_limits(AudioInfo(uri, fp, meta["samples"], meta["level"], base + ".f32"), max_seconds)
        local = storage.local_copy(uri)
        meter = LevelMeter()
        samples = 0
        with tempfile.NamedTemporaryFile(prefix="heygem-pcm-", suffix=".f32", delete=False) as tmp:
            try:
                for chunk in iter_pcm16k(local, display_uri=uri):
                    tmp.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
                    meter.feed(chunk)
                    samples += len(chunk)
                    if samples > max_seconds * SAMPLE_RATE:
                        raise InputError("audio", uri, f"is longer than limits.max_audio_seconds={max_seconds:g} s")
                tmp.close()
                if samples == 0:
                    raise InputError("audio", uri, "has no audio samples")
                with caching(base + ".f32"):
                    storage.publish_file(tmp.name, base + ".f32")
            finally:
                os.unlink(tmp.name)
        level = meter.level()
        with caching(base + ".json"):
            storage.write_bytes(base + ".json", json.dumps({"samples": samples, "level": level}).encode())
        return _within_limits(AudioInfo(uri, fp, samples, level, base + ".f32"), max_seconds)


#: the shortest narration a row may have: a frame or two of video (shorter ones leave the output's
#: audio encoder nothing to encode)
MIN_AUDIO_SECONDS = 0.1


def _within_limits(audio: AudioInfo, max_seconds: float) -> AudioInfo:
    if audio.seconds < MIN_AUDIO_SECONDS:
        raise InputError(
            "audio", audio.uri, f"is {audio.seconds:.3f} s long: too short (at least {MIN_AUDIO_SECONDS:g} s)"
        )
    if audio.seconds > max_seconds:
        raise InputError(
            "audio", audio.uri, f"is {audio.seconds:.0f} s long, over limits.max_audio_seconds={max_seconds:g} s"
        )
    return audio


@dataclass(frozen=True)
class AudioTrack:
    """A row's audio in the output's codec, ready to be copied into the finished mp4."""

    uri: str
    samples: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


def prepare_audio_track(
    audio: AudioInfo, cache: str, encoder: EncoderConfig, storage_options: StorageOptions | None = None
) -> AudioTrack:
    """Encode the row's audio with the output's audio settings, once per distinct content and
    settings (cached beside its PCM)."""
    if storage_options is not None:
        storage.configure(storage_options)
    # v2: priming dated before 0 (heygem_ray.media.mux); a v1 track starts the narration late
    settings = f"{encoder.audio_codec}-{encoder.audio_bitrate}-{encoder.audio_sample_rate}-v2"
    base = storage.join(cache, "audio", f"{audio.fingerprint}.{settings}")
    with contextlib.suppress(FileNotFoundError):
        meta = json.loads(storage.read_bytes(base + ".json"))
        return AudioTrack(base + ".m4a", meta["samples"], encoder.audio_sample_rate)
    with reading("audio", audio.uri), tempfile.TemporaryDirectory(prefix="heygem-track-") as tmp:
        local = os.path.join(tmp, "track.m4a")
        samples = encode_audio(
            storage.local_copy(audio.uri),
            local,
            encoder.audio_codec,
            encoder.audio_bitrate,
            encoder.audio_sample_rate,
            audio_display=audio.uri,
        )
        with caching(base + ".m4a"):
            storage.publish_file(local, base + ".m4a")
    with caching(base + ".json"):
        storage.write_bytes(base + ".json", json.dumps({"samples": samples}).encode())  # last: the track is whole
    return AudioTrack(base + ".m4a", samples, encoder.audio_sample_rate)


@storage.retrying
def read_pcm(pcm_uri: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of cached PCM (a ranged read: segments never load the whole row)."""
    with storage.open_uri(pcm_uri) as fh:
        fh.seek(start * 4)
        data = fh.read((stop - start) * 4)
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class AvatarTrack:
    """Everything the renderer needs to know about an avatar: its facts, the timestamp of every frame
    (for exact seeking, VFR included) and the face box of every frame."""

    uri: str
    fingerprint: str
    info: VideoInfo
    pts: np.ndarray  # int64 (n,), presentation order; [0] for a still image
    boxes: np.ndarray  # int32 (n, 4) x1, y1, x2, y2

    @property
    def frames(self) -> int:
        return len(self.boxes)


#: config keys that change how fast a stage runs, never the bytes it makes (kept out of cache keys
#: and row fingerprints, so changing them re-renders nothing)
NOT_OUTPUT_AFFECTING = ("batch_size", "device", "num_gpus", "face_cache_mb")


#: bump when a code change alters face tracks, so cached tracks are made again (2: the tracker
#: keeps to its presenter while another face is found; 3: the Haar detector follows its face; 4:
#: its face-less back-off, and a detector stride counted in the tracker's hand-off)
TRACK_VERSION = "4"


def detector_key(cfg: DetectorConfig, box: tuple[int, int, int, int] | None, still_fps: float) -> str:
    """What decides an avatar's face track: the detector's settings, its weights' version (a file
    replaced at the same URI makes new tracks), the row's box, the frame rate of stills."""
    relevant = {k: v for k, v in asdict(cfg).items() if k not in NOT_OUTPUT_AFFECTING}
    return stable_hash(TRACK_VERSION, relevant, checkpoint_version(cfg.checkpoint), box, still_fps)


#: seconds a checkpoint's version is trusted before the store is asked again (once per row otherwise)
CHECKPOINT_VERSION_SECONDS = 60.0
_checkpoint_versions: dict[str, tuple[float, str]] = {}


def checkpoint_version(uri: str | None) -> str | None:
    """A key that changes when the model file at `uri` is replaced (size and ETag or mtime)."""
    if not uri:
        return None
    kept = _checkpoint_versions.get(uri)
    if kept is not None and time.monotonic() - kept[0] < CHECKPOINT_VERSION_SECONDS:
        return kept[1]
    fs, path = storage.url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError):  # a missing file fails where it is loaded, saying so
        version = storage.version_key(uri, fs.info(path))
        _checkpoint_versions[uri] = (time.monotonic(), version)
        return version
    return None


def prepare_avatar(
    uri: str,
    box: tuple[int, int, int, int] | None,
    cfg: DetectorConfig,
    cache: str,
    still_fps: float,
    max_pixels: int | None = None,
    storage_options: StorageOptions | None = None,
) -> AvatarTrack:
    """Probe and face-track an avatar, or load the cached track. `storage_options` (the campaign's
    `storage.options`) are set for this process first: a Ray task may run in a worker that has
    never seen them (another node, a fresh process); None leaves the process's as they are."""
    if storage_options is not None:
        storage.configure(storage_options)
    with reading("avatar", uri):
        fp = content_fingerprint(uri, cache, "avatar")
        track_uri = storage.join(cache, "avatars", fp, detector_key(cfg, box, still_fps) + ".npz")
        with caching(track_uri), contextlib.suppress(FileNotFoundError):
            track = _load_track(uri, fp, storage.read_bytes(track_uri))
            _check_pixels(uri, track.info, max_pixels)
            return track
        local = storage.local_copy(uri)
        info = probe(local, still_fps, display_uri=uri)
        _check_pixels(uri, info, max_pixels)
        fixed = box or (list(cfg.box) if cfg.name == "box" and cfg.box else None)
        if cfg.name == "box" and fixed is None:
            raise InputError("avatar", uri, "detector=box needs detector.box=[x1,y1,x2,y2] or a `box` manifest column")
        if fixed is not None:
            pts = _frame_timestamps(local, info, uri)
            try:
                boxes = fixed_track(fixed, len(pts), info.width, info.height)
            except ValueError as exc:
                raise InputError("avatar", uri, str(exc)) from None
        else:
            clock = metrics.StageClock()
            with clock("detect"):
                pts, boxes = _detect_track(local, info, cfg, uri)
            metrics.stage_seconds(clock.seconds)
        track = AvatarTrack(uri, fp, info, pts, boxes)
        with caching(track_uri):
            storage.write_bytes(track_uri, _dump_track(track))
        return track


def _check_pixels(uri: str, info: VideoInfo, max_pixels: int | None) -> None:
    pixels = info.width * info.height
    if max_pixels and pixels > max_pixels:
        raise InputError(
            "avatar",
            uri,
            f"frames are {info.width}x{info.height} = {pixels} pixels, over limits.max_avatar_pixels={max_pixels}",
        )


def _detect_track(local: str, info: VideoInfo, cfg: DetectorConfig, uri: str) -> tuple[np.ndarray, np.ndarray]:
    detector = build_detector(cfg)
    builder = TrackBuilder()
    pts: list[int] = []
    pending: list[np.ndarray | None] = []  # frames in order; None where the stride skips detection
    queued = 0

    def flush() -> None:
        results = iter(detector.detect([f for f in pending if f is not None]))
        for frame in pending:
            builder.add(next(results) if frame is not None else None)
        pending.clear()

    for timestamp, frame in iter_sampled_frames(local, info, max(1, cfg.stride), display_uri=uri):
        pts.append(timestamp)
        pending.append(frame)
        queued += frame is not None
        if queued >= detector.batch_size:
            flush()
            queued = 0
    flush()
    if not pts:
        raise InputError("avatar", uri, "has no decodable video frames")
    try:
        boxes = builder.finish(info.width, info.height, cfg.pads, cfg.smooth)
    except ValueError as exc:
        raise InputError("avatar", uri, str(exc)) from None
    return np.sort(np.asarray(pts, np.int64)), boxes


#: frames decoded to check that an avatar's timestamps follow display order when its track needs
#: no decoding otherwise (a fixed box): B-frames show any disorder within the first few
ORDER_CHECK_FRAMES = 32


def _frame_timestamps(local: str, info: VideoInfo, uri: str) -> np.ndarray:
    """Every frame's pts from a demux pass (no decoding), for avatars that need no detection."""
    if info.still:
        return np.zeros(1, np.int64)
    try:
        with av.open(local) as container:
            stream = container.streams.video[0]
            # packets an edit list cuts (a trimmed clip) are demuxed but never shown: flagged discard
            pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0 and not p.is_discard]
    except av.error.FFmpegError as exc:
        raise InputError("avatar", uri, f"demuxing failed ({exc.strerror or exc})") from None
    if not pts:
        raise InputError("avatar", uri, "has no video frames")
    # raises if they are out of order; decoded, but only the first converted
    for _ in iter_sampled_frames(local, info, ORDER_CHECK_FRAMES, uri, limit=ORDER_CHECK_FRAMES):
        pass
    return np.sort(np.asarray(pts, np.int64))


def _dump_track(track: AvatarTrack) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, pts=track.pts, boxes=track.boxes, info=np.array(json.dumps(asdict(track.info))))
    return buf.getvalue()


def _load_track(uri: str, fp: str, data: bytes) -> AvatarTrack:
    with np.load(io.BytesIO(data)) as npz:
        info = VideoInfo(**json.loads(str(npz["info"])))
        return AvatarTrack(uri, fp, info, npz["pts"].astype(np.int64), npz["boxes"].astype(np.int32))


#: bump when a code change alters rendered output, so reruns re-render instead of skipping
#: (2: the narration no longer starts 1024 AAC priming samples late)
RENDER_VERSION = "2"


def row_fingerprint(audio_fp: str, avatar_fp: str, row_box: object, output: str, cfg: Config) -> str:
    """Everything that decides a row's output bytes: input contents and output-affecting config
    (not scheduling knobs such as segment length, batch sizes or devices)."""

    def relevant(section: Any) -> dict:
        return {k: v for k, v in asdict(section).items() if k not in NOT_OUTPUT_AFFECTING}

    return stable_hash(
        RENDER_VERSION,
        audio_fp,
        avatar_fp,
        row_box,
        storage.normalize(output),
        relevant(cfg.renderer),
        checkpoint_version(getattr(cfg.renderer, "checkpoint", None)),
        detector_key(cfg.detector, None, cfg.render.still_fps),
        asdict(cfg.encoder),
        cfg.render.still_fps,
        length=32,
    )


@dataclass(frozen=True)
class RowPrep:
    fingerprint: str
    skipped: bool
    audio: AudioInfo | None
    marker: Marker | None
    thumbnail: bytes | None = None  # of the finished video, when skipped


def prepare_row(row: Row, cfg: Config) -> RowPrep:
    """Fingerprint the row; report it skipped when its marker matches, else decode its audio."""
    storage.configure(cfg.storage.options)
    cache = cfg.cache_uri
    fingerprints = {}
    for what, uri in (("audio", row.audio), ("avatar", row.avatar)):
        with reading(what, uri):
            fingerprints[what] = content_fingerprint(uri, cache, what)
    fp = row_fingerprint(fingerprints["audio"], fingerprints["avatar"], row.box, row.output, cfg)
    marker = read_marker(cfg.layout.marker(row.id))
    if not cfg.force and marker and marker.fingerprint == fp and storage.exists(row.output):
        try:
            thumbnail = storage.read_bytes(cfg.layout.thumbnail(row.id))
        except FileNotFoundError:
            thumbnail = None
        return RowPrep(fp, True, None, marker, thumbnail)
    check_writable(row.output)
    return RowPrep(fp, False, prepare_audio(row.audio, cache, cfg.limits.max_audio_seconds), None)
