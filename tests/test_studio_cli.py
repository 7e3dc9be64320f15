"""`heygem-ray studio adduser` and the studio's refusal to listen beyond 127.0.0.1 without users."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import _free_port
from heygem_ray.studio.users import authenticate


def _studio(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heygem_ray.cli", "studio", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=120,
    )


def test_adduser_writes_a_user_who_can_log_in(tmp_path):
    users = tmp_path / "users.toml"
    out = _studio("adduser", "alice", "--auth", str(users), "--password-stdin", stdin="pw-of-alice\n")
    assert out.returncode == 0, out.stderr
    assert authenticate(users, "alice", "pw-of-alice") and "pw-of-alice" not in users.read_text()
    out = _studio("adduser", "../bob", "--auth", str(users), "--password-stdin", stdin="x\n")
    assert out.returncode == 2 and "user name" in out.stderr


def test_adduser_takes_the_file_from_studio_auth(tmp_path):
    users = tmp_path / "from-config.toml"
    out = _studio("adduser", "carol", f"studio.auth={users}", "--password-stdin", stdin="pw\n")
    assert out.returncode == 0, out.stderr
    assert authenticate(users, "carol", "pw")


def test_without_users_the_studio_refuses_to_listen_beyond_loopback(tmp_path):
    out = _studio("studio.host=0.0.0.0", f"studio.store={tmp_path}/store", f"studio.log_file={tmp_path}/log")
    assert out.returncode == 2
    assert "studio.host=0.0.0.0 needs studio.auth" in out.stderr


def test_a_users_file_that_cannot_be_read_stops_the_studio_at_start(tmp_path):
    """Else it would start and answer every request, sign-ins included, with an error."""
    users = tmp_path / "users.toml"
    users.write_text('[users."alice"]\npassword = \n')
    out = _studio(f"studio.auth={users}", f"studio.store={tmp_path}/store", f"studio.log_file={tmp_path}/log")
    assert out.returncode == 2 and f"studio.auth={users}: cannot be read" in out.stderr, out.stderr


def test_a_studio_typo_exits_2_naming_it():
    out = _studio("studio.prot=8080")
    assert out.returncode == 2 and "studio.prot" in out.stderr


@pytest.mark.integration
def test_with_the_cluster_down_the_pages_say_so_and_nothing_is_lost(tmp_path, media_dir):
    """The cluster does not answer: the studio still serves, /health and the page say why, and a
    campaign made meanwhile is kept, 'not submitted', to be submitted once the cluster is back."""
    import httpx
    from gradio_client import Client

    uploads = tmp_path / "uploads"  # Gradio's upload cache: a private folder of this account
    uploads.mkdir(mode=0o700)
    studio, url = _offline_studio(tmp_path, GRADIO_TEMP_DIR=str(uploads))
    try:
        health = _health(studio, url)
        assert health.status_code == 200 and health.json()["cluster"] == "unreachable"
        # one local user: only loopback names reach it (a rebound DNS name does not)
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 400
        client = Client(url + "/app/", verbose=False, download_files=False)
        assert "does not answer" in client.predict(api_name="/whoami")
        # two pages of the one user pick the same files, uploaded once as a browser does (Gradio
        # keeps one copy of a file's content): the first page's campaign must not take them from
        # under the second
        http = httpx.Client(base_url=url)
        with open(media_dir / "speech3.wav", "rb") as audio, open(media_dir / "still.png", "rb") as avatar:
            sent = http.post("/app/gradio_api/upload", files=[("files", audio), ("files", avatar)])
        speech, still = ({"path": p, "meta": {"_type": "gradio.FileData"}} for p in sent.json())
        picked = [[speech], [still], None, "classic (no weights)", "standard"]  # files, manifest, model, quality
        assert "1 video(s)" in _page_event(http, "second-page", "check", picked[:3])
        text, opened = _page_event(http, "first-page", "create", ["offline", *picked], outputs=2)
        assert "saved, but not submitted" in text and "re-run it there" in text
        client = Client(url + "/app/", verbose=False, download_files=False)
        listing = client.predict(None, api_name="/refresh")[0]
        assert [(row[1], row[2]) for row in listing["data"]] == [("offline", "not submitted")]
        assert opened["value"] == listing["data"][0][0]  # opened on the Campaigns tab, to re-run
        text = _page_event(http, "second-page", "create", ["later", *picked])
        assert "saved, but not submitted" in text, text
        # in the store now: its uploads left the web server's cache, as a submitted campaign's do
        assert not [p.name for p in uploads.rglob("*") if p.suffix in (".wav", ".png")]
        # a stop (SIGTERM) waits for the Renders being saved, then ends cleanly, saying so (uvicorn
        # sent itself the signal again: the process died there, unsaid, its saves cut short)
        studio.terminate()
        assert studio.wait(60) == 0
        assert "stop saves_cut_short=0" in (tmp_path / "log").read_text()
    finally:
        studio.terminate()
        studio.wait(30)


def _offline_studio(tmp_path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`heygem-ray studio` with no users (one local user) and a cluster that does not answer."""
    port = _free_port()
    studio = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heygem_ray.cli",
            "studio",
            f"studio.port={port}",
            f"studio.store={tmp_path}/store",
            f"studio.log_file={tmp_path}/log",
            f"studio.session_key={tmp_path}/key",
            f"studio.ray_address=http://127.0.0.1:{_free_port()}",
        ],
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "GRADIO_ANALYTICS_ENABLED": "False", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return studio, f"http://127.0.0.1:{port}"


def _health(studio: subprocess.Popen[str], url: str):
    """The studio's /health answer, once it listens."""
    import httpx

    deadline = time.time() + 90
    while True:
        try:
            return httpx.get(url + "/health", timeout=2)
        except httpx.HTTPError:
            assert studio.poll() is None and time.time() < deadline, studio.stdout.read() if studio.stdout else ""
            time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("runuser"),
    reason="acting as another account of the host needs root and runuser",
)
def test_another_account_on_the_host_is_refused_though_it_reaches_loopback(tmp_path):
    """A one-user studio (no studio.auth) listens on 127.0.0.1, which every account of the host
    reaches: a connection from another account's process is refused, whatever client it names."""
    import httpx

    studio, url = _offline_studio(tmp_path)
    port = url.rsplit(":", 1)[1]
    try:
        assert _health(studio, url).status_code == 200
        for header in ("", "X-Forwarded-For: 10.0.0.1\\r\\n"):  # a header naming another client
            fetch = (
                f"exec 3<>/dev/tcp/127.0.0.1/{port}; "
                f"printf 'GET /app/ HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n{header}\\r\\n' >&3; head -1 <&3"
            )
            other = subprocess.run(
                ["runuser", "-u", "nobody", "--", "bash", "-c", fetch], capture_output=True, text=True, timeout=60
            )
            assert other.stdout.startswith("HTTP/1.1 403"), header + other.stdout + other.stderr
        # this account's own request is served
        assert httpx.get(url + "/app/", timeout=30).status_code == 200
    finally:
        studio.terminate()
        studio.wait(30)


def _page_event(http, page: str, api_name: str, data: list, outputs: int = 1):
    """One event of the page `page` (its Gradio session), as a browser sends it: the first output
    of its answer (a tuple of the first `outputs` where more than one)."""
    import json

    config = http.get("/app/config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    joined = http.post("/app/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": page})
    assert joined.status_code == 200, joined.text
    with http.stream("GET", "/app/gradio_api/queue/data", params={"session_hash": page}, timeout=60) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                assert message["success"], message
                answer = message["output"]["data"]
                return answer[0] if outputs == 1 else tuple(answer[:outputs])
    raise AssertionError(f"{api_name}: no answer")


def test_a_job_server_that_never_answers_does_not_hang_the_studio(monkeypatch):
    """A head that accepts connections but never answers (overloaded, half up): each call gives up
    after the studio's timeout and says the cluster does not answer."""
    import socket

    from heygem_ray.studio import cluster

    monkeypatch.setattr(cluster, "TIMEOUT", (1.0, 1.0))
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        silent_head = cluster.Cluster(address, local=False)
        start = time.monotonic()
        with pytest.raises(cluster.ClusterUnavailable, match="does not answer"):
            silent_head.job("campaign-1")
        assert time.monotonic() - start < 10
        assert not cluster._answers(address)
        # asked again at once (a page's refresh asks after each of its campaigns' jobs): not sent,
        # rather than each waiting out the timeout
        start = time.monotonic()
        for job in range(20):
            with pytest.raises(cluster.NotReached, match="does not answer"):
                silent_head.job(f"campaign-{job}")
        assert time.monotonic() - start < 5  # 20 timeouts would take 20 s


def test_health_and_page_loads_answer_at_once_while_a_silent_head_is_asked(monkeypatch):
    """`problem` (every page load and /health) asks the cluster now and then; while one call waits
    on a head that takes connections but never answers, the others have the last answer at once,
    not after the timeout (a liveness probe would restart the studio in a loop)."""
    import socket
    import threading

    from heygem_ray.studio import cluster

    monkeypatch.setattr(cluster, "TIMEOUT", (1.0, 3.0))
    monkeypatch.setattr(cluster, "QUIET_SECONDS", 0.0)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        head = cluster.Cluster(f"http://127.0.0.1:{silent.getsockname()[1]}", local=False)
        # the first answer: pages opened at once wait for one request, not one each
        calls: list[str] = []
        call = head._call
        monkeypatch.setattr(head, "_call", lambda method, *a, **k: calls.append(method) or call(method, *a, **k))
        answers: list[str | None] = []
        opened = [threading.Thread(target=lambda: answers.append(head.problem()), daemon=True) for _ in range(4)]
        for page in opened:
            page.start()
        for page in opened:
            page.join(30)
            assert not page.is_alive()
        first = answers[0]
        assert calls == ["get_version"] and answers == [first] * 4
        assert first and "does not answer" in first
        monkeypatch.setattr(cluster, "PROBLEM_SECONDS", 0.0)  # from now on, each call may ask
        # one call held on the head (by an event, not by seconds a loaded machine may not keep to)
        entered, release = threading.Event(), threading.Event()

        def held(method: str, *a: object, **k: object) -> object:
            entered.set()
            release.wait(60)
            raise cluster.ClusterUnavailable("the head did not answer")

        monkeypatch.setattr(head, "_call", held)
        asking = threading.Thread(target=head.problem, daemon=True)
        asking.start()
        assert entered.wait(30)
        answers = []
        other = threading.Thread(target=lambda: answers.append(head.problem()), daemon=True)
        try:
            other.start()
            other.join(30)  # had it waited on the held call, it would still be waiting
            assert not other.is_alive() and answers == [first]
        finally:
            release.set()
            asking.join(30)


def test_a_ray_command_that_fails_says_why_in_rays_words():
    """The studio's own head not starting (a port taken, a Ray without the command): Ray's message,
    as ClusterUnavailable (`serve` prints it and exits 2), not a traceback without it."""
    import sys

    from heygem_ray.studio import cluster

    failing = [sys.executable, "-c", "import sys; sys.stderr.write('ConnectionError: port 6379 is taken'); sys.exit(3)"]
    with pytest.raises(cluster.ClusterUnavailable, match=r"could not start it \(exit status 3\): .*6379 is taken"):
        cluster._ray(failing, "start it")
    with pytest.raises(cluster.ClusterUnavailable, match="could not start it: .*no-such-ray"):
        cluster._ray(["/no-such-ray", "start"], "start it")


def test_campaign_jobs_run_from_an_installed_studio_too(tmp_path, monkeypatch):
    """The job's entrypoint was found beside the package (a checkout's jobs/): a studio installed
    as a package (the image) could not submit. A local head runs the studio's own Python and
    package; a remote one gets the checkout, with the excludes that keep users files and keys
    home, or runs its own package when there is none."""
    import sys
    from pathlib import Path

    from heygem_ray.studio import cluster

    entrypoint, env = cluster.job_spec(True, None)
    assert entrypoint == [sys.executable, "-m", "heygem_ray.cli", "render"] and "working_dir" not in env
    entrypoint, env = cluster.job_spec(False, None)
    assert entrypoint[1:] == ["-m", "heygem_ray.cli", "render"] and "working_dir" not in env
    repository = cluster.checkout()
    assert repository == Path(__file__).resolve().parents[1]  # the tests run from a checkout
    entrypoint, env = cluster.job_spec(False, repository)
    assert entrypoint == ["python", "jobs/render_campaign.py"] and env["working_dir"] == str(repository)
    assert {"users.toml", "*.key"} <= set(env["excludes"])
    monkeypatch.setattr(cluster, "CHECKOUT", tmp_path)  # site-packages: no jobs/, no infra/
    assert cluster.checkout() is None


def test_a_finished_jobs_log_shows_its_last_lines(monkeypatch):
    """A running job's log tail is read at most every LOG_SECONDS; once the job has ended, the
    tail read after its end is kept for good (a tail read while it ran was kept for good, and
    the failure's traceback never showed)."""
    from types import SimpleNamespace

    from heygem_ray.studio import cluster

    job = {"status": "RUNNING", "log": "rendering row 1"}

    def answer(method: str, *args: object, **kwargs: object) -> object:
        if method == "get_job_info":
            return SimpleNamespace(status=job["status"], start_time=1000)
        return job["log"]

    head = cluster.Cluster("http://127.0.0.1:9", local=True)
    monkeypatch.setattr(head, "_call", answer)
    assert head.job("j")[0] == "RUNNING" and head.logs("j") == "rendering row 1"
    job.update(status="FAILED", log="rendering row 1\nTraceback: it broke")
    assert head.logs("j") == "rendering row 1"  # within LOG_SECONDS: the tail read just now
    monkeypatch.setattr(cluster, "LOG_SECONDS", 0.0)
    assert head.job("j")[0] == "FAILED"
    assert head.logs("j").endswith("it broke")
    job["log"] = "changed after the end"  # cannot happen: kept
    assert head.logs("j").endswith("it broke")
    # a running job's long log (a line a row, 100,000 rows) is read again less often, as it grows
    from helpers import HandClock

    clock = HandClock()
    monkeypatch.setattr(cluster, "time", clock)
    monkeypatch.setattr(cluster, "LOG_SECONDS", 10.0)
    job.update(status="RUNNING", log="x" * (3 * cluster.LOG_BYTES) + "\nrow 1")
    assert head.job("k")[0] == "RUNNING" and head.logs("k").endswith("row 1")
    job["log"] += "\nrow 2"
    clock.now += 20.0
    assert head.logs("k").endswith("row 1")  # 3 MiB: read again after 30 s, not 10 s
    clock.now += 11.0
    assert head.logs("k").endswith("row 2")


def test_the_studio_refuses_an_image_that_would_decode_past_8k_by_8k(tmp_path):
    """OpenCV reads its decoder's limit once, as it loads: `heygem-ray studio` sets it before, so an
    upload that decodes to gigabytes is refused instead of taking the web server down (its own
    variable, OPENCV_IO_MAX_IMAGE_PIXELS: another name had been set, too late, and nothing held)."""
    import cv2
    import numpy as np

    big, fine = tmp_path / "big.png", tmp_path / "fine.png"
    cv2.imwrite(str(big), np.zeros((8200, 8200, 3), np.uint8))  # a few hundred KiB, 200 MB decoded
    cv2.imwrite(str(fine), np.zeros((64, 64, 3), np.uint8))
    probe = (
        "import sys\n"
        "from heygem_ray import cli\n"
        "cli.limit_studio_images()  # as `heygem-ray studio` does first\n"
        "from heygem_ray.studio.store import UploadError, check_upload\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        print(check_upload(path, 'avatar', 2**30))\n"
        "    except UploadError as exc:\n"
        "        print('refused:', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(big), str(fine)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: big.png") and lines[1] == "fine.png", lines


@pytest.mark.parametrize("mode", [None, "token", "disabled"])
def test_the_local_head_and_the_studios_client_agree_on_tokens(tmp_path, mode):
    """A token made by an earlier `ray.init` (the demo's) turned the studio's own head to tokens
    while its client sent none: `heygem-ray studio` could not reach its head. Now both use a token
    (made if missing, readable by its owner only) unless the operator chose otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)
    if mode:
        env["RAY_AUTH_MODE"] = mode
    code = (
        "import os; from heygem_ray.studio.cluster import local_auth, Path; import sys\n"
        "local_auth(str(Path(sys.executable).with_name('ray')))\n"
        "print(os.environ.get('RAY_AUTH_MODE'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    token = tmp_path / ".ray" / "auth_token"
    if mode == "disabled":
        assert out.stdout.split()[-1] == "disabled" and not token.exists()
    else:
        assert out.stdout.split()[-1] == "token"
        assert token.is_file() and token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) >= 32


@pytest.mark.parametrize("port", ["studio.port=99999", "studio.dashboard_port=0"])
def test_a_port_no_server_can_take_is_refused_before_anything_starts(port, capsys):
    """`studio.port=99999` printed the studio's address, then ended in an OverflowError traceback
    (and, without `studio.ray_address`, after starting a local Ray head that outlived it)."""
    from heygem_ray.cli import studio_main

    assert studio_main([port]) == 2
    assert f"{port.split('=')[0]} must be within 1 .. 65535" in capsys.readouterr().err
