"""The studio's side of the Ray cluster: campaigns go in as Ray jobs (the Ray Jobs SDK, entrypoint
`heygem-ray render`) and are asked about, stopped and re-run by their submission ids. With
no address the studio uses a local Ray head it starts itself, or one already running, which
outlives the studio: campaigns go on while it restarts."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from heygem_ray.config import ClusterConfig
from heygem_ray.storage import display

log = logging.getLogger("heygem_ray.studio")

#: where the studio's checkout would be (an editable install); an installed package has none
CHECKOUT = Path(__file__).resolve().parents[2]
#: seconds a running job's log tail is shown before the job server is asked again, for each
#: LOG_BYTES of the log (the server sends all of it: a 100,000-row campaign's is ~15 MB)
LOG_SECONDS = 10.0
LOG_BYTES = 2**20
#: log tails kept (one per job the pages have shown)
LOGS_KEPT = 256
#: Ray job states that will not change again
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: seconds to connect to the job server, and to wait for each of its answers: a head that accepts
#: connections but never answers must not hang the studio's pages (requests waits forever by default)
TIMEOUT = (5.0, 30.0)


class ClusterUnavailable(RuntimeError):
    """The cluster does not answer, or answers with an error: the studio says so on its pages
    instead of failing, and takes nothing it was not told for an answer (a job whose state the
    cluster did not give may still run)."""

    #: the campaign `Studio.create` saved before its submit met this: the page opens it, to re-run
    saved: str | None = None


class NotReached(ClusterUnavailable):
    """No connection to the job server was made: the request (a submit) surely did not reach it."""


class Refused(ClusterUnavailable):
    """The job server answered the request with a client error (4xx): it took nothing."""


class JobUnknown(RuntimeError):
    """The job server's own answer that it has no such job: a restarted head forgot it, or the
    submit never reached it. Nothing of that job runs."""


def local_head(dashboard_port: int) -> tuple[str, bool]:
    """The address of the local Ray head's job server, starting a head (with the dashboard, on
    127.0.0.1 only) when none answers; and whether it was started now. The head is a set of
    background processes of its own: `ray stop` ends it."""
    ray = Path(sys.executable).with_name("ray")
    ray_command = str(ray) if ray.exists() else "ray"
    local_auth(ray_command)
    address = f"http://127.0.0.1:{dashboard_port}"
    if _answers(address):
        return address, False
    _ray(head_command(ray_command, dashboard_port), "start a local Ray head")
    deadline = time.time() + 60
    while not _answers(address):
        if time.time() > deadline:
            raise ClusterUnavailable(f"a local Ray head was started but its job server at {address} does not answer")
        time.sleep(0.5)
    return address, True


def head_command(ray_command: str, dashboard_port: int) -> list[str]:
    """`ray start` for the studio's local head."""
    return [
        ray_command,
        "start",
        "--head",
        # the dashboard and its Jobs API on loopback (Ray's own ports listen on every interface:
        # `local_auth`'s token keeps them to the studio's account)
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        # as the CLI's own local Ray: prepare/stitch tasks share the actors' cores (on 2 cores a
        # campaign gets 2 renderer actors, not 1 beside an idle core)
        f"--num-cpus={ClusterConfig().local_cpus()}",
    ]


def local_auth(ray_command: str = "ray") -> None:
    """Token authentication for the local head and this process's client, unless the operator set
    RAY_AUTH_MODE otherwise. Left to Ray, they disagree once a token exists (and `ray.init`, the
    demo's, makes one): `ray start` then turns tokens on, while a client without RAY_AUTH_MODE
    sends none, and the studio could never reach its own head. Its jobs run as the studio's
    account with every user's files in reach: a token keeps other accounts on the host out. Before
    Ray is imported here (it reads the mode once)."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return
    _ray(
        [ray_command, "get-auth-token", "--generate"],
        "make the local Ray's token",
        {**os.environ, "RAY_AUTH_MODE": "token"},
    )
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)  # Ray writes it readable by every account
    os.environ["RAY_AUTH_MODE"] = "token"


def _ray(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a `ray` command; ClusterUnavailable with Ray's own words when it fails (a port taken,
    a Ray without the command), not a traceback without them."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=120)
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip().splitlines()[-8:]
        raise ClusterUnavailable(f"could not {what} (exit status {exc.returncode}): " + "\n".join(said)) from None
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"could not {what}: `{' '.join(command[:2])}` took over 120 s") from None
    except OSError as exc:  # no `ray` on the PATH
        raise ClusterUnavailable(f"could not {what}: {exc}") from None


def _answers(address: str) -> bool:
    try:
        _client(address).list_jobs()
    except Exception:  # noqa: BLE001 - any failure means: not there (yet)
        return False
    return True


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    class TimedClient(JobSubmissionClient):
        """Ray's client, with TIMEOUT on every request (it has no option of its own for one)."""

        def _do_request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", TIMEOUT)
            return super()._do_request(*args, **kwargs)

    return TimedClient(address)


#: how long `Cluster.problem`'s answer is kept
PROBLEM_SECONDS = 5.0
#: how long after its submit a job the cluster does not know is asked about again (its submit's
#: answer lost, it may not be in yet), not taken for forgotten
RECENT_SECONDS = 600.0


#: seconds the studio asks nothing of a cluster that did not answer: each ask waits up to TIMEOUT,
#: and a page listing 50 campaigns asked after each job in turn, minutes a refresh
QUIET_SECONDS = 10.0


class Cluster:
    """Campaign jobs on one Ray cluster. `local`: the head runs on this machine, so the job's
    driver runs this studio's Python and reads this checkout; a remote head gets the checkout
    uploaded as the job's working directory (with infra/runtime_env.yaml)."""

    def __init__(self, address: str, local: bool):
        self.address, self.local = address, local
        self.shown = display(address)  # the address in pages and logs: without credentials in it
        self._jobs: Any = None
        self._ended: dict[str, tuple[str, float | None]] = {}
        self._unknown: set[str] = set()  # jobs the cluster answered it does not know (`job`)
        # when each job was submitted lately (time.time(): by this studio, or by one before its
        # restart, as the campaign's record says: `note_submitted`)
        self._submitted: dict[str, float] = {}
        # log tails: when to read them again (time.monotonic), and whether the job had ended before
        # they were read (page threads share them: `_logs_lock`)
        self._logs: dict[str, tuple[str, float, bool]] = {}  # job -> (its tail, read again after, ended)
        self._logs_lock = threading.Lock()
        self._checked: tuple[float, str | None] | None = None  # the last `problem` answer, and when
        self._checked_lock = threading.Condition()
        self._checking = False  # a `problem` call is asking the cluster
        self._quiet: tuple[float, str] = (-math.inf, "")  # asked no more until then (monotonic), and why

    @property
    def client(self) -> Any:
        if self._jobs is None:
            try:
                self._jobs = _client(self.address)
            except Exception as exc:  # noqa: BLE001 - connection refused, bad address, auth
                raise NotReached(f"the Ray cluster at {self.shown} does not answer ({_reason(exc)})") from None
        return self._jobs

    def problem(self) -> str | None:
        """Why the cluster cannot take campaigns now (None: it answers). Asked again after
        PROBLEM_SECONDS: a head that went away after the first connection is seen as gone, and a
        burst of page loads or health checks costs one request to the cluster. While one caller
        asks, the others have the last answer at once: a head that takes connections but does not
        answer held every page load and health probe for the whole timeout. Before any answer, the
        callers wait for the first caller's: one request however many pages open at once."""
        with self._checked_lock:
            while self._checked is None and self._checking:
                self._checked_lock.wait()
            checked = self._checked
            if checked is not None and (self._checking or time.monotonic() - checked[0] < PROBLEM_SECONDS):
                return checked[1]
            self._checking = True
        problem: str | None = "the cluster was not asked"
        try:
            self._call("get_version")
            problem = None
        except ClusterUnavailable as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - an answer that is not the job server's
            problem = f"the Ray cluster at {self.shown} answers oddly: {type(exc).__name__}: {exc}"
        finally:
            with self._checked_lock:
                self._checked, self._checking = (time.monotonic(), problem), False
                self._checked_lock.notify_all()
        return problem

    def submit(self, submission_id: str, overrides: list[str], metadata: dict[str, str]) -> str:
        self.note_submitted(submission_id, time.time())
        entrypoint, runtime_env = job_spec(self.local, checkout())
        command = " ".join(_quote(part) for part in [*entrypoint, *overrides])
        return self._call(
            "submit_job",
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata=metadata,
        )

    def note_submitted(self, submission_id: str, at: float) -> None:
        """That the job was submitted at `at` (time.time()), by this studio or, as its campaign's
        record says, by the one before a restart: a submit whose answer was lost is not taken for
        a forgotten job while it may still come in."""
        now = time.time()
        if now - at < RECENT_SECONDS and submission_id not in self._submitted:
            self._submitted = {job: t for job, t in self._submitted.items() if now - t < RECENT_SECONDS}
            self._submitted[submission_id] = at

    def submitted_lately(self, submission_id: str) -> bool:
        """Whether the job was submitted within RECENT_SECONDS (`note_submitted`): a submit whose
        answer was lost may yet start it, though the cluster does not know it now."""
        return time.time() - self._submitted.get(submission_id, -math.inf) < RECENT_SECONDS

    def job(self, submission_id: str) -> tuple[str, float | None]:
        """A job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and when its driver started
        (time.time(); None before). Raises JobUnknown for a job the cluster does not know. A
        job that ended is remembered: its state will not change; so is one the cluster does not
        know (a restarted head forgot it, and submission ids are never used again): a user's
        every old campaign was asked about again at each admission and listing."""
        if submission_id in self._ended:
            return self._ended[submission_id]
        if submission_id in self._unknown:
            raise JobUnknown(f"the Ray cluster at {self.shown} does not know job {submission_id}")
        try:
            info = self._call("get_job_info", submission_id)
        except JobUnknown:
            # not for a job submitted lately: a submit whose answer was lost may not be in yet
            if not self.submitted_lately(submission_id):
                self._unknown.add(submission_id)
            raise
        state = str(info.status).split(".")[-1]
        started = info.start_time / 1000 if info.start_time else None
        if state in FINAL:
            self._ended[submission_id] = (state, started)
        return state, started

    def logs(self, submission_id: str, last_lines: int = 60) -> str:
        """The last lines of a job's log: kept once the job has ended (it will not change), and while
        it runs for LOG_SECONDS per LOG_BYTES of it (the job server sends the whole log, and every
        page polls it). A job seen ending since its tail was read is read again at once: its last
        lines (a traceback) are what its user wants."""
        with self._logs_lock:
            kept = self._logs.get(submission_id)
        ended = submission_id in self._ended  # before the read: a tail read then is the last one
        if kept is not None and (kept[2] or (not ended and time.monotonic() < kept[1])):
            return kept[0]
        text: str = self._call("get_job_logs", submission_id)
        tail = _ANSI.sub("", "\n".join(text[-LOG_BYTES:].splitlines()[-last_lines:]))  # Ray colours its lines
        again = time.monotonic() + LOG_SECONDS * max(1.0, len(text) / LOG_BYTES)
        with self._logs_lock:
            self._logs.pop(submission_id, None)
            self._logs[submission_id] = (tail, again, ended)  # newest last: the oldest go past LOGS_KEPT
            while len(self._logs) > LOGS_KEPT:
                del self._logs[next(iter(self._logs))]
        return tail

    def stop(self, submission_id: str) -> bool:
        return bool(self._call("stop_job", submission_id))

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The job server's answer to `method`. Its "no such job" (a 404 naming the job in `args`)
        raises JobUnknown; any other error answer (a 5xx from the head or a proxy before it, a
        refused submit) and no answer at all raise ClusterUnavailable: the studio must not take a
        running job for a forgotten one and delete its campaign under it."""
        # what pages ask (states, logs) waits out a quiet spell; a user's submit or cancel is sent
        asking = method.startswith("get_")
        until, why = self._quiet
        if asking and time.monotonic() < until:  # not sent: it surely did not reach the cluster
            raise NotReached(why)
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except NotReached as exc:  # the client could not be made: no answer to its first request
            if asking:
                self._quiet = (time.monotonic() + QUIET_SECONDS, f"{exc} (asked again in a few seconds)")
            raise
        except ClusterUnavailable:
            raise
        except OSError as exc:  # requests' connection errors are OSErrors
            unreached = NotReached if _not_connected(exc) else ClusterUnavailable
            why = f"the Ray cluster at {self.shown} does not answer ({_reason(exc)})"
            if asking:
                self._quiet = (time.monotonic() + QUIET_SECONDS, f"{why} (asked again in a few seconds)")
            raise unreached(why) from None
        except RuntimeError as exc:  # the SDK's error for any answer but 200
            job = args[0] if args else None
            if job and "status code 404" in str(exc) and f"Job {job} does not exist" in str(exc):
                raise JobUnknown(f"the Ray cluster at {self.shown} does not know job {job}") from None
            status = re.search(r"status code (\d{3})", str(exc))
            if status is None and method == "submit_job":  # the SDK's own, before the job's request
                raise NotReached(f"the job could not be sent to the Ray cluster at {self.shown}: {exc}") from None
            error = Refused if status and 400 <= int(status.group(1)) < 500 else ClusterUnavailable
            raise error(f"the Ray cluster at {self.shown} answered with an error: {exc}") from None
        except Exception as exc:
            if method != "submit_job":
                raise
            if isinstance(exc, ValueError):  # the SDK's checks before any request (a working directory too large)
                raise NotReached(f"the job could not be sent to the Ray cluster at {self.shown}: {exc}") from None
            # after the job server may have taken it (its answer read: a TypeError, a KeyError): asked after
            raise ClusterUnavailable(
                f"the Ray cluster at {self.shown} answered oddly: {type(exc).__name__}: {exc}"
            ) from None


def _not_connected(exc: OSError) -> bool:
    """Whether `exc` (from requests) failed before a connection was made: refused, no route, a
    name that does not resolve, a connect timeout. Anything later (a read timeout, a connection
    dropped mid-answer) may come after the server took the request."""
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.exceptions.ConnectionError) and isinstance(reason, NewConnectionError)


def checkout() -> Path | None:
    """The repository the studio runs from, or None for an installed package (the image)."""
    found = (CHECKOUT / "jobs" / "render_campaign.py").is_file() and (CHECKOUT / "infra" / "runtime_env.yaml").is_file()
    return CHECKOUT if found else None


def job_spec(local: bool, repository: Path | None) -> tuple[list[str], dict[str, Any]]:
    """A campaign job's entrypoint and runtime env. A local head runs the driver with the studio's
    own Python and package; a remote one gets `repository` uploaded as the job's working directory
    (infra/runtime_env.yaml, whose excludes keep users files and keys out), so jobs run the code and
    configs the studio shows; without one (an installed studio) the cluster's own package runs."""
    plain: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if local:
        return [sys.executable, "-m", "heygem_ray.cli", "render"], plain
    if repository is None:
        return ["python", "-m", "heygem_ray.cli", "render"], plain
    runtime_env = yaml.safe_load((repository / "infra" / "runtime_env.yaml").read_text()) or {}
    runtime_env["working_dir"] = str(repository)
    return ["python", "jobs/render_campaign.py"], runtime_env


def _quote(part: str) -> str:
    import shlex

    return shlex.quote(part)


#: a terminal's colour and style codes, which Ray writes into a job's log (shown as "�[1m" on a page)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _reason(exc: BaseException) -> str:
    """Why a request reached no job server, in a few words for a page: requests' own text is a
    Python repr of a pool, its retries and a socket ("HTTPConnectionPool(host=...): Max retries
    exceeded with url: ... (Caused by NewConnectionError(...))")."""
    text = str(exc).lower()
    for needle, reason in (
        ("refused", "connection refused"),
        ("timed out", "no answer in time"),
        ("name or service not known", "its host name is not known"),
        ("nodename nor servname", "its host name is not known"),
        ("no route to host", "no route to its host"),
        ("reset by peer", "the connection was reset"),
        ("failed to connect", "no connection"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
