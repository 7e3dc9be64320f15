"""Measurement `second` of `python -m benchmarks.run`: prepare_avatar seconds in a first and a second
campaign over the same avatar (shared cache)."""

from __future__ import annotations

import os

from benchmarks.pipeline.common import Context, config, f1, f2, rate, ray_session, run_campaign, table


def bench_second(ctx: Context) -> None:
    args = ctx.args
    height = args.avatar_height[0]
    avatar, _ = ctx.inputs.stage_avatar(height, args.avatar_seconds)
    audio = ctx.inputs.audio(args.second_audio_seconds, seed=41)
    work = ctx.dir("second")
    cache = os.path.join(work, "cache")
    ray_session(args.session_cpus or 2)
    manifest = ctx.inputs.manifest("second", [audio], avatar)
    rows, detect = [], []
    for name in ("first", "second"):
        cfg = config(manifest, os.path.join(work, f"out-{name}"), f"cache={cache}", "cluster.actors=1")
        summary, wall, _, job = run_campaign(cfg, timed=True)
        seconds = job.avatar_seconds[0] if job is not None and job.avatar_seconds else float("nan")
        detect.append(seconds)
        frames = summary.rows[0].frames
        rows.append(
            [
                f"{name} campaign",
                "empty" if name == "first" else "shared with the first",
                f"{seconds:,.3f}",
                f"{wall:,.1f}",
                frames,
                f1(rate(frames, wall)),
            ]
        )
        del job
    ctx.report.targets["second"] = tuple(detect)
    title = f"4. A second campaign over an already-seen avatar ({height}p, {args.avatar_seconds:g} s clip, haar)"
    notes = (
        "prepare_avatar s: the campaign's avatar task (content fingerprint, probe, decode + detect + track, or the "
        "cached track), timed inside the task. Outputs differ, the cache (`cache=`) is shared, so the second "
        f"campaign renders again but detects nothing: **{f2(detect[0])} s → {f2(detect[1])} s**."
    )
    ctx.report.emit(
        title,
        table(["run", "cache", "prepare_avatar s", "campaign wall s", "frames", "frames/s"], rows, right=(2, 3, 4, 5)),
        notes,
    )
