"""The campaign's results table ({output}/_results.parquet) and its one-line summary."""

from __future__ import annotations

import io
from dataclasses import dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq

from heygem_ray import storage

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # ok | failed | skipped
        ("output", pa.string()),
        ("error", pa.string()),
        ("audio_seconds", pa.float64()),
        ("frames", pa.int64()),
        ("segments", pa.int64()),
        ("render_seconds", pa.float64()),  # wall seconds from admission to published output
        ("attempts", pa.int64()),  # most tries any one segment of the row needed
        ("finished_at", pa.timestamp("s", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class RowResult:
    id: str
    status: str
    output: str
    error: str | None
    audio_seconds: float | None
    frames: int | None
    segments: int | None
    render_seconds: float | None
    attempts: int
    finished_at: float


@dataclass(frozen=True)
class Summary:
    rows: list[RowResult]
    wall_seconds: float
    #: seconds of each start-up step up to the first rendered frames (startup.Startup.breakdown)
    startup: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: list[RowResult], wall_seconds: float, startup: dict[str, float] | None = None) -> Summary:
        return cls(rows, wall_seconds, dict(startup or {}))

    def startup_line(self) -> str:
        """ "driver 0.6 s, ray start 3.1 s, ...; first frames 9.8 s after launch" (empty when nothing rendered)."""
        steps = dict(self.startup)
        total = steps.pop("first frames after launch", None)
        if total is None:
            return ""
        return (
            ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
            + f"; first frames {total:.1f} s after launch"
        )

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def line(self) -> str:
        audio = sum(r.audio_seconds or 0.0 for r in self.rows if r.status == "ok")
        speed = f", {audio / self.wall_seconds:.2f}x realtime" if audio and self.wall_seconds else ""
        return (
            f"{len(self.rows)} rows: {self.count('ok')} ok, {self.failed} failed, {self.count('skipped')} skipped; "
            f"{audio:.1f} s of audio rendered in {self.wall_seconds:.1f} s{speed}"
        )


def write_results(uri: str, rows: list[RowResult]) -> None:
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in fields(RowResult)}
    columns["finished_at"] = [int(t) for t in columns["finished_at"]]
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_results(uri: str) -> list[dict]:
    with storage.open_uri(uri) as fh:
        return pq.read_table(fh).to_pylist()
