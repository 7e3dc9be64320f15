"""Pipeline benchmarks (issue 6): one runner that makes its own inputs and prints markdown tables.

    python -m benchmarks.run [--only defaults stages wav2lip rss second scaling node] [--quick] [--no-append]
                             [--avatar-height 720 [1080]] [--avatar-seconds S] [--audio-seconds S]
                             [--long-audio-minutes M] ...

Measurements (each prints its table as soon as it is measured):

  defaults what a new user gets: `heygem-ray render` with default settings (Wav2Lip, a 720p still,
           fixed box, 4 rows × 12 s and one row), each whole command timed from start to exit,
           against the official flow run once per video as its own process (benchmarks.naive_row:
           the naive batch-1 loop, the target's baseline, and the official batch of 128), plus the
           CLI's start-up breakdown (driver, Ray, actor, model load, wait, first batch).
  stages   per-stage seconds and frames/s on a generated 16:9 avatar (720p/1080p): decode
           (iter_frames full pass; FrameReader batches inside the segment path), detect (haar via
           prepare_avatar, then the cached call), audio, render, encode, segment upload (the product's
           own `RenderWorker.render_segment` stage clock, in this process), Wav2Lip render split into
           generator and crop+paste, stitch (mux.stitch), upload (storage.publish_file), and a whole
           campaign through `heygem_ray.campaign.run(cfg)` on a local Ray with sampled peak RSS.
  wav2lip  Wav2Lip with a fixed box: a naive one-process loop (decode one frame, generator on that
           frame, paste, encode) vs the batched actor segment path in this process and the campaign
           on a local Ray; same frames, same recipe weights, same torch threads.
  rss      a renderer actor's peak RSS (VmHWM from /proc, read while the actor is alive) for short vs
           long audio, same avatar and config.
  second   prepare_avatar seconds in a first and a second campaign over the same avatar (shared cache).
  scaling  campaign throughput with 1, 2 and 4 classic actors on a local Ray.
  node     the one-node target: a 3-min 1080p25 avatar + 3 min of audio through Wav2Lip as one
           campaign on a local Ray holding the whole machine, face track cached beforehand; on a
           CUDA machine with the `cluster=gpu` actor shape (2 CPUs + 1/8 GPU each) and fp16. Run
           it alone on the GPU node: `python -m benchmarks.run --only node`.

Results go to stdout and, unless --no-append, to benchmarks/RESULTS.md under "## Pipeline (issue 6)"
with the date and the machine. Inputs are synthetic (heygem_ray.demo) and weights are the recipe
weights (tests/recipe_weights.py), so nothing is downloaded. Each measurement is a module of
benchmarks/pipeline/ (`bench_<name>`), with the helpers they share in benchmarks/pipeline/common.py.
"""

from __future__ import annotations

import os

# Ray reads the auth mode at import: set it before anything imports ray (as the tests do).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import argparse
import itertools
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import ray

from benchmarks.pipeline import common, defaults, node, rss, scaling, second, stages, wav2lip
from benchmarks.pipeline.common import mib, rate, table

# name (for --only) -> measurement, in the order they run; `stages` runs once per --avatar-height
MEASUREMENTS: dict[str, Callable[..., None]] = {
    "defaults": defaults.bench_defaults,
    "stages": stages.bench_stages,
    "wav2lip": wav2lip.bench_wav2lip,
    "rss": rss.bench_rss,
    "second": second.bench_second,
    "scaling": scaling.bench_scaling,
    "node": node.bench_node,
}


# --------------------------------------------------------------------------------------- targets + main
def target_summary(report: common.Report, args: argparse.Namespace) -> str:
    t = report.targets
    rows = []
    if "defaults" in t:
        one, many, count, first = t["defaults"]
        rows.append(
            [
                "CPU defaults, whole command, one row ≥ 1.5× the naive loop per video",
                f"{one:.2f}×",
                "met" if one >= 1.5 else "not met",
            ]
        )
        rows.append(
            [
                f"CPU defaults, whole command, {count} rows ≥ 3× the naive loop per video",
                f"{many:.2f}×",
                "met" if many >= 3 else "not met",
            ]
        )
        if first is not None:
            rows.append(["start-up (launch → first frames rendered), one row", f"{first:.1f} s", "see the breakdown"])
    if "wav2lip" in t:
        naive, segment, campaign_fps = t["wav2lip"]
        best = max(segment, campaign_fps) / naive
        rows.append(
            [
                "Wav2Lip fixed box ≥ 3× a naive one-process loop",
                (
                    f"{naive:.1f} → {segment:.1f} (best segment path) / {campaign_fps:.1f} (campaign, defaults) frames/s = "
                    f"{segment / naive:.2f}× / {campaign_fps / naive:.2f}×"
                ),
                "met" if best >= 3 else "not met on this machine",
            ]
        )
    if "rss" in t:
        short, long, ratio, sm, lm = t["rss"]
        rows.append(
            [
                f"actor peak RSS at {lm:g} min ≤ 1.2× at {sm:g} min",
                f"{mib(long)} vs {mib(short)} MiB = {ratio:.3f}×",
                "met" if ratio <= 1.2 else "not met",
            ]
        )
    if "second" in t:
        first, second = t["second"]
        rows.append(
            [
                "second campaign on a seen avatar detects nothing",
                f"prepare_avatar {first:.2f} s → {second:.3f} s",
                "met" if second < max(0.5, 0.1 * first) else "not met",
            ]
        )
    for height, realtime, fps in t.get("realtime", []):
        rows.append(
            [
                f"end to end, {height}p, classic (reported, no target)",
                f"{fps:.1f} frames/s, {realtime:.2f}× realtime",
                "—",
            ]
        )
    if "scaling" in t:
        fps_by, cores = t["scaling"]
        texts = []
        for pinned, series in sorted(fps_by.items()):
            texts.append(
                ("pinned " if pinned else "unpinned ") + ", ".join(f"{n}: {v:.1f}" for n, v in sorted(series.items()))
            )
        allowed = sorted(n for n in fps_by[True] if n <= cores)
        pinned = fps_by[True]
        gains = [(pinned[b] - pinned[a]) / (b - a) / pinned[allowed[0]] for a, b in itertools.pairwise(allowed)]
        if gains:
            status = f"{'met' if min(gains) >= 0.8 else 'not met'} (pinned, up to {allowed[-1]} actors)"
        else:
            status = "not measurable: only one actor count fits the cores"
        measured = "frames/s by actors: " + "; ".join(texts)
        if gains:
            measured += "; pinned gain per added actor " + ", ".join(f"{g:+.2f}" for g in gains)
        rows.append(["actors scale ≥ 0.8 per added actor while cores allow", measured, status])
    if "node" in t:
        device, frames, wall, target_s, cuda = t["node"]
        status = (
            ("met" if wall <= target_s else "not met") if cuda else "reference only: the target is for an H100 node"
        )
        measured = f"{frames} frames in {wall:,.1f} s = {rate(frames, wall):.1f} frames/s on {device}"
        rows.append([f"one node, Wav2Lip, cached track, ≤ {target_s:g} s", measured, status])
    return table(["target", "measured", "status"], rows) if rows else ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="measurements to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the runner (figures meaningless)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    p.add_argument("--results", default=str(common.RESULTS), help="markdown file to append to")
    p.add_argument("--defaults-rows", type=int, default=4, help="rows of the defaults campaign")
    p.add_argument("--defaults-audio-seconds", type=float, default=12.0, help="audio per row in `defaults`")
    p.add_argument("--defaults-height", type=int, default=720, help="height of the still in `defaults`")
    p.add_argument(
        "--defaults-official",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the official batch-128 flow per video in `defaults`",
    )
    p.add_argument(
        "--defaults-inline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time `cluster=inline` (no Ray) in `defaults`",
    )
    p.add_argument("--avatar-height", type=int, nargs="+", default=[720], help="stage avatar heights, e.g. 720 1080")
    p.add_argument("--avatar-seconds", type=float, default=10.0, help="stage avatar clip length")
    p.add_argument("--audio-seconds", type=float, default=30.0, help="stage/end-to-end audio length")
    p.add_argument("--wav2lip-width", type=int, default=256, help="avatar width for the Wav2Lip comparison")
    p.add_argument("--wav2lip-audio-seconds", type=float, default=15.0)
    p.add_argument(
        "--cpu-batch",
        type=int,
        default=8,
        help="renderer.batch_size of the int8 rows and CPU node runs (8 suits CPU caches; GPUs want 128)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add renderer.compile=true to the int8 rows (int8 stays eager and says so; for trying compile elsewhere)",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs of the naive and segment paths (best counts)"
    )
    p.add_argument("--wav2lip-stage-frames", type=int, default=32, help="frames for the Wav2Lip split in `stages`")
    p.add_argument("--short-audio-minutes", type=float, default=1.0)
    p.add_argument("--long-audio-minutes", type=float, default=10.0)
    p.add_argument("--rss-width", type=int, default=256, help="avatar width for the RSS campaigns")
    p.add_argument("--second-audio-seconds", type=float, default=10.0)
    p.add_argument("--scaling-actors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--scaling-rows", type=int, default=8)
    p.add_argument("--scaling-audio-seconds", type=float, default=30.0)
    p.add_argument("--scaling-segment-seconds", type=float, default=5.0)
    p.add_argument("--node-minutes", type=float, default=3.0, help="avatar and audio length of the one-node run")
    p.add_argument("--node-height", type=int, default=1080, help="avatar height of the one-node run")
    p.add_argument("--node-segment-seconds", type=float, default=5.0)
    p.add_argument("--node-detect-stride", type=int, default=8, help="detector.stride of the (untimed) face track")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch/x264 threads in the Wav2Lip comparison"
    )
    p.add_argument("--device", default="auto", help="Wav2Lip device: auto | cpu | cuda")
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    args.session_cpus = None
    if args.quick:  # one Ray session for everything, tiny inputs
        args.defaults_rows, args.defaults_audio_seconds, args.defaults_height = 2, 1.0, 360
        args.defaults_official = False
        args.avatar_height, args.avatar_seconds, args.audio_seconds = [360], 1.0, 2.0
        args.wav2lip_width, args.wav2lip_audio_seconds, args.wav2lip_stage_frames = 160, 0.4, 4
        args.short_audio_minutes, args.long_audio_minutes, args.rss_width = 0.05, 0.1, 128
        args.second_audio_seconds = 1.0
        args.scaling_actors, args.scaling_rows = [1, 2], 2
        args.scaling_audio_seconds, args.scaling_segment_seconds = 1.0, 0.5
        args.node_minutes, args.node_height = 0.05, 360
        args.session_cpus = 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = common.machine_line()
    load_start = common.load_average()
    print(
        f"heygem_ray pipeline benchmarks: {command.strip()}\nMachine: {machine}; load average {load_start}", flush=True
    )
    work = args.workdir or tempfile.mkdtemp(prefix="heygem-bench-")
    ctx = common.Context(args, common.Inputs(os.path.join(work, "inputs")), work, common.Report())
    failed = []
    steps: list[tuple[str, Callable[[], None]]] = []
    for name, fn in MEASUREMENTS.items():
        if name not in args.only:
            continue
        if name == "stages":
            steps += [(f"stages {h}p", lambda fn=fn, h=h: fn(ctx, h)) for h in args.avatar_height]
        else:
            steps.append((name, lambda fn=fn: fn(ctx)))
    try:
        for name, step in steps:
            start = time.perf_counter()
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one broken measurement must not hide the others
                traceback.print_exc()
                failed.append(name)
                ctx.report.sections.append(f"#### {name}: failed\n\n`{type(exc).__name__}: {exc}`\n")
            print(f"({name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    targets = target_summary(ctx.report, args)
    if targets:
        print("\n#### Targets\n\n" + targets, flush=True)
    if not args.no_append and ctx.report.sections:
        common.append_results(
            Path(args.results),
            command.strip(),
            machine,
            (load_start, common.load_average()),
            ctx.report.sections,
            targets,
        )
        print(f"\nappended to {args.results}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
