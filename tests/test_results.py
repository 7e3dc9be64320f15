"""The results table is on the store as rows finish, and a driver stopped with SIGTERM (`ray job
stop`, Kubernetes) still writes it whole before it exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heygem_ray import campaign
from heygem_ray.results import ResultsTable, RowResult, read_parts, read_results


def _result(row_id: str, status: str = "ok") -> RowResult:
    return RowResult(row_id, status, f"/out/{row_id}.mp4", None, 1.0, 25, 1, 0.5, 1, time.time())


def test_results_reach_the_store_in_parts_as_rows_finish_and_the_table_replaces_them(tmp_path):
    table = ResultsTable(str(tmp_path / "_results.parquet"), str(tmp_path / "_results"), flush_rows=2)
    table.add(_result("a"))
    assert read_parts(str(tmp_path / "_results")) == []  # one result: not yet due
    table.add(_result("b", "failed"))
    table.add(_result("c"))
    parts = read_parts(str(tmp_path / "_results"))
    assert [(r["id"], r["status"]) for r in parts] == [("a", "ok"), ("b", "failed")]  # what a kill -9 leaves
    table.flush()
    assert [r["id"] for r in read_parts(str(tmp_path / "_results"))] == ["a", "b", "c"]
    assert "b" in table and len(table) == 3

    rows = table.finish(["c", "a", "b"])  # manifest order
    assert [r.id for r in rows] == ["c", "a", "b"]
    assert [r["id"] for r in read_results(str(tmp_path / "_results.parquet"))] == ["c", "a", "b"]
    assert not os.path.exists(tmp_path / "_results")


def test_a_part_the_store_refuses_waits_for_the_next_and_the_campaign_goes_on(tmp_path, caplog):
    parts = tmp_path / "_results"
    parts.write_text("a file where the parts' folder should be")  # every part write fails
    table = ResultsTable(str(tmp_path / "_results.parquet"), str(parts), flush_rows=1, flush_seconds=30.0)
    table.add(_result("a"))  # no exception: the campaign goes on
    assert "results part" in caplog.text and "go with the next part" in caplog.text
    parts.unlink()
    table.add(_result("b"))  # after a refusal, not at once with every result: every flush_seconds
    assert read_parts(str(parts)) == []
    table._flushed_at -= 31.0  # as if that long had passed
    table.tick()
    assert [r["id"] for r in read_parts(str(parts))] == ["a", "b"]  # the refused one went with the next
    assert [r.id for r in table.finish(["a", "b"])] == ["a", "b"]
    assert [r["id"] for r in read_results(str(tmp_path / "_results.parquet"))] == ["a", "b"]


def test_results_not_in_a_part_go_into_one_when_the_table_is_refused(tmp_path, monkeypatch):
    """The final table refused after its retries: the results not yet in a part (up to 10 s or
    1,000 of them) were nowhere, a failed row's reason with them (no marker holds it)."""
    from heygem_ray import results as results_module

    table = ResultsTable(str(tmp_path / "_results.parquet"), str(tmp_path / "_results"), flush_rows=1000)
    table.add(_result("a", "failed"))
    table.add(_result("b"))

    def refused(*args, **kwargs):
        raise OSError("the store is away")

    monkeypatch.setattr(results_module, "write_results", refused)
    with pytest.raises(OSError, match="away"):
        table.finish(["a", "b"])
    assert [(r["id"], r["status"]) for r in read_parts(str(tmp_path / "_results"))] == [("a", "failed"), ("b", "ok")]


def test_results_are_flushed_by_time_too(tmp_path):
    table = ResultsTable(str(tmp_path / "r.parquet"), str(tmp_path / "parts"), flush_seconds=0.0)
    table.add(_result("a"))
    assert [r["id"] for r in read_parts(str(tmp_path / "parts"))] == ["a"]


def test_parts_come_less_often_as_they_pile_up(tmp_path, monkeypatch):
    """A day-long campaign wrote a part every 10 s (thousands, listed and read by every reader)."""
    from heygem_ray import results

    monkeypatch.setattr(results, "SECONDS_PER_PART", 10.0)
    table = ResultsTable(str(tmp_path / "r.parquet"), str(tmp_path / "parts"), flush_seconds=0.0)
    for i in range(5):
        table.add(_result(f"r{i}"))
    assert len(os.listdir(tmp_path / "parts")) == 1  # the first at once, then 10 s per part written
    table._flushed_at -= 10.5  # as if that long had passed
    table.tick()
    assert len(os.listdir(tmp_path / "parts")) == 2
    table.add(_result("r5"))
    table._flushed_at -= 15.0
    table.tick()
    assert len(os.listdir(tmp_path / "parts")) == 2  # 20 s now
    table._flushed_at -= 5.5
    table.tick()
    assert sorted(r["id"] for r in read_parts(str(tmp_path / "parts"))) == [f"r{i}" for i in range(6)]


def test_a_clock_stepped_back_stops_no_part(tmp_path, monkeypatch):
    """Parts were timed by the wall clock: one stepped back an hour (NTP, a VM's resume) wrote none
    for that hour, and a driver killed meanwhile lost the reasons of its failed rows."""
    table = ResultsTable(str(tmp_path / "r.parquet"), str(tmp_path / "parts"), flush_seconds=0.5)
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - 3600)
    table.add(_result("a", "failed"))
    time.sleep(0.6)
    table.tick()
    assert [r["id"] for r in read_parts(str(tmp_path / "parts"))] == ["a"]


def test_a_result_no_other_follows_is_flushed_by_the_campaigns_ticks(tmp_path):
    table = ResultsTable(str(tmp_path / "r.parquet"), str(tmp_path / "parts"), flush_seconds=2.0)
    table.add(_result("a"))  # not due yet
    table.tick()
    assert read_parts(str(tmp_path / "parts")) == []
    time.sleep(2.1)
    table.tick()  # the campaign's loop, with no new result
    assert [r["id"] for r in read_parts(str(tmp_path / "parts"))] == ["a"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "executor",
    [pytest.param(["cluster=inline"], marks=pytest.mark.slow), []],  # the default (a local Ray) runs by default
    ids=["inline", "ray"],
)
def test_sigterm_stops_the_campaign_with_every_row_reported(tmp_path, media_dir, executor):
    """`ray job stop` sends SIGTERM: the driver stops rendering, reports the rows that did not finish
    as failed ("interrupted") in a whole results table, writes the final feed, and exits 130; a
    rerun resumes the finished rows. On Ray too, whose ray.init installs a SIGTERM handler of its
    own (sys.exit: no report, exit status 15)."""
    rows = 12
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i:02d}" for i in range(rows)],
                "audio": [str(media_dir / "speech4.wav")] * rows,
                "avatar": [str(media_dir / "still.png")] * rows,
            }
        ),
        manifest,
    )
    out = tmp_path / "out"
    args = [f"manifest={manifest}", f"output={out}", "render.progress=false", *executor, "cluster.actors=1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "heygem_ray.cli", "render", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert driver.stdout is not None
        for line in driver.stdout:  # until the driver has a row's result
            if line.startswith("[ok]"):
                break
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "run the same command again to resume" in stderr

    results = read_results(str(out / "_results.parquet"))
    assert [r["id"] for r in results] == [f"r{i:02d}" for i in range(rows)]
    done = [r["id"] for r in results if r["status"] == "ok"]
    stopped = [r for r in results if r["status"] == "failed"]
    assert done and stopped, results
    assert all("interrupted" in r["error"] for r in stopped)
    assert not (out / "_results").exists()
    assert json.loads((out / "_progress.json").read_text())["state"] == "interrupted"
    assert "Stopped before its end: 12 rows" in (out / "_report.html").read_text()  # not "Finished"
    # the rerun resumes whichever executor stopped: inline, which starts no Ray of its own
    resume = [*args, "cluster=inline"]
    rerun = subprocess.run(
        [sys.executable, "-m", "heygem_ray.cli", "render", *resume],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    again = {r["id"]: r for r in read_results(str(out / "_results.parquet"))}
    assert all(again[row_id]["status"] in ("ok", "skipped") for row_id in again)
    assert all(again[row_id]["status"] == "skipped" for row_id in done), again
    assert "Finished: 12 rows" in (out / "_report.html").read_text()


def test_a_second_ctrl_c_lets_the_stop_write_every_rows_result(capsys):
    """The first Ctrl-C (or SIGTERM) stops the campaign; those that follow while it writes its
    results are let go, with a word on how to end it at once. A second Ctrl-C, pressed out of
    habit, raised in the middle of the table's writing: no table, or the earlier run's, was left."""
    from heygem_ray.cli import _stops_interrupt

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    wound_up = False
    with pytest.raises(KeyboardInterrupt), _stops_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the campaign's loop: the signal comes first
        finally:  # the campaign's wind-up
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            wound_up = True
    assert wound_up and "Ctrl-\\ ends it at once" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_stopped_rerun_keeps_what_earlier_runs_published_for_the_rows_it_never_started(tmp_path, media_dir):
    """A re-run of a finished campaign (the studio's "Re-run failed rows") stopped early must not
    report the videos of the rows it had not reached (or was still fingerprinting) as failed: those
    an earlier run published (its table, or a killed run's parts) are skipped while their marker
    still matches and their video is still there; any other such row fails (one whose video a
    user deleted is not reported kept)."""
    from dataclasses import replace

    from heygem_ray.campaign import Campaign
    from heygem_ray.executors.inline import InlineExecutor
    from heygem_ray.manifest import read_manifest
    from heygem_ray.markers import Marker, write_marker
    from heygem_ray.prepare import prepare_row
    from heygem_ray.results import write_results
    from heygem_ray.rows import RowState
    from tests.helpers import compose_config

    manifest = str(tmp_path / "m.parquet")
    ids = ["a", "b", "c", "d", "e"]
    audio, avatar = str(media_dir / "speech3.wav"), str(media_dir / "still.png")
    pq.write_table(pa.table({"id": ids, "audio": [audio] * 5, "avatar": [avatar] * 5}), manifest)
    cfg = compose_config(f"manifest={manifest}", f"output={tmp_path / 'out'}", "cluster=inline")
    rows = read_manifest(cfg.manifest, cfg.output)
    output = {row.id: row.output for row in rows}
    write_results(
        cfg.layout.results,
        [
            replace(_result("a"), output=output["a"]),
            replace(_result("b", "failed"), output=output["b"]),
            _result("c"),
            replace(_result("e"), output=output["e"]),
        ],
    )
    killed = ResultsTable(cfg.layout.results, cfg.layout.results_parts)  # a later run, killed: its parts
    killed.add(replace(_result("d", "skipped"), output=output["d"]))
    killed.add(replace(_result("e", "failed"), output=output["e"]))
    killed.flush()
    for row in rows:  # their videos, published by those runs, and their markers
        if row.id in "ad":
            Path(row.output).write_bytes(b"video")
            fingerprint = prepare_row(row, cfg, decode=False).fingerprint
            marker = Marker(row.id, fingerprint, row.output, 75, 3.0, 1.0, 0.4, 0, "motion-energy", bytes=5)
            write_marker(cfg.layout.marker(row.id), marker)

    campaign = Campaign(cfg, rows, InlineExecutor(cfg))
    campaign._states["a"] = RowState(rows[0], time.time())  # admitted, its fingerprint not known yet
    campaign._interrupted(ids)
    got = {r.id: r for r in campaign.results.finish(ids)}
    assert (got["a"].status, got["a"].sync_score, got["a"].frames) == ("skipped", 0.4, 75)
    assert got["d"].status == "skipped"
    Path(output["d"]).unlink()  # deleted by a user since: a stop reports it failed, not kept
    again = Campaign(cfg, rows, InlineExecutor(cfg))
    again._interrupted(ids)
    got = {r.id: r for r in again.results.finish(ids)}
    assert got["a"].status == "skipped" and got["d"].status == "failed" and "interrupted" in (got["d"].error or "")
    for row_id in "bce":  # failed before; published to another path; failed in the latest run
        assert got[row_id].status == "failed" and "interrupted" in (got[row_id].error or ""), got[row_id]
    # going on with a forced run that was stopped: the rows it published are done
    resumed = replace(cfg, force=True, forced_by=["earlier-forced"])
    fingerprint = prepare_row(rows[0], resumed, decode=False).fingerprint
    write_marker(
        cfg.layout.marker("a"), Marker("a", fingerprint, output["a"], 75, 3.0, 1.0, bytes=5, run="earlier-forced")
    )
    forced = Campaign(resumed, rows, InlineExecutor(cfg))
    forced._interrupted(ids)
    got = {r.id: r for r in forced.results.finish(ids)}
    assert got["a"].status == "skipped" and {got[row_id].status for row_id in "bcde"} == {"failed"}
    forced = Campaign(replace(cfg, force=True), rows, InlineExecutor(cfg))  # to render everything again
    forced._interrupted(ids)
    assert {r.status for r in forced.results.finish(ids)} == {"failed"}


def test_earlier_results_are_read_without_this_runs_own_parts(tmp_path):
    """At a stop, the rows an earlier run published are read from its table and a killed run's
    parts, not from the parts of this run (thousands, on a long campaign, of results it holds)."""
    from dataclasses import replace

    from heygem_ray.results import write_results

    uri, parts = str(tmp_path / "_results.parquet"), str(tmp_path / "_results")
    write_results(uri, [_result("a")])
    killed = ResultsTable(uri, parts)
    killed.add(_result("b"))
    killed.flush()
    time.sleep(1.1)  # this run's parts sort after the killed run's
    table = ResultsTable(uri, parts)
    table.add(replace(_result("a"), status="failed"))
    table.add(_result("c"))
    table.flush()
    assert [r["id"] for r in read_parts(parts)] == ["b", "a", "c"]
    assert sorted(table.published_earlier()) == ["a", "b"]  # a: ok earlier; c: this run's own


def test_a_row_a_stopped_run_left_unchecked_is_still_an_earlier_runs_video_at_the_next_stop(tmp_path):
    """A stop that had no time to check a video an earlier run published reports its row failed,
    UNCHECKED: that says nothing of the video. Read as the row's latest result, it hid the earlier
    ok one, and the stop of the run after reported the row "interrupted" (a video lost) unchecked."""
    from dataclasses import replace

    from heygem_ray.results import UNCHECKED, published_earlier, write_results

    uri, parts = str(tmp_path / "_results.parquet"), str(tmp_path / "_results")
    write_results(uri, [_result("a"), _result("b")])  # a finished campaign
    stopped = ResultsTable(uri, parts)  # a re-run stopped at once
    stopped.add(replace(_result("a"), status="failed", error=UNCHECKED))
    stopped.add(replace(_result("b"), status="failed", error="campaign interrupted before this row finished"))
    stopped.flush()
    assert sorted(published_earlier(uri, parts)) == ["a"]  # b: its re-render was cut short
    stopped.finish(["a", "b"])  # the stop's whole table, in place of the finished campaign's
    assert sorted(published_earlier(uri, parts)) == ["a"]


def test_a_runs_parts_count_after_an_earlier_runs_table_written_by_a_host_whose_clock_ran_ahead(tmp_path):
    """Parts are named by their run's start on its host's clock, and a table supersedes the parts
    named before its run's. A run on a host whose clock was five minutes behind the last run's
    named its parts before that run's table: a killed run's finished rows were hidden from the
    next stop and from the studio. Its parts now sort after every part and table on the store."""
    from heygem_ray.results import published_earlier, write_results

    uri, parts = str(tmp_path / "_results.parquet"), str(tmp_path / "_results")
    ahead = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() + 300)) + "123"
    write_results(uri, [_result("a", "failed")], parts_upto=f"part-{ahead}-1-abcdef-")
    killed = ResultsTable(uri, parts)  # this host's clock is five minutes behind
    killed.add(_result("a"))
    killed.flush()
    assert sorted(published_earlier(uri, parts)) == ["a"]
    later = ResultsTable(uri, parts)  # and after a part stamped ahead too
    later.add(_result("a", "failed"))
    later.flush()
    assert published_earlier(uri, parts) == {}


def test_a_stop_reports_its_rows_in_one_line_and_writes_no_part_for_each_thousand(tmp_path, capsys, media_dir):
    """A campaign of many rows stopped early: the rows it had not finished get their results in the
    table at once, with one line for them all, and no part of their own (the table follows at
    once; `ray job stop` kills the driver 3 s after its SIGTERM). Rows an earlier run published
    that this run had not reached are checked as a rerun checks them: one whose video is current is
    skipped (its old segments go), one whose narration changed since is not (it was reported
    skipped, on the earlier table's word, with the video of the old narration)."""
    from dataclasses import replace

    from benchmarks.driver import SimulatedExecutor
    from heygem_ray.campaign import Campaign
    from heygem_ray.manifest import Row
    from heygem_ray.markers import Marker, write_marker
    from heygem_ray.prepare import prepare_row
    from heygem_ray.results import write_results
    from tests.helpers import compose_config

    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i:04d}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i:04d}.mp4")) for i in range(298)]
    narration = tmp_path / "narration.wav"
    narration.write_bytes((media_dir / "speech3.wav").read_bytes())
    for i in (298, 299):
        rows.append(Row(f"r{i:04d}", str(narration), str(media_dir / "still.png"), str(out / f"r{i:04d}.mp4")))
    out.mkdir(exist_ok=True)
    for row in rows[-2:]:  # published by an earlier run, with their markers
        Path(row.output).write_bytes(b"video")
        marker = Marker(row.id, prepare_row(row, cfg, decode=False).fingerprint, row.output, 75, 3.0, 1.0, bytes=5)
        write_marker(cfg.layout.marker(row.id), marker)
    write_results(cfg.layout.results, [replace(_result(row.id), output=row.output) for row in rows[-2:]])
    changed = tmp_path / "changed.wav"  # r0298's narration, changed since (the manifest names another file)
    changed.write_bytes((media_dir / "speech4.wav").read_bytes())
    rows[-2] = replace(rows[-2], audio=str(changed))
    kept_work = out / "_work" / f"r0299-{'0' * 16}-libx264-n1"
    kept_work.mkdir(parents=True)
    job = Campaign(cfg, rows, executor=SimulatedExecutor(actors=2))
    job.results.flush_rows = 10
    flushes = []
    flush = job.results.flush

    def counted() -> None:
        flushes.append(len(job.results))
        flush()

    job.results.flush = counted  # type: ignore[method-assign]

    def guard() -> None:
        if len(job.results) >= 20:
            raise KeyboardInterrupt("signal 15")

    job.guard = guard
    with pytest.raises(KeyboardInterrupt):
        job.run()
    results = {r["id"]: r for r in read_results(cfg.layout.results)}
    assert len(results) == 300 and results["r0299"]["status"] == "skipped"
    assert results["r0299"]["frames"] == 75  # its marker's
    assert results["r0298"]["status"] == "failed" and results["r0298"]["error"] == campaign.INTERRUPTED
    stopped = [r for r in results.values() if r["status"] == "failed"]
    assert len(stopped) > 250 and all("interrupted" in r["error"] for r in stopped)
    assert len([n for n in flushes if n > 20]) <= 1  # the stop's own flush, before its rows
    lines = [line for line in capsys.readouterr().out.splitlines() if "the stop caught" in line]
    assert len(lines) == 2 and f"[failed] {len(stopped)} row(s)" in lines[0], lines
    assert "[skipped] 1 row(s)" in lines[1]
    assert not kept_work.exists()  # a finished row's: checked current


def test_a_row_is_skipped_only_while_its_output_path_holds_the_video_its_marker_is_of(tmp_path, media_dir):
    """A marker whose fingerprint matches skips its row only while the file at the output path is of
    the size it published (another manifest's row, or a hand, may have put another video there
    since); a marker from before sizes were kept asks only that the file exists."""
    from dataclasses import replace

    from heygem_ray.manifest import Row
    from heygem_ray.markers import Marker, write_marker
    from heygem_ray.prepare import prepare_row
    from tests.helpers import compose_config

    out = tmp_path / "out"
    cfg = compose_config("manifest=m", f"output={out}", f"cache={tmp_path / 'cache'}")
    row = Row("r", str(media_dir / "speech3.wav"), str(media_dir / "still.png"), str(out / "r.mp4"))
    fingerprint = prepare_row(row, cfg).fingerprint
    out.mkdir(exist_ok=True)
    (out / "r.mp4").write_bytes(b"v" * 1000)
    marker = Marker("r", fingerprint, row.output, 75, 3.0, time.time(), bytes=1000)
    write_marker(cfg.layout.marker("r"), marker)
    assert prepare_row(row, cfg).skipped
    (out / "r.mp4").write_bytes(b"w" * 1200)  # another video there now
    assert not prepare_row(row, cfg).skipped
    write_marker(cfg.layout.marker("r"), replace(marker, bytes=None))  # an older marker
    assert prepare_row(row, cfg).skipped
    # its thumbnail cannot be read (here a folder at its name): the finished row stays skipped
    thumbnail = cfg.layout.thumbnail("r")
    os.makedirs(thumbnail)
    prep = prepare_row(row, cfg)
    assert prep.skipped and prep.thumbnail is None


def test_a_finished_rows_lost_thumbnail_is_made_again_from_its_video(tmp_path, media_dir):
    """A run killed between a row's marker and its thumbnail left the row done without a picture:
    every later run's report showed "no thumbnail" for it. A skipped row's missing thumbnail is
    made again from the video (a frame near its middle) and kept; a video that cannot be read
    leaves the row skipped, without one."""
    import shutil

    from heygem_ray.manifest import Row
    from heygem_ray.markers import Marker, write_marker
    from heygem_ray.prepare import prepare_row
    from tests.helpers import compose_config

    out = tmp_path / "out"
    cfg = compose_config("manifest=m", f"output={out}", f"cache={tmp_path / 'cache'}")
    row = Row("r", str(media_dir / "speech3.wav"), str(media_dir / "still.png"), str(out / "r.mp4"))
    out.mkdir()
    shutil.copy(media_dir / "clip2.mp4", row.output)
    size = os.path.getsize(row.output)
    marker = Marker("r", prepare_row(row, cfg).fingerprint, row.output, 50, 2.0, time.time(), bytes=size)
    write_marker(cfg.layout.marker("r"), marker)
    prep = prepare_row(row, cfg, decode=False)
    assert prep.skipped and prep.thumbnail is not None and prep.thumbnail.startswith(b"\xff\xd8")
    assert Path(cfg.layout.thumbnail("r")).read_bytes() == prep.thumbnail
    Path(cfg.layout.thumbnail("r")).unlink()
    Path(row.output).write_bytes(b"v" * size)  # not a video: no picture, the row still done
    prep = prepare_row(row, cfg, decode=False)
    assert prep.skipped and prep.thumbnail is None


def test_parts_left_beside_a_whole_table_count_only_when_a_later_run_wrote_them(tmp_path, monkeypatch):
    """A run whose parts could not be removed after its table was written left them, and the next
    run read them as later than the table: a row that run had re-rendered and failed came back
    as the ok result of the run before. The table names the parts it supersedes; parts of a run
    killed after it still count."""
    from heygem_ray import storage
    from heygem_ray.results import published_earlier

    uri, parts = str(tmp_path / "_results.parquet"), str(tmp_path / "_results")
    killed = ResultsTable(uri, parts, flush_rows=1)  # a first run, killed after row "x" was ok
    killed.add(_result("x"))
    time.sleep(0.002)
    rerun = ResultsTable(uri, parts, flush_rows=1)  # the next run: "x" forced again, and failed
    rerun.add(_result("x", "failed"))
    rerun.add(_result("y"))

    def refused(*args, **kwargs):
        raise PermissionError("the store refused the removal")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "remove", refused)
        assert [r.status for r in rerun.finish(["x", "y"])] == ["failed", "ok"]  # a warning, not a failed run
    assert len(os.listdir(parts)) == 3  # the table is written, the parts stay
    assert sorted(published_earlier(uri, parts)) == ["y"]  # not the first run's "x"
    time.sleep(0.002)
    later = ResultsTable(uri, parts, flush_rows=1)  # a run after the table, killed too
    later.add(_result("x"))
    assert sorted(published_earlier(uri, parts)) == ["x", "y"]


def test_a_stop_checks_earlier_videos_for_a_second_however_long_a_check_takes(monkeypatch):
    """`ray job stop` kills the driver 3 s after its SIGTERM: the check of the rows an earlier run
    published, row after row, one on a store that does not answer taking any time, went past the
    kill with no table written. Checks still under way at STOP_CHECK_SECONDS are left behind (the
    rows not taken for done), and a check that fails gives None."""
    import threading

    from heygem_ray.manifest import Row
    from heygem_ray.prepare import RowPrep

    release = threading.Event()

    def prepare_row(row, cfg, decode=True):
        assert not decode
        if row.id.startswith("slow"):
            release.wait(30)
        if row.id == "gone":
            raise FileNotFoundError(row.audio)
        return RowPrep(row.id, True, None, None)

    monkeypatch.setattr(campaign, "prepare_row", prepare_row)
    rows = [
        Row(name, f"/in/{name}.wav", "/in/v.mp4", f"/out/{name}.mp4") for name in ("fast", "gone", "slow1", "slow2")
    ]
    rows += [Row(f"more{i}", f"/in/{i}.wav", "/in/v.mp4", f"/out/{i}.mp4") for i in range(40)]
    started = time.monotonic()
    try:
        checked = campaign._checked(rows, cfg=None, seconds=campaign.STOP_CHECK_SECONDS)  # type: ignore[arg-type]
    finally:
        release.set()
    assert time.monotonic() - started < campaign.STOP_CHECK_SECONDS + 1
    assert checked["gone"] is None and checked["fast"].skipped and checked["more39"].skipped
    assert "slow1" not in checked and "slow2" not in checked


def test_a_marker_a_later_version_wrote_still_skips_its_row(tmp_path):
    """A field this version does not know (a later one's, as `run` and `bytes` once were) made the
    whole marker unreadable: after a rollback every row the newer version finished rendered again."""
    from heygem_ray.markers import Marker, read_marker, write_marker

    uri = str(tmp_path / "r.json")
    write_marker(uri, Marker("r", "fp", "/out/r.mp4", 25, 1.0, 1.0, bytes=9))
    data = json.loads(Path(uri).read_text())
    with open(uri, "w") as fh:
        json.dump({**data, "something_new": [1, 2]}, fh)
    assert read_marker(uri) == Marker("r", "fp", "/out/r.mp4", 25, 1.0, 1.0, bytes=9)
    for damaged in ("[1, 2]", '{"id": "r"}', "not json"):
        with open(uri, "w") as fh:
            fh.write(damaged)
        assert read_marker(uri) is None
    # a value of another type (a hand's edit) skipped its row, then failed the typed results table
    for field, value in (("sync_score", "0.81"), ("frames", 25.5), ("bytes", True), ("id", 7)):
        with open(uri, "w") as fh:
            json.dump({**data, field: value}, fh)
        assert read_marker(uri) is None, field
    with open(uri, "w") as fh:
        json.dump({**data, "audio_seconds": 1, "sync_score": None}, fh)  # a whole number is a float
    assert read_marker(uri) == Marker("r", "fp", "/out/r.mp4", 25, 1.0, 1.0, bytes=9)


def test_a_stop_before_any_row_started_says_nothing_was_rendered(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the manifest was read (or Ray started, or the output root waited for) said
    "rows that did not finish are reported failed in …/_results.parquet", where there was no table,
    or another run's."""
    from helpers import compose_config
    from heygem_ray import campaign
    from heygem_ray.cli import render
    from heygem_ray.executors.inline import InlineExecutor

    def stopped(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(campaign, "read_manifest", stopped)
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={tmp_path}/out", "cluster=inline")
    assert render(cfg) == 130
    err = capsys.readouterr().err
    assert "interrupted before any row started: nothing was rendered" in err and "reported failed" not in err
    assert not (tmp_path / "out" / "_results.parquet").exists()
    # once the campaign has begun (its renderers starting, waiting for room on a cluster), a stop
    # writes the table: said so
    monkeypatch.undo()
    pq.write_table(pa.table({"id": ["a"], "audio": ["/in/a.wav"], "avatar": ["/in/v.mp4"]}), tmp_path / "m.parquet")
    monkeypatch.setattr(InlineExecutor, "start_actors", stopped)
    assert render(cfg) == 130
    assert "reported failed in" in capsys.readouterr().err
    assert (tmp_path / "out" / "_results.parquet").exists()
