"""Measurement `defaults` of `python -m benchmarks.run`: what a new user gets. `heygem-ray render` with
default settings (Wav2Lip, a still, fixed box, several rows and one row), each whole command timed from
start to exit, against the official flow run once per video as its own process (benchmarks.naive_row),
plus the CLI's start-up breakdown."""

from __future__ import annotations

import json
import os
import sys

import ray

from benchmarks.pipeline.common import FPS, ROOT, Context, f1, rate, startup_steps, table, timed_command


def bench_defaults(ctx: Context) -> None:
    """What a new user gets: `heygem-ray render` with default settings, the whole command timed,
    against the official one-video flow run once per video as its own process (benchmarks.naive_row):
    a campaign of several rows and a single row, side by side in this run."""
    args = ctx.args
    avatar, box = ctx.inputs.still_avatar(args.defaults_height)
    checkpoint = ctx.inputs.checkpoint()
    audios = [ctx.inputs.audio(args.defaults_audio_seconds, seed=70 + i) for i in range(args.defaults_rows)]
    work = ctx.dir("defaults")
    python = sys.executable
    cli = os.path.join(os.path.dirname(python), "heygem-ray")
    command = [cli] if os.path.exists(cli) else [python, "-m", "heygem_ray.cli"]
    box_arg = f"detector.box=[{','.join(map(str, box))}]"
    if ray.is_initialized():  # the CLI starts its own Ray, as a user's would: no other Ray on the machine
        ray.shutdown()

    def baseline(rows: list[str], batch: int, tag: str) -> tuple[float, dict[str, float]]:
        wall, steps = 0.0, {}
        for i, audio in enumerate(rows):
            seconds, out = timed_command(
                [
                    python,
                    "-m",
                    "benchmarks.naive_row",
                    "--checkpoint",
                    checkpoint,
                    "--audio",
                    audio,
                    "--avatar",
                    avatar,
                    "--box",
                    *map(str, box),
                    "--batch",
                    str(batch),
                    "--out",
                    os.path.join(work, f"{tag}-{i}.mp4"),
                ],
                cwd=str(ROOT),
            )
            wall += seconds
            for k, v in json.loads(out.strip().splitlines()[-1])["steps"].items():
                steps[k] = steps.get(k, 0.0) + v
        return wall, steps

    def ours(rows: list[str], tag: str, *extra: str) -> tuple[float, dict[str, float]]:
        manifest = ctx.inputs.manifest(f"defaults-{tag}", rows, avatar)
        wall, out = timed_command(
            [
                *command,
                "render",
                f"manifest={manifest}",
                f"output={os.path.join(work, tag)}",
                "renderer=wav2lip",
                f"renderer.checkpoint={checkpoint}",
                "detector=box",
                box_arg,
                "render.progress=false",
                *extra,
            ],
            cwd=work,
        )
        return wall, startup_steps(out)

    cases = [("one row", audios[:1]), (f"{len(audios)} rows", audios)]
    results: dict[str, dict[str, tuple[float, dict[str, float]]]] = {}
    for name, rows in cases:  # each case's paths back to back, so load from other work hits them alike
        tag = name.replace(" ", "")
        results[name] = {"naive": baseline(rows, 1, f"naive-{tag}")}
        if args.defaults_official:
            results[name]["official"] = baseline(rows, 128, f"official-{tag}")
        results[name]["ours"] = ours(rows, tag)
        if args.defaults_inline:  # no Ray: one renderer per core in the driver's process
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            actors = min(cores, len(rows))
            results[name]["inline"] = ours(rows, f"{tag}-inline", "cluster=inline", f"cluster.actors={actors}")
    frames = round(args.defaults_audio_seconds * FPS)
    table_rows, ratios = [], {}
    for name, paths in results.items():
        naive = paths["naive"][0]
        for path, (wall, _) in paths.items():
            label = {
                "naive": "naive loop, one process per video (batch 1, fp32)",
                "official": "official flow, one process per video (batch 128, fp32)",
                "ours": "heygem-ray render, defaults",
                "inline": "heygem-ray render, cluster=inline (no Ray; a renderer per core, up to one per row)",
            }[path]
            table_rows.append(
                [
                    name,
                    label,
                    f"{wall:,.1f}",
                    f1(rate(frames * (1 if name == "one row" else len(audios)), wall)),
                    f"{naive / wall:.2f}×",
                ]
            )
        ratios[name] = naive / paths["ours"][0]
    startup = results["one row"]["ours"][1]
    ctx.report.targets["defaults"] = (
        ratios["one row"],
        ratios[f"{len(audios)} rows"],
        len(audios),
        startup.get("first frames"),
    )
    steps_table = table(
        ["start-up step (one row, from the CLI's own line)", "s"],
        [[k, f"{v:.2f}"] for k, v in startup.items()],
        right=[1],
    )
    title = (
        f"0. Defaults, whole command: {len(audios)} rows × {args.defaults_audio_seconds:g} s and one row, "
        f"Wav2Lip, {args.defaults_height}p still, fixed box"
    )
    shown = "heygem-ray" if len(command) == 1 else "python -m heygem_ray.cli"
    notes = (
        f"Every figure is a whole command timed from start to exit (`{shown} render "
        "manifest=… output=… renderer=wav2lip renderer.checkpoint=… detector=box detector.box=[…]`, nothing "
        "else set) against `python -m benchmarks.naive_row` run once per video, model loaded each time, as the "
        "official script is. Same recipe weights, same still, same box, same x264 settings and audio mux. "
        + (
            "The `cluster=inline` rows add `cluster=inline cluster.actors=N` (no Ray; not the default, which stays "
            "a local Ray). "
            if args.defaults_inline
            else ""
        )
        + f"Targets: ≥ 1.5× for one row, ≥ 3× for the campaign. Measured: **{ratios['one row']:.2f}×** and "
        f"**{ratios[f'{len(audios)} rows']:.2f}×**.\n\n" + steps_table
    )
    ctx.report.emit(
        title, table(["work", "path", "wall s", "frames/s", "vs naive"], table_rows, right=range(2, 5)), notes
    )
