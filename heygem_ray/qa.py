"""Lip-sync quality of an output, without weights: does the mouth move with the speech?

Per output frame, the renderer's change to the mouth region (mean absolute difference between the
rendered and the source pixels over the lower middle of the face box, measured on the actor while
the frames are in memory) is set against the speech loudness of the audio at that frame (in dB,
computed at the stitch from the row's audio, in the order the segments were joined). The score is
their Pearson correlation at the best lag within ±`max_lag` frames; the lag is the offset. A mouth
that follows the speech scores high at lag 0; an output whose video is shifted against its audio
finds its best lag away from 0; a segment joined in the wrong place or twice lowers the score,
since its motion then meets other speech.

    sync_method = "motion-energy"

With the official lip-sync expert (`qa.syncnet`: Wav2Lip's `lipsync_expert.pth`), the actor embeds
every window of five rendered frames (the lower half of each 96x96 face crop; consecutive at 25
fps, spread to span the same 0.2 s at other rates), and the stitch embeds the audio's mel window
at each frame; for every offset within ±`SYNCNET_OFFSETS` frames at 25 fps (±0.6 s: as many more
frames at a higher rate) the mean Euclidean distance between a face window and the audio window that many frames
away is taken over the whole row. `sync_distance` is the smallest of these means (LSE-D, lower is
better), `sync_score` the median of them minus the smallest (LSE-C, the confidence: higher is
better), `sync_offset_frames` the offset of the smallest (as above: positive when the mouth moves
after the speech).

    sync_method = "syncnet"
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

from heygem_ray import storage

METHOD = "motion-energy"
SYNCNET = "syncnet"
#: offsets the lip-sync expert is asked about, frames at 25 fps (as the usual LSE-D / LSE-C figures)
SYNCNET_OFFSETS = 15
#: the face windows' layout (`models.syncnet.window_offsets`), in the names of their sidecars
SYNCNET_WINDOWS_VERSION = 2
#: the mouth region within a face box, as fractions of its height and width
MOUTH_ROWS = (0.68, 1.0)
MOUTH_COLS = (0.25, 0.75)
#: loudness below this (dB of full scale) counts as silence
SILENCE_DB = -60.0
#: fewest frames with a face for a score
MIN_FRAMES = 12


@dataclass(frozen=True)
class SyncScore:
    #: Pearson correlation of mouth change and speech loudness at the best lag (None: not scored)
    score: float | None
    #: the best lag in frames (positive: the mouth moves after the speech)
    offset_frames: int | None
    method: str = METHOD
    #: frames scored (frames with a face and a finite measure; windows, for the expert)
    frames: int = 0
    #: the expert's mean embedding distance at the best offset (LSE-D); None for motion-energy
    distance: float | None = None
    #: output frames with no face in them (the face lost: passed through as they were)
    frames_without_face: int = 0


def _mouth(box: np.ndarray) -> tuple[slice, slice] | None:
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    h, w = y2 - y1, x2 - x1
    if h < 4 or w < 4:
        return None
    rows = slice(y1 + int(MOUTH_ROWS[0] * h), y1 + int(MOUTH_ROWS[1] * h))
    cols = slice(x1 + int(MOUTH_COLS[0] * w), x1 + int(MOUTH_COLS[1] * w))
    return rows, cols


def mouth_patches(images: list[np.ndarray], boxes: np.ndarray) -> list[np.ndarray | None]:
    """A copy of each image's mouth region (None where its box is empty), before a renderer draws."""
    patches: list[np.ndarray | None] = []
    for image, box in zip(images, boxes, strict=True):
        region = _mouth(box)
        patches.append(None if region is None else np.array(image[region], dtype=np.int16))
    return patches


def mouth_change(patches: list[np.ndarray | None], images: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
    """Mean absolute change of each mouth region since `mouth_patches` (NaN where there was none)."""
    out = np.full(len(images), np.nan, np.float32)
    for i, (patch, image, box) in enumerate(zip(patches, images, boxes, strict=True)):
        region = _mouth(box)
        if patch is not None and region is not None and image[region].shape == patch.shape:
            out[i] = float(np.abs(image[region].astype(np.int16) - patch).mean())
    return out


def face_halves(images: list[np.ndarray], boxes: np.ndarray) -> list[np.ndarray | None]:
    """The lower half of each face crop at 96x96 (48x96 BGR uint8), as the lip-sync expert sees
    it; None where the box is empty."""
    halves: list[np.ndarray | None] = []
    for image, box in zip(images, boxes, strict=True):
        x1, y1, x2, y2 = (int(v) for v in box[:4])
        crop = image[max(0, y1) : y2, max(0, x1) : x2]
        if crop.shape[0] < 4 or crop.shape[1] < 4:
            halves.append(None)
            continue
        halves.append(cv2.resize(crop, (96, 96), interpolation=cv2.INTER_AREA)[48:])
    return halves


def syncnet_offsets(fps: float) -> int:
    """The offsets the expert is asked about at `fps`, in frames: the same ±0.6 s at any rate, so
    LSE-C (a median over them) means the same for a 60 fps row as for a 25 fps one."""
    return max(1, round(SYNCNET_OFFSETS * fps / 25.0))


class OffsetDistances:
    """The lip-sync expert's figures for a row, gathered segment by segment (memory flat in the
    row's length): the mean distance between face-window and audio embeddings at each offset."""

    def __init__(self, max_offset: int = SYNCNET_OFFSETS):
        self.max_offset = max_offset
        self._sums = np.zeros(2 * max_offset + 1)
        self._counts = np.zeros(2 * max_offset + 1, np.int64)
        self.windows = 0

    def add(self, faces: np.ndarray, starts: np.ndarray, audio: np.ndarray, audio_first: int) -> None:
        """faces[i]: the window starting at frame starts[i]; audio[k]: the mel window of frame
        audio_first + k."""
        self.windows += len(faces)
        for k, o in enumerate(range(-self.max_offset, self.max_offset + 1)):
            idx = starts + o - audio_first
            ok = (idx >= 0) & (idx < len(audio))
            if ok.any():
                self._sums[k] += float(np.linalg.norm(faces[ok] - audio[idx[ok]], axis=1).sum())
                self._counts[k] += int(ok.sum())

    def result(self) -> SyncScore:
        seen = self._counts > 0
        if self.windows == 0 or not seen.all():
            return SyncScore(None, None, SYNCNET, self.windows)
        means = self._sums / self._counts
        best = int(np.argmin(means))
        # the face at t matches the audio at t + o best: the mouth moves o frames *before* its speech
        offset = -(best - self.max_offset)
        confidence = float(np.median(means) - means[best])
        return SyncScore(round(confidence, 4), offset, SYNCNET, self.windows, round(float(means[best]), 4))


def loudness_db(loudness: np.ndarray) -> np.ndarray:
    return np.maximum(20 * np.log10(np.maximum(loudness, 1e-12)), SILENCE_DB).astype(np.float32)


def score(motion: np.ndarray, loudness: np.ndarray, max_lag: int = 3) -> SyncScore:
    """The motion-energy score of a row: `motion` (mouth change per output frame, NaN where not
    measured) against `loudness` (speech loudness per output frame, dB)."""
    motion, loudness = np.asarray(motion, np.float64), np.asarray(loudness, np.float64)
    best: tuple[float, int] | None = None
    scored = int(np.isfinite(motion).sum())
    for lag in range(-max_lag, max_lag + 1):
        m = motion[max(0, lag) : len(motion) + min(0, lag)]
        a = loudness[max(0, -lag) : len(loudness) - max(0, lag)]
        ok = np.isfinite(m) & np.isfinite(a)
        if ok.sum() < MIN_FRAMES or np.std(m[ok]) == 0 or np.std(a[ok]) == 0:
            continue
        r = float(np.corrcoef(m[ok], a[ok])[0, 1])
        # ties go to the smaller lag: a still mouth and steady speech must not look shifted
        if best is None or r > best[0] + 1e-9 or (abs(r - best[0]) <= 1e-9 and abs(lag) < abs(best[1])):
            best = (r, lag)
    if best is None:
        return SyncScore(None, None, frames=scored)
    return SyncScore(round(best[0], 4), best[1], frames=scored)


def motion_uri(segment_uri: str) -> str:
    """Where a segment's mouth-change measure is kept beside it (written before the segment, so a
    segment that exists has one)."""
    return segment_uri.rsplit(".", 1)[0] + ".motion.npy"


def write_motion(uri: str, motion: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(motion, np.float32), allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())


def read_motion(uri: str, frames: int) -> np.ndarray | None:
    """A segment's measure (NaN where a frame had no face); None when there is none (a segment
    made before scoring)."""
    try:
        motion = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except (FileNotFoundError, ValueError):
        return None
    return motion if len(motion) == frames else None


def syncnet_uri(segment_uri: str, expert_key: str) -> str:
    """Where a segment's face-window embeddings from the lip-sync expert are kept beside it, named
        by the expert's content (`models.syncnet.load_expert`): other weights at the same URI (a rerun
        after it was replaced) neither reuse them nor score their audio embeddings against them; nor do
    windows laid out otherwise (`SYNCNET_WINDOWS_VERSION`)."""
    return segment_uri.rsplit(".", 1)[0] + f".syncnet{SYNCNET_WINDOWS_VERSION}-{expert_key[:16]}.npz"


def write_face_embeddings(uri: str, embeddings: np.ndarray, starts: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, embeddings=np.asarray(embeddings, np.float16), starts=np.asarray(starts, np.int64))
    storage.write_bytes(uri, buf.getvalue())


def read_face_embeddings(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32, window starts within the segment); none for a segment without them."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
            return data["embeddings"].astype(np.float32), data["starts"]
    except (FileNotFoundError, ValueError, KeyError):
        return np.zeros((0, 512), np.float32), np.zeros(0, np.int64)


def flags(
    result_score: float | None, offset: int | None, min_sync: float, method: str = METHOD, without_face: int = 0
) -> list[str]:
    """Why a row's lip sync needs a look (empty: it does not). `min_sync` is on the method's scale:
    a correlation for motion-energy, the expert's confidence (LSE-C) for syncnet."""
    reasons = []
    if result_score is None:
        reasons.append("not scored (no face, or no speech)")
    elif result_score < min_sync:
        key = "qa.min_confidence" if method == SYNCNET else "qa.min_sync"
        reasons.append(f"lip-sync score {result_score:.2f} below {key}={min_sync:g} ({method})")
    if offset:
        reasons.append(f"mouth and speech offset by {offset:+d} frame(s)")
    if without_face:
        reasons.append(f"{without_face} frame(s) without a face, passed through")
    return reasons


#: how far under the campaign's median score a row is "far below" it
BELOW_MEDIAN = 0.25


def campaign_median(scores: list[float]) -> float | None:
    """The median score of a campaign's rows (None under five rows: too few to compare with)."""
    return float(np.median(scores)) if len(scores) >= 5 else None
