"""The default face detector (OpenCV's cascades, `detector=haar`) on a labelled set made here: the
demo portrait as a presenter would film it (720p and 4K, stretched by a wrong display aspect,
dark, small in a 4K frame, a head turned a little) and frames with no face at all (blurred noise
of several grains, textures, an empty room, a cartoon background).

    python -m benchmarks.bench_detect

Prints, per image, whether a face was found, through which view and how long it took; then the
detection rate on the faces and the false-positive rate on the rest. The tests run the same set
(tests/test_detect.py): every face found, no false positive.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from heygem_ray import demo


def labelled_set() -> list[tuple[str, np.ndarray, bool]]:
    """(name, BGR frame, has a face) for every case of the set."""
    face = demo.Stage.of_height(720).frame()
    h, w = face.shape[:2]

    def turned(angle: float) -> np.ndarray:
        return cv2.warpAffine(
            face, cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0), (w, h), borderMode=cv2.BORDER_REPLICATE
        )

    small = cv2.resize(face, (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA)
    faces = {
        "720p": face,
        "4K": cv2.resize(face, (3840, 2160), interpolation=cv2.INTER_CUBIC),
        "stretched 2x across": cv2.resize(face, (2 * w, h)),
        "4K stretched 1.5x across": cv2.resize(face, (3840, 1440)),
        "stretched 1.8x along": cv2.resize(face, (w, round(1.8 * h))),
        "dark (25 %)": (face * 0.25).astype(np.uint8),
        "very dark (12 %)": (face * 0.12).astype(np.uint8),
        "small in a 4K frame": cv2.copyMakeBorder(
            small,
            (2160 - small.shape[0]) // 2,
            (2160 - small.shape[0] + 1) // 2,
            (3840 - small.shape[1]) // 2,
            (3840 - small.shape[1] + 1) // 2,
            cv2.BORDER_CONSTANT,
            value=(40, 40, 40),
        ),
        "turned 10 degrees": turned(10),
        "turned -18 degrees": turned(-18),
    }
    rng = np.random.default_rng(0)
    others: dict[str, np.ndarray] = {}
    for grain in (3, 9, 21, 45):
        noise = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        others[f"noise blurred {grain}px"] = cv2.GaussianBlur(noise, (grain, grain), 0)
    coarse = (rng.random((h // 20, w // 20, 3)) * 255).astype(np.uint8)
    others["coarse noise"] = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    rows, cols = np.indices((h, w))
    others["checkerboard"] = np.repeat((((rows // 40 + cols // 40) % 2) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    others["stripes"] = np.repeat(
        ((np.sin((rows + cols) / 7) * 0.5 + 0.5) * 255).astype(np.uint8)[:, :, None], 3, axis=2
    )
    room = np.zeros((h, w, 3), np.uint8)
    room[:] = np.linspace(90, 200, w)[None, :, None]
    cv2.rectangle(room, (100, 400), (500, 700), (60, 80, 120), -1)
    cv2.rectangle(room, (800, 150), (1100, 450), (200, 210, 220), -1)
    cv2.line(room, (0, 380), (w, 380), (50, 50, 50), 4)
    others["empty room"] = room
    cartoon = np.full((h, w, 3), (230, 200, 120), np.uint8)
    cv2.circle(cartoon, (300, 200), 90, (40, 200, 250), -1)
    cv2.rectangle(cartoon, (0, 560), (w, h), (60, 170, 60), -1)
    cv2.ellipse(cartoon, (900, 300), (200, 80), 0, 0, 360, (250, 250, 250), -1)
    others["cartoon background"] = cartoon
    return [(n, f, True) for n, f in faces.items()] + [(n, f, False) for n, f in others.items()]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.bench_detect", description=__doc__.splitlines()[0]).parse_args(
        argv
    )
    from heygem_ray.detect.haar import HaarDetector

    cases = labelled_set()
    print("| image | face? | found | view | ms |\n|---|---|---|---|---:|")
    hits = misses = false = 0
    for name, frame, has_face in cases:
        detector = HaarDetector()  # a fresh one per image, as per avatar
        started = time.perf_counter()
        found = len(detector.detect([frame])[0]) > 0
        ms = (time.perf_counter() - started) * 1000
        view = detector.view.name if detector.view else "-"
        print(f"| {name} | {'yes' if has_face else 'no'} | {'yes' if found else 'no'} | {view} | {ms:.0f} |")
        if has_face:
            hits += found
            misses += not found
        else:
            false += found
    faces = hits + misses
    others = len(cases) - faces
    print(f"\nDetection rate: {hits}/{faces} faces found; false positives: {false}/{others} face-less images.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
