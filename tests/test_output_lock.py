"""One run at a time per output root: a second driver refuses to start while the first is alive,
and a lock left by a run that ended without letting go is taken over."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import render_cli
from heygem_ray import output_lock as lock_module
from heygem_ray.layout import CampaignLayout
from heygem_ray.output_lock import OutputBusyError, OutputLostError, output_lock


def _held_by(
    layout: CampaignLayout, host: str, pid: int, seen_ago: float, pidns: str | None = None, boot: str | None = None
) -> None:
    pidns = lock_module._pid_namespace() if pidns is None else pidns
    boot = lock_module._boot_id() if boot is None else boot
    heartbeat = time.time() - seen_ago
    os.makedirs(layout.output, exist_ok=True)  # a run that made the root and left nothing removed it
    # whole at once, as another run's write is (a reader between an emptied file and its text saw no lock)
    with open(layout.lock + ".new", "w") as fh:
        json.dump(
            {"host": host, "boot": boot, "pidns": pidns, "pid": pid, "token": "theirs", "heartbeat": heartbeat}, fh
        )
    os.replace(layout.lock + ".new", layout.lock)


def _until(condition: Any, seconds: float = 20.0) -> bool:
    """Whether `condition()` came true within `seconds` (a heartbeat thread's work, on a machine
    that may be loaded: waited for, not slept on)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_second_run_is_refused_while_the_first_holds_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    layout = CampaignLayout(str(tmp_path))
    with output_lock(layout):
        first = json.loads((tmp_path / "_lock.json").read_text())
        with (
            pytest.raises(OutputBusyError, match=rf"another run \(host {socket.gethostname()}, pid \d+"),
            output_lock(layout),
        ):
            pass
        lock = tmp_path / "_lock.json"
        assert _until(lambda: json.loads(lock.read_text())["heartbeat"] > first["heartbeat"])  # refreshed
    assert not (tmp_path / "_lock.json").exists()
    with output_lock(layout):  # let go: the next run gets in
        pass


def test_a_lock_its_run_left_behind_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.1)  # another host's is watched for 1.5 beats
    layout = CampaignLayout(str(tmp_path))
    _held_by(layout, "another-host", 1234, seen_ago=lock_module.STALE_SECONDS + 5)  # not refreshed: stale
    with output_lock(layout):
        assert json.loads((tmp_path / "_lock.json").read_text())["host"] == socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _held_by(layout, socket.gethostname(), int(gone.stdout), seen_ago=1)  # fresh, but its process is gone
    with output_lock(layout):
        pass
    _held_by(layout, "another-host", 1234, seen_ago=1)  # fresh, on a host this one cannot check
    with pytest.raises(OutputBusyError, match="another-host"), output_lock(layout):
        pass
    # this host's name, another container's process namespace: its pid says nothing here
    _held_by(layout, socket.gethostname(), int(gone.stdout), seen_ago=1, pidns="pid:[1]")
    with pytest.raises(OutputBusyError), output_lock(layout):
        pass
    # this host's name and pid namespace (the initial one of every Linux machine), another machine
    # (cloned VMs, containers given one `hostname:`): a pid gone here may run there
    _held_by(layout, socket.gethostname(), int(gone.stdout), seen_ago=1, boot="another-machine")
    with pytest.raises(OutputBusyError), output_lock(layout):
        pass
    # left by a version that kept no boot id: judged by its host name, as then
    holder = json.loads((tmp_path / "_lock.json").read_text())
    del holder["boot"]
    (tmp_path / "_lock.json").write_text(json.dumps(holder))
    with output_lock(layout):
        pass
    # this host's, its process running, its heartbeat far behind this clock (stepped forward, a VM
    # resumed): watched, not taken from a live run; left unrefreshed, taken over
    _held_by(layout, socket.gethostname(), os.getppid(), seen_ago=lock_module.STALE_SECONDS + 30)
    assert lock_module._verdict(json.loads((tmp_path / "_lock.json").read_text()), None) == "watch"
    with output_lock(layout):
        pass


def test_the_half_published_files_of_a_killed_run_go_when_the_next_run_takes_the_output(tmp_path):
    """A run killed between writing a file's temporary copy and renaming it left `.NAME.part-*`
    files beside the videos and the report for good; files of other names stay. In the campaign
    cache, which runs on other outputs may be publishing into, only those too old to be anyone's
    publish go (a 4-hour narration's PCM left there was ~1 GB); another campaign's output root
    below this one (its lock there) is its own."""
    from heygem_ray import storage

    (tmp_path / "_markers").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "_cache" / "audio").mkdir(parents=True)
    left = [
        tmp_path / "._report.html.part-c19d1e20",
        tmp_path / "_markers" / ".r.json.part-0a1b2c3d",
        tmp_path / "sub" / ".v.mp4.part-ffffffff",
        tmp_path / "_cache" / "audio" / ".old.f32.part-0a1b2c3d",  # a day old: its process is gone
    ]
    kept = [
        tmp_path / ".hidden",
        tmp_path / "v.part-3.mp4",
        tmp_path / "v.mp4",
        tmp_path / ".intro.part-1.mp4",  # a user's file, not one of ours
        tmp_path / "_cache" / "audio" / ".a.f32.part-0a1b2c3d",  # another run sharing the cache may be writing it
        tmp_path / "c42" / ".v.mp4.part-0a1b2c3d",  # output=<this>/c42: another campaign's, running
        tmp_path / "c42" / "_cache" / ".a.f32.part-0a1b2c3d",
    ]
    (tmp_path / "c42" / "_cache").mkdir(parents=True)
    (tmp_path / "c42" / "_lock.json").write_text("{}")
    for path in left + kept:
        path.write_bytes(b"x")
    day_ago = time.time() - 86400
    os.utime(left[-1], (day_ago, day_ago))
    with output_lock(CampaignLayout(str(tmp_path))):
        assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
    assert storage.remove_parts(str(tmp_path), skip=str(tmp_path / "_cache"), lock_name="_lock.json") == 0
    assert storage.remove_parts("memory://x/out") == 0


@pytest.mark.parametrize("clock", ["behind", "ahead"])
def test_another_hosts_lock_is_judged_by_whether_it_is_refreshed_not_by_its_clock(tmp_path, monkeypatch, clock):
    """Two hosts' clocks may differ by minutes. A live run on a host whose clock is far behind this
    one's writes heartbeats that look stale here: watched, it is seen refreshing its lock and is
    left alone (it was taken over, and two runs wrote one output). A dead run's lock from a host whose
    clock is far ahead looks fresh for as long as the difference: watched, it is seen unrefreshed and
    is taken over (it blocked the output for that long)."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.2)
    layout = CampaignLayout(str(tmp_path))
    skew = 3600.0 if clock == "behind" else -3600.0
    _held_by(layout, "render-head-2", 4321, seen_ago=skew)
    stop = threading.Event()

    def beat() -> None:  # the other host's live run, on its own clock
        while not stop.wait(0.05):
            _held_by(layout, "render-head-2", 4321, seen_ago=skew)

    if clock == "behind":
        beating = threading.Thread(target=beat)
        beating.start()
        try:
            with (
                pytest.raises(OutputBusyError, match="render-head-2.*on a clock unlike this host's"),
                output_lock(layout),
            ):
                pass
        finally:
            stop.set()
            beating.join()
        assert json.loads((tmp_path / "_lock.json").read_text())["host"] == "render-head-2"  # theirs, left alone
    else:
        started = time.monotonic()
        with output_lock(layout):
            assert json.loads((tmp_path / "_lock.json").read_text())["host"] == socket.gethostname()
        assert time.monotonic() - started >= 0.2 * lock_module.WATCH_HEARTBEATS  # watched first


def test_a_run_whose_lock_was_taken_over_stops_refreshing_it_and_stops(tmp_path, monkeypatch, caplog):
    """A run whose store did not answer for a minute finds another run holding its lock: it says so,
    leaves that run's lock alone (neither refreshed over, nor removed at its end) and stops."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    layout = CampaignLayout(str(tmp_path))
    with output_lock(layout) as held:
        held.check()  # still held: goes on
        (tmp_path / "_lock.json").unlink()  # removed by hand: made again
        assert _until(lambda: (tmp_path / "_lock.json").exists())
        assert json.loads((tmp_path / "_lock.json").read_text())["pid"] == os.getpid() and not held.lost.is_set()
        with lock_module._serialized(layout.output):  # as a run taking over holds it
            _held_by(layout, "render-head-2", 4321, seen_ago=0)  # the other run took over
        assert held.lost.wait(20)  # its heartbeat found it
        assert json.loads((tmp_path / "_lock.json").read_text())["host"] == "render-head-2"
        with pytest.raises(OutputLostError, match="another run took output .* over while this one rendered"):
            held.check()
    assert json.loads((tmp_path / "_lock.json").read_text())["host"] == "render-head-2"
    assert "took over output" in caplog.text and "this run stops" in caplog.text


def test_a_run_silent_long_enough_to_be_taken_over_stops_when_it_finds_its_lock_gone(tmp_path, monkeypatch, caplog):
    """A run whose store did not answer for long enough that another run could take the output over,
    finish and let go, finds no lock: it stops rather than make it again and write over what the
    other published (a lock removed by hand while the run beats is made again, as above)."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(lock_module, "STALE_SECONDS", 0.4)
    real_put, silent, refused = lock_module._put, [False], threading.Event()

    def put(*args, **kwargs):
        if silent[0]:
            refused.set()
            raise OSError(errno.ECONNRESET, "store away")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(lock_module, "_put", put)
    layout = CampaignLayout(str(tmp_path))
    with output_lock(layout) as held:
        silent[0] = True  # the store does not answer this run (for longer than STALE / 2, as it turns out)
        assert refused.wait(20)  # no write of the heartbeat's from before is under way now
        (tmp_path / "_lock.json").unlink()  # meanwhile another run took the output over, finished, let go
        assert held.lost.wait(20)  # its heartbeat, answered again after that long, finds no lock
        silent[0] = False
        with pytest.raises(OutputLostError):
            held.check()
        assert not (tmp_path / "_lock.json").exists()  # not made again
    assert "was gone after this run wrote none for" in caplog.text


def test_a_run_that_cannot_refresh_its_lock_stops_before_another_may_take_it_over(tmp_path, monkeypatch):
    """Its store refusing every write (expired credentials), or its heartbeat stuck on a store that
    does not answer, the run went on rendering for ever: after STALE_SECONDS (and a watch) another
    run could take the output over while it still wrote there. It stops first, saying why."""
    layout = CampaignLayout(str(tmp_path))
    with output_lock(layout) as held:
        held.check()  # refreshed just now
        held.refreshed_at -= lock_module.STALE_SECONDS - lock_module.HEARTBEAT_SECONDS - 5
        held.check()  # within a few beats: a store that answers again in time stops nothing
        held.refreshed_at -= 10
        with pytest.raises(OutputLostError, match="could not refresh its lock"):
            held.check()
    # and another host's lock that looks stale is watched for as long as its run may go unrefreshed
    assert lock_module.HEARTBEAT_SECONDS * lock_module.WATCH_HEARTBEATS >= lock_module.STALE_SECONDS


def test_a_lock_write_refused_twice_is_ours_where_our_writes_landed_and_not_made_again_when_let_go(monkeypatch):
    """Two PUTs whose answers were lost though they landed read back as ours: the run kept its lock
    but took itself for taken over and stopped. And a beat whose run is letting its lock go (the
    lock removed under it) must not make it again for a run that has ended."""
    mine = {"token": "ours", "host": "h"}
    on_store: dict = {}

    def landed_unanswered(uri: str, data: bytes, version: str | None) -> None:
        on_store.update(json.loads(data))
        raise lock_module._Refused()

    monkeypatch.setattr(lock_module, "_conditional_put", landed_unanswered)
    monkeypatch.setattr(lock_module, "_read", lambda uri: (dict(on_store), "e1"))
    assert lock_module._put("s3://b/out/_lock.json", mine, "e0")

    def refused(uri: str, data: bytes, version: str | None) -> None:
        raise lock_module._Refused()

    # ours, but an earlier beat's (this write did not land): not refreshed by it
    monkeypatch.setattr(lock_module, "_conditional_put", refused)
    assert not lock_module._put("s3://b/out/_lock.json", mine, "e0")
    written = []

    def put_once_refused(uri, data, version):
        if not written:
            written.append(version)
            raise lock_module._Refused()
        written.append(version)

    monkeypatch.setattr(lock_module, "_conditional_put", put_once_refused)
    monkeypatch.setattr(lock_module, "_read", lambda uri: (None, None))  # removed meanwhile
    assert not lock_module._put("s3://b/out/_lock.json", mine, "e0", recreate=lambda: False)
    assert written == []  # a run letting its lock go writes none (a write would create it)
    letting_go = iter([True, False])  # ... nor once it lets go during the write
    assert not lock_module._put("s3://b/out/_lock.json", mine, "e0", recreate=lambda: next(letting_go))
    assert written == ["e0"]  # no second write, that would have created it
    written.clear()
    assert lock_module._put("s3://b/out/_lock.json", mine, "e0")  # a live run's beat makes it again
    assert written == ["e0", None]


def _race(layout: CampaignLayout, runs: int = 8) -> int:
    """`runs` runs start on one output at the same instant: how many got in. One that gets in holds
    the output till every other has been refused (by count: a loaded machine keeps no seconds)."""
    start, got_in, refused, all_tried = threading.Barrier(runs), [], [], threading.Event()

    def run() -> None:
        start.wait()
        try:
            with output_lock(layout):
                got_in.append(1)
                all_tried.wait(60)  # held while the others try
        except OutputBusyError:
            refused.append(1)
            if len(refused) == runs - 1:
                all_tried.set()

    threads = [threading.Thread(target=run) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(got_in)


def test_of_runs_starting_at_the_same_instant_one_gets_in(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.1)
    layout = CampaignLayout(str(tmp_path / "out"))
    for _ in range(3):
        assert _race(layout) == 1  # a free lock
        _held_by(layout, "another-host", 1234, seen_ago=lock_module.STALE_SECONDS + 5)
        assert _race(layout) == 1  # a stale one, taken over


def test_on_s3_the_store_lets_one_run_in_and_a_lost_lock_stops_its_run(s3_endpoint, monkeypatch):
    """Conditional PUTs (If-None-Match, If-Match on the ETag read) against a real S3 endpoint."""
    import boto3

    from heygem_ray import storage

    boto3.client("s3").create_bucket(Bucket="heygem-lock")
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    layout = CampaignLayout("s3://heygem-lock/campaign")
    assert _race(layout, runs=6) == 1
    storage.write_bytes(layout.lock, json.dumps({"host": "h", "token": "old", "heartbeat": 0}).encode())
    assert _race(layout, runs=6) == 1  # stale: taken over by one
    assert not storage.exists(layout.lock)  # let go at the end
    with output_lock(layout) as held:
        mine = json.loads(storage.read_bytes(layout.lock))
        storage.write_bytes(layout.lock, json.dumps({**mine, "token": "theirs", "host": "render-head-2"}).encode())
        deadline = time.time() + 10
        while not held.lost.is_set() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(OutputLostError):
            held.check()
    assert json.loads(storage.read_bytes(layout.lock))["host"] == "render-head-2"  # theirs, left alone


def test_on_s3_a_stale_lock_removed_while_it_is_taken_over_is_made_anew(s3_endpoint):
    """The lock read as stale, then removed (its run ended) before the If-Match PUT over it: the
    store answers 404, which is no "output cannot be written" (a run again would get in): the lock
    is created anew."""
    import boto3

    from heygem_ray import storage

    boto3.client("s3").create_bucket(Bucket="heygem-lock-gone")
    uri = CampaignLayout("s3://heygem-lock-gone/campaign").lock
    storage.write_bytes(uri, json.dumps({"host": "h", "token": "old", "heartbeat": 0}).encode())
    _, version = lock_module._read(uri)
    storage.remove(uri)
    mine = {"host": "here", "token": "mine"}
    assert lock_module._put(uri, mine, version)
    assert json.loads(storage.read_bytes(uri))["token"] == "mine"


def test_the_cli_refuses_an_output_another_run_is_writing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _held_by(CampaignLayout(str(out)), "render-head-2", 4321, seen_ago=3)
    result = render_cli(f"manifest={tmp_path / 'm.parquet'}", f"output={out}", "cluster=inline", timeout=120)
    assert result.returncode == 2
    assert "is being written by another run (host render-head-2, pid 4321" in result.stderr
    assert not (out / "_config.yaml").exists()  # the other run's config is left alone


@pytest.mark.parametrize("where", ["a file", "a folder that cannot be made"])
def test_an_output_root_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, where):
    """Exit status 2 and why, not "run the same command again to resume" (exit 1): a file where
    the folder should be (said of the root, not of "a parent of it"), or a place no folder can be
    made (/proc here; a bucket that is none)."""
    out = tmp_path / "out"
    if where == "a file":
        out.write_text("a file where the output folder should be")
    else:
        out = Path("/proc/heygem-output")
    result = render_cli(f"manifest={tmp_path / 'm.parquet'}", f"output={out}", "cluster=inline", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    # the root itself said to be a file (it was "a parent of it is a file")
    why = f"{out}: is a file: the output root is the folder" if where == "a file" else "cannot be written"
    assert "heygem-ray: error: output" in result.stderr and why in result.stderr
    assert "Traceback" not in result.stderr and "run the same command again" not in result.stderr


@pytest.fixture(params=[(501, "NotImplemented"), (400, "InvalidArgument")], ids=["501", "400"])
def s3_without_conditional_puts(request, s3_endpoint):
    """Another door to the same S3 endpoint that answers a conditional PUT as a store without them
    does: 501 NotImplemented, or 400 for a header it does not take."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    status, code = request.param
    app = DomainDispatcherApplication(create_backend_app)

    def store(environ, start_response):
        conditional = "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ
        if environ["REQUEST_METHOD"] == "PUT" and conditional:
            body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>not here</Message></Error>".encode()
            start_response(f"{status} No", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, store, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_store_without_conditional_puts_still_runs_best_effort(s3_without_conditional_puts, monkeypatch, caplog):
    import boto3

    from heygem_ray import storage

    monkeypatch.setattr(lock_module, "_UNCONDITIONAL", set())
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    boto3.client("s3").create_bucket(Bucket="heygem-plain")
    storage.configure({"s3": {"endpoint_url": s3_without_conditional_puts}})
    try:
        layout = CampaignLayout("s3://heygem-plain/campaign")
        with output_lock(layout) as held:
            first = json.loads(storage.read_bytes(layout.lock))
            refreshed = lambda: json.loads(storage.read_bytes(layout.lock))["heartbeat"] > first["heartbeat"]
            assert _until(refreshed)
            held.check()
            with pytest.raises(OutputBusyError), output_lock(layout):  # a second run is still refused
                pass
        assert not storage.exists(layout.lock)
        assert "takes no conditional PUT" in caplog.text
    finally:
        storage.configure(None)


def test_an_output_root_named_with_double_colons_is_locked_as_named(tmp_path):
    """fsspec reads "a::b" as file system a over b: a root named "promo::v2" was locked at "promo",
    so a second run got into it while the first wrote there."""
    root = tmp_path / "promo::v2"
    root.mkdir()
    layout = CampaignLayout(str(root))
    with output_lock(layout), pytest.raises(OutputBusyError), output_lock(layout):
        pass
    assert not (tmp_path / "promo").exists()
