"""The pipeline benchmark runner (`python -m benchmarks.run`) works end to end: a --quick run makes its
inputs, runs every measurement (defaults as whole commands against the naive loop per video,
stages, Wav2Lip naive vs batched, actor RSS, second campaign, scaling, one node) on its own local Ray, prints each table with numbers and leaves RESULTS.md alone with
--no-append. A behaviour test of the runner, not a timing assertion (about a minute on 2 cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEADERS = [
    "| work | path | wall s | frames/s | vs naive |",
    "| stage | what runs | frames | seconds | frames/s | ms/frame |",
    "| path | batch | frames | best s | runs s | frames/s | vs naive |",
    "| audio | frames | segments | wall s | frames/s | actor VmHWM MiB |",
    "| run | cache | prepare_avatar s | campaign wall s | frames | frames/s |",
    "| actors | pinned | cores allow | rows | segments | frames | wall s | first actor ready s | frames/s |",
    "| avatar | audio | frames | segments | actors | track s (before) | prepare_avatar s | wall s | frames/s |",
    "| target | measured | status |",
]


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table that starts with `header` (cells stripped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.integration
@pytest.mark.slow  # 1.5-3.5 minutes on 2 cores: run it with `-m slow` when the runner changes
def test_quick_benchmark_run_prints_every_table_with_numbers(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-append", "--workdir", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    for header in HEADERS:
        assert header in out, f"missing table {header!r}\n{out[-3000:]}"
    assert "Machine:" in out and "cores" in out

    number = re.compile(r"^-?[\d,]+(\.\d+)?×?%?$")
    defaults = _table_rows(out, HEADERS[0])
    assert [(row[0], row[1].split(" (")[0]) for row in defaults] == [
        ("one row", "naive loop, one process per video"),
        ("one row", "heygem-ray render, defaults"),
        ("one row", "heygem-ray render, cluster=inline"),
        ("2 rows", "naive loop, one process per video"),
        ("2 rows", "heygem-ray render, defaults"),
        ("2 rows", "heygem-ray render, cluster=inline"),
    ]
    assert all(number.match(row[2]) and float(row[2]) > 0 and number.match(row[4]) for row in defaults)
    startup = dict(_table_rows(out, "| start-up step (one row, from the CLI's own line) | s |"))
    assert set(startup) >= {"driver", "ray start", "actor start", "model load", "first batch", "first frames"}
    assert float(startup["first frames"]) > float(startup["model load"]) > 0

    stages = {row[0]: row for row in _table_rows(out, HEADERS[1])}
    for stage in ("decode", "detect", "detect (cached)", "render + paste", "encode", "stitch", "upload", "end to end"):
        assert stage in stages, stage
        assert number.match(stages[stage][3]), stages[stage]  # seconds
    assert float(stages["end to end"][4].replace(",", "")) > 0  # frames/s

    wav2lip = _table_rows(out, HEADERS[2])
    assert [r[0].split(":")[0].split(",")[0] for r in wav2lip] == [
        "naive loop",
        "RenderWorker.render_segment in this process",
        "RenderWorker.render_segment in this process",
        "campaign.run",
    ]
    assert "fp32" in wav2lip[1][0] and "int8" in wav2lip[2][0]
    assert all(number.match(row[5]) and float(row[5].replace(",", "")) > 0 for row in wav2lip)  # frames/s

    rss = _table_rows(out, HEADERS[3])
    assert len(rss) == 2 and all(number.match(row[5]) and float(row[5].replace(",", "")) > 50 for row in rss)  # MiB

    second = _table_rows(out, HEADERS[4])
    assert [row[0] for row in second] == ["first campaign", "second campaign"]
    assert float(second[1][2]) < float(second[0][2])  # the cached track loads faster than detecting

    scaling = _table_rows(out, HEADERS[5])
    assert [(row[0], row[1]) for row in scaling] == [("1", "no"), ("2", "no"), ("1", "yes"), ("2", "yes")]
    assert all(number.match(row[8]) and float(row[7]) < float(row[6]) for row in scaling)
    # pinned actors that answered got cores of their own (in a campaign this short the second may not answer)
    assert [row[10] for row in scaling[:2]] == ["0", "0"] and all(int(row[10]) >= 1 for row in scaling[2:])

    node = _table_rows(out, HEADERS[6])
    assert len(node) == 1 and node[0][2] == "75" and float(node[0][8]) > 0  # 3 s at 25 fps, one campaign
    assert float(node[0][6]) < float(node[0][5])  # the campaign loaded the track built before it

    targets = _table_rows(out, HEADERS[7])
    assert len(targets) >= 3 and all(row[2] for row in targets)
    after = results.read_bytes() if results.exists() else None
    assert after == before  # --no-append leaves RESULTS.md alone


def test_encoder_benchmark_compares_the_default_with_x264_presets(capsys):
    from benchmarks import bench_encoder

    assert bench_encoder.main(["--heights", "120", "--frames", "6"]) == 0
    rows = _table_rows(capsys.readouterr().out, "| frames | setting |")
    assert [(r[0], r[1]) for r in rows] == [
        (f"120p {kind}", name) for kind in ("clean", "camera noise") for name in bench_encoder.SETTINGS
    ]
    kib = {(r[0], r[1]): float(r[3]) for r in rows}
    # superfast alone has no mb-tree: on grainy frames its files are far larger than the default's
    assert kib[("120p camera noise", "superfast")] > 1.5 * kib[("120p camera noise", "default")]
