"""The stitch stage: one task per row joins its segments, muxes the audio, publishes the mp4
atomically, then writes the done-marker, then removes the row's segment files.

The order matters for resume: a marker exists only for a published output, and a rerun trusts a
row only when its marker's fingerprint matches what it would render now.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

from heygem_ray import metrics, storage
from heygem_ray.config import EncoderConfig
from heygem_ray.errors import reading, writing
from heygem_ray.media.mux import stitch
from heygem_ray.report import thumbnail_jpeg
from heygem_ray.storage import StorageOptions


@dataclass(frozen=True)
class StitchJob:
    row_id: str
    output: str
    segment_uris: list[str]
    work_uri: str
    audio_uri: str
    fps_fraction: str
    frames: int
    marker_uri: str
    thumbnail_uri: str
    fingerprint: str
    encoder: EncoderConfig
    #: the campaign's `storage.options`, set for the process before anything is read: a Ray task
    #: may run in a worker that has never seen them; None leaves the process's as they are
    storage_options: StorageOptions | None = None


@dataclass(frozen=True)
class Marker:
    """What a finished row leaves beside the campaign: enough to decide 'already done' on a rerun."""

    id: str
    fingerprint: str
    output: str
    frames: int
    audio_seconds: float
    finished_at: float


def read_marker(uri: str) -> Marker | None:
    try:
        return Marker(**json.loads(storage.read_bytes(uri)))
    except (FileNotFoundError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class Stitched:
    marker: Marker
    thumbnail: bytes | None  # a small JPEG of a mid-video frame, for the campaign report


def stitch_row(job: StitchJob) -> Stitched:
    if job.storage_options is not None:
        storage.configure(job.storage_options)
    clock = metrics.StageClock()
    with reading("audio", job.audio_uri):
        audio = storage.local_copy(job.audio_uri)
    with tempfile.TemporaryDirectory(prefix="heygem-stitch-") as tmp:
        path = os.path.join(tmp, "out.mp4")
        enc = job.encoder
        with clock("stitch"):
            stats = stitch(
                lambda i: storage.open_uri(job.segment_uris[i]),
                len(job.segment_uris),
                audio,
                path,
                job.fps_fraction,
                enc.audio_codec,
                enc.audio_bitrate,
                enc.audio_sample_rate,
                audio_display=job.audio_uri,
            )
        if stats.frames != job.frames:
            raise RuntimeError(f"row {job.row_id}: stitched {stats.frames} frames, planned {job.frames}")
        try:
            thumbnail: bytes | None = thumbnail_jpeg(path, width=160, quality=75)
        except ValueError:  # the report shows a placeholder; a good video must not fail over it
            thumbnail = None
        with clock("upload"), writing(job.output):
            storage.publish_file(path, job.output)
    if thumbnail:
        storage.write_bytes(job.thumbnail_uri, thumbnail)
    marker = Marker(job.row_id, job.fingerprint, job.output, stats.frames, round(stats.audio_seconds, 4), time.time())
    storage.write_bytes(job.marker_uri, json.dumps(asdict(marker)).encode())
    storage.remove(job.work_uri, recursive=True)
    metrics.stage_seconds(clock.seconds)
    return Stitched(marker, thumbnail)
