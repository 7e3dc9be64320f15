"""The GPU check kit (benchmarks/gpu) cannot rot unnoticed: its CPU dry run runs every step on tiny
inputs with imports limited to what the GPU node will have (no Ray, no uncarried wheel) and must pass
with its figures written; an overrunning step is killed and recorded; the wheel size accounting and
the node-import guard work without network. Behaviour tests, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.gpu import prepare
from benchmarks.gpu.node import Variant
from benchmarks.gpu.packages import CARRIED, allowed_dists, normalize
from benchmarks.gpu.run import STEPS, step_command

DRY_STEPS = [s.name for s in STEPS if s.dry_args is not None]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _kit(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.run", "--dry-run", "--out", str(out), *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _result(out: Path, step: str) -> dict:
    return _results(out)["steps"][step]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-kit")
    proc = _kit(out)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return out


def test_dry_run_runs_every_step_and_writes_its_files(dry_run: Path) -> None:
    # the device tool returns at most eight files from OUT
    assert sorted(p.name for p in dry_run.iterdir()) == ["log.txt", "node_thumbnail.jpg", "results.json", "summary.md"]
    results = _results(dry_run)
    assert results["dry_run"] is True and results["install"] is None
    assert list(results["steps"]) == [s.name for s in STEPS]
    log = (dry_run / "log.txt").read_text()
    for name, record in results["steps"].items():
        if name not in DRY_STEPS:
            assert record["status"] == "skipped", name
            continue
        assert record["status"] == "ok" and record["dry_run"], (name, record.get("error"))
        assert record["checks"] == [] or all(c["passed"] is not False for c in record["checks"]), name
        assert record["markdown"].strip() and record["wall_s"] > 0, name
        assert f"===== {name}: ok =====" in log, name
    assert (dry_run / "node_thumbnail.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG


def test_dry_run_imports_what_the_node_has(dry_run: Path) -> None:
    env = _result(dry_run, "env")
    # the guard was on (Ray is installed here, yet the dry run saw none), and no stage loaded Ray
    assert env["figures"]["ray_imported"] is False and env["figures"]["ray_installed"] is False
    for name in DRY_STEPS:
        assert "ray" not in _result(dry_run, name)["modules"], name
    assert env["figures"]["cores"] >= 1 and env["figures"]["torch"]
    assert set(env["figures"]["versions"]) >= {"torch", "av"}


def test_correctness_checks_ran_and_passed(dry_run: Path) -> None:
    checks = {c["name"]: c for c in _result(dry_run, "correctness")["checks"]}
    names = list(checks)
    for prefix in (
        "Wav2Lip generator fp32 4-d",
        "Wav2Lip generator fp32 5-d",
        "image_ops=device vs cpu, fp32, feather",
        "S3FD raw outputs fp32",
        "CPU int8 generator (narrowed ranges)",  # this CPU has no VNNI; the GPU node's may
        "decoder.device=auto takes NVDEC where CUDA is usable",  # not here: no CUDA
        "2 processes sharing the CPU",
    ):
        match = [n for n in names if n.startswith(prefix)]
        assert match and all(checks[n]["passed"] is True for n in match), (prefix, names)
    generator = checks[next(n for n in names if n.startswith("Wav2Lip generator fp32 4-d"))]["figures"]
    assert 0 <= generator["max"] <= 1e-4
    sharing = checks[next(n for n in names if "sharing" in n)]["figures"]
    assert sharing["processes"] == 2 and sharing["max_level_diff"] == 0 and len(sharing["seconds_each_shared"]) == 2


def test_node_run_renders_every_frame_in_worker_processes(dry_run: Path) -> None:
    node = _result(dry_run, "node")["figures"]
    best = node["best"]
    assert best is not None and (best["procs"], best["threads"]) == (2, 1)
    assert node["default"] == best  # the one run is the defaults', which the target is judged on
    assert best["frames"] == 30 and best["segments"] == 2  # 1.2 s at 25 fps, 0.6 s segments
    assert best["wall_s"] > 0 and best["frames_per_s"] > 0 and best["audio_seconds"] == pytest.approx(1.2, abs=0.05)
    assert sum(best["segments_per_worker"]) == 2
    assert {"render", "decode", "encode"} <= set(best["segment_stage_s"])
    timeline = best["timeline_s"]
    assert 0 < timeline["first_worker_ready"] <= timeline["last_worker_ready"] <= timeline["segments_done"]
    assert timeline["segments_done"] <= timeline["published"] == best["wall_s"]
    assert timeline["audio_prepared"] <= timeline["audio_track_encoded"] < timeline["published"]
    assert best["workers_imported_ray"] is False and best["output_mib"] > 0


def test_summary_is_markdown_with_every_section(dry_run: Path) -> None:
    text = (dry_run / "summary.md").read_text()
    assert text.startswith("### ") and "GPU node check on no GPU (DRY RUN" in text
    for needle in (
        "| step | what | status | seconds (budget) | checks passed |",
        "| check | measured | tolerance | result |",
        "| processes × threads, changes | renderer | frames |",
        "One core, 180p H.264 (10 frames of the node clip): decode ",
        "| image_ops | precision | boxes |",
        "| precision | torch.compile | batch |",
        "Machine: ",
    ):
        assert needle in text, needle


def test_a_step_that_raised_has_its_error_in_the_summary() -> None:
    """A step whose body raised has no write-up of its own: the summary, which goes into
    RESULTS.md, left its traceback out (it was only in results.json)."""
    from benchmarks.gpu.run import summary

    records = [
        {"step": "env", "status": "ok", "checks": [], "markdown": "", "figures": {"gpu": "NVIDIA H200"}},
        {"step": "node", "status": "error", "checks": [], "markdown": "", "error": "RuntimeError: CUDA went away"},
    ]
    text = summary(records, None, dry=False, command="bash benchmarks/gpu/run.sh")
    assert "GPU node check on NVIDIA H200" in text
    assert "— ERROR" in text and "RuntimeError: CUDA went away" in text


def test_env_times_one_core_on_h264(dry_run: Path) -> None:
    env = _result(dry_run, "env")["figures"]
    assert env["decode_ms"] > 0 and env["codec_frames"] == 10
    for preset in ("default", "veryfast", "superfast", "ultrafast"):
        assert env[f"x264_{preset}_ms"] > 0 and env[f"x264_{preset}_kib_per_frame"] > 0
    # no NVDEC here: the attempt is recorded, not fatal
    assert "nvdec_error" in env or env["nvdec_matches"] is True


def test_node_variants_parse_and_name_their_changes() -> None:
    variant = Variant.parse("15x1,preset=superfast,segment=2.5,decode=cpu")
    assert variant.decode == "cpu"
    assert (variant.procs, variant.threads, variant.preset, variant.segment_seconds) == (15, 1, "superfast", 2.5)
    assert Variant.parse(variant.name) == variant and Variant.parse("7x2") == Variant(7, 2)
    with pytest.raises(ValueError, match="unknown"):
        Variant.parse("7x2,crf=20")


def test_the_node_target_is_judged_on_the_products_gpu_defaults_and_a_hang_skips_nothing_after() -> None:
    """The verdict's run was 15 one-thread renderers on 5 s segments, not what `cluster=gpu` runs
    (7 two-CPU actors on 16 cores, 10 s segments); and after a run that hung (60 s, no figures) the
    next ones were judged by it and skipped with ~70 s of the step left."""
    from benchmarks.gpu.node import room_for_another, variants
    from helpers import compose_config
    from heygem_ray.executors.ray_cluster import fit_actors

    cfg = compose_config("manifest=m", "output=o", "cluster=gpu")
    actor = cfg.cluster.actor
    first = variants(None, 16, dry=False)[0]
    assert first.procs == fit_actors(
        [{"CPU": 16.0, "GPU": 1.0}], actor.num_cpus, actor.num_gpus, cfg.cluster.reserve_cpus
    )
    assert (first.threads, first.segment_seconds, first.decode, first.preset) == (actor.num_cpus, None, None, None)
    hung = [{"variant": "7x2", "error": "TimeoutError: segments not done in 60 s"}]
    assert room_for_another(hung, 69.0)
    assert not room_for_another([*hung, {"variant": "15x1", "wall_s": 40.0}], 69.0)


def test_step_args_reach_the_step_command(tmp_path: Path) -> None:
    node = next(s for s in STEPS if s.name == "node")
    command = step_command(node, tmp_path, 60, False, ["--variants", "15x1"])
    assert command[-2:] == ["--variants", "15x1"] and command[2] == "benchmarks.gpu.node"


def test_an_overrunning_step_is_killed_and_recorded(tmp_path: Path) -> None:
    proc = _kit(tmp_path, "--only", "env", "--step-budget", "env=0.3", timeout=120)
    assert proc.returncode == 1
    env = _result(tmp_path, "env")
    assert env["status"] == "timeout" and "killed after" in env["error"] and env["budget_s"] == 0.3
    assert list(_results(tmp_path)["steps"]) == ["env"]
    assert "(a) environment facts — TIMEOUT" in (tmp_path / "summary.md").read_text()


def test_a_step_stopped_at_its_budget_keeps_the_figures_it_wrote(tmp_path: Path) -> None:
    """The node step writes its runs as they finish: one stopped at its budget (a hung variant)
    is recorded with every run it had, not with the last 3,000 characters of its log."""
    from benchmarks.gpu.run import Step, run_step

    (tmp_path / "slowstep.py").write_text(
        "import argparse, time\n"
        "from pathlib import Path\n"
        "from benchmarks.gpu import common\n"
        "parser = argparse.ArgumentParser(); parser.add_argument('--out', type=Path)\n"
        "args, _ = parser.parse_known_args()\n"
        "common.write_partial(args.out, 'slow', {'runs': [{'variant': '15x1', 'wall_s': 21.0}]})\n"
        "time.sleep(60)\n"
    )
    env = {**_env(), "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    (tmp_path / "out").mkdir()
    # a budget the child's start and partial write fit in on a loaded machine; the step sleeps 60 s
    record = run_step(Step("slow", "slowstep", "a step that hangs", 15), tmp_path / "out", 15, env, False)
    assert record["status"] == "timeout" and record["figures"]["runs"][0]["wall_s"] == 21.0
    assert '"variant": "15x1"' in record["markdown"]


def test_a_failed_node_run_lets_its_workers_go_with_jobs_still_queued(tmp_path: Path) -> None:
    """After a failure the workers are stopped at once; the jobs still queued (more than a pipe
    holds) kept the queue's feeder thread, and the step, from exiting until its budget ran out."""
    code = (
        "from benchmarks.gpu.node import WorkerPool\n"
        "pool = WorkerPool(None, 1)\n"  # a worker that fails at once: nothing reads the jobs
        "pool.start()\n"
        "for _ in range(40):\n"
        "    pool.jobs.put('x' * 5000)\n"
        "pool.close(finished=False)\n"
        "print('closed')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------- wheels
def _guarded(code: str, allowed: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the node-import guard (over `allowed` distributions)."""
    setup = (
        "from benchmarks.gpu.packages import NodeImports, blocked_modules, allowed_dists\n"
        f"allowed = frozenset({allowed!r}) if {allowed!r} is not None else allowed_dists()\n"
        "NodeImports(blocked_modules(allowed), allowed).install()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", setup + code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )


NODE_SIDE = (
    "import sys\n"
    "import heygem_ray.segment, heygem_ray.stitch, heygem_ray.prepare, heygem_ray.demo\n"
    "import heygem_ray.render.wav2lip, heygem_ray.detect.s3fd, heygem_ray.media.mux\n"
    "from heygem_ray.models.wav2lip_audio import _mel_basis\n"
    "_mel_basis()\n"
    "assert 'ray' not in sys.modules\n"
)


def test_carried_wheels_cover_what_the_node_side_imports() -> None:
    proc = _guarded(NODE_SIDE)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_guard_fails_imports_the_node_lacks() -> None:
    """Without one carried distribution the same imports fail: the check above can fail."""
    without_av = sorted(allowed_dists() - {"av"})
    proc = _guarded(NODE_SIDE, without_av)
    assert proc.returncode != 0 and "No module named 'av'" in proc.stderr
    proc = _guarded("import ray")
    assert proc.returncode != 0 and "No module named 'ray'" in proc.stderr


def test_a_sharing_worker_that_fails_frees_the_others_at_once() -> None:
    """One process of the GPU-sharing check failing (out of memory loading the model) left the
    others waiting at the barrier for its timeout, longer than the step's budget."""
    import queue

    from benchmarks.gpu.correctness import _sharing_worker

    barrier: threading.Barrier = threading.Barrier(2)
    answers: queue.Queue = queue.Queue()
    waiting = threading.Thread(target=lambda: answers.put(_wait(barrier)))
    waiting.start()
    start = time.monotonic()
    _sharing_worker("/no/such/checkpoint.pth", "cpu", "fp32", (64, 48), 1, barrier, answers, wait=60)
    waiting.join(timeout=30)
    assert not waiting.is_alive() and time.monotonic() - start < 20
    kinds = sorted(str(answers.get_nowait()[0]) for _ in range(2))
    assert kinds == ["broken", "error"]


def _wait(barrier: threading.Barrier) -> tuple[str]:
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        return ("broken",)
    return ("passed",)


def test_carried_list_names_each_distribution_once() -> None:
    names = [normalize(c.dist) for c in CARRIED]
    assert len(names) == len(set(names)) and "ray" not in names
    assert "av" in names


def test_size_accounting_sums_wheels_and_what_git_would_copy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / ".gitignore").write_text("ignored.bin\n")
    (repo / "pkg" / "tracked.py").write_bytes(b"x" * 1000)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    (repo / "untracked.txt").write_bytes(b"y" * 300)
    (repo / "ignored.bin").write_bytes(b"z" * 5000)
    wheels = repo / "wheels"
    wheels.mkdir()
    (wheels / "a-1.0-py3-none-any.whl").write_bytes(b"w" * 2000)
    (wheels / "b-2.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"w" * 500)

    files = prepare.repo_files(repo, exclude=wheels)
    assert sorted(f.name for f in files) == [".gitignore", "tracked.py", "untracked.txt"]  # wheels counted apart
    assert prepare.sum_sizes([*files, repo / "deleted.py"]) == 1000 + 300 + len("ignored.bin\n")
    budget = prepare.budget(wheels, repo)
    assert budget.wheel_bytes == 2500 and budget.repo_files == 3
    assert budget.total == 2500 + 1300 + len("ignored.bin\n") and budget.fits
    assert "| **total** (limit 60) |" in budget.table()
    assert not prepare.Budget({"big.whl": 61 * prepare.MIB}, 0, 0).fits
    assert not prepare.Budget({"w.whl": 59 * prepare.MIB}, prepare.MIB, 1).fits  # exactly 60 MiB: not under it


def test_the_size_check_says_not_ready_while_a_wheel_is_missing(tmp_path: Path, capsys) -> None:
    """`prepare --sizes-only` said "fits" with no wheel at all: the node's run then stops before
    its first step, after a device start. And a "folder/" ignore pattern is seen before the folder
    exists (it said "not git-ignored")."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".gitignore").write_text("/wheels/\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert prepare.is_ignored(repo / "wheels", repo) and not prepare.is_ignored(repo / "other", repo)
    assert prepare.main(["--sizes-only", "--dest", str(tmp_path / "absent")]) == 1
    assert "not ready: wheels in" in capsys.readouterr().out


def test_a_wheel_unpacks_as_pip_would_lay_it_out(tmp_path: Path) -> None:
    """The node's interpreter may lack pip: the kit then unzips the wheels itself."""
    import zipfile

    from benchmarks.gpu.run import unpack_wheel

    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "VALUE = 1\n")
        archive.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\nVersion: 1.0\n")
        archive.writestr("demo_pkg-1.0.data/purelib/demo_extra.py", "VALUE = 2\n")
        archive.writestr("demo_pkg-1.0.data/scripts/demo", "#!/bin/sh\n")
    site = tmp_path / "site"
    site.mkdir()
    unpack_wheel(wheel, site)
    assert sorted(p.name for p in site.iterdir()) == ["demo_extra.py", "demo_pkg", "demo_pkg-1.0.dist-info"]
    assert (site / "demo_pkg" / "__init__.py").read_text() == "VALUE = 1\n"


def test_a_run_without_the_carried_wheels_stops_before_any_step(tmp_path: Path) -> None:
    """On the node, PyAV comes only as a carried wheel: a run whose wheels folder lacks it says how
    to make it and runs nothing, rather than spend the lent GPU's minutes on steps that all fail."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.run", "--wheels", str(empty), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the carried wheels lack av" in out.stderr and "benchmarks.gpu.prepare" in out.stderr
    assert not list((tmp_path / "out").iterdir())  # no step ran
