"""Shared fixtures. Ray 2.60 turns token auth on by default and caches the mode at import, so the
mode is set here, before anything imports ray."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# node-local download cache of the test session, not the user's ~/.cache
os.environ.setdefault("HEYGEM_CACHE_DIR", tempfile.mkdtemp(prefix="heygem-node-cache-"))

import pytest

from helpers import METRICS_PORT, S3_SECRET, write_faceless_clip


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server) for the whole session. Its credentials are in
    the standard AWS environment before Ray starts, so Ray workers inherit them as they would on a
    node with an instance profile."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_S3": url,
            "AWS_ACCESS_KEY_ID": "heygem-test-key",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    yield url
    server.stop()


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A local Ray, started on first use and shared by later tests (a cold start costs seconds on a
    2-core machine); multi-node tests shut it down and the next user starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT
        )
    return ray


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_exit():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def _default_thread_counts() -> tuple[int, int, str | None]:
    import cv2
    import torch

    return torch.get_num_threads(), cv2.getNumThreads(), os.environ.get("OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _thread_counts_restored(_default_thread_counts):
    """A RenderWorker built in this process (the inline executor, the worker tests) sets torch's and
    OpenCV's thread counts for the whole process, as an actor does for its own: put back after each
    test, or every later test in this process would render on the one thread a test asked for."""
    yield
    import cv2
    import torch

    torch_threads, cv2_threads, omp = _default_thread_counts
    if omp is None:  # (set for a later torch import where torch was not loaded; here it is)
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if cv2.getNumThreads() != cv2_threads:
        cv2.setNumThreads(cv2_threads)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """Small real media made once per session: clips, a still, speech-like audio in several formats."""
    from heygem_ray import demo

    root = tmp_path_factory.mktemp("media")
    speech = demo.speech_like(4.0, seed=7)
    demo.write_wav(str(root / "speech4.wav"), speech)
    demo.write_wav(str(root / "speech3.wav"), demo.speech_like(3.0, seed=8))
    demo.write_avatar_clip(str(root / "clip2.mp4"), 2.0, seed=1)
    demo.write_avatar_clip(str(root / "clip6.mp4"), 6.0, seed=2)
    demo.write_avatar_image(str(root / "still.png"))
    write_faceless_clip(str(root / "noface.mp4"), frames=12)
    return root


@pytest.fixture(scope="session")
def recipe_checkpoints(tmp_path_factory):
    """Official-layout checkpoints from the recipe weights: the generator as a training dict with
    DataParallel `module.` keys (like wav2lip_gan.pth), S3FD as a bare state_dict (like s3fd.pth)."""
    from pathlib import Path

    import torch

    from recipe_weights import read_keys, recipe_state_dict

    data = Path(__file__).parent / "data"
    root = tmp_path_factory.mktemp("weights")
    generator = recipe_state_dict(read_keys(data / "wav2lip_state_dict.tsv"), seed=0)
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in generator.items()},
            "optimizer": None,
            "global_step": 0,
            "global_epoch": 0,
        },
        root / "wav2lip_gan.pth",
    )
    torch.save(recipe_state_dict(read_keys(data / "s3fd_state_dict.tsv"), seed=0), root / "s3fd.pth")
    return {"wav2lip": str(root / "wav2lip_gan.pth"), "s3fd": str(root / "s3fd.pth")}


#: fixtures that bring up a local Ray or the S3 endpoint: tests using them (directly or through
#: another fixture) are integration tests
INTEGRATION_FIXTURES = {"ray_local", "s3_endpoint", "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
