"""The baseline a campaign is measured against: one video rendered the way the official Wav2Lip
`inference.py` does it, as its own process (run once per video, model loaded every time).

    python -m benchmarks.naive_row --checkpoint C --audio A --avatar V --box x1 y1 x2 y2 --out O.mp4
                                   [--batch 1] [--fps 25]

Steps, as the official script: load the generator (fp32, torch's default threads: every core),
compute the mel windows of the whole audio, then for each output frame crop the (fixed) face box,
run the generator, paste the face back, and encode; last, mux the audio. `--batch 1` is the naive
frame-by-frame loop (the target's baseline); `--batch 128` is the official batch size (frames held
in memory per batch, as the official script holds the whole video). Encoding uses the campaign's
default x264 settings and the audio mux is the product's, so the difference measured is in how the
work is organised, not in codecs. Prints the seconds of each step as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_row", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--audio", required=True)
    p.add_argument("--avatar", required=True, help="a video or a still image")
    p.add_argument("--box", type=int, nargs=4, required=True, metavar=("X1", "Y1", "X2", "Y2"))
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fps", type=float, default=25.0, help="frames per second for a still avatar")
    args = p.parse_args(argv)

    import numpy as np

    from heygem_ray.config import EncoderConfig
    from heygem_ray.media.audio import AudioWindow, iter_pcm16k
    from heygem_ray.media.mux import encode_audio, stitch
    from heygem_ray.media.video import SegmentWriter, iter_frames, probe
    from heygem_ray.plan import avatar_frame_indices, output_frame_count
    from heygem_ray.render.wav2lip import Wav2LipRenderer

    steps: dict[str, float] = {}
    t = time.perf_counter()
    renderer = Wav2LipRenderer(
        args.checkpoint, batch_size=args.batch, precision="fp32", device="cpu", image_ops="cpu", face_cache_mb=0
    )
    steps["model load"] = time.perf_counter() - t

    t = time.perf_counter()
    samples = np.concatenate(list(iter_pcm16k(args.audio)))
    info = probe(args.avatar, args.fps)
    n = output_frame_count(len(samples) / 16_000, info.fps)
    mels = renderer.features(AudioWindow(samples, 0, len(samples), 1.0), np.arange(n), info.fps)
    steps["audio"] = time.perf_counter() - t

    # the official script reads every avatar frame up front; a still is one frame
    t = time.perf_counter()
    avatar = [frame for _, frame in iter_frames(args.avatar, info)]
    shown = avatar_frame_indices(np.arange(n), len(avatar), info.still)
    steps["decode"] = time.perf_counter() - t

    enc = EncoderConfig()
    boxes = np.asarray([args.box], np.int64)
    render = encode = 0.0
    with tempfile.TemporaryDirectory(prefix="heygem-naive-") as tmp:
        video = os.path.join(tmp, "video.mp4")
        writer = SegmentWriter(
            video, info.width, info.height, info.fps_fraction, "libx264", enc, threads=os.cpu_count() or 1
        )
        for lo in range(0, n, args.batch):
            hi = min(n, lo + args.batch)
            t = time.perf_counter()
            frames = renderer.render(
                [avatar[i].copy() for i in shown[lo:hi]], np.repeat(boxes, hi - lo, 0), mels[lo:hi]
            )
            render += time.perf_counter() - t
            t = time.perf_counter()
            for frame in frames:
                writer.write(frame)
            encode += time.perf_counter() - t
        t = time.perf_counter()
        writer.close()
        encode += time.perf_counter() - t
        steps.update(render=render, encode=encode)
        t = time.perf_counter()
        track = os.path.join(tmp, "audio.m4a")
        encode_audio(args.audio, track, enc.audio_codec, enc.audio_bitrate, enc.audio_sample_rate)
        stitch(
            lambda _: open(video, "rb"),  # noqa: SIM115 - stitch closes each file it opens
            1,
            track,
            args.out,
            info.fps_fraction,
        )
        steps["mux"] = time.perf_counter() - t
    steps["in process"] = time.perf_counter() - started
    print(json.dumps({"frames": n, "steps": steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
