"""The campaign manifest: a Parquet table of audio/avatar pairs, read and validated as a whole before
any rendering starts, and `build_manifest` for the common cross-product campaigns."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from heygem_ray import storage
from heygem_ray.errors import ManifestError
from heygem_ray.plan import stable_hash

REQUIRED = ("audio", "avatar")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class Row:
    id: str
    audio: str
    avatar: str
    output: str
    box: tuple[int, int, int, int] | None = None


def default_id(audio: str, avatar: str) -> str:
    return stable_hash(audio, avatar, length=12)


def read_manifest(uri: str, output_root: str, allow_outside_output: bool = False) -> list[Row]:
    """Read and validate a manifest; raise ManifestError listing what is wrong."""
    try:
        with storage.open_uri(uri) as fh:
            table = pq.ParquetFile(fh).read()  # read_table would import pyarrow.dataset and pandas (0.4 s)
    except FileNotFoundError:
        raise ManifestError(f"manifest {storage.display(uri)} does not exist") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {storage.display(uri)} is not a readable Parquet file: {exc}") from None
    return rows_from_table(table, output_root, storage.display(uri), allow_outside_output)


def rows_from_table(
    table: pa.Table, output_root: str, name: str = "manifest", allow_outside_output: bool = False
) -> list[Row]:
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{name} lacks required column(s) {', '.join(missing)}; "
            f"it has {', '.join(table.column_names) or 'no columns'}"
        )
    problems: list[str] = []
    for column in ("audio", "avatar", "id", "output"):
        if column in table.column_names and not (
            pa.types.is_string(table[column].type) or pa.types.is_large_string(table[column].type)
        ):
            problems.append(f"column {column!r} must hold strings, not {table[column].type}")
    if problems:
        raise ManifestError(f"{name}: " + "; ".join(problems))

    data = table.to_pylist()
    rows: list[Row] = []
    for n, record in enumerate(data):
        where = f"row {n}"
        audio, avatar = record.get("audio"), record.get("avatar")
        if not audio or not avatar:
            problems.append(f"{where}: empty {'audio' if not audio else 'avatar'}")
            continue
        row_id = record.get("id") or default_id(audio, avatar)
        if not _SAFE_ID.fullmatch(row_id):  # fullmatch: "$" alone would let "abc\n" through
            problems.append(f"{where}: id {row_id!r} must be 1-200 letters, digits, '.', '_' or '-'")
            continue
        output = record.get("output") or f"{row_id}.mp4"
        if storage.protocol(output) == "file" and not output.startswith(("/", "~", "file://")):
            output = storage.join(output_root, output)  # relative outputs live under the campaign root
        if not allow_outside_output and not _is_under(output, output_root):
            problems.append(
                f"{where}: output {storage.display(output)} is outside the output root "
                f"{storage.display(output_root)} (set storage.allow_outside_output=true to allow)"
            )
            continue
        try:
            box = _parse_box(record.get("box"))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        rows.append(Row(row_id, audio, avatar, output, box))

    _check_unique([r.id for r in rows], "id", problems)
    _check_unique([storage.normalize(r.output) for r in rows], "output", problems)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ManifestError(f"{name} is invalid:\n  " + "\n  ".join(shown))
    if not rows:
        raise ManifestError(f"{name} has no rows")
    return rows


def _is_under(uri: str, root: str) -> bool:
    uri, root = storage.normalize(uri), storage.normalize(root)
    return uri.startswith(root.rstrip("/") + "/") and "/../" not in uri + "/"


def _parse_box(value: object) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    parts: Iterable[Any] = ()
    if isinstance(value, str):
        parts = [v for v in re.split(r"[,\s]+", value.strip("[]() ")) if v]
    elif isinstance(value, Iterable):
        parts = value
    try:
        box = [int(float(v)) for v in parts]
    except (TypeError, ValueError):
        raise ValueError(f"box {value!r} must be four numbers x1, y1, x2, y2") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise ValueError(f"box {value!r} must be x1, y1, x2, y2 with x2 > x1 >= 0 and y2 > y1 >= 0")
    return box[0], box[1], box[2], box[3]


def _check_unique(values: list[str], what: str, problems: list[str]) -> None:
    seen: dict[str, int] = {}
    for value in values:
        seen[value] = seen.get(value, 0) + 1
    dupes = [v for v, count in seen.items() if count > 1]
    if dupes:
        problems.append(
            f"duplicate {what}s: {', '.join(map(storage.display, dupes[:5]))}"
            + (f" and {len(dupes) - 5} more" if len(dupes) > 5 else "")
        )


def expand(patterns: list[str]) -> list[str]:
    """URIs and globs to a sorted, de-duplicated URI list (a pattern matching nothing is an error)."""
    out: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = storage.glob(pattern)
            if not matches:
                raise ManifestError(f"{storage.display(pattern)} matches no files")
            out.extend(matches)
        else:
            out.append(pattern)
    return list(dict.fromkeys(out))


def build_manifest(audio: list[str], avatar: list[str], out_uri: str, limit: int | None = None) -> int:
    """Write the cross product of audio x avatar URIs/globs (first `limit` pairs if given) as a Parquet
    manifest; return its row count. Ids name both inputs (`<audio stem>__<avatar stem>`), made unique
    with a hash when stems repeat."""
    audios, avatars = expand(audio), expand(avatar)
    pairs = [(a, v) for a in audios for v in avatars][:limit]
    ids = [_pair_id(a, v) for a, v in pairs]
    if len(set(ids)) < len(ids):
        ids = [f"{i}-{default_id(a, v)[:6]}" for i, (a, v) in zip(ids, pairs)]
    table = pa.table({"id": ids, "audio": [a for a, _ in pairs], "avatar": [v for _, v in pairs]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(out_uri, buf.getvalue())
    return len(pairs)


def _pair_id(audio: str, avatar: str) -> str:
    def stem(uri: str) -> str:
        name = storage.basename(uri)
        name = name.rsplit(".", 1)[0] if "." in name else name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "x"

    return f"{stem(audio)}__{stem(avatar)}"[:200]
