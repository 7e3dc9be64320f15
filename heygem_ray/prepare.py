"""Preparation stages, run as Ray tasks before rendering.

* Content fingerprints of inputs, memoised in the cache by (URI, size, version) so a rerun does not
  re-read every file.
* Audio: decoded once per distinct content to 16 kHz mono float32 PCM in the cache (renderers read
  only the window a segment needs), with the row's speech level; and encoded once per distinct
  content and audio settings to the output's codec (an audio-only mp4 the stitch copies packets
  from), while the row renders, so neither a row's last step nor the next row with the same
  narration encodes it again.
* Avatar: probed once per distinct content (and frame rate of stills), and face-tracked in chunks,
  each detected once per distinct content and detector config, as far as the narrations need: a
  narration shorter than its avatar waits only for the frames it shows. Every piece is cached and
  reused by every row and every rerun.

Cache layout under `cache`:  fingerprints/<key>.txt, audio/<fp>.f32 + .json,
audio/<fp>.<codec>-<bitrate>-<rate>.m4a + .json, avatars/<fp>/frames-<key>.npz,
avatars/<fp>/candidates-<key>/chunk-<i>.npz, avatars/<fp>/<key>/track-<frames>.npz
"""

from __future__ import annotations

import array
import contextlib
import functools
import io
import json
import logging
import os
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any, TypeVar

import av
import numpy as np

from heygem_ray import metrics, scratch, storage
from heygem_ray.config import Config, DetectorConfig, EncoderConfig
from heygem_ray.detect import build_detector
from heygem_ray.detect.base import FaceDetector
from heygem_ray.detect.track import (
    CHUNK_FRAMES,
    TrackBuilder,
    fixed_track,
    frames_to_track,
    settled_frames,
    shown_short_of,
)
from heygem_ray.errors import CheckpointError, InputError, caching, check_writable, reading
from heygem_ray.manifest import Row
from heygem_ray.markers import Marker, read_marker
from heygem_ray.media.audio import SAMPLE_RATE, LevelMeter, iter_pcm16k
from heygem_ray.media.mux import encode_audio
from heygem_ray.media.thumbnail import THUMBNAIL_QUALITY, THUMBNAIL_WIDTH, thumbnail_jpeg
from heygem_ray.media.video import (
    OUT_OF_ORDER,
    AvatarDecodeError,
    FrameReader,
    VideoInfo,
    fitted,
    is_image_data,
    iter_sampled_frames,
    probe,
)
from heygem_ray.plan import STANDARD_RATE_SLACK, frame_step, output_frame_count, stable_hash, standard_rate
from heygem_ray.storage import StorageOptions

log = logging.getLogger("heygem_ray")
_T = TypeVar("_T")


def content_fingerprint(uri: str, cache: str, what: str = "input", info: Mapping[str, Any] | None = None) -> str:
    """BLAKE2b of the file's bytes, memoised by URI, size and version (mtime/ETag; a local file's
    inode and change time too: `storage.change_key`) in this process and under the cache; hashed
    anew at every call where the store names no version. `info`: the
    store's, where the caller has just asked for it."""
    info = storage.info(uri) if info is None else info
    if info.get("type") == "directory":
        raise IsADirectoryError(uri)
    if info.get("size") == 0:  # None: unknown (an HTTP server that sends no length), not empty
        raise InputError(what, uri, "is empty (0 bytes)")
    version = storage.change_key(uri, info)
    if version is None:  # bytes that may change under the same URI and size: hashed anew
        return _unversioned_fingerprint(uri)
    # one narration over 100,000 presenters: the memo's GET once per process, not once per row
    # (by cache too: a process that has another cache must find, or make, the memo in this one)
    fp = _fingerprints_seen.get((cache, version))
    if fp is None:
        fp = _memoised_fingerprint(uri, info, cache, version)
        _fingerprints_seen[(cache, version)] = fp
        while len(_fingerprints_seen) > FINGERPRINTS_KEPT:
            _fingerprints_seen.popitem(last=False)
    return fp


def _memoised_fingerprint(uri: str, info: Mapping[str, Any], cache: str, version: str) -> str:
    memo = storage.join(cache, "fingerprints", f"{version[:32]}.txt")
    with caching(memo), contextlib.suppress(FileNotFoundError):
        return storage.read_bytes(memo).decode().strip()
    # hashed from the node's copy, which the row's next steps here then use: streamed, a new
    # input was downloaded twice (to hash it, then to decode it)
    fp = storage.fingerprint(storage.local_copy(uri, info=info))
    if storage.change_key(uri, storage.fresh_info(uri)) != version:  # replaced while it was hashed
        raise storage.ContentChanged(uri, storage.CHANGED_WHILE_READ)
    with caching(memo):
        storage.write_bytes(memo, fp.encode())
    return fp


def input_copy(uri: str, cache: str, fp: str, what: str) -> str:
    """A local copy of a row's input, checked to hold the bytes the campaign fingerprinted as `fp`
    (and tracked, and decoded) when it prepared the row: an input replaced in the store meanwhile
    (a shared presenter or narration another pipeline rewrites) would be rendered with the face
    track, or muxed under the lips, of the bytes it replaced, and reported ok. Raises
    ContentChanged (an InputError inside `reading`). The check is a version lookup (the store's
    info, then the fingerprint memo, kept by this process) unless the bytes did change; an empty
    `fp` (not known) is not checked."""
    if not fp:
        return storage.local_copy(uri)
    info = storage.info(uri)  # asked once, for the check and the copy (a request to an object store)
    if storage.version_key(uri, info) is not None and content_fingerprint(uri, cache, what, info) != fp:
        raise storage.ContentChanged(uri, storage.REPLACED)
    # without a version, the copy is kept by content and what is fetched checked against `fp`
    return storage.local_copy(uri, content=fp, info=info)


#: fingerprints this process found, by cache and version key (the same input's every row and
#: segment asks)
_fingerprints_seen: OrderedDict[tuple[str, str], str] = OrderedDict()
FINGERPRINTS_KEPT = 1024


#: seconds a process trusts its fingerprint of an input whose store names no version (a row's
#: preparation asks for it three times); bytes read later are checked against it (`local_copy`)
UNVERSIONED_SECONDS = 60.0
_unversioned: dict[str, tuple[float, str]] = {}


def _unversioned_fingerprint(uri: str) -> str:
    kept = _unversioned.get(uri)
    if kept is not None and time.monotonic() - kept[0] < UNVERSIONED_SECONDS:
        return kept[1]
    fp = storage.fingerprint(uri)
    _unversioned.pop(uri, None)
    _unversioned[uri] = (time.monotonic(), fp)  # newest last: the oldest go past 1024
    while len(_unversioned) > 1024:
        del _unversioned[next(iter(_unversioned))]
    return fp


@dataclass(frozen=True)
class AudioInfo:
    uri: str
    fingerprint: str
    samples: int
    level: float
    pcm_uri: str
    #: decoded now (not found in the cache): its samples were added to the cache
    decoded: bool = False

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


#: how a narration is decoded into the PCM cache, in its name: "-mean" since channels are averaged
#: (a cached decode of FFmpeg's 3 dB louder downmix is not used); "-mean2" since channels that
#: cancel in the mean are heard one alone (`media.audio._Downmix`)
PCM_VERSION = "-mean2"


def prepare_audio(uri: str, cache: str, max_seconds: float = float("inf"), fingerprint: str = "") -> AudioInfo:
    """Decode a row's audio into the PCM cache (once per distinct content); stop as soon as it
    runs past `max_seconds` rather than decode hours of an unwanted file. `fingerprint`: the
    content's, where the caller has just taken it."""
    with reading("audio", uri):
        fp = fingerprint or content_fingerprint(uri, cache, "audio")
        base = storage.join(cache, "audio", f"{fp}{PCM_VERSION}")
        with caching(base + ".json"), contextlib.suppress(FileNotFoundError):
            meta = json.loads(storage.read_bytes(base + ".json"))
            if _whole(base + ".f32", meta["samples"] * 4):
                return _within_limits(AudioInfo(uri, fp, meta["samples"], meta["level"], base + ".f32"), max_seconds)
        # the bytes of that fingerprint, or ContentChanged: a narration replaced since the row took
        # its fingerprint would be decoded into the cache under the old bytes' name
        local = input_copy(uri, cache, fp, "audio")
        meter = LevelMeter()
        samples = 0
        pcm = scratch.file("pcm", ".f32")
        try:
            with open(pcm, "wb") as tmp:
                for chunk in iter_pcm16k(local, display_uri=uri):
                    tmp.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
                    meter.feed(chunk)
                    samples += len(chunk)
                    if samples > max_seconds * SAMPLE_RATE:
                        raise InputError("audio", uri, f"is longer than limits.max_audio_seconds={max_seconds:g} s")
            if samples == 0:
                raise InputError("audio", uri, "has no audio samples")
            with caching(base + ".f32"):
                storage.publish_file(pcm, base + ".f32")
        finally:
            os.unlink(pcm)
        level = meter.level()
        with caching(base + ".json"):
            storage.write_bytes(base + ".json", json.dumps({"samples": samples, "level": level}).encode())
        return _within_limits(AudioInfo(uri, fp, samples, level, base + ".f32", decoded=True), max_seconds)


def _whole(uri: str, size: int | None = None) -> bool:
    """Whether a cache entry's data file is there (at `size` bytes, where given). Its `.json`, written
    last, says it was whole; a clean-up of the cache (an `rm -r` that listed before the `.json` came,
    a bucket's lifecycle rule) can still take the one and leave the other, and every later row with
    that narration would fail on it: such an entry is made again."""
    try:
        stored = storage.size(uri)
    except FileNotFoundError:
        return False
    return stored > 0 if size is None else stored == size


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
        if _whole(base + ".m4a"):
            return AudioTrack(base + ".m4a", meta["samples"], encoder.audio_sample_rate)
    with reading("audio", audio.uri), scratch.folder("track") as tmp:
        local = os.path.join(tmp, "track.m4a")
        samples = encode_audio(
            input_copy(audio.uri, cache, audio.fingerprint, "audio"),
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


def read_pcm(pcm_uri: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of cached PCM (a ranged read: segments never load the whole row)."""
    return np.frombuffer(storage.read_range(pcm_uri, start * 4, stop * 4), dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class AvatarTrack:
    """Everything the renderer needs to know about an avatar: its facts, the timestamp of every frame
    (for exact seeking, VFR included) and the face box of its first frames: every frame's, or as
    many as a narration shorter than the avatar shows (`prepare_avatar`'s `seconds`)."""

    uri: str
    fingerprint: str
    info: VideoInfo
    pts: np.ndarray  # int64 (n,), presentation order; [0] for a still image
    boxes: np.ndarray  # int32 (m, 4) x1, y1, x2, y2 of frames 0 .. m - 1, m <= n; (0, 0, 0, 0): no face
    #: the first frames whose boxes are final (the whole clip's track gives the same): None, all n
    settled: int | None = None

    @property
    def frames(self) -> int:
        return len(self.pts)

    def shown(self, seconds: float) -> int:
        """How many of the avatar's first frames a narration of `seconds` shows (a shorter clip is
        played forward and back: all of it)."""
        return min(self.frames, output_frame_count(seconds, self.info.fps))

    def serves(self, seconds: float) -> bool:
        """Whether the frames a narration of `seconds` shows have their final boxes here."""
        return self.shown(seconds) <= (self.frames if self.settled is None else self.settled)

    def shows_a_face(self, seconds: float) -> bool:
        """Whether any frame a narration of `seconds` shows has a face box."""
        return bool(self.boxes[: self.shown(seconds)].any())


#: config keys that change how fast a stage runs, never the bytes it makes (kept out of cache keys
#: and row fingerprints, so changing them re-renders nothing)
NOT_OUTPUT_AFFECTING = ("batch_size", "device", "num_gpus", "face_cache_mb")


#: bump when a code change alters face tracks, so cached tracks are made again (2: the tracker
#: keeps to its presenter while another face is found; 3: the Haar detector follows its face; 4:
#: its face-less back-off, and a detector stride counted in the tracker's hand-off; 5: tracked in
#: chunks, as far as a narration shows; 6: HDR frames made SDR, HEIF photos read whole; 7: a face
#: found through a turned view boxed at its own size; 8: a presenter back after an absence
#: taken at once, wherever they are; 9: a cut to another shot neither smoothed nor bridged across,
#: the face after it taken from its first frame; 10: a face beside the presenter never taken for
#: them while they are missed)
TRACK_VERSION = "10"

#: bump when a code change alters the detector's candidates (the cached chunks of detections);
#: the tracker's changes (TRACK_VERSION) remake tracks from them without detecting again
CANDIDATES_VERSION = "7"

#: the track version finished rows' fingerprints hold: set to TRACK_VERSION only for a change that
#: alters every avatar's track, so finished rows render again; one that alters some avatars' tracks
#: (7-10) makes new tracks for new rows and leaves finished rows alone (docs/ops.md, "Upgrading")
ROWS_TRACK_VERSION = "6"


def detector_key(
    cfg: DetectorConfig,
    box: tuple[int, int, int, int] | None,
    still_fps: float,
    frames: tuple[Any, ...] = (),
    version: str | None = None,
    written: Mapping[str, str] | None = None,
) -> str:
    """What decides an avatar's face track: the detector's settings, its weights' version (a file
    replaced at the same URI makes new tracks), the row's box, the frame rate of stills, and the
    frames the detector sees (`shown_frames`); `version`: the tracker's (None: TRACK_VERSION);
    `written`: `Config.written_paths`, the weights' URI as written."""
    relevant = _settings(cfg, written or {})
    return stable_hash(
        version or TRACK_VERSION, CHUNK_FRAMES, relevant, checkpoint_version(cfg.checkpoint), box, still_fps, *frames
    )


#: detector settings that shape the track from the candidates, not the candidates themselves
TRACK_ONLY = ("pads", "smooth", "box")


def _settings(section: Any, written: Mapping[str, str]) -> dict[str, Any]:
    """A config section's output-affecting settings, a model file's URI as it was written."""
    out = {k: v for k, v in asdict(section).items() if k not in NOT_OUTPUT_AFFECTING}
    if out.get("checkpoint"):
        out["checkpoint"] = written.get(out["checkpoint"], out["checkpoint"])
    return out


def candidates_key(cfg: DetectorConfig, still_fps: float, frames: tuple[Any, ...] = ()) -> str:
    """What decides the detector's candidates on an avatar's frames: `detector_key` less the
    settings of the track alone (other pads or no smoothing reuse the detected chunks)."""
    relevant = {k: v for k, v in asdict(cfg).items() if k not in NOT_OUTPUT_AFFECTING + TRACK_ONLY}
    return stable_hash(
        CANDIDATES_VERSION, CHUNK_FRAMES, relevant, checkpoint_version(cfg.checkpoint), still_fps, *frames
    )


def shown_frames(step: int, info: VideoInfo) -> tuple[Any, ...]:
    """The parts of the track keys that say which frames the detector sees: every `step`-th of a
    clip over `render.max_fps`, an avatar at the size it was shrunk to (another pixel limit or
    `render.max_side`, another size), ticks of held frames (`_held`). Empty for every frame at its
    own size, so those keys are as they were before any of these."""
    return (
        (() if step == 1 else (step,))
        + (() if info.scale == 1 else (info.width, info.height))
        + (("held", "each picture detected once") if info.held else ())
    )


#: seconds a checkpoint's version is trusted before the store is asked again (once per row otherwise)
CHECKPOINT_VERSION_SECONDS = 60.0
_checkpoint_versions: dict[str, tuple[float, str]] = {}


def checkpoint_version(uri: str | None) -> str | None:
    """A key that changes when the model file at `uri` is replaced (`storage.current_version`):
    the version the running campaign pinned as it started (`model_versions`), else asked of the
    store (trusted for CHECKPOINT_VERSION_SECONDS)."""
    if not uri:
        return None
    pinned = storage.pinned_version(uri)
    if pinned is not None:
        return pinned
    kept = _checkpoint_versions.get(uri)
    if kept is not None and time.monotonic() - kept[0] < CHECKPOINT_VERSION_SECONDS:
        return kept[1]
    version = storage.current_version(uri)  # None: a missing file fails where it is loaded, saying so
    if version is not None:
        _checkpoint_versions[uri] = (time.monotonic(), version)
    return version


def model_versions(cfg: Config) -> dict[str, str]:
    """The version of each model file the campaign reads (the renderer's, the detector's and the
    lip-sync expert's weights), taken as it starts: its rows' fingerprints and face tracks name these versions, and
    its actors and detectors load these and no other (`models.checkpoints`), so a file replaced
    during a run mixes no weights into it and mislabels no row. Missing files are left out: their
    loads fail saying so."""
    uris = (getattr(cfg.renderer, "checkpoint", None), cfg.detector.checkpoint, cfg.qa.syncnet)
    try:
        return {uri: version for uri in dict.fromkeys(uris) if uri and (version := storage.current_version(uri))}
    except storage.ContentChanged as exc:  # a download still writing it in place, at a pod's start
        raise CheckpointError(f"{exc} (is it still being written? run the campaign once it is whole)") from None


def prepare_avatar(
    uri: str,
    box: tuple[int, int, int, int] | None,
    cfg: DetectorConfig,
    cache: str,
    still_fps: float,
    max_fps: float = 0.0,
    max_side: int = 0,
    max_pixels: int | None = None,
    storage_options: StorageOptions | None = None,
    seconds: float | None = None,
    model_versions: dict[str, str] | None = None,
) -> AvatarTrack:
    """Probe and face-track an avatar, or load the cached track: of every frame, or (`seconds`) of
    the first frames a narration that long shows, with a margin after them, in whole chunks
    (`detect.track.frames_to_track`). `storage_options` (the campaign's `storage.options`) are set
    for this process first, with the campaign's pinned `model_versions`: a Ray task may run in a
    worker that has never seen them (another node, a fresh process); None leaves the process's as
    they are. A clip over `max_fps` (0: no cap)
    shows every `frame_step`-th frame: the track, its timestamps and its rate are of those alone.

    Cache, under avatars/<avatar fingerprint>/: frames-<key>.npz (facts and timestamps, per frame
    rate of stills), candidates-<candidates_key>/chunk-<i>.npz (the detector's candidates on chunk
    i's frames) and <detector_key>/track-<m>.npz (the boxes of the first m frames): a longer
    narration later detects only the chunks still missing, other pads none. A damaged entry is
    made again."""
    if storage_options is not None:
        storage.configure(storage_options, model_versions)
    fixed = box or (list(cfg.box) if cfg.name == "box" and cfg.box else None)
    if cfg.name == "box" and fixed is None:
        raise InputError("avatar", uri, "detector=box needs detector.box=[x1,y1,x2,y2] or a `box` manifest column")
    with reading("avatar", uri):
        fp = content_fingerprint(uri, cache, "avatar")
        avatar = storage.join(cache, "avatars", fp)
        info, pts = _avatar_frames(uri, fp, cache, still_fps, max_pixels, max_side)
        info = _at_standard_rate(info)
        step = 1 if info.still else frame_step(info.fps, max_fps)
        info, pts = _every(info, pts, step)
        info = fitted(info, uri, max_side)  # a clip's probe is of its own size (a still's is fitted)
        frames = shown_frames(step, info)
        folder = storage.join(avatar, detector_key(cfg, box, still_fps, frames))
        total, stride = len(pts), max(1, cfg.stride)
        tracked = total
        if fixed is None and seconds is not None:
            tracked = frames_to_track(total, min(total, output_frame_count(seconds, info.fps)), stride)
        track_uri = storage.join(folder, f"track-{tracked}.npz")
        settled = settled_frames(tracked, total, stride) if tracked < total else None
        boxes = _cached(track_uri, _load_boxes)
        if boxes is not None and len(boxes) == tracked:
            return AvatarTrack(uri, fp, info, pts, boxes, settled)
        if fixed is not None:
            try:
                boxes = fixed_track(_scaled_box(fixed, info.scale), total, info.width, info.height)
            except ValueError as exc:
                raise InputError("avatar", uri, str(exc)) from None
        else:
            clock = metrics.StageClock()
            with clock("detect"):
                chunks = storage.join(avatar, "candidates-" + candidates_key(cfg, still_fps, frames))
                boxes = _track(_candidates(uri, fp, cache, info, pts, cfg, chunks, tracked), info, cfg, uri, total)
            metrics.stage_seconds(clock.seconds)
        with caching(track_uri):
            storage.write_bytes(track_uri, _dump_array(boxes))
        return AvatarTrack(uri, fp, info, pts, boxes, settled)


def _check_pixels(uri: str, info: VideoInfo, max_pixels: int | None) -> None:
    pixels = info.width * info.height
    if max_pixels and pixels > max_pixels:
        raise InputError(
            "avatar",
            uri,
            f"frames are {info.width}x{info.height} = {pixels} pixels, over limits.max_avatar_pixels={max_pixels}",
        )


def _cached(uri: str, load: Callable[[bytes], _T]) -> _T | None:
    """A cache entry, or None when there is none or it cannot be read (damaged: made again). A
    cache that refuses access raises CacheError (`caching`)."""
    with caching(uri):
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            return None
    try:
        return load(data)
    except (ValueError, KeyError, TypeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        log.warning("cache entry %s cannot be read (%s: %s): made again", storage.display(uri), type(exc).__name__, exc)
        return None


def _avatar_frames(
    uri: str, fp: str, cache: str, still_fps: float, max_pixels: int | None, max_side: int = 0
) -> tuple[VideoInfo, np.ndarray]:
    """The avatar's facts and every frame's timestamp, from the cache or a probe and a demux pass
    (checked against `max_pixels` before anything is decoded)."""
    key = stable_hash(TRACK_VERSION, still_fps, FRAMES_VERSION)
    frames_uri = storage.join(cache, "avatars", fp, f"frames-{key}.npz")
    cached = _cached(frames_uri, _load_frames)
    if cached is not None and not cached[0].still:
        _check_pixels(uri, cached[0], max_pixels)
        return cached
    local = input_copy(uri, cache, fp, "avatar")  # the bytes fingerprinted, or ContentChanged
    info = probe(local, still_fps, display_uri=uri, max_pixels=max_pixels, max_side=max_side)
    _check_pixels(uri, info, max_pixels)
    if info.still:  # one image read, and its size follows the pixel limit: not cached
        return info, np.zeros(1, np.int64)
    stamps = _frame_timestamps(local, info, uri)
    info = _at_timed_rate(info, stamps.pts, stamps.time_base)
    info, pts = _held(info, stamps, still_fps)
    buf = io.BytesIO()
    np.savez(buf, pts=pts, info=np.array(json.dumps(asdict(info))))
    with caching(frames_uri):
        storage.write_bytes(frames_uri, buf.getvalue())
    return info, pts


#: the version of the facts and timestamps cached per avatar (frames-<key>.npz), with TRACK_VERSION:
#: 2, a clip's rate from its timestamps where the container's was belied by them; 3, slow clips and
#: animated images on a steady timeline (`_held`)
FRAMES_VERSION = 3


#: a gap between two frames over this many times the median one is a pause (a recording's tab in
#: the background), left out of a clip's timed rate: its frames came at their usual pace around it
PAUSE_INTERVALS = 4
#: the rates a clip's timestamps may give it; beyond, the container's is kept
TIMED_RATES = (1.0, 250.0)


def _at_timed_rate(info: VideoInfo, pts: np.ndarray, time_base: Fraction) -> VideoInfo:
    """A clip whose container states a rate its timestamps belie, at the average rate they keep
    (pauses left out, `PAUSE_INTERVALS`): a WebM without a frame duration (a browser's recording,
    Chrome's MediaRecorder) stated its timestamps' 1/1000 s tick, 1000 fps, and its presenter moved
    38 times too fast; a variable-rate one states its nominal rate. A rate within
    STANDARD_RATE_SLACK of the stated one, or outside TIMED_RATES, leaves the stated one."""
    steps = np.diff(pts)
    steps = steps[steps > 0]
    if not len(steps):
        return info
    steps = steps[steps <= PAUSE_INTERVALS * np.median(steps)]
    timed = Fraction(len(steps)) / (int(steps.sum()) * time_base)
    if abs(Fraction(info.fps_fraction) / timed - 1) <= STANDARD_RATE_SLACK or not (
        TIMED_RATES[0] <= timed <= TIMED_RATES[1]
    ):
        return info
    timed = timed.limit_denominator(1001)
    return replace(info, fps=float(timed), fps_fraction=f"{timed.numerator}/{timed.denominator}")


#: clips slower than this (frames a second), and animated images, play at `render.still_fps` with
#: each frame held as long as it is timed (`_held`): the mouth is drawn anew on every output frame, and a
#: GIF of two poses at about one frame a second moved its lips once a second (its 0.15 s blink
#: held a whole second), a GIF's 2 s pose played in a tenth of one
STEADY_RATE = 10.0
#: FFmpeg's demuxers of animated images
ANIMATED_IMAGES = frozenset({"gif", "apng", "webp", "webp_pipe"})


def _held(info: VideoInfo, stamps: _Timestamps, rate: float) -> tuple[VideoInfo, np.ndarray]:
    """A slow clip or an animated image on a steady timeline at `rate`: the timestamp of the frame
    on screen at each of its ticks (a frame repeats while it is held, an animated image's for its
    delay, a clip's for at most PAUSE_INTERVALS of its usual step; one too brief for any tick is
    left out). Other clips as they are."""
    pts = stamps.pts
    if info.still or not len(pts) or not (stamps.animated_image or info.fps < STEADY_RATE):
        return info, pts
    steps = np.diff(pts).astype(np.float64) * float(stamps.time_base)
    usual = float(np.median(steps)) if len(steps) else 1.0 / info.fps
    if not stamps.animated_image:
        # a recording's pause (its tab in the background) is no pose held: its frames came at their
        # usual pace around it, as `_at_timed_rate` takes them (and one timestamp far ahead is no hour)
        steps = np.minimum(steps, PAUSE_INTERVALS * usual)
    seconds = np.concatenate([[0.0], np.cumsum(steps)])
    last = usual
    if stamps.animated_image and stamps.end is not None and stamps.end > pts[-1]:
        last = float((stamps.end - pts[-1]) * stamps.time_base)
    ticks = max(1, round((seconds[-1] + last) * rate))
    on_screen = np.searchsorted(seconds, np.arange(ticks) / rate, side="right") - 1
    steady = Fraction(rate).limit_denominator(1001)
    held = replace(_at_rate(info, steady), frame_count=ticks, held=True)
    return held, pts[on_screen]


def _scaled_box(box: Any, scale: float) -> Any:
    """A face box given in an avatar's own pixels, on the avatar shrunk by `scale` (`VideoInfo.scale`)."""
    return box if scale == 1 else [int(round(v * scale)) for v in box]


def _at_standard_rate(info: VideoInfo) -> VideoInfo:
    """A clip whose average rate is near a standard one at that rate (`plan.standard_rate`)."""
    rate = Fraction(info.fps_fraction)
    standard = rate if info.still else standard_rate(rate)
    return info if standard == rate else _at_rate(info, standard)


def _every(info: VideoInfo, pts: np.ndarray, step: int) -> tuple[VideoInfo, np.ndarray]:
    """A clip as every `step`-th of its frames show it: their timestamps, the rate divided."""
    if step == 1:
        return info, pts
    fewer = _at_rate(info, Fraction(info.fps_fraction) / step)
    return replace(fewer, frame_count=-(-info.frame_count // step)), pts[::step]


def _at_rate(info: VideoInfo, rate: Fraction) -> VideoInfo:
    return replace(info, fps=float(rate), fps_fraction=f"{rate.numerator}/{rate.denominator}")


def _load_frames(data: bytes) -> tuple[VideoInfo, np.ndarray]:
    with np.load(io.BytesIO(data)) as npz:
        return VideoInfo(**json.loads(str(npz["info"]))), npz["pts"].astype(np.int64)


def _candidates(
    uri: str, fp: str, cache: str, info: VideoInfo, pts: np.ndarray, cfg: DetectorConfig, folder: str, frames: int
) -> Iterator[np.ndarray | None]:
    """The detector's candidates on each of the first `frames` frames in order (None: a frame the
    stride skips, or one the stream lacks), chunk by chunk: each loaded from the cache, or detected
    (a run of missing chunks in one decoding pass) and cached. One chunk is held at a time (and the
    one after a run of missing ones, loaded to find the run's end): per-frame objects for a whole
    long clip came to hundreds of MB."""
    count = -(-frames // CHUNK_FRAMES)

    def cached(i: int) -> list[np.ndarray | None] | None:
        chunk = _cached(storage.join(folder, f"chunk-{i}.npz"), _load_candidates)
        # the frames a chunk holds, as the clip's timestamps count them now (a rebuilt frame list
        # that counts otherwise would shift or shorten every box after it): else detected again
        if chunk is not None and len(chunk) != min(CHUNK_FRAMES, len(pts) - i * CHUNK_FRAMES):
            log.warning("cached face candidates of chunk %d of %s do not fit its frames: detected again", i, uri)
            return None
        return chunk

    left = frames
    with contextlib.ExitStack() as stack:
        reader: FrameReader | None = None
        detector: FaceDetector | None = None
        i, ahead = 0, None
        while i < count and left > 0:
            chunk, ahead = (ahead if ahead is not None else cached(i)), None
            if chunk is not None:
                yield from chunk[:left]
                left -= min(left, len(chunk))
                i += 1
                continue
            last = i
            while last + 1 < count and (ahead := cached(last + 1)) is None:
                last += 1
            if reader is None or detector is None:
                detector = build_detector(cfg)
                reader = stack.enter_context(FrameReader(input_copy(uri, cache, fp, "avatar"), info, pts))
            for j, found in _detect_chunks(reader, detector, i, last, len(pts), max(1, cfg.stride), uri):
                with caching(storage.join(folder, f"chunk-{j}.npz")):
                    storage.write_bytes(storage.join(folder, f"chunk-{j}.npz"), _dump_candidates(found))
                yield from found[:left]
                left -= min(left, len(found))
            i = last + 1


def _detect_chunks(
    reader: FrameReader, detector: FaceDetector, first: int, last: int, total: int, stride: int, uri: str
) -> Iterator[tuple[int, list[np.ndarray | None]]]:
    """Candidates on chunks `first` .. `last` (decoded in one pass), each detected from a reset
    detector, every `stride`-th frame examined (a divisor of CHUNK_FRAMES: the same frames as
    over the whole clip), as (chunk, candidates) when each is done. A frame held for several ticks
    (`VideoInfo.held`) is detected once, its candidates given to each tick in its chunk: a 5 fps
    clip on a 25 fps timeline was detected five times over."""
    start, stop = first * CHUNK_FRAMES, min((last + 1) * CHUNK_FRAMES, total)
    chunk = first
    found: list[np.ndarray | None] = [None] * (min(stop, (chunk + 1) * CHUNK_FRAMES) - chunk * CHUNK_FRAMES)
    batch: list[tuple[list[int], np.ndarray]] = []  # the ticks each picture shows on, and it
    detected: tuple[np.ndarray | None, np.ndarray] = (None, np.empty((0, 5), np.float32))  # the last picture
    detector.reset()

    def flush() -> None:
        nonlocal detected
        for (indices, frame), faces in zip(batch, detector.detect([frame for _, frame in batch]), strict=True):
            detected = (frame, np.asarray(faces, np.float32).reshape(-1, 5))
            for index in indices:
                found[index - chunk * CHUNK_FRAMES] = detected[1]
        batch.clear()

    previous = start - 1
    try:
        for index, frame in reader.frames_between(start, stop, stride):
            if index <= previous:  # timestamps that go back mid-stream (concatenated transport streams)
                raise InputError("avatar", uri, OUT_OF_ORDER)
            previous = index
            while index >= (chunk + 1) * CHUNK_FRAMES:  # the next chunk begins: this one is done
                flush()
                yield chunk, found
                chunk += 1
                found = [None] * (min(stop, (chunk + 1) * CHUNK_FRAMES) - chunk * CHUNK_FRAMES)
                detector.reset()
                detected = (None, detected[1])  # a chunk's candidates are its own, whatever came before it
            if frame is None:
                continue
            if batch and frame is batch[-1][1]:
                batch[-1][0].append(index)
            elif frame is detected[0]:
                found[index - chunk * CHUNK_FRAMES] = detected[1]
            else:
                batch.append(([index], frame))
                if len(batch) >= detector.batch_size:
                    flush()
        flush()
    except (av.error.FFmpegError, AvatarDecodeError) as exc:  # the reader's: FFmpeg's refusal, named
        # at the first frame not decoded: shorter narrations, whose tracks stop before it, render
        from_seconds = shown_short_of(previous + 1, stride) / reader.info.fps
        problem = f"decoding failed ({getattr(exc, 'strerror', None) or exc})"
        if from_seconds:
            problem += f" at {(previous + 1) / reader.info.fps:.1f} s: narrations of up to {from_seconds:.1f} s render"
        raise InputError("avatar", uri, problem, from_seconds=from_seconds) from None
    while chunk <= last:  # the last chunk, and any the stream ended before
        yield chunk, found
        chunk += 1
        found = [None] * (min(stop, (chunk + 1) * CHUNK_FRAMES) - chunk * CHUNK_FRAMES)


def _track(
    candidates: Iterable[np.ndarray | None], info: VideoInfo, cfg: DetectorConfig, uri: str, total: int
) -> np.ndarray:
    """One box per frame from the candidates. A track of fewer than all frames in which no face
    was found is all empty boxes: the rows showing only those frames fail for it
    (`AvatarTrack.shows_a_face`), while a longer narration's track may find the face later."""
    builder = TrackBuilder()
    for found in candidates:
        builder.add(found)
    try:
        return builder.finish(info.width, info.height, cfg.pads, cfg.smooth)
    except ValueError as exc:
        if builder.frames < total and builder.found == 0:
            return np.zeros((builder.frames, 4), np.int32)
        raise InputError("avatar", uri, str(exc)) from None


#: frames decoded to check that an avatar's timestamps follow display order: B-frames show any
#: disorder within the first few
ORDER_CHECK_FRAMES = 32
#: how many frames a packet's timestamp may fall behind the latest demuxed before it: B-frames'
#: reordering (H.264 and HEVC reorder 16 at most); further back, the timestamps start over
REORDER_FRAMES = 32


@dataclass(frozen=True)
class _Timestamps:
    pts: np.ndarray  # every frame's, in display order
    time_base: Fraction
    end: int | None  # where the last frame's time on screen ends (its packet's duration), if said
    animated_image: bool  # a GIF, an APNG or an animated WebP: its frames' delays are the artist's


def _frame_timestamps(local: str, info: VideoInfo, uri: str) -> _Timestamps:
    """Every frame's pts from a demux pass, less those before the first frame the decoder gives (a
    clip cut inside a group of pictures starts with packets that decode to nothing)."""
    try:
        with av.open(local) as container:
            stream = container.streams.video[0]
            time_base = stream.time_base or Fraction(1, 1000)
            animated_image = container.format.name in ANIMATED_IMAGES
            # packets an edit list cuts (a trimmed clip) are demuxed but never shown: flagged discard
            packets, pts = 0, array.array("q")  # 8 bytes a frame, not a Python int's 36
            end: int | None = None
            for packet in container.demux(stream):
                if packet.size > 0 and not packet.is_discard:
                    packets += 1
                    if packet.pts is not None:
                        pts.append(packet.pts)
                        if packet.duration:
                            end = max(end or 0, packet.pts + packet.duration)
    except av.error.FFmpegError as exc:
        raise InputError("avatar", uri, f"demuxing failed ({exc.strerror or exc})") from None
    if packets and not pts:
        raise InputError(
            "avatar",
            uri,
            "its frames carry no timestamps (a bare H.264/HEVC stream, not in a container): put it in "
            "an MP4 at its frame rate, e.g. `ffmpeg -r 25 -i in.h264 -c copy out.mp4`",
        )
    if len(pts) < packets:  # left out, the clip was taken for its timed frames alone (4 of 200)
        raise InputError(
            "avatar",
            uri,
            f"{packets - len(pts)} of its {packets} frames carry no timestamps (H.264 in an MPEG program "
            "stream?): re-encode it, e.g. `ffmpeg -i in.mpg -c:v libx264 -crf 18 out.mp4`",
        )
    if not pts:
        raise InputError("avatar", uri, "has no video frames")
    demuxed = np.frombuffer(pts, np.int64)
    order = np.argsort(demuxed, kind="stable")
    timestamps = demuxed[order]
    # how many packets one comes after those it is shown before (B-frames: a few; counted in
    # packets, not time: a clip that pauses for seconds after a B-frame is no restart)
    behind = int((np.arange(order.size) - np.argsort(order)).max())
    repeats = int((np.diff(timestamps) == 0).sum())
    if repeats and behind <= REORDER_FRAMES:
        # one recording whose recorder stamped frames of a burst alike (a browser's, after a
        # hiccup): which of them a player shows is its own choice, so none is ours to guess
        raise InputError(
            "avatar",
            uri,
            f"{repeats} of its frames carry the timestamp of another (a recorder's glitch): re-encode it at a "
            "steady rate, e.g. `ffmpeg -i in.webm -r 30 -c:v libx264 -crf 18 out.mp4`",
        )
    if behind > REORDER_FRAMES:
        # recordings joined end to end (`cat a.ts b.ts`): frames mapped to others' places, or cut
        # off unsaid, came out as "no face found" or "cannot be decoded this far"
        raise InputError(
            "avatar",
            uri,
            "its timestamps start over or repeat midway (recordings joined end to end?): join them with "
            "FFmpeg's concat demuxer, or re-encode it, e.g. `ffmpeg -i in.ts -c:v libx264 out.mp4`",
        )
    # raises if they are out of order; decoded, but only the first converted
    decoded = [t for t, _ in iter_sampled_frames(local, info, ORDER_CHECK_FRAMES, uri, limit=ORDER_CHECK_FRAMES)]
    if not decoded:
        raise InputError("avatar", uri, "has no decodable video frames")
    return _Timestamps(timestamps[timestamps >= decoded[0]], time_base, end, animated_image)


def _dump_array(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _load_boxes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data)).astype(np.int32)


def _dump_candidates(found: list[np.ndarray | None]) -> bytes:
    """A chunk's candidates: which frames were examined, how many faces each, and the faces."""
    examined = np.array([f is not None for f in found])
    counts = np.array([0 if f is None else len(f) for f in found], np.int32)
    faces = np.concatenate([f for f in found if f is not None] or [np.zeros((0, 5), np.float32)])
    buf = io.BytesIO()
    np.savez(buf, examined=examined, counts=counts, faces=faces.astype(np.float32).reshape(-1, 5))
    return buf.getvalue()


def _load_candidates(data: bytes) -> list[np.ndarray | None]:
    with np.load(io.BytesIO(data)) as npz:
        examined, counts, faces = npz["examined"], npz["counts"], npz["faces"]
    ends = np.cumsum(counts)
    return [faces[end - n : end] if seen else None for seen, n, end in zip(examined, counts, ends, strict=True)]


#: bump when a code change alters rendered output, so reruns re-render instead of skipping
#: (2: the narration no longer starts 1024 AAC priming samples late; 3: HDR avatars made SDR)
RENDER_VERSION = "3"


def row_fingerprint(
    audio_fp: str,
    avatar_fp: str,
    row_box: object,
    output: str,
    cfg: Config,
    pixel_cap: tuple[int, ...] = (),
    in_root: bool = True,
) -> str:
    """Everything that decides a row's output bytes: input contents and output-affecting config
    (not scheduling knobs such as segment length, batch sizes or devices); `pixel_cap`: the row's
    `photo_pixel_cap`. The output is named from the output root where it lies inside it (`in_root`
    False: by its whole URI, as fingerprints were made before; `prepare_row` takes both): an output
    root moved, or mounted at another path on another host, re-rendered every row."""

    return stable_hash(
        RENDER_VERSION,
        audio_fp,
        avatar_fp,
        row_box,
        output_named(output, cfg.output) if in_root else storage.normalize(output),
        _settings(cfg.renderer, cfg.written_paths),
        checkpoint_version(getattr(cfg.renderer, "checkpoint", None)),
        detector_key(cfg.detector, None, cfg.render.still_fps, version=ROWS_TRACK_VERSION, written=cfg.written_paths),
        asdict(cfg.encoder),
        cfg.render.still_fps,
        cfg.render.max_fps,
        cfg.render.max_side,
        *pixel_cap,
        length=32,
    )


def output_named(output: str, root: str) -> str:
    """A row's output as its fingerprint names it: from the output root, where it lies inside it."""
    output, inside = storage.normalize(output), storage.normalize(root).rstrip("/") + "/"
    return f"{{output}}/{output[len(inside) :]}" if output.startswith(inside) else output


def photo_pixel_cap(avatar: str, cfg: Config) -> tuple[int, ...]:
    """`(limits.max_avatar_pixels,)` where it shapes the row's output: its avatar is a photo (a clip
    over the cap is refused, not shrunk), and `render.max_side` does not bound a photo tighter (it
    is 0, or its square is larger: never with the defaults, where the avatar is not read here).
    Empty otherwise, so the fingerprints of rows rendered before the cap counted stay as they were."""
    cap, side = cfg.limits.max_avatar_pixels, cfg.render.max_side
    if side and cap >= side * side:
        return ()
    return (cap,) if is_image_data(storage.read_range(avatar, 0, 32)) else ()


@dataclass(frozen=True)
class RowPrep:
    fingerprint: str
    skipped: bool
    audio: AudioInfo | None
    marker: Marker | None
    thumbnail: bytes | None = None  # of the finished video, when skipped
    #: the avatar's content fingerprint as the row found it (a track of other bytes is not its own)
    avatar_fingerprint: str = ""


def _finished_thumbnail(row: Row, cfg: Config) -> bytes | None:
    """The report's picture of a finished row; one its stitch did not write (the run killed between
    the marker and it) made again from the video, a frame near its middle. A picture for the
    report: a finished row stays finished without it."""
    uri = cfg.layout.thumbnail(row.id)
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("row %s: thumbnail not read (%s: %s)", row.id, type(exc).__name__, exc)
        return None
    try:
        with storage.open_uri(row.output) as fh:
            thumbnail = thumbnail_jpeg(fh, width=THUMBNAIL_WIDTH, quality=THUMBNAIL_QUALITY)
        storage.write_bytes(uri, thumbnail)
    except Exception as exc:  # noqa: BLE001 - no picture: the row is still done
        log.warning("row %s: thumbnail not made again (%s: %s)", row.id, type(exc).__name__, exc)
        return None
    return thumbnail


def prepare_row(row: Row, cfg: Config, decode: bool = True) -> RowPrep:
    """Fingerprint the row; report it skipped when its marker matches, else decode its audio
    (`decode`: the run will render it; else it is reported not skipped, with no audio)."""
    storage.configure(cfg.storage.options, cfg.model_versions)
    cache = cfg.cache_uri
    fingerprints = {}
    for what, uri in (("audio", row.audio), ("avatar", row.avatar)):
        with reading(what, uri):
            fingerprints[what] = content_fingerprint(uri, cache, what)
    with reading("avatar", row.avatar):
        pixel_cap = photo_pixel_cap(row.avatar, cfg)
    made = functools.partial(row_fingerprint, fingerprints["audio"], fingerprints["avatar"], row.box, row.output, cfg)
    fp = made(pixel_cap)
    marker = read_marker(cfg.layout.marker(row.id))
    # with `force`, rows the forced rerun this run goes on with published are done
    redone = not cfg.force or (marker is not None and marker.run in cfg.forced_by)
    # a marker made before outputs were named from the output root holds the whole URI's
    if redone and marker and marker.fingerprint in (fp, made(pixel_cap, False)) and marker.still_published(row.output):
        return RowPrep(marker.fingerprint, True, None, marker, _finished_thumbnail(row, cfg))
    if not decode:
        return RowPrep(fp, False, None, None, avatar_fingerprint=fingerprints["avatar"])
    check_writable(row.output)
    audio = prepare_audio(row.audio, cache, cfg.limits.max_audio_seconds, fingerprints["audio"])
    return RowPrep(fp, False, audio, None, avatar_fingerprint=fingerprints["avatar"])
