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


#: each node's object store in the several-node clusters below
STORE = 100 * 1024 * 1024


@pytest.fixture
def room_cluster(monkeypatch):
    """A Ray cluster whose head has no CPUs (its workers added by the test, which then joins it),
    with a lost room seen within seconds."""
    import ray
    from ray.cluster_utils import Cluster

    from heygem_ray.executors import ray_cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's in-process Ray; the next test module starts it again
    monkeypatch.setattr(ray_cluster, "ROOM_CHECK_SECONDS", 0.5)
    monkeypatch.setattr(ray_cluster, "ROOM_LOST_SECONDS", 3.0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a minute: the campaign side runs in the default set (test_driver)
@pytest.mark.multinode
def test_a_room_whose_nodes_went_is_given_up_and_the_campaign_goes_on(tmp_path, media_dir, room_cluster):
    """The room is pinned node by node: its only worker lost (a spot GPU node reclaimed; the head has
    no CPUs) and a new one in its place, Ray never placed it again, and the campaign's tasks and
    first renderer waited for ever beside an idle node. Now the tasks that waited in it fail their
    rows, and the rest render on the new node."""
    import threading

    import ray

    from helpers import compose_config, write_mixed_manifest
    from heygem_ray.campaign import Campaign
    from heygem_ray.executors import ray_cluster
    from heygem_ray.manifest import read_manifest

    cluster = room_cluster
    worker = cluster.add_node(num_cpus=2, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    rows = 10
    manifest = write_mixed_manifest(tmp_path, media_dir, rows)
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "render.segment_seconds=0.5",
        f"cluster.address={cluster.address}",
    )
    job = Campaign(cfg, read_manifest(cfg.manifest, cfg.output), ray_cluster.RayExecutor(cfg))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", job.run()), daemon=True)
    runner.start()
    deadline = time.time() + 150
    while len(job.results) < 2:
        assert time.time() < deadline and runner.is_alive(), "the campaign never finished two rows"
        time.sleep(0.1)
    cluster.remove_node(worker, allow_graceful=False)
    cluster.add_node(num_cpus=2, object_store_memory=STORE)  # what an autoscaler would do
    runner.join(timeout=240)
    assert not runner.is_alive(), "the campaign waited for ever on its lost room"
    summary = outcome["summary"]
    failed = [r.error or "" for r in summary.rows if r.status == "failed"]
    # a row whose narration's encode waited in the room fails at its stitch, saying so (not with
    # the TaskCancelledError the encode's stop left its stitch)
    assert all("nodes of the cluster that went" in e for e in failed), failed
    assert summary.count("ok") >= rows - 4, summary.line()  # those after the loss render on the new node


@pytest.mark.slow  # half a minute of a three-node cluster
@pytest.mark.multinode
def test_a_first_renderer_whose_node_went_starts_again_outside_the_room(tmp_path, room_cluster):
    """Only the node holding the room's renderer bundle lost (its other node alive): Ray places a
    room's lost bundles again only all together, and the lost node's pinned task bundle never, so
    the first renderer, held in the room, restarted for `cluster.actor_start_timeout` (30 minutes)
    beside the replacement node. Now it starts there, and the room's tasks go on where it stands."""
    import ray

    from helpers import compose_config
    from heygem_ray.executors import ray_cluster

    cluster = room_cluster
    # one renderer fits (2 CPUs less the one kept for tasks); its bundle goes beside that node's tasks'
    renderer_node = cluster.add_node(num_cpus=2, object_store_memory=STORE)
    task_node = cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = compose_config(
        f"manifest={tmp_path}/m.parquet", f"output={tmp_path}/out", f"cluster.address={cluster.address}"
    )
    executor = ray_cluster.RayExecutor(cfg)
    try:
        executor.start_actors(1)
        assert executor._room is not None and executor._first_bundle is not None
        ray.get(executor.call(0, "ready"), timeout=60)
        held = ray.util.placement_group_table(executor._room)["bundles_to_node_id"][executor._first_bundle]
        assert held == renderer_node.node_id
        cluster.remove_node(renderer_node, allow_graceful=False)
        deadline = time.monotonic() + 30
        while executor.restarts(0) < 1:  # Ray restarts it, in the room, where it no longer fits
            assert time.monotonic() < deadline, "the first renderer was not restarted"
            time.sleep(0.2)
        cluster.add_node(num_cpus=2, object_store_memory=STORE)  # what an autoscaler would do
        deadline, ready = time.monotonic() + 60, executor.call(0, "ready")
        while True:
            assert executor.stranded() == [], "the room's other node still stands: no task of it is stranded"
            if ray.wait([ready], timeout=0.5)[0]:
                try:
                    ray.get(ready)
                    break
                except ray.exceptions.RayActorError:  # the actor it asked went (killed, moved)
                    ready = executor.call(0, "ready")
            assert time.monotonic() < deadline, "the first renderer never started again"
        assert executor._room is not None  # kept for the tasks, on the node left
        # counted on from the old actor's restarts: from 0, a crash-looping new one needed more
        # deaths than START_DEATHS to be given up (the pool counts from its restarts when ready)
        assert executor.restarts(0) >= 1 and executor.all_restarts()[0] >= 1

        def node_id() -> str:
            return ray.get_runtime_context().get_node_id()

        assert ray.get(executor.submit(node_id), timeout=30) == task_node.node_id
    finally:
        executor.close()
