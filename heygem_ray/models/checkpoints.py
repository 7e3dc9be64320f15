"""Loading model weights from any storage URI, safely and with errors a user can act on.

Every model file goes through `load_state_dict`: fetched once per node (storage.local_copy), then
read in one of the three forms the Wav2Lip ecosystem ships (WAV2LIP_SPEC.md §1): a training
checkpoint dict holding `state_dict`, a bare state_dict, or a TorchScript archive. Pickles are only
ever read with `weights_only=True`, so a file that would run code when unpickled is refused, never
executed. The usual ways a download goes wrong (an HTML page saved as .pth, a Git LFS pointer, a
truncated or empty file, the wrong model's weights) each get a CheckpointError that names the
problem and the credential-free URI, instead of a bare `KeyError: 'state_dict'` or
`invalid load key '<'` from deep inside torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from heygem_ray import storage
from heygem_ray.errors import CheckpointError

log = logging.getLogger(__name__)

#: key -> shape of every tensor a model's state_dict must hold
Layout = Mapping[str, tuple[int, ...]]
ModelT = TypeVar("ModelT", bound=nn.Module)

# A few keys that only one known model has: lets a mismatch say "this is the S3FD file".
_SIGNATURES: dict[str, frozenset[str]] = {
    "Wav2Lip generator": frozenset({"face_decoder_blocks.0.0.conv_block.0.weight", "output_block.1.weight"}),
    "SyncNet_color lip-sync expert": frozenset(
        {"face_encoder.0.conv_block.0.weight", "audio_encoder.13.conv_block.0.weight"}
    ),
    "S3FD face detector (s3fd.pth)": frozenset({"conv1_1.weight", "fc7.weight", "conv3_3_norm_mbox_conf.weight"}),
}
_EXAMPLES = 3  # keys quoted per kind of mismatch
_BN_COUNTER = ".num_batches_tracked"


def layout_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The layout a strict load into `model` needs."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_model(build: Callable[[], ModelT], uri: str, model_name: str) -> ModelT:
    """The model `build` makes, with `uri` loaded into it (strict) and in eval mode. It is built on
    the meta device and takes the checkpoint's tensors as they are: a random initialisation the
    checkpoint then overwrites cost ~0.25 s of every Wav2Lip actor's start on one core."""
    with torch.device("meta"):
        model = build()
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    state = load_state_dict(uri, model_name, layout_of(model))
    # assigned tensors keep their dtype: a half-precision checkpoint must still give an fp32 model
    state = {name: t.to(dtypes[name]) if t.is_floating_point() else t for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_state_dict(uri: str, model_name: str, expected: Layout) -> dict[str, torch.Tensor]:
    """The state_dict stored at `uri`, checked against `expected` and ready for a strict load.

    `module.` is removed wherever it occurs in a key (DataParallel checkpoints), as the official
    inference.py does. BatchNorm `num_batches_tracked` counters missing from the file are filled
    with 0 (the official loader tolerates their absence too; inference never reads them).

    Where the running campaign pinned the file's version (`storage.pinned_version`), a file
    replaced since is refused: the campaign's rows name the weights it started with.
    """
    where = f"{model_name} checkpoint {storage.display(uri)}"
    pinned = storage.pinned_version(uri)
    path = _fetch(uri, where, pinned)
    slim = _slim_path(path, remote=not storage.is_local(uri))
    state = _read_slim(slim) if slim else None
    if state is None:
        with contextlib.ExitStack() as held:
            if slim and (not zipfile.is_zipfile(path) or _is_torchscript(path)):
                # actors starting together on a fresh node: one reads the slow file, the others
                # then its slim copy (an official checkpoint is 436 MB of memory to each reader)
                with contextlib.suppress(storage.NodeCacheError):  # unlocked, then
                    held.enter_context(storage.cache_lock(os.path.dirname(slim), slim))
                state = _read_slim(slim)
            if state is None:
                try:
                    loaded = _read(path, where, expected)
                except CheckpointError:  # a file rewritten in place as it was read reads as damaged
                    if pinned is not None and _replaced_since(uri, pinned):
                        raise CheckpointError(_replaced(where, uri)) from None
                    raise
                state = _unwrap(loaded, where)
                state = {key.replace("module.", ""): tensor for key, tensor in state.items()}
                if slim and _worth_slimming(path, loaded):
                    _check_layout(state, expected, model_name, where)  # no copy of the wrong model's
                    _write_slim(slim, state)
    if pinned is not None and _replaced_since(uri, pinned):  # while it was read
        raise CheckpointError(_replaced(where, uri))
    _check_layout(state, expected, model_name, where)
    return {key: state[key] if key in state else torch.zeros((), dtype=torch.long) for key in expected}


def _replaced_since(uri: str, pinned: str) -> bool:
    if storage.is_local(uri):  # its content's fingerprint, memoised by its times (None: removed)
        try:
            return storage.current_version(uri) != pinned
        except storage.ContentChanged:  # rewritten again and again while it was hashed
            return True
    try:
        key = storage.stored_version_key(uri)
    except FileNotFoundError:
        return True
    return key is not None and key != pinned  # None: the copy's content is checked (`_fetch`)


def _replaced(where: str, uri: str) -> str:
    elsewhere = (
        ""
        if not storage.is_local(uri)
        else " (or, on a cluster, this node's copy of it holds other bytes than the driver's: keep "
        "weights on shared storage, e.g. s3://, or the same file on every node)"
    )
    return (
        f"{where}: replaced since this campaign started{elsewhere}; the campaign renders with the weights "
        "it started with and names them in its results: run it again to render with the new file"
    )


#: files in the node cache holding a checkpoint's weights alone (`_slim_path`)
SLIM_PREFIX = "weights-"


def _slim_path(path: str, remote: bool) -> str | None:
    """Where this node keeps the weights of the checkpoint at `path` alone, in torch's current
    format: an official training checkpoint (2020's pickle format, Adam's state beside the weights:
    436 MB for 145 MB of weights) took every actor ~0.4-0.7 s and its whole size in memory to
    read, on every node start; the slim copy is read as fast as the weights alone can be.

    Named by a hash of the file's path and size and, for a local checkpoint, its inode and change
    time (an atomic replace or a rewrite changes them; `cp -p` or `rsync -t` keep its mtime), so a
    replaced checkpoint gets a copy of its own. A remote one's local copy (`storage.local_copy`) is
    named by the object's version already, and its times change with each use.
    None where the file cannot be looked at."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    version = "" if remote else f"|{status.st_ino}|{status.st_mtime_ns}|{status.st_ctime_ns}"
    key = hashlib.sha256(f"{os.path.realpath(path)}|{status.st_size}{version}".encode()).hexdigest()
    return os.path.join(storage.node_cache_dir(), f"{SLIM_PREFIX}{key[:24]}.pt")


def _worth_slimming(path: str, loaded: Any) -> bool:
    """A file slower to read than its weights alone: a TorchScript archive (its code compiled on
    every load) or a training checkpoint with its optimizer's state (in either format). Weights
    alone, in the pickle format too, read as fast as a copy would."""
    return _is_torchscript(path) or (isinstance(loaded, Mapping) and loaded.get("optimizer") is not None)


def _read_slim(slim: str) -> dict[str, torch.Tensor] | None:
    """The weights of a slim copy (made here from a checked checkpoint); None when there is none
    or it cannot be read (then it is made again)."""
    try:
        state = torch.load(slim, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged copy of ours is made again, whatever broke it
        log.warning("slim checkpoint copy %s cannot be read (%s): made again", slim, exc)
        return None
    with contextlib.suppress(OSError):
        os.utime(slim)  # a use: the node cache removes the copies used longest ago first
    return state if isinstance(state, dict) else None


def _write_slim(slim: str, state: Mapping[str, torch.Tensor]) -> None:
    """Write a slim copy atomically (a concurrent actor may write the same one); a node cache that
    cannot take it only costs the next start the slow read."""
    tmp = f"{slim}.part-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(slim), exist_ok=True)
        torch.save(dict(state), tmp)
        os.replace(tmp, slim)
        storage.trim_node_cache(os.path.dirname(slim), storage.node_cache_bytes())  # 145 MB more
    except (OSError, RuntimeError) as exc:  # torch.save reports a full or unwritable disk as RuntimeError
        log.warning("slim checkpoint copy %s not written (%s): the next start reads the checkpoint again", slim, exc)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fetch(uri: str, where: str, pinned: str | None = None) -> str:
    try:
        if pinned is not None and _replaced_since(uri, pinned):  # before a copy of the other file is made
            raise CheckpointError(_replaced(where, uri))
        # `content`: where the store names no version, the pinned version is the content's fingerprint
        path = storage.local_copy(uri, content=pinned)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{where}: not found") from exc
    except storage.ContentChanged as exc:
        raise CheckpointError(_replaced(where, uri)) from exc
    if os.path.isdir(path):
        raise CheckpointError(f"{where}: is a directory, not a file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: not found")
    return path


def _read(path: str, where: str, expected: Layout) -> Any:
    """Deserialize without running code; refuse anything that is not a PyTorch file."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty (0 bytes), probably an interrupted download")
    with open(path, "rb") as fh:
        head = fh.read(64)
    _refuse_non_pytorch(head, where)
    if _is_torchscript(path):
        try:
            # The TorchScript loader compiles the archive's TorchScript code; no Python pickle runs.
            return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as exc:
            raise CheckpointError(_corrupt(where, size, expected, exc)) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(_corrupt(where, size, expected, exc)) from exc
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(exc))
        detail = found.group(1).strip() if found else "unsupported content"
        raise CheckpointError(
            f"{where}: refused: the file holds Python objects other than tensors and plain containers, "
            f"and unpickling them could run arbitrary code ({detail}). Only weights_only loading is "
            "allowed; re-save just the model's state_dict from a trusted environment."
        ) from exc
    except Exception as exc:
        raise CheckpointError(_corrupt(where, size, expected, exc)) from exc


def _refuse_non_pytorch(head: bytes, where: str) -> None:
    """PyTorch files are zip archives (b'PK') or protocol-2 pickles (b'\\x80'); say what else it is."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        raise CheckpointError(
            f"{where}: starts with '<' ({_snippet(text)}): it looks like a web page (HTML), not a checkpoint. "
            "The download link probably returned a page (a login, a 'virus scan' notice, or a Hugging Face "
            "/blob/ URL instead of /resolve/)."
        )
    if text.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{where}: is a Git LFS pointer file, not the weights; fetch the LFS object")
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(
            f"{where}: starts with {_snippet(head)}, which is neither a PyTorch zip archive nor a pickle: "
            "not a checkpoint"
        )


def _snippet(data: bytes) -> str:
    return repr(data[:24].decode("utf-8", "replace"))


def _is_torchscript(path: str) -> bool:
    """torch.jit.save archives carry compiled code and constants; torch.save archives do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False  # torch.load will report it as corrupt


def _corrupt(where: str, size: int, expected: Layout, exc: BaseException) -> str:
    weights = 4 * sum(math.prod(shape) for shape in expected.values())
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unexpected end of file"
    return (
        f"{where}: cannot be read, the file is truncated or corrupt ({size:,} bytes; the float32 "
        f"weights alone take {weights:,} bytes): {type(exc).__name__}: {reason}"
    )


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a training checkpoint, or the object itself when it is one."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()):
        keys = ", ".join(repr(key) for key in list(obj)[:8])
        raise CheckpointError(
            f"{where}: holds a dict with keys [{keys}] that has no 'state_dict' entry and is not a state_dict itself"
        )
    return dict(obj)


def _check_layout(state: Mapping[str, torch.Tensor], expected: Layout, model_name: str, where: str) -> None:
    missing = [key for key in expected if key not in state and not key.endswith(_BN_COUNTER)]
    unexpected = [key for key in state if key not in expected]
    wrong = [
        f"{key}: expected {tuple(expected[key])}, found {tuple(state[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key])
    ]
    if not (missing or unexpected or wrong):
        # a diverged or damaged file: it would load, render every mouth black (the renderer's guard
        # makes NaN 0) and fail no row
        # (a tensor's sum is NaN or infinite where any value is: 10 ms for Wav2Lip's 36 M, isfinite 95;
        # summed in float64: an fp16 file's finite values overflowed fp16's sum, past 65504)
        broken = [
            k
            for k in expected
            if k in state and state[k].is_floating_point() and not state[k].sum(dtype=torch.float64).isfinite()
        ]
        if broken:
            raise CheckpointError(
                f"{where}: {len(broken)} tensor(s) hold NaN or infinite values (e.g. {', '.join(broken[:_EXAMPLES])}): "
                "a damaged or diverged checkpoint"
            )
        return
    problems = [
        f"{label} {len(items)} (e.g. {', '.join(items[:_EXAMPLES])})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    ]
    message = (
        f"{where}: does not match the {model_name} layout: expected {len(expected)} tensors, "
        f"found {len(state)}; " + "; ".join(problems)
    )
    found_as, expected_as = _identify(state), _identify(expected)
    if found_as is not None and found_as != expected_as:
        message += f". These are the {found_as} weights, not the {model_name}: check which file is configured"
    raise CheckpointError(message)


def _identify(keys: Mapping[str, Any]) -> str | None:
    for name, signature in _SIGNATURES.items():
        if signature.issubset(keys):
            return name
    return None
