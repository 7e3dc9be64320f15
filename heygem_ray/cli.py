"""`heygem-ray`: the command line.

heygem-ray render manifest=URI output=URI [overrides...] [--cfg job]   render a campaign (or print its config)
heygem-ray demo [--dir DIR] [--rows N] [hydra overrides...]        make and render a demo campaign
heygem-ray manifest --audio A... --avatar V... --out URI          build a cross-product manifest
heygem-ray studio [studio.key=value ...]                          the web front end (http://127.0.0.1:7860)
heygem-ray studio adduser NAME [--auth FILE] [--password-stdin]   add a studio user (or set a password)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from omegaconf import DictConfig, OmegaConf

from heygem_ray import storage
from heygem_ray.config import Config, register_configs, to_plain
from heygem_ray.errors import HeygemError, ManifestError


def _config_path() -> str:
    """conf/ beside the package (a checkout, or a `ray job submit --working-dir` upload, whose copy of
    heygem_ray/ shadows the installed one) wins over the copy installed as heygem_ray.conf, so code
    and configs always come from the same place."""
    beside = Path(__file__).resolve().parent.parent / "conf"
    return str(beside) if (beside / "config.yaml").is_file() else "pkg://heygem_ray.conf"


CONFIG_PATH = _config_path()
#: option names whose values are masked in the written config (fsspec backends' credentials: S3
#: keys, Azure connection strings and SAS, HTTP headers, SFTP passphrases, ...)
_SECRET_WORDS = (
    "key",
    "secret",
    "token",
    "password",
    "passphrase",
    "credential",
    "connection",
    "auth",
    "sas",
    "cookie",
)

register_configs()


def render(cfg: Config, resolved: DictConfig | None = None, launched: float | None = None) -> int:
    """Render a campaign from a plain config; returns the process exit status. `launched`: where
    the start-up breakdown begins (None = when this process started)."""
    from heygem_ray import campaign
    from heygem_ray.output_lock import OutputLostError, output_lock

    cfg = cfg.anchored()  # the lock, the config file and the campaign name one output root
    if (problem := scheme_problem(cfg)) is not None:
        print(f"heygem-ray: error: {problem}", file=sys.stderr)
        return 2
    running = False  # the campaign's loop has begun: a stop from then on reports every row
    try:
        storage.configure(cfg.storage.options)
        with output_lock(cfg.layout) as held:

            def record() -> None:  # the config this run renders with, once it is to render
                if resolved is not None:
                    storage.write_bytes(cfg.layout.config, config_yaml(resolved).encode())

            def guard() -> None:  # asked as the campaign begins, then at every turn of its loop
                nonlocal running
                running = True
                held.check()

            with _stops_interrupt():
                summary = campaign.run(cfg, launched, guard, record)
    except OutputLostError as exc:  # its rows that did not finish are reported failed, as on a stop
        print(f"heygem-ray: error: {exc}", file=sys.stderr)
        return 1
    except HeygemError as exc:
        print(f"heygem-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not running:  # reading the manifest, starting Ray, waiting for the output root: no table written
            print("heygem-ray: interrupted before any row started: nothing was rendered", file=sys.stderr)
            return 130
        print(
            f"heygem-ray: interrupted; rows that did not finish are reported failed in "
            f"{storage.display(cfg.layout.results)}: run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # the store or the cluster still failing after their retries
        print(
            f"heygem-ray: error: {storage.display(f'{type(exc).__name__}: {exc}')}; run the same command again "
            "to resume",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # a store client's own refusal (no credentials): set-up, not a traceback
        if not storage.client_error(exc):
            raise
        print(
            f"heygem-ray: error: the store refused: {storage.display(f'{type(exc).__name__}: {exc}')}", file=sys.stderr
        )
        return 2
    print(f"heygem-ray: {summary.line()}")
    if summary.startup:
        print(f"heygem-ray: start-up: {summary.startup_line()}")
    print(f"heygem-ray: results: {storage.display(cfg.layout.results)}")
    return 1 if summary.failed else 0


@contextlib.contextmanager
def _stops_interrupt() -> Iterator[None]:
    """The first SIGTERM (what `ray job stop`, Kubernetes and `kill` send) or Ctrl-C raises
    KeyboardInterrupt while a campaign runs: SIGTERM's default action ended the process on the
    spot, before the campaign wrote its results table, report and progress feed. Those that follow
    are let go while it does (a second Ctrl-C, pressed out of habit, stopped the table's writing
    midway and left the earlier run's in its place); Ctrl-\\ (SIGQUIT) still ends it at once."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    stopping = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt(f"signal {signum}")
        if signum == signal.SIGINT:
            print(
                "heygem-ray: stopping: every row's result is being written (a few seconds); Ctrl-\\ ends it at "
                "once, without them",
                file=sys.stderr,
                flush=True,
            )

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML with credentials masked: options with credential-looking names,
    and the user:password@ and signature/token query parts of every URI (`storage.display`)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    data.pop("model_versions", None)  # the campaign's own, taken as it starts (logged then)

    def mask(node: object) -> object:
        if isinstance(node, dict):
            return {k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else mask(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mask(v) for v in node]
        return storage.display(node) if isinstance(node, str) else node

    masked = mask(data)
    assert isinstance(masked, dict)
    return OmegaConf.to_yaml(OmegaConf.create(masked))


def render_main(argv: Sequence[str] | None = None) -> int:
    """`heygem-ray render` and `jobs/render_campaign.py`: Hydra overrides (`key=value`,
    `group=option`, `+key=value`) composed over conf/, resolved to plain dataclasses (nothing
    Hydra-specific reaches Ray workers), then rendered; `--cfg job` prints the config instead.
    Returns the exit status: 0 ok, 1 some row failed, 2 a configuration or manifest error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(
            "usage: heygem-ray render manifest=URI output=URI [key=value | group=option | +key=value ...] [--cfg job]\n"
            "Options and their defaults: heygem_ray/config.py; print the composed config with --cfg job."
        )
        return 0
    show = args[-2:] == ["--cfg", "job"]
    overrides = args[:-2] if show else args
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        print(f"heygem-ray: error: unknown option {flags[0]} (only --cfg job, at the end)", file=sys.stderr)
        return 2
    bare = [a for a in overrides if "=" not in a and not a.startswith("~")]  # ~key deletes a key
    if bare:  # Hydra said "missing EQUAL" and how to quote special characters
        print(
            f"heygem-ray: error: {bare[0]!r} is no key=value: give manifest=URI output=URI (and other settings "
            "as key=value)",
            file=sys.stderr,
        )
        return 2
    try:
        check_job_secrets(overrides)
        cfg = compose(overrides)
        plain = to_plain(cfg)  # checked as a run checks it, `--cfg job` too
        check_job_paths(plain)
        if show and (problem := scheme_problem(plain)) is not None:
            raise ValueError(problem)
        if show:  # what a run checks before it starts anything, then the config
            from heygem_ray.campaign import check_encoder

            check_encoder(plain)
        if show:  # resolved, and masked as `_config.yaml` is (a job's log keeps what it prints)
            print(config_yaml(cfg), end="")
            return 0
    except Exception as exc:  # noqa: BLE001 - config mistakes are user errors, show them plainly
        print(f"heygem-ray: error: invalid configuration: {_described(exc)}{_quoting_hint(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    return render(plain, cfg)


def _described(exc: Exception) -> str:
    """An error composing the config as a person can act on it: Hydra says "Could not override
    'render.max_sid'. To append to your config use +render.max_sid=100", a hint that fails too
    (the options are a fixed schema); the cause (no such option), a near name, or the renderer that
    has that option is what helps."""
    import dataclasses
    import difflib

    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError

    from heygem_ray.config import RENDERERS

    cause = exc.__cause__
    said = str(exc)
    if said.startswith("Ambiguous value"):  # a ',' in a value: Hydra's way out of a sweep is no option here
        return "\n".join(line for line in said.splitlines() if "--multirun" not in line)
    if not isinstance(exc, ConfigCompositionException) or cause is None:
        return said
    key = str(getattr(cause, "full_key", "") or "")
    said = f"{key}: {str(cause).splitlines()[0]}" if key else str(cause).splitlines()[0]
    if key.startswith("storage.options."):  # a free-form mapping: new keys go in with '+'
        return f"{said} (storage.options takes new keys, each with a leading '+': +storage.options.s3.endpoint_url=...)"
    schema = getattr(cause, "object_type", None)
    if not isinstance(cause, ConfigAttributeError) or not dataclasses.is_dataclass(schema):
        return said
    name = key.rpartition(".")[2]
    owners = [r for r, (kind, _) in RENDERERS.items() if key.startswith("renderer.") and name in _fields(kind)]
    if owners:
        return f"{said} (an option of renderer={owners[0]}: give renderer={owners[0]} too)"
    near = difflib.get_close_matches(name, _fields(schema), n=1)
    return f"{said} (did you mean {key.rpartition('.')[0]}.{near[0]}?)" if near else said


def _fields(kind: Any) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(kind)]


def _quoting_hint(exc: Exception) -> str:
    """What to do about an override Hydra could not parse: most often a path with a character its
    grammar reserves, which the message alone does not say."""
    from hydra.errors import OverrideParseException

    if not isinstance(exc, OverrideParseException):
        return ""
    return (
        "\n(a value with a space, '=', ',', parenthesis, bracket, brace, quote, '#', '&', ';', '!', '~', '<', '>' or "
        "a letter outside ASCII must be quoted, the quotes kept from the shell: \"output='s3://b/date=2026-12-01/run (1)'\")"
    )


def check_job_secrets(overrides: Sequence[str], in_job: bool | None = None) -> None:
    """ValueError for a credential given as a literal override in a Ray job (`in_job`; None: this
    process is one): Ray writes the job's entrypoint, these overrides included, into the job's log
    ("Running entrypoint for job ..."), keeps it in its job table (`ray job list`, the dashboard)
    and the studio shows users the log's end. `${oc.env:VAR}` names the variable only, resolved on
    the head node. A dict given whole (`+storage.options.s3={key: ..., secret: ...}`) is looked into."""
    from heygem_ray.config import in_ray_job

    if not (in_ray_job() if in_job is None else in_job):
        return
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        found = _literal_secret(key, _parsed(value))
        if found:
            adds = "+" if override.startswith("+") else ""  # a key the config lacks is added, as given
            raise ValueError(
                f"{found} is given on the job's command line, which Ray writes into the job's log and job table: "
                f"set it in the nodes' environment (AWS_SECRET_ACCESS_KEY, ...) or as "
                f"'{adds}{found}=${{oc.env:VARIABLE}}'"
            )


#: credential-looking option names that name no secret: files, switches, key ids
_NOT_SECRET = re.compile(r".*(_file|_filename|_path|_dir|id)|look_for_keys|allow_agent|use_ssl|token_type")
#: values a credential-looking option takes that are no secret: gcsfs's token modes, switches
_NOT_SECRET_VALUES = {"anon", "google_default", "cloud", "browser", "cache", "true", "false", "none", "null", ""}


def _parsed(value: str) -> object:
    """An override's value: a dict or list given whole as one, else the text."""
    if value[:1] not in ("{", "["):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _literal_secret(key: str, value: object) -> str | None:
    """The dotted name of a credential `value` gives literally under `key`, if any."""
    if isinstance(value, dict):
        return next((found for k, v in value.items() if (found := _literal_secret(f"{key}.{k}", v))), None)
    name = key.rsplit(".", 1)[-1].lower()
    text = str(value)
    if (
        value is None
        or text.startswith("${")
        or text.lower() in _NOT_SECRET_VALUES
        or _NOT_SECRET.fullmatch(name)
        or not any(w in name for w in _SECRET_WORDS)
    ):
        return None
    return key


def scheme_problem(cfg: Config) -> str | None:
    """Why a URI of the config names a store this machine cannot reach (a scheme unknown, or its
    fsspec package not installed), or None: the manifest, output, cache and model files (a model
    file's failed the run with a traceback, once started)."""
    uris = {
        "manifest": cfg.manifest,
        "output": cfg.output,
        "cache": cfg.cache_uri,
        "renderer.checkpoint": getattr(cfg.renderer, "checkpoint", None),
        "detector.checkpoint": cfg.detector.checkpoint,
        "qa.syncnet": cfg.qa.syncnet,
    }
    for what, uri in uris.items():
        if isinstance(uri, str) and uri and (problem := storage.scheme_problem(uri)) is not None:
            return f"{what} {storage.display(uri)}: {problem}"
    return None


def check_job_paths(cfg: Config) -> None:
    """ValueError for a relative local `manifest`, `output` or `cache` in a Ray job: the job runs in
    Ray's copy of its working directory, removed with the job (outputs written there are lost)."""
    from heygem_ray.config import in_ray_job

    given = {"manifest": cfg.manifest, "output": cfg.output, "cache": cfg.cache}
    loose = [f"{key}={value}" for key, value in given.items() if value and storage.is_relative(value)]
    if loose and in_ray_job():
        raise ValueError(
            f"{loose[0]} is a relative path: a Ray job runs in Ray's copy of its working directory, removed "
            "with the job; give an absolute path or a URI"
        )


def compose(overrides: Sequence[str], config_name: str = "config", config_dir: str | None = None) -> DictConfig:
    """The same config `render` (or, with config_name="studio", `studio`) would see, through
    Hydra's compose API; `config_dir`: another checkout's `conf/` instead of this one's."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    context: initialize_config_module | initialize_config_dir
    config_dir = config_dir or CONFIG_PATH
    if config_dir.startswith("pkg://"):
        context = initialize_config_module(config_module="heygem_ray.conf", version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=config_dir, version_base="1.3")
    with context:
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    _check_switches(cfg, overrides)
    return cfg


def _check_switches(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """ValueError for a switch given a number other than 0 or 1: OmegaConf reads any other integer
    as true (`force=2`, `cluster.include_dashboard=-1`), where a person meant something else."""
    for override in overrides:
        key, equals, value = override.lstrip("+").partition("=")
        number = value.strip()
        if not equals or override.startswith("~") or not re.fullmatch(r"[+-]?[0-9]+", number):
            continue
        if number not in ("0", "1") and isinstance(OmegaConf.select(cfg, key, default=None), bool):
            raise ValueError(f"{key}: {number} is no switch value: give true or false")


def demo_main(argv: Sequence[str]) -> int:
    from heygem_ray.demo import make_demo_assets
    from heygem_ray.manifest import build_manifest

    parser = argparse.ArgumentParser(
        prog="heygem-ray demo", description="Make and render a demo campaign on local Ray."
    )
    parser.add_argument("--dir", default="heygem-demo", help="folder for inputs and outputs (default: ./heygem-demo)")
    parser.add_argument("--rows", type=int, default=6, help="manifest rows (default 6: 2 narrations x 3 avatars)")
    args, overrides = parser.parse_known_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be 1 or more, got {args.rows}")
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if any(o.split("=", 1)[0].lstrip("+~") in ("manifest", "output") for o in overrides):
        parser.error("the demo makes its own manifest and output under --dir: give --dir instead")
    root = os.path.abspath(args.dir)
    manifest = os.path.join(root, "manifest.parquet")
    output = os.path.join(root, "output")
    try:  # before any input is made
        cfg = compose([f"manifest={manifest}", f"output={output}", *overrides])
        plain = to_plain(cfg)
    except Exception as exc:  # noqa: BLE001 - config mistakes are user errors, show them plainly
        print(f"heygem-ray: error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    narrations = max(2, math.ceil(args.rows / 3))
    seconds = tuple(6.0 + 3.0 * (i % 3) for i in range(narrations))
    print(f"heygem-ray demo: making {narrations} narrations and 3 avatars in {root}/inputs")
    try:
        assets = make_demo_assets(os.path.join(root, "inputs"), audio_seconds=seconds)
    except OSError as exc:  # a --dir that cannot be written; matplotlib's sample portrait missing
        print(f"heygem-ray: error: the demo's inputs could not be made: {exc}", file=sys.stderr)
        return 2
    try:
        build_manifest(assets.audios, assets.avatars, manifest, limit=args.rows)
    except ManifestError as exc:  # a manifest.parquet of the user's own in --dir
        print(f"heygem-ray: error: the demo's manifest: {exc}", file=sys.stderr)
        return 2
    launched = time.time()  # the render starts here: making the inputs is not the campaign's start-up
    status = render(plain, cfg, launched)
    layout = plain.layout
    if status in (0, 1) and os.path.exists(layout.report):  # not after a refusal, a stop or a store failing
        print(f"heygem-ray demo: videos in {output}/")
        print(f"heygem-ray demo: open {layout.report} for a page with every row; results table {layout.results}")
    return status


def manifest_main(argv: Sequence[str]) -> int:
    from heygem_ray.manifest import build_manifest

    parser = argparse.ArgumentParser(
        prog="heygem-ray manifest",
        description="Write the cross product of audio x avatar URIs/globs as a Parquet manifest "
        "(one narration over many presenters, or many narrations over one).",
    )
    # extend: `--audio a.wav --audio b.wav` is both (the default kept the last alone)
    parser.add_argument("--audio", nargs="+", action="extend", required=True, help="audio URIs or globs (quote globs)")
    parser.add_argument("--avatar", nargs="+", action="extend", required=True, help="avatar video/image URIs or globs")
    parser.add_argument("--out", required=True, help="manifest URI to write (.parquet)")
    args = parser.parse_args(argv)
    for uri in (*args.audio, *args.avatar, args.out):
        if (problem := storage.scheme_problem(uri)) is not None:
            print(f"heygem-ray: error: {storage.display(uri)}: {problem}", file=sys.stderr)
            return 2
    try:
        count = build_manifest(args.audio, args.avatar, args.out)
    except HeygemError as exc:
        print(f"heygem-ray: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # --out a folder, a store refusing (no credentials): said, not a traceback
        if not (isinstance(exc, OSError) or storage.client_error(exc)):
            raise
        print(f"heygem-ray: error: {storage.display(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 2
    print(f"heygem-ray: wrote {count} rows to {storage.display(args.out)}")
    return 0


#: the largest image a studio upload may decode to (8K x 8K)
STUDIO_MAX_IMAGE_PIXELS = 8192 * 8192


def limit_studio_images() -> None:
    """Cap OpenCV's image decoder, before OpenCV loads (it reads the limit once, then): an uploaded
    image that would decode to gigabytes is refused instead of taking the web server down."""
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(STUDIO_MAX_IMAGE_PIXELS))


def studio_main(argv: Sequence[str]) -> int:
    """`heygem-ray studio [overrides]` and `heygem-ray studio adduser NAME`."""
    from heygem_ray.config import StudioAppConfig

    limit_studio_images()
    from heygem_ray.studio import server

    args = list(argv)
    adduser = bool(args) and args[0] == "adduser"
    if not adduser and any(a in ("-h", "--help") for a in args):
        print(
            "usage: heygem-ray studio [studio.key=value ...]   the web studio (options: StudioConfig in\n"
            '       heygem_ray/config.py, conf/studio.yaml; docs/ops.md, "The studio")\n'
            "       heygem-ray studio adduser NAME [--auth FILE | studio.auth=FILE] [--password-stdin]\n"
            "                                                   add a user, or set a password"
        )
        return 0
    overrides = [a for a in args if "=" in a and not a.startswith("-")] if adduser else args
    try:
        composed = OmegaConf.to_object(compose(overrides, config_name="studio"))
    except Exception as exc:  # noqa: BLE001 - config mistakes are user errors, show them plainly
        print(f"heygem-ray: error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    assert isinstance(composed, StudioAppConfig)
    try:  # every campaign job would refuse to start: say so now
        check_job_secrets(composed.studio.render_overrides, in_job=True)
    except ValueError as exc:
        print(f"heygem-ray: error: studio.render_overrides: {exc}", file=sys.stderr)
        return 2
    if adduser:
        return server.adduser_main([a for a in args[1:] if a not in overrides], composed.studio.auth)
    return server.serve(composed.studio)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    commands = {"render": render_main, "demo": demo_main, "manifest": manifest_main, "studio": studio_main}
    if command not in commands:
        print(f"heygem-ray: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    return commands[command](rest)


def console_main() -> NoReturn:
    """The `heygem-ray` command (and `python -m heygem_ray.cli`)."""
    exit_now(main())


def exit_now(status: int) -> NoReturn:
    """End this process with `status` once a command is done: the atexit handlers run (logging's
    flush, Ray's), then the process ends without the interpreter's teardown, which frees every
    object of Ray, pyarrow, OpenCV and the rest one by one: ~0.3 s of a one-row render's ~11 s
    (benchmarks/RESULTS.md, "Speed by default"). Everything a command writes is closed (and
    fsynced) before it returns. A thread still working gets the ordinary exit, which waits for it;
    an inline run's renderers and stage tasks run on daemon threads (a file is published whole: one
    cut short leaves nothing, and the stop waited for its stitches). Only for a process's end:
    tests call `main`."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not change the status
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
