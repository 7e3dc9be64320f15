"""Measurement `stages` of `python -m benchmarks.run`: per-stage seconds and frames/s on a generated 16:9
avatar (decode, detect, audio, the actor's segment path with its own stage clock, Wav2Lip generator vs
crop+paste, stitch, upload) and a whole campaign on a local Ray with sampled peak RSS."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from benchmarks.pipeline.common import (
    RSS_HEADERS,
    SESSION,
    Context,
    config,
    f1,
    in_process,
    mib,
    rate,
    ray_session,
    render_segments,
    rss_columns,
    run_campaign,
    segment_jobs,
    table,
)
from heygem_ray import storage
from heygem_ray.prepare import prepare_audio, prepare_avatar


def bench_stages(ctx: Context, height: int) -> None:
    from heygem_ray.media.audio import AudioWindow
    from heygem_ray.media.mux import encode_audio, stitch
    from heygem_ray.media.video import iter_frames, probe
    from heygem_ray.render.wav2lip import Wav2LipRenderer
    from heygem_ray.segment import RenderWorker

    args = ctx.args
    avatar, made = ctx.inputs.stage_avatar(height, args.avatar_seconds)
    audio = ctx.inputs.audio(args.audio_seconds, seed=11)
    work = ctx.dir(f"stages-{height}")
    cache = os.path.join(work, "cache")
    cfg = in_process(config(os.path.join(work, "unused.parquet"), os.path.join(work, "out"), f"cache={cache}"))
    info = probe(avatar, cfg.render.still_fps)
    rows: list[list[Any]] = []

    def row(stage: str, what: str, frames: int | None, seconds: float) -> None:
        fps = rate(frames, seconds) if frames else None
        ms = 1000 * seconds / frames if frames else None
        rows.append([stage, what, frames if frames else "—", f"{seconds:,.3f}", f1(fps), f1(ms)])

    start, count = time.perf_counter(), 0
    for _ in iter_frames(avatar, info):
        count += 1
    row("decode", "iter_frames, full pass (PyAV, threads auto)", count, time.perf_counter() - start)

    start = time.perf_counter()
    track = prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)
    row(
        "detect",
        "prepare_avatar, detector=haar: fingerprint, probe, decode, detect, track",
        track.frames,
        time.perf_counter() - start,
    )
    start = time.perf_counter()
    prepare_avatar(avatar, None, cfg.detector, cache, cfg.render.still_fps)
    row("detect (cached)", "prepare_avatar again: cached track", None, time.perf_counter() - start)

    start = time.perf_counter()
    pcm = prepare_audio(audio, cache)
    row("audio", f"prepare_audio: {pcm.seconds:g} s wav to the 16 kHz PCM cache", None, time.perf_counter() - start)

    # the actor's own segment path, in this process: its stage clock splits decode/render/encode/upload
    worker = RenderWorker(cfg)
    frames = min(track.frames, math.ceil(pcm.seconds * info.fps - 1e-6))
    jobs = segment_jobs(cfg, track, pcm, os.path.join(work, "segments"), frames)
    wall, seconds, done = render_segments(worker, jobs)
    threads = worker.threads
    batch = cfg.renderer.batch_size
    row("audio features", "classic renderer.features (per segment window)", done, seconds.get("audio", 0.0))
    row("decode", f"FrameReader.read, batches of {batch} (in render_segment)", done, seconds.get("decode", 0.0))
    row(
        "render + paste",
        f"classic renderer.render, batches of {batch}; draws in place (paste inside)",
        done,
        seconds.get("render", 0.0),
    )
    row(
        "encode",
        f"SegmentWriter, {cfg.encoder.codec} {cfg.encoder.preset} crf {cfg.encoder.crf}, {threads} thread(s)",
        done,
        seconds.get("encode", 0.0),
    )
    row("upload (segment)", "storage.publish_file of each segment file (local)", None, seconds.get("upload", 0.0))
    row(
        "segment total",
        f"RenderWorker.render_segment, {len(jobs)} segment(s), {threads} thread(s); decode and "
        "encode overlap render on helper threads",
        done,
        wall,
    )

    # Wav2Lip at this resolution: generator vs the separable pixel work (crop+resize in, resize+paste out)
    n = min(args.wav2lip_stage_frames, track.frames)
    w2l = Wav2LipRenderer(ctx.inputs.checkpoint(), batch_size=n, device=args.device)
    gen = [0.0]
    generate = w2l._generate_cpu

    def timed_generate(*args: Any) -> np.ndarray:
        t = time.perf_counter()
        try:
            return generate(*args)
        finally:
            gen[0] += time.perf_counter() - t

    w2l._generate_cpu = timed_generate  # type: ignore[method-assign]
    frames_in = []
    for _, frame in iter_frames(avatar, info):
        frames_in.append(frame)
        if len(frames_in) == n:
            break
    from heygem_ray.prepare import read_pcm

    window = AudioWindow(read_pcm(pcm.pcm_uri, 0, pcm.samples), 0, pcm.samples, pcm.level)
    feats = w2l.features(window, np.arange(n), info.fps)
    w2l.render([f.copy() for f in frames_in[:2]], track.boxes[:2], feats[:2])  # warm-up
    gen[0] = 0.0
    start = time.perf_counter()
    w2l.render(frames_in, track.boxes[:n], feats)
    total = time.perf_counter() - start
    import torch

    row(
        "wav2lip render",
        f"Wav2LipRenderer.render, batch {n}, {w2l.device}, {torch.get_num_threads()} thread(s)",
        n,
        total,
    )
    row("  generator", "the network forward (Wav2LipRenderer._generate)", n, gen[0])
    row("  crop + paste", "crop + resize to 96², resize back + feather paste (render − generator)", n, total - gen[0])
    del frames_in

    # stitch: the rendered segments repeated to cover the whole audio, joined with AAC audio
    seg_files = [job.out_uri for job in jobs]
    need = math.ceil(pcm.seconds * info.fps - 1e-6)
    count = max(1, math.ceil(need / max(1, frames)) * len(seg_files))
    audio_track = os.path.join(work, "audio.m4a")
    start = time.perf_counter()
    encoded = encode_audio(
        audio, audio_track, cfg.encoder.audio_codec, cfg.encoder.audio_bitrate, cfg.encoder.audio_sample_rate
    )
    row(
        "audio track",
        f"mux.encode_audio: {encoded / cfg.encoder.audio_sample_rate:.0f} s to AAC (once per narration, while it renders)",
        None,
        time.perf_counter() - start,
    )
    stitched = os.path.join(work, "stitched.mp4")
    start = time.perf_counter()
    stats = stitch(
        lambda i: open(seg_files[i % len(seg_files)], "rb"),  # noqa: SIM115 - stitch closes each file it opens
        count,
        audio_track,
        stitched,
        info.fps_fraction,
    )
    row(
        "stitch",
        f"mux.stitch: {count} segment files + the audio track joined (packet copy)",
        stats.frames,
        time.perf_counter() - start,
    )
    size = os.path.getsize(stitched)
    start = time.perf_counter()
    storage.publish_file(stitched, os.path.join(work, "published", "row.mp4"))
    up = time.perf_counter() - start
    row(
        "upload",
        f"storage.publish_file, local: {size / 1e6:.1f} MB at {size / 1e6 / max(up, 1e-9):,.0f} MB/s",
        None,
        up,
    )

    # the whole product path: campaign.run on a local Ray (cold cache: prepares and detects again)
    ray_session(ctx.args.session_cpus or 2)
    manifest = ctx.inputs.manifest(f"stages-{height}", [audio], avatar)
    cfg_run = config(manifest, os.path.join(work, "campaign"))
    from heygem_ray.executors.ray_cluster import actor_count

    actors = actor_count(cfg_run)
    summary, wall, sampler, _ = run_campaign(cfg_run)
    result = summary.rows[0]
    row(
        "end to end",
        f"campaign.run, local Ray ({SESSION['cpus']} CPUs, {actors} actor(s)), cold cache",
        result.frames,
        wall,
    )
    realtime = result.audio_seconds / wall
    ctx.report.targets.setdefault("realtime", []).append((height, realtime, rate(result.frames, wall)))

    title = (
        f"1. Stages, {info.width}×{info.height} avatar ({track.frames} frames, {args.avatar_seconds:g} s), "
        f"{pcm.seconds:g} s audio"
    )
    notes = (
        f"End to end: {result.frames} frames for {result.audio_seconds:.1f} s of audio in {wall:.1f} s = "
        f"**{realtime:.2f}× realtime** (audio s / wall s), {rate(result.frames, wall):.1f} frames/s; wall time "
        "includes actor start, audio decode, face detection, rendering and stitch, not Ray's own start. "
        f"Avatar generation ({made:.1f} s) is not counted. Stage rows run in this process, one after another "
        f"(the segment path with {threads} thread(s), as a default actor; its decode, render and encode seconds come "
        "from the actor's own stage clock and overlap, so they add up to more than the segment total).\n\n"
        "Peak memory during the campaign (MiB): the actor's VmHWM (kernel peak) and VmRSS sampled every 0.2 s "
        "per role (the actor class or task name in the process title):\n\n"
        + table(
            ["actor VmHWM MiB", *[f"sampled {h}" for h in RSS_HEADERS]],
            [[mib(sampler.peak_hwm()), *rss_columns(sampler)]],
            right=range(6),
        )
    )
    ctx.report.emit(
        title,
        table(["stage", "what runs", "frames", "seconds", "frames/s", "ms/frame"], rows, right=(2, 3, 4, 5)),
        notes,
    )
