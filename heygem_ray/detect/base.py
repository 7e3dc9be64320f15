"""The face-detector interface. A detector finds candidate faces per frame; turning candidates
into one smoothed box per frame (same person followed, gaps filled, pads) is `track.py`'s job and
is the same for every detector."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class FaceDetector(Protocol):
    #: frames per detect() call the caller should batch
    batch_size: int

    def detect(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """For each BGR uint8 frame, a float array (k, 5) of x1, y1, x2, y2, score (k may be 0).
        Frames come in order; a detector may follow its face from one call to the next."""
        ...

    def reset(self) -> None:
        """Forget what earlier frames showed: an avatar is detected in chunks, each from a reset, so
        a chunk's candidates are the same whichever chunks were detected before it."""
        ...
