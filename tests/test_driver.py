"""The campaign's driver without Ray or rendering: `benchmarks.driver.SimulatedExecutor` answers every
stage at once, so these tests see the scheduling and the bookkeeping alone."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks.driver import STAGES, Done, SimulatedExecutor
from helpers import compose_config, run_within
from heygem_ray.campaign import Campaign
from heygem_ray.executors import Expired
from heygem_ray.manifest import Row
from heygem_ray.results import read_results

ROWS = 40


class WatchedExecutor(SimulatedExecutor):
    """Reads the progress feed each time the driver waits for an event."""

    def __init__(self, feed: Path):
        super().__init__(actors=3)
        self.feed, self.seen = feed, []

    def wait(self, handles: Any, timeout: float) -> Any:
        if self.feed.exists():
            self.seen.append(json.loads(self.feed.read_text()))
        return super().wait(handles, timeout)


class SegmentsSeen(SimulatedExecutor):
    """Keeps every segment job sent to a renderer (`jobs`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.jobs: list[Any] = []

    def call(self, actor: int, method: str, *args: Any) -> Done:
        if method == "render_segment":
            self.jobs.append(args[0])
        return super().call(actor, method, *args)


def _campaign(tmp_path: Path) -> tuple[Campaign, WatchedExecutor]:
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i:03d}", f"/in/a{i % 4}.wav", f"/in/v{i % 3}.mp4", str(out / f"r{i:03d}.mp4")) for i in range(ROWS)]
    executor = WatchedExecutor(out / "_progress.json")
    job = Campaign(cfg, rows, executor=executor)
    # every loop, so the test sees each step (not at most every five times a write's cost: on a
    # loaded machine that let a whole campaign pass between two writes)
    job.observers.progress.due = lambda: True  # type: ignore[method-assign]
    return job, executor


def test_progress_feed_follows_every_row_to_its_result(tmp_path):
    job, executor = _campaign(tmp_path)
    summary = job.run()
    assert summary.count("ok") == ROWS
    running = [doc for doc in executor.seen if doc["state"] == "running"]
    assert running, "the feed was never written while the campaign ran"
    states = {status for doc in running for status in doc["row_status"].values()}
    assert {"queued", "preparing", "rendering", "ok"} <= states
    oks = [doc["rows"]["ok"] for doc in running]
    assert oks == sorted(oks) and oks[0] < ROWS
    for doc in running:
        assert sum(doc["rows"][s] for s in ("queued", "preparing", "rendering", "ok", "failed", "skipped")) == ROWS
        assert doc["frames"]["done"] <= doc["frames"]["planned"]
        assert doc["finished_at"] is None
    assert any(doc["eta_seconds"] is not None for doc in running)

    final = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert final["state"] == "finished" and final["finished_at"] >= final["started_at"]
    assert final["rows"]["ok"] == ROWS and final["eta_seconds"] is None
    assert set(final["row_status"].values()) == {"ok"}
    assert final["frames"]["done"] == final["frames"]["planned"] == ROWS * 250
    assert len(read_results(str(tmp_path / "out" / "_results.parquet"))) == ROWS


def test_a_results_table_the_store_refuses_leaves_no_feed_or_report_saying_finished(tmp_path, monkeypatch):
    """The final table refused (the CLI exits 1 saying so): the feed still said "finished" and the
    report "Finished: N rows", beside the previous run's table, which looked current."""
    from heygem_ray import results as results_module

    job, _ = _campaign(tmp_path)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(results_module, "write_results", refused)
    with pytest.raises(PermissionError):
        job.run()
    feed = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert feed["state"] == "failed" and feed["rows"]["ok"] == ROWS
    report = (tmp_path / "out" / "_report.html").read_text()
    assert "results table not written: PermissionError" in report and "Finished:" not in report


def test_a_large_campaigns_feed_is_written_less_often(tmp_path, monkeypatch):
    """Every row's status is in the feed: at 100,000 rows 3-4 MB, rewritten each 2-3 s (five times
    its cost) sent over 100 GB a day from the head node. At most every 1e-4 s per row: 10 s there;
    a small campaign's every 2 s, as before."""
    from types import SimpleNamespace

    from heygem_ray import progress

    now = [1000.0]
    monkeypatch.setattr(
        progress, "time", SimpleNamespace(time=lambda: now[0], monotonic=lambda: now[0])
    )  # its clocks only
    for rows, interval in ((100, 2.0), (100_000, 10.0)):
        feed = progress.ProgressFeed(str(tmp_path / f"feed-{rows}.json"), now[0])
        feed.write("running", dict.fromkeys((f"r{i}" for i in range(rows)), "queued"), {"queued": rows}, 0, 0)
        now[0] += interval - 0.5
        assert not feed.due()
        now[0] += 0.5
        assert feed.due()


def test_the_time_left_is_reckoned_from_rows_that_took_work_not_refused_ones(tmp_path):
    """Rows the manifest refuses fail the moment the campaign starts. Counted as work done, 90 of
    them and one row rendered in a minute said a few seconds were left for the other nine."""
    from heygem_ray.observers import CampaignObservers
    from heygem_ray.results import RowResult

    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [
        Row(f"r{i:03d}", "/in/a.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4"), refused="bad box" if i < 90 else None)
        for i in range(100)
    ]
    observers = CampaignObservers(cfg, rows)
    observers.open()
    observers.progress.started_at -= 60  # a minute in
    observers.progress._started -= 60

    def result(row_id: str, status: str) -> RowResult:
        return RowResult(row_id, status, "", None, None, None, None, None, 1, time.time())

    for row in rows[:90]:
        observers.finished(result(row.id, "failed"), None, quiet=True)
    observers._write_progress("running")
    assert json.loads((out / "_progress.json").read_text())["eta_seconds"] is None  # nothing to reckon by
    observers.finished(result("r090", "ok"), None, quiet=True)
    observers._write_progress("running")
    assert json.loads((out / "_progress.json").read_text())["eta_seconds"] >= 9 * 59  # nine more minutes


def test_the_time_left_is_reckoned_past_the_start_up_and_shown_as_a_person_reads_it(tmp_path, monkeypatch):
    """The first row's time holds the start-up (a cluster, the models: minutes, once): reckoned
    from the start, a thousand-row campaign whose first row finished at minute 4 and whose rows
    then took 2 s each said 66 hours were left; the studio showed it as "237600 s", frozen at the
    feed's writing."""
    from types import SimpleNamespace

    from heygem_ray import progress
    from heygem_ray.studio.app import _time_left

    now = [1000.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(time=lambda: now[0], monotonic=lambda: now[0]))
    feed = progress.ProgressFeed(str(tmp_path / "feed.json"), now[0])
    rows = {f"r{i}": "queued" for i in range(1000)}

    def left(ok: int) -> float:
        feed.write("running", rows, {"ok": ok}, 0, 0)
        return json.loads((tmp_path / "feed.json").read_text())["eta_seconds"]

    now[0] += 240  # the start-up, and the first row
    assert left(1) == 240 * 999  # nothing better to reckon by yet
    now[0] += 200  # a hundred rows more, 2 s each
    assert left(101) == 2 * 899
    assert [_time_left(s) for s in (45, 1798, 237_600)] == ["45 s", "30 min", "66 h 0 min"]


def test_admission_keeps_few_rows_preparing_and_lets_go_of_finished_ones(tmp_path):
    job, executor = _campaign(tmp_path)
    job.run()
    assert job.prepare_limit() == 8  # 3 actors: the least
    assert max(doc["rows"]["preparing"] for doc in executor.seen) <= 8
    assert job.observers.counts["ok"] == ROWS and job.observers.counts["preparing"] == 0
    assert not job._states


class _TracksLast(SimulatedExecutor):
    """Face tracks finish only when nothing else is left to do, one at a time."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.tracking: list[Any] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        handle = super().submit(fn, *args, **kwargs)
        if fn.__name__ == "prepare_avatar":
            self.tracking.append(handle)
        return handle

    def wait(self, handles: Any, timeout: float) -> Any:
        ready = [h for h in handles if h not in self.tracking]
        if ready:
            return ready[:1]
        tracked = next((h for h in handles if h in self.tracking), None)
        if tracked is None:
            return []
        self.tracking.remove(tracked)
        return [tracked]


def test_a_campaign_of_many_presenters_tracks_as_many_at_once_as_its_actors_can_take(tmp_path):
    """Each row a presenter of its own: a row is preparing until its avatar is tracked, the longest
    step, and a fixed 8 rows preparing fed 8 trackings to a cluster of any size (560 actors idled
    behind them). By default twice the actors may prepare at once; a set limit still holds."""

    class SlowTracking(_TracksLast):
        """Counting the rows preparing at once."""

        def __init__(self, actors: int):
            super().__init__(actors=actors)
            self.most = 0
            self.job: Campaign | None = None

        def wait(self, handles: Any, timeout: float) -> Any:
            assert self.job is not None
            self.most = max(self.most, self.job.observers.counts["preparing"])
            return super().wait(handles, timeout)

    out = tmp_path / "out"
    rows = [Row(f"r{i:03d}", "/in/a.wav", f"/in/v{i}.mp4", str(out / f"r{i:03d}.mp4")) for i in range(100)]
    for actors, limit, most in ((20, (), 40), (20, ("render.max_prepared_rows=5",), 5)):
        cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", *limit)
        executor = SlowTracking(actors)
        executor.job = Campaign(cfg, rows, executor=executor)
        assert executor.job.run().count("ok") == 100
        assert executor.most == most
        shutil.rmtree(out)


def test_a_stage_task_that_never_answers_fails_its_rows_and_the_campaign_goes_on(tmp_path):
    """A row's preparation, an avatar's face tracking and a stitch that never answer (a read or
    decoder that never ends, a task no node has room for) were only said to be out, once, after ten
    minutes: the campaign waited for ever, and hung stitches or preparations stopped it admitting
    rows at all. Each is stopped at `render.stage_timeout` and its rows fail saying so."""

    class Hangs(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.hung: list[Any] = []
            self.cancelled: list[Any] = []

        def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            handle = super().submit(fn, *args, **kwargs)
            name = getattr(args[0], "id", None) if fn.__name__ == "prepare_row" else None
            job = args[0] if fn.__name__ == "stitch_row" else None
            if (
                name == "r001"
                or (fn.__name__ == "prepare_avatar" and args[0] == "/in/hangs.mp4")
                or (job is not None and job.row_id in ("r003", "r004", "r005"))
            ):
                self.hung.append(handle)
            return handle

        def wait(self, handles: Any, timeout: float) -> Any:
            ready = [h for h in handles if h not in self.hung]
            if not ready:
                time.sleep(min(timeout, 0.05))
            return ready[:1]

        def cancel(self, handle: Any) -> bool:
            self.cancelled.append(handle)
            return True

    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.stage_timeout=0.3"
    )
    rows = [
        Row(f"r{i:03d}", "/in/a.wav", "/in/hangs.mp4" if i == 2 else "/in/v.mp4", str(out / f"r{i:03d}.mp4"))
        for i in range(12)
    ]
    executor = Hangs()
    summary = Campaign(cfg, rows, executor=executor).run()
    results = {r["id"]: r for r in read_results(str(out / "_results.parquet"))}
    failed = {row_id for row_id, r in results.items() if r["status"] == "failed"}
    assert failed == {"r001", "r002", "r003", "r004", "r005"} and summary.count("ok") == 7
    assert "preparing row r001 was stopped after 0.3 s (render.stage_timeout)" in results["r001"]["error"]
    assert "tracking the face of avatar /in/hangs.mp4 was stopped" in results["r002"]["error"]
    assert "stitching row r003 was stopped" in results["r003"]["error"]
    assert set(executor.cancelled) == set(executor.hung)


def test_stage_tasks_the_executor_says_will_never_run_fail_their_rows_at_once(tmp_path):
    """Tasks that waited where the cluster no longer has room (a room whose nodes went) fail their
    rows as soon as the executor says so (`Executor.stranded`), not at `render.stage_timeout`."""

    class Strands(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.stuck: list[Any] = []
            self.cancelled: list[Any] = []
            self.asked = 0

        def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            handle = super().submit(fn, *args, **kwargs)
            if (fn.__name__ == "prepare_row" and args[0].id == "r001") or (
                fn.__name__ == "stitch_row" and args[0].row_id == "r003"
            ):
                self.stuck.append(handle)
            return handle

        def wait(self, handles: Any, timeout: float) -> Any:
            ready = [h for h in handles if h not in self.stuck]
            if not ready:
                time.sleep(min(timeout, 0.05))
            return ready[:1]

        def stranded(self) -> list[Any]:
            self.asked += 1
            return list(self.stuck) if len(self.stuck) == 2 else []

        def cancel(self, handle: Any) -> bool:
            self.cancelled.append(handle)
            return True

    out = tmp_path / "out"
    # a deadline far past the answer's, short enough that a campaign deaf to `stranded` fails here
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.stage_timeout=30"
    )
    rows = [Row(f"r{i:03d}", "/in/a.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(8)]
    executor = Strands()
    started = time.monotonic()
    summary = Campaign(cfg, rows, executor=executor).run()
    assert time.monotonic() - started < 25
    failed = {r.id: r.error for r in summary.rows if r.status == "failed"}
    assert set(failed) == {"r001", "r003"} and summary.count("ok") == 6
    assert failed["r001"] == (
        "StageStopped: preparing row r001 waited on nodes of the cluster that went; run the campaign again"
    )
    assert "stitching row r003 waited on nodes of the cluster that went" in failed["r003"]
    assert set(executor.cancelled) == set(executor.stuck)


def test_rows_whose_narration_encode_was_stranded_fail_saying_why(tmp_path):
    """A narration's encode that waited on nodes that went is stopped; the stitches waiting on it
    failed with the stop's side effect (Ray's TaskCancelledError), not its reason."""
    from concurrent.futures import CancelledError

    class Strands(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.stuck: Any = None

        def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            handle = super().submit(fn, *args, **kwargs)
            if fn.__name__ == "prepare_audio_track" and args[0].uri == "/in/b.wav" and self.stuck is None:
                self.stuck = handle
            return handle

        def wait(self, handles: Any, timeout: float) -> Any:
            return [h for h in handles if h is not self.stuck][:1]

        def stranded(self) -> list[Any]:
            return [self.stuck] if self.stuck is not None and self.stuck.error is None else []

        def cancel(self, handle: Any) -> bool:
            handle.error = CancelledError()  # as a task taking it as an argument then finds it
            return True

    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i:03d}", f"/in/{'ab'[i % 2]}.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(8)]
    summary = Campaign(cfg, rows, executor=Strands()).run()
    failed = {r.id: r.error or "" for r in summary.rows if r.status == "failed"}
    assert failed and set(failed) <= {"r001", "r003", "r005", "r007"}, failed
    assert all("narration" in e and "waited on nodes of the cluster that went" in e for e in failed.values()), failed


def test_a_failed_audio_encode_fails_only_the_rows_that_waited_on_it(tmp_path):
    """The first encode of narration a0 fails: rows that shared that task fail with its cause, and a
    later row with the same narration starts a new encode (it is not stuck with the failed one)."""
    calls = {"a0": 0}

    def flaky_track(audio, *args):
        if audio.uri.endswith("/a0.wav"):
            calls["a0"] += 1
            if calls["a0"] == 1:
                raise OSError("disk full while encoding")
        return STAGES["prepare_audio_track"](audio, *args)

    job, executor = _campaign(tmp_path)
    executor.stages = {**STAGES, "prepare_audio_track": flaky_track}
    summary = job.run()
    failed = {r.id: r.error for r in summary.rows if r.status == "failed"}
    assert failed and all(int(row_id[1:]) % 4 == 0 for row_id in failed)  # a0's rows only
    assert all("disk full while encoding" in error for error in failed.values())
    assert calls["a0"] == 2 and summary.count("ok") == ROWS - len(failed)
    assert any(r.status == "ok" and int(r.id[1:]) % 4 == 0 for r in summary.rows)


def test_the_results_table_is_written_when_stopping_the_renderers_fails(tmp_path, caplog):
    class BrokenClose(WatchedExecutor):
        def close(self) -> None:
            raise ConnectionError("the cluster went away")

    job, _ = _campaign(tmp_path)
    job.executor = job.actors.executor = BrokenClose(tmp_path / "out" / "_progress.json")
    summary = job.run()
    assert summary.count("ok") == ROWS
    assert len(read_results(str(tmp_path / "out" / "_results.parquet"))) == ROWS
    assert "could not stop the renderers: ConnectionError: the cluster went away" in caplog.text


def test_the_results_table_is_written_when_the_cluster_goes_away_mid_stitch(tmp_path):
    """The executor itself fails (a Ray client's connection lost) while rows stitch: the driver's
    wind-up waits for the stitches under way through the same executor, which fails again. Every
    row still gets its result in the table (the unfinished ones saying what ended the run), not none at all."""

    class GoneMidStitch(WatchedExecutor):
        def submit(self, fn: Any, *args: Any, num_gpus: float = 0.0) -> Any:
            handle = super().submit(fn, *args, num_gpus=num_gpus)
            if fn.__name__ == "stitch_row":
                stitches.add(id(handle))
                held.append(handle)  # (kept alive: ids of live objects are not reused)
            return handle

        def wait(self, handles: Any, timeout: float) -> Any:
            if len(held) >= 5 and any(id(h) in stitches for h in handles):
                raise ConnectionError("the cluster went away")
            return super().wait(handles, timeout)

    stitches: set[int] = set()
    held: list[Any] = []
    from heygem_ray.campaign import ENDED_BY_ERROR

    job, _ = _campaign(tmp_path)
    job.executor = job.actors.executor = GoneMidStitch(tmp_path / "out" / "_progress.json")
    with pytest.raises(ConnectionError):
        job.run()
    table = read_results(str(tmp_path / "out" / "_results.parquet"))
    assert sorted(r["id"] for r in table) == sorted(row.id for row in job.rows)
    ended = ENDED_BY_ERROR.format("ConnectionError: the cluster went away")
    assert all(r["status"] == "ok" or r["error"] == ended for r in table), table
    assert any(r["error"] == ended for r in table), table  # the cluster went before every row ended


def _counted(calls: list[str], fail: dict[str, BaseException] | None = None) -> dict[str, Any]:
    """STAGES, with prepare_avatar recording each avatar it tracks and raising `fail[avatar]` once."""
    fail = dict(fail or {})

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        calls.append(avatar)
        if avatar in fail:
            raise fail.pop(avatar)
        return STAGES["prepare_avatar"](avatar, *args)

    return {**STAGES, "prepare_avatar": prepare_avatar}


def _one_at_a_time(
    tmp_path: Path, avatars: list[str], stages: dict[str, Any], kind: type = SimulatedExecutor, **executor: Any
) -> Any:
    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.max_prepared_rows=1"
    )
    rows = [Row(f"r{i}", "/in/a.wav", avatar, str(out / f"r{i}.mp4")) for i, avatar in enumerate(avatars)]
    return Campaign(cfg, rows, executor=kind(actors=2, stages=stages, **executor)).run()


def _presenter_rewritten(
    tmp_path: Path, found: list[str], tracked: list[str], one_at_a_time: bool = True
) -> tuple[Any, list[str], SegmentsSeen]:
    """A campaign of one presenter whose bytes change under its name: row i finds them as
    `found[i]` (its fingerprint), and each tracking task, in turn, reads `tracked`'s next
    ("faceless": no face found). `one_at_a_time`: a row prepared only once the one before is
    answered (else rows join the tracking task under way). Its summary, the bytes each task
    tracked, and the executor (its segment jobs)."""
    from dataclasses import replace

    from heygem_ray.errors import InputError

    rows_found, tasks_read, calls = iter(found), iter(tracked), []

    def prepare_row(row: Any, cfg: Any, decode: bool = True) -> Any:
        return replace(STAGES["prepare_row"](row, cfg, decode), avatar_fingerprint=next(rows_found))

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        calls.append(fingerprint := next(tasks_read))
        if fingerprint == "faceless":
            raise InputError("avatar", avatar, "no face found")
        return replace(STAGES["prepare_avatar"](avatar, *args), fingerprint=fingerprint)

    out = tmp_path / "out"
    limit = ["render.max_prepared_rows=1"] if one_at_a_time else []
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", *limit)
    rows = [Row(f"r{i}", "/in/a.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(len(found))]
    executor = SegmentsSeen(actors=2, stages={**STAGES, "prepare_row": prepare_row, "prepare_avatar": prepare_avatar})
    return Campaign(cfg, rows, executor=executor).run(), calls, executor


def test_a_presenter_replaced_mid_campaign_is_tracked_again_for_the_rows_that_found_the_new_one(tmp_path):
    """A presenter rewritten under the same name between two rows: the driver answered the later
    rows with the track it kept of the old file (whose segments then refuse the new bytes, every
    later row of it failing). A row that found other bytes has them tracked."""
    summary, calls, executor = _presenter_rewritten(tmp_path, ["old", "new", "new"], ["old", "new"])
    assert summary.count("ok") == 3 and calls == ["old", "new"]
    seen = {(j.row_id, j.avatar_fingerprint) for j in executor.jobs}
    assert seen == {("r0", "old"), ("r1", "new"), ("r2", "new")}


def test_a_presenter_replaced_before_its_track_was_made_fails_the_row_prepared_from_the_old_one(tmp_path):
    """The presenter was rewritten after its row took its fingerprint and before its tracking task
    read it: the row rendered the new file under the old bytes' fingerprint, and its marker then
    kept the new video for the old bytes (restoring them skipped the row). It fails now, saying
    why; the next row, prepared from the new bytes, renders them."""
    summary, _, executor = _presenter_rewritten(tmp_path, ["old", "new"], ["new"])
    assert [r.status for r in summary.rows] == ["failed", "ok"]
    assert "/in/v.mp4: was replaced while the campaign ran" in summary.rows[0].error
    assert {j.row_id for j in executor.jobs} == {"r1"}


def test_a_presenter_mended_in_place_is_tracked_again_for_the_rows_that_found_the_new_bytes(tmp_path):
    """A presenter without a face fails its rows, and the fault is kept for its next rows (no
    tracking again per row); mended in place mid-run, the rows prepared from the new bytes kept
    failing with the old fault until the next run. They are tracked on the new bytes now."""
    summary, calls, _ = _presenter_rewritten(tmp_path, ["faceless", "faceless", "mended"], ["faceless", "mended"])
    assert [r.status for r in summary.rows] == ["failed", "failed", "ok"] and calls == ["faceless", "mended"]
    assert all("no face found" in r.error for r in summary.rows[:2])


@pytest.mark.parametrize("case", ["replaced", "mended"])
def test_rows_that_found_new_bytes_while_the_old_were_tracked_are_tracked_on_theirs(tmp_path, case):
    """Rows prepared from a presenter replaced (or mended in place) while its tracking task for the
    old bytes ran joined that task: they got the old track and failed "was replaced" (the old
    fault: "no face found"), though prepared from the new file. The next task tracks theirs."""
    old = "old" if case == "replaced" else "faceless"
    summary, calls, _ = _presenter_rewritten(tmp_path, [old, "new", "new", "new"], [old, "new"], one_at_a_time=False)
    assert [r.status for r in summary.rows] == ["ok" if case == "replaced" else "failed", "ok", "ok", "ok"]
    assert calls == [old, "new"]  # the rows joined the old task (no task each), then one of theirs


def test_an_avatar_the_store_failed_is_tracked_again_for_the_next_row(tmp_path):
    """A tracking task that failed for the infrastructure (storage down past its retries) fails the
    rows that waited for it; the next row with that avatar tries again. An avatar's own fault
    (InputError) is remembered: its next rows fail without tracking it again."""
    from heygem_ray.errors import InputError

    calls: list[str] = []
    fail = {"/in/v.mp4": OSError("storage down"), "/in/bad.mp4": InputError("avatar", "/in/bad.mp4", "no face")}
    summary = _one_at_a_time(tmp_path, ["/in/v.mp4"] * 3 + ["/in/bad.mp4"] * 2, _counted(calls, fail))
    assert [r.status for r in summary.rows] == ["failed", "ok", "ok", "failed", "failed"]
    assert "storage down" in summary.rows[0].error and "no face" in summary.rows[4].error
    assert calls == ["/in/v.mp4", "/in/v.mp4", "/in/bad.mp4"]


def test_an_avatar_that_keeps_crashing_its_tracking_worker_is_taken_as_the_cause(tmp_path):
    """A clip that runs its tracking task out of memory (or crashes its decoder) loses its worker
    each time, after Ray's own retries: a lost worker fails the rows that waited, and the next row
    tries again, but only AVATAR_CRASHES times; then the avatar is the cause, and its later rows
    fail at once, saying so, rather than each batch killing workers again."""
    from heygem_ray.shared_work import AVATAR_CRASHES

    class WorkerLost(Exception):
        pass

    class LosesWorkers(SimulatedExecutor):
        def actor_lost(self, exc: BaseException) -> bool:
            return isinstance(exc, WorkerLost)

    calls: list[str] = []
    stages = _counted(calls)
    tracked = stages["prepare_avatar"]

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        if avatar == "/in/huge.mp4":
            calls.append(avatar)
            raise WorkerLost("worker died")
        return tracked(avatar, *args)

    stages["prepare_avatar"] = prepare_avatar
    summary = _one_at_a_time(tmp_path, ["/in/huge.mp4"] * 5 + ["/in/v.mp4"], stages, LosesWorkers)
    assert calls.count("/in/huge.mp4") == AVATAR_CRASHES
    assert [r.status for r in summary.rows] == ["failed"] * 5 + ["ok"]
    assert "lost the worker tracking its face 2 times" in summary.rows[-2].error, summary.rows[-2].error


@pytest.mark.parametrize("bound", ["AVATAR_TRACKS", "AVATAR_TRACK_BYTES"])
def test_the_driver_keeps_a_bounded_number_of_avatar_tracks(tmp_path, monkeypatch, bound):
    """Memory stays flat in the number of distinct avatars and their length: past `AVATAR_TRACKS`
    tracks, or `AVATAR_TRACK_BYTES` of them (256 three-hour clips took 1.7 GB), the least recently
    used track is dropped, and a later row with that avatar has it loaded again (from the cache)."""
    from benchmarks.driver import _prepare_avatar
    from heygem_ray import shared_work

    track = _prepare_avatar("/in/a.mp4")
    two = {"AVATAR_TRACKS": 2, "AVATAR_TRACK_BYTES": 2 * (track.pts.nbytes + track.boxes.nbytes) + 1}
    monkeypatch.setattr(shared_work, bound, two[bound])
    calls: list[str] = []
    summary = _one_at_a_time(
        tmp_path, ["/in/a.mp4", "/in/b.mp4", "/in/a.mp4", "/in/c.mp4", "/in/b.mp4"], _counted(calls)
    )
    assert summary.count("ok") == 5
    assert calls == ["/in/a.mp4", "/in/b.mp4", "/in/c.mp4", "/in/b.mp4"]  # a stayed (used again), b was dropped


def test_no_avatar_is_tracked_once_no_renderer_can_start(tmp_path):
    calls: list[str] = []
    summary = _one_at_a_time(tmp_path, ["/in/a.mp4", "/in/b.mp4"], _counted(calls), start_error="CheckpointError: bad")
    assert [r.status for r in summary.rows] == ["failed", "failed"]
    assert all("renderer could not start: CheckpointError: bad" in r.error for r in summary.rows)
    assert calls == []


@pytest.mark.parametrize("stop", ["no renderer", "cache limit"])
def test_rows_that_will_not_render_are_not_decoded(tmp_path, stop):
    """Once no renderer can start, or the narrations this run decoded reach `limits.max_cache_gb`
    (a few MB of upload decode to GBs: the studio's user cache filled the disk outside the quota),
    the rows not prepared yet are asked only whether they are done, their narrations not decoded
    to fail afterwards."""
    decoded: list[bool] = []

    def prepare_row(row: Any, cfg: Any, decode: bool = True) -> Any:
        decoded.append(decode)
        prep = STAGES["prepare_row"](row, cfg, decode)
        return replace(prep, skipped=True, audio=None) if row.id == "r199" else prep  # a rerun's finished one

    out = tmp_path / "out"
    ten_seconds = 16_000 * 10 * 4  # bytes of each row's decoded narration (STAGES)
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet",
        f"output={out}",
        "render.progress=false",
        "render.max_prepared_rows=4",
        f"limits.max_cache_gb={5 * ten_seconds / 2**30:.12f}",
    )
    rows = [Row(f"r{i}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(200)]
    error = "CheckpointError: bad" if stop == "no renderer" else None
    executor = SimulatedExecutor(actors=2, stages={**STAGES, "prepare_row": prepare_row}, start_error=error)
    summary = Campaign(cfg, rows, executor=executor).run()
    assert len(decoded) == 200 and summary.count("skipped") == 1
    assert sum(decoded) <= (4 if stop == "no renderer" else 5 + 4)  # those under way when it was known
    failed = [r.error for r in summary.rows if r.status == "failed"]
    why = "renderer could not start" if stop == "no renderer" else "reached its cache limit of 3.1 MiB"
    assert len(failed) >= 190 and all(why in e for e in failed), failed[-1]
    assert summary.count("ok") == (0 if stop == "no renderer" else sum(decoded))
    if stop == "no renderer":  # rows failed without work go at a rerun's pace, as skipped ones do
        from heygem_ray.campaign import SKIPPING_RATE

        paced = replace(cfg, render=replace(cfg.render, max_prepared_rows=0))
        job = Campaign(paced, rows, executor=SimulatedExecutor(actors=2, stages=STAGES, start_error=error))
        job.run()
        assert job.prepare_limit() == 8 * SKIPPING_RATE


def _narrations_and_tracks(asked: list[float | None], face_from: int = 0) -> dict[str, Any]:
    """STAGES, with a row's narration as long as its audio's name says (/in/a<seconds>.wav) and a
    1,000-frame avatar tracked as far as each `prepare_avatar` call asks (recorded in `asked`), a
    face from frame `face_from` on."""
    import numpy as np

    from heygem_ray.detect.track import frames_to_track, settled_frames
    from heygem_ray.media.video import VideoInfo
    from heygem_ray.plan import output_frame_count
    from heygem_ray.prepare import AudioInfo, AvatarTrack, RowPrep

    total, info = 1000, VideoInfo(False, 25.0, "25/1", 1280, 720, 0, 1000)

    def prepare_row(row: Any, cfg: Any, decode: bool = True) -> Any:
        seconds = float(Path(row.audio).stem[1:])
        return RowPrep(f"fp-{row.id}", False, AudioInfo(row.audio, row.audio, int(16_000 * seconds), 0.1, "x"), None)

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        seconds = args[
            8
        ]  # prepare_avatar(uri, box, cfg, cache, still_fps, max_fps, max_side, max_pixels, options, seconds, ...)
        asked.append(seconds)
        tracked = frames_to_track(total, min(total, output_frame_count(seconds, 25.0)), 2)
        boxes = np.tile(np.array([[500, 100, 800, 500]], np.int32), (tracked, 1))
        boxes[:face_from] = 0
        settled = settled_frames(tracked, total, 2) if tracked < total else None
        return AvatarTrack(avatar, "v", info, np.arange(total), boxes, settled)

    return {**STAGES, "prepare_row": prepare_row, "prepare_avatar": prepare_avatar}


def _narrations(tmp_path: Path, seconds: list[int], stages: dict[str, Any]) -> Any:
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i}", f"/in/a{s}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i, s in enumerate(seconds)]
    return Campaign(cfg, rows, executor=SimulatedExecutor(actors=2, stages=stages)).run()


def test_an_avatar_is_tracked_as_far_as_its_longest_waiting_narration_one_task_at_a_time(tmp_path):
    """The first row's narration (4 s: 100 frames) starts the avatar's track; rows that come while
    it runs wait. It serves those it reaches (4 s and 2 s); one more task, asked for the longest
    of the others (30 s), serves the rest (8 s and 30 s): two tasks for five rows, none repeated."""
    asked: list[float | None] = []
    summary = _narrations(tmp_path, [4, 4, 8, 30, 2], _narrations_and_tracks(asked))
    assert summary.count("ok") == 5
    assert asked == [4.0, 30.0]
    asked.clear()
    assert _narrations(tmp_path / "b", [30, 8, 60], _narrations_and_tracks(asked)).count("ok") == 3
    assert asked == [30.0, 60.0]  # 8 s: within the 30 s track


def test_a_row_whose_frames_show_no_face_fails_and_a_longer_one_renders(tmp_path):
    """The presenter walks in at frame 300: a 4 s narration (100 frames) has no face to lip-sync and
    fails for it, while a 30 s one over the same clip renders."""
    asked: list[float | None] = []
    summary = _narrations(tmp_path, [4, 30], _narrations_and_tracks(asked, face_from=300))
    assert [r.status for r in summary.rows] == ["failed", "ok"]
    assert summary.rows[0].error == "avatar /in/v.mp4: no face found in the 100 frame(s) this narration shows"


def test_a_fault_past_a_known_track_fails_only_the_rows_it_does_not_reach(tmp_path):
    """The avatar's 4 s track is made; the 30 s task then fails on the avatar itself (a frame it
    cannot decode): that row fails, a 2 s row is still served by the track, and a 60 s row fails
    with the fault, neither tracking again."""
    from heygem_ray.errors import InputError

    asked: list[float | None] = []
    stages = _narrations_and_tracks(asked)
    tracked = stages["prepare_avatar"]

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        if args[8] == 30.0:  # its narration seconds
            asked.append(30.0)
            raise InputError("avatar", avatar, "decoding failed (Invalid data found when processing input)")
        return tracked(avatar, *args)

    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.max_prepared_rows=1"
    )
    rows = [Row(f"r{i}", f"/in/a{s}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i, s in enumerate([4, 30, 2, 60])]
    stages = {**stages, "prepare_avatar": prepare_avatar}
    summary = Campaign(cfg, rows, executor=SimulatedExecutor(actors=2, stages=stages)).run()
    assert [r.status for r in summary.rows] == ["ok", "failed", "ok", "failed"]
    assert "decoding failed" in summary.rows[1].error and "decoding failed" in summary.rows[3].error
    assert asked == [4.0, 30.0]


def test_a_marker_whose_video_is_gone_is_not_taken_for_a_published_row(tmp_path):
    """A row renders again when its video was deleted though its marker stayed; a stop before its
    stitch must then report it failed, not ok on the strength of that marker."""
    import time

    from heygem_ray.layout import CampaignLayout
    from heygem_ray.markers import Marker, write_marker
    from heygem_ray.prepare import AudioInfo
    from heygem_ray.rows import RowState

    layout = CampaignLayout(str(tmp_path))
    row = Row("r", "/in/a.wav", "/in/v.mp4", str(tmp_path / "r.mp4"))
    state = RowState.prepared(row, AudioInfo("/in/a.wav", "a", 16_000, 0.1, "x"), "fp")
    write_marker(layout.marker("r"), Marker("r", "fp", row.output, 25, 1.0, time.time()))
    assert state.published(layout) is None
    (tmp_path / "r.mp4").write_bytes(b"the video")
    published = state.published(layout)
    assert published is not None and published.fingerprint == "fp"


def test_a_run_knows_the_videos_it_published_by_its_token_not_by_another_hosts_clock(tmp_path):
    """A stitch that failed, or was stopped, after publishing: its video counts as this run's when
    its marker says this run wrote it. By the times alone, a stitch host's clock some minutes behind
    the driver's read as "published before this row started": reported failed, its video out."""
    import time

    from heygem_ray.layout import CampaignLayout
    from heygem_ray.markers import Marker, write_marker
    from heygem_ray.prepare import AudioInfo
    from heygem_ray.rows import RowState

    layout = CampaignLayout(str(tmp_path))
    row = Row("r", "/in/a.wav", "/in/v.mp4", str(tmp_path / "r.mp4"))
    state = RowState.prepared(row, AudioInfo("/in/a.wav", "a", 16_000, 0.1, "x"), "fp")
    (tmp_path / "r.mp4").write_bytes(b"the video")
    behind = state.started - 300  # the stitch host's clock, five minutes behind the driver's
    write_marker(layout.marker("r"), Marker("r", "fp", row.output, 25, 1.0, behind, bytes=9, run="this-run"))
    assert state.published_by(layout, "this-run") is not None
    assert state.published_by(layout, "an-earlier-run") is None  # `force`: an earlier run's, still there
    write_marker(layout.marker("r"), Marker("r", "fp", row.output, 25, 1.0, time.time() + 300, bytes=9, run="then"))
    assert state.published_by(layout, "this-run") is None  # however late its clock says it was
    write_marker(layout.marker("r"), Marker("r", "fp", row.output, 25, 1.0, behind, bytes=9))  # a marker of before
    assert state.published_by(layout, "this-run") is None


def test_a_defect_met_for_one_row_fails_that_row_and_the_campaign_goes_on(tmp_path):
    """A track with fewer boxes than it claims (a defect, here made on purpose) makes building the
    row's segment jobs raise: that row fails with the error, and the rows after it render."""
    from heygem_ray.prepare import AvatarTrack

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        track = STAGES["prepare_avatar"](avatar, *args)
        if avatar.endswith("short.mp4"):
            return AvatarTrack(track.uri, track.fingerprint, track.info, track.pts, track.boxes[:10], None)
        return track

    summary = _one_at_a_time(
        tmp_path, ["/in/a.mp4", "/in/short.mp4", "/in/a.mp4"], {**STAGES, "prepare_avatar": prepare_avatar}
    )
    assert [r.status for r in summary.rows] == ["ok", "failed", "ok"]
    assert summary.rows[1].error.startswith("internal error: IndexError")


def test_a_campaign_whose_output_lock_is_lost_stops_and_writes_nothing_more_there(tmp_path):
    """The output lock taken over by another run: the campaign stops on its next turn, stops its
    renderers, and leaves the output root's table, feed, report and segments to the other run."""
    from heygem_ray.output_lock import OutputLostError

    job, executor = _campaign(tmp_path)
    out = tmp_path / "out"
    closed, cancelled = [], []
    executor.close = lambda: closed.append(1)  # type: ignore[method-assign]
    executor.cancel = lambda handle: cancelled.append(handle) or True  # type: ignore[method-assign]
    wait = executor.wait

    def stitches_under_way(handles: Any, timeout: float) -> Any:  # a stitch takes a while
        return [h for h in wait(handles, timeout) if job._inflight.get(h, ("",))[0] != "stitched"]

    executor.wait = stitches_under_way  # type: ignore[method-assign]

    def guard() -> None:
        if any(event == "stitched" for event, _ in job._inflight.values()):
            for name in ("_progress.json", "_report.html"):  # the other run's now
                (out / name).write_text("theirs")
            raise OutputLostError("taken over")

    job.guard = guard
    with pytest.raises(OutputLostError):
        job.run()
    assert closed == [1]
    # its stitches under way stopped too: they would publish into a root the other run owns now
    assert cancelled and all(job._inflight.get(h, ("stitched",))[0] == "stitched" for h in cancelled)
    assert not (out / "_results.parquet").exists()
    assert (out / "_progress.json").read_text() == (out / "_report.html").read_text() == "theirs"


def test_refused_rows_fail_at_once_and_are_never_prepared(tmp_path):
    job, executor = _campaign(tmp_path)
    refused = {3: "manifest row 3: box '1' must be four numbers", 7: "manifest row 7: empty audio"}
    rows = [Row(f"#{i}", "", "", "", None, refused[i]) if i in refused else row for i, row in enumerate(job.rows)]
    prepared = []
    submit = executor.submit

    def watched(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn.__name__ == "prepare_row":
            prepared.append(args[0].id)
        return submit(fn, *args, **kwargs)

    executor.submit = watched  # type: ignore[method-assign]
    summary = Campaign(job.cfg, rows, executor=executor).run()
    results = {r.id: r for r in summary.rows}
    assert [r.id for r in summary.rows] == [row.id for row in rows]
    assert summary.count("ok") == ROWS - 2
    assert results["#3"].status == "failed" and results["#3"].error == refused[3]
    assert results["#7"].error == refused[7]
    assert len(prepared) == ROWS - 2 and not {"#3", "#7"} & set(prepared)


def test_finished_rows_old_work_folders_go_at_the_end_and_failed_rows_keep_theirs(tmp_path, request):
    """A row re-rendered after a change (another cut, codec or input) leaves the folder of its earlier
    segments: the campaign's end removes it once the row is finished. Ids that begin like another
    row's id are not mistaken for it."""
    from heygem_ray import storage
    from heygem_ray.layout import CampaignLayout
    from heygem_ray.rows import remove_old_work

    (tmp_path / "out1" / "_work" / "a-0123456789abcdef-libx264-n3").mkdir(parents=True)  # another campaign's
    for root in (str(tmp_path / "out[1]"), "s3://heygem-work/out"):  # "[1]": a name, not a pattern
        if root.startswith("s3://"):
            request.getfixturevalue("s3_endpoint")
            import boto3

            boto3.client("s3").create_bucket(Bucket="heygem-work")
        layout = CampaignLayout(root)
        fp = "0123456789abcdef"
        names = {
            f"a-{fp}-libx264-n3": False,  # finished row "a": earlier cut
            f"a-{fp[::-1]}-h264_nvenc-n4": False,  # ... earlier input and codec
            f"a-{fp}-libx264-0a1b2c3d-n4": False,  # ... earlier stream shape
            f"a-b-{fp}-libx264-n2": True,  # row "a-b": failed
            f"a-{fp}-{fp}-libx264-n2": True,  # row "a-0123456789abcdef": failed
            f"failed-{fp}-libx264-n1": True,
            "notes": True,  # not ours
        }
        for name in names:
            storage.write_bytes(storage.join(layout.work_root, name, "seg-00000.mp4"), b"x")
        assert remove_old_work(layout, ["a", "never-started"]) == 3
        for name, kept in names.items():
            assert storage.exists(storage.join(layout.work_root, name, "seg-00000.mp4")) == kept, (root, name)
    assert (tmp_path / "out1" / "_work" / "a-0123456789abcdef-libx264-n3").exists()
    assert remove_old_work(CampaignLayout(str(tmp_path / "nowhere")), ["a"]) == 0


def test_the_campaigns_end_removes_its_finished_rows_old_work(tmp_path):
    from heygem_ray import storage

    job, _ = _campaign(tmp_path)
    old = storage.join(job.cfg.layout.work_root, "r001-0123456789abcdef-libx264-n9", "seg-00000.mp4")
    kept = storage.join(job.cfg.layout.work_root, "gone-row-0123456789abcdef-libx264-n9", "seg-00000.mp4")
    storage.write_bytes(old, b"x")
    storage.write_bytes(kept, b"x")
    assert job.run().count("ok") == ROWS
    assert not storage.exists(old) and storage.exists(kept)


class _Failing(SimulatedExecutor):
    """Segments of some rows raise what `errors` names, once or always; `ready` of actor 1 raises
    an error the driver knows nothing of."""

    def __init__(self, errors: dict[str, tuple[BaseException, bool]]):
        super().__init__(actors=3)
        self.errors, self.calls = errors, []

    def call(self, actor: int, method: str, *args: Any) -> Any:
        from benchmarks.driver import Done

        if method == "ready" and actor == 1:
            return Done(error=ValueError("a failure nobody foresaw"))
        if method == "render_segment":
            job = args[0]
            self.calls.append((job.row_id, job.index, actor))
            error, always = self.errors.get(job.row_id, (None, False))
            if error is not None:
                if not always:
                    del self.errors[job.row_id]
                return Done(error=error)
        return super().call(actor, method, *args)


def test_segment_failures_are_retried_only_where_a_retry_can_help(tmp_path):
    """A storage error the storage layer retried already and bad input fail the row at once (another
    OSError, a node's, goes again);
    a renderer's own failure goes again, to `render.max_attempts`; a renderer that lost its model
    is asked `ready` again rather than given up; an actor's answer the driver does not know retires
    that actor, not the campaign."""
    from heygem_ray.errors import InputError, RendererStartError
    from heygem_ray.storage import NodeCacheError

    job, _ = _campaign(tmp_path)
    store_down = OSError("store down past its retries")
    store_down.storage_retried = True  # as storage.retrying leaves it
    executor = _Failing(
        {
            "r000": (store_down, True),
            "r005": (NodeCacheError("node cache /c cannot be used"), False),  # that node's: another may do
            "r001": (InputError("avatar", "/in/v1.mp4", "not a readable video"), True),
            "r002": (RuntimeError("cuda hiccup"), False),
            "r003": (RuntimeError("always broken"), True),
            "r004": (RendererStartError("weights not loaded (storage down)"), False),
        }
    )
    summary = Campaign(job.cfg, job.rows, executor=executor).run()
    results = {r.id: r for r in summary.rows}
    tries = {row_id: sum(1 for r, _, _ in executor.calls if r == row_id) for row_id in ("r000", "r001", "r003")}
    assert results["r000"].status == "failed" and "store down" in results["r000"].error and tries["r000"] == 1
    assert results["r001"].status == "failed" and "not a readable video" in results["r001"].error
    assert tries["r001"] == 1
    assert results["r002"].status == "ok"
    assert results["r003"].status == "failed" and tries["r003"] == job.cfg.render.max_attempts
    assert results["r004"].status == "ok" and results["r005"].status == "ok"
    first = next(n for n, (r, _, _) in enumerate(executor.calls) if r == "r004")
    lost_model = executor.calls[first][2]
    assert lost_model in {actor for _, _, actor in executor.calls[first + 1 :]}  # asked again, working again
    assert summary.count("ok") == ROWS - 3
    assert not {actor for _, _, actor in executor.calls} & {1}  # retired at its odd answer


class _PoisonedActor(SimulatedExecutor):
    """Renderer actors that render their calls in order, oldest first, as a Ray actor does, taking
    turns; a segment of a row in `poison` kills its actor's process (a decoder's segfault, an
    out-of-memory kill), and with it fails every call queued on it. Ray restarts it each time."""

    class Died(Exception):
        pass

    class Call(Done):
        def __init__(self, job: Any) -> None:
            super().__init__()
            self.job, self.done = job, False

    def __init__(self, poison: set[str], actors: int = 1) -> None:
        super().__init__(actors=actors)
        self.poison, self.deaths = poison, [0] * actors
        self.queued: list[list[_PoisonedActor.Call]] = [[] for _ in range(actors)]  # the one rendering first
        self.turn = 0

    def call(self, actor: int, method: str, *args: Any) -> Any:
        if method != "render_segment":
            return super().call(actor, method, *args)
        self.queued[actor].append(self.Call(args[0]))
        return self.queued[actor][-1]

    def wait(self, handles: Any, timeout: float) -> Any:
        busy = [a for a in range(self.actors) if self.queued[a]]
        if not any(getattr(h, "done", True) for h in handles) and busy:
            actor = busy[self.turn % len(busy)]
            self.turn += 1
            queued = self.queued[actor]
            running = queued[0]
            if running.job.row_id in self.poison:
                self.deaths[actor] += 1
                for call in queued:
                    call.error, call.done = self.Died("renderer actor died"), True
                queued.clear()
            else:
                running.result, running.done = super().call(actor, "render_segment", running.job).result, True
                queued.pop(0)
        return [h for h in handles if getattr(h, "done", True)][:1]

    def actor_lost(self, exc: BaseException) -> bool:
        return isinstance(exc, self.Died)

    def restarts(self, actor: int) -> int:
        return self.deaths[actor]

    def all_restarts(self) -> list[int]:
        return list(self.deaths)


def test_a_segment_that_kills_its_renderer_uses_up_its_own_tries_not_those_queued_behind_it(tmp_path):
    """A row whose input kills the renderer process takes down the calls queued behind it on that
    actor too. Only the segment that was rendering is charged a try: the others go again as if
    never sent. Charged each, rows that only waited behind the bad one failed with it (with no
    retries, `render.max_attempts=1`, at its first crash); now it fails alone."""
    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet",
        f"output={out}",
        "render.progress=false",
        "render.segments_per_actor=4",
        "render.max_attempts=1",
    )
    rows = [Row(f"r{i:03d}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(6)]
    executor = _PoisonedActor({"r001"})
    summary = Campaign(cfg, rows, executor=executor).run()
    results = {r.id: r for r in summary.rows}
    assert results["r001"].status == "failed" and "failed after 1 attempt(s)" in results["r001"].error
    assert sum(executor.deaths) == cfg.render.max_attempts
    assert all(results[r].status == "ok" for r in results if r != "r001"), {r.id: r.error for r in summary.rows}


def test_a_row_that_kills_every_renderer_takes_one_down_a_try_not_one_for_each_of_its_segments(tmp_path):
    """A row whose input kills any renderer it meets, its segments sent out together to many
    actors, took down two actors for each of its segments (28 restarts, each a model load, for a
    row of 10 segments on 8 actors) before one of them used up its tries. After its first crash its
    other segments wait for the one that crashed to render elsewhere: it never does, and the row
    fails after its tries, having taken down the actors its segments were on then and one a try."""
    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.segment_seconds=1"
    )
    rows = [Row(f"r{i:03d}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(20)]
    executor = _PoisonedActor({"r003"}, actors=8)
    summary = Campaign(cfg, rows, executor=executor).run()
    results = {r.id: r for r in summary.rows}
    assert results["r000"].segments >= 10
    assert results["r003"].status == "failed" and "attempt(s)" in results["r003"].error
    # the segments out when the first one crashed (at most one an actor), then one a try
    assert sum(executor.deaths) <= 8 + cfg.render.max_attempts, executor.deaths
    assert all(results[r].status == "ok" for r in results if r != "r003"), {r.id: r.error for r in summary.rows}


def test_gpu_face_detection_asks_for_a_gpu_share_only_where_the_actors_leave_one(tmp_path):
    """Actors holding every GPU share would leave a detection task waiting for ever: it then
    detects on the CPU."""
    from heygem_ray.shared_work import SharedWork

    class OnOneGpu(SimulatedExecutor):
        def resources(self) -> dict[str, float]:
            return {"CPU": 16.0, "GPU": 1.0}

    overrides = ("cluster=gpu", "detector=s3fd", "detector.checkpoint=/m/s3fd.pth", "cluster.actor.num_gpus=0.125")
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={tmp_path}", *overrides)
    assert SharedWork(cfg, OnOneGpu(actors=7))._detect_gpus == 0.125
    assert SharedWork(cfg, OnOneGpu(actors=8))._detect_gpus == 0.0


def test_gpu_face_detection_waits_for_the_gpus_of_a_cluster_that_scales_from_none(tmp_path):
    """GPU workers scaled to none when the campaign starts (deploy.md's KubeRay cluster): the share
    was decided from the GPUs there then, none, and every avatar was tracked on one CPU (seconds a
    frame with S3FD) after the actors' nodes brought GPUs. Tracking waits for the actors now."""

    class ScalingFromNone(SimulatedExecutor):
        def __init__(self, actors: int) -> None:
            super().__init__(actors)
            self.readied = 0
            self.shares: list[tuple[float, float]] = []  # (GPUs in the cluster, share asked) of each tracking

        def call(self, actor: int, method: str, *args: Any) -> Done:
            self.readied += method == "ready"
            return super().call(actor, method, *args)

        def resources(self) -> dict[str, float]:  # the actors' nodes join as they start
            return {"CPU": 16.0, "GPU": 2.0 if self.readied >= self.actors else 0.0}

        def submit(self, fn: Any, *args: Any, num_gpus: float = 0.0) -> Done:
            if fn.__name__ == "prepare_avatar":
                self.shares.append((self.resources()["GPU"], num_gpus))
            return super().submit(fn, *args, num_gpus=num_gpus)

    out = tmp_path / "out"
    overrides = ("cluster=gpu", "detector=s3fd", "detector.checkpoint=/m/s3fd.pth", "render.progress=false")
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "cluster.actors=8", *overrides)
    rows = [Row(f"r{i:03d}", f"/in/a{i}.wav", f"/in/v{i % 3}.mp4", str(out / f"r{i:03d}.mp4")) for i in range(12)]
    executor = ScalingFromNone(actors=8)
    assert Campaign(cfg, rows, executor=executor).run().count("ok") == 12
    assert len(executor.shares) == 3 and set(executor.shares) == {(2.0, 0.125)}, executor.shares


def test_segments_held_by_an_actor_that_never_comes_back_go_to_the_others(tmp_path, monkeypatch):
    """An actor lost with its node, whose restart finds no room: Ray keeps the calls queued on it
    for ever. After LOST_ACTOR_SECONDS its segments go to the other actors and the campaign ends."""

    from benchmarks.driver import Done
    from heygem_ray import actor_pool, campaign

    monkeypatch.setattr(campaign, "LOST_ACTOR_SECONDS", 0.3)
    monkeypatch.setattr(actor_pool, "RESTART_CHECK_SECONDS", 0.0)

    class NeverDone(Done):
        """A call queued on the lost actor: it never finishes. (A type, not a set of ids: a
        handle the campaign dropped frees its id for the next handle.)"""

    class NodeGone(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=3)
            self.gone, self.calls = False, 0

        def call(self, actor: int, method: str, *args: Any) -> Any:
            if actor == 0 and method == "render_segment":
                self.calls += 1
                self.gone = self.gone or self.calls >= 3
            if actor == 0 and self.gone:
                return NeverDone()
            return super().call(actor, method, *args)

        def wait(self, handles: Any, timeout: float) -> Any:
            return _first_that_ends(handles, NeverDone)

        def restarts(self, actor: int) -> int:
            return 1 if actor == 0 and self.gone else 0

        def all_restarts(self) -> list[int]:
            return [self.restarts(i) for i in range(self.actors)]

    job, _ = _campaign(tmp_path)
    executor = NodeGone()
    summary = run_within(Campaign(job.cfg, job.rows, executor=executor), 30)
    assert summary is not None, "the campaign waited for ever on the lost actor"
    assert executor.gone and summary.count("ok") == ROWS


@pytest.mark.parametrize("never_ready", [{2}, {0, 1, 2}])
def test_an_actor_that_never_becomes_ready_is_given_up_at_its_start_timeout(tmp_path, monkeypatch, never_ready):
    """An actor no node has room for (a GPU node that never joins, more actors than the cluster
    holds), or whose model load never ends, was waited for for ever: with none ready, every row
    waited. Past `cluster.actor_start_timeout` it is given up; the others render, and with none
    left the rows fail saying why."""

    from benchmarks.driver import Done
    from heygem_ray import actor_pool

    monkeypatch.setattr(actor_pool, "RESTART_CHECK_SECONDS", 0.0)

    class NeverDone(Done):
        pass

    class NoRoom(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=3)
            self.stopped: list[int] = []

        def call(self, actor: int, method: str, *args: Any) -> Any:
            return NeverDone() if actor in never_ready else super().call(actor, method, *args)

        def wait(self, handles: Any, timeout: float) -> Any:
            time.sleep(0.01)  # a campaign that lasts past the timeout
            return _first_that_ends(handles, NeverDone)

        def stop(self, actor: int) -> None:
            self.stopped.append(actor)

    job, _ = _campaign(tmp_path)
    cfg = replace(job.cfg, cluster=replace(job.cfg.cluster, actor_start_timeout=0.5))
    executor = NoRoom()
    campaign = Campaign(cfg, job.rows, executor=executor)
    summary = run_within(campaign, 30)
    assert summary is not None, "the campaign waited for ever on actors that never started"
    assert sorted(executor.stopped) == sorted(never_ready)
    assert "not ready 0.5 s after it was started (cluster.actor_start_timeout)" in (
        campaign.actors.actors[2].failed or ""
    )
    if len(never_ready) < 3:
        assert summary.count("ok") == ROWS
    else:
        assert summary.count("failed") == ROWS
        assert all("renderer could not start: not ready 0.5 s" in (r.error or "") for r in summary.rows)


def _first_that_ends(handles: Any, never: type) -> list:
    """As Ray's `wait(num_returns=1)` with calls of kind `never` that never end: the first other
    handle, after a short nap when there is none."""
    ready = [h for h in handles if not isinstance(h, never)][:1]
    if not ready:
        time.sleep(0.05)
    return ready


@pytest.mark.parametrize("restartable", [True, False])
def test_a_renderer_hung_on_a_segment_is_restarted_and_the_campaign_ends(tmp_path, restartable):
    """An actor whose call never returns (a GPU or decoder hang, a read that never ends) while its
    process stays up: past `render.segment_timeout` it is restarted (or, where the executor cannot,
    given up) and its segments render on the others. Only the segment it hung on is charged a try:
    with `render.max_attempts=1` it fails its row, the one queued behind it renders."""

    from benchmarks.driver import Done

    class Hangs(Done):
        """The call the actor hangs on, and any sent to it before its restart."""

    class HangsOnce(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.hung_rows: list[str] = []
            self.restarted = False

        def call(self, actor: int, method: str, *args: Any) -> Any:
            hangs = actor == 0 and not self.restarted and method == "render_segment"
            if hangs and (self.hung_rows or args[0].row_id == "r002"):
                self.hung_rows.append(args[0].row_id)
                return Hangs()
            return super().call(actor, method, *args)

        def wait(self, handles: Any, timeout: float) -> Any:
            return _first_that_ends(handles, Hangs)

        def restart(self, actor: int) -> bool:
            self.restarted = self.restarted or (actor == 0 and restartable)
            return restartable

    job, _ = _campaign(tmp_path)
    # 2 s: the healthy actor's calls, answered at once, wait for the driver's turn (longer on a loaded machine)
    cfg = replace(job.cfg, render=replace(job.cfg.render, segment_timeout=2.0, max_attempts=1))
    executor = HangsOnce()
    campaign = Campaign(cfg, job.rows, executor=executor)
    summary = run_within(campaign, 30)
    assert summary is not None, "the campaign waited for ever on the hung actor"
    results = {r.id: r for r in summary.rows}
    assert len(executor.hung_rows) == 2, executor.hung_rows  # the one it hung on, one queued behind
    hung, behind = executor.hung_rows
    assert results[hung].status == "failed" and "its renderer hung (no segment back in 2 s)" in results[hung].error
    assert results[behind].status == "ok"
    assert summary.count("ok") == ROWS - 1
    # restarted, it is asked `ready` again and kept; one the executor cannot restart is given up
    given_up = campaign.actors.actors[0].failed
    assert (given_up is None) if restartable else ("hung (no segment back in 2 s)" in given_up)


def test_an_actor_that_hangs_on_every_segment_is_retired_and_no_row_fails_for_it(tmp_path):
    """A renderer that hangs on every segment (a stuck mount on its node, a wedged decoder) was
    restarted and given work again for the whole campaign, each hang charging a segment a try that
    its retry could spend on the same actor: it was never counted as a miss. A segment it hung on
    now stays off it, and three that render elsewhere retire it."""
    from benchmarks.driver import Done

    class Hangs(Done):
        """A call that never ends."""

    class HangsAlways(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.hangs = 0

        def call(self, actor: int, method: str, *args: Any) -> Any:
            if actor == 0 and method == "render_segment":
                self.hangs += 1
                return Hangs()
            if method == "render_segment":  # the campaign lasts for several of the other's hangs
                time.sleep(0.15)
            return super().call(actor, method, *args)

        def wait(self, handles: Any, timeout: float) -> Any:
            return _first_that_ends(handles, Hangs)

        def restart(self, actor: int) -> bool:
            return True

    job, _ = _campaign(tmp_path)
    cfg = replace(job.cfg, render=replace(job.cfg.render, segment_timeout=1.0))
    executor = HangsAlways()
    campaign = Campaign(cfg, job.rows, executor=executor)
    summary = run_within(campaign, 90)
    assert summary is not None, "the campaign waited for ever on the hanging actor"
    assert summary.count("ok") == ROWS, [r.error for r in summary.rows if r.error]
    assert "hung (no segment back in 1 s)" in (campaign.actors.actors[0].failed or ""), campaign.actors.actors[0]
    assert executor.hangs <= 5 * cfg.render.segments_per_actor, executor.hangs  # a few hangs, not the campaign


def test_a_rerun_reuses_segments_only_of_the_shape_it_renders(tmp_path, monkeypatch):
    """Segments an unfinished row left wait under a key of the row's fingerprint, codec, cut and the
    stream's shape: not all that shapes the frames is in the fingerprint (the pixel limit a photo is
    shrunk to; a release that renders 4K clips at `render.max_side`), and segments of two sizes or
    rates cannot be joined: a rerun at another shape renders anew instead of failing every time."""
    from dataclasses import replace

    import numpy as np

    from heygem_ray import prepare, release
    from heygem_ray.layout import CampaignLayout
    from heygem_ray.media.video import VideoInfo
    from heygem_ray.prepare import AudioInfo, AvatarTrack
    from heygem_ray.rows import RowState

    layout = CampaignLayout(str(tmp_path))
    row = Row("r", "/in/a.wav", "/in/v.mp4", str(tmp_path / "r.mp4"))
    info = VideoInfo(False, 25.0, "25/1", 3840, 2160, 0, 250)

    def work(shown: VideoInfo) -> str:
        state = RowState.prepared(row, AudioInfo("/in/a.wav", "a", 16_000 * 10, 0.1, "x"), "fp")
        state.plan(AvatarTrack("/in/v.mp4", "v", shown, np.arange(250), np.zeros((250, 4), np.int32)), 5.0)
        return state.work_uri(layout, "libx264")

    assert work(info) == work(replace(info))
    others = [replace(info, width=1920, height=1080, scale=0.5), replace(info, fps=30.0, fps_fraction="30/1")]
    assert len({work(info), *map(work, others)}) == 3
    # decoded otherwise (deinterlaced, over white): keyed apart; decoded plainly: the key it had
    assert work(replace(info, decoding="deinterlaced")) != work(info) == work(replace(info, decoding=""))
    # a release whose face tracks differ (its row fingerprints may not: ROWS_TRACK_VERSION) cuts no
    # segment around the new track's boxes beside segments of the old one's
    before = work(info)
    monkeypatch.setattr(prepare, "TRACK_VERSION", "next")
    assert work(info) != before
    # nor one whose pixels differ for some avatars only (no render version, finished rows left alone):
    # an unfinished row's segments of the old code are not joined to the new code's
    before = work(info)
    monkeypatch.setattr(release, "code_version", lambda: "another release")
    assert work(info) != before


def test_an_actor_that_fails_every_segment_is_retired_and_its_segments_render_elsewhere(tmp_path):
    """A renderer process that stays up but fails every call (a broken CUDA context, a full disk on
    its node) frees up first, so it took every retry of its own failures and failed the campaign: a
    retry now goes to another actor, and an actor whose failed segments others render is retired
    after `MISSES` of them, saying why."""
    from benchmarks.driver import Done
    from heygem_ray.actor_pool import MISSES

    class OneBroken(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=4)
            self.calls: list[tuple[str, int, int]] = []

        def call(self, actor: int, method: str, *args: Any) -> Any:
            if method == "render_segment":
                self.calls.append((args[0].row_id, args[0].index, actor))
                if actor == 0:
                    return Done(error=RuntimeError("CUDA error: an illegal memory access was encountered"))
            return super().call(actor, method, *args)

    job, _ = _campaign(tmp_path)
    executor = OneBroken()
    campaign = Campaign(job.cfg, job.rows, executor=executor)
    summary = campaign.run()
    assert summary.count("ok") == ROWS
    on_broken = [(row, index) for row, index, actor in executor.calls if actor == 0]
    assert len(on_broken) == len(set(on_broken))  # no segment went back to the actor it failed on
    assert MISSES <= len(on_broken) <= MISSES + campaign.segments.cap()  # retired, not given one in four
    assert "illegal memory access" in (campaign.actors.actors[0].failed or "")
    assert all(a.failed is None for a in campaign.actors.actors[1:])


def test_actors_gone_for_good_are_given_up_not_asked_for_ever(tmp_path):
    """A renderer whose process could not be made on its node (its class failed to load), or that
    someone killed, is not restarted: asking it `ready` every second for ever left the rows waiting
    for ever when every actor was so. They fail, saying why."""

    from benchmarks.driver import Done

    class Gone(RuntimeError):
        pass

    class AllGone(SimulatedExecutor):
        def call(self, actor: int, method: str, *args: Any) -> Any:
            if method == "ready":
                return Done(error=Gone("No module named 'heygem_ray' on its node"))
            return super().call(actor, method, *args)

        def actor_lost(self, exc: BaseException) -> bool:
            return isinstance(exc, Gone)

        def dead(self, actor: int) -> bool:
            return True

    job, _ = _campaign(tmp_path)
    summary = run_within(Campaign(job.cfg, job.rows, executor=AllGone(actors=2)), 30)
    assert summary is not None, "the campaign waited for ever on actors that will never come back"
    assert summary.count("failed") == ROWS
    assert all("No module named 'heygem_ray'" in r.error for r in summary.rows)


@pytest.mark.parametrize("unlike", ["one actor", "every actor", "an older release"])
def test_an_actor_running_other_code_than_the_driver_gets_no_segments(tmp_path, unlike):
    """Segments are keyed by the driver's code (`release.code_version`): an actor on a node whose
    image or installed package differs (a worker group not yet upgraded) rendered segments of
    another release into the driver's videos, under the driver's key. It is refused, saying so; with
    no actor like the driver, every row fails with the cause."""
    from dataclasses import replace as changed

    from benchmarks.driver import Done
    from heygem_ray.release import code_version

    class MixedImages(SimulatedExecutor):
        def call(self, actor: int, method: str, *args: Any) -> Any:
            answer = super().call(actor, method, *args)
            if method == "ready":
                code = "0123456789abcdef" if unlike == "every actor" or actor == 0 else code_version()
                if unlike == "an older release":  # one that says no code
                    code = "" if actor == 0 else code_version()
                return Done(changed(answer.result, code=code))
            return answer

    job, _ = _campaign(tmp_path)
    campaign = Campaign(job.cfg, job.rows, executor=MixedImages(actors=2))
    summary = run_within(campaign, 30)
    assert summary is not None
    other = "of an older release" if unlike == "an older release" else "0123456789abcdef"
    why = f"runs heygem_ray code {other} but the driver runs {code_version()}"
    assert why in (campaign.actors.actors[0].failed or "")
    if unlike != "every actor":
        assert summary.count("ok") == ROWS and campaign.actors.actors[1].failed is None
    else:
        assert summary.count("failed") == ROWS and all(why in r.error for r in summary.rows)


class _StitchesTakeTime(SimulatedExecutor):
    """Stitches run on threads and take `seconds[row_id]` (other rows' at once) from when `go` is
    set (at once, unless a test clears it); `cancel` stops a stitch not yet published, as Ray's
    kills its worker, unless `unstoppable` (a thread that runs)."""

    def __init__(self, seconds: dict[str, float], unstoppable: bool = False, ends_first: bool = False):
        super().__init__(actors=2)
        # ends_first: a cancel Ray took (True) arrives after the stitch published
        self.seconds, self.unstoppable, self.ends_first = seconds, unstoppable, ends_first
        self.go = threading.Event()
        self.go.set()
        self.pool = ThreadPoolExecutor(4)
        self.cancelled: list[str] = []
        self.published: list[str] = []

    def submit(self, fn: Any, *args: Any, num_gpus: float = 0.0) -> Any:
        if fn.__name__ != "stitch_row":
            return super().submit(fn, *args, num_gpus=num_gpus)
        job, cancelled = args[0], threading.Event()

        def stitch() -> Any:
            if job.row_id in self.seconds:
                self.go.wait(60)
            if cancelled.wait(self.seconds.get(job.row_id, 0.0)) and not self.ends_first:
                raise RuntimeError("killed")
            self.published.append(job.row_id)
            return STAGES["stitch_row"](job, None)

        future = self.pool.submit(stitch)
        future.row_id, future.stop = job.row_id, cancelled  # type: ignore[attr-defined]
        return future

    def wait(self, handles: Any, timeout: float) -> Any:
        done = [h for h in handles if isinstance(h, Done) or h.done()]
        if done or not handles:
            return done[:1]
        finished, _ = futures_wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(finished)[:1]

    def get(self, handle: Any) -> Any:
        return super().get(handle) if isinstance(handle, (Done, Expired)) else handle.result()

    def cancel(self, handle: Any) -> bool:
        if isinstance(handle, Done) or self.unstoppable:
            return isinstance(handle, Done)
        self.cancelled.append(handle.row_id)
        handle.stop.set()
        return True


@pytest.mark.parametrize("mode", ["stopped", "waited-for", "ended-first"])
def test_a_stop_lets_stitches_under_way_finish_or_stops_them_before_reporting(tmp_path, monkeypatch, mode):
    """A stop (SIGTERM: KeyboardInterrupt in the driver) while rows are being stitched: a stitch that
    finishes within the grace is its row's `ok`; a longer one is stopped (Ray kills its worker) and
    its row reported interrupted, or, on a thread that cannot be stopped, waited for; one whose
    cancel came after it published (Ray's kill is not at once) is `ok`. No row is reported
    interrupted while its video is published after the report."""
    unstoppable = mode == "waited-for"
    from heygem_ray import campaign as campaign_module

    monkeypatch.setattr(campaign_module, "STITCH_GRACE_SECONDS", 1.5)
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i:03d}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(4)]
    # timed from the stop (`go`): a loaded machine's stall before it cannot end them early
    executor = _StitchesTakeTime({"r000": 0.2, "r001": 3.0}, unstoppable, ends_first=mode == "ended-first")
    executor.go.clear()
    job = Campaign(cfg, rows, executor=executor)

    def guard() -> None:
        stitching = {key for event, key in job._inflight.values() if event == "stitched"}
        if {"r000", "r001"} <= stitching:
            executor.go.set()
            raise KeyboardInterrupt("signal 15")

    job.guard = guard
    with pytest.raises(KeyboardInterrupt):
        job.run()
    results = {r["id"]: r for r in read_results(str(tmp_path / "out" / "_results.parquet"))}
    assert results["r000"]["status"] == "ok"  # finished within the grace
    if unstoppable:
        assert results["r001"]["status"] == "ok" and executor.cancelled == []
    elif mode == "ended-first":
        assert results["r001"]["status"] == "ok" and executor.cancelled == ["r001"]
    else:
        assert results["r001"]["status"] == "failed" and "interrupted" in results["r001"]["error"]
        assert executor.cancelled == ["r001"]
        time.sleep(3.2)
    assert all(results[row_id]["status"] == "ok" for row_id in executor.published)


class _NeverBack(SimulatedExecutor):
    """Face-tracking tasks (`waiting="tracking"`) or renderer calls ("rendering") that never come
    back (a task no node can place, a call that hangs)."""

    def __init__(self, waiting: str) -> None:
        super().__init__(actors=2)
        self.waiting, self.held = waiting, set()

    def submit(self, fn: Any, *args: Any, num_gpus: float = 0.0) -> Any:
        handle = super().submit(fn, *args, num_gpus=num_gpus)
        if self.waiting == "tracking" and fn.__name__ == "prepare_avatar":
            self.held.add(id(handle))
        return handle

    def call(self, actor: int, method: str, *args: Any) -> Any:
        handle = super().call(actor, method, *args)
        if self.waiting == "rendering" and method != "ready":
            self.held.add(id(handle))
        return handle

    def wait(self, handles: Any, timeout: float) -> Any:
        return [h for h in handles if id(h) not in self.held][:1]


@pytest.mark.parametrize("waiting", ["tracking", "rendering"])
def test_a_stop_reads_no_marker_of_rows_that_sent_nothing_to_stitch(tmp_path, monkeypatch, waiting):
    """A row still waiting for its face track, or for its segments, has sent nothing to stitch and
    cannot have published: a stop read its marker all the same, one request each (after a rerun's
    streak of skipped rows, or ~4 rows rendering per actor on a large cluster: thousands, past the
    3 s `ray job stop` gives before its kill)."""
    from heygem_ray import rows as rows_module

    reads: list[str] = []
    monkeypatch.setattr(rows_module, "read_marker", lambda uri: reads.append(uri))
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i}", f"/in/a{i}.wav", f"/in/v{i}.mp4", str(out / f"r{i}.mp4")) for i in range(4)]
    job = Campaign(cfg, rows, executor=_NeverBack(waiting))
    held = {"tracking": "avatar", "rendering": "segment"}[waiting]

    def guard() -> None:
        events = {event for event, _ in job._inflight.values()}
        rendering = all(state.spans for state in job._states.values())
        if len(job._states) == len(rows) and events == {held} and (waiting == "tracking" or rendering):
            raise KeyboardInterrupt("signal 15")

    job.guard = guard
    stopped: list[BaseException] = []

    def run() -> None:  # on a thread: were the guard never to stop it, its loop would spin for ever
        try:
            job.run()
        except KeyboardInterrupt as exc:
            stopped.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(60)
    assert stopped, f"the rows never all waited ({held})"
    results = read_results(str(out / "_results.parquet"))
    assert [r["error"] for r in results] == ["campaign interrupted before this row finished"] * len(rows)
    assert reads == []


def test_a_stage_task_out_for_long_is_said_to_be_so_once(tmp_path, monkeypatch, caplog):
    """A face-tracking task Ray cannot place (no node with a CPU, or the GPU share it asks for,
    free) or that hangs kept its rows "preparing" with nothing in the log: renderer calls alone had
    a deadline. Past STAGE_WARN_SECONDS it is said, once, naming the avatar."""
    from helpers import HandClock
    from heygem_ray import campaign as campaign_module

    clock = HandClock()  # a turn of the loop is a second: a loaded machine's stalls are no time
    monkeypatch.setattr(campaign_module, "time", clock)
    monkeypatch.setattr(campaign_module, "STAGE_WARN_SECONDS", 10.0)
    monkeypatch.setattr(campaign_module, "STAGE_WATCH_SECONDS", 0.0)

    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i}", f"/in/a{i}.wav", "/in/presenter.mp4", str(out / f"r{i}.mp4")) for i in range(2)]
    job = Campaign(cfg, rows, executor=_NeverBack("tracking"))
    turns = [0]

    def guard() -> None:
        turns[0] += 1
        clock.now += 1.0
        if turns[0] > 50:
            raise KeyboardInterrupt("signal 15")

    job.guard = guard
    with caplog.at_level("WARNING", logger="heygem_ray"), pytest.raises(KeyboardInterrupt):
        job.run()
    said = [r.getMessage() for r in caplog.records if "has been under way for over" in r.getMessage()]
    assert len(said) == 1 and "tracking the face of avatar /in/presenter.mp4" in said[0], said


@pytest.mark.parametrize("force", [False, True])
def test_force_asks_the_renderers_not_to_reuse_earlier_segments(tmp_path, force):
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", f"force={str(force).lower()}")
    rows = [Row(f"r{i}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(3)]
    executor = SegmentsSeen(actors=2)
    assert Campaign(cfg, rows, executor=executor).run().count("ok") == 3
    assert executor.jobs and {job.reuse for job in executor.jobs} == {not force}


def test_rows_waiting_for_slow_stitches_hold_admission(tmp_path):
    """Stitches slower than renders (a slow store, CPUs the actors hold): the driver admits no more
    rows while twice the actors' worth (at least 8) wait for their stitch, so neither its state nor
    the rendered-but-unpublished work piles up over a long campaign (here all 120 rows did)."""
    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i:03d}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(120)]
    executor = _StitchesTakeTime({row.id: 0.1 for row in rows})
    pending = []
    submit = executor.submit

    def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        handle = submit(fn, *args, **kwargs)
        if fn.__name__ == "stitch_row":
            pending.append(handle)
            pending[:] = [h for h in pending if not h.done()]
            executor.most = max(getattr(executor, "most", 0), len(pending))
        return handle

    executor.submit = counted  # type: ignore[method-assign]
    job = Campaign(cfg, rows, executor=executor)
    assert job.run().count("ok") == 120
    # the stitch cap, plus rows already admitted: preparing, and rendering (a segment each at most)
    bound = 8 + job.prepare_limit() + 2 * job.segments.cap()
    assert 8 <= executor.most <= bound, (executor.most, bound)


def test_a_segment_on_an_actor_the_driver_retired_is_no_try_of_its_own(tmp_path):
    """The driver stops an actor it retires while that actor still holds segments: their calls fail
    as a lost actor's, which is no fault of theirs, so they go to the others without using a try
    (on a segment's last try, the row failed with "renderer actor died")."""
    from heygem_ray.actor_pool import ActorPool
    from heygem_ray.rows import RowState
    from heygem_ray.segment_queue import SegmentQueue

    class Killed(Exception):
        pass

    class SaysLost(SimulatedExecutor):
        def actor_lost(self, exc: BaseException) -> bool:
            return isinstance(exc, Killed)

    cfg = compose_config(f"manifest={tmp_path}/m", f"output={tmp_path}/out", "render.max_attempts=1")
    executor = SaysLost(actors=2)
    pool = ActorPool(cfg, executor)
    pool.start()
    queue = SegmentQueue(cfg, pool, executor)
    state = RowState(Row("r", "/a.wav", "/v.mp4", f"{tmp_path}/out/r.mp4"), time.time())
    state.attempts[0] = 1  # its one try, on actor 0
    pool.actors[0].load = 1
    pool.unusable(0, "3 segments that failed on it rendered on other actors")
    assert queue.failed(("r", 0, 0), state, Killed()) is None
    assert state.attempts[0] == 0 and len(queue) == 1
    pool.actors[1].load = 1  # an actor the driver did not stop: the lost call counts
    state.attempts[1] = 1
    assert "segment 1 failed after 1 attempt" in (queue.failed(("r", 1, 1), state, Killed()) or "")


@pytest.mark.parametrize("then", ["render", "store fails", "input missing"])
def test_a_rerun_checks_finished_rows_many_at_a_time_then_goes_back_to_its_pace(tmp_path, then):
    """A rerun of a campaign stopped halfway: each finished row is a few requests to the store, and
    eight at a time made a rerun of 50,000 of them take half an hour before the first new frame.
    While rows keep being skipped, more are checked at once; rows that render, or a store that
    fails, go back to the pace that keeps the actors fed without a pile of decoded narrations (rows
    whose input is missing fail as cheaply as skipped ones: the pace stays)."""
    from dataclasses import replace

    from heygem_ray.campaign import SKIPPING_RATE
    from heygem_ray.errors import InputError

    finished = 200

    def prepare_row(row: Any, cfg: Any, decode: bool = True) -> Any:
        prep = STAGES["prepare_row"](row, cfg, decode)
        if int(row.id[1:]) < finished:
            return replace(prep, skipped=True, audio=None)
        if then == "store fails":
            raise OSError("the store answers 503")
        if then == "input missing":
            raise InputError("audio", row.audio, "does not exist")
        return prep

    class Counting(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2, stages={**STAGES, "prepare_row": prepare_row})
            self.preparing: set[int] = set()
            self.most: list[tuple[int, int]] = []  # (row, prepares in flight as it was sent)

        def submit(self, fn: Any, *args: Any, num_gpus: float = 0.0) -> Any:
            handle = super().submit(fn, *args, num_gpus=num_gpus)
            if fn.__name__ == "prepare_row":
                self.preparing.add(id(handle))
                self.most.append((int(args[0].id[1:]), len(self.preparing)))
            return handle

        def wait(self, handles: Any, timeout: float) -> Any:
            ready = super().wait(handles, timeout)
            self.preparing.difference_update(id(h) for h in ready)
            return ready

    job, _ = _campaign(tmp_path)
    out = tmp_path / "out"
    rows = [Row(f"r{i}", "/in/a.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(finished + 120)]
    executor = Counting()
    summary = Campaign(job.cfg, rows, executor=executor).run()
    assert summary.count("skipped") == finished and summary.count("ok" if then == "render" else "failed") == 120
    base = 8  # two actors: at least 8
    assert max(n for row, n in executor.most if row < finished) == base * SKIPPING_RATE
    after = [n for row, n in executor.most if row >= finished + base * SKIPPING_RATE]
    assert after and max(after) == (base * SKIPPING_RATE if then == "input missing" else base)


class _Later(Done):
    """A call's outcome, ready `delay` seconds from now."""

    __slots__ = ("at",)

    def __init__(self, delay: float, result: Any = None, error: BaseException | None = None):
        super().__init__(result, error)
        self.at = time.monotonic() + delay


class _Died(Exception):
    """What a call to an actor that died answers (Ray's RayActorError)."""


def test_an_actor_that_dies_on_every_segment_is_retired_and_its_rows_render_elsewhere(tmp_path):
    """Two of three actors start well, then die on each segment they run (a broken GPU, a node
    whose memory monitor kills them), and come back. A death did not count against the actor,
    only against the segment: retried on the same actors, every row failed "after 3 attempts"."""

    class CrashLoops(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=3)
            self.deaths = [0, 0, 0]

        def call(self, actor: int, method: str, *args: Any) -> Any:
            answer = super().call(actor, method, *args)
            if method != "render_segment":
                return _Later(0.3 if self.deaths[actor] else 0.0, answer.result, answer.error)  # a restart
            if actor:
                self.deaths[actor] += 1
                return _Later(0.05, error=_Died("the actor died"))
            return _Later(0.2, answer.result)

        def wait(self, handles: Any, timeout: float) -> Any:
            end = time.monotonic() + timeout
            while True:
                done = [h for h in handles if getattr(h, "at", 0.0) <= time.monotonic()]
                if done or time.monotonic() >= end:
                    return done
                time.sleep(0.005)

        def actor_lost(self, exc: BaseException) -> bool:
            return isinstance(exc, _Died)

        def restarts(self, actor: int) -> int:
            return self.deaths[actor]

        def all_restarts(self) -> list[int]:
            return list(self.deaths)

    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.segment_seconds=2"
    )
    rows = [Row(f"r{i}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(6)]
    executor = CrashLoops()
    job = Campaign(cfg, rows, executor=executor)
    summary = run_within(job, 60)
    assert summary is not None, "the campaign never ended"
    assert summary.count("ok") == 6, [r.error for r in summary.rows]
    assert [a.failed is not None for a in job.actors.actors] == [False, True, True]  # retired


def test_a_segment_sent_to_an_actor_killed_for_good_is_not_charged_a_try(tmp_path):
    """An actor killed for good while idle (an operator's `ray kill`: DEAD, never restarted) failed
    the next segment sent to it, which was charged a try as if it had brought the actor down: with
    `render.max_attempts=1` its row failed. It goes to another actor uncharged."""

    class KilledAfterOne(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.rendered = 0

        def call(self, actor: int, method: str, *args: Any) -> Any:
            if actor == 1 and method == "render_segment":
                self.rendered += 1
                if self.rendered > 1:
                    return _Later(0.0, error=_Died("the actor died"))
            return super().call(actor, method, *args)

        def wait(self, handles: Any, timeout: float) -> Any:
            return [h for h in handles if getattr(h, "at", 0.0) <= time.monotonic()][:1]

        def actor_lost(self, exc: BaseException) -> bool:
            return isinstance(exc, _Died)

        def dead(self, actor: int) -> bool:
            return actor == 1 and self.rendered > 1

    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.max_attempts=1"
    )
    rows = [Row(f"r{i}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(6)]
    job = Campaign(cfg, rows, executor=KilledAfterOne())
    summary = run_within(job, 60)
    assert summary is not None, "the campaign never ended"
    assert summary.count("ok") == 6, [r.error for r in summary.rows]
    assert job.actors.actors[1].failed is not None  # no more work for it


def test_an_idle_actor_takes_the_next_segment_when_the_first_waits_for_another(tmp_path):
    """A retry kept from the actor it failed on waits for the other, busy one; only the queue's
    first segment was looked at, so the idle actor got nothing behind it (for as long as the busy
    one took: up to `render.segment_timeout` where it hung)."""

    class Pending:  # actor 1's call, never answered (hung)
        error = None

    class OneFailsOnceOneHangs(SimulatedExecutor):
        def __init__(self) -> None:
            super().__init__(actors=2)
            self.sent: dict[int, list[int]] = {0: [], 1: []}

        def call(self, actor: int, method: str, *args: Any) -> Any:
            if method == "render_segment":
                self.sent[actor].append(args[0].index)
                if actor == 1:
                    return Pending()
                if len(self.sent[0]) == 1:
                    return Done(error=RuntimeError("CUDA error: a passing one"))
            return super().call(actor, method, *args)

        def wait(self, handles: Any, timeout: float) -> Any:
            done = [h for h in handles if isinstance(h, Done)]
            if not done:
                time.sleep(0.02)
            return done[:1]

    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.segment_seconds=1"
    )
    executor = OneFailsOnceOneHangs()
    job = Campaign(cfg, [Row("r0", "/in/a.wav", "/in/v.mp4", str(out / "r0.mp4"))], executor=executor)
    turns = 0

    def guard() -> None:
        nonlocal turns
        turns += 1
        if turns > 60:
            raise KeyboardInterrupt

    job.guard = guard
    with pytest.raises(KeyboardInterrupt):
        job.run()
    # the row's 10 segments: all but the retry and actor 1's own went to actor 0 meanwhile
    assert len(executor.sent[0]) >= 8, executor.sent


def test_a_campaign_an_error_ends_says_so_and_which_not_cancelled(tmp_path):
    """An error that ends the driver (its connection to the cluster gone, a bug) was reported as a
    stop: its feed "interrupted", so the studio showed the campaign "cancelled" to a user who
    cancelled nothing; its report "Stopped"; its rows "interrupted", the cause on no page. The
    feed says failed, and the report and each unfinished row name the error."""
    from heygem_ray.studio.service import _status

    class ClusterGone(SimulatedExecutor):
        turns = 0

        def wait(self, handles: Any, timeout: float) -> list[Any]:
            self.turns += 1
            if self.turns > 6:
                raise ConnectionError("the GCS at 10.0.0.1:6379 does not answer")
            return super().wait(handles, timeout)

    out = tmp_path / "out"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(f"r{i}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i}.mp4")) for i in range(20)]
    with pytest.raises(ConnectionError):
        Campaign(cfg, rows, executor=ClusterGone(actors=2)).run()
    feed = json.loads((out / "_progress.json").read_text())
    assert feed["state"] == "failed" and _status("FAILED", feed["state"]) == "failed"
    failed = [r for r in read_results(str(out / "_results.parquet")) if r["status"] == "failed"]
    assert failed and all(
        r["error"] == "campaign ended by an error before this row finished (ConnectionError: the GCS at "
        "10.0.0.1:6379 does not answer): run it again to resume"
        for r in failed
    ), failed
    assert "Ended by an error before its end (ConnectionError" in (out / "_report.html").read_text()


def _past_the_output_limit(tmp_path: Path, asked: list[float | None], tracks: Any, seconds: list[int]) -> dict:
    """A campaign whose first row (its own avatar, tracked first) takes it past `limits.max_output_gb`
    before the rows of /in/v.mp4 (narrations of `seconds`, tracked by `tracks`, last) are answered:
    their results by id."""
    from dataclasses import replace as replaced

    faced = _narrations_and_tracks(asked)

    def prepare_avatar(avatar: str, *args: Any) -> Any:
        return (faced["prepare_avatar"] if avatar == "/in/other.mp4" else tracks)(avatar, *args)

    def stitch_row(job: Any, track: Any) -> Any:
        done = faced["stitch_row"](job, track)
        return replaced(done, marker=replaced(done.marker, bytes=1000))  # past the limit at once

    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "limits.max_output_gb=1e-9"
    )
    rows = [Row("c", "/in/a2.wav", "/in/other.mp4", str(out / "c.mp4"))]
    rows += [Row(f"v{s}", f"/in/a{s}.wav", "/in/v.mp4", str(out / f"v{s}.mp4")) for s in seconds]
    stages = {**faced, "prepare_avatar": prepare_avatar, "stitch_row": stitch_row}
    return {r.id: r for r in Campaign(cfg, rows, executor=_TracksLast(actors=2, stages=stages)).run().rows}


def test_rows_a_track_answers_once_the_output_limit_is_reached_fail_for_the_limit(tmp_path):
    """Past `limits.max_output_gb` no more tracking is done: the rows waiting on an avatar are
    answered with the track just made, which need not reach them. A 60 s narration whose presenter
    shows up after the 4 s row's frames failed "no face found" (a fault of its input, which it is
    not) instead of saying the limit stopped it."""
    asked: list[float | None] = []
    results = _past_the_output_limit(
        tmp_path, asked, _narrations_and_tracks(asked, face_from=300)["prepare_avatar"], [4, 60]
    )
    assert results["c"].status == "ok" and asked == [2.0, 4.0]  # no tracking past the limit
    assert results["v60"].status == "failed" and "reached its limit" in (results["v60"].error or ""), results


def test_a_damaged_frame_found_past_the_output_limit_tracks_no_more_and_fails_the_short_rows_for_the_limit(tmp_path):
    """The rows short of a damaged frame are tracked again, but not once no renderer will take
    them (past the output limit): that tracking was work for nothing, and they said "decoding
    failed" of frames they never show."""
    from heygem_ray.errors import InputError

    asked: list[float | None] = []

    def damaged(avatar: str, *args: Any) -> Any:
        asked.append(args[8])
        raise InputError("avatar", avatar, "decoding failed at 12.3 s", from_seconds=10.0)

    results = _past_the_output_limit(tmp_path, asked, damaged, [60, 4])
    assert asked == [2.0, 60.0]
    assert "decoding failed" in (results["v60"].error or "")
    assert results["v4"].status == "failed" and "reached its limit" in (results["v4"].error or ""), results


def test_a_stitch_stopped_at_its_deadline_that_published_first_is_its_rows_ok(tmp_path):
    """A stitch at `render.stage_timeout` is killed, but Ray's kill is not at once: one publishing
    just then put out its video and marker after its row was reported failed (the next run skipped
    it, the report said failed). Its end is waited for, as a stop's stitches are: ok by its result."""
    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false", "render.stage_timeout=0.5"
    )
    rows = [Row(f"r{i:03d}", f"/in/a{i}.wav", "/in/v.mp4", str(out / f"r{i:03d}.mp4")) for i in range(3)]
    executor = _StitchesTakeTime({"r001": 30.0}, ends_first=True)
    summary = Campaign(cfg, rows, executor=executor).run()
    results = {r["id"]: r for r in read_results(str(out / "_results.parquet"))}
    assert executor.cancelled == ["r001"] and "r001" in executor.published
    assert results["r001"]["status"] == "ok", results["r001"]["error"]
    assert summary.count("ok") == 3
