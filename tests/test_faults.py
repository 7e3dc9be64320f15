"""Infrastructure faults: a renderer actor killed mid-campaign, and the driver killed and started
again. Nothing is lost, nothing renders twice, every output appears once and whole."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import compose_config, run_within
from heygem_ray.actor_pool import START_DEATHS
from heygem_ray.campaign import Campaign
from heygem_ray.executors.ray_cluster import RayExecutor
from heygem_ray.manifest import read_manifest
from heygem_ray.results import read_results


def manifest(tmp_path, media_dir, rows: int) -> str:
    path = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table(
            {
                "id": [f"row{i}" for i in range(rows)],
                "audio": [str(media_dir / ("speech4.wav" if i % 2 else "speech3.wav")) for i in range(rows)],
                "avatar": [str(media_dir / ("clip6.mp4" if i % 2 else "clip2.mp4")) for i in range(rows)],
            }
        ),
        path,
    )
    return path


def one_actor(tmp_path, media_dir, rows: int, *extra: str):
    """The config of a campaign of `rows` rows on one renderer actor, in quarter-second segments."""
    return compose_config(
        f"manifest={manifest(tmp_path, media_dir, rows)}",
        f"output={tmp_path / 'out'}",
        "render.segment_seconds=0.25",
        "render.progress=false",
        "cluster.actors=1",
        *extra,
    )


def run_killing_the_actor_once(cfg, kill=None, held: int = 3, timeout: float = 300) -> tuple[Campaign, object]:
    """Run a campaign and kill its renderer actor while `held` segments are queued on it (the config
    lets it hold them): its process with SIGKILL (Ray restarts it), or as `kill(job)` does."""
    job = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), RayExecutor(cfg))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", job.run()), daemon=True)
    runner.start()
    deadline = time.time() + 120
    while not (job.actors.pids and job.actors.pids[0] and job.actors.inflight >= held):
        assert time.time() < deadline and runner.is_alive(), "no work ever reached the actor"
        time.sleep(0.02)
    if kill is None:
        os.kill(job.actors.pids[0], signal.SIGKILL)
    else:
        kill(job)
    runner.join(timeout=timeout)
    assert not runner.is_alive(), "the campaign still waits for its renderer"
    return job, outcome["summary"]


def test_actor_killed_mid_segment_the_rows_still_complete(ray_local, media_dir, tmp_path):
    cfg = one_actor(tmp_path, media_dir, 2, "render.segments_per_actor=3")
    _, summary = run_killing_the_actor_once(cfg)
    assert [r.status for r in summary.rows] == ["ok", "ok"], [r.error for r in summary.rows]
    assert max(r.attempts for r in summary.rows) == 2  # the lost segments were sent again, once
    assert sorted(f for f in os.listdir(cfg.output) if f.endswith(".mp4")) == ["row0.mp4", "row1.mp4"]


def test_actor_lost_beyond_the_retry_bound_fails_the_row_with_the_cause(ray_local, media_dir, tmp_path):
    cfg = one_actor(tmp_path, media_dir, 1, "render.max_attempts=1", "render.segments_per_actor=3")
    _, summary = run_killing_the_actor_once(cfg)
    row = summary.rows[0]
    assert row.status == "failed"
    assert "failed after 1 attempt(s): renderer actor died" in row.error, row.error
    assert not os.path.exists(row.output)


def test_driver_killed_then_rerun_renders_only_unfinished_rows(ray_local, media_dir, tmp_path):
    """The driver process is SIGKILLed after its first finished row; a second run skips what was
    done, renders the rest, and no row is rendered twice."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "heygem_ray.cli",
        "render",
        f"manifest={manifest(tmp_path, media_dir, 6)}",
        f"output={out}",
        "render.segment_seconds=1.0",
        "render.progress=false",
        f"cluster.address={ray_local.get_runtime_context().gcs_address}",
        "cluster.actors=1",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    finished_first = []
    for line in first.stdout:
        if line.startswith("[ok]"):
            finished_first.append(line.split()[1])
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert finished_first, "the first run finished no row before being killed"
    markers = {f[:-5]: os.stat(out / "_markers" / f).st_mtime_ns for f in os.listdir(out / "_markers")}
    done_before = set(markers)
    assert done_before and len(done_before) < 6

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    results = {r["id"]: r for r in read_results(str(out / "_results.parquet"))}
    assert {i for i, r in results.items() if r["status"] == "skipped"} == done_before
    assert {i for i, r in results.items() if r["status"] == "ok"} == {f"row{i}" for i in range(6)} - done_before
    for row_id, mtime in markers.items():  # finished rows were not rendered again
        assert os.stat(out / "_markers" / f"{row_id}.json").st_mtime_ns == mtime
    assert sorted(f for f in os.listdir(out) if f.endswith(".mp4")) == [f"row{i}.mp4" for i in range(6)]
    assert not [f for f in os.listdir(out) if f.startswith(".") or ".part" in f]
    for row_id in results:
        assert json.loads((out / "_markers" / f"{row_id}.json").read_text())["id"] == row_id


def test_an_actor_that_dies_while_starting_gets_no_more_work(ray_local, media_dir, tmp_path):
    """A renderer whose process dies every time it starts (out of memory loading the model, a native
    crash) is restarted by Ray each time: after `START_DEATHS` deaths it is given up, and its rows
    fail with why, instead of the campaign waiting for it for ever."""
    cfg = compose_config(
        f"manifest={manifest(tmp_path, media_dir, 2)}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "cluster.actors=1",
    )
    stop, killed = threading.Event(), set()
    raylet = ray_local._private.worker._global_node.all_processes["raylet"][0].process.pid

    def kill_renderers() -> None:  # as the kernel's OOM killer would, each time the actor starts again
        while not stop.is_set():  # this test's Ray's renderers only: the raylet's children
            found = subprocess.run(
                ["pgrep", "-P", str(raylet), "-f", "ray::RenderWorker"], capture_output=True, text=True
            ).stdout
            for pid in map(int, found.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_renderers, daemon=True)
    killer.start()
    job = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), RayExecutor(cfg))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", job.run()), daemon=True)
    runner.start()
    runner.join(timeout=180)
    stop.set()
    assert not runner.is_alive(), f"the campaign still waits for an actor killed {len(killed)} times"
    rows = outcome["summary"].rows
    assert [r.status for r in rows] == ["failed", "failed"]
    deaths = [re.search(r"its process died (\d+) times while starting", r.error or "") for r in rows]
    assert all(d and int(d.group(1)) >= START_DEATHS for d in deaths), [r.error for r in rows]
    assert len(killed) >= 3


def test_a_renderer_taken_for_hung_is_started_again_by_ray_and_every_row_completes(ray_local, media_dir, tmp_path):
    """What the driver does to an actor past `render.segment_timeout`, on a real Ray: its process
    is killed for Ray to start again (not given up), its segments go again, and every row is ok.
    (Taken for hung once, from inside the driver's loop, while it holds segments: a real hang
    would need a GPU that stops answering.)"""
    cfg = one_actor(tmp_path, media_dir, 2, "render.segments_per_actor=3")
    job = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), RayExecutor(cfg))
    taken: list[int] = []
    real_hung = job.segments.hung

    def hung_once(after: float) -> list[int]:
        if not taken and job.actors.pids[0] and job.actors.inflight >= 2:
            taken.append(job.actors.pids[0])
            return [0]
        return real_hung(after)

    job.segments.hung = hung_once  # type: ignore[method-assign]
    summary = run_within(job, 300)
    assert summary is not None, "the campaign still waits for its renderer"
    assert taken, "the actor never held two segments"
    assert [r.status for r in summary.rows] == ["ok", "ok"], [r.error for r in summary.rows]
    actor = job.actors.actors[0]
    assert actor.failed is None and actor.info is not None  # started again, not given up
    assert actor.info.pid != taken[0]  # a new process answered `ready`


def test_an_actor_killed_for_good_is_given_up_and_its_rows_fail_saying_why(ray_local, media_dir, tmp_path):
    """A renderer someone stops with `ray kill` is not restarted (Ray's GCS records it DEAD): it is
    given up at once, and with no other renderer its rows fail saying so, instead of the campaign
    asking it `ready` every second for ever."""
    cfg = one_actor(tmp_path, media_dir, 2)
    # no_restart, as `ray kill` does
    job, summary = run_killing_the_actor_once(cfg, lambda job: ray_local.kill(job.executor._actors[0]), 1, 60)
    assert job.actors.actors[0].failed and job.actors.error
    assert {r.status for r in summary.rows} <= {"ok", "failed"}
    assert any("no renderer actor is left: ActorDiedError" in (r.error or "") for r in summary.rows)


def test_the_pool_reads_its_actors_restarts_in_one_request(ray_local, tmp_path, monkeypatch):
    """The pool asks for every actor's restart count every couple of seconds: one GCS request each
    took a large cluster's driver loop most of its time. One request reads them all, and a restart
    still shows."""
    from ray._private import state

    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet",
        f"output={tmp_path}/out",
        "cluster.actor.num_cpus=0.5",
        "cluster.task_cpus=0.5",
    )
    executor = RayExecutor(cfg)
    executor.start_actors(3)
    try:
        pids = [info.pid for info in ray_local.get([executor.call(i, "ready") for i in range(3)], timeout=120)]
        asked: list[dict] = []
        real = state.actors
        monkeypatch.setattr(state, "actors", lambda *a, **k: asked.append(k) or real(*a, **k))
        assert executor.all_restarts() == [0, 0, 0]
        assert len(asked) == 1 and "job_id" in asked[0]
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.time() + 60
        while executor.all_restarts()[1] == 0:
            assert time.time() < deadline, "the restart never showed"
            time.sleep(0.2)
        assert executor.all_restarts() == [0, 1, 0] == [executor.restarts(i) for i in range(3)]
    finally:
        executor.close()


@pytest.mark.slow  # waits out a stage deadline (~40 s on 2 cores); the driver's side runs by default (test_driver.py)
def test_a_preparation_that_never_ends_is_stopped_and_only_its_row_fails(ray_local, media_dir, tmp_path):
    """A narration on a store that never answers (here an S3 endpoint that takes connections and
    says nothing): its row's preparation never ended, and the campaign waited for it for ever. On a
    real Ray the task's worker is killed at `render.stage_timeout` and the row fails saying so; the
    other row renders."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
    path = str(tmp_path / "m.parquet")
    audio = ["s3://silent/narration.wav", str(media_dir / "speech3.wav")]
    pq.write_table(
        pa.table({"id": ["stuck", "fine"], "audio": audio, "avatar": [str(media_dir / "clip2.mp4")] * 2}), path
    )
    cfg = compose_config(
        f"manifest={path}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "cluster.actors=1",
        "render.stage_timeout=25",
        "render.max_prepared_rows=1",  # the other row's waits for the CPU the stuck one holds
        f"+storage.options.s3.endpoint_url=http://127.0.0.1:{silent.getsockname()[1]}",
    )
    summary = run_within(Campaign(cfg, read_manifest(cfg.manifest, cfg.output), RayExecutor(cfg)), 240)
    silent.close()
    assert summary is not None, "the campaign still waits for the preparation"
    rows = {r.id: r for r in summary.rows}
    assert rows["fine"].status == "ok", rows["fine"].error
    assert rows["stuck"].status == "failed"
    assert "preparing row stuck was stopped after 25 s (render.stage_timeout)" in rows["stuck"].error, rows[
        "stuck"
    ].error
    assert held, "the row's preparation never reached the store"


def test_a_stage_task_killed_for_memory_is_answered_after_its_retries(ray_local, tmp_path, monkeypatch):
    """Ray retries a task its memory monitor killed for ever, whatever its max_retries: an avatar
    too big for its node never answered, its rows waited two hours (`render.stage_timeout`) and
    failed "hung", and the next row tried again. Now such a task is answered with Ray's
    OutOfMemoryError after its retries, which the campaign counts as a lost worker. (Here every
    task is over the monitor's threshold: it is set under what the node already uses.)"""
    from ray.exceptions import OutOfMemoryError

    from heygem_ray.executors import ray_cluster
    from heygem_ray.startup import Startup

    ray_local.shutdown()  # a Ray of its own: the monitor's threshold is read where Ray starts
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.01")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    monkeypatch.delenv("RAY_task_oom_retries", raising=False)
    monkeypatch.setattr(ray_cluster, "TASK_RETRIES", 1)

    def held_for_a_while() -> None:
        time.sleep(20)

    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={tmp_path}/out", "cluster.actors=1")
    try:
        with ray_cluster.open_ray(cfg, Startup()) as executor:
            handle = executor.submit(held_for_a_while)
            assert executor.wait([handle], timeout=120) == [handle], "the task was never answered"
            with pytest.raises(OutOfMemoryError):
                executor.get(handle)
    finally:
        os.environ.pop("RAY_task_oom_retries", None)
