"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): a head for the tasks and two
workers with one logical GPU each, so the two renderer actors land on different nodes. Slow:
marked `multinode` (run alone with `pytest -m multinode`)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from helpers import compose_config, write_mixed_manifest
from heygem_ray.campaign import Campaign
from heygem_ray.executors.ray_cluster import RayExecutor
from heygem_ray.manifest import read_manifest
from heygem_ray.results import read_results

pytestmark = pytest.mark.multinode
STORE = 150 * 1024 * 1024  # several nodes on one host each claim 30% of memory unless told


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the single-node session Ray; the next test module starts it again
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": STORE})
    workers = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=STORE) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def campaign_config(tmp_path, media_dir, rows: int):
    manifest = write_mixed_manifest(tmp_path, media_dir, rows)
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.segment_seconds=0.5",
        "render.progress=false",
        "cluster.actors=2",
        "cluster.actor.num_gpus=1",
        "cluster.actor.num_cpus=1",
        "render.max_inflight_segments=4",
    )
    return cfg, read_manifest(cfg.manifest, cfg.output)


def test_actors_on_both_gpu_workers(cluster, media_dir, tmp_path):
    _c, workers = cluster
    cfg, rows = campaign_config(tmp_path, media_dir, rows=4)
    job = Campaign(cfg, rows, RayExecutor(cfg))
    summary = job.run()
    assert summary.count("ok") == 4
    assert set(job.segments.by_node) == {w.node_id for w in workers}


def test_campaign_survives_losing_a_worker_node(cluster, media_dir, tmp_path):
    c, workers = cluster
    # enough rows that both actors stay busy for seconds: with fewer, a fast machine could finish the
    # campaign between two looks at the actors' loads
    cfg, rows = campaign_config(tmp_path, media_dir, rows=10)
    job = Campaign(cfg, rows, RayExecutor(cfg))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", job.run()), daemon=True)
    runner.start()
    deadline = time.time() + 120
    # both actors in service and busy, so the lost node takes in-flight segments with it
    while not (job.actors.actors and all(a.healthy and a.load >= 1 for a in job.actors.actors)):
        assert time.time() < deadline and runner.is_alive(), "campaign never got both actors busy"
        time.sleep(0.02)
    victim = workers[0]
    c.remove_node(victim, allow_graceful=False)  # hard loss: in-flight segment and actor die with it
    c.add_node(num_cpus=1, num_gpus=1, object_store_memory=STORE)  # what an autoscaler would do
    runner.join(timeout=300)
    assert not runner.is_alive(), "campaign did not finish after the node loss"

    summary = outcome["summary"]
    assert [r.status for r in summary.rows] == ["ok"] * len(rows), [r.error for r in summary.rows]
    assert max(r.attempts for r in summary.rows) >= 2  # the lost segment was rendered again
    out = cfg.output
    results = read_results(os.path.join(out, "_results.parquet"))
    assert sorted(r["id"] for r in results) == sorted(r.id for r in rows)  # once each, no duplicates
    files = sorted(os.listdir(out))
    assert [f for f in files if f.endswith(".mp4")] == sorted(f"{r.id}.mp4" for r in rows)
    assert not [f for f in files if f.startswith(".") or ".part" in f]
