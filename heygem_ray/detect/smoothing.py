"""The official Wav2Lip temporal box smoothing (WAV2LIP_SPEC.md §4.4), reproduced quirk for quirk
so tracks match the official renderer frame for frame."""

from __future__ import annotations

import numpy as np

#: window length of the official smoothing
WINDOW = 5


def smooth_boxes_official(boxes: np.ndarray) -> np.ndarray:
    """Smooth (n, 4) int64 boxes x1, y1, x2, y2 the way the official inference.py does.

    Row i becomes the mean of rows i … i+4 (a forward window). Near the end (i + 5 > n) the
    window is the last five rows instead, some of which were already overwritten: the official
    loop works in place, and so does this one on its private copy. Means are truncated toward
    zero when stored back into the int64 array. For n < 5 the official "last five rows" slice
    starts at the negative index n − 5, i.e. at row max(0, 2n − 5), so it covers only the last
    min(n, 5 − n) rows: n = 4 makes every box the last box, n = 3 averages the last
    two, n ≤ 2 averages all.

    Returns a new int64 array; `boxes` is not modified.
    """
    out = np.array(boxes, dtype=np.int64, copy=True)
    if out.ndim != 2 or out.shape[1] != 4:
        raise ValueError(f"expected (n, 4) boxes, got shape {out.shape}")
    n = len(out)
    # Python-slice semantics of the official `boxes[len(boxes) - T:]`, written out.
    tail_start = n - WINDOW if n >= WINDOW else max(0, 2 * n - WINDOW)
    for i in range(n):
        window = out[i : i + WINDOW] if i + WINDOW <= n else out[tail_start:]
        out[i] = np.trunc(window.mean(axis=0))
    return out
