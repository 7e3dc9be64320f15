"""A real campaign on local Ray: three rows (avatar shorter than its audio, longer, a still image)
plus one with a missing audio file, each split into several segments."""

from __future__ import annotations

import json
import os
import time
import wave
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import chromium, dump_dom, parse_cards

from helpers import METRICS_PORT, compose_config, write_one_row_manifest
from heygem_ray import campaign
from heygem_ray.devices import gpu_room
from heygem_ray.errors import ClusterConfigError, SettingsError
from heygem_ray.executors import ray_cluster
from heygem_ray.manifest import read_manifest
from heygem_ray.media import video
from heygem_ray.plan import avatar_frame_indices
from heygem_ray.prepare import prepare_avatar
from heygem_ray.results import read_results

GOOD = {
    "short_avatar": ("speech4.wav", "clip2.mp4"),
    "long_avatar": ("speech3.wav", "clip6.mp4"),
    "still": ("speech3.wav", "still.png"),
}


#: how long before the `rendered` campaign its launch is dated (the demo dates it after making inputs)
LAUNCHED_AGO = 50_000.0


@pytest.fixture(scope="module")
def rendered(ray_local, media_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    ids = [*GOOD, "missing_audio", "no_face"]
    audio = [str(media_dir / GOOD[i][0]) for i in GOOD] + [
        str(root / "nowhere" / "missing.wav"),
        str(media_dir / "speech3.wav"),
    ]
    avatar = [str(media_dir / GOOD[i][1]) for i in GOOD] + [str(media_dir / "clip2.mp4"), str(media_dir / "noface.mp4")]
    manifest = str(root / "manifest.parquet")
    pq.write_table(pa.table({"id": ids, "audio": audio, "avatar": avatar}), manifest)
    cfg = compose_config(
        f"manifest={manifest}", f"output={root / 'out'}", "render.segment_seconds=1.0", "render.progress=false"
    )
    # launched long before this process existed: the start-up breakdown must count from it
    summary = campaign.run(cfg, launched=time.time() - LAUNCHED_AGO)
    return cfg, summary, {r["id"]: r for r in read_results(os.path.join(cfg.output, "_results.parquet"))}


def decode(path):
    with av.open(path) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
        audio = c.streams.audio[0]
        audio_seconds = float(audio.duration * audio.time_base)
        fps = float(c.streams.video[0].average_rate)
    return frames, audio_seconds, fps


def wav_seconds_and_loudness_db(path, fps, frames):
    with wave.open(path) as fh:
        rate = fh.getframerate()
        x = np.frombuffer(fh.readframes(fh.getnframes()), "<i2").astype(np.float64) / 32768
    per = rate / fps
    rms = np.array([np.sqrt(np.mean(x[int(i * per) : int((i + 1) * per)] ** 2) + 1e-12) for i in range(frames)])
    return len(x) / rate, 20 * np.log10(np.maximum(rms, 1e-4))


def luma(frame):
    return cv2.cvtColor(frame, cv2.COLOR_BGR2YUV)[..., 0]


def psnr(a, b, mask):
    """Luma PSNR, video's usual measure: yuv420p output halves chroma resolution, which alone holds
    RGB PSNR near 36 dB on the portrait's sharp red/blue flag edges."""
    a, b = luma(a)[mask], luma(b)[mask]
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_results_table_and_summary(rendered):
    cfg, summary, results = rendered
    assert summary.count("ok") == 3 and summary.failed == 2
    assert {r["status"] for i, r in results.items() if i in GOOD} == {"ok"}
    for row_id in GOOD:
        r = results[row_id]
        assert r["segments"] >= 2 and r["frames"] > 0 and r["attempts"] == 1 and r["error"] is None
        assert os.path.exists(os.path.join(cfg.output, "_markers", f"{row_id}.json"))
    assert not os.path.exists(os.path.join(cfg.output, "_work"))  # finished rows' segment files are cleaned up
    # the start-up breakdown: consecutive steps from the driver's launch to the first rendered frames
    steps = dict(summary.startup)
    total = steps.pop("first frames after launch")
    assert list(steps) == ["driver", "ray start", "actor start", "model load", "wait for work", "first batch"]
    assert all(seconds >= 0 for seconds in steps.values()) and steps["model load"] > 0 and steps["first batch"] > 0
    assert sum(steps.values()) == pytest.approx(total, abs=0.01)
    assert LAUNCHED_AGO < steps["driver"] < LAUNCHED_AGO + 600  # from `launched`, not the process start
    assert summary.startup_line().startswith("driver ") and "first frames" in summary.startup_line()


def test_bad_rows_fail_alone_and_leave_nothing(rendered):
    cfg, _, results = rendered
    bad = results["missing_audio"]
    assert bad["status"] == "failed"
    assert "missing.wav" in bad["error"] and "does not exist" in bad["error"] and bad["error"].startswith("audio")
    faceless = results["no_face"]
    assert faceless["status"] == "failed" and faceless["error"].startswith("avatar")
    assert "noface.mp4" in faceless["error"] and "no face found in any of 12 frames" in faceless["error"]
    for row in (bad, faceless):
        assert not os.path.exists(row["output"])
    assert not [f for f in os.listdir(cfg.output) if f.startswith(".") or ".part" in f]


@pytest.mark.parametrize("row_id", list(GOOD))
def test_output_matches_audio_and_avatar(rendered, media_dir, row_id):
    cfg, _, results = rendered
    audio_path, avatar_path = (str(media_dir / p) for p in GOOD[row_id])
    frames, muxed_audio_seconds, fps = decode(results[row_id]["output"])
    track = prepare_avatar(avatar_path, None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)  # cached
    audio_seconds, loudness = wav_seconds_and_loudness_db(audio_path, fps, len(frames))

    # colour tags: what the frames are, through the stitch's packet copy (a still's: BT.601's matrix, BT.709's colours)
    with av.open(results[row_id]["output"]) as container:
        context = container.streams.video[0].codec_context
        tags = (context.colorspace, context.color_primaries, context.color_trc)
    assert track.info.color is not None
    assert tags == tuple(int(t) for t in video.output_tags(track.info.color or "", True).split(","))

    # duration: the video covers the whole audio, at most one frame longer; the audio is all there
    assert fps == track.info.fps
    assert 0 <= len(frames) / fps - audio_seconds < 1 / fps
    assert abs(muxed_audio_seconds - audio_seconds) < 0.05

    sources = [f for _, f in video.iter_frames(avatar_path, track.info)]
    mapping = avatar_frame_indices(np.arange(len(frames)), track.frames, track.info.still)
    mouth_change = []
    for i, out in enumerate(frames):
        src = sources[mapping[i]]
        x1, y1, x2, y2 = track.boxes[mapping[i]]
        outside = np.ones(out.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert psnr(out, src, outside) >= 35.0, f"frame {i}"
        h, w = y2 - y1, x2 - x1
        mouth = (slice(y1 + int(0.68 * h), y2), slice(x1 + int(0.25 * w), x2 - int(0.25 * w)))
        mouth_change.append(np.abs(out[mouth].astype(float) - src[mouth].astype(float)).mean())

    # the mouth moves with the speech, frame for frame: a dropped, doubled or misordered segment
    # would shift or scramble this relation
    mouth_change = np.array(mouth_change)
    best_r, best_lag = max(
        (
            np.corrcoef(
                mouth_change[max(0, lag) : len(frames) + min(0, lag)],
                loudness[max(0, -lag) : len(frames) - max(0, lag)],
            )[0, 1],
            lag,
        )
        for lag in range(-3, 4)
    )
    assert best_r >= 0.6 and abs(best_lag) <= 1, (best_r, best_lag)

    # the campaign's own score says the same, measured where the frames were (heygem_ray.qa)
    result = results[row_id]
    assert result["sync_method"] == "motion-energy" and result["sync_offset_frames"] == 0, result
    assert result["sync_score"] >= 0.6 and result["qa_flag"] == "", result


def _audio_packets(path):
    with av.open(path) as c:
        return [bytes(p) for p in c.demux(audio=0) if p.size]


def test_each_narration_is_encoded_once_and_copied_into_its_outputs(rendered):
    """speech3.wav narrates two good rows (and a faceless one): one AAC track in the cache, and each
    output carries its narration's track packet for packet."""
    cfg, _, results = rendered
    audio_cache = os.path.join(cfg.cache_uri, "audio")
    tracks = [
        _audio_packets(os.path.join(audio_cache, f)) for f in sorted(os.listdir(audio_cache)) if f.endswith(".m4a")
    ]
    assert len(tracks) == 2  # speech4.wav and speech3.wav
    outputs = {row_id: _audio_packets(results[row_id]["output"]) for row_id in GOOD}
    assert outputs["long_avatar"] == outputs["still"]
    assert all(packets in tracks for packets in outputs.values())


INLINE_CAMPAIGN = """
import json, sys
from heygem_ray import campaign
from heygem_ray.cli import compose
from heygem_ray.config import to_plain

summary = campaign.run(to_plain(compose(sys.argv[1:])))
print(json.dumps({"rows": {r.id: [r.status, r.error] for r in summary.rows}, "ray": "ray" in sys.modules}))
"""


def _video_packets(path):
    with av.open(path) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


def test_inline_executor_renders_the_same_campaign_without_ray(rendered, tmp_path):
    """cluster=inline: the same rows in one process that never imports Ray, with the same results and,
    at the Ray actors' one thread, the same bytes."""
    import json
    import subprocess
    import sys

    cfg, _, results = rendered
    out = tmp_path / "inline"
    args = [f"manifest={cfg.manifest}", f"output={out}", "render.segment_seconds=1.0", "render.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-c", INLINE_CAMPAIGN, *args, "cluster=inline", "cluster.actor.threads=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ray"] is False
    assert report["rows"] == {row_id: [r["status"], r["error"]] for row_id, r in results.items()}
    for row_id in GOOD:
        inline_output = str(out / os.path.basename(results[row_id]["output"]))
        assert _video_packets(inline_output) == _video_packets(results[row_id]["output"]), row_id
        assert _audio_packets(inline_output) == _audio_packets(results[row_id]["output"]), row_id


def test_an_inline_renderer_or_stage_hung_for_ever_does_not_hold_the_process(tmp_path):
    """`cluster=inline`: a renderer call or a stage task hung for ever (a decoder, the GPU, a read
    that never ends) is given up by the campaign, which then finishes; its thread, a pool's, was
    joined at the interpreter's exit, and the finished run's process (and its output root's lock)
    never ended. The calls queued behind it are cancelled."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import threading, time
        from heygem_ray.cli import exit_now
        from heygem_ray.config import ClassicRendererConfig, Config
        from heygem_ray.executors.inline import InlineExecutor

        executor = InlineExecutor(Config(manifest="m", output={str(tmp_path)!r}, renderer=ClassicRendererConfig()))
        executor.start_actors(1)
        hung = threading.Event()
        executor._actors[0].submit(lambda: (hung.set(), time.sleep(3600)))
        queued = executor._actors[0].submit(lambda: 1)
        stage = threading.Event()
        executor.submit(lambda: (stage.set(), time.sleep(3600)))
        assert hung.wait(60) and stage.wait(60)
        executor.close()
        print("closed", queued.cancelled(), flush=True)
        exit_now(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "closed True" in out.stdout, out.stderr[-2000:]


def test_an_inline_renderer_hung_on_a_segment_is_replaced_and_every_row_renders(tmp_path, media_dir, monkeypatch):
    """`cluster=inline` has one renderer by default: one hung on a segment (a decoder, the GPU) was
    given up, as a thread cannot be killed, and every row after it failed with `no renderer actor
    is left`. A new renderer now takes its place; the segment it hung on renders there."""
    import threading

    from heygem_ray.campaign import Campaign
    from heygem_ray.executors.inline import InlineExecutor
    from heygem_ray.manifest import read_manifest
    from heygem_ray.segment import RenderWorker

    manifest = str(tmp_path / "m.parquet")
    audio = [str(media_dir / "speech3.wav")] * 2
    pq.write_table(pa.table({"id": ["a", "b"], "audio": audio, "avatar": [str(media_dir / "still.png")] * 2}), manifest)
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "cluster=inline",
        "cluster.actors=1",
        "cluster.actor.threads=1",
        "render.progress=false",
        "render.segment_timeout=3",
    )
    release, hung = threading.Event(), []
    render = RenderWorker.render_segment

    def hangs_once(self, job):
        if not hung:
            hung.append(job.row_id)
            release.wait(120)  # a decoder that never returns (let go when the test ends)
        return render(self, job)

    monkeypatch.setattr(RenderWorker, "render_segment", hangs_once)
    try:
        summary = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), InlineExecutor(cfg)).run()
    finally:
        release.set()
    assert hung and [r.status for r in summary.rows] == ["ok", "ok"], [r.error for r in summary.rows]
    assert max(r.attempts for r in summary.rows) == 2  # the segment it hung on went again, once


def test_an_inline_stitch_given_up_at_its_deadline_publishes_nothing_afterwards(tmp_path, media_dir, monkeypatch):
    """`cluster=inline`: a stitch past `render.stage_timeout` failed its row, but its thread cannot
    be stopped, and when it came unstuck it published the video and its marker under a row the
    results called failed (after the run had let go of the output root)."""
    import threading

    from heygem_ray import stitch
    from heygem_ray.campaign import Campaign
    from heygem_ray.executors.inline import InlineExecutor
    from heygem_ray.manifest import read_manifest

    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png", "a")
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "cluster=inline",
        "cluster.actor.threads=1",
        "render.progress=false",
        "render.stage_timeout=10",
    )
    release, came_back, join = threading.Event(), threading.Event(), stitch.stitch

    def stuck_then_done(*args, **kwargs):
        release.wait(120)  # a read that hangs past the deadline, then answers
        try:
            return join(*args, **kwargs)
        finally:
            came_back.set()

    monkeypatch.setattr(stitch, "stitch", stuck_then_done)
    try:
        (row,) = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), InlineExecutor(cfg)).run().rows
    finally:
        release.set()
    assert row.status == "failed" and "stitching row a was stopped" in (row.error or ""), row.error
    assert came_back.wait(120)
    time.sleep(1.0)  # what it would have published by now
    assert not (tmp_path / "out" / "a.mp4").exists()
    assert not (tmp_path / "out" / "_markers" / "a.json").exists()


@pytest.mark.parametrize("outlasts_the_wait", [False, True])
def test_an_inline_stitch_under_way_at_a_stop_is_waited_for_or_publishes_nothing(
    tmp_path, media_dir, monkeypatch, outlasts_the_wait
):
    """`cluster=inline`: at a stop (SIGTERM), a stitch on a thread, which cannot be stopped, is waited
    for and its row is `ok` (a stop is no deadline: it must not refuse to publish); one still running
    when the stop stops waiting is reported interrupted, and must not publish its video afterwards
    (after the report, and after the run let go of the output root)."""
    import threading

    from heygem_ray import campaign as campaign_module
    from heygem_ray import stitch
    from heygem_ray.campaign import Campaign
    from heygem_ray.executors.inline import InlineExecutor
    from heygem_ray.manifest import read_manifest

    monkeypatch.setattr(campaign_module, "STITCH_GRACE_SECONDS", 0.2)
    if outlasts_the_wait:
        monkeypatch.setattr(campaign_module, "STITCH_WAIT_SECONDS", 0.5)
    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png")
    cfg = compose_config(
        f"manifest={manifest}", f"output={tmp_path / 'out'}", "cluster=inline", "cluster.actor.threads=1"
    )
    join, came_back = stitch.stitch, threading.Event()

    def slow(*args, **kwargs):
        time.sleep(3.0 if outlasts_the_wait else 2.0)  # past the grace (and the wait)
        try:
            return join(*args, **kwargs)
        finally:
            came_back.set()

    monkeypatch.setattr(stitch, "stitch", slow)
    job = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), InlineExecutor(cfg))

    def guard() -> None:
        if any(event == "stitched" for event, _ in job._inflight.values()):
            raise KeyboardInterrupt("signal 15")

    job.guard = guard
    with pytest.raises(KeyboardInterrupt):
        job.run()
    (row,) = read_results(str(tmp_path / "out" / "_results.parquet"))
    assert came_back.wait(60)
    time.sleep(1.0)  # what it would have published by now
    if outlasts_the_wait:
        assert row["status"] == "failed" and "interrupted" in row["error"]
        assert not (tmp_path / "out" / "a.mp4").exists()
    else:
        assert row["status"] == "ok", row["error"]
        assert (tmp_path / "out" / "a.mp4").exists()


def test_a_forced_rerun_stopped_midway_is_resumed_by_the_next(tmp_path, media_dir):
    """`force=true` renders every row again: one stopped midway (a kill, a lost node) rendered all
    of them again when run again, those it had published too. The next forced run goes on with it;
    once a run is whole (forced or not), the next forced one renders everything again."""
    from heygem_ray import campaign

    manifest = str(tmp_path / "m.parquet")
    audio = [str(media_dir / "speech3.wav")] * 2
    pq.write_table(pa.table({"id": ["a", "b"], "audio": audio, "avatar": [str(media_dir / "still.png")] * 2}), manifest)
    base = (f"manifest={manifest}", f"output={tmp_path / 'out'}", "cluster=inline", "render.progress=false")
    cfg = compose_config(*base, "cluster.actors=1", "cluster.actor.threads=1", "render.max_prepared_rows=1")
    assert campaign.run(cfg).count("ok") == 2
    forced = replace(cfg, force=True)

    def stop_after_one() -> None:
        published = [p for p in (tmp_path / "out" / "_markers").glob("*.json") if p.stat().st_mtime > started]
        if len(published) >= 1:
            raise KeyboardInterrupt

    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        campaign.run(forced, guard=stop_after_one)
    assert (tmp_path / "out" / "_force.json").exists()
    # a plain run, whole, leaves the forced one behind: the next force=true renders every row again
    assert campaign.run(cfg).count("skipped") == 2 and not (tmp_path / "out" / "_force.json").exists()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        campaign.run(forced, guard=stop_after_one)
    statuses = {r.id: r.status for r in campaign.run(forced).rows}
    assert sorted(statuses.values()) == ["ok", "skipped"], statuses  # the one it published stays done
    assert not (tmp_path / "out" / "_force.json").exists()
    assert campaign.run(forced).count("ok") == 2  # whole: forced again, every row renders again
    # one left unfinished by another release (kept there by a row whose input could not be read):
    # after an upgrade, force=true renders every row again
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        campaign.run(forced, guard=stop_after_one)
    kept = json.loads((tmp_path / "out" / "_force.json").read_text())
    (tmp_path / "out" / "_force.json").write_text(json.dumps({**kept, "code": "an older release"}))
    assert campaign.run(forced).count("ok") == 2


def test_a_forced_run_whose_only_failures_are_bad_inputs_is_whole(tmp_path, media_dir):
    """A row that fails for its own inputs fails the same way at every rerun: counted as unfinished,
    one such row kept `_force.json` for ever, and every later `force=true` skipped the rows the old
    forced runs had published instead of rendering them again."""
    from heygem_ray import campaign

    manifest = str(tmp_path / "m.parquet")
    (tmp_path / "noise.wav").write_text("not audio at all")
    audio = [str(media_dir / "speech3.wav")] * 2 + [str(tmp_path / "noise.wav"), str(media_dir / "speech3.wav")]
    avatar = [str(media_dir / "still.png")] * 3 + [""]  # the last refused by the manifest: no avatar
    pq.write_table(pa.table({"id": ["a", "b", "noise", "empty"], "audio": audio, "avatar": avatar}), manifest)
    cfg = compose_config(
        f"manifest={manifest}", f"output={tmp_path / 'out'}", "cluster=inline", "render.progress=false", "force=true"
    )
    for _ in range(2):
        statuses = {r.id: r.status for r in campaign.run(cfg).rows}
        assert statuses == {"a": "ok", "b": "ok", "noise": "failed", "empty": "failed"}  # rendered again
        assert not (tmp_path / "out" / "_force.json").exists()
    # a file it could not reach (gone, or credentials expired: permission denied) may be there next
    # time: the forced run is unfinished, and the next goes on with it
    (tmp_path / "noise.wav").unlink()
    statuses = {r.id: r.status for r in campaign.run(cfg).rows}
    assert statuses == {"a": "ok", "b": "ok", "noise": "failed", "empty": "failed"}
    assert (tmp_path / "out" / "_force.json").exists()
    # a row whose lip sync is below `qa.fail_below` fails again at every rerun: a lasting fault too
    (tmp_path / "noise.wav").write_text("not audio at all")
    strict = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'strict'}",
        "cluster=inline",
        "render.progress=false",
        "force=true",
        "qa.fail_below=1",
    )
    failed = campaign.run(strict).rows
    assert {r.status for r in failed} == {"failed"} and "qa.fail_below" in next(r for r in failed if r.id == "a").error
    assert not (tmp_path / "strict" / "_force.json").exists()


def test_rerun_skips_finished_rows(rendered):
    import json

    cfg, _first, results = rendered
    for row_id in GOOD:  # the marker knows the size of what it published: the rerun checks it
        marker = json.loads(Path(cfg.layout.marker(row_id)).read_text())
        assert marker["bytes"] == os.path.getsize(results[row_id]["output"]), row_id
    again = campaign.run(cfg)
    status = {r.id: r.status for r in again.rows}
    assert again.startup == {} and again.startup_line() == ""  # nothing rendered, nothing to break down
    assert status == {
        "short_avatar": "skipped",
        "long_avatar": "skipped",
        "still": "skipped",
        "missing_audio": "failed",
        "no_face": "failed",
    }


def test_report_shows_every_row_with_thumbnails_in_a_browser(rendered, tmp_path):
    """The report matches the latest results (a rerun's skipped rows keep their thumbnails)."""
    cfg = rendered[0]
    campaign.run(cfg)  # a rerun: nothing to render, so it starts no renderer
    results = {r["id"]: r for r in read_results(os.path.join(cfg.output, "_results.parquet"))}
    assert {r["status"] for r in results.values()} == {"skipped", "failed"}
    page = os.path.join(cfg.output, "_report.html")
    cards = {c["id"]: c for c in parse_cards(dump_dom(chromium(), page, tmp_path)).cards}
    assert set(cards) == {f"row-{i}" for i in results}
    for row_id, result in results.items():
        assert cards[f"row-{row_id}"]["data-status"] == result["status"]
        expected = "none" if result["status"] == "failed" else "loaded"
        assert cards[f"row-{row_id}"]["data-thumb"] == expected, row_id


def test_metrics_reach_the_prometheus_endpoint(rendered):
    """Frames, rows by status and stage timings are exported by the node's Ray agent (what the
    dashboard's metrics view and Grafana read). Export runs on an interval, hence the polling."""
    import time
    import urllib.request

    wanted = [
        "ray_heygem_frames_rendered_total",
        "ray_heygem_rows_total{",
        'status="failed"',
        "ray_heygem_stage_seconds_bucket{",
        'stage="render"',
        'stage="stitch"',
        "ray_heygem_segments_in_flight",
    ]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    frames = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_heygem_frames_rendered_total")
    )
    assert frames >= sum(r["frames"] for r in rendered[2].values() if r["status"] == "ok")


def test_force_and_changes_re_render_only_what_they_should(media_dir, tmp_path):
    """What a rerun renders again is the fingerprint's business, not the executor's: checked here
    without a Ray (the Ray path's skip is test_rerun_skips_finished_rows')."""
    import shutil

    audio = tmp_path / "a.wav"
    shutil.copy(media_dir / "speech3.wav", audio)
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table(
            {
                "id": ["x", "y"],
                "audio": [str(audio), str(media_dir / "speech4.wav")],
                "avatar": [str(media_dir / "still.png")] * 2,
            }
        ),
        manifest,
    )
    base = [f"manifest={manifest}", f"output={tmp_path / 'out'}", "render.progress=false", "cluster=inline"]

    def statuses(*extra):
        return {r.id: r.status for r in campaign.run(compose_config(*base, *extra)).rows}

    assert statuses() == {"x": "ok", "y": "ok"}
    assert statuses("render.segment_seconds=3") == {"x": "skipped", "y": "skipped"}  # scheduling only
    assert statuses("encoder.crf=23") == {"x": "ok", "y": "ok"}  # output-affecting: re-render
    assert statuses("encoder.crf=23") == {"x": "skipped", "y": "skipped"}
    assert statuses("encoder.crf=23", "force=true") == {"x": "ok", "y": "ok"}
    with wave.open(str(media_dir / "speech4.wav")) as src, wave.open(str(audio), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(src.getnframes()))  # x's audio content changed
    assert statuses("encoder.crf=23") == {"x": "ok", "y": "skipped"}


def test_finished_rows_keep_their_fingerprint_across_releases():
    """A release that changes this value renders every finished row of every campaign again on its
    next run. If that is meant (a render version, an output-affecting option), record the new value
    and say so in docs/ops.md, "Upgrading"."""
    from heygem_ray.prepare import row_fingerprint

    cfg = compose_config("manifest=m", "output=/o")
    assert row_fingerprint("audio-fp", "avatar-fp", None, "/o/r.mp4", cfg) == "e6015896f6462bfaa3cdbbeb44aef4ee"
    # as made before outputs were named from the output root: the markers of then skip their rows still
    old = row_fingerprint("audio-fp", "avatar-fp", None, "/o/r.mp4", cfg, in_root=False)
    assert old == "db09dd0b88ec2c3c1465e2c51767f6ef"


def test_an_output_root_moved_or_mounted_elsewhere_renders_no_finished_row_again(tmp_path, media_dir):
    """A row's fingerprint held its output's whole URI: an output root copied elsewhere, mounted at
    another path on another host, or named s3a:// instead of s3://, rendered every row again. Rows
    whose markers were made before, by the whole URI, are still skipped where they are."""
    import json
    import shutil

    from heygem_ray import campaign, prepare
    from heygem_ray.prepare import row_fingerprint

    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png")
    base = (f"manifest={manifest}", "cluster=inline", "render.progress=false", "cluster.actor.threads=1")
    assert campaign.run(compose_config(*base, f"output={tmp_path / 'out'}")).count("ok") == 1
    shutil.copytree(tmp_path / "out", tmp_path / "moved")

    def stopped() -> None:
        raise KeyboardInterrupt("signal 15")

    # stopped at once there: its earlier result, of the old root's URI, is checked by its marker
    with pytest.raises(KeyboardInterrupt):
        campaign.run(compose_config(*base, f"output={tmp_path / 'moved'}"), guard=stopped)
    (result,) = read_results(str(tmp_path / "moved" / "_results.parquet"))
    assert result["status"] == "skipped", result["error"]
    assert campaign.run(compose_config(*base, f"output={tmp_path / 'moved'}")).count("skipped") == 1
    # a marker of the whole URI (an earlier release's), where it was made: still skipped
    cfg = compose_config(*base, f"output={tmp_path / 'out'}")
    row = campaign.read_manifest(manifest, cfg.output)[0]
    inputs = [
        prepare.content_fingerprint(uri, cfg.cache_uri, what)
        for uri, what in ((row.audio, "audio"), (row.avatar, "avatar"))
    ]
    old = row_fingerprint(*inputs, row.box, row.output, cfg, prepare.photo_pixel_cap(row.avatar, cfg), in_root=False)
    marker = tmp_path / "out" / "_markers" / "a.json"
    kept = json.loads(marker.read_text())
    assert kept["fingerprint"] != old
    marker.write_text(json.dumps({**kept, "fingerprint": old}))
    assert campaign.run(cfg).count("skipped") == 1


def test_model_files_named_by_relative_paths_keep_rows_fingerprints(tmp_path, monkeypatch):
    """A campaign makes relative model paths absolute (a joined cluster's workers run elsewhere):
    its rows' fingerprints still hold them as written, so a campaign rendered with
    `renderer.checkpoint=models/...` before then renders no finished row again."""
    from heygem_ray import prepare
    from heygem_ray.prepare import row_fingerprint

    monkeypatch.setattr(prepare, "CHECKPOINT_VERSION_SECONDS", 0.0)
    (tmp_path / "models").mkdir()
    for name in ("w.pth", "s3fd.pth"):
        (tmp_path / "models" / name).write_bytes(b"weights " + name.encode())
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(
        "manifest=m",
        "output=/o",
        "renderer=wav2lip",
        "renderer.checkpoint=models/w.pth",
        "detector=s3fd",
        "detector.checkpoint=models/s3fd.pth",
    )
    anchored = cfg.anchored()
    assert anchored.renderer.checkpoint == str(tmp_path / "models" / "w.pth")
    assert anchored.detector.checkpoint == str(tmp_path / "models" / "s3fd.pth")
    before = row_fingerprint("audio-fp", "avatar-fp", None, "/o/r.mp4", cfg)
    assert row_fingerprint("audio-fp", "avatar-fp", None, "/o/r.mp4", anchored) == before
    assert anchored.anchored() == anchored  # a second time changes nothing
    (tmp_path / "models" / "w.pth").write_bytes(b"other weights, longer")  # still told apart
    assert row_fingerprint("audio-fp", "avatar-fp", None, "/o/r.mp4", anchored) != before


def test_a_new_tracker_version_makes_new_tracks_and_leaves_finished_rows(media_dir, tmp_path, monkeypatch):
    """A release that changes some avatars' face tracks (TRACK_VERSION alone): tracks cached before
    it were reused with their old boxes; now a new row tracks its avatar again, and the finished
    row is skipped, not rendered again (in-process, so the new version reaches every stage)."""
    from heygem_ray import prepare

    def write_manifest(rows: dict[str, str]) -> str:
        path = str(tmp_path / "m.parquet")
        still = str(media_dir / "still.png")
        pq.write_table(pa.table({"id": list(rows), "audio": list(rows.values()), "avatar": [still] * len(rows)}), path)
        return path

    def run(manifest: str) -> dict[str, str]:
        cfg = compose_config(
            f"manifest={manifest}", f"output={tmp_path / 'out'}", "render.progress=false", "cluster=inline"
        )
        return {r.id: r.status for r in campaign.run(cfg).rows}

    def tracks() -> set[Path]:
        return set((tmp_path / "out" / "_cache").rglob("track-*.npz"))

    assert run(write_manifest({"x": str(media_dir / "speech3.wav")})) == {"x": "ok"}
    before = tracks()
    assert before
    monkeypatch.setattr(prepare, "TRACK_VERSION", "next")
    both = write_manifest({"x": str(media_dir / "speech3.wav"), "y": str(media_dir / "speech4.wav")})
    assert run(both) == {"x": "skipped", "y": "ok"}
    assert tracks() - before  # y's avatar was tracked again, not read from the old track


def _run_watching_loads(job: campaign.Campaign) -> tuple:
    """Run the campaign while sampling the most segments any one actor holds (every 2 ms)."""
    import threading

    loads: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            loads.append(max((a.load for a in job.actors.actors), default=0))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return job.run(), loads
    finally:
        done.set()
        watcher.join()


def test_a_single_row_is_spread_over_every_actor(ray_local, media_dir, tmp_path):
    """One short row and two actors: the row is cut into two equal segments, and the actor that
    answers first is not handed the second while the other is still starting (it would render both
    one after the other while the second actor idled)."""
    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png", "solo")
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "cluster.actors=2",
        "cluster.actor.num_cpus=0.5",
    )
    job = campaign.Campaign(cfg, read_manifest(cfg.manifest, cfg.output), ray_cluster.RayExecutor(cfg))
    summary, loads = _run_watching_loads(job)
    (row,) = summary.rows
    assert row.status == "ok" and row.segments == 2  # a 3 s row, 10 s segments: 2 so both actors can work
    assert max(loads) == 1  # never both segments at one actor
    assert sum(job.segments.by_actor.values()) == 2


def test_a_wait_hands_back_every_call_that_has_ended(ray_local):
    """The driver handles each wait's calls in one turn: one call a turn, with thousands in flight,
    rebuilt the list of them and scanned every actor per call."""
    executor = ray_cluster.RayExecutor(compose_config("manifest=m", "output=o"))

    def same(i: int) -> int:
        return i

    def sleeps() -> None:
        time.sleep(30)

    calls = [executor.submit(same, i) for i in range(4)]
    ray_local.get(calls)  # all four have ended
    assert sorted(executor.get(c) for c in executor.wait(calls, timeout=5)) == [0, 1, 2, 3]
    asleep = executor.submit(sleeps)
    assert executor.wait([asleep], timeout=0.1) == []
    executor.cancel(asleep)


def test_an_actor_holds_at_most_its_share_of_segments(ray_local, media_dir, tmp_path):
    """Segments wait on the driver for a free actor instead of piling up on the first actor that
    answered, where an actor starting later (a GPU node still joining) would find nothing left."""
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "audio": [str(media_dir / "speech3.wav")] * 2,
                "avatar": [str(media_dir / "still.png")] * 2,
            }
        ),
        manifest,
    )
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "render.segment_seconds=0.4",
        "cluster.actors=1",
    )
    job = campaign.Campaign(cfg, read_manifest(cfg.manifest, cfg.output), ray_cluster.RayExecutor(cfg))
    summary, loads = _run_watching_loads(job)
    assert summary.count("ok") == 2
    assert sum(r.segments for r in summary.rows) > 10  # far more segments than the actor may hold
    assert max(loads) == cfg.render.segments_per_actor == 2


def test_auto_codec_comes_from_the_first_actor_and_a_codec_no_node_has_fails_rows(ray_local, media_dir, tmp_path):
    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png", "a")
    base = [f"manifest={manifest}", "render.progress=false"]
    cfg = compose_config(*base, f"output={tmp_path / 'auto'}")
    assert cfg.encoder.codec == "auto"
    job = campaign.Campaign(cfg, read_manifest(cfg.manifest, cfg.output), ray_cluster.RayExecutor(cfg))
    assert job.run().count("ok") == 1
    assert job.actors.codec == "libx264"  # decided by the actor: no GPU with a video encoder here
    with av.open(os.path.join(cfg.output, "a.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    # NVENC named where no node has it: the actors refuse at start, and the row says why
    cfg = compose_config(*base, f"output={tmp_path / 'nvenc'}", "encoder.codec=h264_nvenc")
    (row,) = campaign.run(cfg).rows
    assert row.status == "failed"
    assert (
        row.error.startswith("renderer could not start:")
        and "h264_nvenc cannot encode yuv420p on this node" in row.error
    )
    # an x264 option x264 does not know: x264 alone would skip it and encode on; refused before
    # anything starts (it failed every row once the renderers had started)
    cfg = compose_config(*base, f"output={tmp_path / 'x264'}", "cluster=inline", "encoder.x264_params='mb-tree=1'")
    with pytest.raises(SettingsError, match="encoder.x264_params=mb-tree=1: x264 says"):
        campaign.run(cfg)


def test_a_thumbnail_the_store_refuses_leaves_the_row_published(media_dir, tmp_path):
    """The thumbnail is for the report: once the video is published, failing to store it is a
    warning, not a failed row that a rerun would render again."""
    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png", "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "_thumbs").write_text("a file where the thumbnails' folder should be")
    cfg = compose_config(f"manifest={manifest}", f"output={out}", "render.progress=false", "cluster=inline")
    (row,) = campaign.run(cfg).rows
    assert row.status == "ok", row.error
    assert (out / "a.mp4").exists() and (out / "_markers" / "a.json").exists()


def test_a_row_rendered_again_never_keeps_the_old_videos_thumbnail(media_dir, tmp_path, monkeypatch):
    """The old marker went before the new video, its thumbnail stayed: where none was made for the
    new video (a frame that would not decode), the report showed the old one's picture for ever."""
    from heygem_ray import stitch

    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png", "a")
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={manifest}", f"output={out}", "render.progress=false", "cluster=inline")
    assert campaign.run(cfg).count("ok") == 1
    (out / "_thumbs" / "a.jpg").write_bytes(b"the old video's picture")
    with monkeypatch.context() as patched:
        patched.setattr(stitch, "_thumbnail", lambda *_: None)
        assert campaign.run(replace(cfg, force=True)).count("ok") == 1
    assert not (out / "_thumbs" / "a.jpg").exists()
    assert campaign.run(cfg).count("skipped") == 1  # and a later run makes it from the new video
    assert (out / "_thumbs" / "a.jpg").read_bytes().startswith(b"\xff\xd8")


def test_rows_not_yet_rendering_when_the_output_limit_is_reached_fail_and_a_rerun_renders_them(media_dir, tmp_path):
    """The studio checked a user's quota only when a campaign was made, and its videos counted once
    rendered: one campaign could go far past it. `limits.max_output_gb` (the quota left, from the
    studio) stops a run's new videos at it: rows under way finish, the others fail saying so."""
    ids = list("abcde")
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table(
            {"id": ids, "audio": [str(media_dir / "speech3.wav")] * 5, "avatar": [str(media_dir / "still.png")] * 5}
        ),
        manifest,
    )
    out = tmp_path / "out"
    # one segment out at a time: row N+2 is admitted once row N's segment has rendered
    args = [f"manifest={manifest}", f"output={out}", "render.progress=false", "cluster=inline", "cluster.actors=1"]
    args.append("render.segments_per_actor=1")
    rows = {r.id: r for r in campaign.run(compose_config(*args, "limits.max_output_gb=0.000000001")).rows}
    stopped = [r for r in rows.values() if r.status == "failed"]
    # the first video, and those whose first segment went out before it was published (its row's
    # next, and maybe one more while its stitch ran); the rest stopped
    assert 2 <= len(stopped) <= 4, rows
    assert all("reached its limit of 0.0 MiB (limits.max_output_gb" in (r.error or "") for r in stopped)
    assert not any((out / f"{r.id}.mp4").exists() for r in stopped)
    again = {r.id: r.status for r in campaign.run(compose_config(*args)).rows}
    assert again == {row_id: "skipped" if rows[row_id].status == "ok" else "ok" for row_id in ids}


def test_an_anamorphic_avatar_keeps_its_pixel_aspect_ratio(media_dir, tmp_path):
    """A 4:3-pixel avatar (HDV, DV) played with square pixels would come out squeezed."""
    from fractions import Fraction

    from helpers import write_anamorphic_clip

    avatar = str(tmp_path / "hdv.mp4")
    write_anamorphic_clip(avatar, 25)
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a"], "audio": [str(media_dir / "speech3.wav")], "avatar": [avatar]}), manifest)
    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={out}",
        "render.progress=false",
        "cluster=inline",
        "detector=box",
        "detector.box=[20,10,76,62]",
    )
    (row,) = campaign.run(cfg).rows
    assert row.status == "ok", row.error
    with av.open(str(out / "a.mp4")) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(4, 3)
    # and its track header gives the width it is shown at (QuickTime sizes the picture by it)
    assert 128 in _track_header_widths((out / "a.mp4").read_bytes())  # 96 stored x 4/3


def _track_header_widths(data: bytes) -> list[float]:
    """The widths the track headers (moov/trak/tkhd) of an mp4 give, read box by box."""

    def boxes(start: int, end: int):
        while start + 8 <= end:
            size, kind = int.from_bytes(data[start : start + 4], "big"), data[start + 4 : start + 8]
            yield kind, start + 8, start + size
            start += size

    moov = next((s, e) for k, s, e in boxes(0, len(data)) if k == b"moov")
    widths = []
    for kind, start, end in boxes(*moov):
        if kind == b"trak":
            for inner, _, tkhd_end in boxes(start, end):
                if inner == b"tkhd":
                    widths.append(int.from_bytes(data[tkhd_end - 8 : tkhd_end - 4], "big") / 65536)
    return widths


def test_a_slow_motion_clip_renders_at_the_frame_rate_cap(media_dir, tmp_path):
    """A 120 fps clip (a phone's slow motion) renders at `render.max_fps` (60): every second frame,
    played forward and back as any clip, half the frames to render; `render.max_fps=0` keeps all."""
    avatar = str(tmp_path / "slowmo.mp4")
    with av.open(avatar, "w") as container:
        stream = container.add_stream("libx264", rate=120)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(60):  # half a second, each frame's grey level its number
            frame = av.VideoFrame.from_ndarray(np.full((72, 96, 3), 40 + 2 * i, np.uint8), format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a"], "audio": [str(media_dir / "speech3.wav")], "avatar": [avatar]}), manifest)
    base = ["render.progress=false", "cluster=inline", "detector=box", "detector.box=[40,30,70,60]"]

    def rendered_grey(output, *overrides):
        cfg = compose_config(f"manifest={manifest}", f"output={output}", *base, *overrides)
        (row,) = campaign.run(cfg).rows
        assert row.status == "ok", row.error
        with av.open(str(output / "a.mp4")) as c:
            rate = c.streams.video[0].average_rate
            grey = [float(f.to_ndarray(format="gray")[:16, :16].mean()) for f in c.decode(video=0)]
        return rate, np.array(grey)

    rate, grey = rendered_grey(tmp_path / "capped")
    assert rate == 60 and len(grey) == 180  # 3 s of narration
    shown = 2 * avatar_frame_indices(np.arange(180), 30, still=False)  # source frames 0, 2 .. 58, back
    np.testing.assert_allclose(grey, 40 + 2 * shown, atol=1.5)
    rate, grey = rendered_grey(tmp_path / "every", "render.max_fps=0")
    assert rate == 120 and len(grey) == 360
    np.testing.assert_allclose(grey, 40 + 2 * avatar_frame_indices(np.arange(360), 60, still=False), atol=1.5)


def test_a_clip_over_max_side_renders_whole_at_its_fitted_size_with_its_box_scaled(media_dir, tmp_path):
    """A 4K phone clip renders at `render.max_side` on its longest side (1920 by default): the whole
    picture shrunk, not cropped, a face box given in the clip's own pixels shrunk with it;
    `render.max_side=0` keeps the clip's size."""
    from heygem_ray.config import DetectorConfig

    avatar = str(tmp_path / "big.mp4")
    picture = np.full((144, 192, 3), 40, np.uint8)
    picture[:, 96:] = 200  # dark left half, bright right half
    with av.open(avatar, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 192, 144, "yuv420p"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(picture, format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    box = (64, 36, 128, 108)
    track = prepare_avatar(avatar, box, DetectorConfig(name="box"), str(tmp_path / "cache"), 25.0, max_side=96)
    assert (track.info.width, track.info.height) == (96, 72) and track.boxes[0].tolist() == [32, 18, 64, 54]
    manifest = str(tmp_path / "m.parquet")
    table = {
        "id": ["a"],
        "audio": [str(media_dir / "speech3.wav")],
        "avatar": [avatar],
        "box": [",".join(map(str, box))],
    }
    pq.write_table(pa.table(table), manifest)

    def rendered(output, *overrides):
        cfg = compose_config(
            f"manifest={manifest}", f"output={output}", "render.progress=false", "cluster=inline", *overrides
        )
        (row,) = campaign.run(cfg).rows
        assert row.status == "ok", row.error
        with av.open(str(output / "a.mp4")) as c:
            return next(c.decode(video=0)).to_ndarray(format="bgr24")

    small = rendered(tmp_path / "small", "render.max_side=96")
    assert small.shape == (72, 96, 3)
    assert abs(small[2:10, 4:12].mean() - 40) < 4 and abs(small[2:10, 84:92].mean() - 200) < 4  # both halves
    assert rendered(tmp_path / "whole", "render.max_side=0").shape == (144, 192, 3)


H100_NODE = {"CPU": 16.0, "GPU": 1.0}
GPU_POD = {"CPU": 8.0, "GPU": 1.0}
CPU_NODE = {"CPU": 32.0}
HEAD = {"CPU": 0.0}


@pytest.mark.parametrize(
    "nodes, num_cpus, num_gpus, reserve, expected",
    [
        ([H100_NODE], 2.0, 0.125, 1.0, 7),  # 8 GPU shares, but 16 - 1 reserved CPUs hold 7
        ([H100_NODE], 4.0, 1.0, 1.0, 1),  # one whole-GPU actor per GPU
        ([HEAD, GPU_POD, GPU_POD], 2.0, 0.125, 1.0, 6),  # 3 a pod: each keeps its reserve (2 CPUs free)
        ([CPU_NODE, GPU_POD], 2.0, 0.125, 1.0, 3),  # GPU actors cannot use the CPU-only node
        ([{"CPU": 64.0, "GPU": 2.0}], 2.0, 0.25, 1.0, 8),  # GPU shares bound it
        ([HEAD, CPU_NODE], 1.0, 0.0, 1.0, 31),  # CPU actors: the node's CPUs less the reserve
        ([CPU_NODE, CPU_NODE], 1.0, 0.0, 1.0, 62),  # the reserve is kept on every node
        ([{"CPU": 2.0}], 1.0, 0.0, 1.0, 1),  # this CI machine: one actor, one core for tasks
        ([HEAD, CPU_NODE], 2.0, 0.125, 1.0, 1),  # no GPU node up yet: one, which waits for a node
        # Ray puts a fraction of a GPU on one GPU: 3 of 0.3 a GPU (13 counted from the sum: one
        # never starts), 2 of 0.4
        ([{"CPU": 64.0, "GPU": 4.0}], 2.0, 0.3, 1.0, 12),
        ([{"CPU": 64.0, "GPU": 2.0}], 2.0, 0.4, 1.0, 4),
    ],
)
def test_fit_actors_counts_per_node(nodes, num_cpus, num_gpus, reserve, expected):
    assert ray_cluster.fit_actors(nodes, num_cpus, num_gpus, reserve) == expected


def test_gpu_actors_leave_a_share_for_gpu_face_detection():
    """On a 32-core, 1-GPU node 8 actors of 2 CPUs and 1/8 GPU would hold the whole GPU, and S3FD's
    tasks, which wait for a GPU share, would never run: the rows would stay "preparing" for ever."""
    node = [{"CPU": 32.0, "GPU": 1.0}]
    assert ray_cluster.fit_actors(node, 2.0, 0.125, 1.0) == 8
    assert ray_cluster.fit_actors(node, 2.0, 0.125, 1.0, detect=(1.0, 0.125)) == 7
    # with no reserve, 8-CPU pods fill their CPUs: the free CPU for the detection task must be on a
    # GPU node
    pods = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert ray_cluster.fit_actors(pods, 2.0, 0.125, 0.0) == 8
    assert ray_cluster.fit_actors(pods, 2.0, 0.125, 0.0, detect=(1.0, 0.125)) == 7
    # a detection share needs room on one GPU: 6 actors of 0.3 on 2 GPUs leave 0.2 in all, 0.1 on
    # each (as Ray 2.60 placed them), where a task of 1/8 waits for ever
    workstation = [{"CPU": 32.0, "GPU": 2.0}]
    assert ray_cluster.fit_actors(workstation, 2.0, 0.3, 1.0) == 6
    assert ray_cluster.fit_actors(workstation, 2.0, 0.3, 1.0, detect=(1.0, 0.125)) == 5
    assert not gpu_room(2.0, 6, 0.3, 0.125) and gpu_room(2.0, 5, 0.3, 0.125)
    assert gpu_room(1.0, 7, 0.125, 0.125) and not gpu_room(1.0, 8, 0.125, 0.125)
    assert gpu_room(2.0, 1, 1.0, 0.125) and not gpu_room(2.0, 2, 1.0, 0.125)  # whole-GPU actors
    with pytest.raises(ClusterConfigError, match="host 6"):  # 7 of 0.28 sum to 1.96 GPUs, but a GPU hosts 3
        ray_cluster.check_local_fit(
            compose_config("manifest=m", "output=o", "cluster.actors=7", "cluster.actor.num_gpus=0.28"),
            {"CPU": 32.0, "GPU": 2.0},
        )
    s3fd = compose_config("manifest=m", "output=o", "detector=s3fd", "detector.checkpoint=/m/s3fd.pth")
    assert s3fd.detector.gpu_share == 0.125
    on_cpu = compose_config(
        "manifest=m", "output=o", "detector=s3fd", "detector.checkpoint=/m/s3fd.pth", "detector.device=cpu"
    )
    assert on_cpu.detector.gpu_share == 0
    assert compose_config("manifest=m", "output=o").detector.gpu_share == 0  # the CPU cascade


def test_a_campaign_reserves_room_for_its_tasks_and_first_renderer_before_its_renderers():
    """What a campaign holds before its renderers start (`reserved_bundles`): the CPUs its renderers
    leave on each node, for its tasks, pinned to that node (a CPU-only node's whole; a GPU
    detection task's CPU left free beside its share), and its first renderer's, last, anywhere;
    nothing where the cluster could never hold them (GPU nodes not added yet), or where
    `cluster.actors` sizes the pool for nodes to come."""

    def room(cfg, nodes, actors):
        got = ray_cluster.reserved_bundles(cfg, nodes, actors, [f"n{i}" for i in range(len(nodes))])
        return None if got is None else [(b, on.get(ray_cluster.NODE_LABEL, "")) for b, on in got]

    local = compose_config("manifest=m", "output=o")
    assert room(local, [{"CPU": 3.0}], 2) == [({"CPU": 1.0}, "n0"), ({"CPU": 1.0}, "")]
    gpu = compose_config("manifest=m", "output=o", "cluster=gpu", "detector=s3fd", "detector.checkpoint=/m/s3fd.pth")
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 32.0}]
    actors = ray_cluster.actor_count(gpu, nodes)
    assert actors == 7 and room(gpu, nodes, actors) == [
        ({"CPU": 1.0}, "n0"),  # what the 7 renderers of 2 CPUs leave of 16, less S3FD's task's CPU
        ({"CPU": 32.0}, "n1"),  # the CPU-only node, all of it
        ({"CPU": 2.0, "GPU": 0.125}, ""),  # the first renderer
    ]
    assert room(gpu, [{"CPU": 32.0}], 1) is None  # no GPU node yet
    assert room(local, [{"CPU": 1.0}], 1) is None  # a task and a renderer never fit one CPU
    explicit = compose_config("manifest=m", "output=o", "cluster.actors=2", "cluster.actor.num_gpus=1")
    assert room(explicit, [{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], 2) is None


def test_a_weights_free_actor_never_loads_torch_and_a_torch_one_gets_its_threads(ray_local, tmp_path):
    """The classic renderer's actors start without torch (~3 s of each actor's start on a small
    CPU): Ray gave them no GPU, which says all the device questions need. An actor whose renderer
    does load torch later still runs it on `cluster.actor.threads` threads."""
    import sys

    from heygem_ray.segment import RenderWorker

    def state(worker: RenderWorker, load_torch: bool) -> tuple[bool, int]:
        loaded = "torch" in sys.modules
        if load_torch:
            import torch

            return loaded, torch.get_num_threads()
        return loaded, 0

    # Ray starts a 1-CPU actor with OMP_NUM_THREADS=1: two threads are the setting at work
    cfg = compose_config("manifest=m", f"output={tmp_path}", "cluster.actor.threads=2")
    actor = ray_local.remote(num_cpus=1)(RenderWorker).remote(cfg)
    try:
        ray_local.get(actor.ready.remote())
        assert ray_local.get(actor.__ray_call__.remote(state, False)) == (False, 0)
        assert ray_local.get(actor.__ray_call__.remote(state, True)) == (False, 2)
    finally:
        ray_local.kill(actor)


def test_a_frame_damaged_late_in_an_avatar_fails_only_the_narrations_that_reach_it(tmp_path):
    """A presenter clip with a frame that cannot be decoded at 12 s: a 13.5 s narration's track
    reaches it and fails. Every other row of that presenter failed with it when that row came
    first (and on every rerun), a 4 s narration too; a shorter narration's track stops before
    the damage, so it renders, and the long row's error says how far the clip is good."""
    from heygem_ray import demo

    clip = tmp_path / "presenter.mp4"
    demo.write_avatar_clip(str(clip), 14.0, seed=1)
    data = bytearray(clip.read_bytes())
    at = len(data) * 9 // 10
    data[at : at + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    clip.write_bytes(bytes(data))
    for seconds in (13.5, 4.0):
        demo.write_wav(str(tmp_path / f"n{seconds}.wav"), demo.speech_like(seconds, seed=3))
    manifest = str(tmp_path / "m.parquet")
    audio = [str(tmp_path / "n13.5.wav"), str(tmp_path / "n4.0.wav")]
    pq.write_table(pa.table({"id": ["long", "short"], "audio": audio, "avatar": [str(clip)] * 2}), manifest)
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "cluster=inline",
        "cluster.actor.threads=1",
        "render.progress=false",
        "render.max_prepared_rows=1",  # the long row's track first
    )
    statuses = {r.id: (r.status, r.error) for r in campaign.run(cfg).rows}
    assert statuses["short"] == ("ok", None), statuses
    assert statuses["long"][0] == "failed" and "decoding failed" in statuses["long"][1], statuses
    assert " at 12.3 s: narrations of up to 7.7 s render" in statuses["long"][1], statuses


def test_an_animated_image_plays_each_frame_for_its_delay_at_a_steady_rate(media_dir, tmp_path):
    """A presenter GIF of two poses (eyes open 2 s, a 0.15 s blink) played at its average rate, 0.93
    frames a second: the lips moved once a second and the blink lasted a second; a GIF that holds a
    pose 2 s and then waves in tenths played that pose in a tenth. Now at `render.still_fps`, each
    frame held for its delay (looped forward and back, as clips are)."""
    from PIL import Image

    def gif(path: Path, levels: list[int], delays: list[int]) -> None:
        frames = [Image.fromarray(np.full((96, 128, 3), v, np.uint8)) for v in levels]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=delays, loop=0)

    gif(tmp_path / "blink.gif", [40, 200], [2000, 150])
    gif(tmp_path / "wave.gif", [40, 100, 160], [2000, 100, 100])
    manifest = str(tmp_path / "m.parquet")
    avatars = {"blink": tmp_path / "blink.gif", "wave": tmp_path / "wave.gif"}
    pq.write_table(
        pa.table(
            {
                "id": list(avatars),
                "audio": [str(media_dir / "speech3.wav")] * 2,
                "avatar": [str(p) for p in avatars.values()],
            }
        ),
        manifest,
    )
    cfg = compose_config(
        f"manifest={manifest}", f"output={tmp_path / 'out'}", "cluster=inline", "render.progress=false",
        "detector=box", "detector.box=[0,0,8,8]",
    )  # fmt: skip
    assert campaign.run(cfg).count("ok") == 2
    shown = {}
    for name in avatars:
        with av.open(str(tmp_path / "out" / f"{name}.mp4")) as container:
            assert container.streams.video[0].average_rate == 25
            # a corner outside the box: the avatar's own level, frame by frame
            levels = [int(f.to_ndarray(format="bgr24")[-8:, -8:].mean()) for f in container.decode(video=0)]
        shown[name] = [round(v / 20) * 20 for v in levels]
    blink = shown["blink"]
    assert blink[:50] == [40] * 50  # 2 s open
    assert blink[50:54] == [200] * 4 and blink[58] == 40  # 0.15 s closed, and again on the way back
    wave = shown["wave"]
    assert wave[:50] == [40] * 50 and wave[50:52] == [100, 100] and wave[53:55] == [160, 160]


def test_a_row_named_in_any_script_renders_is_reported_and_skipped_on_a_rerun(media_dir, tmp_path):
    """Ids of any script name a row's video, marker and thumbnail, which the report links to."""
    from urllib.parse import quote

    manifest = write_one_row_manifest(tmp_path, media_dir / "speech3.wav", media_dir / "still.png", "张三-नमस्ते")
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={manifest}", f"output={out}", "render.progress=false", "cluster=inline")
    (row,) = campaign.run(cfg).rows
    assert row.status == "ok", row.error
    assert (out / "张三-नमस्ते.mp4").stat().st_size > 0 and (out / "_thumbs" / "张三-नमस्ते.jpg").exists()
    report = (out / "_report.html").read_text()
    assert f'href="{quote("张三-नमस्ते.mp4")}"' in report and 'src="data:image/jpeg;base64,' in report
    assert campaign.run(cfg).count("skipped") == 1
