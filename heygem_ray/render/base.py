"""The renderer interface: avatar frames + per-frame audio features + face boxes in, frames out.

A renderer is built once per actor (model loaded there) and then called segment after segment.
The actor gives it the segment's audio as an `AudioWindow` (`heygem_ray.media.audio`: 16 kHz
mono float32 with context on both sides) and asks for one feature row per output frame; then it hands over frames in batches.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np

from heygem_ray.media.audio import AudioWindow


class Renderer(Protocol):
    #: frames per render() call the renderer wants (the actor batches decode to this size)
    batch_size: int

    def features(self, audio: AudioWindow, frames: np.ndarray, fps: float) -> np.ndarray:
        """One feature row per output frame number in `frames` (int array), shape (len(frames), ...).

        The window holds at least AUDIO_CONTEXT_SECONDS of audio either side of the frames' span,
        clipped to the row's audio.
        """
        ...

    def render(
        self,
        frames: list[np.ndarray],
        boxes: np.ndarray,
        features: np.ndarray,
        sources: Sequence[Hashable] | None = None,
    ) -> list[np.ndarray]:
        """Re-render the mouth in each frame.

        frames:   BGR uint8 (H, W, 3) images (the renderer may modify them in place and return them).
        boxes:    int (n, 4) face boxes x1, y1, x2, y2 in pixel coordinates (already padded).
        features: (n, ...) rows from `features()` for these frames.
        sources:  optional (n,) hashable ids of the frames' pixels, as handed over: two frames with
                  equal ids must have identical pixels (e.g. (avatar uri, avatar frame index) for
                  whole frames; a crop of a frame needs its crop origin and size in the id too). A
                  renderer may then reuse work that depends only on the pixels (Wav2Lip keeps face
                  encoder features per id and box, across calls); renderers that reuse nothing
                  ignore it. None: every frame is new.
        Pixels outside the face box must be returned unchanged.
        """
        ...
