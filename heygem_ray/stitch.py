"""The stitch stage: one task per row joins its segments and its encoded audio track (copying
packets: nothing is encoded here), publishes the mp4 atomically, then writes the done-marker,
then removes the row's segment files.

The order matters for resume: a marker exists only for a published output, and a rerun trusts a
row only when its marker's fingerprint matches what it would render now.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from heygem_ray import metrics, qa, scratch, stopping, storage
from heygem_ray.config import QAConfig
from heygem_ray.errors import writing
from heygem_ray.markers import Marker, read_marker, write_marker
from heygem_ray.media.audio import AUDIO_CONTEXT_SECONDS, LOUDNESS_WINDOW, SAMPLE_RATE, AudioWindow, speech_loudness
from heygem_ray.media.mux import stitch
from heygem_ray.media.thumbnail import THUMBNAIL_QUALITY, THUMBNAIL_WIDTH, thumbnail_jpeg
from heygem_ray.plan import audio_span, frame_center_samples
from heygem_ray.prepare import AudioTrack, checkpoint_version, read_pcm
from heygem_ray.storage import StorageOptions

log = logging.getLogger("heygem_ray")


@dataclass(frozen=True)
class StitchJob:
    row_id: str
    output: str
    segment_uris: list[str]
    work_uri: str
    fps_fraction: str
    frames: int
    marker_uri: str
    thumbnail_uri: str
    fingerprint: str
    #: each segment's output frames [start, stop), in join order
    spans: list[tuple[int, int]]
    #: the row's decoded audio (heygem_ray.prepare.read_pcm), for the lip-sync score
    pcm_uri: str
    audio_samples: int
    fps: float
    qa: QAConfig
    #: the campaign's `storage.options`, set for the process before anything is read: a Ray task
    #: may run in a worker that has never seen them; None leaves the process's as they are
    storage_options: StorageOptions | None = None
    #: the campaign's pinned model versions (`Config.model_versions`), set with `storage_options`
    model_versions: dict[str, str] | None = None
    #: the run that sends it, recorded in the marker (`Marker.run`)
    run: str | None = None


@dataclass(frozen=True)
class Stitched:
    marker: Marker
    thumbnail: bytes | None  # a small JPEG of a mid-video frame, for the campaign report


def stitch_row(job: StitchJob, audio: AudioTrack) -> Stitched:
    """Join the row's segments and `audio` (from `prepare.prepare_audio_track`) into the output."""
    if job.storage_options is not None:
        storage.configure(job.storage_options, job.model_versions)
    done = _published_already(job)
    if done is not None:
        return done
    clock = metrics.StageClock()
    middle: list[bytes] = []  # the thumbnail's segment, kept rather than fetched again

    def segment(i: int) -> io.BytesIO:
        # each segment read whole (seconds of video), so the store's retries cover it: a stream
        # cut midway through the join could not be taken up again
        data = storage.read_bytes(job.segment_uris[i])
        if i == len(job.segment_uris) // 2:
            middle[:] = [data]
        return io.BytesIO(data)

    with scratch.folder("stitch") as tmp:
        path = os.path.join(tmp, "out.mp4")
        with clock("stitch"):
            stats = stitch(
                segment,
                len(job.segment_uris),
                storage.local_copy(audio.uri),
                path,
                job.fps_fraction,
            )
        if stats.frames != job.frames:
            raise RuntimeError(f"row {job.row_id}: stitched {stats.frames} frames, planned {job.frames}")
        with clock("qa"):
            sync = sync_score(job)
        if job.qa.fail_below is not None and (sync.score is None or sync.score < job.qa.fail_below):
            raise QAError(
                f"lip-sync score {sync.score} is below qa.fail_below={job.qa.fail_below:g}"
                f" (method {sync.method}, best offset {sync.offset_frames} frame(s)): not published"
            )
        if stopping.given_up():  # a row reported failed publishes nothing afterwards
            raise stopping.StageStopped(f"row {job.row_id}: stitch given up before it published")
        with clock("upload"), writing(job.output):
            # the marker of the video this one replaces goes first: a run stopped between the two
            # would leave this video under the old one's fingerprint, skipped as that one later;
            # and its picture, which the report showed for this video where none was made for it
            storage.remove(job.marker_uri)
            storage.remove(job.thumbnail_uri)
            size = os.path.getsize(path)
            storage.publish_file(path, job.output, move=True)
    marker = Marker(
        job.row_id,
        job.fingerprint,
        job.output,
        stats.frames,
        round(audio.seconds, 4),
        time.time(),
        sync.score,
        sync.offset_frames,
        sync.method,
        sync.distance,
        sync.frames_without_face,
        size,
        job.run,
    )
    # the marker right after the video: a stop between the two (a thumbnail's time, before) stitched
    # the row again on the next run
    write_marker(job.marker_uri, marker)
    thumbnail = _thumbnail(job, middle[0])
    if thumbnail:
        try:
            storage.write_bytes(job.thumbnail_uri, thumbnail)
        except OSError as exc:  # the video is published: a missing thumbnail must not fail the row
            log.warning("row %s: thumbnail not written (%s: %s)", job.row_id, type(exc).__name__, exc)
    try:
        storage.remove(job.work_uri, recursive=True)
    except OSError as exc:  # published: leftover segments must not fail the row
        log.warning("row %s: segments not removed (%s: %s)", job.row_id, type(exc).__name__, exc)
    metrics.stage_seconds(clock.seconds)
    return Stitched(marker, thumbnail)


def _published_already(job: StitchJob) -> Stitched | None:
    """What an earlier try of this very stitch published, when that try ended after its marker (a
    worker lost then, and the task run again): its segments are gone, so it could not be joined
    again. None where the segments are there (a first try, or `force` rendering a row again)."""
    marker = read_marker(job.marker_uri)
    if marker is None or marker.fingerprint != job.fingerprint or storage.exists(job.segment_uris[0]):
        return None
    if not marker.still_published(job.output):
        return None
    try:
        thumbnail: bytes | None = storage.read_bytes(job.thumbnail_uri)
    except OSError:
        thumbnail = None
    return Stitched(marker, thumbnail)


class QAError(RuntimeError):
    """The output's lip sync is below `qa.fail_below`: the row fails, nothing is published."""


def sync_score(job: StitchJob) -> qa.SyncScore:
    """The joined output's lip-sync score (the expert's with `qa.syncnet`, else motion-energy) and
    how many of its frames had no face."""
    # each segment's mouth change, measured by the actor that rendered it, in join order (NaN
    # where a frame had no face; None for a segment made before scoring)
    motion = [qa.read_motion(qa.motion_uri(u), b - a) for u, (a, b) in zip(job.segment_uris, job.spans, strict=True)]
    sync = syncnet_score(job) if job.qa.syncnet else motion_energy_score(job, motion)
    without_face = sum(int(np.isnan(m).sum()) for m in motion if m is not None)
    return replace(sync, frames_without_face=without_face)


def syncnet_score(job: StitchJob) -> qa.SyncScore:
    """The lip-sync expert's figures (`qa.OffsetDistances`): each segment's face-window embeddings
    (made by the actor) in join order, against the expert's audio embedding of every output frame
    within ±`qa.syncnet_offsets` of them, segment by segment."""
    from heygem_ray.models import syncnet
    from heygem_ray.models.wav2lip_audio import mel_chunks

    # loaded again where the file was replaced: the sidecars scored are those its weights made
    model, device, key = _expert(job.qa.syncnet or "", checkpoint_version(job.qa.syncnet))
    reach = qa.syncnet_offsets(job.fps)
    distances = qa.OffsetDistances(reach)
    for uri, (start, stop) in zip(job.segment_uris, job.spans, strict=True):
        faces, starts = qa.read_face_embeddings(qa.syncnet_uri(uri, key))
        if not len(faces):
            continue
        first, last = max(0, start - reach), min(job.frames, stop + reach)
        frames = np.arange(first, last)
        context = int(AUDIO_CONTEXT_SECONDS * SAMPLE_RATE)
        lo, hi = audio_span(first, last - 1, job.fps, SAMPLE_RATE, context, job.audio_samples)
        window = AudioWindow(read_pcm(job.pcm_uri, lo, hi), lo, job.audio_samples, 0.0)
        mels = mel_chunks(window, frames, job.fps)[:, None]
        audio = syncnet.embed(model.embed_audio, np.ascontiguousarray(mels, np.float32), device)
        distances.add(faces, starts + start, audio, first)
    return distances.result()


@functools.lru_cache(maxsize=2)
def _expert(uri: str, version: str | None) -> tuple[Any, Any, str]:
    """The lip-sync expert, its device and its key (`models.syncnet.load_expert`), loaded once per
    process and version (a stitch task's worker keeps it for the next). Imported here, not above:
    torch stays out of the driver, which imports this module for its types."""
    from heygem_ray.models.syncnet import load_expert

    return load_expert(uri)


def motion_energy_score(job: StitchJob, motion: list[np.ndarray | None]) -> qa.SyncScore:
    """The joined output's motion-energy score: the segments' mouth change against the row's speech
    loudness at every output frame, the audio read segment by segment."""
    loudness = []
    for start, stop in job.spans:
        centers = frame_center_samples(np.arange(start, stop), job.fps, SAMPLE_RATE)
        lo = max(0, int(centers[0]) - LOUDNESS_WINDOW)
        hi = min(job.audio_samples, int(centers[-1]) + LOUDNESS_WINDOW)
        samples = read_pcm(job.pcm_uri, lo, max(lo, hi))
        loudness.append(qa.loudness_db(speech_loudness(samples, centers - lo)))
    measured = [
        np.full(b - a, np.nan, np.float32) if m is None else m for m, (a, b) in zip(motion, job.spans, strict=True)
    ]
    return qa.score(np.concatenate(measured), np.concatenate(loudness), job.qa.max_lag)


def _thumbnail(job: StitchJob, segment: bytes) -> bytes | None:
    """The first frame of the middle segment (its bytes): near the middle of the video, and a
    keyframe, so it costs one frame's decode rather than a seek's worth of them."""
    try:
        return thumbnail_jpeg(io.BytesIO(segment), width=THUMBNAIL_WIDTH, quality=THUMBNAIL_QUALITY, at=0)
    except Exception as exc:  # noqa: BLE001 - the video is published: a report placeholder, not a failed row
        log.warning("row %s: no thumbnail (%s: %s)", job.row_id, type(exc).__name__, exc)
        return None
