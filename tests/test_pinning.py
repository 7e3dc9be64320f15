"""`cluster.actor.pin_cpus`: renderer actors on real Ray claim whole cores of their own, give them
back when they die, and run unpinned when too few cores are free."""

from __future__ import annotations

import os
import time

import pytest

from helpers import compose_config
from heygem_ray.segment import RenderWorker

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")


def start(ray, cfg):
    # num_cpus=0: Ray's accounting is not what is tested; every actor can start on this machine
    actor = ray.remote(RenderWorker).options(num_cpus=0).remote(cfg)
    return actor, ray.get(actor.ready.remote(), timeout=120)


def test_actors_claim_disjoint_cores_and_release_them_when_they_die(ray_local):
    ray = ray_local
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // 2)
    cfg = compose_config("manifest=m", "output=o", "cluster.actor.pin_cpus=true", f"cluster.actor.num_cpus={per}")
    actors = []
    try:
        a, info_a = start(ray, cfg)
        b, info_b = start(ray, cfg)
        actors += [a, b]
        assert len(info_a.cores) == len(info_b.cores) == per
        assert not set(info_a.cores) & set(info_b.cores)
        assert set(info_a.cores) | set(info_b.cores) <= set(cores)
        for info in (info_a, info_b):  # the process really runs there, not only says so
            assert os.sched_getaffinity(info.pid) == set(info.cores)

        c, info_c = start(ray, cfg)
        actors.append(c)
        if len(cores) - 2 * per < per:  # too few cores left: runs, unpinned
            assert info_c.cores is None
            assert os.sched_getaffinity(info_c.pid) == set(cores)
        else:
            assert not set(info_c.cores) & (set(info_a.cores) | set(info_b.cores))

        ray.kill(a)  # like a crash: the kernel drops its locks with the process
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.kill(info_a.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        d, info_d = start(ray, cfg)
        actors.append(d)
        assert info_d.cores == info_a.cores
    finally:
        for actor in actors:
            ray.kill(actor)


def test_unpinned_by_default(ray_local):
    actor, info = start(ray_local, compose_config("manifest=m", "output=o"))
    try:
        assert info.cores is None and os.sched_getaffinity(info.pid) == os.sched_getaffinity(0)
    finally:
        ray_local.kill(actor)
