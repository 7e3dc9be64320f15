"""The studio: users and sessions, the store's checks, and the running app on a real Ray head (its job
server), driven over HTTP as a browser and Gradio's client would: log in, upload, submit, follow
the progress to the end, download the zip; and another user reaching none of it. Then the same
campaign once more in a real browser (headless Chromium through Playwright), clicking its way
through the pages."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import playwright_missing, playwright_page

from helpers import HandClock, _free_port
from heygem_ray.layout import CampaignLayout
from heygem_ray.studio.server import STOP_GRACE_SECONDS
from heygem_ray.studio.sessions import SessionKeyError, Sessions
from heygem_ray.studio.store import StudioStore, UploadError, check_upload, read_uploaded_manifest
from heygem_ray.studio.users import add_user, authenticate, check_name, read_users

MIB = 2**20


def _in_thread(call: Any, *args: Any) -> tuple[threading.Thread, list[BaseException | None]]:
    """A thread (not started) that runs `call(*args)`; what it raised, or None, lands in the list
    for the test's own thread to check (an assert failing in another thread fails no test)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call(*args)
            raised.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            raised.append(exc)

    return threading.Thread(target=run, daemon=True), raised


#: how long a stopped studio may take to be gone: its requests' grace, then its own wind-up
STOP_SECONDS = STOP_GRACE_SECONDS + 20
#: why the browser test cannot run here (no Chromium, no Playwright), or None
NO_BROWSER = playwright_missing()


# ------------------------------------------------------------------------------ users and sessions
def test_users_file_keeps_salted_hashes_and_checks_passwords(tmp_path):
    users = tmp_path / "users.toml"
    add_user(users, "alice", "s3cret pass")
    add_user(users, "bob", "s3cret pass")
    text = users.read_text()
    assert "s3cret" not in text
    hashes = read_users(users)
    assert hashes["alice"] != hashes["bob"]  # salted: the same password, different hashes
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    assert authenticate(users, "alice", "s3cret pass")
    assert not authenticate(users, "alice", "s3cret pas")
    assert not authenticate(users, "carol", "s3cret pass")
    add_user(users, "alice", "new one")  # a new password replaces the old
    assert authenticate(users, "alice", "new one") and not authenticate(users, "alice", "s3cret pass")


@pytest.mark.parametrize("name", ["../alice", "Alice", "a/b", "", ".hidden", "x" * 80])
def test_user_names_that_could_name_another_folder_are_refused(name):
    with pytest.raises(ValueError):
        check_name(name)


def test_sessions_are_signed_expire_and_end_with_the_password():
    sessions = Sessions(b"k" * 32)
    hashes = {"alice": "hash-1", "bob": "hash-b"}
    cookie = sessions.issue("alice", "hash-1", now=1000.0)
    assert sessions.user(cookie, hashes, now=1001.0) == "alice"
    assert sessions.user(cookie.replace("alice", "bob"), hashes, now=1001.0) is None  # not signed for bob
    assert Sessions(b"x" * 32).user(cookie, hashes, now=1001.0) is None  # another key
    assert sessions.user(cookie, hashes, now=1000.0 + 13 * 3600) is None  # expired
    assert sessions.user(cookie, {"alice": "hash-2"}, now=1001.0) is None  # a new password
    assert sessions.user(cookie, {}, now=1001.0) is None  # removed from the users file
    assert sessions.user(None, hashes) is None and sessions.user("alice", hashes) is None
    assert sessions.user("alice|99999999999|x|\u00e9\u00e9", hashes) is None  # not ASCII: refused, not a crash
    assert sessions.issue("alice", "hash-1", now=1000.0) != cookie  # each login its own session


def test_a_signed_out_session_is_refused_even_from_a_copy_of_its_cookie_and_after_a_restart(tmp_path):
    ended = str(tmp_path / "key.ended")
    sessions = Sessions(b"k" * 32, ended_file=ended)
    hashes = {"alice": "hash-1"}
    kept, copied = sessions.issue("alice", "hash-1"), sessions.issue("alice", "hash-1")
    assert sessions.end(copied, hashes) == "alice"
    assert sessions.user(copied, hashes) is None and sessions.user(kept, hashes) == "alice"  # that session only
    assert sessions.end(copied, hashes) is None and sessions.end("forged|1|2|3", hashes) is None
    assert oct(os.stat(ended).st_mode & 0o777) == "0o600"
    restarted = Sessions(b"k" * 32, ended_file=ended)
    assert restarted.user(copied, hashes) is None and restarted.user(kept, hashes) == "alice"
    # ended sessions are kept only until they would have expired
    later = time.time() + 13 * 3600
    restarted.end(restarted.issue("alice", "hash-1", now=later), hashes, now=later)
    assert len(json.loads(Path(ended).read_text())["sessions"]) == 1  # `copied`'s would have expired by then
    # one user signing in and out without end keeps the file small: past 50, all of theirs end at once
    other = restarted.issue("alice", "hash-1")
    for _ in range(60):
        restarted.end(restarted.issue("alice", "hash-1"), hashes)
    assert len(json.loads(Path(ended).read_text())["sessions"]) <= 51
    assert restarted.user(other, hashes) is None and Sessions(b"k" * 32, ended_file=ended).user(other, hashes) is None
    time.sleep(1.1)
    assert restarted.user(restarted.issue("alice", "hash-1"), hashes) == "alice"  # a new login is fine
    (tmp_path / "key.ended").write_text("not json")
    with pytest.raises(SessionKeyError, match="cannot be read"):
        Sessions(b"k" * 32, ended_file=ended)


def test_a_session_key_that_could_be_forged_stops_the_studio(tmp_path):
    from heygem_ray.studio.sessions import load_key

    key = load_key(str(tmp_path / "new.key"))
    assert len(key) == 32 and load_key(str(tmp_path / "new.key")) == key  # made once, then kept
    assert oct((tmp_path / "new.key").stat().st_mode & 0o777) == "0o600"
    empty = tmp_path / "empty.key"
    empty.touch(mode=0o600)
    with pytest.raises(SessionKeyError, match="32-byte key"):
        load_key(str(empty))
    assert empty.read_text() == ""  # never overwritten
    shared = tmp_path / "shared.key"
    shared.write_text("ab" * 32)
    shared.chmod(0o644)
    with pytest.raises(SessionKeyError, match="readable by other users"):
        load_key(str(shared))


def test_password_guessing_slows_down(tmp_path):
    from heygem_ray.studio.users import LoginGuard, UsersFile

    users_path = tmp_path / "users.toml"
    add_user(users_path, "alice", "right")
    users, guard = UsersFile(users_path), LoginGuard(free=3, name_free=6)
    mallory, alice = guard.keys("alice", "10.0.0.66"), guard.keys("alice", "10.0.0.1")
    for _ in range(3):
        assert guard.begin(*mallory) == 0
        assert not guard.check(users, "alice", "wrong", *mallory)
    assert guard.begin(*mallory) > 0 and guard.wait_seconds(*guard.keys("bob", "10.0.0.66")) > 0
    # the guesser is slowed, not alice on her own machine...
    assert guard.wait_seconds(*alice) == 0 and guard.wait_seconds(*guard.keys("bob", "10.0.0.2")) == 0
    for address in ("10.0.0.67", "10.0.0.68", "10.0.0.69"):  # ...until her name fails from many addresses
        keys = guard.keys("alice", address)
        assert guard.begin(*keys) == 0 and not guard.check(users, "alice", "wrong", *keys)
    assert guard.wait_seconds(*alice) > 0
    tricked = LoginGuard(free=3)  # a name made to look like another key counts as that name only
    for _ in range(3):
        tricked.begin(*tricked.keys("alice@10.0.0.1", "10.0.0.66"))
    assert tricked.wait_seconds(*tricked.keys("alice", "10.0.0.1")) == 0
    add_user(users_path, "bob", "pw")  # a running studio sees users added since it started
    bob = guard.keys("bob", "10.0.0.2")
    assert guard.begin(*bob) == 0 and guard.check(users, "bob", "pw", *bob)
    assert guard.wait_seconds(*bob) == 0  # a right password clears the try
    # tries sent all at once are counted as they start, before any check has answered
    burst = LoginGuard(free=3)
    assert [burst.begin(*burst.keys("alice", "10.0.0.9")) == 0 for _ in range(5)] == [True] * 3 + [False] * 2


def test_failing_as_a_user_from_many_addresses_does_not_keep_them_out_of_their_own_browser(tmp_path):
    """Fifty failures as alice, from ten addresses, slow every try as alice: anyone could keep her
    out, failing once more whenever the wait ends. A browser she signed in from is known (a signed
    cookie): its tries count only against her known browsers, not the name's failures nor its address's."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import build_app
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.sessions import DEVICE_COOKIE

    users = tmp_path / "users.json"
    add_user(str(users), "alice", "alice-password")
    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    app = build_app(service, str(users), Sessions(b"k" * 32))

    def browser(address: str) -> TestClient:
        return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False, client=(address, 50000))

    def sign_in(client: TestClient, password: str) -> int:
        return client.post("/login", data={"name": "alice", "password": password}).status_code

    hers = browser("10.1.0.1")
    assert sign_in(hers, "alice-password") == 303 and hers.cookies.get(DEVICE_COOKIE)
    hers.get("/logout")
    for bot in range(10):
        mallory = browser(f"10.66.0.{bot}")
        assert [sign_in(mallory, "guess") for _ in range(5)] == [401] * 5
    assert sign_in(browser("10.1.0.2"), "alice-password") == 429  # a browser not known: the name's delay
    forged = browser("10.66.1.1")
    forged.cookies.set(DEVICE_COOKIE, "alice|9999999999|" + "0" * 64)
    assert sign_in(forged, "alice-password") == 429
    assert sign_in(hers, "alice-password") == 303  # hers
    assert sign_in(browser("10.1.0.3"), "alice-password") == 303  # and her sign-in cleared the name's failures
    hers.get("/logout")
    office = browser("10.1.0.1")  # a guesser behind her office's address: that address waits, she does not
    assert [sign_in(office, "guess") for _ in range(6)] == [401] * 5 + [429]
    assert sign_in(hers, "alice-password") == 303
    # her sign-in there clears no share of the address's failures: a guesser with an account would
    # alternate guesses and sign-ins, never slowed
    laptop, neighbour = browser("10.9.0.1"), browser("10.9.0.1")
    assert sign_in(laptop, "alice-password") == 303
    laptop.get("/logout")
    guess = {"name": "bob", "password": "guess"}
    assert [neighbour.post("/login", data=guess).status_code for _ in range(4)] == [401] * 4
    assert sign_in(laptop, "alice-password") == 303
    assert [neighbour.post("/login", data=guess).status_code for _ in range(2)] == [401, 429]
    laptop.get("/logout")
    assert [sign_in(hers, "typo") for _ in range(6)] == [401] * 5 + [429]  # her browsers' own failures count
    # a new password forgets every browser (one whose cookie was copied with the password that leaked)
    sessions = Sessions(b"k" * 32)
    cookie = sessions.device("alice", "hash-1")
    assert sessions.known_device(cookie, "alice", {"alice": "hash-1"})
    assert not sessions.known_device(cookie, "alice", {"alice": "hash-2"})
    assert not sessions.known_device(cookie, "bob", {"alice": "hash-1", "bob": "hash-1"})


def test_signing_in_as_oneself_does_not_reset_an_addresss_guesses(tmp_path, monkeypatch):
    """A user guessing at other names from one address cannot clear that address's count by signing
    in as themselves between guesses; an IPv6 host counts by its /64; an address's failures are
    forgotten an hour after its last."""
    from heygem_ray.studio.users import LoginGuard, UsersFile

    users_path = tmp_path / "users.toml"
    add_user(users_path, "mallory", "mine")
    users, guard = UsersFile(users_path), LoginGuard(free=3, name_free=50)
    for victim in ("alice", "bob", "carol"):
        guess = guard.keys(victim, "10.0.0.66")
        assert guard.begin(*guess) == 0 and not guard.check(users, victim, "guess", *guess)
        own = guard.keys("mallory", "10.0.0.66")
        if victim != "carol":  # a sign-in of one's own, which counts as no failure
            assert guard.begin(*own) == 0 and guard.check(users, "mallory", "mine", *own)
    assert guard.wait_seconds(*guard.keys("dave", "10.0.0.66")) > 0  # three guesses from that address
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3"):  # one /64, three addresses
        keys = guard.keys("erin", host)
        assert guard.begin(*keys) == 0 and not guard.check(users, "erin", "guess", *keys)
    assert guard.wait_seconds(*guard.keys("frank", "2001:db8::99")) > 0
    assert guard.wait_seconds(*guard.keys("frank", "2001:db8:0:1::1")) == 0  # another /64
    later = time.time() + LoginGuard.FORGET_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert guard.wait_seconds(*guard.keys("dave", "10.0.0.66")) == 0


# ------------------------------------------------------------------------------------- the store
def test_uploads_are_checked_by_what_they_are(tmp_path, media_dir):
    assert check_upload(str(media_dir / "speech3.wav"), "audio", MIB) == "speech3.wav"
    assert check_upload(str(media_dir / "still.png"), "avatar", MIB) == "still.png"
    from PIL import Image

    from heygem_ray.media import heif

    heif.register_opener()
    Image.new("RGB", (64, 48), (200, 150, 120)).save(tmp_path / "IMG_0001.HEIC")
    assert check_upload(str(tmp_path / "IMG_0001.HEIC"), "avatar", MIB) == "IMG_0001.HEIC"  # an iPhone's photo
    poses = [Image.new("RGB", (64, 48), (40 * i, 80, 120)) for i in range(3)]
    poses[0].save(tmp_path / "wave.gif", save_all=True, append_images=poses[1:], duration=[2000, 100, 100])
    assert check_upload(str(tmp_path / "wave.gif"), "avatar", MIB) == "wave.gif"  # an animated presenter
    fake = tmp_path / "song.wav"
    fake.write_text("not audio at all")
    with pytest.raises(UploadError, match="song.wav: not a readable audio file"):
        check_upload(str(fake), "audio", MIB)
    with pytest.raises(UploadError, match="not an accepted avatar file"):
        check_upload(str(media_dir / "speech3.wav"), "avatar", MIB)
    with pytest.raises(UploadError, match="over the upload limit"):
        check_upload(str(media_dir / "clip6.mp4"), "avatar", 1000)
    # a narration with no samples, or a click: refused here, not by the campaign after Render
    import wave

    import numpy as np

    from heygem_ray import demo

    with wave.open(str(tmp_path / "empty.wav"), "wb") as header_only:
        header_only.setnchannels(1), header_only.setsampwidth(2), header_only.setframerate(16000)
    demo.write_audio(str(tmp_path / "click.wav"), np.full(800, 0.5, np.float32), sample_rate=16000)
    with pytest.raises(UploadError, match=r"^empty.wav: has no audio samples$"):
        check_upload(str(tmp_path / "empty.wav"), "audio", MIB)
    with pytest.raises(UploadError, match=r"^click.wav: is 0.05 s long: too short \(at least 0.1 s\)$"):
        check_upload(str(tmp_path / "click.wav"), "audio", MIB)


def test_campaign_ids_and_users_never_reach_outside_their_folder(tmp_path):
    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    assert store.output("alice", campaign) == str(tmp_path / "store" / "alice" / campaign / "output")
    for bad in ("../bob/20261130-000000-abcdef", "20261130-000000-abcdef/..", "x"):
        with pytest.raises(KeyError):
            store.campaign_root("alice", bad)
    with pytest.raises(ValueError):
        store.campaign_root("../bob", campaign)
    assert store.load("bob", campaign) is None


def test_a_user_over_quota_is_refused_until_a_campaign_is_deleted(tmp_path, media_dir):
    """With the cluster down the campaign is kept, not submitted; a second one that would pass the
    user's quota is refused and nothing of it is stored; deleting the first makes room. Another
    user can delete nothing of theirs."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio import service as service_module
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    audio, avatar = str(media_dir / "speech3.wav"), str(media_dir / "still.png")
    one = os.path.getsize(audio) + os.path.getsize(avatar)
    cfg = StudioConfig(store=str(tmp_path / "store"), user_quota_gb=1.5 * one / 2**30)
    studio = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    with pytest.raises(ClusterUnavailable):
        studio.create("alice", "first", [audio], [avatar])
    (first,) = studio.store.campaigns("alice")
    assert studio.store.usage("alice") >= one
    cache = tmp_path / "store" / "alice" / "_cache"  # derived, outside the quota
    cache.mkdir()
    (cache / "narration.f32").write_bytes(b"\0" * 10 * one)
    with pytest.raises(UploadError, match="of your .* GiB .* delete campaigns"):
        studio.create("alice", "second", [audio], [avatar])
    # sizes as a person reads them: a small upload was "0.00 GiB"
    assert [service_module._size(n) for n in (300, 340 * 2**10, 12.5 * 2**20, 3.2 * 2**30)] == [
        "1 KiB",
        "340 KiB",
        "12.5 MiB",
        "3.20 GiB",
    ]
    assert [r.id for r in studio.store.campaigns("alice")] == [first.id]
    videos = Path(first.output)
    videos.mkdir(parents=True, exist_ok=True)
    (videos / "r0.mp4").write_bytes(b"\0" * one)  # its videos take her past the quota: no re-run adds more
    with pytest.raises(UploadError, match="past your .* GiB: delete campaigns .* before re-running"):
        studio.rerun("alice", first.id)
    assert not studio.delete("bob", first.id)
    assert studio.delete("alice", first.id) and studio.store.campaigns("alice") == []
    assert studio.store.usage("alice") == 0
    with pytest.raises(ClusterUnavailable):
        studio.create("alice", "third", [audio], [avatar])  # room again: stored, then not submitted


def test_one_users_slow_page_does_not_hold_the_others(tmp_path):
    """Gradio queues the events of one function together under the lowest limit among them (1 by
    default): the campaign list's refresh, on every page load, change and 3 s tick of every user,
    ran one at a time, so one refresh waiting on a slow cluster held every page."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import UploadClaims, build_pages
    from heygem_ray.studio.service import Studio as StudioService

    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    limits: dict = {}
    for fn in build_pages(service, UploadClaims(900), sign_out=True).fns.values():
        limits.setdefault(fn.name, set()).add((fn.concurrency_id, fn.concurrency_limit))
    for name in ("refresh", "check", "whoami", "act"):
        (group,) = limits[name]  # one group, one limit, for all its events
        assert group[1] is None or group[1] > 1, (name, group)
    # the events' threads are their own and enough for every group at its limit: at Gradio's
    # default (40) they shared the web server's pool, and held every request's thread
    from heygem_ray.studio.app import EVENT_THREADS, build_app

    groups = {group for groups in limits.values() for group in groups if isinstance(group[1], int)}
    assert sum(limit for _, limit in groups) <= EVENT_THREADS
    app = build_app(service, None, Sessions(b"k" * 32))
    blocks = app.state.gradio_pages
    blocks.create_limiter()  # as the server's start does
    assert blocks.limiter is not None and blocks.limiter.total_tokens == EVENT_THREADS


def test_the_upload_check_counts_the_plans_rows_where_a_plan_is_uploaded(tmp_path, media_dir):
    """With a plan (a manifest) uploaded, the page said "2 presenter(s) × 2 narration(s) = 4
    video(s)" for a campaign of the plan's 2 rows: the check ran only when the narrations or the
    presenters changed, and never read the plan."""
    import logging
    import shutil
    from types import SimpleNamespace

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import UploadClaims, build_pages, gradio_upload_folder
    from heygem_ray.studio.service import Studio as StudioService

    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    claims = UploadClaims(900)
    pages = build_pages(service, claims, sign_out=False)
    (check,) = {fn.fn for fn in pages.fns.values() if fn.name == "check"}
    folder = Path(gradio_upload_folder()) / f"test-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(parents=True)
    try:
        files = []
        for name, source in (
            ("a.wav", "speech3.wav"),
            ("b.wav", "speech4.wav"),
            ("p.png", "still.png"),
            ("q.png", "still.png"),
        ):
            shutil.copy(media_dir / source, folder / name)
            files.append(str(folder / name))
        plan = folder / "plan.csv"
        plan.write_text("audio,avatar\na.wav,p.png\nb.wav,q.png\n")
        user = "local"
        claims.arrived(user, [*files, str(plan)])
        request = SimpleNamespace(username=None, session_hash="page")
        assert "4 video(s)" in check(files[:2], files[2:], None, request)
        counted = check(files[:2], files[2:], str(plan), request)
        assert "**2 video(s)**" in counted and "plan.csv" in counted, counted
    finally:
        shutil.rmtree(folder)


def test_a_campaigns_results_are_read_again_only_when_they_change(tmp_path):
    """Every poster and video of a campaign's page asks for its results: the table is read once,
    and again only when the campaign writes a new one."""
    from dataclasses import replace

    from heygem_ray.results import RowResult, write_results
    from heygem_ray.studio.store import CampaignRecord

    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    record = CampaignRecord(
        campaign, "alice", "n", time.time(), 1, "classic", "draft", "m", store.output("alice", campaign)
    )
    assert store.results(record.output) == []
    table = os.path.join(record.output, "_results.parquet")
    row = RowResult("a", "ok", "/o/a.mp4", None, 1.0, 25, 1, 1.0, 1, time.time())
    write_results(table, [row])
    first = store.results(record.output)
    assert [r["id"] for r in first] == ["a"] and store.results(record.output) is first  # not read again
    write_results(table, [row, replace(row, id="b", output="/o/b.mp4")])
    assert [r["id"] for r in store.results(record.output)] == ["a", "b"]
    # its finished videos, which each refresh and every seek in a video asks for: worked out once
    # per table (0.7 s for 100,000 rows)
    videos = [f"{record.output}/{name}.mp4" for name in ("v1", "v2")]
    write_results(table, [replace(row, id=f"v{i}", output=uri) for i, uri in enumerate(videos, 1)])
    found = store.finished_videos(record.output)
    assert found == {"v1.mp4": videos[0], "v2.mp4": videos[1]} and store.videos(record.output) == videos
    assert store.finished_videos(record.output) is found
    # the campaigns list, each refresh, reads each feed's counts only when the feed changed
    feed = os.path.join(record.output, "_progress.json")
    with open(feed, "w") as fh:
        json.dump({"state": "finished", "rows": {"total": 2, "ok": 2}, "row_status": {"a": "ok", "b": "ok"}}, fh)
    counts = store.progress(record, rows=False)
    assert counts == {"state": "finished", "rows": {"total": 2, "ok": 2}}  # no row_status
    assert store.progress(record, rows=False) is counts
    whole = store.progress(record)
    assert whole["row_status"] == {"a": "ok", "b": "ok"}  # the open campaign's: whole
    assert store.progress(record) is whole  # its page, every 3 s: megabytes read once per change
    with open(feed + ".new", "w") as fh:  # rewritten as the driver does: a new file renamed over it
        json.dump({"state": "running", "rows": {"total": 3, "ok": 2}, "row_status": {}}, fh)
    os.replace(feed + ".new", feed)
    assert store.progress(record, rows=False)["rows"]["total"] == 3
    assert store.progress(record)["row_status"] == {}


def test_a_running_campaigns_finished_videos_show_and_zip_before_it_ends(tmp_path, monkeypatch):
    """A campaign of hours: the videos its driver has reported (its results parts) are in the
    gallery and the zip while it runs, not only once its table is written at the end; a later
    result of a row counts, and each part is read once however often pages ask."""
    import heygem_ray.results as results_module
    from heygem_ray.results import ResultsTable, RowResult
    from heygem_ray.studio import store as store_module
    from heygem_ray.studio.store import CampaignRecord

    monkeypatch.setattr(store_module, "PARTS_LISTED_SECONDS", 0.0)
    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    record = CampaignRecord(
        campaign, "alice", "n", time.time(), 3, "classic", "draft", "m", store.output("alice", campaign)
    )
    layout = CampaignLayout(record.output)
    os.makedirs(record.output)
    uri = {i: f"{record.output}/r{i}.mp4" for i in range(3)}
    for path in uri.values():
        with open(path, "wb") as fh:
            fh.write(b"video " + path.encode())

    def result(i: int, status: str = "ok") -> RowResult:
        return RowResult(f"r{i}", status, uri[i], None, 1.0, 25, 1, 1.0, 1, time.time())

    first = ResultsTable(layout.results, layout.results_parts, flush_rows=1)  # a first run: no table yet
    first.add(result(0))
    found = store.finished_videos(record.output)
    assert found == {"r0.mp4": uri[0]} and store.finished_videos(record.output) is found  # worked out once
    first.finish(["r0"])
    earlier = ResultsTable(layout.results, layout.results_parts, flush_rows=1)
    earlier.add(result(0))
    earlier.add(result(1))
    earlier.finish(["r0", "r1"])  # an earlier run's table: r0 and r1 done
    running = ResultsTable(layout.results, layout.results_parts, flush_rows=1)
    assert store.finished_videos(record.output) == {"r0.mp4": uri[0], "r1.mp4": uri[1]}
    running.add(result(2))  # this run's first part: r2 done
    running.add(result(1, "failed"))  # re-rendered (its input changed) and failed: not shown
    assert store.videos(record.output) == [uri[0], uri[2]]
    length, chunks = store.zip_stream(record)
    zipped = b"".join(chunks)
    assert length == len(zipped)  # known before the first byte: the download's Content-Length
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        assert sorted(archive.namelist()) == ["r0.mp4", "r2.mp4"]
        assert archive.read("r2.mp4") == b"video " + uri[2].encode()
    os.remove(uri[0])  # gone from the store since its row finished: left out, the rest sent
    length, chunks = store.zip_stream(record)
    zipped = b"".join(chunks)
    assert length == len(zipped)
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        assert archive.namelist() == ["r2.mp4"] and archive.testzip() is None
    reads = []
    monkeypatch.setattr(store_module, "read_results", lambda u: reads.append(u) or results_module.read_results(u))
    for _ in range(3):
        assert store.videos(record.output) == [uri[0], uri[2]]
    assert reads == []  # every part was read once, before
    running.add(result(1))  # r1 again, ok this time
    assert store.videos(record.output) == [uri[0], uri[2], uri[1]] and len(reads) == 1
    running.add(result(0, "skipped"), flush=False)
    running.finish(["r0", "r1", "r2"])  # the end: the table says it all, the parts are gone
    assert store.videos(record.output) == [uri[0], uri[1], uri[2]]
    assert not os.path.exists(layout.results_parts)


def test_one_users_upload_events_do_bounded_work(tmp_path, media_dir, monkeypatch):
    """A page event names up to ~8,000 files (1 MiB): the same upload given many times is one
    upload, a campaign takes at most MAX_UPLOADS of each kind, and the page's check decodes each
    upload once however often the page asks (it sends every file picked so far each time)."""
    import shutil

    from heygem_ray.studio import service
    from heygem_ray.studio import store as store_module
    from heygem_ray.studio.store import UploadError

    audio = str(media_dir / "speech3.wav")
    copy = str(tmp_path / "speech3-copy.wav")
    shutil.copy(audio, copy)
    assert service.distinct_uploads([audio, audio, copy, audio], "narrations") == [audio, copy]
    monkeypatch.setattr(service, "MAX_UPLOADS", 1)
    with pytest.raises(UploadError, match="2 narrations: a campaign takes 1 at most"):
        service.distinct_uploads([audio, copy], "narrations")
    decoded = []
    real_check = store_module.check_upload
    monkeypatch.setattr(store_module, "check_upload", lambda path, *a: decoded.append(path) or real_check(path, *a))
    store = StudioStore(str(tmp_path / "store"))
    checks = store.checks
    assert [checks.problem(audio, "audio", 2**30) for _ in range(3)] == ["", "", ""]
    assert "not an accepted avatar file" in checks.problem(audio, "avatar", 2**30)
    assert decoded == [audio, audio]  # once as audio, once as avatar
    again = [copy, str(tmp_path / "x" / "speech3-copy.wav")]  # two uploads of one name
    os.makedirs(tmp_path / "x")
    shutil.copy(audio, again[1])
    checks.problem(copy, "audio", 2**30)  # the page checked this one: saving it decodes it no more
    uris = store.save_uploads("alice", store.new_id(), again, "audio", 2**30)
    assert [os.path.basename(u) for u in uris] == ["speech3-copy.wav", "speech3-copy-2.wav"]
    assert decoded == [audio, audio, copy, again[1]]


def test_uploads_keep_their_names_in_any_script_and_a_manifest_never_gets_another_file(tmp_path, media_dir):
    """Names were kept to ASCII: "café.wav" and "cafè.wav" were both stored as "caf-.wav" (the second
    as "caf--2.wav"), so a manifest naming "cafè.wav" got the other narration, and "张三.wav" became
    "wav", refused as no audio file."""
    import unicodedata

    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    names = ["café.wav", "cafè.wav", "张三.wav", unicodedata.normalize("NFD", "jalapeño.wav")]
    uploads = []
    for i, name in enumerate(names):
        os.makedirs(tmp_path / str(i))
        uploads.append(str(tmp_path / str(i) / name))
        shutil.copy(media_dir / "speech3.wav", uploads[-1])
    uris = store.save_uploads("alice", campaign, uploads, "audio", 2**30, by_name=True)
    assert [os.path.basename(u) for u in uris] == ["café.wav", "cafè.wav", "张三.wav", "jalapeño.wav"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio,avatar\ncafè.wav,face.png\njalapeño.wav,face.png\n")  # as typed: one code point each
    uri, _ = store.uploaded_manifest("alice", campaign, str(manifest), _uploads(store, campaign, uris))
    assert [r["audio"] for r in pq.read_table(uri).to_pylist()] == [uris[1], uris[3]]
    # two uploads of one name: a manifest could not tell them apart
    with pytest.raises(UploadError, match="two of your audio uploads have this name"):
        store.save_uploads("alice", store.new_id(), [uploads[0], uploads[0]], "audio", 2**30, by_name=True)
    # nor a store that ignores case (macOS, SMB): Intro.wav and intro.wav, one file there, the first lost
    os.makedirs(tmp_path / "cased")
    cased = [str(tmp_path / "cased" / "Intro.wav"), str(tmp_path / "intro.wav")]
    for path in cased:
        shutil.copy(media_dir / "speech3.wav", path)
    with pytest.raises(UploadError, match="two of your audio uploads have this name"):
        store.save_uploads("alice", store.new_id(), cased, "audio", 2**30, by_name=True)
    uris = store.save_uploads("alice", store.new_id(), cased, "audio", 2**30)
    assert [os.path.basename(u) for u in uris] == ["Intro.wav", "intro-2.wav"]


def _uploads(store: StudioStore, campaign: str, audio: list[str] | None = None) -> dict[str, list[str]]:
    """What `save_uploads` stored for a campaign whose manifests name narration.wav and face.png."""
    folder = store.inputs("alice", campaign)
    return {"audio": audio or [f"{folder}/audio/narration.wav"], "avatar": [f"{folder}/avatar/face.png"]}


def test_a_manifest_finds_uploads_by_the_names_the_user_gave_them_and_names_none_missing(tmp_path, media_dir):
    """The web server drops `!`, `?` and `$` from an upload's name before the studio sees it, so a
    manifest naming "Take 2!.wav" (stored as "Take-2.wav") resolved to "Take-2-.wav", and a typo to
    a file never uploaded: Render said ✅ and every such row failed in the job as "input missing".
    A manifest saved by Excel on Windows (cp1252, "é" as one byte) showed the web server's bare
    "Error"."""
    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    os.makedirs(tmp_path / "up")
    stored = []
    for name in ("Take 2.wav", "Why.wav", "café.wav"):  # as the web server hands them over
        shutil.copy(media_dir / "speech3.wav", tmp_path / "up" / name)
        stored += store.save_uploads("alice", campaign, [str(tmp_path / "up" / name)], "audio", 2**30, by_name=True)
    uploads = _uploads(store, campaign, stored)
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio,avatar\nTake 2!.wav,face.png\nWHY?.WAV,face.png\n")
    uri, _ = store.uploaded_manifest("alice", campaign, str(manifest), uploads)
    assert [r["audio"] for r in pq.read_table(uri).to_pylist()] == stored[:2]
    manifest.write_text("audio,avatar\nTake 2.wav,face.png\nTake 3.wav,face.png\n")
    with pytest.raises(UploadError, match="'Take 3.wav' is not among your narration uploads"):
        store.uploaded_manifest("alice", campaign, str(manifest), uploads)
    manifest.write_text("audio,avatar\nTake2.wav,face.png\n")  # Take-2.wav, or Take_2.wav?
    twins = store.save_uploads("alice", campaign, [str(tmp_path / "up" / "Take 2.wav")], "audio", 2**30)
    os.rename(twins[0], twins[0].replace("Take-2.wav", "Take_2.wav"))
    twin = {**uploads, "audio": [*uploads["audio"], twins[0].replace("Take-2.wav", "Take_2.wav")]}
    with pytest.raises(UploadError, match="'Take2.wav' could be any of your narration uploads Take-2.wav, Take_2.wav"):
        store.uploaded_manifest("alice", campaign, str(manifest), twin)
    manifest.write_text("audio,avatar\nTake 2.wav,fcae.png\n")
    with pytest.raises(UploadError, match="'fcae.png' is not among your presenter uploads"):
        store.uploaded_manifest("alice", campaign, str(manifest), uploads)
    manifest.write_bytes("audio,avatar,note\ncafé.wav,face.png,résumé\n".encode("cp1252"))
    uri, _ = store.uploaded_manifest("alice", campaign, str(manifest), uploads)
    assert [r["audio"] for r in pq.read_table(uri).to_pylist()] == [stored[2]]
    assert read_uploaded_manifest(str(manifest)).num_rows == 1  # the page's check reads it too


def test_uploads_past_the_quota_are_refused_before_their_bytes_arrive(tmp_path, monkeypatch):
    """The quota was met only when a campaign was made: uploads alone (kept 15 minutes by the web
    server, and until its next sweep of them) could fill the disk. Each upload now counts, with the
    others the web server may still keep."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import UPLOAD_PATH, build_app
    from heygem_ray.studio.service import CACHE_SWEEP_SECONDS, UPLOAD_WINDOW_SECONDS
    from heygem_ray.studio.service import Studio as StudioService

    cfg = StudioConfig(store=str(tmp_path / "store"), user_quota_gb=1000 / 2**30)  # 1000 bytes
    service = StudioService(cfg, cluster=None, log=logging.getLogger("t"))
    assert service.admit_upload("local", 600) is None
    assert "past your" in (service.admit_upload("local", 600) or "")  # 600 + 600 > 1000
    assert service.admit_upload("other", 600) is None  # each user's own
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + CACHE_SWEEP_SECONDS)
    assert service.admit_upload("local", 200) is None  # two slow ones of one size begin
    assert service.admit_upload("local", 200) is None
    monkeypatch.setattr(time, "time", lambda: now + UPLOAD_WINDOW_SECONDS + CACHE_SWEEP_SECONDS / 2)
    assert "past your" in (service.admit_upload("local", 600) or "")  # past its window, not yet swept
    monkeypatch.setattr(time, "time", lambda: now + UPLOAD_WINDOW_SECONDS + CACHE_SWEEP_SECONDS + 1)
    assert service.admit_upload("local", 600) is None  # 200 + 200 + 600
    # slow ones, arrived whole long after they began: counted from then, as their files are kept;
    # of the two of one size, each arrival stamps one
    monkeypatch.setattr(time, "time", lambda: now + 2 * UPLOAD_WINDOW_SECONDS + CACHE_SWEEP_SECONDS)
    service.upload_arrived("local", 600)
    service.upload_arrived("local", 200)
    service.upload_arrived("local", 200)
    monkeypatch.setattr(time, "time", lambda: now + 2 * UPLOAD_WINDOW_SECONDS + 2 * CACHE_SWEEP_SECONDS + 1)
    assert "past your" in (service.admit_upload("local", 200) or "")  # 600 + 200 + 200 + 200 > 1000
    monkeypatch.undo()
    client = TestClient(build_app(service, None, Sessions(b"k" * 32)), base_url="http://127.0.0.1")
    refused = client.post(UPLOAD_PATH, content=b"x" * 500)
    assert refused.status_code == 413 and "past your" in refused.text
    # Gradio's file route fetches a URL named there: no proxy to the web for users
    for url in ("https://example.com/x.png", "HTTPS://example.com/x.png", "https%3A%2F%2Fexample.com%2Fx.png"):
        for route in ("file=", "file/"):  # Gradio serves files on both
            assert client.get(f"/app/gradio_api/{route}{url}").status_code == 403, (route, url)
    # a file named by URL in a page event: Gradio would fetch it, any size, past the quota
    linked = {"data": [[{"path": "https://example.com/big.wav", "meta": {"_type": "gradio.FileData"}}]], "fn_index": 0}
    answer = client.post("/app/gradio_api/queue/join", json=linked)
    assert answer.status_code == 400 and "uploaded, not linked" in answer.text
    assert client.post("/app/gradio_api/queue/join", content=b"{}" + b" " * 2**20).status_code == 413
    # the sign-in forms (ours and Gradio's) were parsed whole, a GB or a file part of any size,
    # before their fields' limits were checked, for anyone who can reach the port
    form = {"content-type": "application/x-www-form-urlencoded"}
    for path in ("/login", "/app/login"):
        assert client.post(path, content=b"name=a&password=" + b"x" * 2**21, headers=form).status_code == 413
        assert client.post(path, content=iter([b"name=a&password=", b"x" * 2**21]), headers=form).status_code == 411
    # an event run at once past the queue (its size, every event group's concurrency limit)
    assert client.post("/app/gradio_api/run/refresh", json={"data": [None]}).status_code == 404
    # a recording's processing: a file taken into the upload cache past the quota's check
    for path in ("/app/gradio_api/process_recording", "/app/gradio_api/process_recording/"):
        assert client.post(path, files={"data": ("r.wav", b"x" * 500)}).status_code == 404
    chunked = client.post("/app/gradio_api/queue/join", content=iter([b"{}", b" " * 2**20]))  # no length
    assert chunked.status_code == 411
    # a small length said beside a chunked body, which the web server reads whole: past every size
    # check, an upload counted at the length said against the quota
    lying = {"content-length": "10", "transfer-encoding": "chunked"}
    for path in (UPLOAD_PATH, "/app/gradio_api/queue/join", "/login"):
        assert client.post(path, content=iter([b"x" * 2**21]), headers=lying).status_code == 411, path


def test_an_upload_that_never_arrives_stops_counting_against_the_quota(tmp_path):
    """An upload the web server refused (over `max_upload_mb`), or one cut off (a refresh, a
    dropped line), stayed booked at its whole size for the upload window: with nothing stored,
    the user's next upload was refused as over their quota for a quarter of an hour."""
    from starlette.testclient import TestClient

    from heygem_ray.studio.app import UPLOAD_PATH

    app, clients = _alice_and_bob_signed_in(tmp_path, user_quota_gb=2000 / 2**30, max_upload_mb=1500 / 2**20)
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as alice:
        alice.cookies = clients["alice"].cookies
        for _ in range(3):  # each booked 1,600 bytes of the 2,000 as it began, refused once read
            answer = alice.post(UPLOAD_PATH, files={"files": ("take.wav", b"x" * 1600)})
            assert answer.status_code == 413 and "past your" not in answer.text, answer.text
        answer = alice.post(UPLOAD_PATH, files={"files": ("take.wav", b"x" * 1000)})
        assert answer.status_code == 200, answer.text
        answer = alice.post(UPLOAD_PATH, files={"files": ("take2.wav", b"y" * 1000)})
        assert answer.status_code == 413 and "past your" in answer.text  # the one that arrived counts


def test_uploads_a_campaign_took_count_once(tmp_path, media_dir):
    """Once a campaign has taken its uploads into the store (whose usage counts them), they are
    not counted again as recent uploads."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    files = [str(media_dir / "speech3.wav"), str(media_dir / "still.png")]
    size = sum(os.path.getsize(f) for f in files)
    cfg = StudioConfig(store=str(tmp_path / "store"), user_quota_gb=3 * size / 2**30)
    service = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    assert service.admit_upload("alice", size) is None  # what the campaign will take
    assert service.admit_upload("alice", int(1.2 * size)) is None  # uploaded, and no campaign takes it
    with pytest.raises(ClusterUnavailable):  # stored, not submitted (no cluster here)
        service.create("alice", "c", files[:1], files[1:])
    assert service.store.usage("alice") >= size
    # the store's size once, not twice (1 + 1.2 + 0.7 of 3), and the unused uploads still count
    assert service.admit_upload("alice", int(0.7 * size)) is None
    assert service.admit_upload("alice", int(0.2 * size)) is not None


def test_a_refused_campaign_leaves_none_of_its_uploads(tmp_path, media_dir):
    """A narration stored before the avatar beside it is refused is removed with the refusal: no
    page lists it, yet the quota would count it."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.service import Studio as StudioService

    broken = tmp_path / "face.mp4"
    broken.write_bytes(b"\0" * 4096)  # not a video: refused after the narration was stored
    cfg = StudioConfig(store=str(tmp_path / "store"))
    studio = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    with pytest.raises(UploadError, match="face.mp4"):
        studio.create("alice", "refused", [str(media_dir / "speech3.wav")], [str(broken)])
    assert studio.store.usage("alice") == 0
    assert not (tmp_path / "store" / "alice").exists() or not any((tmp_path / "store" / "alice").iterdir())


def test_a_save_cut_short_leaves_the_users_quota_once_it_is_hours_old(tmp_path, media_dir, monkeypatch):
    """A studio stopped while it copied a Render's uploads (or a store that failed, its removal
    too) left a campaign folder without a record: on no page, so never deleted, yet counted in
    its user's quota for good. The watcher removes such folders hours after they were begun; a
    campaign saved whole, and a save too recent to be over, stay."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio import service as studio_service
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable

    studio = studio_service.Studio(
        StudioConfig(store=str(tmp_path / "store")),
        Cluster(f"http://127.0.0.1:{_free_port()}", local=False),
        logging.getLogger("t"),
    )
    with pytest.raises(ClusterUnavailable):  # saved whole (not submitted: no cluster here)
        studio.create("alice", "kept", [str(media_dir / "speech3.wav")], [str(media_dir / "still.png")])
    hours_ago = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() - 7 * 3600))
    cut_short = [f"{hours_ago}-00aa11", studio.store.new_id()]  # hours old, and one under way
    for campaign_id in cut_short:  # its uploads copied, its record never written
        studio.store.save_uploads("alice", campaign_id, [str(media_dir / "speech3.wav")], "audio", 2**30)
    (tmp_path / "store" / "alice" / "00000000-000000-abcdef").mkdir()  # an id of no real time: passed over
    half_deleted = tmp_path / "store" / "alice" / f"{hours_ago}-00bb22" / "output"  # videos: not a save's
    half_deleted.mkdir(parents=True)
    used = studio.store.usage("alice")
    assert studio.remove_unrecorded() == [("alice", cut_short[0])]
    assert half_deleted.exists()
    assert studio.store.usage("alice") < used
    assert (tmp_path / "store" / "alice" / cut_short[1]).exists()
    assert [r.name for r in studio.store.campaigns("alice")] == ["kept"]
    monkeypatch.setattr(studio_service, "UNRECORDED_SECONDS", 0.0)
    assert studio.remove_unrecorded() == [("alice", cut_short[1])]
    assert [r.name for r in studio.store.campaigns("alice")] == ["kept"]


def test_a_rerun_renders_with_the_settings_the_campaign_was_made_with(tmp_path, media_dir):
    """An operator who later points a model at other weights (or removes it) must not re-render
    every finished video of an old campaign when its user re-runs the failed rows."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    cfg = StudioConfig(
        store=str(tmp_path / "store"), models={"lipsync": ["renderer=wav2lip", "renderer.checkpoint=/w/v1.pth"]}
    )
    studio = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    with pytest.raises(ClusterUnavailable):
        studio.create("alice", "c", [str(media_dir / "speech3.wav")], [str(media_dir / "still.png")], model="lipsync")
    (record,) = studio.store.campaigns("alice")
    first = studio.job_overrides(record)
    assert "renderer.checkpoint=/w/v1.pth" in first
    studio.models["lipsync"] = ["renderer=wav2lip", "renderer.checkpoint=/w/v2.pth"]  # the operator's edit
    assert studio.job_overrides(studio.store.load("alice", record.id)) == first
    del studio.models["lipsync"]
    assert studio.job_overrides(studio.store.load("alice", record.id)) == first

    # a campaign made before campaigns kept their settings: its quality as presets were then, and
    # never the default renderer in place of a model no longer offered
    old = replace(studio.store.load("alice", record.id), settings=None, quality="draft (small, fast)")
    with pytest.raises(UploadError, match="model 'lipsync', which this studio no longer offers"):
        studio.job_overrides(old)
    studio.models["lipsync"] = ["renderer=wav2lip", "renderer.checkpoint=/w/v1.pth"]
    overrides = studio.job_overrides(old)
    assert "renderer.checkpoint=/w/v1.pth" in overrides and "encoder.preset=superfast" in overrides
    assert not any(o.startswith("render.max_side") for o in overrides)


def test_a_store_path_with_spaces_quotes_or_brackets_makes_jobs_that_compose(tmp_path, media_dir):
    """A store at "/data/studio (prod)" (or holding a quote, brackets, a '#') put its paths in the
    job's command line as they were: every campaign's job failed to parse its overrides."""
    import logging

    from helpers import compose_config
    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    store = tmp_path / "studio (prod) [eu] #1 it's"
    cfg = StudioConfig(store=str(store))
    studio = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    with pytest.raises(ClusterUnavailable):
        studio.create("alice", "c", [str(media_dir / "speech3.wav")], [str(media_dir / "still.png")])
    (record,) = studio.store.campaigns("alice")
    composed = compose_config(*studio.job_overrides(record))
    assert (composed.manifest, composed.output) == (record.manifest, record.output)
    assert composed.cache == str(store / "alice" / "_cache")


def test_a_manifest_of_very_many_columns_is_refused_from_its_header(tmp_path):
    """170,000 columns in a megabyte of CSV took 1.5 GB and hours of the web server's time (a
    quadratic check of repeated names); refused from the header now, in a moment."""
    store = StudioStore(str(tmp_path / "store"))
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(170_000)) + "\n" + ",".join("x" * 170_000) + "\n")
    started = time.time()
    with pytest.raises(UploadError, match="a manifest has 64 columns at most"):
        store.uploaded_manifest("alice", store.new_id(), str(wide), {})
    header = ",".join(f"c{i}" for i in range(200))
    for trick, fields in (("\n" + header, 200), ("\r\n" + header, 200), ('"a\nb",' + header, 201)):
        wide.write_text(trick + "\n" + ",".join("x" * fields) + "\n")  # as Arrow reads a header, not a line
        with pytest.raises(UploadError, match="a manifest has 64 columns at most"):
            store.uploaded_manifest("alice", store.new_id(), str(wide), {})
    wide_parquet = tmp_path / "wide.parquet"
    pq.write_table(pa.table({f"c{i}": ["x"] for i in range(5000)}), wide_parquet)
    with pytest.raises(UploadError, match="a manifest has 64 columns at most"):
        store.uploaded_manifest("alice", store.new_id(), str(wide_parquet), {})
    assert time.time() - started < 30  # the quadratic check took hours
    chained = tmp_path / "chained.csv"
    campaign = store.new_id()
    own = store.inputs("alice", campaign)
    chained.write_text(f"audio,avatar\n{own}/a.wav::http://example.com/a.wav,face.png\n")
    with pytest.raises(UploadError, match="is not among your uploads"):
        store.uploaded_manifest("alice", campaign, str(chained), {"avatar": [f"{own}/avatar/face.png"]})


def test_a_user_may_have_only_so_many_campaigns_queued_or_running(tmp_path):
    """Each campaign is a Ray job whose driver runs on the head node. A campaign whose job the
    cluster forgot (a restarted head) is not running, and does not count. They are counted from
    the store: a studio just started (its watcher not yet through the store) let a user past the
    limit. Re-runs from two pages at once each passed the check before either was submitted."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import JobUnknown
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.store import CampaignRecord

    class JobServer:  # what Ray's job server answers of each job, and takes
        def __init__(self) -> None:
            self.submitted: list[str] = []

        def job(self, submission_id: str) -> tuple[str, float]:
            if submission_id == "forgotten":
                raise JobUnknown("no such job")
            if submission_id.startswith("ended"):
                return "SUCCEEDED", 1.0
            return "RUNNING", time.time()

        def submit(self, submission_id: str, overrides: list[str], metadata: dict) -> None:
            time.sleep(0.3)  # a job server that takes its time: the other page's re-run checks meanwhile
            self.submitted.append(submission_id)

        def note_submitted(self, submission_id: str, at: float) -> None:
            pass  # asked of running jobs only here

    cluster = JobServer()
    service = StudioService(
        StudioConfig(store=str(tmp_path / "store"), max_active_campaigns=2), cluster=cluster, log=logging.getLogger("t")
    )

    def saved(job: str, user: str = "alice") -> str:
        record = CampaignRecord(
            service.store.new_id(), user, "n", time.time(), 1, "classic (no weights)", "standard", "m", "o", jobs=[job]
        )
        service.store.save(record)
        return record.id

    saved("running-0")
    saved("forgotten")
    with pytest.raises(UploadError, match="give at least one narration"):  # under the limit: on to its checks
        service.create("alice", "third", [], [])
    saved("running-2")
    with pytest.raises(UploadError, match="you have 2 campaign\\(s\\) queued or running"):
        service.create("alice", "third", [], [])
    with pytest.raises(UploadError, match="give at least one narration"):  # bob is not held up
        service.create("bob", "first", [], [])

    ended = [saved(job, "carol") for job in ("ended-a", "ended-b")]
    saved("running-c", "carol")  # one running: room for one more
    outcomes: list[object] = []

    def rerun(campaign_id: str) -> None:
        try:
            outcomes.append(service.rerun("carol", campaign_id))
        except UploadError as exc:
            outcomes.append(exc)

    pages = [threading.Thread(target=rerun, args=(campaign_id,)) for campaign_id in ended]
    for page in pages:
        page.start()
    for page in pages:
        page.join()
    assert len(cluster.submitted) == 1 and sum(isinstance(o, UploadError) for o in outcomes) == 1, outcomes


def test_an_uploaded_manifests_columns_are_read_as_the_cli_reads_them(tmp_path):
    """A spreadsheet's headers (`Audio`, ` avatar`, `ID`, `Box`) were matched exactly: "missing:
    avatar" for a column plainly there, or ids 007 taken for 7 and the face box dropped unsaid; an
    `output` column, or a slip like `outptu`, was left aside without a word; a column of the
    user's own (`uid`) must stay aside, in the CLI too, where it was taken for a slip of `id`."""
    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    uploads = _uploads(store, campaign)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text('\ufeffAudio, Avatar ,ID,Box,uid\r\nnarration.wav,face.png,007,"10,20,110,140",c-1\r\n')
    for kind in ("csv", "parquet"):
        if kind == "parquet":
            sheet = tmp_path / "sheet.parquet"
            columns = {"Audio": ["narration.wav"], " Avatar ": ["face.png"], "ID": ["007"], "Box": [[10, 20, 110, 140]]}
            pq.write_table(pa.table({**columns, "uid": ["c-1"]}), sheet)
        uri, rows = store.uploaded_manifest("alice", campaign, str(sheet), uploads)
        (row,) = pq.read_table(uri).to_pylist()
        assert rows == 1 and row["id"] == "007" and row["audio"].endswith("/audio/narration.wav"), (kind, row)
        assert row["box"] in ("10,20,110,140", [10, 20, 110, 140]), (kind, row)
    # a column of the user's own is not read: numbers in its first rows, text later, failed the upload
    many = tmp_path / "many.csv"
    lines = [f"r{i},narration.wav,face.png,{i}" for i in range(4000)] + ["r4000,narration.wav,face.png,take two"]
    many.write_text("id,audio,avatar,notes\n" + "\n".join(lines) + "\n")
    assert store.uploaded_manifest("alice", campaign, str(many), uploads)[1] == 4001
    # a spreadsheet's trailing commas name columns of no name, twice: nothing reads them
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("audio,avatar,,\nnarration.wav,face.png,,\n")
    assert store.uploaded_manifest("alice", campaign, str(trailing), uploads)[1] == 1
    header_only = tmp_path / "header.csv"
    header_only.write_text("audio,avatar")  # was "a manifest has 64 columns at most"
    with pytest.raises(UploadError, match="has no rows under its header"):
        store.uploaded_manifest("alice", campaign, str(header_only), uploads)
    for header, said in (("output", "the studio names the videos itself"), ("outptu", "did you mean 'output'?")):
        odd = tmp_path / f"{header}.csv"
        odd.write_text(f"audio,avatar,{header}\nnarration.wav,face.png,x.mp4\n")
        with pytest.raises(UploadError, match=said):
            store.uploaded_manifest("alice", campaign, str(odd), uploads)


def test_an_uploaded_manifest_may_name_only_the_users_own_files(tmp_path):
    store = StudioStore(str(tmp_path / "store"))
    campaign = store.new_id()
    folder = store.inputs("alice", campaign)
    uploads = {
        "audio": [f"{folder}/audio/{n}" for n in ("narration.wav", "My-narration.wav", "a.wav", "b.wav", "c.wav")],
        "avatar": [f"{folder}/avatar/{n}" for n in ("face.png", "v.png")],
    }
    good = tmp_path / "good.csv"
    good.write_text("audio,avatar\nnarration.wav,face.png\n")
    uri, rows = store.uploaded_manifest("alice", campaign, str(good), uploads)
    table = pq.read_table(uri).to_pylist()
    assert rows == 1 and table[0]["audio"] == os.path.join(store.inputs("alice", campaign), "audio", "narration.wav")
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("id,audio,avatar\n007,My narration.wav,face.png\n")  # 007, not 7
    uri, _ = store.uploaded_manifest("alice", campaign, str(numbered), uploads)
    (row,) = pq.read_table(uri).to_pylist()
    assert row["id"] == "007" and row["audio"].endswith("/audio/My-narration.wav")  # as the upload was stored
    for value in (str(tmp_path / "store" / "bob" / "x.wav"), "/etc/passwd", "../../bob/x.wav", "s3://elsewhere/x.wav"):
        bad = tmp_path / "bad.parquet"
        pq.write_table(pa.table({"audio": [value], "avatar": ["face.png"]}), bad)
        with pytest.raises(UploadError, match="is not among your (narration )?uploads"):
            store.uploaded_manifest("alice", campaign, str(bad), uploads)
    # numbered ids and columns left empty (pandas writes them as null) are fine in Parquet too
    plain = tmp_path / "plain.parquet"
    pq.write_table(
        pa.table({"id": [1], "audio": ["a.wav"], "avatar": ["face.png"], "box": pa.array([None], pa.null())}), plain
    )
    uri, _ = store.uploaded_manifest("alice", campaign, str(plain), uploads)
    assert pq.read_table(uri).to_pylist()[0]["id"] == "1"
    # what the campaign would refuse is refused now, not in a job that fails later
    twice = tmp_path / "twice.csv"
    twice.write_text("id,audio,avatar\nsame,a.wav,face.png\nsame,b.wav,face.png\nother,c.wav,face.png\n")
    with pytest.raises(UploadError, match=r"is invalid:\n  manifest row 0: id 'same' is also that of row\(s\) 1"):
        store.uploaded_manifest("alice", campaign, str(twice), uploads)
    # a few KiB of Parquet that decodes to hundreds of MiB is refused from its footer, unread
    bomb = tmp_path / "bomb.parquet"
    many = pa.array(["narration-with-a-long-name.wav" * 40] * 90_000).dictionary_encode()
    pq.write_table(pa.table({"audio": many, "avatar": many}), bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UploadError, match="MiB or more once read"):
        store.uploaded_manifest("alice", campaign, str(bomb), uploads)
    big = pa.array([b"x" * 2**18] * 400, pa.binary())  # bytes: a kind whose decoded size is not counted
    pq.write_table(pa.table({"audio": ["a.wav"] * 400, "avatar": ["v.png"] * 400, "id": big}), bomb)
    with pytest.raises(UploadError, match="column id must hold text, not binary"):
        store.uploaded_manifest("alice", campaign, str(bomb), uploads)
    # a column given twice is refused with why, not a crash (CSV and Parquet)
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("audio,audio,avatar\na.wav,b.wav,face.png\n")
    with pytest.raises(UploadError, match="the column\\(s\\) audio appear more than once"):
        store.uploaded_manifest("alice", campaign, str(doubled), uploads)
    pq.write_table(
        pa.Table.from_arrays(
            [pa.array(["a.wav"]), pa.array(["b.wav"]), pa.array(["v.png"])], ["audio", "audio", "avatar"]
        ),
        bomb,
    )
    with pytest.raises(UploadError, match="the column\\(s\\) audio appear more than once"):
        store.uploaded_manifest("alice", campaign, str(bomb), uploads)
    with pytest.raises(UploadError, match="1,000 presenter\\(s\\) x 101 narration\\(s\\) is 101,000 videos"):
        store.pairs_manifest("alice", campaign, ["a.wav"] * 101, ["v.png"] * 1000)


# ------------------------------------------------------------------------------ the running studio
@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """A real Ray head with its job server, started as the studio starts its own
    (`studio.cluster.head_command`), on ports of its own so it runs beside the tests' in-process
    Ray; stopped with the module. It has the S3 endpoint's credentials in its environment, as a
    node with an instance profile would."""
    from heygem_ray.studio.cluster import head_command

    ray = Path(sys.executable).with_name("ray")
    dashboard = _free_port()
    # short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes (pytest's own temp
    # folders grow deeper under xdist)
    temp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    ports = {
        "--port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    head = subprocess.Popen(
        [
            *head_command(str(ray), dashboard),
            "--block",
            f"--temp-dir={temp}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for(lambda: _answers(address) or head.poll() is not None, 90, "the Ray head's job server")
        assert head.poll() is None, head.stderr.read()[-2000:] if head.stderr else ""
        yield address
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _answers(address: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).list_jobs()
    except Exception:  # noqa: BLE001
        return False
    return True


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Studio:
    """`heygem-ray studio` as an operator starts it, in a process of its own."""

    def __init__(self, tmp_path: Path, ray_address: str, users: Path, store: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "studio.log"
        # a file, not a pipe: a pipe nobody reads fills and the studio then blocks on its next write
        self.output = tmp_path / "studio.out"
        self.args = [
            sys.executable,
            "-m",
            "heygem_ray.cli",
            "studio",
            f"studio.port={self.port}",
            f"studio.store={store or tmp_path / 'store'}",
            f"studio.ray_address={ray_address}",
            f"studio.auth={users}",
            f"studio.session_key={tmp_path / 'session.key'}",
            f"studio.log_file={self.log}",
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> Studio:
        # PYTHONFAULTHANDLER: a studio that will not stop is aborted, and says where each thread was
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONFAULTHANDLER": "1",
        }
        with open(self.output, "ab") as output:
            self.process = subprocess.Popen(self.args, env=env, stdout=output, stderr=subprocess.STDOUT)
        _wait_for(lambda: self._up() or self.process.poll() is not None, 90, "the studio")
        assert self.process.poll() is None, self.output.read_text()
        return self

    def _up(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(30)
            raise AssertionError(f"the studio did not stop when asked:\n{self.output.read_text()[-20_000:]}") from None

    def session(self, name: str, password: str):
        """An HTTP client logged in as `name`, and a Gradio client that sends its cookie."""
        import httpx
        from gradio_client import Client

        http = httpx.Client(base_url=self.url, follow_redirects=False, timeout=60)
        answer = http.post("/login", data={"name": name, "password": password})
        assert answer.status_code == 303, answer.text
        cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        client = Client(self.url + "/app/", headers={"Cookie": cookie}, verbose=False, download_files=False)
        return http, client


def _file(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": os.path.basename(path)}


def _raw_event(studio, http, api_name: str, data: list) -> dict:
    """One page event sent as a browser would, with `data` as given (gradio_client uploads any
    local path it is handed first); its last message."""
    import uuid

    config = http.get("/app/config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    session = uuid.uuid4().hex
    joined = http.post("/app/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session})
    assert joined.status_code == 200, joined.text
    with http.stream("GET", "/app/gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message
    raise AssertionError(f"{api_name}: no answer")


@pytest.mark.integration
def test_studio_campaign_from_upload_to_zip_and_users_kept_apart(tmp_path, media_dir, ray_head):
    """Two users; alice uploads two presenters and one narration, submits, follows the campaign to
    the end across a restart of the studio, and downloads both videos as one zip; bob sees none of
    it through the pages, the API or alice's file URLs; a wrong password is refused."""
    import httpx
    from gradio_client import handle_file

    users = tmp_path / "users.toml"
    add_user(users, "alice", "alice-pw")
    add_user(users, "bob", "bob-pw")
    studio = Studio(tmp_path, ray_head, users).start()
    try:
        anonymous = httpx.Client(base_url=studio.url, follow_redirects=False)
        assert anonymous.get("/app/").status_code in (303, 307)  # to the login page
        assert anonymous.post("/login", data={"name": "alice", "password": "nope"}).status_code == 401
        alice_http, alice = studio.session("alice", "alice-pw")

        checked = alice.predict([handle_file(str(media_dir / "speech3.wav"))], [], None, api_name="/check")
        assert "0 video(s)" in checked
        text, chosen = alice.predict(
            "hr onboarding",
            [handle_file(str(media_dir / "speech3.wav"))],
            [handle_file(str(media_dir / "still.png")), handle_file(str(media_dir / "clip2.mp4"))],
            None,
            "classic (no weights)",
            "draft (small, fast)",
            api_name="/create",
        )
        assert "submitted: 2 video(s)" in text, text
        campaign = chosen["value"]
    finally:
        studio.stop()  # a restart mid-campaign: the job goes on, the new studio finds it

    studio.start()
    try:
        alice_http, alice = studio.session("alice", "alice-pw")

        def finished():
            listing, _, status, rows, gallery, _log = alice.predict(campaign, api_name="/refresh")
            return (status, rows, gallery, listing) if 'data-status="finished"' in status else None

        status, rows, gallery, listing = _wait_for(finished, 240, "the campaign to finish")
        assert 'data-percent="100"' in status and "2/2 rows (0 failed)" in status
        assert [r[1] for r in rows["data"]] == ["ok", "ok"]
        assert gallery.count("<video") == 2 and f"/files/{campaign}/thumb/" in gallery
        assert [row[0] for row in listing["data"]] == [campaign]

        archive = alice_http.get(f"/files/{campaign}/all.zip")
        assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
        assert archive.headers["content-length"] == str(len(archive.content))  # a browser shows progress
        names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
        assert sorted(names) == ["speech3__clip2.mp4", "speech3__still.mp4"]
        whole = alice_http.get(f"/files/{campaign}/video/speech3__still.mp4")
        assert whole.content[4:8] == b"ftyp" and whole.headers["accept-ranges"] == "bytes"
        part = alice_http.get(f"/files/{campaign}/video/speech3__still.mp4", headers={"Range": "bytes=4-7"})
        assert part.status_code == 206 and part.content == b"ftyp"
        assert part.headers["content-range"] == f"bytes 4-7/{len(whole.content)}"
        # a user's files are for no shared cache (a CDN before the studio would serve them to anyone)
        for answer in (whole, part, archive):
            assert answer.headers["cache-control"] == "private, no-store"
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'self'" in alice_http.get("/app/").headers["content-security-policy"]
        # Gradio's monitoring (every user's event counts and timings) is off
        assert alice_http.get("/app/monitoring/summary").status_code in (403, 404)
        # another site's page, with alice's cookie, may neither read nor act
        foreign = alice_http.get(f"/files/{campaign}/all.zip", headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403

        bob_http, bob = studio.session("bob", "bob-pw")
        listing, _, status, rows, gallery, log = bob.predict(campaign, api_name="/refresh")
        assert listing["data"] == [] and status == "" and rows["data"] in ([], [["", "", "", ""]]) and log == ""
        for path in (
            f"/files/{campaign}/all.zip",
            f"/files/{campaign}/video/speech3__still.mp4",
            f"/files/{campaign}/thumb/speech3__still.jpg",
        ):
            assert bob_http.get(path).status_code == 404, path
            assert anonymous.get(path).status_code == 404, path
        for action in ("/do_cancel", "/do_delete", "/do_rerun"):  # not his: none, as for him
            assert bob.predict(campaign, api_name=action) == "There is no such campaign (deleted on another page?)."
        # nor by naming the server paths of alice's files as his "uploads" (Gradio took any path in a
        # mounted app: bob could render alice's narration, probe her files, and have them removed)
        hers = tmp_path / "store" / "alice" / campaign / "inputs" / "audio" / "speech3.wav"
        face = str(media_dir / "still.png")
        made = _raw_event(
            studio,
            bob_http,
            "create",
            ["x", [_file(hers)], [_file(face)], None, "classic (no weights)", "draft (small, fast)"],
        )
        assert made["msg"] == "process_completed" and not made["success"], made
        assert _raw_event(studio, bob_http, "check", [[_file(hers)], None, None])["success"] is False
        assert hers.exists() and not (tmp_path / "store" / "bob").exists()

        lines = studio.log.read_text()
        assert f"submit user=alice campaign={campaign} rows=2" in lines and "login refused user='alice'" in lines
        record = json.loads((tmp_path / "store" / "alice" / campaign / "campaign.json").read_text())
        assert record["jobs"] and record["quality"] == "draft (small, fast)"
        # the job's videos stop at alice's quota (100 GiB) less what she stored before it
        from ray.job_submission import JobSubmissionClient

        entrypoint = JobSubmissionClient(ray_head).get_job_info(record["jobs"][-1]).entrypoint
        assert "limits.max_output_gb=99.99" in entrypoint, entrypoint
        assert "limits.max_cache_gb=20" in entrypoint, entrypoint  # what it may decode into her cache

        # alice deletes it: uploads, videos and record gone, and the pages say so
        assert "Deleted" in alice.predict(campaign, api_name="/do_delete")
        assert not (tmp_path / "store" / "alice" / campaign).exists()
        assert alice.predict(campaign, api_name="/refresh")[0]["data"] in ([], [["", "", "", "", "", ""]])
        assert alice_http.get(f"/files/{campaign}/all.zip").status_code == 404
        assert f"delete user=alice campaign={campaign}" in studio.log.read_text()
    finally:
        studio.stop()
    shutil.rmtree(tmp_path / "store", ignore_errors=True)


@pytest.mark.integration
@pytest.mark.skipif(NO_BROWSER is not None, reason=str(NO_BROWSER))
def test_studio_campaign_in_a_real_browser(tmp_path, media_dir, ray_head):
    """Alice in headless Chromium: signs in through the login form, drops two presenters and three
    narrations on the file inputs (a 2 x 3 batch), picks draft quality, renders, and watches the
    Campaigns tab (which refreshes itself) until the campaign is finished, its six videos in the
    gallery with posters that load; reloads the page, which opens the campaign again; then
    downloads the zip of all six through its link, and deletes the campaign (after saying no once
    to the browser's question). Signed out from elsewhere, the
    page goes to the sign-in form."""
    narrations = []
    for name in ("welcome", "benefits", "security"):
        narrations.append(tmp_path / f"{name}.wav")
        shutil.copy(media_dir / "speech3.wav", narrations[-1])
    users = tmp_path / "users.toml"
    add_user(users, "alice", "alice-pw")
    with playwright_page(tmp_path / "downloads") as page:
        from playwright.sync_api import expect

        studio = Studio(tmp_path, ray_head, users).start()
        try:
            page.goto(studio.url + "/app/")
            expect(page).to_have_url(studio.url + "/login")  # no session yet
            page.locator("input[name=name]").fill("alice")
            page.locator("input[name=password]").fill("alice-pw")
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(studio.url + "/app/")
            expect(page.get_by_text("signed in as")).to_contain_text("alice", timeout=30_000)

            def file_input(label: str):
                block = page.locator("div.block").filter(has=page.get_by_test_id("block-label").filter(has_text=label))
                return block.locator("input[type=file]")

            page.get_by_label("Campaign name").fill("browser run")
            file_input("Narrations (audio)").set_input_files(narrations)
            file_input("Presenters (videos or photos)").set_input_files(
                [media_dir / "still.png", media_dir / "clip2.mp4"]
            )
            checked = page.locator("#upload-check")
            expect(checked).to_contain_text("2 presenter(s) × 3 narration(s) = 6 video(s)", timeout=60_000)
            expect(checked).to_contain_text("uploads wait 15 minutes for Render")  # how long they are kept
            expect(checked).not_to_contain_text("❌")
            page.get_by_role("radio", name="draft (small, fast)").check()
            page.locator("#submit").click()
            expect(page.locator("#submitted")).to_contain_text("submitted: 6 video(s)", timeout=60_000)
            # the file boxes are emptied: their uploads left the web server for the campaign
            expect(checked).to_contain_text("0 presenter(s) × 0 narration(s)", timeout=30_000)
            (record,) = (tmp_path / "store" / "alice").glob("*/campaign.json")
            campaign = record.parent.name
            assert json.loads(record.read_text())["quality"] == "draft (small, fast)"

            page.get_by_role("tab", name="Campaigns").click()
            expect(page.locator("#chosen input")).to_have_value(f"browser run ({campaign})")
            status = page.locator("#campaign-status [data-status]")
            expect(status).to_have_attribute("data-status", "finished", timeout=240_000)  # the timer's refreshes
            expect(status).to_have_attribute("data-percent", "100")
            expect(status).to_contain_text("6/6 rows (0 failed)")

            videos = page.locator("#gallery video")
            expect(videos).to_have_count(6)
            # each player and link named by its row for screen readers, not six alike
            labels = {videos.nth(i).get_attribute("aria-label") for i in range(6)}
            assert len(labels) == 6 and all(label and label.startswith("video ") for label in labels), labels
            first = min(label or "" for label in labels).removeprefix("video ")
            expect(page.get_by_role("link", name=f"download {first}", exact=True)).to_have_count(1)
            posters = [videos.nth(i).get_attribute("poster") or "" for i in range(6)]
            assert all(f"/files/{campaign}/thumb/" in poster for poster in posters), posters
            for poster in posters:  # each thumbnail is a JPEG the browser decodes, sent with alice's cookie
                width = page.evaluate(
                    """src => new Promise(done => { const img = new Image();
                        img.onload = () => done(img.naturalWidth); img.onerror = () => done(0); img.src = src; })""",
                    poster,
                )
                assert width > 0, poster

            # the open campaign is in the page's address: a refresh (or the link) opens it again
            expect(page).to_have_url(f"{studio.url}/app/?campaign={campaign}")
            page.reload()
            expect(page.locator("#chosen input")).to_have_value(f"browser run ({campaign})", timeout=30_000)
            expect(status).to_have_attribute("data-status", "finished", timeout=30_000)
            expect(videos).to_have_count(6)

            with page.expect_download(timeout=60_000) as download:
                page.locator("#download-all").click()
            assert download.value.suggested_filename == f"{campaign}.zip"
            with zipfile.ZipFile(download.value.path()) as archive:
                names = archive.namelist()
            assert sorted(names) == sorted(
                f"{n}__{a}.mp4" for n in ("welcome", "benefits", "security") for a in ("clip2", "still")
            )

            # Delete asks first: "no" keeps it, "yes" deletes it
            page.once("dialog", lambda dialog: dialog.dismiss())
            page.locator("#delete").click()
            page.wait_for_timeout(1000)
            assert record.exists()
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator("#delete").click()
            # behind the page's 3-second refreshes in Gradio's queue: on a loaded machine a delete
            # answered in over 30 s once (the fresh-clone run of 2026-12-03)
            expect(page.get_by_text("Deleted, with its uploads and videos.")).to_be_visible(timeout=60_000)
            assert not record.parent.exists()

            # signed out elsewhere (another tab, a copy of the cookie): the open page's next refresh
            # takes it to the sign-in form, saying why, instead of an error every 3 s
            import httpx

            cookies = {c["name"]: c["value"] for c in page.context.cookies()}
            assert httpx.get(studio.url + "/logout", cookies=cookies).status_code == 303
            expect(page).to_have_url(studio.url + "/login?ended=1", timeout=30_000)
            expect(page.get_by_text("Your session ended: please sign in again.")).to_be_visible()
        finally:
            studio.stop()
    shutil.rmtree(tmp_path / "store", ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow  # ~1 minute on 2 AVX2 cores: two jobs of six 20 s rows; run with -m slow
def test_studio_on_s3_cancel_and_rerun_the_failed_rows(tmp_path, media_dir, ray_head, s3_endpoint):
    """The store on S3 (moto's server, through s3fs): a campaign of several rows is cancelled while
    it renders (the rows that did not finish are reported, the job is stopped), then re-run: the
    finished rows are kept, the rest render, and every video is on S3; deleted (not while it runs),
    nothing of it is left there."""
    import boto3
    from gradio_client import handle_file

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="heygem-studio")
    users = tmp_path / "users.toml"
    add_user(users, "alice", "alice-pw")
    studio = Studio(tmp_path, ray_head, users, store="s3://heygem-studio/studio").start()
    try:
        _, alice = studio.session("alice", "alice-pw")
        from heygem_ray import demo

        narrations = []  # long enough that the campaign is still rendering when it is cancelled
        for i in range(3):
            path = tmp_path / f"narration{i}.wav"
            demo.write_wav(str(path), demo.speech_like(20.0, seed=20 + i))
            narrations.append(handle_file(str(path)))
        text, chosen = alice.predict(
            "to cancel",
            narrations,
            [handle_file(str(media_dir / "clip6.mp4")), handle_file(str(media_dir / "still.png"))],
            None,
            "classic (no weights)",
            "draft (small, fast)",
            api_name="/create",
        )
        assert "submitted: 6 video(s)" in text, text
        campaign = chosen["value"]

        def some_done():
            status = alice.predict(campaign, api_name="/refresh")[2]
            return status if 'data-status="running"' in status and "0/6 rows" not in status else None

        _wait_for(some_done, 240, "the first rows")
        assert "Stopping" in alice.predict(campaign, api_name="/do_cancel")

        def cancelled():
            view = alice.predict(campaign, api_name="/refresh")
            return view if 'data-status="cancelled"' in view[2] else None

        _, _, status, rows, _, _ = _wait_for(cancelled, 120, "the cancel")
        statuses = [r[1] for r in rows["data"]]
        assert "ok" in statuses and "failed" in statuses, statuses
        assert "It is still running" not in alice.predict(campaign, api_name="/do_rerun")
        assert "Not deleted" in alice.predict(campaign, api_name="/do_delete")  # its job would go on writing

        def finished():
            view = alice.predict(campaign, api_name="/refresh")
            return view if 'data-status="finished"' in view[2] else None

        _, _, status, rows, _, _ = _wait_for(finished, 300, "the re-run")
        assert "6/6 rows (0 failed)" in status, status
        # every row done: another re-run would start a job (and take an active slot) to skip them all
        assert "nothing to re-run" in alice.predict(campaign, api_name="/do_rerun")
        kept = [r[0] for r in rows["data"] if r[1] == "skipped"]
        # kept: what the cancelled run finished (a row published as the stop came may be among them)
        assert kept and len(kept) >= statuses.count("ok"), rows
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        listed = s3.list_objects_v2(Bucket="heygem-studio", Prefix=f"studio/alice/{campaign}/output/")
        videos = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".mp4")]
        assert len(videos) == 6, videos
        log = studio.log.read_text()
        assert f"cancel user=alice campaign={campaign}" in log and f"finish user=alice campaign={campaign}" in log
        assert "Deleted" in alice.predict(campaign, api_name="/do_delete")
        assert "Contents" not in s3.list_objects_v2(Bucket="heygem-studio", Prefix=f"studio/alice/{campaign}/")
    finally:
        studio.stop()


@pytest.mark.integration
def test_an_upload_still_arriving_does_not_hold_the_studios_stop(tmp_path, ray_head):
    """An operator stops the studio (systemd, a pod's end) while a user's upload is still arriving
    over a slow line: the server waited for the request to finish, however long, and the
    supervisor killed it at its own deadline. It stops, with status 0, within its grace period
    (and the margin of `Studio.stop`)."""
    import socket

    users = tmp_path / "users.toml"
    add_user(users, "alice", "alice-pw")
    studio = Studio(tmp_path, ray_head, users).start()
    with socket.create_connection(("127.0.0.1", studio.port)) as upload:
        head = "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        upload.sendall(f"{head}Content-Length: 100000\r\n\r\nname=alice&password=".encode())
        time.sleep(1)  # the server is reading the body
        assert studio.process is not None and studio.process.poll() is None, studio.output.read_text()
        studio.stop()  # fails unless it stops within STOP_SECONDS (the upload would hold it for ever)
    assert studio.process.returncode == 0, studio.output.read_text()[-4000:]


def test_the_studios_own_head_gives_the_actors_every_core():
    """The head the studio starts on its machine has the logical CPUs the CLI's own local Ray has:
    a campaign there gets an actor per core (cluster.actors=0), not one beside an idle core."""
    from heygem_ray.studio.cluster import head_command

    cores = len(os.sched_getaffinity(0))
    assert f"--num-cpus={cores + 1}" in head_command("ray", 8265)


@pytest.mark.integration
def test_a_running_local_head_is_found_not_started_again(ray_head):
    """With no studio.ray_address the studio uses the local head already running (here, the one on
    the fixture's port), so a restarted studio finds the campaigns' cluster again."""
    from heygem_ray.studio.cluster import Cluster, local_head

    port = int(ray_head.rsplit(":", 1)[1])
    assert local_head(port) == (ray_head, False)
    assert Cluster(ray_head, local=True).problem() is None
    gone = Cluster(f"http://127.0.0.1:{_free_port()}", local=True)
    # in a few words a page can show, not requests' repr of its pool, retries and socket
    problem = gone.problem() or ""
    assert "does not answer (" in problem and "HTTPConnectionPool" not in problem, problem
    assert "Failed to connect" not in problem and "Max retries" not in problem, problem


def test_a_jobs_log_is_shown_without_the_terminals_colour_codes():
    """Ray colours its lines ("View the dashboard at \\x1b[1m\\x1b[32mhttp://…"): a page showed the
    codes as "�[1m"."""
    from heygem_ray.studio.cluster import _ANSI

    assert _ANSI.sub("", "View the dashboard at \x1b[1m\x1b[32mhttp://h:8265 \x1b[39m\x1b[22m") == (
        "View the dashboard at http://h:8265 "
    )


def test_a_rows_error_names_its_files_without_the_stores_folders():
    """A row's error named the store's whole path ("avatar s3://bucket/store/alice/<id>/inputs/avatar/
    noface.mp4: …"): the bucket and folders, kept off the pages, showed in the rows table."""
    from heygem_ray.studio.service import _without_folders

    for root in ("s3://acme-videos/store/alice/c1", "/srv/store/alice/c1"):
        error = f"avatar {root}/inputs/avatar/noface.mp4: no face found in any of 25 frames"
        assert _without_folders(error, root) == "avatar inputs/avatar/noface.mp4: no face found in any of 25 frames"


@pytest.mark.integration
def test_a_job_the_cluster_does_not_know_is_asked_about_once(ray_head):
    """A restarted head knows none of the old campaigns' jobs, and each admission (and listing)
    asked it about every one of them again: hundreds of requests for a user with many campaigns.
    Its answer is kept, as an ended job's is (submission ids are never used again)."""
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable, JobUnknown

    cluster = Cluster(ray_head, local=True)
    with pytest.raises(JobUnknown, match="does not know job heygem-alice-forgotten-1"):
        cluster.job("heygem-alice-forgotten-1")
    gone = Cluster(f"http://127.0.0.1:{_free_port()}", local=True)
    cluster.address, cluster._jobs = gone.address, None  # the head goes away: what it said is kept
    with pytest.raises(JobUnknown, match="does not know job heygem-alice-forgotten-1"):
        cluster.job("heygem-alice-forgotten-1")
    with pytest.raises(ClusterUnavailable):  # a job not asked about before is asked
        cluster.job("heygem-alice-other-1")


def test_a_file_two_users_uploaded_leaves_the_upload_folder_when_both_are_done():
    """Gradio names an upload by its content, so two users who upload the same presenter video share
    one file there: the first user's campaign must not delete it from under the second."""
    from heygem_ray.studio.app import UploadClaims

    claims = UploadClaims(window=900.0)
    claims.claim("alice", ["/up/abc/talk.mp4"])
    claims.claim("bob", ["/up/abc/talk.mp4", "/up/def/voice.wav"])
    assert not claims.release("alice", "/up/abc/talk.mp4")  # bob still needs it
    assert claims.release("bob", "/up/abc/talk.mp4") and claims.release("bob", "/up/def/voice.wav")
    expired = UploadClaims(window=0.0)  # a claim older than the window: Gradio has deleted the file
    expired.claim("bob", ["/up/abc/talk.mp4"])
    assert expired.release("alice", "/up/abc/talk.mp4")


def test_cancel_with_the_cluster_down_says_so_instead_of_nothing_to_cancel(tmp_path, media_dir):
    """A campaign's job may well be running while the studio cannot reach its cluster: Cancel must
    not answer "Nothing to cancel"."""
    import logging
    from dataclasses import replace

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    cfg = StudioConfig(store=str(tmp_path / "store"))
    studio = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    with pytest.raises(ClusterUnavailable):
        studio.create("alice", "talk", [str(media_dir / "speech3.wav")], [str(media_dir / "still.png")])
    (record,) = studio.store.campaigns("alice")
    studio.store.save(replace(record, jobs=["heygem-job-1"]))  # submitted before the cluster went away
    with pytest.raises(ClusterUnavailable):
        studio.cancel("alice", record.id)


class JobServerAnswering:
    """An HTTP server on loopback answering as a Ray job server behind a failing proxy would: the
    version check passes, each job's state is `jobs[id]` (an HTTP status and a body; a job not in
    it does not exist), a submit is answered `submit` after `submit_delay` seconds; everything is
    recorded in `requests`."""

    def __init__(self, jobs: dict[str, tuple[int, str]], submit: tuple[int, str] = (503, "Service Unavailable")):
        import http.server
        import threading

        self.jobs, self.submit, self.submit_delay, self.requests = jobs, submit, 0.0, []
        self.stop: tuple[int, str] = (503, "Service Unavailable")  # every other POST's answer: a stop's
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def answer(self, status: int, body: str) -> None:
                with contextlib.suppress(OSError):  # a client that gave up waiting has gone
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body.encode())

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                if self.path == "/api/version":
                    self.answer(200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}))
                else:
                    job = self.path.rsplit("/", 1)[-1]
                    self.answer(*server.jobs.get(job, (404, f"Job {job} does not exist")))

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append(("POST", self.path))
                time.sleep(server.submit_delay if self.path == "/api/jobs/" else 0)
                self.answer(*(server.submit if self.path == "/api/jobs/" else server.stop))

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://user:s3cret-token@127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_a_job_server_error_is_not_taken_for_a_forgotten_job(tmp_path, media_dir):
    """A head (or a proxy before it) answering 503 says nothing of the job: the campaign may still
    be running. Taken for "the cluster forgot it", its campaign could be deleted under its running
    job (which went on writing into a folder no page lists) and Cancel said "Nothing to cancel".
    Only the job server's own "Job ... does not exist" means that; and the cluster's address,
    credentials included, is shown without them."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable, JobUnknown
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.store import CampaignRecord

    server = JobServerAnswering(
        {
            "heygem-alice-busy-1": (503, "Service Unavailable"),
            "heygem-alice-gone-1": (404, "Job heygem-alice-gone-1 does not exist"),
        }
    )
    try:
        cluster = Cluster(server.address, local=True)
        studio = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster, logging.getLogger("t"))
        busy, gone = (
            CampaignRecord(studio.store.new_id(), "alice", name, time.time(), 1, "m", "standard", "m", "o", jobs=[job])
            for name, job in (("busy", "heygem-alice-busy-1"), ("gone", "heygem-alice-gone-1"))
        )
        for record in (busy, gone):
            studio.store.save(record)
        view = studio.campaign("alice", busy.id)
        assert view is not None and view.note and "answered with an error" in view.note
        assert "s3cret-token" not in view.note and "127.0.0.1" in view.note
        with pytest.raises(ClusterUnavailable):
            studio.delete("alice", busy.id)
        with pytest.raises(ClusterUnavailable):
            studio.cancel("alice", busy.id)
        assert studio.store.load("alice", busy.id) is not None
        with pytest.raises(JobUnknown):
            cluster.job("heygem-alice-gone-1")
        assert studio.delete("alice", gone.id)  # a job the cluster does not know runs nowhere
        assert "s3cret-token" not in (cluster.problem() or "") + cluster.shown
    finally:
        server.close()


def test_a_job_that_ended_without_its_drivers_last_feed_shows_nothing_under_way(tmp_path):
    """The driver killed (out of memory, its node lost, a stop's SIGKILL before its last write): the
    job ended, its feed still says running. The page shows no time left and its unfinished rows
    as not finished, not "rendering" for ever (those its results parts have as done: done)."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.service import NOT_FINISHED
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.store import CampaignRecord

    started = time.time() - 60
    details = {"type": "SUBMISSION", "submission_id": "heygem-alice-k-1", "status": "FAILED", "entrypoint": "x"}
    details["start_time"] = int(started * 1000)
    server = JobServerAnswering({"heygem-alice-k-1": (200, json.dumps(details))})
    try:
        studio = StudioService(
            StudioConfig(store=str(tmp_path / "store")), Cluster(server.address, local=True), logging.getLogger("t")
        )
        campaign = studio.store.new_id()
        output = studio.store.output("alice", campaign)
        record = CampaignRecord(
            campaign, "alice", "k", started, 3, "m", "standard", "m", output, jobs=["heygem-alice-k-1"]
        )
        studio.store.save(record)
        os.makedirs(output, exist_ok=True)
        feed = {
            "state": "running",
            "started_at": started + 1,
            "rows": {"total": 3, "ok": 1, "rendering": 1, "queued": 1},
            "eta_seconds": 42,
            "row_status": {"a": "ok", "b": "rendering", "c": "queued"},
        }
        with open(os.path.join(output, "_progress.json"), "w") as fh:
            json.dump(feed, fh)
        # b finished after the last feed: its result is in the run's parts
        from heygem_ray.results import ResultsTable, RowResult

        layout = CampaignLayout(output)
        parts = ResultsTable(layout.results, layout.results_parts, flush_rows=1)
        parts.add(RowResult("b", "ok", f"{output}/b.mp4", None, 1.0, 25, 1, 1.0, 1, time.time()))
        view = studio.campaign("alice", campaign)
        assert view is not None and view.status == "failed" and view.eta_seconds is None
        assert [(r["id"], r["status"]) for r in view.rows] == [("a", "ok"), ("b", "ok"), ("c", "not finished")]
        assert view.rows[2]["error"] == NOT_FINISHED
    finally:
        server.close()


@pytest.mark.parametrize("rerun", ["PENDING", "STOPPED", "FAILED"])
def test_a_rerun_not_yet_started_leaves_the_runs_before_rows_and_videos_shown(tmp_path, rerun, caplog):
    """ "Re-run failed rows" on a campaign with a finished video: while the re-run was queued, or
    once it was cancelled or failed before its driver wrote anything, the page showed 0 rows done,
    no rows, no videos and no zip of them, as if the campaign had lost its work."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.results import ResultsTable, RowResult
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.store import CampaignRecord

    first = time.time() - 3600

    def job(name: str, status: str, started: float) -> tuple[int, str]:
        details = {"type": "SUBMISSION", "submission_id": name, "status": status, "entrypoint": "x"}
        return 200, json.dumps({**details, "start_time": int(started * 1000)})

    jobs = {"heygem-alice-k-1": job("heygem-alice-k-1", "FAILED", first)}
    jobs["heygem-alice-k-2"] = job("heygem-alice-k-2", rerun, time.time() - 5)
    server = JobServerAnswering(jobs)
    try:
        studio = StudioService(
            StudioConfig(store=str(tmp_path / "store")), Cluster(server.address, local=True), logging.getLogger("t")
        )
        campaign = studio.store.new_id()
        output = studio.store.output("alice", campaign)
        record = CampaignRecord(campaign, "alice", "k", first, 2, "m", "standard", "m", output, jobs=list(jobs))
        studio.store.save(record)
        os.makedirs(output, exist_ok=True)
        feed = {
            "state": "finished",
            "started_at": first + 1,
            "rows": {"total": 2, "ok": 1, "failed": 1},
            "row_status": {"a": "ok", "b": "failed"},
        }
        with open(os.path.join(output, "_progress.json"), "w") as fh:
            json.dump(feed, fh)
        layout = CampaignLayout(output)
        table = ResultsTable(layout.results, layout.results_parts)
        table.add(RowResult("a", "ok", f"{output}/a.mp4", None, 1.0, 25, 1, 1.0, 1, time.time()))
        table.add(RowResult("b", "failed", f"{output}/b.mp4", "no face found", 1.0, 25, 1, 1.0, 1, time.time()))
        table.finish(["a", "b"])
        with caplog.at_level(logging.INFO, logger="t"):
            view = studio.campaign("alice", campaign)
        assert view is not None
        assert view.status == {"PENDING": "queued", "STOPPED": "cancelled", "FAILED": "failed"}[rerun]
        assert (view.rows_done, view.rows_failed) == (2, 1) and view.eta_seconds is None
        assert [(r["id"], r["status"]) for r in view.rows] == [("a", "ok"), ("b", "failed")]
        if rerun != "PENDING":  # its end is logged as its own: no rows of its
            assert "rows=0 failed=0 job=heygem-alice-k-2 (before its driver started)" in caplog.text
        # the run before was killed mid-run (its feed still says running): its unfinished rows say so
        with open(os.path.join(output, "_progress.json"), "w") as fh:
            json.dump({**feed, "state": "running", "row_status": {"a": "ok", "b": "rendering"}}, fh)
        view = studio.campaign("alice", campaign)
        assert view is not None and [(r["id"], r["status"]) for r in view.rows] == [("a", "ok"), ("b", "not finished")]
    finally:
        server.close()


def test_a_users_cache_past_its_limit_goes_while_none_of_their_campaigns_runs(tmp_path, caplog):
    """Each user's cache of decoded narrations and face tracks is outside their quota and grew with
    every campaign they ever ran, never trimmed: the store's disk filled. Past `user_cache_gb` it
    is removed, but not while a campaign of theirs is queued or running (it would lose entries
    mid-write), nor while the cluster cannot say."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.store import CampaignRecord

    def job(status: str) -> tuple[int, str]:
        return 200, json.dumps({"type": "SUBMISSION", "status": status, "entrypoint": "python x"})

    with pytest.raises(ValueError, match="studio.user_cache_gb must be 0"):
        StudioConfig(user_cache_gb=-1)  # would read as "every cache is past it"
    server = JobServerAnswering(
        {"heygem-alice-1": job("RUNNING"), "heygem-bob-1": job("SUCCEEDED"), "heygem-dave-1": (503, "Unavailable")}
    )
    try:
        cfg = StudioConfig(store=str(tmp_path / "store"), user_cache_gb=1000 / 2**30)
        studio = StudioService(cfg, Cluster(server.address, local=True), logging.getLogger("t"))
        users = (("alice", 2000), ("bob", 2000), ("carol", 2000), ("dave", 2000), ("erin", 10), ("frank", 2000))
        for user, size in users:
            cache = tmp_path / "store" / user / "_cache" / "audio"
            cache.mkdir(parents=True)
            (cache / "narration.f32").write_bytes(b"\0" * size)
            if user in ("alice", "bob", "dave", "frank"):
                record = CampaignRecord(
                    studio.store.new_id(),
                    user,
                    "c",
                    time.time(),
                    1,
                    "m",
                    "standard",
                    "m",
                    "o",
                    jobs=[f"heygem-{user}-1"],
                    # its submit's answer lost, by the studio before this one's start: may yet start
                    submitted=time.time() - 60 if user == "frank" else None,
                )
                studio.store.save(record)
        with caplog.at_level(logging.INFO, logger="t"):
            assert studio.trim_caches() == ["bob", "carol"]
        left = {p.name for p in (tmp_path / "store").iterdir() if (p / "_cache").exists()}
        assert left == {"alice", "dave", "erin", "frank"}
        assert "cache user=bob removed" in caplog.text and "cache user=dave: not trimmed" in caplog.text
        server.jobs["heygem-alice-1"] = job("STOPPED")
        assert studio.trim_caches() == ["alice"]
        assert (tmp_path / "store" / "alice").exists()  # her campaigns stay
    finally:
        server.close()


def test_a_submit_whose_answer_is_lost_keeps_its_job(tmp_path, media_dir, monkeypatch):
    """A submit the job server took but answered too late (or through a failing proxy) may have
    started the job, or be about to: the campaign keeps its id, to show it, cancel it and refuse a
    delete or a second run while it may run, and the cluster's "no such job" for it is not kept as
    final while it is new. Taken back only where the job surely did not go in: the job server
    refused the submit (4xx), or no connection was made."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio import cluster as cluster_module
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable, JobUnknown
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.service import SubmitUnconfirmed

    # every answer of this server's within the read timeout but a late submit's, on a loaded machine too
    monkeypatch.setattr(cluster_module, "TIMEOUT", (2.0, 1.5))
    files = ([str(media_dir / "speech3.wav")], [str(media_dir / "still.png")])
    server = JobServerAnswering({}, submit=(400, "runtime_env is not valid"))
    try:
        cluster = Cluster(server.address, local=True)
        studio = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster, logging.getLogger("t"))
        with pytest.raises(ClusterUnavailable) as refused:  # refused: surely not in
            studio.create("alice", "not in", *files)
        assert not isinstance(refused.value, SubmitUnconfirmed) and "runtime_env is not valid" in str(refused.value)
        (record,) = studio.store.campaigns("alice")
        assert record.jobs == [] and ("POST", "/api/jobs/") in server.requests
        assert studio.campaign("alice", record.id).status == "not submitted"

        server.submit = (200, json.dumps({"submission_id": "x", "job_id": "x"}))
        server.submit_delay = 3.0  # past the read timeout, and asked after, the job server knows no such job yet
        with pytest.raises(SubmitUnconfirmed):
            studio.create("alice", "late", *files)
        late = next(r for r in studio.store.campaigns("alice") if r.name == "late")
        assert len(late.jobs) == 1 and late.jobs[0].startswith("heygem-alice-")
        asked = len(server.requests)
        for _ in range(2):  # asked again each time: it may come in yet
            with pytest.raises(JobUnknown):
                cluster.job(late.jobs[0])
        assert len(server.requests) == asked + 2
        # shown as on its way in, not "unknown" with a re-run offered: not deleted, run twice or
        # said to have nothing to cancel while it may start
        view = studio.campaign("alice", late.id)
        assert view.status == "queued" and "not confirmed it yet" in view.note
        assert studio.delete("alice", late.id) is False and studio.rerun("alice", late.id) is None
        server.stop = (404, f"Job {late.jobs[0]} does not exist")
        with pytest.raises(ClusterUnavailable, match="not confirmed it yet"):
            studio.cancel("alice", late.id)
        server.stop = (503, "Service Unavailable")
        assert len(studio.store.load("alice", late.id).jobs) == 1

        server.jobs = _AllJobs((503, "Service Unavailable"))  # asked after: no answer either
        with pytest.raises(SubmitUnconfirmed):
            studio.create("alice", "maybe in", *files)
        maybe = next(r for r in studio.store.campaigns("alice") if r.name == "maybe in")
        assert len(maybe.jobs) == 1 and maybe.jobs[0].startswith("heygem-alice-")
        for act in (studio.delete, studio.rerun):  # it may be running: not deleted, not run twice
            with pytest.raises(ClusterUnavailable):
                act("alice", maybe.id)
        assert len(studio.store.load("alice", maybe.id).jobs) == 1

        def too_large(**kwargs: Any) -> str:  # the SDK's own check, before any request: surely not in
            raise ValueError("Package size (600.00MiB) exceeds the maximum size of 500.00MiB")

        monkeypatch.setattr(cluster.client, "submit_job", too_large)
        with pytest.raises(ClusterUnavailable) as unsent:  # was a bare ValueError: "Error", kept as a job
            studio.create("alice", "too large", *files)
        assert not isinstance(unsent.value, SubmitUnconfirmed) and "exceeds the maximum size" in str(unsent.value)
        assert next(r for r in studio.store.campaigns("alice") if r.name == "too large").jobs == []

        def odd_answer(**kwargs: Any) -> str:  # its 200 answer read wrong: the job may be in
            raise TypeError("JobSubmitResponse.__init__() got an unexpected keyword argument 'new_field'")

        monkeypatch.setattr(cluster.client, "submit_job", odd_answer)
        server.jobs = {}
        with pytest.raises(SubmitUnconfirmed):  # was the bare TypeError: Gradio's "Error"
            studio.create("alice", "odd", *files)
        assert len(next(r for r in studio.store.campaigns("alice") if r.name == "odd").jobs) == 1
    finally:
        server.close()

    nobody = StudioService(  # no connection made: surely not in
        StudioConfig(store=str(tmp_path / "store")),
        Cluster(f"http://127.0.0.1:{_free_port()}", local=True),
        logging.getLogger("t"),
    )
    with pytest.raises(ClusterUnavailable) as refused:
        nobody.create("alice", "not sent", *files)
    assert not isinstance(refused.value, SubmitUnconfirmed)
    assert next(r for r in nobody.store.campaigns("alice") if r.name == "not sent").jobs == []


class _AllJobs(dict):
    """`JobServerAnswering.jobs` answering every job the same."""

    def __init__(self, answer: tuple[int, str]):
        super().__init__()
        self.answer = answer

    def get(self, key: str, default: object = None) -> tuple[int, str]:
        return self.answer


def test_a_users_file_broken_while_the_studio_runs_keeps_the_users_it_had(tmp_path, caplog):
    """An edit that breaks the users file (a typo in the TOML) must not refuse every request, sign-ins
    included: the studio keeps the users it read last and logs why. Read for the first time, it
    raises (the studio checks it at start: tests/test_studio_cli.py)."""
    import time

    from heygem_ray.studio.users import UsersFile

    path = tmp_path / "users.toml"
    add_user(path, "alice", "right")
    users = UsersFile(path)
    assert set(users.hashes()) == {"alice"}
    time.sleep(0.01)
    path.write_text('[users."bob"]\npassword = \n')  # broken
    assert set(users.hashes()) == {"alice"} and "cannot be read" in caplog.text
    add_user(tmp_path / "fixed.toml", "bob", "pw")
    (tmp_path / "fixed.toml").replace(path)
    assert set(users.hashes()) == {"bob"}
    path.write_text("not toml at all [")
    with pytest.raises(ValueError):
        UsersFile(path).hashes()


def test_an_upload_cut_off_midway_leaves_the_cache_at_the_next_sweep_not_at_a_restart(tmp_path):
    """A refreshed page or a dropped line ends an upload midway: Gradio keeps the partial file and
    never lists it to sweep, so it stayed until the studio restarted, outside every quota. The
    studio's own sweep takes what was last written past the upload window, and keeps what is
    still arriving and the folder Gradio just made for an upload."""
    import time

    from heygem_ray.studio.server import sweep_uploads

    cut, arriving, made = tmp_path / "tmpa1b2c3", tmp_path / "tmpd4e5f6", tmp_path / "0f9e8d"
    cut.write_bytes(b"x" * 1000)
    arriving.write_bytes(b"y" * 1000)
    made.mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "talk.mp4").write_bytes(b"z")
    a_while_ago = time.time() - 1000
    for path in (cut, tmp_path / "old" / "talk.mp4"):
        os.utime(path, (a_while_ago, a_while_ago))
    assert sweep_uploads(str(tmp_path), expire=900) == 2
    assert not cut.exists() and not (tmp_path / "old").exists()
    assert arriving.exists() and made.is_dir()


def test_uploads_gone_from_the_cache_leave_gradios_lists_of_them(tmp_path, media_dir, monkeypatch):
    """Gradio lists every upload (to check the files a page names) and drops one from its list only
    when it removed the file itself: each upload a campaign took, or the studio's sweep removed,
    stayed listed until a restart, a web server's memory growing with every file ever uploaded.
    The sweep leaves the lists holding what is still there."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import UPLOAD_PATH, build_app
    from heygem_ray.studio.server import forget_removed, sweep_uploads
    from heygem_ray.studio.service import Studio as StudioService

    cache = tmp_path / "uploads"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    app = build_app(service, None, Sessions(b"k" * 32))
    client = TestClient(app, base_url="http://127.0.0.1")
    sent, arrived = [], []
    monkeypatch.setattr(service, "upload_arrived", lambda user, size, paths: arrived.append((user, size)))
    for name in ("speech3.wav", "still.png", "clip6.mp4"):
        with open(media_dir / name, "rb") as upload:
            answer = client.post(UPLOAD_PATH, files=[("files", upload)])
        assert answer.status_code == 200, answer.text
        sent += answer.json()
    # each counted against the quota from when it arrived whole
    assert [user for user, size in arrived] == ["local"] * 3 and all(size > 1000 for _, size in arrived)
    taken, old, fresh = sent
    listed = app.state.gradio_pages.upload_file_set
    assert set(sent) <= listed
    os.remove(taken)  # a campaign took it into the store
    a_while_ago = time.time() - 1000
    os.utime(old, (a_while_ago, a_while_ago))
    assert sweep_uploads(str(cache), 900) == 1
    assert not os.path.exists(old) and os.path.exists(fresh)
    # listed a moment before its file is moved in: a path goes once missing at two sweeps
    missing = forget_removed(app.state.gradio_pages.temp_file_sets, set())
    assert set(sent) == listed and missing == {taken, old}
    assert forget_removed(app.state.gradio_pages.temp_file_sets, missing) == {taken, old}
    assert listed == {fresh}


def test_a_local_store_it_makes_is_its_accounts_alone_and_an_open_one_is_warned_of(tmp_path, capsys):
    """Every user's uploads and videos are in the store, its files readable by all under the usual
    umask: one the studio makes is 0700; an existing one other accounts may enter is left (a
    cluster's workers may run as another account), saying so."""
    import stat

    from heygem_ray.studio.server import _private_store

    _private_store(str(tmp_path / "new"))
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700 and capsys.readouterr().err == ""
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    _private_store(str(tmp_path / "open"))
    assert stat.S_IMODE(os.stat(tmp_path / "open").st_mode) == 0o755
    assert "may be entered by other accounts" in capsys.readouterr().err


def test_uploads_wait_in_a_private_folder_emptied_of_what_an_earlier_studio_left(tmp_path, monkeypatch, caplog):
    import stat
    import time

    from heygem_ray.studio.server import private_upload_cache

    shared = tmp_path / "tmp-gradio"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # e.g. a shared /tmp an operator set for Gradio
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(shared))
    cache = tmp_path / "uploads"
    (cache / "abc").mkdir(parents=True)
    old, fresh = cache / "abc" / "talk.mp4", cache / "def.wav"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert private_upload_cache(str(cache), expire=900) == str(cache)
    assert os.environ["GRADIO_TEMP_DIR"] == str(cache) and "is not used" in caplog.text
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert not old.exists() and not (cache / "abc").exists() and fresh.exists()
    own = tmp_path / "big-disk"  # a private folder of this account: the operator's choice stands
    own.mkdir(mode=0o700)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(own))
    assert private_upload_cache(str(cache), expire=900) == str(own) == os.environ["GRADIO_TEMP_DIR"]
    own.chmod(0o755)  # others may list it: not used
    assert private_upload_cache(str(cache), expire=900) == str(cache)
    # Gradio serves the folder to every signed-in user and the sweep removes what is old there:
    # one holding the store, the session key or the users file is not used, nor swept
    own.chmod(0o700)
    key = own / "studio" / "session.key"
    key.parent.mkdir()
    key.write_text("k")
    os.utime(key, (an_hour_ago, an_hour_ago))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(own))
    assert private_upload_cache(str(cache), expire=900, keep_out=[str(key)]) == str(cache)
    assert key.exists() and "it holds" in caplog.text
    with pytest.raises(ValueError, match="every signed-in user could read it"):
        private_upload_cache(str(own), expire=900, keep_out=[str(own / "studio")])
    assert key.exists()


def _saves_held(studio: Any, monkeypatch: pytest.MonkeyPatch, user: str) -> tuple[threading.Event, threading.Event]:
    """`user`'s campaign saves wait in the store copy (gigabytes to S3, as it were) until the
    second event is set; the first is set as one begins."""
    saving, go_on = threading.Event(), threading.Event()
    store_campaign = studio._store_campaign

    def held(who: str, *args: Any) -> Any:
        if who == user:
            saving.set()
            go_on.wait(30)
        return store_campaign(who, *args)

    monkeypatch.setattr(studio, "_store_campaign", held)
    return saving, go_on


def test_a_second_click_while_a_campaign_is_being_saved_makes_no_second_campaign(tmp_path, media_dir, monkeypatch):
    """Saving copies every upload into the store (gigabytes, to S3): a second click meanwhile is
    refused with why, not a duplicate campaign; another user is not held up."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    studio = StudioService(
        StudioConfig(store=str(tmp_path / "store")),
        Cluster(f"http://127.0.0.1:{_free_port()}", local=False),
        logging.getLogger("t"),
    )
    saving, go_on = _saves_held(studio, monkeypatch, "alice")
    files = ([str(media_dir / "speech3.wav")], [str(media_dir / "still.png")])
    first, raised = _in_thread(studio.create, "alice", "one", *files)
    first.start()
    assert saving.wait(10)
    with pytest.raises(UploadError, match="still being saved"):
        studio.create("alice", "one again", *files)
    with pytest.raises(ClusterUnavailable):  # stored, then not submitted: bob's goes on
        studio.create("bob", "his", *files)
    go_on.set()
    first.join(10)
    assert not first.is_alive() and isinstance(raised[0], ClusterUnavailable), raised
    assert [r.name for r in studio.store.campaigns("alice")] == ["one"]


@pytest.mark.parametrize(
    "address, local",
    [
        ("http://127.0.0.1:8265", True),
        ("http://[::1]:8265", True),
        ("localhost:8265", True),
        ("http://head.example:8265", False),
        ("http://10.0.0.5:8265", False),
    ],
)
def test_a_ray_address_on_this_machine_runs_jobs_from_this_checkout(address, local):
    """A head on this machine runs the studio's own Python; any other gets the checkout uploaded (an
    IPv6 loopback address was taken for a remote host)."""
    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.server import connect

    cluster, about = connect(StudioConfig(store="/tmp/unused", ray_address=address))
    assert cluster.local is local and address in about


def test_a_large_campaigns_page_lists_its_failed_rows_first_and_a_bounded_number():
    """A 100,000-row campaign's page is refreshed every 3 s: it lists ROWS_SHOWN rows, the failed
    ones first, and says how many it leaves out."""
    from heygem_ray.studio.app import ROWS_SHOWN, rows_shown

    rows = [{"id": f"r{i}", "status": "ok", "seconds": 1.0, "error": ""} for i in range(100_000)]
    rows[70_000] = {"id": "r70000", "status": "failed", "seconds": None, "error": "audio …: does not exist"}
    shown = rows_shown(rows)
    assert len(shown) == ROWS_SHOWN + 1 and shown[0]["id"] == "r70000" and shown[1]["id"] == "r0"
    assert shown[-1]["error"] == f"{100_000 - ROWS_SHOWN:,} more rows not listed"
    assert rows_shown(rows[:3]) == rows[:3]


@pytest.mark.integration
def test_a_campaign_that_ended_while_no_studio_ran_is_logged_once(tmp_path, ray_head):
    """The studio's log has one line per campaign end: one that ended while the studio was down is
    logged by the next studio to start (saying so), and by no studio after it. A store from before
    ends were noted has its old ends noted, not logged again as missed."""
    import logging

    from ray.job_submission import JobSubmissionClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.store import CampaignRecord

    store = StudioStore(str(tmp_path / "store"))

    def ended_campaign() -> tuple[str, str]:
        campaign = store.new_id()
        job = JobSubmissionClient(ray_head).submit_job(entrypoint="true", submission_id=f"heygem-{campaign}")
        output = store.output("alice", campaign)
        store.save(CampaignRecord(campaign, "alice", "n", time.time(), 1, "classic", "draft", "m", output, jobs=[job]))
        _wait_for(lambda: Cluster(ray_head, local=True).job(job)[0] == "SUCCEEDED", 60, "the job")
        return campaign, job

    asked: list[str] = []  # the jobs a studio asked the cluster about

    def lines_after_a_studio_starts(name: str, campaign: str | None = None) -> list[str]:
        log = logging.getLogger(f"studio-{name}")
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda rec: seen.append(rec.getMessage())  # type: ignore[method-assign]
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        cluster = Cluster(ray_head, local=True)
        real_job = cluster.job
        cluster.job = lambda job: asked.append(job) or real_job(job)  # type: ignore[method-assign]
        studio = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster, log)
        # the watcher's first pass over the store ends with this note: waited for, not guessed at
        passed, note = threading.Event(), studio.store.note_ends_noted
        studio.store.note_ends_noted = lambda: (note(), passed.set())  # type: ignore[method-assign]
        asked.clear()
        studio.watch(0.2)
        assert passed.wait(60), "the watcher's first pass did not end"
        if campaign is not None:  # its page opened: an end the log has is not logged again
            assert studio.campaign("alice", campaign).status == "finished"
        return [line for line in seen if line.startswith(("finish", "failure", "stopped"))]

    ended_campaign()  # in a store from before ends were noted (its end was logged live then)
    assert lines_after_a_studio_starts("upgraded") == []
    campaign, job = ended_campaign()  # while no studio runs
    assert lines_after_a_studio_starts("first") == [
        f"finish user=alice campaign={campaign} rows=0 failed=0 job={job} (ended while the studio was down)"
    ]
    assert lines_after_a_studio_starts("second", campaign) == []
    # a studio starting finds every end logged: it asks the cluster about none of them (one call
    # per campaign in the store was its start-up's cost), only about the one whose page opened
    assert asked == [job]


def test_a_file_sent_again_counts_once_and_stays_its_senders_until_their_page_claims_it(tmp_path):
    """Gradio names an upload by its content. The quota counted each request: the same presenter
    sent again after a refresh counted twice and, near the quota, was refused for 16 minutes. And
    who holds an upload was known only once a page event (queued with every user's) said so: a
    campaign another user made meanwhile, from the same file, removed it from under them."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import UPLOAD_PATH, UploadClaims, build_app
    from heygem_ray.studio.service import Studio as StudioService

    users = tmp_path / "users.json"
    add_user(str(users), "alice", "alice-password")
    add_user(str(users), "bob", "bob-password")
    presenter = os.urandom(3000)
    cfg = StudioConfig(store=str(tmp_path / "store"), user_quota_gb=7000 / 2**30)  # 7000 bytes
    service = StudioService(cfg, cluster=None, log=logging.getLogger("t"))
    app = build_app(service, str(users), Sessions(b"k" * 32))
    clients = {}
    for name in ("alice", "bob"):
        clients[name] = TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)
        assert clients[name].post("/login", data={"name": name, "password": f"{name}-password"}).status_code == 303
    sent = [clients["bob"].post(UPLOAD_PATH, files={"files": ("p.mp4", presenter)}) for _ in range(2)]
    assert [r.status_code for r in sent] == [200, 200] and sent[0].json() == sent[1].json()  # one file
    # (each request ~200 bytes more than its file) 3000 once, + 1000 + 2000: counted twice, 9000+
    for size, status in ((1000, 200), (2000, 200), (1000, 413)):
        assert clients["bob"].post(UPLOAD_PATH, files={"files": ("o.mp4", os.urandom(size))}).status_code == status
    (path,) = sent[0].json()
    # bob's page has not claimed it yet; alice's campaign, made from the same file, leaves it
    claims = app.state.upload_claims
    claims.claim("alice/page", [path])
    assert claims.release("alice/page", path) is False
    # a user's own upload, claimed by the page since, is that page's to remove; one that two pages
    # of theirs uploaded is not, until the other page has claimed it and is done with it too
    mine = UploadClaims(900)
    mine.arrived("alice", ["/u/x"])
    mine.claim("alice/page", ["/u/x"])
    assert mine.release("alice/page", "/u/x") is True
    mine.arrived("alice", ["/u/y"])
    mine.arrived("alice", ["/u/y"])  # from her second page, whose event still waits
    mine.claim("alice/page", ["/u/y"])
    mine.claim("alice/page", ["/u/y"])  # a page's events name its files again: one arrival is its
    assert mine.release("alice/page", "/u/y") is False
    mine.claim("alice/second", ["/u/y"])
    assert mine.release("alice/second", "/u/y") is True


def _event_index(client, api_name: str) -> int:
    """The `fn_index` of the page event `api_name`, as the page's config names it."""
    config = client.get("/app/config").json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def _alice_and_bob_signed_in(tmp_path, **settings: Any):
    """A studio app of two users (`settings`: its StudioConfig's), and a client signed in as each (by name)."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import build_app
    from heygem_ray.studio.service import Studio as StudioService

    users = tmp_path / "users.json"
    add_user(str(users), "alice", "alice-password")
    add_user(str(users), "bob", "bob-password")
    cfg = StudioConfig(store=str(tmp_path / "store"), **settings)
    service = StudioService(cfg, cluster=None, log=logging.getLogger("t"))
    app = build_app(service, str(users), Sessions(b"k" * 32))
    clients = {}
    for name in ("alice", "bob"):
        clients[name] = TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)
        assert clients[name].post("/login", data={"name": name, "password": f"{name}-password"}).status_code == 303
    return app, clients


def test_a_users_pending_upload_is_theirs_alone_by_link_and_by_page_event(tmp_path):
    """Another signed-in user who got the link to a pending upload (a screenshot, a shared screen)
    downloaded it, and a page event naming its path made a campaign of it, copying it into their
    own store: an upload is its uploader's (`UploadClaims.own`), by Gradio's file route too."""
    from urllib.parse import quote

    import gradio as gr

    from heygem_ray.studio.app import API_PATH, UPLOAD_PATH, UploadClaims

    app, clients = _alice_and_bob_signed_in(tmp_path)
    narration = os.urandom(2000)
    (path,) = clients["alice"].post(UPLOAD_PATH, files={"files": ("speech.wav", narration)}).json()
    mine = clients["alice"].get(f"{API_PATH}file={path}")
    assert mine.content == narration and mine.headers["cache-control"] == "private, no-store"  # no CDN keeps it
    assert clients["bob"].get(f"{API_PATH}file={path}").status_code == 404
    claims = app.state.upload_claims
    assert claims.own("alice", [path]) == [path]
    with pytest.raises(gr.Error, match="not one of your uploads"):
        claims.own("bob", [path])
    # past its window its own uploader was told it was not theirs, and went looking for why
    old = UploadClaims(0.0)
    old.arrived("alice", [path])
    with pytest.raises(gr.Error, match="this one expired: upload it again"):
        old.own("alice", [path])
    with pytest.raises(gr.Error, match="not one of your uploads"):
        old.own("bob", [path])
    # a page left open while the studio restarted: its uploads are still kept, whose they are is not known
    os.utime(path, (time.time() - 5, time.time() - 5))
    with pytest.raises(gr.Error, match="speech.wav was uploaded before the studio restarted.*upload it again"):
        UploadClaims(900.0).own("alice", [path])
    (same,) = clients["bob"].post(UPLOAD_PATH, files={"files": ("speech.wav", narration)}).json()
    assert same == path and claims.own("bob", [path]) == [path]  # the same file, uploaded by bob too
    # a "#" in the name reaches the route percent-encoded: its own uploader had a 404 for the
    # part before the "#", a file of the upload folder that was not theirs
    take = os.urandom(2000)
    (hashed,) = clients["alice"].post(UPLOAD_PATH, files={"files": ("take#2.wav", take)}).json()
    assert "#" in hashed
    assert clients["alice"].get(f"{API_PATH}file={quote(hashed)}").content == take
    assert clients["bob"].get(f"{API_PATH}file={quote(hashed)}").status_code == 404


def test_the_upload_check_names_the_plans_files_no_upload_has(tmp_path, media_dir):
    """A plan naming a file not uploaded (a typo, one left out) was said to be fine as files were
    picked, and refused only at Render; names the web server stripped (`Take 2!.wav`) are found.
    Two narrations of one name (two takes, each intro.wav) under a plan naming it: Render refuses
    them, and now so does the check."""
    from starlette.testclient import TestClient

    from heygem_ray.studio.app import UPLOAD_PATH

    app, clients = _alice_and_bob_signed_in(tmp_path)
    plan = tmp_path / "plan.csv"
    plan.write_text("audio,avatar\nTake 2!.wav,still.png\nTake 3.wav,still.png\n")
    takes_plan = tmp_path / "takes.csv"
    takes_plan.write_text("audio,avatar\nintro.wav,still.png\n")
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as alice:
        alice.cookies = clients["alice"].cookies

        def sent(name: str, source: Path) -> dict:
            (path,) = alice.post(UPLOAD_PATH, files={"files": (name, source.read_bytes())}).json()
            return {"path": path, "meta": {"_type": "gradio.FileData"}}

        audio, avatar = sent("Take 2.wav", media_dir / "speech3.wav"), sent("still.png", media_dir / "still.png")
        (said,) = _answered(alice, _event_index(alice, "check"), [[audio], [avatar], sent("plan.csv", plan)])
        takes = [sent("intro.wav", media_dir / name) for name in ("speech3.wav", "speech4.wav")]
        (said_of_takes,) = _answered(
            alice, _event_index(alice, "check"), [takes, [avatar], sent("takes.csv", takes_plan)]
        )
    assert "2 video(s)" in said and "row 2: &#x27;Take 3.wav&#x27; is not among your narration uploads" in said, said
    assert "row 1" not in said, said
    assert "intro.wav: two of your audio uploads have this name" in said_of_takes, said_of_takes


def test_a_users_page_is_theirs_alone_whoever_learns_its_session_hash(tmp_path):
    """Gradio serves a page's session to anyone signed in who names its hash: another user who
    learnt it (a proxy's log of `/heartbeat/<hash>`) read the page's event results and, by a deep
    link, its state. A page is its first user's; deep links and component servers are not served."""
    from heygem_ray.studio.app import API_PATH

    _app, clients = _alice_and_bob_signed_in(tmp_path)
    alice, bob = clients["alice"], clients["bob"]
    whoami = _event_index(alice, "whoami")
    event = {"data": [], "fn_index": whoami, "session_hash": "alicepage"}
    assert alice.post(API_PATH + "queue/join", json=event).status_code == 200
    assert bob.post(API_PATH + "queue/join", json=event).status_code == 403
    assert bob.get(API_PATH + "queue/data", params={"session_hash": "alicepage"}).status_code == 403
    assert bob.get(API_PATH + "heartbeat/alicepage").status_code == 403
    cancel = {"session_hash": "alicepage", "fn_index": whoami, "event_id": "x"}
    assert bob.post(API_PATH + "cancel", json=cancel).status_code == 403
    assert alice.post(API_PATH + "cancel", json=cancel).status_code == 200  # hers: Gradio answers it
    # an event of hers named from a page of his: Gradio removed it from the queue whatever its page
    waiting = alice.post(API_PATH + "queue/join", json=event).json()["event_id"]  # the app is not started: it waits
    theirs = {"session_hash": "bobpage", "fn_index": whoami, "event_id": waiting}
    assert bob.post(API_PATH + "cancel", json=theirs).status_code == 403
    assert alice.post(API_PATH + "cancel", json={**theirs, "session_hash": "alicepage"}).status_code == 200
    # Gradio's `call` route takes a page's hash for an event id it does not know
    assert bob.get(API_PATH + "call/whoami/alicepage").status_code == 404
    assert bob.post(API_PATH + "queue/join", json={**event, "session_hash": "bobpage"}).status_code == 200
    assert bob.get(API_PATH + "deep_link", params={"session_hash": "bobpage"}).status_code == 404
    # the heartbeat's page is its path's: a page of one's own beside it was the one checked
    for path in ("heartbeat/alicepage?session_hash=bobpage", "dev/reload"):  # both endless streams when served
        with bob.stream("GET", API_PATH + path) as answer:
            assert answer.status_code in (403, 404), path
    assert bob.get(API_PATH + "startup-events").status_code == 404  # a second queue loop, for anyone
    assert bob.post(API_PATH + "queue/join", json={**event, "session_hash": "x" * 100_000}).status_code == 403


def test_one_user_cannot_fill_the_event_queue_for_everyone(tmp_path):
    """The queue's size is every user's together: one user's script that joined events on and on
    filled it, and every other user's pages were refused ("queue full")."""
    from heygem_ray.studio.app import API_PATH, USER_EVENTS

    app, clients = _alice_and_bob_signed_in(tmp_path)
    alice, bob = clients["alice"], clients["bob"]
    whoami = _event_index(alice, "whoami")
    # events whose page closed while they ran stay in Gradio's record by page for good: counted,
    # they locked a user out with nothing waiting
    first = {"data": [], "fn_index": whoami, "session_hash": "bobpage0"}
    assert bob.post(API_PATH + "queue/join", json=first).status_code == 200
    app.state.gradio_pages._queue.pending_event_ids_session["bobpage0"].update(f"gone{i}" for i in range(100))
    # the app is not started here: its queue runs no event, so each joined one waits
    for i in range(1, USER_EVENTS):
        event = {"data": [], "fn_index": whoami, "session_hash": f"bobpage{i % 3}"}
        assert bob.post(API_PATH + "queue/join", json=event).status_code == 200
    event = {"data": [], "fn_index": whoami, "session_hash": "bobpage9"}
    assert bob.post(API_PATH + "queue/join", json=event).status_code == 429  # a page of his more changes nothing
    assert alice.post(API_PATH + "queue/join", json={**event, "session_hash": "alicepage"}).status_code == 200


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="the kernel's socket tables are Linux's")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_owner_of_a_loopback_connections_other_end_is_known(host):
    """A studio without users serves the account that started it only: it finds who made each
    connection in the kernel's socket tables (another account's request is refused:
    test_studio_cli)."""
    import socket

    from heygem_ray.studio.users import NOBODY, loopback_peer_uid

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        with socket.create_connection(server.getsockname()[:2]) as _client:
            accepted, peer = server.accept()
            with accepted:
                assert loopback_peer_uid(peer[:2], server.getsockname()[:2]) == os.getuid()
                assert loopback_peer_uid((host, 1), server.getsockname()[:2]) == NOBODY  # no such connection
    assert loopback_peer_uid(("testclient", 50000), ("testserver", 80)) is None


def test_pages_are_forgotten_when_long_idle_or_the_least_recently_used_past_the_cap(monkeypatch):
    from heygem_ray.studio import sessions as sessions_module
    from heygem_ray.studio.sessions import PageOwners

    now = [1000.0]
    monkeypatch.setattr(sessions_module.time, "monotonic", lambda: now[0])
    pages = PageOwners(idle=60, most=3)
    assert pages.allows("a", "alice") and not pages.allows("a", "bob")
    now[0] += 61
    assert pages.allows("a", "bob")  # alice's page long closed: its hash is no one's now
    for page in ("b", "c", "a", "d"):  # "a" used again: "b" is the least recently used
        assert pages.allows(page, "bob")
    assert pages.allows("b", "alice") and not pages.allows("a", "alice")


def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(tmp_path):
    """Someone who copied the cookie before its user signed out (a shared machine, a proxy log) is
    signed out too."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import build_app
    from heygem_ray.studio.service import Studio as StudioService
    from heygem_ray.studio.sessions import COOKIE

    users = tmp_path / "users.json"
    add_user(str(users), "alice", "alice-password")
    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    app = build_app(service, str(users), Sessions(b"k" * 32, ended_file=str(tmp_path / "ended")))
    alice = TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)
    assert alice.post("/login", data={"name": "alice", "password": "alice-password"}).status_code == 303
    copy = TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)
    copy.cookies.set(COOKIE, alice.cookies[COOKIE])
    assert copy.get("/app/").status_code == 200  # signed in, as alice
    assert alice.get("/logout").headers["location"] == "/login"
    assert copy.get("/app/").headers["location"] == "/login"  # the copy is signed out too
    # a page event of no session: refused before its body is read (a MiB of JSON walked on the
    # event loop for anyone who can reach the port), here one naming a file by URL
    linked = {"data": [[{"path": "https://example.com/big.wav", "meta": {"_type": "gradio.FileData"}}]], "fn_index": 0}
    for stranger in (copy, TestClient(app, base_url="http://127.0.0.1")):
        refused = stranger.post("/app/gradio_api/queue/join", json=linked)
        assert refused.status_code == 401 and "uploaded, not linked" not in refused.text
        # Gradio's GET routes asked for no sign-in: its heartbeat streamed to anyone, for ever
        with stranger.stream("GET", "/app/gradio_api/heartbeat/abc") as heartbeat:
            assert heartbeat.status_code == 401
        assert stranger.get("/app/gradio_api/info").status_code == 401
    assert alice.post("/login", data={"name": "alice", "password": "alice-password"}).status_code == 303
    assert alice.get("/app/gradio_api/info").status_code == 200


def test_a_campaigns_link_opens_it_once_signed_in_and_carries_nothing_else(tmp_path):
    """A campaign's address (`/app/?campaign=<id>`) opened from mail or chat reaches the studio
    without its cookie (SameSite=Strict): the sign-in form, and then the page without the campaign.
    Its id now goes through the sign-in; nothing that is not a campaign id does (no redirect to
    another site, no markup in the form)."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import build_app
    from heygem_ray.studio.service import Studio as StudioService

    users = tmp_path / "users.json"
    add_user(str(users), "alice", "alice-password")
    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    client = TestClient(
        build_app(service, str(users), Sessions(b"k" * 32)), base_url="http://127.0.0.1", follow_redirects=False
    )
    campaign = service.store.new_id()
    assert client.get(f"/app/?campaign={campaign}").headers["location"] == f"/login?campaign={campaign}"
    assert f'name="campaign" value="{campaign}"' in client.get(f"/login?campaign={campaign}").text
    signed_in = client.post("/login", data={"name": "alice", "password": "alice-password", "campaign": campaign})
    assert signed_in.headers["location"] == f"/app/?campaign={campaign}"
    client.cookies.clear()
    for wrong in ("https://evil.example/", "//evil.example", '"><script>alert(1)</script>', campaign + "x"):
        assert client.get("/app/", params={"campaign": wrong}).headers["location"] == "/login"
        assert 'name="campaign"' not in client.get("/login", params={"campaign": wrong}).text
        answer = client.post("/login", data={"name": "alice", "password": "alice-password", "campaign": wrong})
        assert answer.headers["location"] == "/app/"
        client.cookies.clear()


def test_uploads_count_the_users_store_at_most_every_few_seconds(tmp_path, monkeypatch):
    """Each upload's quota check walked every file of the user's store, in the web server's shared
    threads: many small uploads at once stalled every user's pages. The count is trusted for
    USAGE_SECONDS, and made anew when a campaign takes uploads in or one is deleted."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio import service as studio_service

    studio = studio_service.Studio(
        StudioConfig(store=str(tmp_path / "store"), user_quota_gb=1.0), None, logging.getLogger("t")
    )
    walks = []
    real_usage = studio.store.usage
    monkeypatch.setattr(studio.store, "usage", lambda user: walks.append(user) or real_usage(user))
    for _ in range(20):
        assert studio.admit_upload("alice", 1000) is None
    assert walks == ["alice"]
    taken = tmp_path / "taken.wav"
    taken.write_bytes(b"x" * 1000)
    studio._taken("alice", [str(taken)])  # a campaign took some in: counted anew
    studio.admit_upload("alice", 1000)
    assert walks == ["alice", "alice"]
    monkeypatch.setattr(studio_service, "USAGE_SECONDS", 0.0)
    studio.admit_upload("alice", 1000)
    assert len(walks) == 3
    # forty uploads at once once the count is old: one walk, the others answered from the last count
    import threading

    walking, go_on = threading.Event(), threading.Event()
    monkeypatch.setattr(
        studio.store, "usage", lambda user: walks.append(user) or walking.set() or go_on.wait(2) and real_usage(user)
    )
    first = threading.Thread(target=studio.admit_upload, args=("alice", 1000))
    first.start()
    assert walking.wait(10)
    answers = [studio.admit_upload("alice", 1000) for _ in range(39)]  # while the walk goes on
    go_on.set()
    first.join(10)
    assert len(walks) == 4 and answers == [None] * 39
    # a campaign deleted while a count walks: that count is not kept, but made again at once
    monkeypatch.setattr(studio_service, "USAGE_SECONDS", 60.0)
    walking.clear()
    go_on.clear()
    first = threading.Thread(target=studio._store_usage, args=("alice", time.time() + 120))  # its count old
    first.start()
    assert walking.wait(10)
    studio._store_changed("alice")
    go_on.set()
    first.join(10)
    assert len(walks) == 6  # counted again once the store had changed under the first count
    studio.admit_upload("alice", 1000)
    assert len(walks) == 6  # and that count kept


def test_a_campaign_record_this_version_cannot_read_is_passed_over_not_fatal(tmp_path, caplog, monkeypatch):
    """One campaign.json cut short, edited by hand or lacking a field must not break its user's page
    nor the watcher of every user's campaigns: it is left out, with a warning. A newer version's
    record (a field this one does not know) still loads."""
    from heygem_ray.studio import store as store_module
    from heygem_ray.studio.store import CampaignRecord

    monkeypatch.setattr(store_module, "LISTED_SECONDS", 0.0)  # records edited by hand: listed each time
    store = StudioStore(str(tmp_path / "store"))

    def saved(user: str, name: str, created: float) -> CampaignRecord:
        record = CampaignRecord(store.new_id(), user, name, created, 1, "lipsync", "standard", "m", "o")
        store.save(record)
        return record

    good, newer, cut, missing = (saved("alice", n, t) for n, t in (("good", 1.0), ("newer", 2.0), ("cut", 3), ("x", 4)))
    other = saved("bob", "theirs", 5.0)

    def path(record: CampaignRecord) -> Path:
        return tmp_path / "store" / record.user / record.id / "campaign.json"

    data = json.loads(path(newer).read_text())
    path(newer).write_text(json.dumps({**data, "schema": 2, "labels": ["q4"]}))
    path(cut).write_text(path(cut).read_text()[:40])
    data = json.loads(path(missing).read_text())
    del data["rows"]
    path(missing).write_text(json.dumps(data))
    assert [r.name for r in store.campaigns("alice")] == ["newer", "good"]
    assert sorted(r.name for r in store.all_campaigns()) == ["good", "newer", "theirs"]
    assert store.load("bob", other.id) is not None and store.load("alice", good.id) is not None
    assert caplog.text.count("unreadable") >= 2
    path(good).write_text("[1, 2]")  # JSON, but no record
    assert [r.name for r in store.campaigns("alice")] == ["newer"]


def test_a_campaign_being_saved_and_submitted_is_not_rerun_or_deleted_meanwhile(tmp_path, media_dir):
    """Between a new campaign's record being saved (the page lists it, not yet submitted) and its
    submit, a re-run would start a second job on its output and a delete would remove it under the
    submit: both wait for the submit to end."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.cluster import Cluster, ClusterUnavailable
    from heygem_ray.studio.service import Studio as StudioService

    cfg = StudioConfig(store=str(tmp_path / "store"))
    studio = StudioService(cfg, Cluster(f"http://127.0.0.1:{_free_port()}", local=False), logging.getLogger("t"))
    saved, go_on, acted = threading.Event(), threading.Event(), []
    save = studio.store.save

    def slow_save(record):
        save(record)
        if not record.jobs and not saved.is_set():  # the new record, listed from now on
            saved.set()
            go_on.wait(10)

    studio.store.save = slow_save

    def act(action):
        saved.wait(10)
        (record,) = studio.store.campaigns("alice")
        try:
            action("alice", record.id)
        except ClusterUnavailable:
            pass
        acted.append(action.__name__)

    creating, raised = _in_thread(
        studio.create, "alice", "c", [str(media_dir / "speech3.wav")], [str(media_dir / "still.png")]
    )
    others = [threading.Thread(target=act, args=(action,)) for action in (studio.rerun, studio.delete)]
    creating.start()
    for thread in others:
        thread.start()
    time.sleep(0.5)
    assert acted == []  # both wait while the campaign is being submitted
    go_on.set()
    for thread in (creating, *others):
        thread.join(10)
        assert not thread.is_alive()
    assert isinstance(raised[0], ClusterUnavailable), raised
    assert sorted(acted) == ["delete", "rerun"]


def test_posters_and_video_seeks_read_no_campaign_record(tmp_path, monkeypatch):
    """A gallery asks for every poster and a player for every seek: each read the campaign's record
    first (a GET each on an object store) for an output folder its user and id already give. Now
    none does; another user's name, or an id that is no campaign's, still finds nothing, and a
    video deleted since its row finished is not found (it was a server error)."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.results import ResultsTable, RowResult
    from heygem_ray.studio import service as studio_service
    from heygem_ray.studio.app import build_app
    from heygem_ray.studio.store import CampaignRecord

    studio = studio_service.Studio(StudioConfig(store=str(tmp_path / "store")), None, logging.getLogger("t"))
    store = studio.store
    campaign = store.new_id()
    output = store.output("local", campaign)
    store.save(CampaignRecord(campaign, "local", "n", time.time(), 1, "classic", "draft", "m", output))
    os.makedirs(f"{output}/_thumbs")
    with open(f"{output}/_thumbs/r0.jpg", "wb") as fh:
        fh.write(b"poster")
    with open(f"{output}/r0.mp4", "wb") as fh:
        fh.write(b"video")
    layout = CampaignLayout(output)
    table = ResultsTable(layout.results, layout.results_parts)
    table.add(RowResult("r0", "ok", f"{output}/r0.mp4", None, 1.0, 25, 1, 1.0, 1, time.time()))
    table.finish(["r0"])
    loads = []
    real_load = store.load
    monkeypatch.setattr(store, "load", lambda user, cid: loads.append(cid) or real_load(user, cid))
    for _ in range(3):
        assert studio.thumbnail("local", campaign, "r0") == b"poster"
        assert studio.video("local", campaign, "r0.mp4") == f"{output}/r0.mp4"
    client = TestClient(build_app(studio, None, Sessions(b"k" * 32)), base_url="http://127.0.0.1")
    assert client.get(f"/files/{campaign}/thumb/r0.jpg").content == b"poster"
    assert client.get(f"/files/{campaign}/video/r0.mp4", headers={"Range": "bytes=1-2"}).content == b"id"
    assert loads == []
    os.remove(f"{output}/r0.mp4")
    assert client.get(f"/files/{campaign}/video/r0.mp4").status_code == 404
    assert studio.thumbnail("bob", campaign, "r0") is None and studio.video("bob", campaign, "r0.mp4") is None
    for wrong in ("..", "x/../y", campaign + "/.."):
        assert studio.thumbnail("local", wrong, "r0") is None and studio.video("local", wrong, "r0.mp4") is None
    # ids that are no campaign of the user's keep nothing, nor push out the results kept for the
    # campaigns being looked at (a few slots, every user's)
    kept = (dict(store._finished), dict(store._part_rows))
    for _ in range(20):
        nobody = store.new_id()  # well-formed, never saved
        assert studio.video("local", nobody, "r0.mp4") is None and studio.thumbnail("local", nobody, "r0") is None
    assert (store._finished, store._part_rows) == kept


def test_a_page_lists_the_newest_campaigns_and_reads_a_record_again_only_when_it_changed(tmp_path, monkeypatch):
    """Every open page lists its user's campaigns every 3 s: each record was read (a GET each on an
    object store) and each campaign's progress feed too, however many campaigns the user had. A
    record is now read again only when the listing shows it changed, and the progress of the
    LISTED newest alone; the page's chooser still offers every campaign."""
    import logging

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio import service as studio_service
    from heygem_ray.studio.store import CampaignRecord

    studio = studio_service.Studio(StudioConfig(store=str(tmp_path / "store")), None, logging.getLogger("t"))
    store = studio.store
    made = []
    for created in (1.0, 2.0, 3.0):
        made.append(CampaignRecord(store.new_id(), "alice", f"c{created:g}", created, 1, "m", "standard", "x", "o"))
        store.save(made[-1])
    loads, feeds = [], []
    real_load, real_progress = store.load, store.progress
    monkeypatch.setattr(store, "load", lambda user, cid: loads.append(cid) or real_load(user, cid))
    monkeypatch.setattr(
        store, "progress", lambda record, rows=True: feeds.append(record.id) or real_progress(record, rows)
    )
    monkeypatch.setattr(studio_service, "LISTED", 2)

    views, records = studio.campaigns("alice")
    assert [v.record.name for v in views] == ["c3", "c2"] and [r.name for r in records] == ["c3", "c2", "c1"]
    assert sorted(loads) == sorted(r.id for r in made) and sorted(feeds) == sorted([made[2].id, made[1].id])
    records[0].jobs.append("changed by a caller")  # a caller's copy: the kept record stays as read
    loads.clear()
    views, records = studio.campaigns("alice")
    assert loads == [] and records[0].jobs == []
    store.save(replace(made[0], name="renamed first"))
    views, records = studio.campaigns("alice")
    assert loads == [made[0].id] and [r.name for r in records] == ["c3", "c2", "renamed first"]
    # and the listing itself (a LIST per campaign folder on an object store) is made at most every
    # LISTED_SECONDS, and at once after this studio changed a record
    from heygem_ray import storage
    from heygem_ray.studio import store as store_module

    listings = []
    real_versions = storage.versions
    monkeypatch.setattr(storage, "versions", lambda pattern: listings.append(pattern) or real_versions(pattern))
    for _ in range(3):
        studio.campaigns("alice")
    assert listings == []
    store.save(replace(made[1], name="renamed second"))
    assert [r.name for r in studio.campaigns("alice")[1]] == ["c3", "renamed second", "renamed first"]
    assert len(listings) == 1
    clock = HandClock()
    monkeypatch.setattr(store_module, "time", clock)
    store.save(replace(made[1], name="listed now"))  # listed at the clock's time
    studio.campaigns("alice")
    assert len(listings) == 2
    for step, listed in ((14.0, 2), (1.5, 3)):  # LISTED_SECONDS, 15 s
        clock.now += step
        studio.campaigns("alice")
        assert len(listings) == listed
    monkeypatch.setattr(store_module, "LISTED_CAMPAIGNS", 1)  # 3 campaigns: listed every 45 s
    for step, listed in ((30.0, 3), (16.0, 4)):
        clock.now += step
        studio.campaigns("alice")
        assert len(listings) == listed


def test_a_render_whose_page_closes_while_it_waits_its_turn_is_still_saved(tmp_path, media_dir, monkeypatch):
    """Saving copies every upload into the store (minutes, to S3), so Renders take turns. One that
    waited for its turn in Gradio's queue was dropped when its page closed (a refresh: Gradio
    clears a closed page's queued events), and the campaign its user saw submitted was never made.
    The turns are the studio's own now: the campaign is made, and its uploads leave the cache (held
    there meanwhile: the sweep of old uploads took those sent a while before the Render, and so did
    another user's save of the same files once her claim's window had passed)."""
    import functools
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio import app as app_module
    from heygem_ray.studio import service as studio_service
    from heygem_ray.studio.app import API_PATH, UPLOAD_PATH, build_app
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.server import sweep_uploads

    cache = tmp_path / "uploads"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.setattr(studio_service, "SAVE_THREADS", 1)  # one save at a time: bob's holds alice's
    monkeypatch.setattr(app_module, "UPLOAD_WINDOW_SECONDS", 3.0)  # her wait outlasts her claim's window
    users = tmp_path / "users.json"
    for name in ("alice", "bob"):
        add_user(str(users), name, f"{name}-password")
    cluster = Cluster(f"http://127.0.0.1:{_free_port()}", local=False)  # down: saved, not submitted
    service = studio_service.Studio(StudioConfig(store=str(tmp_path / "store")), cluster, logging.getLogger("t"))
    saving, go_on = _saves_held(service, monkeypatch, "bob")
    app = build_app(service, str(users), Sessions(b"k" * 32))
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as client:  # Gradio's queue runs
        signed_in = {}
        for name in ("alice", "bob"):
            client.cookies.clear()
            assert client.post("/login", data={"name": name, "password": f"{name}-password"}).status_code == 303
            signed_in[name] = list(client.cookies.jar)
        create = _event_index(client, "create")

        def render(user: str, page: str, age: float = 0.0) -> list[str]:
            client.cookies.clear()
            for cookie in signed_in[user]:
                client.cookies.jar.set_cookie(cookie)
            sent = []
            for name in ("speech3.wav", "still.png"):
                with open(media_dir / name, "rb") as upload:
                    sent += client.post(UPLOAD_PATH, files=[("files", upload)]).json()
            for path in sent:
                os.utime(path, (time.time() - age, time.time() - age))
            audio, avatar = ({"path": p, "meta": {"_type": "gradio.FileData"}} for p in sent)
            data = [f"{user}'s", [audio], [avatar], None, "classic (no weights)", "standard"]
            event = {"data": data, "fn_index": create, "session_hash": page}
            assert client.post(API_PATH + "queue/join", json=event).status_code == 200
            return sent

        render("bob", "bobpage")
        assert saving.wait(30)
        hers = render("alice", "alicepage", age=800.0)  # uploaded a while before she pressed Render
        time.sleep(3.5)  # her Render waits its turn behind bob's, past her claim's window
        assert not service.store.campaigns("alice") and service.being_saved("alice")  # her page says so
        assert sweep_uploads(str(cache), 100.0, service.held) == 0  # held while her Render waits
        queue = app.state.gradio_pages._queue
        client.portal.call(functools.partial(queue.clean_events, session_hash="alicepage"))  # her page closes
        go_on.set()
        _wait_for(lambda: service.store.campaigns("alice"), 30, "alice's campaign")
        assert [r.name for r in service.store.campaigns("alice")] == ["alice's"]
        _wait_for(lambda: not any(os.path.exists(p) for p in hers), 10, "her uploads to leave the cache")
        _wait_for(lambda: not service.being_saved("alice"), 10, "her save to end")
        assert not service.held()


def test_a_stopping_studio_waits_for_the_renders_being_saved_and_names_those_it_cuts_short(tmp_path, caplog):
    """A studio stopped (a deploy, SIGTERM) while Renders were being saved dropped them unsaid: their
    pages had said "it is listed once saved", and no log line named whom to tell. It now waits for
    them a while once it takes no more requests, then logs each user whose save it cuts short."""
    import logging
    import threading

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.service import Studio as StudioService

    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster=None, log=logging.getLogger("t"))
    go_on = threading.Event()
    service.save_later("alice", [], lambda: go_on.wait(30))
    with caplog.at_level(logging.INFO, logger="t"):
        assert service.finish_saves(0.3) == ["alice"]
    assert "stop user=alice: a campaign being saved is cut short" in caplog.text
    threading.Timer(0.3, go_on.set).start()
    assert service.finish_saves(30) == []  # waited for it


def test_a_render_the_store_fails_says_so_and_keeps_its_uploads_for_another_try(tmp_path, media_dir):
    """A store that fails while a Render saves (a full disk, an object store that does not answer)
    showed Gradio's bare "Error": the page now says the store failed, without its folders, and
    keeps the uploads, so the same Render works once the store does."""
    import logging

    from starlette.testclient import TestClient

    from heygem_ray.config import StudioConfig
    from heygem_ray.studio.app import UPLOAD_PATH, build_app
    from heygem_ray.studio.cluster import Cluster
    from heygem_ray.studio.service import Studio as StudioService

    users = tmp_path / "users.json"
    add_user(str(users), "alice", "alice-password")
    cluster = Cluster(f"http://127.0.0.1:{_free_port()}", local=False)  # down: saved, not submitted
    service = StudioService(StudioConfig(store=str(tmp_path / "store")), cluster, logging.getLogger("t"))
    app = build_app(service, str(users), Sessions(b"k" * 32))
    blocked = tmp_path / "store" / "alice"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"")  # her folder cannot be made: every write under it fails (NotADirectoryError)
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as alice:  # Gradio's queue runs
        assert alice.post("/login", data={"name": "alice", "password": "alice-password"}).status_code == 303
        sent = []
        for name in ("speech3.wav", "still.png"):
            with open(media_dir / name, "rb") as upload:
                sent += alice.post(UPLOAD_PATH, files=[("files", upload)]).json()
        audio, avatar = ({"path": p, "meta": {"_type": "gradio.FileData"}} for p in sent)
        create = _event_index(alice, "create")

        def render() -> str:
            data = ["hers", [audio], [avatar], None, "classic (no weights)", "standard"]
            return _answered(alice, create, data)[0]

        said = render()
        assert said.startswith("❌ the studio's store failed (Not a directory): nothing was saved"), said
        assert str(tmp_path) not in said
        assert all(os.path.exists(p) for p in sent)  # still hers to Render again
        blocked.unlink()
        said = render()
        assert said.startswith("❌ saved, but not submitted"), said  # the cluster is down here
        assert [r.name for r in service.store.campaigns("alice")] == ["hers"]


def _answered(client, fn_index: int, data: list, page: str = "alicepage") -> list:
    """The outputs of one page event, sent as a browser sends it, in a started app (Gradio's queue
    runs); it must be answered, not fail with Gradio's bare "Error"."""
    from heygem_ray.studio.app import API_PATH

    event = {"data": data, "fn_index": fn_index, "session_hash": page}
    assert client.post(API_PATH + "queue/join", json=event).status_code == 200
    with client.stream("GET", API_PATH + "queue/data", params={"session_hash": page}) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                assert message["success"], message
                return message["output"]["data"]
    raise AssertionError("no answer")


def test_a_page_whose_store_fails_says_so_and_keeps_what_it_showed(tmp_path, monkeypatch):
    """A store that stops answering (S3 down, NFS gone) showed Gradio's bare "Error" every few
    seconds on every open page, and a page opened meanwhile came up empty, saying nothing."""
    from starlette.testclient import TestClient

    from heygem_ray import storage

    app, clients = _alice_and_bob_signed_in(tmp_path)

    monkeypatch.setattr(storage, "versions", _refused)  # the listing of her campaigns
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as alice:
        alice.cookies = clients["alice"].cookies
        for api_name, data in (("refresh", [None]), ("opened", ["20260101-000000-abcdef"])):
            answer = _answered(alice, _event_index(alice, api_name), data)
            said = answer[2]
            assert "the studio&#x27;s store failed (Connection refused)" in said, (api_name, answer)
        for api_name in ("do_cancel", "do_rerun", "do_delete"):  # the open campaign's listing fails
            (said,) = _answered(alice, _event_index(alice, api_name), ["20260101-000000-abcdef"])
            assert said.startswith("❌ the studio's store failed (Connection refused)"), (api_name, said)


def test_a_render_whose_store_fails_after_its_record_says_it_was_saved(tmp_path, media_dir, monkeypatch):
    """The store failing once the campaign's record was saved (its submit's save of the job's id):
    the page is to say it was saved, not submitted; listing the user's campaigns for the page failed
    too, and Gradio's bare "Error" was shown instead."""
    from starlette.testclient import TestClient

    from heygem_ray import storage
    from heygem_ray.studio.app import UPLOAD_PATH

    app, clients = _alice_and_bob_signed_in(tmp_path)
    records = []
    write = storage.write_bytes

    def fails_after_the_first_record(uri: str, data: bytes) -> None:
        if uri.endswith("campaign.json"):
            records.append(uri)
            if len(records) > 1:
                monkeypatch.setattr(storage, "versions", _refused)  # the listing for the page too
                raise ConnectionRefusedError(111, "Connection refused")
        write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", fails_after_the_first_record)
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as alice:
        alice.cookies = clients["alice"].cookies
        sent = []
        for name in ("speech3.wav", "still.png"):
            with open(media_dir / name, "rb") as upload:
                sent += alice.post(UPLOAD_PATH, files=[("files", upload)]).json()
        audio, avatar = ({"path": p, "meta": {"_type": "gradio.FileData"}} for p in sent)
        data = ["hers", [audio], [avatar], None, "classic (no weights)", "standard"]
        said = _answered(alice, _event_index(alice, "create"), data)[0]
    assert said.startswith("❌ saved, but not submitted: the studio's store failed (Connection refused)"), said


def _refused(*args: Any, **kwargs: Any) -> Any:
    raise ConnectionRefusedError(111, "Connection refused")
