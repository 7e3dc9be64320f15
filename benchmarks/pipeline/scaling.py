"""Measurement `scaling` of `python -m benchmarks.run`: campaign throughput with 1, 2 and 4 classic actors
on a local Ray, unpinned and pinned, with where the machine's CPU time went."""

from __future__ import annotations

import os

from benchmarks.pipeline.common import (
    CPU_PARTS,
    Context,
    CpuSampler,
    config,
    f1,
    f2,
    rate,
    ray_session,
    run_campaign,
    table,
)
from heygem_ray.prepare import prepare_audio, prepare_avatar


def bench_scaling(ctx: Context) -> None:
    args = ctx.args
    height = args.avatar_height[0]
    avatar, _ = ctx.inputs.stage_avatar(height, args.avatar_seconds)
    audios = [ctx.inputs.audio(args.scaling_audio_seconds, seed=50 + i) for i in range(args.scaling_rows)]
    work = ctx.dir("scaling")
    cache = os.path.join(work, "cache")
    counts = sorted(set(args.scaling_actors))
    ray_session(args.session_cpus or max(counts) + 1)
    manifest = ctx.inputs.manifest("scaling", audios, avatar)
    base = [
        f"cache={cache}",
        "cluster.actor.num_cpus=1",
        "cluster.actor.threads=1",
        f"render.segment_seconds={args.scaling_segment_seconds}",
    ]
    warm = config(manifest, os.path.join(work, "warm"), *base)
    prepare_avatar(avatar, None, warm.detector, cache, warm.render.still_fps)  # tracks and PCM cached before timing
    for audio in audios:
        prepare_audio(audio, cache)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows, fps_by = [], {}
    for pinned in (False, True):
        series: dict[int, float] = {}
        for n in counts:
            cfg = config(
                manifest,
                os.path.join(work, f"out-{n}-{pinned}"),
                *base,
                f"cluster.actors={n}",
                f"cluster.actor.pin_cpus={str(pinned).lower()}",
            )
            summary, wall, cpu, job = run_campaign(cfg, timed=True, sampler=CpuSampler())
            job.wait_for_actors_to_exit()
            own_cores = sum(1 for info in job.workers.values() if info.cores is not None)
            frames = sum(r.frames or 0 for r in summary.rows)
            series[n] = rate(frames, wall)
            start = job.actor_start_seconds if job.actor_start_seconds is not None else float("nan")
            segments = sum(r.segments or 0 for r in summary.rows)
            rows.append(
                [
                    n,
                    "yes" if pinned else "no",
                    "yes" if n <= cores else "no",
                    len(summary.rows),
                    segments,
                    frames,
                    f"{wall:,.1f}",
                    f"{start:,.1f}",
                    f1(series[n]),
                    f1(rate(frames, wall - start)),
                    own_cores,
                    *(f2(cpu.cores(part)) for part in CPU_PARTS),
                ]
            )
        one, prev = series[counts[0]], None
        for r, n in zip(rows[-len(counts) :], counts):
            speedup = series[n] / one if one else float("nan")
            gain = "—" if prev is None else f"{(series[n] - series[prev]) / (n - prev) / one:+.2f}"
            r += [f"{speedup:.2f}×", f"{speedup / (n / counts[0]):.0%}", gain]
            prev = n
        fps_by[pinned] = series
    ctx.report.targets["scaling"] = (fps_by, cores)
    title = (
        f"5. Scaling: classic renderer, {height}p avatar, {len(audios)} rows × {args.scaling_audio_seconds:g} s, "
        f"{args.scaling_segment_seconds:g} s segments, 1 CPU + 1 thread per actor, unpinned and pinned"
    )
    notes = (
        f"Local Ray with {max(counts) + 1 if not args.session_cpus else args.session_cpus} logical CPUs so every "
        f'actor count can start and prepare/stitch tasks still run; this process may use {cores} cores ("cores '
        'allow": actors ≤ cores), so larger counts measure oversubscription, not added hardware. Unpinned, an '
        "actor's decode and encode helper threads can overlap its render on other cores, so an actor may use "
        "more than its one CPU; pinned (`cluster.actor.pin_cpus=true`), each actor owns one core and cannot, so "
        "the pinned series shows what an added actor adds while cores remain (actors beyond the cores find none "
        "free and run unpinned). Wall time is campaign.run (actor start included), avatar track and audio PCM "
        'already cached; "first actor ready s" is the part of it before any actor could render (Ray worker start, '
        'imports, renderer load), a fixed cost that longer campaigns amortise, and "frames/s after start" leaves '
        "it out. Speedup, efficiency and gain use the whole wall time. Efficiency = speedup ÷ actors; gain per added actor = extra frames/s per added actor, "
        'in units of one actor\'s frames/s (target ≥ 0.8 while cores allow). "cores: ..." columns: average cores '
        "kept busy during the run (from /proc each second) by the renderer actors, by the rest of this benchmark's "
        "process tree (driver, Ray's daemons, prepare and stitch tasks), and by everything else on the machine "
        "(kernel threads such as memory reclaim, host agents): an added actor can only use what these leave."
    )
    ctx.report.emit(
        title,
        table(
            [
                "actors",
                "pinned",
                "cores allow",
                "rows",
                "segments",
                "frames",
                "wall s",
                "first actor ready s",
                "frames/s",
                "frames/s after start",
                "actors on own cores",
                *(f"cores: {part}" for part in CPU_PARTS),
                "speedup",
                "efficiency",
                "gain per added actor",
            ],
            rows,
            right=(0, *range(3, 17)),
        ),
        notes,
    )
