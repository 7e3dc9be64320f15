"""The infrastructure checker (`python -m infra.check`, infra/check.py) passes on the real files
under infra/ and catches a mutated copy for every check it has, so no check is one that cannot fail.

Fast and offline: no network, no docker, no Kubernetes, no Ray cluster.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.check import (
    CHECKS,
    ENTRY_SCRIPT,
    ROOT,
    UPLOAD_LIMIT,
    Bundle,
    cpu_quantity,
    dockerfile_problems,
    dockerignore_matches,
    load_bundle,
    main,
    memory_bytes,
    runtime_env_problems,
    secret_problems,
    text_secret_problems,
    upload_problems,
)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle()


# --------------------------------------------------------------------------- the real files


@pytest.mark.parametrize("check", list(CHECKS))
def test_check_passes_on_the_real_files(bundle, check):
    assert CHECKS[check](bundle) == []


def test_every_infra_yaml_is_read(bundle):
    assert {
        "infra/runtime_env.yaml",
        "infra/k8s/raycluster.yaml",
        "infra/k8s/rayjob.yaml",
        "infra/aws/cluster.yaml",
    } <= set(bundle["yaml_files"])


def test_the_service_account_is_defined_once_on_its_own(bundle):
    """In both Ray files, deleting a finished RayJob deleted the account the long-lived RayCluster's
    pods ran as, and applying one file over the other dropped the IAM role annotated on it."""
    import yaml

    defined = {
        name: [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict) and doc.get("kind") == "ServiceAccount"]
        for name, text in bundle["yaml_files"].items()
    }
    assert {name for name, docs in defined.items() if docs} == {"infra/k8s/serviceaccount.yaml"}
    [account] = defined["infra/k8s/serviceaccount.yaml"]
    assert account["metadata"]["name"] == "heygem-ray"


def test_no_literal_secrets_in_infra(bundle):
    problems = []
    for name in ("raycluster", "rayjob", "aws", "runtime_env"):
        problems += secret_problems(bundle[name], name)
    problems += text_secret_problems(bundle["dockerfile_text"], "Dockerfile")
    assert problems == []


# --------------------------------------------------------------------------- the checks can fail


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets bundle[path] (dotted; [i] for list items, "quoted" keys may hold dots)."""

    def mutate(b: dict) -> None:
        keys = [
            int(k[1:-1]) if k.startswith("[") else k.strip('"') for k in re.findall(r'\[\d+\]|"[^"]*"|[^.\[\]"]+', path)
        ]
        node = b
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return mutate


def _del(path: str) -> Callable[[dict], None]:
    def mutate(b: dict) -> None:
        *parent, last = path.split(".")
        node = b
        for key in parent:
            node = node[key]
        del node[last]

    return mutate


def _edit_entrypoint(old: str, new: str) -> Callable[[dict], None]:
    def mutate(b: dict) -> None:
        b["rayjob"]["spec"]["entrypoint"] = b["rayjob"]["spec"]["entrypoint"].replace(old, new)

    return mutate


def _both_specs(path: str, value: Any) -> Callable[[dict], None]:
    """Mutate the RayCluster spec and the RayJob's copy alike (so the specs stay equal)."""

    def mutate(b: dict) -> None:
        _set(f"raycluster.spec.{path}", value)(b)
        _set(f"rayjob.spec.rayClusterSpec.{path}", copy.deepcopy(value))(b)

    return mutate


def _drop_copy(b: dict, source: str) -> None:
    b["dockerfile"]["copies"] = [
        (srcs, dest) if source not in srcs else ([s for s in srcs if s != source], dest)
        for srcs, dest in b["dockerfile"]["copies"]
    ]


WORKER = "workerGroupSpecs[0].template.spec.containers[0]"
#: name: (the check that must catch it, the mutation, text one of that check's problems contains)
MUTATIONS: dict[str, tuple[str, Callable[[dict], None], str]] = {
    "extra yaml does not parse": (
        "yaml",
        _set('yaml_files."infra/k8s/extra.yaml"', "a: [1"),
        "infra/k8s/extra.yaml does not parse",
    ),
    "empty yaml file": (
        "yaml",
        _set('yaml_files."infra/k8s/empty.yaml"', "# nothing\n"),
        "infra/k8s/empty.yaml: no YAML document",
    ),
    "aws image differs": (
        "image",
        _set("aws.docker.image", "ghcr.io/heygem/heygem-ray:0.0.9"),
        "infra/aws/cluster.yaml docker.image",
    ),
    "raycluster worker image differs": (
        "image",
        _set(f"raycluster.spec.{WORKER}.image", "rayproject/ray:2.60.0-gpu"),
        "container ray-worker: image",
    ),
    "dockerfile label missing": ("image", _set("dockerfile.labels", {}), "no LABEL heygem.image"),
    "image tag not the package version": (
        "image",
        _set("pyproject.project.version", "0.2.0"),
        "not tagged with the package version",
    ),
    "docs lack the image": ("image", _set("deploy_doc", "nothing here"), "docs/deploy.md does not mention"),
    "a docs command runs the last release": (
        "image",
        lambda b: b.update(deploy_doc=b["deploy_doc"] + "\n    ghcr.io/heygem/heygem-ray:0.0.9 ray start --block\n"),
        "docs/deploy.md:",
    ),
    "the build comment tags the last release": (
        "image",
        lambda b: b.update(dockerfile_text="#   docker push ghcr.io/heygem/heygem-ray:0.0.9\n" + b["dockerfile_text"]),
        "infra/Dockerfile:1: image 'ghcr.io/heygem/heygem-ray:0.0.9'",
    ),
    "rayVersion differs": (
        "ray-version",
        _set("rayjob.spec.rayClusterSpec.rayVersion", "2.59.0"),
        "rayVersion '2.59.0'",
    ),
    "aws gpu worker without an AMI": (
        "aws",
        _del("aws.available_node_types.gpu_worker.node_config.ImageId"),
        "no node_config.ImageId",
    ),
    "package's Ray unpinned": (
        "ray-version",
        _set("pyproject.project.dependencies", ["ray[default]>=2.50,<3", "torch>=2.2"]),
        "does not pin the image's Ray",
    ),
    "base image unpinned": (
        "ray-version",
        _set("dockerfile.from", ["rayproject/ray:latest-gpu"]),
        "not a pinned Ray GPU image",
    ),
    "worker cpu too small": (
        "raycluster",
        _both_specs(f"{WORKER}.resources.limits.cpu", "2"),
        "limits cpu 2 < actor num_cpus + task_cpus",
    ),
    "worker cpu request in millicores too small": (
        "raycluster",
        _both_specs(f"{WORKER}.resources.requests.cpu", "2500m"),
        "requests cpu 2500m",
    ),
    "worker without gpu": (
        "raycluster",
        _both_specs(f'{WORKER}.resources.limits."nvidia.com/gpu"', 0),
        "limits nvidia.com/gpu 0",
    ),
    "worker without toleration": (
        "raycluster",
        _both_specs("workerGroupSpecs[0].template.spec.tolerations", []),
        "no toleration",
    ),
    "worker without preStop": ("raycluster", _both_specs(f"{WORKER}.lifecycle", {}), "no preStop `ray stop`"),
    "object store larger than shm": (
        "raycluster",
        _both_specs("workerGroupSpecs[0].rayStartParams.object-store-memory", str(20 * 2**30)),
        "does not fit /dev/shm",
    ),
    "head advertises cpus": (
        "raycluster",
        _both_specs("headGroupSpec.rayStartParams.num-cpus", "2"),
        "num-cpus is '2'",
    ),
    "head asks for a gpu": (
        "raycluster",
        _both_specs('headGroupSpec.template.spec.containers[0].resources.limits."nvidia.com/gpu"', 1),
        "asks for a GPU",
    ),
    "autoscaling off": (
        "raycluster",
        _both_specs("enableInTreeAutoscaling", False),
        "enableInTreeAutoscaling is not true",
    ),
    "gpu group renamed": (
        "raycluster",
        _both_specs("workerGroupSpecs[0].groupName", "workers"),
        "expected one worker group",
    ),
    "gpu group min 1": ("raycluster", _both_specs("workerGroupSpecs[0].minReplicas", 1), "minReplicas is 1"),
    "rayjob cluster differs from raycluster": (
        "rayjob",
        _set(f"rayjob.spec.rayClusterSpec.{WORKER}.resources.limits.memory", "8Gi"),
        "differs from infra/k8s/raycluster.yaml",
    ),
    "rayjob runs another script": (
        "rayjob",
        _edit_entrypoint("jobs/render_campaign.py", "jobs/other.py"),
        "not jobs/render_campaign.py",
    ),
    "rayjob script outside workdir": (
        "rayjob",
        _edit_entrypoint("/home/ray/heygem/", "/opt/app/"),
        "not under the image WORKDIR",
    ),
    "rayjob without cluster=gpu": (
        "rayjob",
        _edit_entrypoint("cluster=gpu", "cluster=local"),
        "does not select cluster=gpu",
    ),
    "rayjob override typo": ("rayjob", _edit_entrypoint("cluster.actors=", "cluster.actorz="), "do not compose"),
    "rayjob more actors than pods hold": (  # 4 to an 8-CPU pod, one of 8 pods left for tasks
        "rayjob",
        _edit_entrypoint("cluster.actors=24", "cluster.actors=29"),
        "reaches 28",
    ),
    "rayjob more actors than pods hold at 0.3 GPU": (  # 3 to a pod, each leaving CPUs for tasks
        "rayjob",
        _edit_entrypoint("cluster.actors=24", "cluster.actors=25 cluster.actor.num_gpus=0.3"),
        "reaches 24",
    ),
    "rayjob actors left at 0": ("rayjob", _edit_entrypoint("cluster.actors=24", "cluster.actors=0"), "single actor"),
    "rayjob keeps its cluster": (
        "rayjob",
        _set("rayjob.spec.shutdownAfterJobFinishes", False),
        "shutdownAfterJobFinishes",
    ),
    "rayjob env differs": (
        "runtime-env",
        _set("rayjob.spec.runtimeEnvYAML", "env_vars:\n  PYTHONUNBUFFERED: '0'\n"),
        "env var PYTHONUNBUFFERED",
    ),
    "rayjob env yaml broken": (
        "runtime-env",
        _set("rayjob.spec.runtimeEnvYAML", "env_vars: [1"),
        "runtimeEnvYAML does not parse",
    ),
    "runtime env int value": ("runtime-env", _set("runtime_env.env_vars.PYTHONUNBUFFERED", 1), "is not a string"),
    "runtime env sets auth mode": (
        "runtime-env",
        _set("runtime_env.env_vars.RAY_AUTH_MODE", "token"),
        "RAY_AUTH_MODE is a client/node",
    ),
    "runtime env secret": (
        "runtime-env",
        _set("runtime_env.env_vars.AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG"),
        "literal value",
    ),
    "runtime env pip": ("runtime-env", _set("runtime_env.pip", ["torch"]), "unexpected keys ['pip']"),
    "upload leaves the package out": (
        "upload-excludes",
        _set("runtime_env.excludes", ["/.venv/", "/heygem_ray/"]),
        "heygem_ray/cli.py would be left out",
    ),
    "upload drops the configs": (
        "upload",
        _set("runtime_env.excludes", ["/.venv/", "/conf/"]),
        "upload would not contain conf/cluster/gpu.yaml",
    ),
    "k8s env token literal": (
        "secrets",
        _both_specs(f"{WORKER}.env", [{"name": "RAY_AUTH_TOKEN", "value": "abc123"}]),
        "env RAY_AUTH_TOKEN has a literal value",
    ),
    "aws key id in run options": (
        "secrets",
        _set("aws.docker.run_options", ["--env AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP"]),
        "AWS access key id",
    ),
    "aws head advertises cpus": (
        "aws",
        _set("aws.available_node_types.head.resources", {"CPU": 8}),
        "head resources CPU is 8",
    ),
    "aws gpu type too small": (
        "aws",
        _set("aws.available_node_types.gpu_worker.resources", {"CPU": 2, "GPU": 1}),
        "CPU 2 < actor num_cpus + task_cpus",
    ),
    "aws declares more than the instance": (
        "aws",
        _set("aws.available_node_types.gpu_worker.resources", {"CPU": 16, "GPU": 1}),
        "g5.2xlarge has 8 vCPU",
    ),
    "aws gpu resources undeclared": (
        "aws",
        _del("aws.available_node_types.gpu_worker.resources"),
        "no worker type declares",
    ),
    "aws worker auth mode differs": (
        "aws",
        _set(
            "aws.worker_start_ray_commands",
            ["ray stop", "export RAY_AUTH_MODE=disabled; ray start --address=$RAY_HEAD_IP:6379"],
        ),
        "RAY_AUTH_MODE differs",
    ),
    "cluster without token auth": ("raycluster", _del("raycluster.spec.authOptions"), "authOptions.mode is None"),
    "worker pods run as another account": (
        "raycluster",
        _set("raycluster.spec.workerGroupSpecs[0].template.spec.serviceAccountName", "default"),
        "serviceAccountName is 'default'",
    ),
    "worker cache on no volume": (
        "raycluster",
        _set("raycluster.spec.workerGroupSpecs[0].template.spec.containers[0].volumeMounts[1].mountPath", "/data"),
        "HEYGEM_CACHE_DIR=/scratch/heygem-cache is on no volume",
    ),
    "head stops Ray under its jobs": (
        "raycluster",
        _set(
            "raycluster.spec.headGroupSpec.template.spec.containers[0].lifecycle.preStop.exec.command",
            ["/bin/sh", "-c", "ray stop"],
        ),
        "preStop does not stop the running jobs",
    ),
    "head killed before its jobs stop": (
        "raycluster",
        _del("raycluster.spec.headGroupSpec.template.spec.terminationGracePeriodSeconds"),
        "terminationGracePeriodSeconds 30 < RAY_JOB_STOP_WAIT_TIME_S 30",
    ),
    "head without the stop wait": (
        "raycluster",
        _set("raycluster.spec.headGroupSpec.template.spec.containers[0].env", []),
        "RAY_JOB_STOP_WAIT_TIME_S not set",
    ),
    "aws token not synced": ("aws", _set("aws.file_mounts", {}), "does not sync ~/.ray/auth_token"),
    "aws container without auth mode": (
        "aws",
        _set("aws.docker.run_options", ["--gpus all"]),
        "docker.run_options does not set RAY_AUTH_MODE",
    ),
    "aws worker min 1": ("aws", _set("aws.available_node_types.gpu_worker.min_workers", 1), "min_workers is 1"),
    "aws schema rejects an unknown field": (
        "aws-schema",
        _set("aws.available_node_types.gpu_worker.max_worker", 8),  # typo of max_workers
        "'max_worker' was unexpected",
    ),
    "dockerignore drops the readme": ("dockerfile", _set("dockerignore", ["*.md"]), "excludes README.md"),
    "dockerfile bakes weights": (
        "dockerfile",
        lambda b: b["dockerfile"]["copies"].append((["wav2lip_gan.pth"], "/models/")),
        "copies weights",
    ),
    "dockerfile skips jobs": ("dockerfile", lambda b: _drop_copy(b, "jobs/"), "jobs/ is not copied"),
    "dockerfile skips the readme": ("dockerfile", lambda b: _drop_copy(b, "README.md"), "README.md is not copied"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checks_catch(bundle, name):
    check, mutate, expected = MUTATIONS[name]
    broken = copy.deepcopy(bundle)
    mutate(broken)
    problems = CHECKS[check](broken)
    assert any(expected in p for p in problems), f"{name}: no {check} problem mentions {expected!r}; got {problems}"


def test_every_check_has_a_mutation():
    assert {check for check, _, _ in MUTATIONS.values()} == set(CHECKS)


def test_upload_over_the_limit(tmp_path):
    for name in (ENTRY_SCRIPT, "conf/cluster/gpu.yaml", "heygem_ray/cli.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    with open(tmp_path / "big.bin", "wb") as fh:
        fh.truncate(UPLOAD_LIMIT)  # sparse: the size counts, not the blocks
    problems = upload_problems({"root": tmp_path, "runtime_env": {"excludes": []}})
    assert len(problems) == 1 and "over Ray's 100 MiB limit" in problems[0] and "big.bin" in problems[0]


def test_checks_read_the_given_root(bundle, tmp_path):
    """Paths the checks look up on disk come from the bundle's root, not from the checkout."""
    moved = copy.deepcopy(bundle)
    moved["root"] = tmp_path
    assert any("COPY source jobs does not exist" in p for p in dockerfile_problems(moved))
    assert runtime_env_problems(moved) == []


def test_another_checkouts_files_are_checked_against_its_own_configs(bundle, tmp_path):
    """`--root DIR` composed this checkout's `conf/`: another checkout whose renderers no longer fit
    its pods passed."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    gpu = tmp_path / "conf" / "cluster" / "gpu.yaml"
    gpu.write_text(gpu.read_text().replace("num_cpus: 2.0", "num_cpus: 16.0"))
    moved = copy.deepcopy(bundle)
    moved["root"] = tmp_path
    assert CHECKS["raycluster"](bundle) == []
    assert any("< actor num_cpus + task_cpus = 17.0" in p for p in CHECKS["raycluster"](moved))


@pytest.mark.parametrize(
    "text, bad",
    [
        ("export AWS_SECRET_ACCESS_KEY=abc", True),
        ("export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY", False),
        ("RAY_AUTH_TOKEN=<from the secret>", False),
        ("RAY_AUTH_MODE=token", False),
        ("PYTHONUNBUFFERED=1", False),
        ("key AKIAABCDEFGHIJKLMNOP", True),
    ],
)
def test_text_secret_check(text, bad):
    assert bool(text_secret_problems(text, "t")) is bad


@pytest.mark.parametrize(
    "pattern, path, hit",
    [
        ("*.md", "README.md", True),
        ("**/__pycache__", "heygem_ray/__pycache__", True),
        ("**/__pycache__", "heygem_ray", False),
        ("conf", "conf", True),
        ("heygem_ray/conf", "heygem_ray", True),
        (".venv", "heygem_ray", False),
        ("*.egg-info", "heygem_ray", False),
    ],
)
def test_dockerignore_matcher(pattern, path, hit):
    assert dockerignore_matches(pattern, path) is hit


def test_quantities():
    assert cpu_quantity("7500m") == 7.5 and cpu_quantity(8) == 8 and cpu_quantity(None) is None
    assert memory_bytes("32Gi") == 32 * 2**30 and memory_bytes("2G") == 2e9 and memory_bytes("x") is None


# --------------------------------------------------------------------------- the command


def _run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "infra.check", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _copy_checkout(dest: Path) -> Path:
    """What the checks read (and the Dockerfile copies), without .git, .venv or caches."""
    skip = shutil.ignore_patterns("__pycache__")
    for name in ("infra", "heygem_ray", "conf", "jobs"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    for name in (".dockerignore", "pyproject.toml", "README.md", "docs/deploy.md"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def test_command_passes_on_the_repository():
    proc = _run_tool()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"infra: {len(CHECKS)} checks passed"


def test_command_names_the_problem_in_a_broken_copy(tmp_path):
    root = _copy_checkout(tmp_path / "checkout")
    aws = root / "infra" / "aws" / "cluster.yaml"
    text = aws.read_text()
    assert text.count("image: ghcr.io/heygem/heygem-ray:") == 1
    aws.write_text(re.sub(r"image: ghcr.io/heygem/heygem-ray:\S+", "image: ghcr.io/heygem/heygem-ray:0.0.9", text))
    proc = _run_tool("--root", str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    # only the broken file is reported: the copy is otherwise complete
    assert lines and all(line.startswith("infra/aws/cluster.yaml docker.image: image") for line in lines), lines
    assert "0.0.9" in lines[0]
    assert "checks passed" not in proc.stdout


def test_command_reports_missing_files(tmp_path, capsys):
    assert main(["--root", str(tmp_path)]) == 1
    assert "infra: cannot load the files" in capsys.readouterr().out
