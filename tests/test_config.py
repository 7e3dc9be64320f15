"""Every config group option composes and resolves to plain dataclasses; the CLI prints it."""

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import compose_config, render_cli
from heygem_ray.config import ClassicRendererConfig, Config, EncoderConfig, Wav2LipRendererConfig


def test_defaults_are_the_embedded_local_classic_setup():
    cfg = compose_config("manifest=m.parquet", "output=/out")
    assert isinstance(cfg, Config) and isinstance(cfg.renderer, ClassicRendererConfig)
    assert cfg.detector.name == "haar" and cfg.cluster.address is None
    assert cfg.cluster.actor.num_cpus == 1.0 and cfg.cluster.actor.num_gpus == 0.0
    assert cfg.render.segment_seconds == 10.0 and cfg.cache_uri == "/out/_cache"


@pytest.mark.parametrize(
    "overrides, check",
    [
        (
            ["renderer=wav2lip", "renderer.checkpoint=s3://m/wav2lip_gan.pth"],
            lambda c: (
                isinstance(c.renderer, Wav2LipRendererConfig)
                and c.renderer.batch_size == 0
                and c.renderer.precision == "auto"
                and c.renderer.compile == "auto"
            ),
        ),
        (
            ["renderer=wav2lip", "renderer.checkpoint=m.pth", "renderer.compile=true"],
            lambda c: c.renderer.compile == "true",
        ),
        (
            ["renderer=wav2lip", "renderer.checkpoint=m.pth", "renderer.compile=false"],
            lambda c: c.renderer.compile == "false",
        ),
        (["detector=box", "detector.box=[1,2,30,40]"], lambda c: c.detector.box == [1, 2, 30, 40]),
        (["detector=s3fd", "detector.checkpoint=/m/s3fd.pth"], lambda c: c.detector.name == "s3fd"),
        (["cluster=gpu"], lambda c: c.cluster.actor.num_gpus == 0.125 and c.cluster.actor.num_cpus == 2.0),
        (
            ["+storage.options.s3.endpoint_url=http://127.0.0.1:9"],
            lambda c: c.storage.options["s3"]["endpoint_url"] == "http://127.0.0.1:9",
        ),
    ],
)
def test_group_options_compose(overrides, check):
    assert check(compose_config("manifest=m", "output=o", *overrides))


def test_missing_mandatory_values_and_typos_are_errors():
    with pytest.raises(Exception, match="manifest"):
        compose_config("output=o")
    with pytest.raises(Exception, match="segment_secondz"):
        compose_config("manifest=m", "output=o", "render.segment_secondz=3")
    with pytest.raises(Exception, match="checkpoint"):
        compose_config("manifest=m", "output=o", "renderer=wav2lip")
    with pytest.raises(Exception, match="detector=s3fd needs detector.checkpoint"):  # not on every row, later
        compose_config("manifest=m", "output=o", "detector=s3fd")


def test_workers_unpickle_their_config_without_hydra():
    """A Ray worker imports the config module (and the segment stage) to unpickle its config:
    without Hydra or OmegaConf, whose import took ~0.17 s of every worker's start. The module's
    own MISSING marker must stay OmegaConf's, or a required value would pass as set."""
    code = (
        "import sys, pickle; import heygem_ray.segment, heygem_ray.render.wav2lip; "
        "from heygem_ray.config import Config; pickle.loads(pickle.dumps(Config(manifest='m', output='o'))); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from omegaconf import MISSING

    from heygem_ray import config

    assert config.MISSING == MISSING


@pytest.mark.parametrize(
    "override, message",
    [
        ("renderer.precision=bf61", "renderer.precision=bf61 is not one of auto, fp32, int8, fp16, bf16"),
        ("renderer.compile=maybe", "renderer.compile=maybe is not one of auto, true, false"),
        ("renderer.blend=soft", "renderer.blend=soft is not one of feather, hard"),
        ("renderer.batch_size=-1", "renderer.batch_size and renderer.face_cache_mb must be 0 (auto/off) or more"),
        ("detector.name=hair", "detector.name=hair is not one of haar, box, s3fd"),
        ("detector.device=gpu", "detector.device=gpu is not one of auto, cpu, cuda, cuda:N"),
        ("detector.stride=7", "detector.stride=7 is not one of 1, 2, 3, 4, 5, 6, 8"),
        ("encoder.codec=libx265", "encoder.codec=libx265 is not one of auto, libx264, h264_nvenc"),
        ("encoder.preset=veryfats", "encoder.preset=veryfats is not one of ultrafast, superfast, veryfast"),
        ("encoder.x264_params=mbtree", "encoder.x264_params=mbtree is not key=value"),
        ("decoder.device=nvdec", "decoder.device=nvdec is not one of auto, cpu, cuda, cuda:N"),
        ("cluster.executor=rai", "cluster.executor=rai is not one of ray, inline"),
        # each failed every row on the workers (or, a short box, with "not enough values to unpack")
        ("detector.box=[1,2,3]", "detector.box=[1, 2, 3] is not [x1, y1, x2, y2]"),
        ("detector.box=[50,10,20,90]", "detector.box=[50, 10, 20, 90] is not [x1, y1, x2, y2]"),
        ("detector.pads=[0,10]", "detector.pads=[0, 10] is not [top, bottom, left, right]"),
        ("encoder.pix_fmt=rgb24", "encoder.pix_fmt=rgb24 is not one of yuv420p, yuv422p, yuv444p"),
        ("encoder.audio_codec=mp3", "encoder.audio_codec=mp3 is not one of aac"),
        ("encoder.crf=99", "encoder.crf=99 is not within 0"),
        ("cluster.actor.num_gpus=-1", "cluster.actor's num_cpus, num_gpus and threads must be 0 or more"),
        # a typo'd key failed the run's first storage call (a TypeError, exit 1); a typo'd protocol was ignored
        ("+storage.options.s3.enpoint_url=http://x", "storage.options.s3.enpoint_url: S3FileSystem takes no such"),
        ("+storage.options.s4.endpoint_url=http://x", "storage.options.s4: 's4' is not a protocol fsspec knows"),
        # cluster.actors=0 fitted 2,000 actors of no CPU to a 2-core machine
        ("cluster.actor.num_cpus=0", "cluster.actor asks for neither: give cluster.actor.num_cpus"),
        # each composed, then failed every row in a Ray task, or wrote at the file system's root
        ("output=", "output is empty"),
        ("cache=' '", "cache is empty"),
        ("detector.max_side=0", "detector.max_side must be 16 or more"),
        ("limits.max_audio_seconds=0", "limits.max_audio_seconds and limits.max_avatar_pixels must be positive"),
        ("encoder.audio_sample_rate=44000", "encoder.audio_sample_rate=44000 is not one of AAC's"),
        ("encoder.audio_bitrate=-1", "encoder.audio_bitrate=-1 is not within 8000 .. 512000"),
        ("qa.max_lag=-1", "qa.max_lag must be 0 or more"),
        # every row rendered, then failed (or was flagged): a correlation never reaches 2
        ("qa.fail_below=2", "qa.fail_below must be within -1 and 1"),
        ("qa.min_sync=5", "qa.min_sync must be within -1 and 1"),
        # the default detector found the face, the box was silently ignored
        ("detector.box=[0,0,40,40]", "detector.box is for detector=box (detector=haar finds the face itself)"),
    ],
)
def test_choices_are_checked_when_composed(override, message):
    """A typo fails on the driver at once, not as "renderer could not start" on every row."""
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config("manifest=m", "output=o", "renderer=wav2lip", "renderer.checkpoint=m.pth", override)


@pytest.mark.parametrize("override", ["renderer.batch_size=-3", "renderer.mouth_open=nan", "renderer.jaw_drop=-1"])
def test_the_classic_renderers_settings_are_checked_when_composed(override):
    """Each was taken: a NaN opening rendered "ok" with a cast warning, a negative batch failed later."""
    with pytest.raises(ValueError, match=re.escape(override.split("=")[0])):
        compose_config("manifest=m", "output=o", override)


@pytest.mark.parametrize(
    ("good", "read", "value"),
    [
        ("detector.device=cuda:1", lambda c: c.detector.device, "cuda:1"),
        ("renderer.device=cuda", lambda c: c.renderer.device, "cuda"),
        ("encoder.preset=slow", lambda c: c.encoder.preset, "slow"),
        # quoted: Hydra reads a comma as a list
        (
            "encoder.x264_params='partitions=i8x8,i4x4:me=dia'",
            lambda c: c.encoder.x264_params,
            "partitions=i8x8,i4x4:me=dia",
        ),
        ("encoder.x264_params=", lambda c: c.encoder.x264_params, ""),
        ("encoder.codec=h264_nvenc", lambda c: c.encoder.codec, "h264_nvenc"),
        ("cluster=inline", lambda c: c.cluster.executor, "inline"),
        # store options a filesystem takes along its classes, its listings cache or its session
        (
            "+storage.options.s3.use_listings_cache=false",
            lambda c: c.storage.options,
            {"s3": {"use_listings_cache": False}},
        ),
        (
            "+storage.options.s3.skip_instance_cache=true",
            lambda c: c.storage.options,
            {"s3": {"skip_instance_cache": True}},
        ),
        ("+storage.options.s3.profile=prod", lambda c: c.storage.options, {"s3": {"profile": "prod"}}),
        ("+storage.options.s3.anon=true", lambda c: c.storage.options, {"s3": {"anon": True}}),
        (
            "+storage.options.gs.token=anon",
            lambda c: c.storage.options,
            {"gs": {"token": "anon"}},
        ),  # gcsfs not here: not checked
        ("+storage.options.file.auto_mkdir=true", lambda c: c.storage.options, {"file": {"auto_mkdir": True}}),
        # the expert's LSE-C has no upper bound: the correlation's range no longer applies
        ("qa.fail_below=4", lambda c: c.qa.fail_below, 4),
    ],
)
def test_valid_choices_compose(good, read, value):
    syncnet = ["qa.syncnet=x.pth"] if good.startswith("qa.") else []
    cfg = compose_config("manifest=m", "output=o", "renderer=wav2lip", "renderer.checkpoint=m.pth", *syncnet, good)
    assert read(cfg) == value


def test_a_local_ray_gives_the_actors_every_core():
    """On a Ray of its own, tasks share the actors' cores: cores + reserve logical CPUs, so
    `cluster.actors=0` fits one actor per core (2 on a 2-core machine, not 1 beside an idle core)."""
    from heygem_ray.executors.ray_cluster import fit_actors

    cfg = compose_config("manifest=m", "output=o")
    cores = len(os.sched_getaffinity(0))
    cpus = cfg.cluster.local_cpus()
    assert cpus == cores + 1
    assert fit_actors([{"CPU": cpus}], cfg.cluster.actor.num_cpus, 0.0, cfg.cluster.reserve_cpus) == cores
    assert compose_config("manifest=m", "output=o", "cluster.num_cpus=5").cluster.local_cpus() == 5


@pytest.mark.integration
def test_a_local_ray_skips_what_a_one_run_ray_does_not_use(tmp_path):
    """The Ray the CLI starts for a run prestarts no idle worker, and collects metrics only when its
    dashboard is on (nothing else shows them): both cost CPU while the actors start. Its raylet
    retries a refused socket (its own object store, still opening) after 0.1 s, not a second. Its
    autoscaler monitor is killed ahead of ray.shutdown() (which would give it a second to exit on
    SIGTERM, every run), and Ray keeps working without it. One Ray start checks both: seconds each."""
    from heygem_ray.executors.ray_cluster import local_system_config

    script = (
        "import ray\n"
        "from helpers import compose_config\n"
        "from heygem_ray.executors.ray_cluster import connect, shutdown, stop_local_monitor\n"
        "from ray._private.state import state\n"
        "assert connect(compose_config('manifest=m', 'output=o'))\n"
        "c = state.get_system_config()\n"
        "print(c['prestart_worker_first_driver'], c['enable_metrics_collection'],\n"
        "      c['raylet_client_connect_timeout_milliseconds'], c['raylet_client_num_connect_attempts'])\n"
        "monitor = ray._private.worker._global_node.all_processes['monitor'][0].process\n"
        "assert monitor.poll() is None\n"
        "stop_local_monitor()\n"
        "assert monitor.poll() is not None\n"
        "assert ray.get(ray.remote(lambda: 7).remote()) == 7\n"
        "shutdown(local=True)\n"
        "assert not ray.is_initialized()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "False False 100 100", out.stdout  # the Ray it started has them
    assert out.stdout.strip().endswith("ok"), out.stdout
    dashboard = compose_config("manifest=m", "output=o", "cluster.include_dashboard=true")
    assert local_system_config(dashboard)["enable_metrics_collection"] is True


@pytest.mark.parametrize(
    "override",
    [
        "render.segments_per_actor=0",
        "render.max_inflight_segments=-1",
        "render.segment_seconds=0",
        "cluster.actors=-1",  # started no renderer: the campaign waited for ever
        "cluster.task_cpus=0",
        "cluster.reserve_cpus=-1",
    ],
)
def test_scheduling_values_that_would_stall_a_campaign_are_refused(override):
    # the refusal names the key and what it must be (a renamed key fails at composition instead)
    with pytest.raises(ValueError, match=re.escape(override.split("=")[0]) + r".* must "):
        compose_config("manifest=m", "output=o", override)


def test_cli_prints_the_resolved_config():
    """`--cfg job`, the operator's check before a run: checked as a run is (exit 2 for a bad value),
    and printed as `_config.yaml` is, credentials masked (a job's log keeps what it prints)."""
    out = render_cli(
        "manifest=m.parquet",
        "output=/o",
        "render.segment_seconds=5",
        "+storage.options.s3.secret=SeCrEt",
        "--cfg",
        "job",
    )
    assert out.returncode == 0, out.stderr
    assert (
        "segment_seconds: 5.0" in out.stdout and "name: classic" in out.stdout and "manifest: m.parquet" in out.stdout
    )
    assert "SeCrEt" not in out.stdout and "secret: '***'" in out.stdout
    bad = render_cli("manifest=m.parquet", "output=/o", "encoder.preset=bogus", "--cfg", "job")
    assert bad.returncode == 2 and "encoder.preset=bogus is not one of" in bad.stderr


def test_relative_paths_are_refused_in_a_ray_job_at_once(monkeypatch):
    """A `ray job submit` entrypoint runs in Ray's copy of the working directory, removed with the
    job: a relative `output=` wrote the videos there, to be lost. Outside a job it is fine."""
    from heygem_ray.cli import check_job_paths

    cfg = compose_config("manifest=/data/m.parquet", "output=out")
    check_job_paths(cfg)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ValueError, match="output=out is a relative path: a Ray job runs in Ray's copy"):
        check_job_paths(cfg)
    check_job_paths(compose_config("manifest=/data/m.parquet", "output=s3://b/out"))


def test_credentials_on_a_ray_jobs_command_line_are_refused(monkeypatch, capsys):
    """Ray writes a job's entrypoint, its overrides included, into the job's log and keeps it in its
    job table, and the studio shows users the log's end: an S3 secret given as an override reached
    them all. In a job it is refused before anything runs, naming what to do instead; a variable
    named with `${oc.env:...}` and any override outside a job are fine."""
    from heygem_ray.cli import check_job_secrets, main, render_main

    secret = "+storage.options.s3.secret=wJalrXUtnFEMI"
    check_job_secrets([secret])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert render_main(["manifest=/data/m.parquet", "output=/data/out", secret]) == 2
    err = capsys.readouterr().err
    assert "storage.options.s3.secret is given on the job's command line" in err and "wJalrXUtnFEMI" not in err
    assert "'+storage.options.s3.secret=${oc.env:VARIABLE}'" in err  # the way out, as it must be given
    ordinary = [
        "+storage.options.s3.secret=${oc.env:S3_SECRET}",
        "encoder.preset=slow",
        "cache=/c/key_frames",
        "+storage.options.gcs.token=anon",  # gcsfs's public-bucket mode
        "+storage.options.sftp.key_filename=/keys/id_ed25519",
        "+storage.options.s3.s3_additional_kwargs.SSEKMSKeyId=alias/videos",
    ]
    check_job_secrets(ordinary)
    with pytest.raises(ValueError, match="storage.options.s3.key is given"):  # a dict given whole
        check_job_secrets(["+storage.options.s3={key: AKIA0, secret: wJalrXUtnFEMI}"])
    # a studio whose operator put one in the jobs' overrides would start every job to fail
    assert main(["studio", "studio.render_overrides=['+storage.options.s3.secret=wJalrXUtnFEMI']"]) == 2
    assert "studio.render_overrides: storage.options.s3.secret is given" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["render", "manifest", "demo", "studio"])
def test_every_command_answers_help(command, capsys):
    """`heygem-ray studio --help` fed "--help" to Hydra as an override: "invalid configuration"."""
    from heygem_ray.cli import main

    try:
        status = main([command, "--help"])
    except SystemExit as exc:  # argparse's commands exit after their help
        status = exc.code
    assert status == 0 and f"heygem-ray {command}" in capsys.readouterr().out


def test_a_fixed_box_detector_with_no_box_refuses_the_rows_without_one(tmp_path, capsys):
    """`detector=box` with neither `detector.box` nor a row's box composed, started the cluster,
    and failed every row in its avatar task. Rows without a box are refused as the manifest is
    read; with none left the command stops at once (exit 2) saying what to give."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygem_ray.campaign import NO_BOX, _boxed
    from heygem_ray.cli import render_main

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "audio": ["/in/a.wav"] * 2, "avatar": ["/in/v.mp4"] * 2}), manifest)
    args = [f"manifest={manifest}", f"output={tmp_path}/out", "cluster=inline", "detector=box"]
    assert render_main(args) == 2
    assert NO_BOX in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # stopped before any row ran: the disk as it was
    from heygem_ray.manifest import read_manifest

    pq.write_table(
        pa.table({"id": ["a", "b"], "audio": ["/in/a.wav"] * 2, "avatar": ["/in/v.mp4"] * 2, "box": ["0,0,8,8", None]}),
        manifest,
    )
    cfg = compose_config(*args)
    read = read_manifest(str(manifest), cfg.output)
    assert [(r.id, r.refused) for r in _boxed(read, cfg)] == [("a", None), ("b", NO_BOX)]
    assert not any(r.refused for r in _boxed(read, compose_config(*args, "detector.box=[0,0,8,8]")))


def test_a_folder_where_the_results_table_goes_stops_the_run_at_once_saying_so(tmp_path, capsys):
    """`_results.parquet` made a folder (a dataset written there by another tool): every run
    failed with the disk's IsADirectoryError, exit 1, "run the same command again to resume",
    which failed the same way. Now exit 2 naming it, before anything is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygem_ray.cli import render_main

    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ["a"], "audio": ["/in/a.wav"], "avatar": ["/in/v.mp4"]}), manifest)
    (out / "_results.parquet").mkdir(parents=True)
    assert render_main([f"manifest={manifest}", f"output={out}", "cluster=inline"]) == 2
    said = capsys.readouterr().err
    assert f"output {out}/_results.parquet: is a folder where the campaign keeps its own file" in said
    assert sorted(p.name for p in out.iterdir()) == ["_results.parquet"]  # no _config.yaml, no lock left


def test_the_demo_refuses_a_bad_override_before_making_anything(tmp_path):
    from heygem_ray.cli import demo_main

    assert demo_main(["--dir", str(tmp_path / "demo"), "encoder.preset=bogus"]) == 2
    assert not (tmp_path / "demo").exists()
    # a mistyped flag (Hydra took it for an override and said "LexerNoViableAltException"), an
    # output of its own (the demo then named the wrong folder): argparse's usage and the reason
    for wrong in (["--rows", "0"], ["--dri", "x"], [f"output={tmp_path / 'elsewhere'}"]):
        with pytest.raises(SystemExit) as stopped:
            demo_main(["--dir", str(tmp_path / "demo"), *wrong])
        assert stopped.value.code == 2 and not (tmp_path / "demo").exists(), wrong


def test_the_demo_keeps_no_half_made_input_and_names_no_videos_it_did_not_make(tmp_path, capsys):
    """A demo stopped while it made its inputs left a 48-byte presenter_2.mp4 that every later demo
    kept (2 of 6 rows failing for ever); and a render refused (exit 2) still sent the user to videos
    and a report that did not exist."""
    from heygem_ray import demo
    from heygem_ray.cli import demo_main

    clip = str(tmp_path / "presenter_1.mp4")

    def stopped(path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(b"\0" * 48)
        raise KeyboardInterrupt  # the user's Ctrl-C, midway

    with pytest.raises(KeyboardInterrupt):
        demo._made(clip, stopped)
    assert not os.path.exists(clip)
    demo._made(clip, functools.partial(demo.write_avatar_clip, seconds=0.2))
    assert os.path.getsize(clip) > 48 and os.listdir(tmp_path) == ["presenter_1.mp4"]  # the part made it
    mine = tmp_path / "mine"  # a manifest of the user's own where the demo writes its manifest
    mine.mkdir()
    (mine / "manifest.parquet").write_text("audio,avatar\n")
    assert demo_main(["--dir", str(mine), "--rows", "1", "cluster=inline"]) == 2
    assert (
        "the demo's manifest" in capsys.readouterr().err and (mine / "manifest.parquet").read_text() == "audio,avatar\n"
    )
    missing = str(tmp_path / "nowhere" / "expert.pth")
    assert demo_main(["--dir", str(tmp_path / "demo"), "--rows", "1", "cluster=inline", f"qa.syncnet={missing}"]) == 2
    assert "videos in" not in capsys.readouterr().out


def test_a_path_given_without_its_key_is_said_plainly(capsys):
    """`heygem-ray render one.parquet out` said "missing EQUAL" and how to quote special characters."""
    from heygem_ray.cli import render_main

    assert render_main(["one.parquet", "out"]) == 2
    assert "'one.parquet' is no key=value: give manifest=URI output=URI" in capsys.readouterr().err


def test_the_printed_config_is_checked_as_a_run_checks_it_x264_included(capsys):
    """`--cfg job` said 0 for x264 settings x264 refuses, which the run then refused (exit 2)."""
    from heygem_ray.cli import render_main

    bad = ["manifest=/d/m.parquet", "output=/d/out", "encoder.x264_params='mb-tree=1'", "--cfg", "job"]
    assert render_main(bad) == 2 and "x264 says" in capsys.readouterr().err
    assert render_main(["manifest=/d/m.parquet", "output=/d/out", "encoder.codec=h264_nvenc", *bad[2:]]) == 0


def test_the_manifest_command_says_why_it_cannot_write_not_a_traceback(tmp_path, capsys):
    from heygem_ray.cli import manifest_main

    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "v.mp4").write_bytes(b"")
    (tmp_path / "taken.parquet").mkdir()
    code = manifest_main(
        [
            "--audio",
            str(tmp_path / "a.wav"),
            "--avatar",
            str(tmp_path / "v.mp4"),
            "--out",
            str(tmp_path / "taken.parquet"),
        ]
    )
    assert code == 2 and "heygem-ray: error: IsADirectoryError" in capsys.readouterr().err


def test_the_command_ends_with_its_status_after_flushing_and_the_exit_handlers():
    """`exit_now` (the end of every `heygem-ray` command) skips the interpreter's teardown but not
    what must still happen: buffered output is written and atexit handlers (logging's flush,
    Ray's) run, and the status is the command's."""
    import subprocess
    import sys

    script = (
        "import atexit, sys\n"
        "from heygem_ray.cli import exit_now\n"
        "atexit.register(lambda: sys.stderr.write('handler ran'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "exit_now(3)\n"
        "print('never')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert out.stdout == "buffered, no newline" and out.stderr == "handler ran"
    usage = subprocess.run([sys.executable, "-m", "heygem_ray.cli"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "heygem-ray render" in usage.stdout


def test_the_command_end_waits_for_a_thread_still_writing(tmp_path):
    """A thread still working when a command ends (an interrupted inline run's segment) finishes:
    the ordinary exit waits for it, where skipping the teardown would cut it off."""
    import subprocess
    import sys

    done = tmp_path / "written"
    script = (
        "import threading, time\n"
        "from heygem_ray.cli import exit_now\n"
        f"def work():\n    time.sleep(1.0)\n    open({str(done)!r}, 'w').write('done')\n"
        "threading.Thread(target=work).start()\n"
        "exit_now(130)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 130, out.stderr
    assert done.read_text() == "done"


def test_cli_reports_a_bad_manifest_before_rendering(tmp_path):
    out = render_cli(f"manifest={tmp_path}/none.parquet", f"output={tmp_path}/out")
    assert out.returncode == 2 and "does not exist" in out.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.num_cpus=2", "cluster.actor.num_cpus=2"], "need 3 CPUs, but this local Ray has 2"),
        (
            ["cluster.num_cpus=4", "cluster.num_gpus=0", "cluster.actor.num_gpus=0.5"],
            "of 0.5 GPU do not fit this local Ray's 0 GPU(s)",
        ),
        pytest.param(  # GPUs left for Ray to count: refused once it has
            ["cluster.num_cpus=4", "cluster.actor.num_gpus=0.5"],
            "of 0.5 GPU do not fit this local Ray's 0 GPU(s)",
            marks=pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="Ray would count this GPU"),
        ),
    ],
)
def test_actors_that_could_never_run_locally_are_refused_not_waited_for(tmp_path, media_dir, overrides, message):
    """On a Ray of its own no node will join: an actor holding every CPU would starve the prepare and
    stitch tasks, and an actor wanting a GPU the machine lacks would never start. Both would hang.
    What the Ray would have is known from the config here, so the refusal comes before it starts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table({"audio": [str(media_dir / "speech3.wav")], "avatar": [str(media_dir / "still.png")]}), manifest
    )
    out = render_cli(
        f"manifest={manifest}",
        f"output={tmp_path}/out",
        "render.progress=false",
        "cluster.include_dashboard=false",
        *overrides,
        RAY_ADDRESS="",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    # ray.init logs it: GPU shares wanted and the GPUs left for Ray to count need one; else the
    # config says what the Ray would have
    counts_gpus = "cluster.actor.num_gpus=0.5" in overrides and "cluster.num_gpus=0" not in overrides
    assert ("Started a local Ray" in out.stderr) == counts_gpus
    assert not os.path.exists(tmp_path / "out" / "_results.parquet")  # refused before anything ran


def test_relative_paths_are_the_callers_on_a_joined_cluster(ray_local, media_dir, tmp_path):
    """A joined cluster's workers run in the folder its head was started in (here pytest's), not
    the caller's: relative manifest, output and media paths still name the caller's files, the
    video lands in the caller's folder, and the row keeps the id its paths as written give it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygem_ray.manifest import default_id

    here = tmp_path / "campaign"
    (here / "media").mkdir(parents=True)
    shutil.copy(media_dir / "speech3.wav", here / "media" / "speech.wav")
    shutil.copy(media_dir / "clip2.mp4", here / "media" / "face.mp4")
    pq.write_table(pa.table({"audio": ["media/speech.wav"], "avatar": ["media/face.mp4"]}), here / "m.parquet")

    @ray_local.remote(num_cpus=0)
    def folder() -> str:
        return os.getcwd()

    assert ray_local.get(folder.remote()) != str(here)  # else this test could not fail
    out = render_cli(
        "manifest=m.parquet",
        "output=out",
        "render.progress=false",
        f"cluster.address={ray_local.get_runtime_context().gcs_address}",
        cwd=str(here),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row_id = default_id("media/speech.wav", "media/face.mp4")
    assert (here / "out" / f"{row_id}.mp4").is_file()
    assert (here / "out" / "_markers" / f"{row_id}.json").is_file()


def test_a_joined_cluster_is_not_judged_by_what_it_has_now(ray_local, tmp_path):
    """`cluster=gpu` joins a cluster whose GPU nodes may not be up yet: no refusal. Here no node can
    host its actor, and the only row fails in preparation: the campaign still ends, with that row
    failed, instead of waiting for an actor it no longer needs (or, with `encoder.codec=auto`, for
    one to say which encoder its node has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table({"id": ["gone"], "audio": [str(tmp_path / "missing.wav")], "avatar": [str(tmp_path / "missing.png")]}),
        manifest,
    )
    out = render_cli(
        f"manifest={manifest}",
        f"output={tmp_path}/out",
        "render.progress=false",
        "cluster=gpu",
        f"cluster.address={ray_local.get_runtime_context().gcs_address}",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "1 failed" in out.stdout and "missing.wav" in out.stdout, out.stdout[-2000:]


@dataclass
class ToyRendererConfig:
    name: str = "toy"
    shade: int = 7


class ToyRenderer:
    batch_size = 4

    def __init__(self, shade: int):
        self.shade = shade

    @classmethod
    def from_config(cls, cfg: ToyRendererConfig, threads: int = 0) -> "ToyRenderer":
        return cls(cfg.shade)


def test_a_renderer_is_one_registry_entry(monkeypatch):
    """A config dataclass, a class with from_config and one entry in config.RENDERERS: `renderer=toy`
    then composes, checks its fields and builds (no YAML file, no other code to touch)."""
    from heygem_ray import config
    from heygem_ray.render import build_renderer

    monkeypatch.setitem(config.RENDERERS, "toy", (ToyRendererConfig, f"{__name__}:ToyRenderer"))
    config.register_configs()
    cfg = compose_config("manifest=m", "output=o", "renderer=toy", "renderer.shade=9")
    assert isinstance(cfg.renderer, ToyRendererConfig) and cfg.renderer.shade == 9
    renderer = build_renderer(cfg.renderer)
    assert isinstance(renderer, ToyRenderer) and renderer.shade == 9
    with pytest.raises(Exception, match="shade"):
        compose_config("manifest=m", "output=o", "renderer=toy", "renderer.shade=dark")


class ToyDetector:
    def __init__(self, max_side: int):
        self.max_side = max_side

    @classmethod
    def from_config(cls, cfg) -> "ToyDetector":
        return cls(cfg.max_side)

    def detect(self, frames):
        return [np.zeros((0, 5), np.float32) for _ in frames]

    def reset(self) -> None:
        pass


def test_a_detector_is_one_registry_entry(monkeypatch):
    """A class with from_config and one entry in config.DETECTORS: `detector.name=toy` then passes
    the choice check and builds; before the entry it is a typo that names the choices."""
    from heygem_ray import config
    from heygem_ray.detect import build_detector

    with pytest.raises(Exception, match=r"detector.name=toy is not one of haar, box, s3fd"):
        compose_config("manifest=m", "output=o", "detector.name=toy")
    monkeypatch.setitem(config.DETECTORS, "toy", f"{__name__}:ToyDetector")
    cfg = compose_config("manifest=m", "output=o", "detector.name=toy", "detector.max_side=99")
    detector = build_detector(cfg.detector)
    assert isinstance(detector, ToyDetector) and detector.max_side == 99


def test_executors_come_from_their_registry(monkeypatch):
    """`cluster.executor` names an entry of config.EXECUTORS; a new one is a function and an entry."""
    from contextlib import contextmanager

    from heygem_ray import config
    from heygem_ray.executors import open_executor
    from heygem_ray.startup import Startup

    opened = []

    @contextmanager
    def open_toy(cfg, startup):
        opened.append(cfg.cluster.executor)
        yield "toy executor"

    monkeypatch.setitem(config.EXECUTORS, "toy", f"{__name__}:OPEN_TOY")
    monkeypatch.setattr(sys.modules[__name__], "OPEN_TOY", open_toy, raising=False)
    cfg = compose_config("manifest=m", "output=o", "cluster.executor=toy")
    with open_executor(cfg, Startup()) as executor:
        assert executor == "toy executor"
    assert opened == ["toy"]


def test_the_studio_qualities_are_valid_overrides():
    from heygem_ray.studio.service import QUALITIES

    configs = {name: compose_config("manifest=m", "output=o", *extra) for name, extra in QUALITIES.items()}
    assert configs["standard"].encoder == EncoderConfig()
    assert configs["best (large)"].encoder.preset == "medium" and configs["best (large)"].encoder.x264_params == ""
    assert configs["draft (small, fast)"].render.max_side == 1280 < configs["standard"].render.max_side


def test_the_written_config_masks_every_credential():
    """`_config.yaml` goes next to the videos: fsspec backends' credentials (S3 keys, an Azure
    connection string, HTTP headers, an SFTP passphrase) and signed or user:password URIs anywhere in
    the config are masked, and nothing else is."""
    from heygem_ray.cli import compose, config_yaml

    written = config_yaml(
        compose(
            [
                "manifest=s3://user:SECRET1@bucket/m.parquet",
                "output=o",
                "renderer=wav2lip",
                "renderer.checkpoint='https://acct.blob.core.windows.net/c/w.pth?sv=2022-11-02&sig=SECRET2'",
                "+storage.options.abfs.connection_string='AccountName=a;AccountKey=SECRET3'",
                "+storage.options.http.headers.Authorization='Bearer SECRET4'",
                "+storage.options.sftp.passphrase=SECRET5",
                "+storage.options.s3.key=SECRET6",
                "+storage.options.s3.endpoint_url=http://127.0.0.1:9000",
            ]
        )
    )
    assert "SECRET" not in written
    assert "manifest: s3://bucket/m.parquet" in written
    assert "w.pth?sv=2022-11-02&sig=***" in written
    assert "endpoint_url: http://127.0.0.1:9000" in written
    assert "***" not in config_yaml(compose(["manifest=m", "output=o"]))


def test_a_path_the_override_grammar_cannot_parse_says_to_quote_it(capsys):
    """`output=/data/run (1)` failed with the parser's "mismatched input '('", which does not say
    that quoting the value is the way out."""
    from heygem_ray.cli import render_main

    assert render_main(["manifest=/data/m.parquet", "output=/data/run(1)", "--cfg", "job"]) == 2
    assert "must be quoted" in capsys.readouterr().err
    assert render_main(["manifest=/data/m.parquet", "output='/data/run (1)'", "--cfg", "job"]) == 0
    assert "output: /data/run (1)" in capsys.readouterr().out
    assert render_main(["manifest=/data/m.parquet", "output=/data/out", "render.segment_seconds=0"]) == 2
    assert "must be quoted" not in capsys.readouterr().err  # a value refused for what it is, not its form


def test_config_mistakes_an_operator_makes_are_exit_2_with_a_way_out_not_a_traceback(capsys):
    """Each of these went on to a traceback and exit 1 (which scripts read as "a row failed"), or
    passed `--cfg job` to fail the run, or named no way out: the job server's address given as
    cluster.address; a model file on a store whose fsspec package is not installed (checked for
    the manifest and output only, and only by a run); an S3 partition path (`date=...`) or a ','
    unquoted; an S3 endpoint set without the '+' a free-form mapping's keys need."""
    from heygem_ray.cli import render_main

    base = ["manifest=/data/m.parquet", "output=/data/out"]
    cases = {
        "cluster.address=http://head:8265": "is not a Ray cluster's address: give auto, <head>:6379",
        "cluster.address=10.0.0.1": "is not a Ray cluster's address",
        "renderer=wav2lip renderer.checkpoint=gs://m/wav2lip.pth": "renderer.checkpoint gs://m/wav2lip.pth: gs:// needs",
        "qa.syncnet=gs://m/syncnet.pth": "qa.syncnet gs://m/syncnet.pth: gs:// needs",
        "output=gs://b/out": "output gs://b/out: gs:// needs",
        "output=s3://b/date=2026-12-01/out": "'=', ',', parenthesis",
        "output=s3://b/a,b/out": "quote the value",
        "storage.options.s3.endpoint_url=http://minio:9000": "with a leading '+': +storage.options.s3.endpoint_url=",
    }
    for overrides, said in cases.items():
        assert render_main([*base, *overrides.split(), "--cfg", "job"]) == 2, overrides
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and "--multirun" not in err, (overrides, err)
    for address in ("auto", "10.0.0.1:6379", "ray://head.example:10001", "head-0.ray.svc:6379"):
        assert render_main([*base, f"cluster.address={address}", "--cfg", "job"]) == 0, address
        capsys.readouterr()


def test_a_switch_given_a_number_other_than_0_or_1_is_refused(capsys):
    """OmegaConf reads any integer as a bool: `force=2` ran as force=true and
    `cluster.include_dashboard=-1` turned the dashboard on."""
    from heygem_ray.cli import render_main

    base = ["manifest=/data/m.parquet", "output=/data/out"]
    for override in ("force=2", "cluster.include_dashboard=-1", "++force=10"):
        assert render_main([*base, override, "--cfg", "job"]) == 2, override
        err = capsys.readouterr().err
        assert "is no switch value: give true or false" in err and "Traceback" not in err, (override, err)
    for override, shown in (("force=1", "force: true"), ("force=0", "force: false"), ("cluster.actors=2", "actors: 2")):
        assert render_main([*base, override, "--cfg", "job"]) == 0, override
        assert shown in capsys.readouterr().out, override


def test_a_mistyped_option_is_named_with_what_was_meant(capsys):
    """Hydra said "Could not override 'render.max_sid'. To append to your config use
    +render.max_sid=100", a way out that fails too (the options are a fixed schema); the README's
    `renderer.precision=fp32` without `renderer=wav2lip` said the same."""
    from heygem_ray.cli import render_main

    base = ["manifest=/data/m.parquet", "output=/data/out"]
    assert render_main([*base, "render.max_sid=100", "--cfg", "job"]) == 2
    said = capsys.readouterr().err
    assert "Key 'max_sid' not in 'RenderConfig' (did you mean render.max_side?)" in said and "+render" not in said
    assert render_main([*base, "renderer.precision=fp32", "--cfg", "job"]) == 2
    assert "(an option of renderer=wav2lip: give renderer=wav2lip too)" in capsys.readouterr().err
    wav2lip = ["renderer=wav2lip", "renderer.checkpoint=/m/wav2lip.pth", "renderer.precision=fp32"]
    assert render_main([*base, *wav2lip, "--cfg", "job"]) == 0


def test_a_segment_is_taken_for_hung_only_well_past_what_a_slow_node_needs():
    """The default deadline covers a CPU at a sixtieth of real time and a large avatar's download
    on a node's first segment; a negative one waits for ever."""
    from heygem_ray.config import RenderConfig

    assert RenderConfig().segment_deadline() == 1800.0
    assert RenderConfig(segment_seconds=60.0).segment_deadline() == 3600.0
    assert RenderConfig(segment_timeout=90.0).segment_deadline() == 90.0
    assert RenderConfig(segment_timeout=-1.0).segment_deadline() == float("inf")


def test_a_job_servers_address_in_ray_address_is_said_to_be_one(monkeypatch):
    """deploy.md's tip exports RAY_ADDRESS=http://...:8265 for `ray job` commands; a render started
    in that shell failed in Ray with "Invalid Ray address" and a traceback."""
    from heygem_ray.errors import ClusterConfigError
    from heygem_ray.executors.ray_cluster import _init

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    for cluster in ("cluster=local", "cluster=gpu"):  # gpu: `address: auto`, which reads RAY_ADDRESS too
        with pytest.raises(ClusterConfigError, match="is a job server's address, for `ray job submit`"):
            _init(compose_config("manifest=m", "output=o", cluster))


def test_a_run_refused_before_it_renders_leaves_the_last_runs_config(tmp_path, media_dir, capsys):
    """`_config.yaml` says what the videos there were made with: a rerun stopped by its manifest (a
    column misspelled) overwrote it with settings nothing was rendered with."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygem_ray.cli import render_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "_config.yaml").write_text("the last run's\n")
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"audio": [str(media_dir / "speech3.wav")], "avatr": [str(media_dir / "still.png")]}), bad)
    assert render_main([f"manifest={bad}", f"output={out}", "cluster=inline", "render.progress=false"]) == 2
    assert (out / "_config.yaml").read_text() == "the last run's\n"
    good = str(tmp_path / "good.parquet")
    pq.write_table(
        pa.table({"audio": [str(media_dir / "speech3.wav")], "avatar": [str(media_dir / "still.png")]}), good
    )
    assert render_main([f"manifest={good}", f"output={out}", "cluster=inline", "render.progress=false"]) == 0
    assert f"manifest: {good}" in (out / "_config.yaml").read_text()
