"""Checkpoint loading: the three shipped forms load strictly, broken or unsafe files are refused clearly."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

from heygem_ray.errors import CheckpointError
from heygem_ray.models.checkpoints import layout_of, load_model, load_state_dict
from heygem_ray.models.wav2lip import Wav2Lip
from recipe_weights import read_keys, recipe_state_dict

DATA = Path(__file__).parent / "data"
NAME = "Wav2Lip generator"
REF = np.load(DATA / "wav2lip_reference.npz")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return recipe_state_dict(read_keys(DATA / "wav2lip_state_dict.tsv"), seed=0)


@pytest.fixture(scope="module")
def expected() -> dict[str, tuple[int, ...]]:
    return layout_of(Wav2Lip())


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory, weights) -> Path:
    """The official wav2lip.pth form: a dict with DataParallel-prefixed keys under state_dict."""
    path = tmp_path_factory.mktemp("ckpt") / "wav2lip.pth"
    state = {f"module.{key}": value for key, value in weights.items()}
    torch.save({"state_dict": state, "optimizer": None, "global_step": 250_000, "global_epoch": 40}, path)
    return path


def _assert_same(loaded: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


def test_training_checkpoint_loads_strictly_and_runs(training_checkpoint, weights):
    model = load_model(Wav2Lip, str(training_checkpoint), NAME)
    assert not model.training
    _assert_same(model.state_dict(), weights)
    with torch.inference_mode():
        out = model(torch.from_numpy(REF["mel"][:1]), torch.from_numpy(REF["faces"][:1]))
    np.testing.assert_allclose(out.numpy(), REF["output"][:1], rtol=0, atol=1e-4)


def test_a_half_precision_checkpoint_gives_the_fp32_model(tmp_path, weights):
    """The model takes the checkpoint's tensors as they are, but in its own dtypes: a file saved
    in fp16 still loads into a model that runs on fp32 inputs."""
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path)
    model = load_model(Wav2Lip, str(path), NAME)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32, torch.int64}
    with torch.inference_mode():
        out = model(torch.from_numpy(REF["mel"][:1]), torch.from_numpy(REF["faces"][:1]))
    np.testing.assert_allclose(out.numpy(), REF["output"][:1], rtol=0, atol=2e-2)


def test_a_half_precision_checkpoint_whose_sums_pass_fp16s_range_loads(tmp_path, weights, expected):
    """Every value finite, but a tensor's sum past fp16's 65504 (a BatchNorm's running variances
    averaging over 128 across 512 channels): refused as holding "NaN or infinite values"."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    key = next(k for k, v in half.items() if k.endswith("running_var") and v.numel() >= 512)
    half[key] = torch.full_like(half[key], 200.0)
    assert torch.isfinite(half[key]).all() and not half[key].sum().isfinite()
    path = tmp_path / "half.pth"
    torch.save(half, path)
    assert load_state_dict(str(path), NAME, expected)[key].sum() == 200.0 * half[key].numel()


def test_legacy_serialization_and_missing_batch_counters(tmp_path, weights, expected):
    """2020-era torch.save files are not zip archives; some state_dicts lack num_batches_tracked."""
    state = {f"module.{k}": v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"state_dict": state, "global_step": 1}, path, _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(str(path), NAME, expected), weights)


def test_an_official_checkpoint_is_read_once_per_node_then_its_weights_alone(tmp_path, monkeypatch, weights, expected):
    """2020's pickle format with Adam's state beside the weights (436 MB for 145 MB of weights) is
    read once; later loads on the node read a copy of the weights alone. A damaged copy is made
    again, a rewritten checkpoint gets its own, weights alone (any format) need none, and a remote
    checkpoint's copy is found again although its local file's times change with each use."""
    import os

    from heygem_ray.models import checkpoints

    node = tmp_path / "node"
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(node))

    def copies() -> list[Path]:
        return sorted(node.glob(checkpoints.SLIM_PREFIX + "*.pt"))

    state = {f"module.{k}": v for k, v in weights.items()}
    adam = {"state": {0: {"exp_avg": torch.zeros(64, 6, 7, 7)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    official = {"state_dict": state, "optimizer": adam, "global_step": 1}
    path = tmp_path / "wav2lip_gan.pth"
    torch.save(official, path, _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(str(path), NAME, expected), weights)
    (slim,) = copies()
    assert slim.stat().st_size < path.stat().st_size

    # the copy is what the next load reads: one holding zeros gives zeros
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, slim)
    assert all(not v.any() for v in load_state_dict(str(path), NAME, expected).values())
    slim.write_bytes(b"damaged")  # made again from the checkpoint
    _assert_same(load_state_dict(str(path), NAME, expected), weights)
    _assert_same(torch.load(slim, weights_only=True), weights)

    before = path.stat()  # rewritten with its size and time kept (`cp -p`, `rsync -t`): a copy of its own
    torch.save(official, path, _use_new_zipfile_serialization=False)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    load_state_dict(str(path), NAME, expected)
    assert len(copies()) == 2

    for name, keep in (("bare.pth", True), ("bare-legacy.pth", False)):
        torch.save(weights, tmp_path / name, _use_new_zipfile_serialization=keep)
        load_state_dict(str(tmp_path / name), NAME, expected)
    assert len(copies()) == 2

    with fsspec.open("memory://ckpt/wav2lip_gan.pth", "wb") as fh:
        torch.save(official, fh)
    for _ in range(3):  # each use of the node's download touches it
        _assert_same(load_state_dict("memory://ckpt/wav2lip_gan.pth", NAME, expected), weights)
    assert len(copies()) == 3


def test_actors_starting_together_read_an_official_checkpoint_once(tmp_path, monkeypatch, weights, expected):
    """On a fresh node every actor starts at once: one reads the 436 MB file, the others wait for
    its slim copy (the real reader runs; it is only counted)."""
    from concurrent.futures import ThreadPoolExecutor

    from heygem_ray.models import checkpoints

    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "node"))
    path = tmp_path / "wav2lip_gan.pth"
    adam = {"state": {0: {"exp_avg": torch.zeros(64, 6, 7, 7)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save({"state_dict": weights, "optimizer": adam}, path, _use_new_zipfile_serialization=False)
    reads = []
    real_read = checkpoints._read
    monkeypatch.setattr(checkpoints, "_read", lambda *args: reads.append(args) or real_read(*args))
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_state_dict(str(path), NAME, expected), range(4)))
    assert len(reads) == 1
    for state in loaded:
        _assert_same(state, weights)


def test_bare_state_dict(tmp_path, weights, expected):
    path = tmp_path / "bare.pth"
    torch.save(weights, path)
    _assert_same(load_state_dict(str(path), NAME, expected), weights)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, but these files exist
def test_torchscript_archive(tmp_path, weights, expected):
    model = Wav2Lip()
    model.load_state_dict(weights)
    example = (torch.zeros(1, 1, 80, 16), torch.zeros(1, 6, 96, 96))
    traced = torch.jit.trace(model.eval(), example, check_trace=False)
    path = tmp_path / "Wav2Lip-SD-GAN.pt"
    torch.jit.save(traced, str(path))
    _assert_same(load_state_dict(str(path), NAME, expected), weights)


def test_loads_from_a_remote_uri_through_the_node_cache(monkeypatch, tmp_path, training_checkpoint, weights, expected):
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "cache"))
    uri = "memory://models/wav2lip/wav2lip.pth"
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/wav2lip/wav2lip.pth", training_checkpoint.read_bytes())
    try:
        _assert_same(load_state_dict(uri, NAME, expected), weights)
        assert len(list((tmp_path / "cache").glob("*.pth"))) == 1
    finally:
        fs.rm("/models/wav2lip/wav2lip.pth")


def test_truncated_file_is_refused(tmp_path, training_checkpoint, expected):
    data = training_checkpoint.read_bytes()
    for name, keep in (("half.pth", len(data) // 2), ("head.pth", 300)):
        path = tmp_path / name
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            load_state_dict(str(path), NAME, expected)
        assert str(path) in str(info.value) and f"{keep:,} bytes" in str(info.value)


def test_truncated_legacy_file_is_refused(tmp_path, weights, expected):
    path = tmp_path / "old.pth"
    torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(str(path), NAME, expected)


def test_html_page_is_refused_with_a_credential_free_uri(monkeypatch, tmp_path, expected):
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "cache"))
    page = b"\n<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>"
    local = tmp_path / "wav2lip.pth"
    local.write_bytes(page)
    with pytest.raises(CheckpointError, match="starts with '<'.*web page"):
        load_state_dict(str(local), NAME, expected)
    fs = fsspec.filesystem("memory")
    fs.pipe("/dl/wav2lip.pth?token=s3cr3t", page)
    try:
        with pytest.raises(CheckpointError, match="web page") as info:
            load_state_dict("memory://dl/wav2lip.pth?token=s3cr3t", NAME, expected)
        assert "memory://dl/wav2lip.pth?token=***" in str(info.value) and "s3cr3t" not in str(info.value)
    finally:
        fs.rm("/dl/wav2lip.pth?token=s3cr3t")


def test_empty_and_missing_files_are_refused(tmp_path, expected):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(str(empty), NAME, expected)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(str(tmp_path / "nope.pth"), NAME, expected)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict("memory://nowhere/nope.pth", NAME, expected)
    lfs = tmp_path / "lfs.pth"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 435801865\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        load_state_dict(str(lfs), NAME, expected)


def test_s3fd_weights_given_as_generator_are_named(tmp_path, expected):
    path = tmp_path / "s3fd.pth"
    torch.save(recipe_state_dict(read_keys(DATA / "s3fd_state_dict.tsv"), seed=0), path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(str(path), NAME, expected)
    message = str(info.value)
    assert "S3FD face detector" in message and "not the Wav2Lip generator" in message
    assert "expected 352 tensors, found 65" in message and "missing 302" in message  # 50 BN counters are optional


def test_wrong_shape_is_reported(tmp_path, weights, expected):
    state = dict(weights)
    state["output_block.1.weight"] = torch.zeros(4, 32, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(str(path), NAME, expected)
    assert "wrong shape 1 (e.g. output_block.1.weight: expected (3, 32, 1, 1), found (4, 32, 1, 1))" in str(info.value)


def test_dict_without_state_dict_is_refused(tmp_path, expected):
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {}, "global_step": 3}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict' entry"):
        load_state_dict(str(path), NAME, expected)


class _Payload:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_carrying_pickle_is_refused_and_never_run(tmp_path, expected, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"x": _Payload(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    with pytest.raises(CheckpointError, match="refused.*could run arbitrary code") as info:
        load_state_dict(str(path), NAME, expected)
    assert not marker.exists()
    if writer == "torch.save":
        assert "GLOBAL io.open was not an allowed global" in str(info.value)


def _model_keys(monkeypatch: pytest.MonkeyPatch, models: str) -> tuple[Any, Callable[[], tuple[str, str]]]:
    """A Wav2Lip + S3FD campaign config with its weights under `models`, and what a row's fingerprint
    and a face track's key are now (the store asked at every call)."""
    from helpers import compose_config
    from heygem_ray import prepare

    monkeypatch.setattr(prepare, "CHECKPOINT_VERSION_SECONDS", 0.0)
    cfg = compose_config(
        "manifest=m",
        "output=o",
        "renderer=wav2lip",
        f"renderer.checkpoint={models}/wav2lip.pth",
        "detector=s3fd",
        f"detector.checkpoint={models}/s3fd.pth",
    )

    def keys() -> tuple[str, str]:
        row = prepare.row_fingerprint("audio-fp", "avatar-fp", None, "o/r.mp4", cfg)
        return row, prepare.detector_key(cfg.detector, None, cfg.render.still_fps)

    return cfg, keys


def test_a_model_file_replaced_at_the_same_uri_renders_rows_and_tracks_again(monkeypatch):
    """The fingerprints held the checkpoints' URIs only: new weights put where the old ones were
    left every finished row skipped and every face track reused, made with the old ones."""
    from heygem_ray import storage

    storage.write_bytes("memory://models/wav2lip.pth", b"old weights")
    storage.write_bytes("memory://models/s3fd.pth", b"old")
    _, keys = _model_keys(monkeypatch, "memory://models")
    before = keys()
    assert keys() == before  # stable while nothing changes
    storage.write_bytes("memory://models/s3fd.pth", b"new weights")
    after_detector = keys()
    assert after_detector[0] != before[0] and after_detector[1] != before[1]
    storage.write_bytes("memory://models/wav2lip.pth", b"new weights, longer")
    assert keys()[0] != after_detector[0] and keys()[1] == after_detector[1]  # the renderer's: rows only


def test_a_campaign_names_the_model_versions_it_started_with_in_every_row(monkeypatch):
    """Rows prepared after a checkpoint was replaced mid-run named the new weights while the actors
    (started before) rendered with the old ones: a rerun then skipped rows made with the old
    weights. A campaign pins each model file's version as it starts (`prepare.model_versions`),
    every fingerprint and track key names that version, and a process's next campaign its own."""
    from heygem_ray import prepare, storage

    storage.write_bytes("memory://pinned/wav2lip.pth", b"weights a")
    storage.write_bytes("memory://pinned/s3fd.pth", b"detector a")
    cfg, keys = _model_keys(monkeypatch, "memory://pinned")
    started = keys()
    versions = prepare.model_versions(cfg)
    assert sorted(versions) == ["memory://pinned/s3fd.pth", "memory://pinned/wav2lip.pth"]
    storage.configure(None, versions)
    try:
        storage.write_bytes("memory://pinned/wav2lip.pth", b"weights b")
        storage.write_bytes("memory://pinned/s3fd.pth", b"detector b")
        assert keys() == started
    finally:
        storage.configure(None, {})
    assert keys()[0] != started[0] and keys()[1] != started[1]  # the next campaign: the new files


def test_a_checkpoint_replaced_since_the_campaign_started_is_refused(tmp_path, weights, expected):
    """An actor (re)started after the checkpoint was replaced loaded the new weights into a
    campaign whose rows name the old ones, and a row's segments could mix both."""
    from heygem_ray import storage

    path = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": weights}, path)
    uri = str(path)
    storage.configure(None, {uri: storage.current_version(uri)})
    try:
        load_state_dict(uri, NAME, expected)  # the version pinned
        torch.save({"state_dict": weights, "global_step": 1}, path)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # whatever the clock's resolution
        with pytest.raises(CheckpointError, match="replaced since this campaign started"):
            load_state_dict(uri, NAME, expected)
    finally:
        storage.configure(None, {})
    load_state_dict(uri, NAME, expected)  # a campaign started now takes this one


def test_a_byte_identical_copy_of_local_weights_is_the_version_the_campaign_started_with(tmp_path, weights, expected):
    """A local checkpoint's version was its size and modification time: the same weights downloaded
    again (an init container at pod start, `cp` without -p) re-rendered every row of every campaign,
    and a copy made on each node was refused by its actors as "replaced". Its content is its version;
    other bytes of the same size with the old times restored are another."""
    import shutil

    from heygem_ray import storage

    path = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": weights}, path)
    uri = str(path)
    started = storage.current_version(uri)
    storage.configure(None, {uri: started})
    try:
        download = tmp_path / "wav2lip.pth.download"
        shutil.copyfile(path, download)
        os.utime(download, ns=(time.time_ns(), time.time_ns() + 10**9))  # whatever the clock's resolution
        os.replace(download, path)
        assert storage.current_version(uri) == started
        load_state_dict(uri, NAME, expected)  # not refused

        stamp = os.stat(path)
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF  # the same size, its times put back
        path.write_bytes(bytes(data))
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert storage.current_version(uri) not in (None, started)
    finally:
        storage.configure(None, {})


def test_a_local_checkpoint_that_cannot_be_hashed_says_why(tmp_path, monkeypatch):
    """A local model file's version became its content's hash: a folder named as the checkpoint was
    then unversioned, so the campaign said it "does not exist"; a file still being written at a
    pod's start (changing at every read) stopped the CLI with a traceback."""
    from helpers import compose_config
    from heygem_ray import prepare, storage

    folder = tmp_path / "wav2lip.pth"
    folder.mkdir()
    assert storage.current_version(str(folder)) is not None  # its load says "is a directory"
    assert storage.current_version(str(tmp_path / "missing.pth")) is None
    growing = tmp_path / "growing.pth"
    growing.write_bytes(b"x" * 1000)

    def changing(path: str) -> str:
        raise storage.ContentChanged(path, storage.CHANGED_WHILE_READ)

    monkeypatch.setattr(storage, "local_fingerprint", changing)
    cfg = compose_config("manifest=m", f"output={tmp_path}/out", "renderer=wav2lip", f"renderer.checkpoint={growing}")
    with pytest.raises(CheckpointError, match="is it still being written"):
        prepare.model_versions(cfg)


def test_weights_holding_nan_are_refused(tmp_path, weights, expected):
    """A diverged or damaged checkpoint loaded, and the renderer's NaN guard drew every mouth black
    with no row failing."""
    broken = dict(weights)
    first = next(k for k, v in broken.items() if v.is_floating_point())
    broken[first] = broken[first].clone()
    broken[first].view(-1)[0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or infinite values"):
        load_state_dict(str(path), "Wav2Lip", expected)
