"""Two campaigns on one Ray cluster at once (two users of the studio, two `ray job submit`s): each
sized its renderers from the whole cluster, they took every CPU, and neither's prepare and stitch
tasks ever ran: both hung. The second now waits for room, and both finish."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heygem_ray import demo
from heygem_ray.results import read_results

pytestmark = pytest.mark.integration


def test_a_room_other_work_holds_part_of_is_given_up_after_a_while(ray_local, monkeypatch, tmp_path):
    """A campaign waits for its room while another campaign's holds the cluster; where other work
    (not a campaign) holds part of a node, the room is never placed: after ROOM_ALONE_SECONDS it
    goes on without one, as before rooms, instead of waiting for ever."""
    from helpers import compose_config
    from heygem_ray.executors import ray_cluster

    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={tmp_path}/out")
    executor = ray_cluster.RayExecutor(cfg)
    try:
        executor.start_actors(1)
        assert executor._room is not None  # an idle cluster holds it at once
    finally:
        executor.close()

    @ray_local.remote(num_cpus=1)
    class Other:
        def ping(self) -> int:
            return 1

    other = Other.remote()
    ray_local.get(other.ping.remote(), timeout=60)
    monkeypatch.setattr(ray_cluster, "ROOM_ALONE_SECONDS", 2.0)
    executor = ray_cluster.RayExecutor(cfg)
    try:
        started = time.monotonic()
        executor.start_actors(1)
        assert executor._room is None and time.monotonic() - started < 30
    finally:
        executor.close()
        ray_local.kill(other)


def test_two_campaigns_on_one_cluster_at_once_both_finish(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's in-process Ray; the next test module starts it again
    demo.write_wav(str(tmp_path / "a.wav"), demo.speech_like(8.0, seed=3))
    demo.write_avatar_image(str(tmp_path / "p.png"))
    for name in ("first", "second"):
        table = pa.table({"id": [name], "audio": [str(tmp_path / "a.wav")], "avatar": [str(tmp_path / "p.png")]})
        pq.write_table(table, tmp_path / f"{name}.parquet")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "object_store_memory": 150 * 1024**2})
    drivers = []
    try:
        for name in ("first", "second"):
            args = [
                f"manifest={tmp_path / name}.parquet",
                f"output={tmp_path / name}",
                f"cluster.address={cluster.address}",
            ]
            drivers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "heygem_ray.cli", "render", *args, "render.progress=false"],
                    env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            time.sleep(0.5)
        for driver in drivers:
            out, _ = driver.communicate(timeout=150)
            assert driver.returncode == 0, out[-3000:]
    finally:
        for driver in drivers:
            driver.kill()
        cluster.shutdown()
    for name in ("first", "second"):
        assert [r["status"] for r in read_results(str(tmp_path / name / "_results.parquet"))] == ["ok"]
