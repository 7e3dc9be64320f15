"""x264 settings side by side on talking-head frames: the product's default (`EncoderConfig`)
against x264's own presets, on one thread as an actor's encoder runs on a GPU node.

    python -m benchmarks.bench_encoder [--heights 720 1080] [--frames 75]

The frames are the benchmarks' presenter (`heygem_ray.demo.Stage`, head motion on a grey ramp),
clean and with camera noise (a fresh Gaussian field each frame, sigma 2: the grain a real sensor
adds, which x264 cannot predict from the last frame). Prints, per setting, the CPU milliseconds a
frame, the bytes a frame and the luma PSNR against the frames encoded (CRF 18 for all).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence

import av
import numpy as np

from heygem_ray import demo
from heygem_ray.config import EncoderConfig
from heygem_ray.media.yuv import bgr_to_i420

FPS = 25
CRF = 18
#: the settings compared, the default first
SETTINGS = ("default", "veryfast", "superfast")


def x264_options(name: str) -> dict[str, str]:
    """x264's options for a setting: "default" is EncoderConfig's preset and x264_params (read at
    run time, so the figure follows the code); any other name is an x264 preset as x264 defines it."""
    if name != "default":
        return {"preset": name}
    enc = EncoderConfig()
    return {"preset": enc.preset} | ({"x264-params": enc.x264_params} if enc.x264_params else {})


def presenter_frames(height: int, count: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    """I420 frames of the presenter moving, with `noise` sigma of fresh grain per frame."""
    stage = demo.Stage.of_height(height)
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        bgr = stage.frame(i / FPS)
        if noise:
            bgr = np.clip(bgr + rng.normal(0.0, noise, bgr.shape), 0, 255).astype(np.uint8)
        frames.append(bgr_to_i420(bgr))
    return frames


def encode(frames: list[np.ndarray], options: dict[str, str], path: str) -> float:
    """Encode on one thread; returns the CPU seconds it took."""
    rows, width = frames[0].shape
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"crf": str(CRF), "threads": "1"} | options)
        stream.width, stream.height, stream.pix_fmt = width, rows * 2 // 3, "yuv420p"
        start = time.process_time()
        for i, plane in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        return time.process_time() - start


def luma_psnr(path: str, frames: list[np.ndarray]) -> float:
    height = frames[0].shape[0] * 2 // 3
    errors = []
    with av.open(path) as container:
        for decoded, source in zip(container.decode(video=0), frames):
            diff = decoded.to_ndarray(format="yuv420p")[:height].astype(np.float32) - source[:height]
            errors.append(float(np.mean(diff * diff)))
    return float(10 * np.log10(255.0**2 / max(np.mean(errors), 1e-9)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heights", type=int, nargs="+", default=[720, 1080])
    parser.add_argument("--frames", type=int, default=75)
    args = parser.parse_args(argv)
    enc = EncoderConfig()
    print(f"default = preset {enc.preset}, x264_params {enc.x264_params or '(none)'}; CRF {CRF}, one thread\n")
    print("| frames | setting | CPU ms/frame | KiB/frame | PSNR-Y dB | CPU vs veryfast | bytes vs veryfast |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="heygem-bench-encoder-") as tmp:
        for height in args.heights:
            for noise in (0.0, 2.0):
                frames = presenter_frames(height, args.frames, noise)
                figures = {}
                for name in SETTINGS:
                    path = os.path.join(tmp, f"{name}.mp4")
                    cpu = encode(frames, x264_options(name), path)
                    kib = os.path.getsize(path) / 1024 / len(frames)
                    figures[name] = (cpu * 1000 / len(frames), kib, luma_psnr(path, frames))
                base_ms, base_kib, _ = figures["veryfast"]
                for name, (ms, kib, psnr) in figures.items():
                    print(
                        f"| {height}p {'camera noise' if noise else 'clean'} | {name} | {ms:.1f} | {kib:.1f} | "
                        f"{psnr:.2f} | {ms / base_ms:.2f}× | {kib / base_kib:.2f}× |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
