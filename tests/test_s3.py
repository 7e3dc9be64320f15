"""S3 end to end through s3fs against moto's server on loopback: manifest, inputs, cache, outputs,
markers and results all on s3://, credentials from the standard AWS environment, and never in
logs, results or the saved config."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import av
import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import S3_SECRET, compose_config
from heygem_ray import campaign, storage
from heygem_ray.cli import compose, config_yaml


@pytest.fixture(scope="module")
def bucket(s3_endpoint, media_dir):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="heygem-e2e")
    for name in ("speech3.wav", "clip2.mp4", "still.png"):
        s3.upload_file(str(media_dir / name), "heygem-e2e", f"inputs/{name}")
    table = pa.table(
        {
            "id": ["clip", "still", "broken"],
            "audio": ["s3://heygem-e2e/inputs/speech3.wav"] * 2 + ["s3://heygem-e2e/inputs/absent.wav"],
            "avatar": [
                "s3://heygem-e2e/inputs/clip2.mp4",
                "s3://heygem-e2e/inputs/still.png",
                "s3://heygem-e2e/inputs/clip2.mp4",
            ],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.put_object(Bucket="heygem-e2e", Key="campaign.parquet", Body=buf.getvalue())
    return s3


def keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="heygem-e2e", Prefix=prefix).get("Contents", []))


def test_campaign_entirely_on_s3(ray_local, bucket, capfd):
    overrides = [
        "manifest=s3://heygem-e2e/campaign.parquet",
        "output=s3://heygem-e2e/out/c1",
        "render.segment_seconds=1.0",
        "render.progress=false",
    ]
    cfg = compose_config(*overrides)
    storage.write_bytes("s3://heygem-e2e/out/c1/_config.yaml", config_yaml(compose(overrides)).encode())
    summary = campaign.run(cfg)
    status = {r.id: r.status for r in summary.rows}
    assert status == {"clip": "ok", "still": "ok", "broken": "failed"}
    broken = next(r for r in summary.rows if r.id == "broken")
    assert broken.error == "audio s3://heygem-e2e/inputs/absent.wav: does not exist"

    objects = keys(bucket, "out/c1/")
    assert {
        "out/c1/clip.mp4",
        "out/c1/still.mp4",
        "out/c1/_results.parquet",
        "out/c1/_config.yaml",
        "out/c1/_markers/clip.json",
        "out/c1/_markers/still.json",
    } <= set(objects)
    assert "out/c1/broken.mp4" not in objects
    assert any(k.startswith("out/c1/_cache/audio/") for k in objects)
    assert any(k.startswith("out/c1/_cache/avatars/") for k in objects)
    assert not [k for k in objects if "/_work/" in k or ".part" in k]

    # each object typed by what it is: the report opens from the bucket, a video plays
    for key, kind in (("out/c1/_report.html", "text/html"), ("out/c1/clip.mp4", "video/mp4")):
        assert bucket.head_object(Bucket="heygem-e2e", Key=key)["ContentType"] == kind, key
    body = bucket.get_object(Bucket="heygem-e2e", Key="out/c1/clip.mp4")["Body"].read()
    with av.open(io.BytesIO(body)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 75  # 3 s of audio at 25 fps

    results = pq.read_table(
        io.BytesIO(bucket.get_object(Bucket="heygem-e2e", Key="out/c1/_results.parquet")["Body"].read())
    )
    assert results.num_rows == 3

    again = campaign.run(cfg)
    assert {r.id: r.status for r in again.rows} == {"clip": "skipped", "still": "skipped", "broken": "failed"}

    # the secret is nowhere: not in any object written, the driver's output, or the Ray logs
    for key in keys(bucket, "out/c1/"):
        assert S3_SECRET.encode() not in bucket.get_object(Bucket="heygem-e2e", Key=key)["Body"].read(), key
    captured = capfd.readouterr()
    assert S3_SECRET not in captured.out + captured.err
    session_logs = ray_local._private.worker._global_node.get_logs_dir_path()
    for path in glob.glob(os.path.join(session_logs, "*")):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                assert S3_SECRET.encode() not in fh.read(), path


def test_storage_options_carry_endpoint_and_credentials(s3_endpoint, bucket):
    """`storage.options.s3` reaches fsspec: a wrong endpoint there overrides the environment."""
    storage.configure({"s3": {"endpoint_url": s3_endpoint, "key": "heygem-test-key", "secret": S3_SECRET}})
    try:
        assert storage.exists("s3://heygem-e2e/campaign.parquet")
        storage.configure(
            {
                "s3": {
                    "endpoint_url": "http://127.0.0.1:9",
                    "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
                }
            }
        )
        from botocore.exceptions import EndpointConnectionError

        # the dead endpoint of the options was tried, with the credentials the environment gives
        with pytest.raises(EndpointConnectionError, match=r"127\.0\.0\.1:9/"):
            storage.url_to_fs("s3://heygem-e2e/campaign.parquet")[0].info("heygem-e2e/campaign.parquet")
    finally:
        storage.configure(None)


@contextlib.contextmanager
def _s3_calls(uri: str) -> Iterator[list[str]]:
    """The S3 API calls (by name) the block makes through the file system of `uri`."""
    fs, _ = storage.url_to_fs(uri)
    calls: list[str] = []

    def record(model, **_kw):
        calls.append(model.name)

    fs.s3.meta.events.register("before-call.s3", record)
    try:
        yield calls
    finally:
        fs.s3.meta.events.unregister("before-call.s3", record)


def test_the_bytes_under_a_folder_come_from_its_listing_not_a_request_per_object(bucket):
    """The studio counts a user's bytes on every upload and submit: fsspec's `du` asked each object's
    size again (a HEAD each, hundreds of thousands for a user with large campaigns)."""
    sizes = {f"usage/alice/c{i}/output/row{j}.mp4": 10 * i + j for i in range(3) for j in range(10)}
    sizes |= {f"usage/alice/_cache/audio/a{j}.f32": 1000 for j in range(5)}  # left out: derived
    for key, size in sizes.items():
        bucket.put_object(Bucket="heygem-e2e", Key=key, Body=b"x" * size)
    with _s3_calls("s3://heygem-e2e/usage") as calls:
        got = storage.usage("s3://heygem-e2e/usage/alice", leaving_out="s3://heygem-e2e/usage/alice/_cache")
        assert storage.usage("s3://heygem-e2e/usage/bob") == 0
    assert got == sum(size for key, size in sizes.items() if "/_cache/" not in key)
    assert calls.count("HeadObject") <= 2 and calls.count("ListObjectsV2") <= 4, calls  # not one per object


def test_videos_are_sized_from_their_folders_listing_not_a_request_per_object(bucket):
    """The studio's zip of a campaign says its length before its first byte, from the videos'
    sizes: one listing per folder, not a HEAD per video; a video no longer there has no size."""
    sizes = {f"zipsizes/out/row{j}.mp4": 100 + j for j in range(20)} | {"zipsizes/elsewhere/x.mp4": 7}
    for key, size in sizes.items():
        bucket.put_object(Bucket="heygem-e2e", Key=key, Body=b"v" * size)
    uris = [f"s3://heygem-e2e/{key}" for key in sizes] + ["s3://heygem-e2e/zipsizes/out/gone.mp4"]
    with _s3_calls("s3://heygem-e2e/zipsizes") as calls:
        got = storage.sizes(uris)
    assert got == {f"s3://heygem-e2e/{key}": size for key, size in sizes.items()}
    assert "HeadObject" not in calls and calls.count("ListObjectsV2") <= 2, calls


def test_a_key_with_double_colons_is_one_key(bucket):
    """fsspec reads "a::b" as file system a over b: an S3 key holding "::" failed with a TypeError."""
    uri = "s3://heygem-e2e/colons/promo::v2/row.mp4"
    storage.write_bytes(uri, b"a video")
    assert bucket.get_object(Bucket="heygem-e2e", Key="colons/promo::v2/row.mp4")["Body"].read() == b"a video"
    assert storage.read_bytes(uri) == b"a video" and storage.exists(uri)
    storage.remove("s3://heygem-e2e/colons/promo::v2", recursive=True)
    assert not storage.exists(uri)


FRESH_WORKERS_CAMPAIGN = """
import json, sys
import ray
from heygem_ray import campaign
from heygem_ray.cli import compose
from heygem_ray.config import to_plain
from heygem_ray.executors import ray_cluster

def fresh_worker_task(self, fn, num_gpus, in_room):
    # the campaign's task options, plus max_calls=1: every task runs in a worker process of its own,
    # as on a cluster where prepare, detect and stitch land on other nodes than the driver's
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    room = {"scheduling_strategy": PlacementGroupSchedulingStrategy(self._room)} if in_room else {}
    return ray.remote(max_calls=1)(fn).options(num_cpus=self.cfg.cluster.task_cpus, num_gpus=num_gpus,
                                                max_retries=0, **room)

ray_cluster.RayExecutor._remote = fresh_worker_task
ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
summary = campaign.run(to_plain(compose(sys.argv[1:])))
print(json.dumps({r.id: [r.status, r.error] for r in summary.rows}))
"""


@pytest.mark.slow  # a worker process per task, each importing the stack (~50 s on 2 cores)
def test_storage_options_alone_reach_every_stage_on_fresh_workers(s3_endpoint, bucket, tmp_path):
    """The endpoint and keys only in `storage.options` (no AWS environment, no config files): the
    manifest read, row preparation, face tracking, rendering and stitching each run in a worker
    process of their own, and each reaches the bucket through those options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "RAY_ADDRESS": "",
        }
    )
    overrides = [
        "manifest=s3://heygem-e2e/options.parquet",
        "output=s3://heygem-e2e/out/options",
        "render.progress=false",
        "cluster.actors=1",
        f"+storage.options.s3.endpoint_url={s3_endpoint}",
        "+storage.options.s3.key=heygem-test-key",
        f"+storage.options.s3.secret={S3_SECRET}",
    ]
    table = pa.table(
        {
            "id": ["still"],
            "audio": ["s3://heygem-e2e/inputs/speech3.wav"],
            "avatar": ["s3://heygem-e2e/inputs/still.png"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    bucket.put_object(Bucket="heygem-e2e", Key="options.parquet", Body=buf.getvalue())
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_WORKERS_CAMPAIGN, *overrides], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"still": ["ok", None]}
    objects = keys(bucket, "out/options/")
    assert "out/options/still.mp4" in objects
    assert any(k.startswith("out/options/_cache/audio/") for k in objects)  # prepare_row
    assert any(k.startswith("out/options/_cache/avatars/") for k in objects)  # prepare_avatar


def test_a_publish_into_a_missing_bucket_fails_and_makes_no_bucket(s3_endpoint, tmp_path):
    """A row's output in a mistyped bucket is refused by the store: s3fs's makedirs before the PUT
    made the bucket instead, and the video went where nobody looks."""
    storage.configure({"s3": {"endpoint_url": s3_endpoint}})
    try:
        video = tmp_path / "a.mp4"
        video.write_bytes(b"video")
        with pytest.raises(FileNotFoundError):
            storage.publish_file(str(video), "s3://heygem-mistyped/out/a.mp4")
        names = {b["Name"] for b in boto3.client("s3", endpoint_url=s3_endpoint).list_buckets()["Buckets"]}
        assert "heygem-mistyped" not in names
    finally:
        storage.configure(None)


def test_a_store_that_refuses_for_want_of_credentials_is_a_message_not_a_traceback(s3_endpoint, tmp_path):
    """No credentials for the store: botocore's NoCredentialsError is no OSError, and the command
    ended in a traceback with exit status 1 (which says "a row failed")."""
    from helpers import render_cli

    done = render_cli(
        "manifest=s3://bucket/m.parquet",
        "output=s3://bucket/out",
        f"+storage.options.s3.endpoint_url={s3_endpoint}",
        AWS_ACCESS_KEY_ID="",
        AWS_SECRET_ACCESS_KEY="",
        AWS_SESSION_TOKEN="",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the store refused: NoCredentialsError" in done.stderr and "Traceback" not in done.stderr


def test_an_output_root_that_is_an_object_or_a_cache_in_no_bucket_stops_the_run_before_any_row(s3_endpoint, bucket):
    """An `output=` naming an existing video (a key) made the campaign's files under it as a
    "folder" too, the key both; a `cache=` in a bucket that does not exist failed every row with
    `CacheError … (FileNotFoundError)`, one by one. Both are refused at once, exit 2, saying why."""
    from helpers import render_cli

    endpoint = f"+storage.options.s3.endpoint_url={s3_endpoint}"
    manifest = "manifest=s3://heygem-e2e/campaign.parquet"
    done = render_cli(manifest, "output=s3://heygem-e2e/inputs/clip2.mp4", "cluster=inline", endpoint, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "output s3://heygem-e2e/inputs/clip2.mp4: is a file: the output root is the folder" in done.stderr
    assert keys(bucket, "inputs/clip2.mp4/") == []
    out = "s3://heygem-e2e/no-cache-run"
    done = render_cli(
        manifest, f"output={out}", "cache=s3://heygem-mistyped/cache", "cluster=inline", endpoint, timeout=120
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cache s3://heygem-mistyped/cache: cannot be used" in done.stderr, done.stderr[-3000:]
    assert not [k for k in keys(bucket, "no-cache-run/") if k.endswith(".mp4")]
