"""The campaign manifest: a Parquet table of audio/avatar pairs, read and checked before any rendering
starts (a row that cannot run is refused with why, the others go on), and `build_manifest` for the
common cross-product campaigns."""

from __future__ import annotations

import fnmatch
import functools
import io
import itertools
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from heygem_ray import storage
from heygem_ray.config import in_ray_job
from heygem_ray.errors import ManifestError
from heygem_ray.layout import RESERVED
from heygem_ray.plan import stable_hash

REQUIRED = ("audio", "avatar")
#: the columns a manifest may have besides REQUIRED
OPTIONAL = ("id", "output", "box")
#: what a row id may be: a plain file name (ids name outputs, markers and thumbnails)
#: the most UTF-8 bytes of an id: a row's files are named by it (`<id>.mp4`, `_markers/<id>.json`),
#: and a file name takes 255 at most
ID_BYTES = 200


def _name_char(ch: str) -> bool:
    """A letter or digit of any script, a mark that goes with one (Devanagari's vowel signs), or
    one of `.`, `_`, `-`."""
    return ch in "._-" or unicodedata.category(ch)[0] in "LNM"


def is_safe_id(text: str) -> bool:
    """Whether `text` may name a row and its files: 1 to ID_BYTES bytes of `_name_char`s starting
    with a letter or digit, in one Unicode form (NFC: macOS's "é" and Linux's are one name)."""
    return (
        0 < len(text.encode()) <= ID_BYTES
        and unicodedata.category(text[0])[0] in "LN"
        and all(_name_char(ch) for ch in text)
        and unicodedata.is_normalized("NFC", text)
    )


def plain_name(text: str) -> str:
    """`text` in NFC with each run of characters that are not `_name_char`s (blanks, `!`, `/`,
    controls, emoji) made one `-`: a name for a file, kept in its own script. Kept to ASCII,
    "张三" was nothing and "Привет" too: their videos were `x__x-<hash>`, no telling which was which."""
    text = unicodedata.normalize("NFC", text)
    return "".join("".join(run) if plain else "-" for plain, run in itertools.groupby(text, key=_name_char))


@dataclass(frozen=True)
class Row:
    id: str
    audio: str
    avatar: str
    output: str
    box: tuple[int, int, int, int] | None = None
    #: why this row cannot run (its result says so, and the other rows run), or None
    refused: str | None = None


def default_id(audio: str, avatar: str) -> str:
    """A row's id where the manifest gives none: of its inputs' URIs as written, less their
    signatures (a presigned URL signed anew for a rerun gave every row a new id, and the rerun
    rendered every row again under new names)."""
    return stable_hash(storage.unsigned(audio), storage.unsigned(avatar), length=12)


def read_manifest(uri: str, output_root: str, allow_outside_output: bool = False) -> list[Row]:
    """Read and validate a manifest; raise ManifestError listing what is wrong."""
    try:
        with storage.open_uri(uri) as fh:
            table = pq.ParquetFile(fh).read()  # read_table would import pyarrow.dataset and pandas (0.4 s)
    except FileNotFoundError:
        raise ManifestError(f"manifest {storage.display(uri)} does not exist") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {storage.display(uri)} is not a readable Parquet file: {exc}") from None
    case_blind = storage.case_blind(output_root)
    return rows_from_table(table, output_root, storage.display(uri), allow_outside_output, case_blind, manifest=uri)


def rows_from_table(
    table: pa.Table,
    output_root: str,
    name: str = "manifest",
    allow_outside_output: bool = False,
    case_blind: bool = False,
    manifest: str | None = None,
) -> list[Row]:
    """One Row per manifest row, in order. A row that cannot run is kept, refused with why
    (`Row.refused`), so that its result says so and the rest of the campaign goes on; a problem of the
    whole table (a column missing or of the wrong type, no rows, no row that can run) raises
    ManifestError. Column names are taken without a byte-order mark, spaces or case (a spreadsheet's
    UTF-8 CSV starts "\ufeffaudio", which printed as the "audio" it said was missing).
    `case_blind`: the output root's file system takes names differing in case for one (macOS,
    Windows, SMB), where rows "Intro" and "intro" would share a video, a marker and a thumbnail.
    `manifest`: where the table was read from, which no row may write over."""
    table = table.rename_columns([column_name(c) for c in table.column_names])
    repeated = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if repeated:
        raise ManifestError(f"{name} has the column(s) {', '.join(repeated)} more than once")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{name} lacks required column(s) {', '.join(missing)}; "
            f"it has {', '.join(table.column_names) or 'no columns'}"
        )
    problems = misspelled(table.column_names)
    table = _text_columns(table, ("audio", "avatar", "id", "output"), problems)
    if problems:
        raise ManifestError(f"{name}: " + "; ".join(problems))
    root = _Root(output_root, storage.normalize(output_root).rstrip("/"))
    cells = [_read_row(n, record, root, allow_outside_output) for n, record in enumerate(table.to_pylist())]
    if not cells:
        raise ManifestError(f"{name} has no rows")
    _refuse_repeats(cells, case_blind, manifest)
    for cell in cells:  # after the other checks of outputs, which say more where they apply
        problem = _output_name_problem(cell.output) if cell.output else None
        if problem:
            cell.refuse(f"output {storage.display(cell.output)} {problem}")
    rows = [cell.row() for cell in cells]
    if all(row.refused for row in rows):
        refused = [row.refused or "" for row in rows]
        shown = refused[:20] + ([f"... and {len(refused) - 20} more"] if len(refused) > 20 else [])
        raise ManifestError(f"{name} has no row that can run:\n  " + "\n  ".join(shown))
    return rows


_RESERVED_FOLDED = {name.casefold() for name in RESERVED}


def column_name(name: str) -> str:
    """A manifest column's name as read: without a byte-order mark or blanks, ours in any case."""
    plain = name.replace("\ufeff", "").strip()
    return plain.lower() if plain.lower() in (*REQUIRED, *OPTIONAL) else plain


def misspelled(columns: list[str]) -> list[str]:
    """A problem for each column that is none of ours but one slip from one we read ("outptu",
    "ouptut", "boxes"): left aside, its rows' videos went to the default path and their faces to
    the detector. Other columns (a campaign's own notes, its `uid` or `idx`) are left aside."""
    problems = []
    for column in columns:
        if column in (*REQUIRED, *OPTIONAL):
            continue
        near = next((c for c in OPTIONAL if c not in columns and _one_slip(column.lower(), c)), None)
        if near:
            problems.append(
                f"column {column!r} is not one heygem_ray reads: did you mean {near!r}? (rename or drop it)"
            )
    return problems


def _one_slip(typed: str, meant: str) -> bool:
    """Whether `typed` is `meant` as a plural, or with two letters swapped, or (for a name of 3
    letters or more: "id" is one letter from "uid", "ad", "in", columns of their own) one letter
    wrong, missing or extra."""
    if typed in (meant + "s", meant + "es"):
        return True
    if len(meant) < 3:
        return typed == meant[::-1]
    if len(typed) == len(meant):
        wrong = [i for i, (a, b) in enumerate(zip(typed, meant, strict=True)) if a != b]
        swapped = len(wrong) == 2 and wrong[1] == wrong[0] + 1 and typed[wrong[0]] == meant[wrong[1]]
        return len(wrong) == 1 or (swapped and typed[wrong[1]] == meant[wrong[0]])
    if abs(len(typed) - len(meant)) != 1:
        return False
    short, long = sorted((typed, meant), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _check_job_path(uri: str, column: str, problems: list[str]) -> None:
    """A relative local input is refused in a Ray job: the job and its workers run in Ray's copy of
    its working directory, which holds no media (a relative path then names nothing, or the wrong
    file). Elsewhere it is relative to the folder the campaign was started in (`_read_row` makes it
    absolute there: a joined cluster's workers run where its head was started)."""
    if storage.is_relative(uri) and in_ray_job():
        problems.append(
            f"{column} {_shown(uri)} is a relative path: a Ray job runs in Ray's copy of its working directory, "
            "without media; give absolute paths or URIs (heygem-ray manifest writes them)"
        )


def refusals(rows: list[Row], name: str = "manifest") -> None:
    """Raise ManifestError saying why, if any row is refused: for a manifest checked before it is
    launched, where a person can still mend it."""
    refused = [row.refused for row in rows if row.refused]
    if refused:
        shown = refused[:20] + ([f"... and {len(refused) - 20} more"] if len(refused) > 20 else [])
        raise ManifestError(f"{name} is invalid:\n  " + "\n  ".join(shown))


@dataclass
class _Cells:
    """One manifest row as read, before the checks across rows."""

    n: int
    id: str | None  # None: none usable
    derived: bool  # the id was made from audio + avatar
    audio: str = ""
    avatar: str = ""
    output: str = ""
    normal_output: str = ""  # `storage.normalize(output)`, made once (100,000 rows: seconds)
    box: tuple[int, int, int, int] | None = None
    problem: str | None = None

    def refuse(self, problem: str) -> None:
        self.problem = self.problem or f"manifest row {self.n}: {problem}"

    def row(self) -> Row:
        # a refused row without an id of its own is named "#<row number>", which no valid id can be
        row_id = self.id if self.id is not None else f"#{self.n}"
        return Row(row_id, self.audio, self.avatar, self.output, self.box, self.problem)


@dataclass(frozen=True)
class _Root:
    """The output root as given (relative outputs are joined onto it, as the campaign's own files
    are) and normalized (`storage.normalize`, made once: compared with every row's output)."""

    given: str
    normal: str


def _read_row(n: int, record: dict[str, Any], output_root: _Root, allow_outside_output: bool) -> _Cells:
    """The row's cells read and checked alone."""
    cell = _Cells(n, None, False)
    problems: list[str] = []
    audio, avatar = (_uri(record.get(c), c, problems) for c in ("audio", "avatar"))
    cell.audio, cell.avatar = audio or "", avatar or ""
    for uri, column in ((cell.audio, "audio"), (cell.avatar, "avatar")):
        _check_job_path(uri, column, problems)
    if not problems:  # the derived id below keeps the paths as written: a rerun finds the same rows
        cell.audio, cell.avatar = storage.anchored(cell.audio), storage.anchored(cell.avatar)
    if problems or not audio or not avatar:
        cell.refuse(problems[0] if problems else f"empty {'audio' if not audio else 'avatar'}")
    row_id = (record.get("id") or "").strip() or None  # a spreadsheet's " b", or a blank cell
    if row_id is None and audio and avatar:
        row_id, cell.derived = default_id(audio, avatar), True
    if row_id is not None:
        row_id = unicodedata.normalize("NFC", row_id)
    if row_id is not None and not is_safe_id(row_id):
        cell.refuse(
            f"id {_shown(row_id)} must be letters (of any script), digits, '.', '_' or '-', starting with a "
            f"letter or digit, {ID_BYTES} bytes at most"
        )
        return cell
    cell.id = row_id
    if row_id is None:
        return cell
    output = _uri(record.get("output"), "output", problems) or f"{row_id}.mp4"
    if problems:
        cell.refuse(problems[-1])
        return cell
    if output.endswith("/"):  # a folder: the row's video goes in it under the row's name
        output += f"{row_id}.mp4"
    own = output  # the row's own part of its output's path (a root's own `//` is the root's)
    if storage.protocol(output) == "file" and not output.startswith(("/", "~", "file://")):
        output = storage.join(output_root.given, output)  # relative outputs live under the campaign root
    elif output.startswith(output_root.given.rstrip("/") + "/"):
        own = output[len(output_root.given.rstrip("/")) :]
    if not storage.is_local(output) and "//" in own.split("://", 1)[-1]:
        # an object store keeps an empty name (`bkt//a`) where every check reads the one without it
        cell.refuse(f"output {storage.display(output)} holds an empty name (//)")
        return cell
    cell.output, cell.normal_output = output, storage.normalize(output)
    under = _is_under(cell.normal_output, output_root.normal)
    if not allow_outside_output and not under:
        cell.refuse(
            f"output {storage.display(output)} is outside the output root {storage.display(output_root.given)} "
            "(set storage.allow_outside_output=true to allow)"
        )
    elif under:
        # at any depth: a folder below may be another campaign's output root (`/out/b` beside `/out`);
        # in any case: a case-blind disk (macOS, SMB) takes it for ours
        parts = cell.normal_output[len(output_root.normal) + 1 :].split("/")
        ours = next((part for part in parts if part.casefold() in _RESERVED_FOLDED), None)
        if ours is not None:
            whose = "the campaign keeps" if ours == parts[0] else "a campaign keeps"
            cell.refuse(f"output {storage.display(output)} is where {whose} {ours}")
    try:
        cell.box = _parse_box(record.get("box"))
    except ValueError as exc:
        cell.refuse(str(exc))
    return cell


#: what a row's video may be named: it is an MP4 (H.264 and AAC), which these name
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
#: bytes a name in a local output's path may take, as file systems do (the hidden name a file is
#: published under first is cut to fit: `storage._part_name`)
NAME_BYTES = 255


def _output_name_problem(output: str) -> str | None:
    """Why a row's output cannot be named so (None: it can): a name no player takes for an MP4, or
    one a file system refuses. Found when it was published, after the row had rendered."""
    name = storage.basename(output)
    if not name.lower().endswith(VIDEO_SUFFIXES):
        return f"is not named as the MP4 video it will be: end its name in {', '.join(VIDEO_SUFFIXES)}"
    if storage.protocol(output) in storage.OBJECT_STORES:  # a key has no names, only its whole length
        return None
    longest = max(output.split("://", 1)[-1].split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > NAME_BYTES:
        return f"has a name of {len(longest.encode())} bytes in its path: at most {NAME_BYTES}"
    return None


def _refuse_repeats(cells: list[_Cells], case_blind: bool = False, manifest: str | None = None) -> None:
    """Refuse every row of an id or an output that several rows share (which of them was meant is
    not ours to guess; `case_blind`: ids and outputs differing only in case are one), and a row
    whose output is one of the campaign's inputs or its manifest (a rerun could not read it). Rows
    of a shared id lose it, so that each result names one row."""
    by_id: dict[str, list[_Cells]] = {}
    by_output: dict[str, list[_Cells]] = {}
    for cell in cells:
        if cell.id is not None:
            by_id.setdefault(cell.id.casefold() if case_blind else cell.id, []).append(cell)
        if cell.output:
            output = cell.normal_output
            by_output.setdefault(output.casefold() if case_blind else output, []).append(cell)
    for sharing in by_id.values():
        if len(sharing) > 1:
            derived = all(other.derived for other in sharing)
            for cell, others in _others(sharing):
                # named for what the user wrote, not for an id they never saw
                if derived:
                    cell.refuse(f"the same audio and avatar as row(s) {others} (give them ids)")
                else:
                    blind = " (ids differing only in case share files on the output's file system)"
                    cell.refuse(f"id {cell.id!r} is also that of row(s) {others}{blind if case_blind else ''}")
                cell.id = None
    for sharing in by_output.values():
        if len(sharing) > 1:
            for cell, others in _others(sharing):
                cell.refuse(f"output {storage.display(cell.output)} is also that of row(s) {others}")
    for cell in cells:  # `a.mp4/b.mp4` beside `a.mp4`: one is a folder, the other a file
        parent = cell.normal_output.rsplit("/", 1)[0] if cell.output else ""
        while "/" in parent.rstrip("/"):
            if (parent.casefold() if case_blind else parent) in by_output:
                file_row = by_output[parent.casefold() if case_blind else parent][0].n
                cell.refuse(f"output {storage.display(cell.output)} is in a folder that is row {file_row}'s output")
                break
            parent = parent.rsplit("/", 1)[0]

    def key(uri: str) -> str:
        return uri.casefold() if case_blind else uri

    inputs = {
        key(storage.normalize(uri)) for uri in {uri for cell in cells for uri in (cell.audio, cell.avatar) if uri}
    }
    read_from = key(storage.normalize(manifest)) if manifest else None
    for cell in cells:
        if cell.output and key(cell.normal_output) == read_from:
            cell.refuse(f"output {storage.display(cell.output)} is the campaign's manifest")
        elif cell.output and key(cell.normal_output) in inputs:
            cell.refuse(f"output {storage.display(cell.output)} is one of the campaign's inputs")


def _others(sharing: list[_Cells]) -> Iterator[tuple[_Cells, str]]:
    """Each row of `sharing` with the other rows' numbers, the first five (a thousand rows of one id
    must not make a thousand messages of a thousand numbers each, nor a million numbers to cut)."""
    first = [str(cell.n) for cell in sharing[:6]]
    more = len(sharing) - 1 - 5
    for k, cell in enumerate(sharing):
        others = [n for j, n in enumerate(first) if j != k][:5]
        yield cell, ", ".join(others) + (f" and {more} more" if more > 0 else "")


def _shown(value: object) -> str:
    """A cell as a message shows it: quoted, and cut short (a cell may hold a whole file)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:76] + "...'"


def _text_columns(table: pa.Table, columns: tuple[str, ...], problems: list[str]) -> pa.Table:
    """The table with its text columns as strings: pandas' categoricals (dictionaries), string
    views and all-null optional columns are strings too, and whole-number ids (pandas' default
    index, 0, 1, 2, ..., as the studio takes them) their decimal text; anything else is a problem."""
    for column in columns:
        if column not in table.column_names:
            continue
        kind = table[column].type
        if table[column].null_count == len(table) and not pa.types.is_null(kind):
            # a spreadsheet's column left blank: pandas reads it as numbers (NaN), all missing
            index = table.column_names.index(column)
            table = table.set_column(index, column, pa.nulls(len(table), pa.string()))
        elif pa.types.is_null(kind) or is_text(kind) or (column == "id" and pa.types.is_integer(kind)):
            index = table.column_names.index(column)
            table = table.set_column(index, column, table[column].cast(pa.string()))
        else:
            problems.append(f"column {column!r} must hold strings, not {table[column].type}")
    return table


def is_text(kind: pa.DataType) -> bool:
    """Whether a column of this Arrow type holds text: strings of any width, string views, and
    pandas' categoricals of them (dictionaries)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or bool(view and view(kind))


def _uri(value: str | None, column: str, problems: list[str]) -> str | None:
    """A URI cell without surrounding blanks (a pasted "a.wav\n"); None if empty or if it holds a
    control character (recorded as a problem)."""
    value = (value or "").strip()
    # printable text (most cells) holds none: Python's "printable" leaves out every Other and Separator
    if not value.isprintable() and any(_is_control(ch) for ch in value):
        problems.append(f"{column} {_shown(value)} holds a control character")
        return None
    if value and (problem := storage.scheme_problem(value)) is not None:
        problems.append(f"{column} {_shown(value)}: {problem}")
        return None
    return value or None


#: bidirectional embeddings, overrides and isolates: a name that shows other than it is
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _is_control(ch: str) -> bool:
    """C0 and C1 controls and DEL, line and paragraph separators, bidi controls: nothing a file name
    holds on purpose, and each breaks or disguises the logs and messages that show it."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS


def _is_under(uri: str, root: str) -> bool:
    """Whether `uri` is inside `root`, both normalized (`storage.normalize`)."""
    return uri.startswith(root.rstrip("/") + "/") and "/../" not in uri + "/"


def _parse_box(value: object) -> tuple[int, int, int, int] | None:
    if value is None or (isinstance(value, str) and not value.strip()):  # a blank cell: no box
        return None
    parts: Iterable[Any] = ()
    if isinstance(value, str):
        parts = [v for v in re.split(r"[,\s]+", value.strip("[]() ")) if v]
    elif isinstance(value, Iterable):
        parts = value
    try:
        box = [int(float(v)) for v in parts]
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf
        raise ValueError(f"box {_shown(value)} must be four numbers x1, y1, x2, y2") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise ValueError(f"box {_shown(value)} must be x1, y1, x2, y2 with x2 > x1 >= 0 and y2 > y1 >= 0")
    return box[0], box[1], box[2], box[3]


def expand(patterns: list[str], leave_out: str = "") -> list[str]:
    """URIs and globs to a sorted, de-duplicated URI list (a pattern matching nothing is an error).
    A file that exists under the name given is that file, glob characters or not ("clip [abc].mp4",
    as yt-dlp names downloads): as a pattern it named another file, or none. `leave_out`: a file no
    pattern takes (the manifest being written, which a rebuild's glob matched as a presenter)."""
    out: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?[") and not storage.exists(pattern):
            # files only, and none hidden nor in a hidden folder the pattern reaches: "aud/*" took
            # .DS_Store, notes and sub-folders as narrations, "aud/**/*.wav" a .Trash's
            fixed = pattern[: min(pattern.find(ch) for ch in "*?[" if ch in pattern)].rpartition("/")[0]
            base = (storage.local_path(fixed or ".") if storage.is_local(pattern) else fixed).rstrip("/")
            matched = storage.versions(pattern)
            below = (pattern[len(fixed) :] if fixed else pattern).lstrip("/").split("/")
            matches = [uri for uri in matched if not _hidden(uri, base, below) and not _same_file(uri, leave_out)]
            if not matches:
                raise ManifestError(f"{storage.display(pattern)} matches no files")
            out.extend(_usable(matches, pattern))
        elif not storage.exists(pattern):
            raise ManifestError(f"{storage.display(pattern)} does not exist")
        elif storage.info(pattern).get("type") == "directory":
            raise ManifestError(f"{storage.display(pattern)} is a folder: give its files, e.g. {pattern.rstrip('/')}/*")
        else:
            out.extend(_usable([pattern], pattern))  # a shell's glob gives names as they are
    # local paths absolute, as globs give them: the manifest means the same files from any folder
    # (a job's workers run in Ray's copy of its working directory), and one file is one file
    return list(dict.fromkeys(storage.local_path(u) if storage.is_local(u) else u for u in out))


def _same_file(uri: str, other: str) -> bool:
    """Whether two URIs name one file: local paths through links (a folder reached by a link, macOS's
    /tmp), others as their file system sees them (`memory:///a` and `memory://a`)."""
    if not other:
        return False
    if storage.is_local(uri) and storage.is_local(other):
        return os.path.realpath(storage.local_path(uri)) == os.path.realpath(storage.local_path(other))
    if storage.protocol(uri) != storage.protocol(other):
        return False
    return storage.url_to_fs(uri)[1].strip("/") == storage.url_to_fs(other)[1].strip("/")


def _usable(matches: list[str], pattern: str) -> list[str]:
    """`matches` of `pattern`, or ManifestError naming those no row could use: a link to nothing
    (its row would fail as "does not exist"), a name that is not UTF-8 (a Windows zip's Latin-1:
    no manifest can hold it)."""
    dangling = [uri for uri in matches if storage.is_local(uri) and not os.path.exists(storage.local_path(uri))]
    if dangling:
        shown = ", ".join(storage.display(uri) for uri in dangling[:5])
        raise ManifestError(f"{storage.display(pattern)} matches link(s) to nothing: {shown}")
    undecodable = [uri for uri in matches if not _utf8(uri)]
    if undecodable:
        shown = ", ".join(ascii(storage.basename(uri)) for uri in undecodable[:5])
        given = storage.display(pattern) if _utf8(pattern) else "a path given"  # printed as is, it could not be
        raise ManifestError(f"{given} matches file name(s) that are not UTF-8: {shown} (rename them)")
    return matches


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _hidden(uri: str, base: str, pattern: list[str]) -> bool:
    """Whether `uri`, matched below the folder `base` by the names `pattern` (the pattern's parts
    below it), is hidden or in a hidden folder below it that the pattern did not name with its dot,
    as a shell's glob: `.intro.w[a]v` takes `.intro.wav`, `*` does not (nor does `**`)."""
    below = uri[len(base) :] if uri.startswith(base) else storage.basename(uri)
    parts = below.strip("/").split("/")

    @functools.cache
    def shown(i: int, j: int) -> bool:  # parts[i:] matched by pattern[j:], a hidden part only by a dot
        if j == len(pattern):
            return i == len(parts)
        if pattern[j] == "**":  # any number of parts, none hidden
            return shown(i, j + 1) or (i < len(parts) and not parts[i].startswith(".") and shown(i + 1, j))
        named = i < len(parts) and fnmatch.fnmatchcase(parts[i], pattern[j])
        return named and (not parts[i].startswith(".") or pattern[j].startswith(".")) and shown(i + 1, j + 1)

    return not shown(0, 0)


def build_manifest(audio: list[str], avatar: list[str], out_uri: str, limit: int | None = None) -> int:
    """Write the cross product of audio x avatar URIs/globs (first `limit` pairs if given) as a Parquet
    manifest; return its row count. Ids name both inputs (`<audio stem>__<avatar stem>`), made unique
    with a hash when stems repeat. A pair the manifest at `out_uri` had keeps its id there: a
    manifest rebuilt with more files renders only the new pairs."""
    audios, avatars = expand(audio, leave_out=out_uri), expand(avatar, leave_out=out_uri)
    if any(_same_file(uri, out_uri) for uri in (*audios, *avatars)):
        raise ManifestError(f"--out {storage.display(out_uri)} is one of the inputs: give the manifest another name")
    if not storage.basename(out_uri).lower().endswith(".parquet"):  # a Parquet file named `.csv` opens as garbage
        raise ManifestError(
            f"--out {storage.display(out_uri)}: the manifest is a Parquet file: end its name in .parquet"
        )
    pairs = [(a, v) for a in audios for v in avatars][:limit]
    kept = _earlier_ids(out_uri)
    ids = [kept.get(pair) or _pair_id(*pair) for pair in pairs]
    # a new pair whose id repeats another's gets a hash, and so does the first of them unless an
    # earlier build named it so: one new file whose stem repeated another's renamed that row (its
    # video rendered again under the new name, the old one left behind)
    repeated = {i for i, count in Counter(ids).items() if count > 1}
    ids = [
        f"{_cut(i, ID_BYTES - 7)}-{default_id(*pair)[:6]}" if i in repeated and kept.get(pair) != i else i
        for i, pair in zip(ids, pairs, strict=True)
    ]
    table = pa.table({"id": ids, "audio": [a for a, _ in pairs], "avatar": [v for _, v in pairs]})
    table = table.replace_schema_metadata(WRITTEN_BY)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(out_uri, buf.getvalue())
    return len(pairs)


#: the schema metadata of the manifests `build_manifest` writes: the only files it writes over
WRITTEN_BY = {b"heygem_ray.written_by": b"heygem-ray manifest"}
_BUILT_COLUMNS = ["id", "audio", "avatar"]


def _earlier_ids(uri: str) -> dict[tuple[str, str], str]:
    """The ids a manifest at `uri` gave its (audio, avatar) pairs; none where there is none. A file
    there that `build_manifest` did not write is refused, not written over: a manifest made by hand
    or by a script (other columns, boxes, notes) lost its rows and columns. A store that cannot be
    read raises: rebuilt as new, its rows whose stems repeat would be renamed."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return {}
    try:
        table = pq.read_table(io.BytesIO(data))
    except (ValueError, pa.ArrowException):
        table = None
    # its three columns alone (one given a `box` or `notes` column since, its mark kept, is the
    # user's now), and its mark, or no other writer's metadata (one written before manifests were marked)
    metadata = (table.schema.metadata or {}) if table is not None else {}
    built = (
        table is not None
        and table.column_names == _BUILT_COLUMNS
        and (metadata.items() >= WRITTEN_BY.items() or not metadata)
    )
    if table is None or not built:
        raise ManifestError(
            f"{storage.display(uri)} exists and is no manifest `heygem-ray manifest` wrote: give --out another "
            "name, or remove it"
        ) from None
    columns = table.select(_BUILT_COLUMNS).to_pydict()
    counts = Counter(columns["id"])
    return {
        (a, v): i
        for i, a, v in zip(columns["id"], columns["audio"], columns["avatar"], strict=True)
        # a hand-edited one's ids only where a run would take them
        if isinstance(i, str) and is_safe_id(i) and counts[i] == 1
    }


def _pair_id(audio: str, avatar: str) -> str:
    def stem(uri: str) -> str:
        name = storage.basename(uri)
        name = name.rsplit(".", 1)[0] if "." in name else name
        return plain_name(name).strip("-._") or "x"  # ids start with a letter or digit

    return _cut(f"{stem(audio)}__{stem(avatar)}", ID_BYTES)


def _cut(text: str, most: int) -> str:
    """`text`'s first characters that take `most` UTF-8 bytes at most."""
    return text.encode()[:most].decode(errors="ignore")
