"""A row on its way through the campaign: what the driver knows about it, and the jobs it hands the
stages (one `SegmentJob` per span, then one `StitchJob`), built from that knowledge alone."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heygem_ray import prepare, release, storage
from heygem_ray import qa as qa_flags
from heygem_ray.config import QAConfig
from heygem_ray.layout import CampaignLayout
from heygem_ray.manifest import Row
from heygem_ray.markers import Marker, read_marker
from heygem_ray.media import video
from heygem_ray.plan import SegmentSpan, avatar_frame_indices, output_frame_count, plan_segments, stable_hash
from heygem_ray.prepare import AudioInfo, AvatarTrack, RowPrep
from heygem_ray.results import RowResult
from heygem_ray.segment import SegmentJob
from heygem_ray.stitch import StitchJob
from heygem_ray.storage import StorageOptions


@dataclass
class RowState:
    row: Row
    started: float
    prep: RowPrep | None = None
    track: AvatarTrack | None = None
    spans: list[SegmentSpan] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)
    audio_track: Any = None  # the executor's handle of the row's encoded audio, made while it renders

    @classmethod
    def prepared(cls, row: Row, audio: AudioInfo, fingerprint: str) -> RowState:
        """A row whose preparation is already known (the benchmarks build rows without a campaign)."""
        return cls(row, time.time(), prep=RowPrep(fingerprint, False, audio, None))

    @property
    def rendered(self) -> bool:
        """Whether every segment of the row is rendered (its stitch is sent then)."""
        return bool(self.spans) and len(self.done) == len(self.spans)

    def plan(self, track: AvatarTrack, segment_seconds: float, spread: int = 1, frames: int | None = None) -> int:
        """Cut the row into segments over this avatar track, at least `spread` of them; returns its
        frame count (`frames`, or as many as its audio needs)."""
        assert self.prep is not None and self.prep.audio is not None
        self.track = track
        total = frames or output_frame_count(self.prep.audio.seconds, track.info.fps)
        self.spans = plan_segments(total, track.info.fps, segment_seconds, spread)
        return total

    def work_uri(self, layout: CampaignLayout, codec: str) -> str:
        """Where the row's segment files wait for its stitch; keyed by the row's fingerprint, the codec,
        the stream's shape and the segment count, so an unfinished row's segments are reused by a
        rerun only if nothing about the row changed, `auto` chose the same encoder and the frames
        have the same size, rate, pixel aspect and colour tags (segments of two encoders or shapes
        cannot be joined, and not all that shapes them is in the fingerprint: a release that
        renders clips over `render.max_side` smaller), and the
        row was cut the same way (another segment length or actor count cuts it into other spans)."""
        assert self.prep is not None and self.track is not None
        info = self.track.info
        # a stream decoded otherwise (deinterlaced, over white) only: the others keep their key
        decoded = [info.decoding] if info.decoding else []
        # the tracker's version too: a row's fingerprint may outlive a change to some avatars' tracks
        # (ROWS_TRACK_VERSION), but all of one video's segments come from one track; and the code's:
        # a release that changes some avatars' pixels leaves finished rows alone (no render version),
        # but an unfinished row's segments of the old code must not be joined to the new code's
        shape = stable_hash(
            release.code_version(),
            info.width,
            info.height,
            info.fps_fraction,
            info.sar,
            info.color,
            video.FROM_BGR,
            *decoded,
            prepare.TRACK_VERSION,
            length=8,
        )
        return layout.work(f"{self.row.id}-{self.prep.fingerprint[:16]}-{codec}-{shape}-n{len(self.spans)}")

    def segment_job(self, index: int, layout: CampaignLayout, codec: str, reuse: bool = True) -> SegmentJob:
        """Segment `index`'s job; `reuse`: whether a segment an earlier run left may stand for it."""
        assert self.track is not None and self.prep is not None and self.prep.audio is not None
        span, track, audio = self.spans[index], self.track, self.prep.audio
        avatar_frames = avatar_frame_indices(np.arange(span.start, span.stop), track.frames, track.info.still)
        lo, hi = int(avatar_frames.min()), int(avatar_frames.max())
        return SegmentJob(
            row_id=self.row.id,
            index=index,
            out_uri=segment_uri(self.work_uri(layout, codec), index),
            avatar_uri=self.row.avatar,
            info=track.info,
            start=span.start,
            avatar_frames=avatar_frames,
            pts=track.pts[lo : hi + 1],
            pts_offset=lo,
            boxes=track.boxes[avatar_frames],
            pcm_uri=audio.pcm_uri,
            audio_samples=audio.samples,
            audio_level=audio.level,
            codec=codec,
            reuse=reuse,
            avatar_fingerprint=track.fingerprint,
        )

    def stitch_job(
        self,
        layout: CampaignLayout,
        codec: str,
        qa: QAConfig,
        storage_options: StorageOptions | None,
        model_versions: dict[str, str] | None = None,
        run: str | None = None,
    ) -> StitchJob:
        assert self.prep is not None and self.prep.audio is not None and self.track is not None
        work = self.work_uri(layout, codec)
        return StitchJob(
            row_id=self.row.id,
            output=self.row.output,
            segment_uris=[segment_uri(work, s.index) for s in self.spans],
            work_uri=work,
            fps_fraction=self.track.info.fps_fraction,
            frames=self.spans[-1].stop,
            marker_uri=layout.marker(self.row.id),
            thumbnail_uri=layout.thumbnail(self.row.id),
            fingerprint=self.prep.fingerprint,
            spans=[(s.start, s.stop) for s in self.spans],
            pcm_uri=self.prep.audio.pcm_uri,
            audio_samples=self.prep.audio.samples,
            fps=self.track.info.fps,
            qa=qa,
            storage_options=storage_options,
            model_versions=model_versions,
            run=run,
        )

    def published_by(self, layout: CampaignLayout, run: str) -> Marker | None:
        """The row's done-marker (`published`) if the run `run` wrote it: a stitch that failed, or
        was stopped, after publishing. Known by the run's token, not by comparing the time the
        stitch's host wrote with this row's start on the driver's (hosts' clocks may differ by
        minutes); a marker from before runs were recorded, by the times."""
        marker = self.published(layout)
        if marker is None:
            return None
        mine = marker.run == run if marker.run is not None else marker.finished_at >= self.started
        return marker if mine else None

    def published(self, layout: CampaignLayout) -> Marker | None:
        """The row's done-marker, if its output was published for what it renders now (and is there:
        a marker whose video was deleted is what made the row render again)."""
        if self.prep is None:
            return None
        marker = read_marker(layout.marker(self.row.id))
        if marker is None or marker.fingerprint != self.prep.fingerprint:
            return None
        return marker if marker.still_published(self.row.output) else None

    def result(self, status: str, error: str | None, marker: Marker | None, qa: QAConfig) -> RowResult:
        """The row's result; a published one carries its lip-sync score, flagged as `qa` says."""
        audio = self.prep.audio if self.prep else None
        published = marker is not None and status in ("ok", "skipped")
        score = marker.sync_score if marker else None
        offset = marker.sync_offset_frames if marker else None
        method = marker.sync_method if marker else None
        without_face = marker.frames_without_face if marker else None
        return RowResult(
            id=self.row.id,
            status=status,
            output=self.row.output,
            error=error,
            audio_seconds=marker.audio_seconds if marker else (audio.seconds if audio else None),
            frames=marker.frames if marker else None,
            segments=len(self.spans) or None,
            render_seconds=round(time.time() - self.started, 3) if status == "ok" else None,
            attempts=max(self.attempts.values(), default=0),
            finished_at=time.time(),
            sync_score=score,
            sync_offset_frames=offset,
            sync_method=method,
            sync_distance=marker.sync_distance if marker else None,
            frames_without_face=without_face,
            qa_flag=published_flag(score, offset, method, without_face, qa) if published else "",
        )


#: a `_work` folder's name, as `RowState.work_uri` makes it: the row's id, then parts of fixed form
#: (one made before the stream's shape was in it has no shape part)
_WORK_KEY = re.compile(r"(?P<row>.+)-[0-9a-f]{16}-[A-Za-z0-9_]+(?:-[0-9a-f]{8})?-n[0-9]+")


def remove_old_work(layout: CampaignLayout, finished: Iterable[str]) -> int:
    """Remove every `_work` folder of the finished rows: those of an earlier cut, codec or input of a
    row (a rerun after a change, a stop, or a failure) that its stitch, which removes only its own,
    leaves. Rows that failed keep theirs, for a rerun to reuse. Returns how many went."""
    finished = set(finished)
    removed = 0
    for uri in storage.listdir(layout.work_root):
        match = _WORK_KEY.fullmatch(storage.basename(uri))
        if match and match["row"] in finished:
            storage.remove(uri, recursive=True)
            removed += 1
    return removed


def segment_uri(work_uri: str, index: int) -> str:
    return storage.join(work_uri, f"seg-{index:05d}.mp4")


def published_flag(
    score: float | None, offset: int | None, method: str | None, without_face: int | None, qa: QAConfig
) -> str:
    """A published row's QA flag from its lip-sync figures, as `qa` says (the campaign's
    comparison with its median is added when its table is written)."""
    floor = qa.min_confidence if method == qa_flags.SYNCNET else qa.min_sync
    flags = qa_flags.flags(score, offset, floor, method or qa_flags.METHOD, without_face or 0)
    if qa.fail_below is not None and (score is None or score < qa.fail_below):  # as the stitch fails it
        # a row this run skips was published before `fail_below` was set (or raised): said, not
        # failed, as its video is there (`force=true` renders it again, and then fails it)
        flags.append(f"below qa.fail_below ({qa.fail_below:g}), published by an earlier run")
    return "; ".join(flags)
