"""Transient storage errors are retried with backoff; permanent ones are not. The fault is real:
a TCP proxy on loopback in front of the S3 endpoint drops every connection during an outage."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import urllib.parse

import boto3
import numpy as np
import pytest

from heygem_ray import storage


class FlakyProxy:
    """Forwards TCP to `target`; until `down_until` (or for the next `drop_next` connections) it
    accepts and immediately resets connections, or (`answer`) answers each request with that HTTP
    status, as a load balancer in front of a store does when the store is away."""

    def __init__(self, target: str):
        parsed = urllib.parse.urlparse(target)
        self.target = (parsed.hostname, parsed.port)
        self.down_until = 0.0
        self.drop_next = 0
        self.answer: int | None = None
        self.dropped = 0
        self.bytes_to_client = 0  # what the store sent back, through the proxy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if self.drop_next > 0 or time.time() < self.down_until:
                self.drop_next = max(0, self.drop_next - 1)
                if self.answer is not None:
                    client.settimeout(2.0)
                    with contextlib.suppress(OSError):
                        request = client.recv(65536)  # the request's head
                        reason = b"Bad Gateway" if self.answer == 502 else b"Error"
                        # no body after a HEAD's answer (the client refuses one, for another reason than the status)
                        body = b"" if request.startswith(b"HEAD") else b"<html>upstream away</html>"
                        head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                        client.sendall(head % (self.answer, reason, len(body)) + body)
                    client.close()
                else:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    client.close()  # RST: "connection reset by peer"
                self.dropped += 1
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, b is client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if to_client:  # counted first: the client may be done, and the test on, once it is sent
                    self.bytes_to_client += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def flaky_s3(s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="flaky")
    proxy = FlakyProxy(s3_endpoint)
    storage.configure({"s3": {"endpoint_url": proxy.url}})
    yield proxy
    storage.configure(None)
    proxy.close()


def test_an_outage_is_ridden_out_with_backoff(flaky_s3, s3_endpoint, caplog):
    # by count, not by seconds: a loaded machine may spend an outage's seconds making the client
    flaky_s3.drop_next = 3
    with caplog.at_level(logging.WARNING, logger="heygem_ray"):
        storage.write_bytes("s3://flaky/out/result.bin", b"payload")
    assert flaky_s3.drop_next == 0 and flaky_s3.dropped == 3  # refused three times, then written
    assert "try 2 of" in caplog.text  # each retry says so (what the permanent-error test looks for)
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket="flaky", Key="out/result.bin")["Body"].read()
    assert body == b"payload"
    flaky_s3.drop_next = 2
    assert storage.read_bytes("s3://flaky/out/result.bin") == b"payload"
    assert flaky_s3.drop_next == 0


def test_permanent_errors_fail_at_once(flaky_s3, caplog):
    with caplog.at_level(logging.WARNING, logger="heygem_ray"), pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://flaky/never/written.bin")
    assert "try 2 of" not in caplog.text  # not tried again (a retry says so, and sleeps first)


def test_an_outage_longer_than_the_retries_is_reported(flaky_s3, monkeypatch):
    """One layer of retries: each of ours is one request that neither botocore nor s3fs tries again
    (the HTTP client may open a second connection for it; with botocore's defaults it was 10)."""
    monkeypatch.setattr(storage, "RETRIES", 3)
    flaky_s3.down_until = time.time() + 60
    with pytest.raises(OSError) as err:  # what steps that must not stop the campaign catch
        storage.exists("s3://flaky/anything")
    assert storage.is_transient(err.value)
    assert 3 <= flaky_s3.dropped <= 2 * 3


def test_a_client_error_that_is_no_oserror_is_raised_as_one_after_the_last_try(monkeypatch):
    """botocore's and aiohttp's connection errors are not OSErrors: past the retries they become a
    StorageUnavailable (an OSError, still transient) with the client's error as its cause, so the
    progress feed, the results table and the output lock's heartbeat let one failed write pass."""
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "_BACKOFF", 0.01)
    calls = []

    @storage.retrying
    def unreachable(uri: str) -> None:
        calls.append(uri)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(storage.StorageUnavailable) as err:
        unreachable("s3://bucket/key")
    assert isinstance(err.value, OSError) and storage.is_transient(err.value)
    assert isinstance(err.value.__cause__, EndpointConnectionError) and len(calls) == 2
    assert "EndpointConnectionError" in str(err.value)


def _s3_answer(status: int, code: str) -> BaseException:
    """What s3fs raises for an S3 answer: its own translation of botocore's ClientError."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(
        ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )
    )


def _http_answer(status: int) -> BaseException:
    import aiohttp

    return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]


def _cut_short() -> list[BaseException]:
    import http.client

    from botocore.exceptions import HTTPClientError, ResponseStreamingError

    return [ResponseStreamingError(error="reset"), HTTPClientError(error="reset"), http.client.IncompleteRead(b"")]


@pytest.mark.parametrize(
    "exc, transient",
    [
        (OSError(16, "SlowDown"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (OSError(22, "Invalid"), False),
        (ValueError(), False),
        # answers s3fs has no name for come as EIO: their status decides
        (_s3_answer(502, "BadGateway"), True),
        (_s3_answer(504, "GatewayTimeout"), True),
        (_s3_answer(429, "TooManyRequests"), True),
        (_s3_answer(501, "NotImplemented"), False),
        (_s3_answer(403, "AccessDenied"), False),
        (_s3_answer(404, "NoSuchKey"), False),
        (_http_answer(503), True),  # an https input's server
        (_http_answer(404), False),
        *((exc, True) for exc in _cut_short()),  # a response cut off midway (s3fs's own retries are off)
    ],
)
def test_transient_classification(exc, transient):
    assert storage.is_transient(exc) is transient


def test_a_load_balancer_answering_502_is_ridden_out(flaky_s3):
    """A proxy in front of the store (MinIO, Ceph behind nginx) answers 502 while the store restarts:
    s3fs names no such answer, and it was taken for a permanent error."""
    storage.write_bytes("s3://flaky/lb.bin", b"payload")
    flaky_s3.answer, flaky_s3.drop_next = 502, 2
    assert storage.read_bytes("s3://flaky/lb.bin") == b"payload"
    assert flaky_s3.dropped == 2 and flaky_s3.drop_next == 0


def test_a_renderer_whose_weights_the_store_could_not_give_loads_them_again(
    flaky_s3, recipe_checkpoints, monkeypatch, tmp_path
):
    """An outage longer than the store's own retries while an actor loads its model must not retire
    the actor for the campaign (every actor starts at once: one blip would fail every row). A
    missing checkpoint is not tried again."""
    from helpers import compose_config
    from heygem_ray import segment
    from heygem_ray.errors import RendererStartError

    with open(recipe_checkpoints["wav2lip"], "rb") as fh:
        storage.write_bytes("s3://flaky/models/wav2lip_gan.pth", fh.read())
    monkeypatch.setattr(storage, "RETRIES", 1)  # the store's own retries spent at once
    monkeypatch.setattr(segment, "MODEL_LOAD_BACKOFF_SECONDS", 1.0)
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "node-cache"))  # fetched, not a node's copy

    def worker(checkpoint: str) -> segment.RenderWorker:
        overrides = [
            "renderer=wav2lip",
            f"renderer.checkpoint={checkpoint}",
            "cluster.actor.threads=1",
            f"+storage.options.s3.endpoint_url={flaky_s3.url}",  # the actor sets the campaign's options
        ]
        return segment.RenderWorker(compose_config("manifest=m", "output=o", *overrides))

    flaky_s3.drop_next = 2  # by count: a loaded machine may take the outage's seconds to build the worker
    down = worker("s3://flaky/models/wav2lip_gan.pth")
    assert down.start_error is not None  # the store was down
    assert down.ready().codec == "libx264"  # tried again after 1 s (still down), then 2 s
    assert down.start_error is None and flaky_s3.dropped == 2 and flaky_s3.drop_next == 0
    monkeypatch.setattr(segment, "MODEL_LOAD_BACKOFF_SECONDS", 60.0)  # a second try would wait a minute
    started = time.time()
    with pytest.raises(RendererStartError, match="not found"):
        worker("s3://flaky/models/absent.pth").ready()
    assert time.time() - started < 30.0


def test_a_segments_audio_is_read_as_a_range_not_the_store_s_read_ahead(flaky_s3):
    """Each segment reads its second or so of the row's decoded narration: an opened s3fs file
    read ahead up to 50 MiB, the whole narration for each of its segments (hours of traffic for a
    long one)."""
    from heygem_ray.prepare import read_pcm

    samples = np.arange(5_000_000, dtype="<f4")  # 20 MB: 5 minutes of 16 kHz audio
    storage.write_bytes("s3://flaky/cache/audio/row.f32", samples.tobytes())
    flaky_s3.bytes_to_client = 0
    window = read_pcm("s3://flaky/cache/audio/row.f32", 1_000_000, 1_016_000)
    assert np.array_equal(window, samples[1_000_000:1_016_000])
    assert flaky_s3.bytes_to_client < 200_000, flaky_s3.bytes_to_client  # 64 KB asked for
    assert len(read_pcm("s3://flaky/cache/audio/row.f32", 4_999_990, 5_000_100)) == 10  # the end


def test_a_new_narration_is_downloaded_once_to_be_hashed_and_decoded(flaky_s3, monkeypatch, tmp_path):
    """A row's first sight of an input hashes it (its fingerprint) and then decodes it: streamed to
    be hashed, it was downloaded twice. The node's copy serves both."""
    from heygem_ray import demo
    from heygem_ray.prepare import prepare_audio

    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "node-cache"))
    local = tmp_path / "narration.wav"
    demo.write_wav(str(local), demo.speech_like(20.0, seed=3))
    size = local.stat().st_size
    storage.write_bytes("s3://flaky/in/narration.wav", local.read_bytes())
    flaky_s3.bytes_to_client = 0
    audio = prepare_audio("s3://flaky/in/narration.wav", str(tmp_path / "cache"))
    assert audio.seconds == pytest.approx(20.0, abs=0.1)
    assert size < flaky_s3.bytes_to_client < 1.5 * size, (flaky_s3.bytes_to_client, size)


def test_a_studio_video_seek_reads_the_range_asked_for(flaky_s3):
    """A browser seeking in a video asks for a range: the studio opened the stored file, whose
    read-ahead fetched up to 50 MiB from the store for every seek (the studio's zip reads its
    videos so too)."""
    video = bytes(range(256)) * (20 * 4096)  # 20 MiB
    storage.write_bytes("s3://flaky/studio/alice/c1/output/r0.mp4", video)
    flaky_s3.bytes_to_client = 0
    start = 10 * 2**20
    assert (
        b"".join(storage.iter_range("s3://flaky/studio/alice/c1/output/r0.mp4", start, start + 300_000))
        == video[start : start + 300_000]
    )
    assert flaky_s3.bytes_to_client < 2**20, flaky_s3.bytes_to_client


def test_a_removal_the_store_answered_but_did_not_do_is_tried_again_then_raised(s3_endpoint, monkeypatch):
    """S3's batch delete answers 200 listing the keys it kept (InternalError, SlowDown, AccessDenied),
    and s3fs drops that list: a studio campaign deleted so lost its record but left videos no page
    shows, counted in its user's quota. What the store kept is tried again, then raised."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="keeps")
    for name in ("a.mp4", "b.mp4"):
        storage.write_bytes(f"s3://keeps/campaign/{name}", b"video")
    fs, _ = storage.url_to_fs("s3://keeps/campaign")
    kept = [1]  # how many more batch deletes keep b.mp4

    def the_store_keeps_b(params: dict, **_: object) -> None:
        if kept[0] > 0:
            kept[0] -= 1
            objects = params["Delete"]["Objects"]  # b.mp4's place taken by a key of nothing (none left: refused)
            params["Delete"]["Objects"] = [{"Key": "nothing"} if o["Key"].endswith("b.mp4") else o for o in objects]

    fs.s3.meta.events.register("before-parameter-build.s3.DeleteObjects", the_store_keeps_b)
    try:
        storage.remove("s3://keeps/campaign", recursive=True)  # kept once: removed at the next try
        assert kept == [0] and not storage.exists("s3://keeps/campaign/b.mp4")
        storage.write_bytes("s3://keeps/campaign/b.mp4", b"video")
        kept[0] = 100
        monkeypatch.setattr(storage, "RETRIES", 2)
        with pytest.raises(OSError, match="the store kept it"):
            storage.remove("s3://keeps/campaign/b.mp4")
        assert storage.exists("s3://keeps/campaign/b.mp4")
    finally:
        fs.s3.meta.events.unregister("before-parameter-build.s3.DeleteObjects", the_store_keeps_b)


@pytest.fixture
def flaky_http(tmp_path):
    """A folder served over HTTP on loopback (an https narration's server, a CDN), behind the proxy."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = FlakyProxy(f"http://127.0.0.1:{server.server_address[1]}")
    yield proxy, tmp_path
    proxy.close()
    server.shutdown()


def test_an_http_input_whose_server_is_briefly_away_is_tried_again_not_missing(flaky_http, monkeypatch):
    """fsspec's HTTP client says "not found" for any failed request: a narration whose server
    answered 503 twice (a text-to-speech service under load) failed its row at once with "does not
    exist". The cause decides now: ridden out; past the retries, the row says what the server
    answered. A 404 is still missing, at once."""
    proxy, folder = flaky_http
    (folder / "narration.wav").write_bytes(b"RIFF" + bytes(60))
    proxy.answer, proxy.drop_next = 503, 2
    assert storage.info(f"{proxy.url}/narration.wav")["size"] == 64
    assert proxy.dropped == 2 and proxy.drop_next == 0
    proxy.dropped = 0
    with pytest.raises(FileNotFoundError):
        storage.info(f"{proxy.url}/never.wav")
    assert proxy.dropped == 0
    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "_BACKOFF", 0.01)
    proxy.drop_next = 10
    with pytest.raises(storage.StorageUnavailable, match="503"):
        storage.info(f"{proxy.url}/narration.wav")


def test_an_http_server_that_takes_the_connection_and_never_answers_fails_its_read_in_bounded_time(monkeypatch):
    """A server that accepts the connection and says nothing (a proxy whose backend is gone): each
    try waited aiohttp's 5 minutes for the whole answer, so a row's read took half an hour, and on a
    small machine the rows behind it waited for its thread. Now a try ends after
    `HTTP_SILENCE_SECONDS` of silence, and the read fails after its retries, saying why."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
    from heygem_ray.errors import reading

    monkeypatch.setattr(storage, "HTTP_SILENCE_SECONDS", 0.5)
    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "_BACKOFF", 0.01)
    outcome: list[BaseException] = []
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}/narration.wav"

    def read() -> None:
        try:
            with reading("audio", uri):
                storage.read_bytes(uri)
        except BaseException as exc:  # noqa: BLE001 - what the read ended with
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    silent.close()
    assert not reader.is_alive(), "the read still waits for the silent server"
    assert held, "the read never reached the server"
    # the row's error names the input (it was "FSTimeoutError: "), still the store's fault, not the input's
    assert isinstance(outcome[0], storage.StorageUnavailable) and storage.retried(outcome[0]), outcome
    assert str(outcome[0]).startswith(f"audio {uri}: its store stayed unreachable through 2 tries"), outcome
