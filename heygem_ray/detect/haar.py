"""OpenCV's bundled Haar cascades: no weights to fetch, fast on CPU, good enough for presenter
footage, and careful not to see faces where there are none.

A candidate from the frontal-face cascade counts only when a second cascade (`alt2`) finds the
same face and the eye cascade finds two eyes side by side in its upper half (enlarged, for a small
face): blurred noise, textures, rooms and cartoon backgrounds that fool one cascade do not fool
all three (see `benchmarks/bench_detect.py` for the rates on a labelled set). A frame with no
face at its own aspect and orientation is looked at again through other *views*: squeezed across
or along (a face stretched by a wrong display aspect), closer (a face small in a large frame)
and turned by 12 and 24 degrees (a head tilted a little). The view that found the last face is tried first on the next frame; after
`probe_frames` examined frames in a row in which no view finds one, that view and one other (each
in turn) are tried, with a search through every view `REPROBE` examined frames later, then twice
as many on, and so on up to every `REPROBE_MAX`: a long face-less clip costs about two views'
search a frame (blurred noise, the labelled set's costliest, takes ~2 s a frame through every
view), and a face that comes back is found again within `len(VIEWS) - 1` examined frames, at once
where the last view sees it. Runs on a grey copy whose longer side is
at most `max_side` (after squeezing).

A presenter's face changes size slowly, so after a frame with a face the next is searched first
through the same view for faces of about the sizes found (`TRACK_SIZES`): the cascade then skips
the scales of small faces, most of its windows (a 720p frame: 16 instead of 67 ms on one core).
A candidate there that overlaps a face of the last frame is that face again and is taken without
the second cascade and the eye check (18 ms more), which run on every `REVERIFY`th examined frame
only and on every other candidate; a frame where the tracked search finds nothing gets the full
search, so a cut to another shot size is found as before (a second face of another size that
comes in while the first stays is not looked for; the tracker would keep to the first anyway).
The cost: a candidate only the main cascade sees where the face was (the presenter gone, a poster
behind) is taken for up to `REVERIFY` - 1 examined frames; and a face the full check would have
refused in the view that found the last one is kept in that view until the next check, where the
full search might have found it through another view, boxed in that view's shape (on the demo
stage up to ~30 px apart; the cascade's grouping from fewer scales moves boxes by a few pixels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from heygem_ray.config import DetectorConfig
from heygem_ray.detect.track import iou


@dataclass(frozen=True)
class View:
    """How a frame is looked at: scaled across (sx) and along (sy), then turned by `angle` degrees,
    at up to `closer` times the detector's `max_side` (for a face small in a large frame)."""

    name: str
    sx: float = 1.0
    sy: float = 1.0
    angle: float = 0.0
    closer: float = 1.0
    #: equalise the grey levels first (the cascades' training); not where a large flat border
    #: around a small face would decide the mapping
    equalize: bool = True


#: tried in this order: turned a little before squeezed, as a tilted head is also found squeezed,
#: boxed wide and short (a stretched face is not found turned)
VIEWS = (
    View("plain"),
    View("closer", closer=3.0, equalize=False),
    View("turned +12", angle=12.0),
    View("turned -12", angle=-12.0),
    View("squeezed across 0.75", sx=0.75),
    View("squeezed across 0.55", sx=0.55),
    View("squeezed across 0.45", sx=0.45),
    View("squeezed along 0.75", sy=0.75),
    View("squeezed along 0.55", sy=0.55),
    View("turned +24", angle=24.0),
    View("turned -24", angle=-24.0),
)
#: in a face-less stretch, all views are tried again this many examined frames after its first
#: `probe_frames`, then twice as many on, and so on, up to every REPROBE_MAX examined frames
REPROBE = 5
REPROBE_MAX = 40
#: the width (pixels) a face's upper half is enlarged to, at least, before looking for its eyes
EYE_CHECK_WIDTH = 200
#: the face sizes a tracked search looks for, as fractions of the smallest and largest face the
#: last frame showed (in the view's pixels)
TRACK_SIZES = (0.7, 1.45)
#: a tracked face is verified again (second cascade, two eyes) on every this many examined frames
#: since the full search that found it
REVERIFY = 5
#: the overlap (intersection over union) with a face of the last frame that makes a candidate that face
SAME_FACE_IOU = 0.5

#: a box in a view's pixels: x1, y1, x2, y2
Box = tuple[float, float, float, float]


class HaarDetector:
    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> HaarDetector:
        return cls(max_side=cfg.max_side, batch_size=cfg.batch_size)

    def __init__(
        self, max_side: int = 720, batch_size: int = 16, min_face_fraction: float = 0.04, probe_frames: int = 8
    ):
        self._find, self._confirm, self._eyes = (
            _cascade(name)
            for name in ("haarcascade_frontalface_default", "haarcascade_frontalface_alt2", "haarcascade_eye")
        )
        self.max_side = max_side
        self.batch_size = batch_size
        self.min_face_fraction = min_face_fraction
        self.probe_frames = probe_frames
        self.reset()

    def reset(self) -> None:
        self._view: View | None = None  # the view that found the last face
        self._misses = 0  # frames in a row in which no view found one
        self._faces: list[Box] = []  # the faces the last frame showed, in its view's pixels
        self._tracked = 0  # frames since the full search that found them

    @property
    def view(self) -> View | None:
        """The view that found the last face (None before any)."""
        return self._view

    def detect(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        return [self._detect_one(frame) for frame in frames]

    def _detect_one(self, frame: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        if self._view is not None and self._faces:
            self._tracked += 1
            trusted = self._faces if self._tracked % REVERIFY else []
            found, faces = self._look(grey, self._view, self._faces, trusted)
            if len(found):
                self._faces = faces
                return found
        for view in self._views_now():
            found, faces = self._look(grey, view)
            if len(found):
                self._view, self._misses, self._faces, self._tracked = view, 0, faces, 0
                return found
        self._misses += 1
        self._faces = []
        return np.zeros((0, 5), np.float32)

    def _views_now(self) -> tuple[View, ...]:
        """The last view that found a face first, then the others; after `probe_frames` frames in
        a row without a face, that view and one other, in turn, but on the frames `every_view_due`
        names (a face-less stretch costs little, and a face that comes back is found again within
        as many frames as there are other views)."""
        last = self._view or VIEWS[0]
        others = [v for v in VIEWS if v != last]
        if not every_view_due(self._misses, self.probe_frames):
            return (last, others[self._misses % len(others)])
        return (last, *others)

    def _look(
        self, grey: np.ndarray, view: View, near: Sequence[Box] = (), trusted: Sequence[Box] = ()
    ) -> tuple[np.ndarray, list[Box]]:
        """Verified faces through `view`, as (k, 5) boxes in the frame's coordinates, and as boxes
        in the view's pixels. `near`: the last frame's faces through this view: only faces of about
        their sizes are looked for (`TRACK_SIZES`; none: every size); `trusted`: faces a candidate
        may overlap to be taken without verification."""
        h, w = grey.shape
        width, height = w * view.sx, h * view.sy
        scale = min(1.0, view.closer * self.max_side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        if view.equalize:
            image = cv2.equalizeHist(image)
        inverse = None
        if view.angle:
            turn = cv2.getRotationMatrix2D((size[0] / 2, size[1] / 2), view.angle, 1.0)
            image = cv2.warpAffine(image, turn, size, borderMode=cv2.BORDER_REPLICATE)
            inverse = cv2.invertAffineTransform(turn)
        sizes = None
        if near:
            sides = [x2 - x1 for x1, _, x2, _ in near]
            sizes = (int(min(sides) * TRACK_SIZES[0]), int(max(sides) * TRACK_SIZES[1]) + 1)
        boxes, faces = [], []
        for x1, y1, x2, y2, score in self._verified(image, sizes, trusted):
            faces.append((x1, y1, x2, y2))
            if inverse is not None:
                # the turned box's centre, back in the squeezed frame, its sides kept: the box
                # around its turned corners was up to 1.3x the face (at 24 degrees), so the face
                # came out small in the model's crop, and the box pulsed as views changed
                cx, cy = np.array([(x1 + x2) / 2, (y1 + y2) / 2, 1.0]) @ inverse.T
                half_w, half_h = (x2 - x1) / 2, (y2 - y1) / 2
                x1, y1, x2, y2 = cx - half_w, cy - half_h, cx + half_w, cy + half_h
            boxes.append(
                [x1 / (view.sx * scale), y1 / (view.sy * scale), x2 / (view.sx * scale), y2 / (view.sy * scale), score]
            )
        return np.asarray(boxes, np.float32).reshape(-1, 5), faces

    def _verified(
        self, image: np.ndarray, sizes: tuple[int, int] | None = None, trusted: Sequence[Box] = ()
    ) -> list[tuple[float, float, float, float, float]]:
        """The main cascade's candidates (sides within `sizes`, when given) that the second
        cascade and the eye check confirm, or that overlap a `trusted` face, as (x1, y1, x2, y2,
        score) in the image's pixels."""
        ih, iw = image.shape
        side = max(20, int(self.min_face_fraction * min(ih, iw)))
        largest = (0, 0)  # no limit
        if sizes is not None:
            side, largest = max(side, sizes[0]), (sizes[1], sizes[1])
        boxes, _, weights = self._find.detectMultiScale3(
            image, scaleFactor=1.1, minNeighbors=5, minSize=(side, side), maxSize=largest, outputRejectLevels=True
        )
        faces = []
        for (x, y, w, h), weight in zip(boxes, np.asarray(weights).reshape(-1), strict=True):
            if any(_iou((x, y, x + w, y + h), face) > SAME_FACE_IOU for face in trusted):
                faces.append((float(x), float(y), float(x + w), float(y + h), float(weight)))
                continue
            m = w // 2
            ax, ay = max(0, x - m), max(0, y - m)
            around = image[ay : min(ih, y + h + m), ax : min(iw, x + w + m)]
            second = self._confirm.detectMultiScale(
                around,
                scaleFactor=1.1,
                minNeighbors=3,
                minSize=(int(w * 0.6), int(h * 0.6)),
                maxSize=(int(w * 1.6), int(h * 1.6)),
            )
            if not any(
                _iou((x, y, x + w, y + h), (ax + a, ay + b, ax + a + c, ay + b + d)) > 0.3 for a, b, c, d in second
            ):
                continue
            # two eyes in the upper half, looked for at a size the eye cascade sees well
            zoom = max(1.0, EYE_CHECK_WIDTH / w)
            upper = image[y : y + h // 2, x : x + w]
            if zoom > 1.0:
                upper = cv2.resize(upper, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)
            eye, widest = max(4, int(w * zoom) // 10), int(w * zoom) // 2
            eyes = self._eyes.detectMultiScale(upper, 1.1, 3, minSize=(eye, eye), maxSize=(widest, widest))
            if not _two_eyes(eyes, int(w * zoom)):
                continue
            faces.append((float(x), float(y), float(x + w), float(y + h), float(weight)))
        return faces


def every_view_due(misses: int, probe_frames: int) -> bool:
    """Whether the frame after `misses` examined frames in a row without a face is looked at through
    every view: each of the first `probe_frames`, then the REPROBE-th after them, then the one
    twice as far on, and so on, the wait doubling up to REPROBE_MAX frames."""
    if misses < probe_frames:
        return True
    due, wait = probe_frames - 1 + REPROBE, REPROBE
    while due < misses:
        wait = min(2 * wait, REPROBE_MAX)
        due += wait
    return due == misses


def _cascade(name: str) -> cv2.CascadeClassifier:
    # cv2.data is a plain module of the wheel that OpenCV's type stubs leave out
    path = os.path.join(cv2.data.haarcascades, f"{name}.xml")  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV's Haar cascade is missing ({path}); opencv-python-headless>=4.10,<5 ships it")
    return cascade


def _two_eyes(eyes: Sequence[Sequence[int]] | np.ndarray, face_width: int) -> bool:
    """Two eyes side by side: two detections whose centres lie at least a fifth of the face's
    width apart across (blurred noise shows an "eye" now and then, seldom a pair)."""
    centres = sorted(x + w / 2 for x, _, w, _ in np.asarray(eyes).reshape(-1, 4))
    return len(centres) >= 2 and centres[-1] - centres[0] >= face_width / 5


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return float(iou(np.array([a], np.float64), np.array([b], np.float64))[0])
