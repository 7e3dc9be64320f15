"""From per-frame face candidates to one box per frame: the same person followed, short stretches
without a face filled from their neighbours, long ones (the person turned away or left) left
empty so those frames pass through unrendered, pads added, and (optionally) the official temporal
smoothing. Shared by every detector."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from heygem_ray.detect.smoothing import WINDOW, smooth_boxes_official

#: the longest stretch of frames without a face that is filled from its neighbours (a detector's
#: miss); a longer one passes through unrendered (half a second at 25 fps)
MAX_GAP = 12
#: the frames a presenter must have been found on before the faces beside them are passed over
#: for them: a detector's stray box chosen first on a frame or two leaves the face beside it to a
#: restart
HELD_FRAMES = 3
#: two boxes found one after the other that overlap less than this (intersection over union) are
#: a cut to another shot, when the boxes either side of them hold still: a 5-frame smoothing window
#: across a cut drew the mouth between the two places for four frames
CUT_IOU = 0.5
#: an avatar is detected in chunks of this many frames (10 s at 24 fps), each cached on its own and
#: each from a reset detector: a narration shorter than its avatar has only the chunks it shows
#: detected, and a longer one later detects only the chunks still missing (240: a multiple of
#: strides 1-6 and 8, so a stride samples the same frames as over the whole clip)
CHUNK_FRAMES = 240


def track_margin(stride: int) -> int:
    """Frames past the last one shown that a track must reach for the boxes shown to be those the
    whole clip's track gives: `TrackBuilder` decides a frame from the frames after it up to a gap
    (`MAX_GAP`, widened by a stride's skipped frames) and the smoothing window; three gaps are a
    wide bound (tests/test_track.py checks it over random candidates)."""
    return 3 * (MAX_GAP + stride) + WINDOW


def frames_to_track(total: int, shown: int, stride: int) -> int:
    """How many leading frames of a `total`-frame avatar to track so its first `shown` frames get
    their final boxes: whole chunks up to `shown` plus the margin, or every frame."""
    want = shown + track_margin(stride)
    return total if want >= total else min(total, -(-want // CHUNK_FRAMES) * CHUNK_FRAMES)


def shown_short_of(frame: int, stride: int) -> int:
    """The most frames a narration may show whose track (`frames_to_track`) stops short of `frame`
    (0: none)."""
    return max(0, frame // CHUNK_FRAMES * CHUNK_FRAMES - track_margin(stride))


def settled_frames(tracked: int, total: int, stride: int) -> int:
    """Of a track of the first `tracked` frames, how many leading frames have their final boxes."""
    return total if tracked >= total else max(0, tracked - track_margin(stride))


class TrackBuilder:
    """Fed frame by frame (memory: 35 bytes a frame, in arrays: a 3-hour clip's 270,000 frames take
    9.5 MB). The first face chosen is the
    highest-scoring (the official choice; the larger on a tie); after that, the candidate nearest
    the last chosen box, if it is within that box's size of it: a second person in the shot takes
    the track neither by walking in nor while the presenter is missed for a frame (that frame is a
    miss). Only after more than `max_gap` frames without the presenter (faces elsewhere, none, or
    not examined) is the track started again from the highest-scoring face: the presenter moved
    away for good, or came back elsewhere after a cutaway, taken at once (those frames are no gap
    the fill would bridge, nor is one across a cut: see `finish`). Not from a companion: a face
    found beside the presenter, of about its size where it is now (followed as it moves, forgotten
    when unseen for four gaps), so a co-host is not lip-synced while the presenter is missed, and
    the presenter is taken again when found; after an absence as long as the presenter was seen
    (at least four gaps), the best face is taken again, a companion too. Faces are told apart by
    place and size alone: after a cut to the co-host's close-up, that close-up is taken."""

    def __init__(self, max_gap: int = MAX_GAP) -> None:
        self._boxes = np.zeros((1024, 4))  # the chosen box of frame i, where _chosen[i]
        self._chosen = np.zeros(1024, bool)
        self._missed = np.zeros(1024, bool)  # examined, and no face found
        self._restart = np.zeros(1024, bool)  # the track started again here, after the presenter was lost
        self._n = 0
        self._last: np.ndarray | None = None
        self._last_at = -1  # the frame `_last` was chosen on (frames a stride skips count as frames)
        # since the presenter was last found: the frames on which one other face followed itself,
        # examined one after the other (a cut to another shot shows it from its first frame)
        self._other: list[tuple[int, np.ndarray]] = []
        # the other faces found beside the presenter (box, the frame last seen on): never taken for them
        self._companions: list[list[Any]] = []
        self._held = 0  # the frames the presenter was found on since the track (re)started
        self._since = 0  # the frame the track (re)started on
        self._seen = 0  # frames a presenter of this track was seen over (once found on HELD_FRAMES), at most
        self.max_gap = max_gap

    def _append(self, box: np.ndarray | None, missed: bool) -> None:
        if self._n == len(self._chosen):
            grow = len(self._chosen)
            self._boxes = np.concatenate([self._boxes, np.zeros((grow, 4))])
            self._chosen = np.concatenate([self._chosen, np.zeros(grow, bool)])
            self._missed = np.concatenate([self._missed, np.zeros(grow, bool)])
            self._restart = np.concatenate([self._restart, np.zeros(grow, bool)])
        if box is not None:
            self._boxes[self._n] = box
            self._chosen[self._n] = True
        self._missed[self._n] = missed
        self._n += 1

    def add(self, candidates: np.ndarray | None) -> None:
        """candidates: (k, 5) x1, y1, x2, y2, score, or None for a frame that was not examined."""
        if candidates is None or len(candidates) == 0:
            if candidates is not None:
                self._other.clear()
            self._append(None, candidates is not None)
            return
        found = np.asarray(candidates, np.float64)
        boxes = found[:, :4]
        chosen = None if self._last is None else _nearest(boxes, self._last)
        start: int | None = None  # where the track starts again, if it does here
        if chosen is not None:
            self._other.clear()
        else:
            if self._last is not None:
                found = self._not_companions(found)  # a co-host is never taken for the presenter
                if not len(found) or self._n - self._last_at - 1 <= self.max_gap:
                    self._follow_other(found)
                    self._append(None, True)  # a miss: within a gap, one the fill may bridge
                    return
            # the first face, or the presenter lost for longer than a gap: started again
            follow = _nearest(found[:, :4], self._other[-1][1]) if self._other else None
            chosen = _best(found) if follow is None else follow
            self._held, self._since = 0, self._n
            if self._last is not None:  # from the first frame the face followed itself on
                start = self._since = self._n if follow is None else self._other[0][0]
                for i, box in self._other if follow is not None else ():
                    self._boxes[i], self._chosen[i], self._missed[i] = box, True, False
                    self._held += 1
                self._other.clear()
        self._held += 1
        if self._held >= HELD_FRAMES:
            self._seen = max(self._seen, self._n - self._since + 1)
        self._last, self._last_at = chosen.copy(), self._n  # a copy: a view would keep the frame's candidates alive
        self._meet_companions(boxes, chosen)
        self._append(chosen, False)
        if start is not None:  # marked once the arrays hold this frame
            self._restart[start] = True

    def _meet_companions(self, boxes: np.ndarray, chosen: np.ndarray) -> None:
        """On a frame the presenter was found on: the other faces there are companions (a co-host),
        followed from frame to frame and forgotten when unseen for `4 * max_gap` frames."""
        self._companions = [c for c in self._companions if not _same_face(chosen, c[0])]
        for box in boxes[np.any(boxes != chosen, axis=1)]:
            self._companion_at(box)
        self._forget_companions()

    def _companion_at(self, box: np.ndarray) -> bool:
        """Whether `box` is a companion seen before (then followed to it); a new one otherwise,
        where the presenter was found on this frame."""
        for companion in self._companions:
            if _same_face(box, companion[0]):
                companion[0], companion[1] = box.copy(), self._n
                return True
        if self._last_at == self._n:
            self._companions.append([box.copy(), self._n])
        return False

    def _forget_companions(self) -> None:
        self._companions = [c for c in self._companions if self._n - c[1] <= 4 * self.max_gap]

    def _not_companions(self, found: np.ndarray) -> np.ndarray:
        """The candidates that are no companion of the presenter (followed to where they are now):
        while the presenter is missed (Haar loses a turned head for seconds), a restart took the
        co-host and kept to them for the rest of the clip. For as long as a presenter of the track
        was seen (`_seen`), at least four gaps, and only once one was found on `HELD_FRAMES`
        frames: a detector's stray box chosen first, on a poster beside the presenter, kept the
        presenter out of the track for the whole clip."""
        self._forget_companions()
        if not self._seen or self._n - self._last_at > max(4 * self.max_gap, self._seen):
            return found
        return found[[not self._companion_at(box) for box in found[:, :4]]]

    def _follow_other(self, found: np.ndarray) -> None:
        """Extend (or begin) the run of frames on which one face other than the presenter (and
        their companions) followed itself: a restart takes it back to that run's first frame."""
        if not len(found):
            self._other.clear()
            return
        follow = _nearest(found[:, :4], self._other[-1][1]) if self._other else None
        self._other = (
            [*self._other, (self._n, follow.copy())] if follow is not None else [(self._n, _best(found).copy())]
        )

    @property
    def frames(self) -> int:
        return self._n

    @property
    def found(self) -> int:
        return int(self._chosen[: self._n].sum())

    def finish(self, width: int, height: int, pads: list[int] | tuple[int, ...], smooth: bool) -> np.ndarray:
        """(n, 4) int32 boxes. A stretch of frames without a face is filled by linear interpolation
        between the nearest found frames (held constant before the first and after the last) when
        it is at most the builder's `max_gap` frames long, or when fewer than two of its frames were examined
        (a detector stride); a longer one is the face lost: its boxes are empty (0, 0, 0, 0), so
        those frames pass through as they are. A face found on one frame with no other within
        `max_gap` frames either side, and a miss examined on each side, is taken for a detector's
        false positive (blurred noise can pass every check of one view on one frame) and dropped.
        A cut to another shot (the track started again elsewhere, or a face found in another place
        or size: `CUT_IOU`) is neither bridged nor smoothed across: the frames a stride skipped
        between the two shots pass through, and each shot's boxes are smoothed on their own.
        Raises ValueError when no frame has a face."""
        self._drop_lone_faces()
        n = self._n
        found = np.flatnonzero(self._chosen[:n])
        if found.size == 0:
            raise ValueError(f"no face found in any of {n} frames")
        known = self._boxes[found]
        cuts = self._restart[:n] & self._chosen[:n]
        cuts[_cuts(found, known, self.max_gap)] = True
        everywhere = np.stack([np.interp(np.arange(n), found, known[:, c]) for c in range(4)], axis=1)
        covered = np.ones(n, bool)
        for lo, hi in _gaps(found, n):
            if (hi - lo > self.max_gap and int(self._missed[lo:hi].sum()) >= 2) or (hi < n and cuts[hi]):
                covered[lo:hi] = False
        out = np.zeros((n, 4), np.int32)
        for lo, hi in _runs(covered):  # each stretch with a face, and each shot in it, finished on its own
            for a, b in itertools.pairwise([lo, *(lo + np.flatnonzero(cuts[lo + 1 : hi]) + 1).tolist(), hi]):
                out[a:b] = finish_boxes(everywhere[a:b], width, height, pads, smooth)
        return out

    def _drop_lone_faces(self) -> None:
        """Forget each face found on a frame with no other face within `max_gap` frames and a miss
        examined on each side of it."""
        n = self._n
        found = np.flatnonzero(self._chosen[:n])
        if not found.size:
            return
        missed = np.flatnonzero(self._missed[:n])
        if not missed.size:
            return
        before = np.diff(found, prepend=-(self.max_gap + 1) - 1)
        after = np.diff(found, append=n + self.max_gap + 1)
        lone = found[(before > self.max_gap) & (after > self.max_gap) & (missed[0] < found) & (missed[-1] > found)]
        self._chosen[lone] = False
        self._missed[lone] = True


def _best(found: np.ndarray) -> np.ndarray:
    """The highest-scoring candidate's box (the larger on a tie): the official choice."""
    boxes = found[:, :4]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[np.lexsort((areas, found[:, 4]))[-1]]


def _same_face(box: np.ndarray, seen: np.ndarray) -> bool:
    """Whether `box` is the face `seen` moved on: its centre within `seen`'s larger side of it, and
    of about its size (a close-up of the presenter where a co-host stood in the two-shot is not)."""
    side, seen_side = max(box[2] - box[0], box[3] - box[1]), max(seen[2] - seen[0], seen[3] - seen[1])
    distance = np.linalg.norm((box[:2] + box[2:]) / 2 - (seen[:2] + seen[2:]) / 2)
    return bool(distance <= seen_side and 2 / 3 <= side / max(seen_side, 1e-9) <= 3 / 2)


def _nearest(boxes: np.ndarray, last: np.ndarray) -> np.ndarray | None:
    """The box whose centre is nearest `last`'s, if within `last`'s larger side of it."""
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    distances = np.linalg.norm(centers - (last[:2] + last[2:]) / 2, axis=1)
    k = int(np.argmin(distances))
    return boxes[k] if distances[k] <= max(last[2] - last[0], last[3] - last[1]) else None


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes a[i] and b[i] (x1, y1, x2, y2 each)."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return w * h / np.maximum(area - w * h, 1e-9)


def _cuts(found: np.ndarray, boxes: np.ndarray, max_gap: int) -> np.ndarray:
    """The frames (of `found`, whose boxes are `boxes`) where a cut to another shot shows: a box
    that overlaps the one before it less than CUT_IOU, while the box before that and the one after
    overlap their neighbours at least that much, each within `max_gap` frames (a box out of place
    on one frame is a detector's error, smoothed away, not a cut)."""
    if len(found) < 4:
        return np.zeros(0, np.int64)
    overlap = iou(boxes[:-1], boxes[1:])
    steady = (overlap >= CUT_IOU) & (np.diff(found) <= max_gap + 1)
    # a cut at found[k + 1]: found[k - 1] -> found[k] steady, found[k] -> found[k + 1] apart,
    # found[k + 1] -> found[k + 2] steady
    k = np.flatnonzero(steady[:-2] & (overlap[1:-1] < CUT_IOU) & steady[2:]) + 1
    return found[k + 1]


def _gaps(found: np.ndarray, n: int) -> list[tuple[int, int]]:
    """[lo, hi) of every stretch of frames between (and before, after) the frames with a face."""
    edges = [-1, *found.tolist(), n]
    return [(a + 1, b) for a, b in itertools.pairwise(edges) if b - a > 1]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of every run of True in `mask`."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    starts = np.flatnonzero(np.diff(padded) == 1)
    stops = np.flatnonzero(np.diff(padded) == -1)
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def finish_boxes(
    boxes: np.ndarray, width: int, height: int, pads: list[int] | tuple[int, ...], smooth: bool
) -> np.ndarray:
    """Pad (top, bottom, left, right), clip to the frame, then smooth, as the official pipeline orders it."""
    top, bottom, left, right = pads
    out = np.empty((len(boxes), 4), np.int64)
    clipped = np.trunc(np.maximum(boxes, 0))  # the official pipeline clips at 0 then truncates with int()
    out[:, 0] = np.maximum(0, clipped[:, 0] - left)
    out[:, 1] = np.maximum(0, clipped[:, 1] - top)
    out[:, 2] = np.minimum(width, clipped[:, 2] + right)
    out[:, 3] = np.minimum(height, clipped[:, 3] + bottom)
    if smooth and len(out) > 1:
        out = smooth_boxes_official(out)
    return out.astype(np.int32)


def fixed_track(box: tuple[int, int, int, int] | list[int], frames: int, width: int, height: int) -> np.ndarray:
    """The same box for every frame (detector=box), clipped to the frame."""
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if x2 - x1 < 8 or y2 - y1 < 8:
        raise ValueError(f"box {list(box)} leaves less than 8x8 pixels inside the {width}x{height} frame")
    return np.tile(np.array([x1, y1, x2, y2], np.int32), (frames, 1))
