"""Measurement `rss` of `python -m benchmarks.run`: a renderer actor's peak RSS (VmHWM from /proc, read
while the actor is alive) for short vs long audio, same avatar and config."""

from __future__ import annotations

import os

from benchmarks.pipeline.common import (
    RSS_HEADERS,
    Context,
    config,
    f1,
    mib,
    rate,
    ray_session,
    rss_columns,
    run_campaign,
    table,
)


def bench_rss(ctx: Context) -> None:
    args = ctx.args
    avatar = ctx.inputs.small_avatar(args.rss_width, 10.0)
    results = []
    rows = []
    for minutes, seed in ((args.short_audio_minutes, 31), (args.long_audio_minutes, 32)):
        audio = ctx.inputs.audio(60.0 * minutes, seed=seed)
        work = ctx.dir(f"rss-{minutes:g}")
        ray_session(args.session_cpus or 2, fresh=not args.quick)  # fresh actor processes, nothing before them
        manifest = ctx.inputs.manifest(f"rss-{minutes:g}", [audio], avatar)
        cfg = config(manifest, os.path.join(work, "out"), "cluster.actors=1")
        summary, wall, sampler, _ = run_campaign(cfg)
        result = summary.rows[0]
        peak = sampler.peak_hwm("RenderWorker")
        results.append(peak)
        rows.append(
            [
                f"{minutes:g} min",
                result.frames,
                result.segments,
                f"{wall:,.1f}",
                f1(rate(result.frames, wall)),
                mib(peak),
                sampler.timeline(),
                *rss_columns(sampler),
            ]
        )
    ratio = results[1] / results[0] if all(results) else float("nan")
    ctx.report.targets["rss"] = (results[0], results[1], ratio, args.short_audio_minutes, args.long_audio_minutes)
    cfg = config("m", "o")
    title = (
        f"3. Renderer actor peak RSS, {args.short_audio_minutes:g} min vs {args.long_audio_minutes:g} min of "
        f"audio (classic, {args.rss_width} px wide avatar, 1 actor)"
    )
    notes = (
        f"actor VmHWM: the actor process's peak resident set (the kernel's high-water mark in /proc/<pid>/status, "
        "which only grows; polled every 0.2 s until the actor is killed at the end of the campaign, so it covers "
        "model load, every segment and idle time). Each campaign runs on a fresh local Ray, so the actor process "
        'is new. The other columns are peaks of VmRSS sampled every 0.2 s; "by quarter" is the actor\'s highest '
        "VmRSS in each quarter of the time it was alive (flat = bounded, rising = grows with length). Segments of "
        f"{cfg.render.segment_seconds:g} s, renderer batch {cfg.renderer.batch_size}. Target ≤ 1.2×: "
        f"**{ratio:.3f}×** ({mib(results[1])} vs {mib(results[0])} MiB)."
    )
    ctx.report.emit(
        title,
        table(
            [
                "audio",
                "frames",
                "segments",
                "wall s",
                "frames/s",
                "actor VmHWM MiB",
                "actor VmRSS by quarter of the run, MiB",
                *[f"sampled {h}" for h in RSS_HEADERS],
            ],
            rows,
            right=range(1, 12),
        ),
        notes,
    )
