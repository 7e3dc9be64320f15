"""Checks that the deployment files under infra/ agree with each other and with the code.

    python -m infra.check [--root DIR]

Reads infra/Dockerfile, .dockerignore, infra/runtime_env.yaml, infra/k8s/raycluster.yaml,
infra/k8s/rayjob.yaml, infra/aws/cluster.yaml, docs/deploy.md and pyproject.toml under DIR (default:
the repository this file is in), prints every problem found, one a line, and exits 1 if there is any
(0 and "infra: N checks passed" otherwise). The renderer actor's resources come from the
`cluster=gpu` config composed by the heygem_ray this Python imports, as `heygem-ray render` composes it.

Offline: no network, no docker, no Kubernetes, no Ray cluster. Every check is a function of the
loaded files (`load_bundle`) that returns a list of problems (empty = fine); tests/test_infra.py
runs each one on the real files and on mutated copies. Not part of the heygem_ray package.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import functools
import logging
import math
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from heygem_ray.config import Config
from heygem_ray.executors.ray_cluster import fit_actors

#: everything the checks read, parsed (see load_bundle)
Bundle = dict[str, Any]

#: the repository this file lives in (what `--root` defaults to)
ROOT = Path(__file__).resolve().parents[1]
# the files checked, relative to the root
DOCKERFILE = "infra/Dockerfile"
DOCKERIGNORE = ".dockerignore"
RUNTIME_ENV = "infra/runtime_env.yaml"
RAYCLUSTER = "infra/k8s/raycluster.yaml"
RAYJOB = "infra/k8s/rayjob.yaml"
AWS_CLUSTER = "infra/aws/cluster.yaml"
DEPLOY_DOC = "docs/deploy.md"
PYPROJECT = "pyproject.toml"
#: the Hydra overrides of the config the cluster files are sized for (as the RayJob's driver sees it)
GPU_OVERRIDES = ("manifest=m", "output=o", "cluster=gpu")
ENTRY_SCRIPT = "jobs/render_campaign.py"
GPU_GROUP = "gpu-workers"
SERVICE_ACCOUNT = "heygem-ray"  # infra/k8s/serviceaccount.yaml: the account an S3 role is bound to
#: env vars that name a folder of the pod's
PATH_ENV = ("HEYGEM_CACHE_DIR", "TMPDIR")
#: seconds a head pod lives past RAY_JOB_STOP_WAIT_TIME_S: the preStop's 20 s more for the jobs
#: to end, and Ray's own stop
STOP_MARGIN_SECONDS = 40
UPLOAD_LIMIT = 100 * 1024**2  # `ray job submit --working-dir` upload limit (dashboard client_max_size)

# vCPU and GPU count of EC2 instance types a GPU worker type may use; declared resources must not
# exceed the machine (Ray would schedule work the node cannot run). Unknown types are not checked.
EC2_SHAPES = {
    "g4dn.xlarge": (4, 1),
    "g4dn.2xlarge": (8, 1),
    "g4dn.4xlarge": (16, 1),
    "g4dn.12xlarge": (48, 4),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1),
    "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4),
    "g5.16xlarge": (64, 1),
    "g5.24xlarge": (96, 4),
    "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1),
    "g6.2xlarge": (8, 1),
    "g6.4xlarge": (16, 1),
    "g6.8xlarge": (32, 1),
    "g6.12xlarge": (48, 4),
    "g6e.xlarge": (4, 1),
    "g6e.2xlarge": (8, 1),
    "g6e.4xlarge": (16, 1),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}

SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", re.IGNORECASE)
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
ENV_ASSIGNMENT = re.compile(r"\b([A-Z][A-Z0-9_]*)=(<[^>]*>|\S+)")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
PLACEHOLDER = re.compile(
    r"^(<[^>]*>|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|changeme|replace[-_ ]?me|x{3,}|\*+)$", re.IGNORECASE
)


class BundleError(Exception):
    """A file the checks need is missing or does not parse."""


# --------------------------------------------------------------------------- loading


def load_docs(text: str, where: str) -> list[Any]:
    """The non-empty YAML documents of `text`."""
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise BundleError(f"{where} does not parse: {' '.join(str(exc).split())}") from exc


def one_kind(docs: list[Any], kind: str, where: str) -> dict:
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == kind]
    if len(found) != 1:
        raise BundleError(f"{where}: expected one {kind}, found {len(found)}")
    return found[0]


def first_mapping(docs: list[Any], where: str) -> dict:
    if not docs or not isinstance(docs[0], dict):
        raise BundleError(f"{where}: expected a YAML mapping")
    return docs[0]


def parse_dockerfile(text: str) -> dict[str, Any]:
    """The instructions the checks need: FROM images, LABELs, the last WORKDIR, COPY sources/dest, RUNs."""
    joined, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append((buf + line).strip())
        buf = ""
    if buf:
        joined.append(buf.strip())
    out: dict[str, Any] = {"from": [], "labels": {}, "workdir": None, "copies": [], "runs": [], "adds": []}
    for inst in joined:
        op, _, rest = inst.partition(" ")
        op = op.upper()
        if op == "FROM":
            out["from"].append(rest.split()[0])
        elif op == "LABEL":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out["labels"][key] = value
        elif op == "WORKDIR":
            out["workdir"] = rest.strip()
        elif op in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            out["copies" if op == "COPY" else "adds"].append((args[:-1], args[-1]))
        elif op == "RUN":
            out["runs"].append(rest)
    return out


def _read(root: Path, name: str) -> str:
    try:
        return (root / name).read_text()
    except OSError as exc:
        raise BundleError(f"{name}: cannot read: {exc.strerror or exc}") from exc


def load_bundle(root: Path = ROOT) -> Bundle:
    """Everything the checks read, parsed once; raises BundleError when a file is missing or does not
    parse. Checks only read it (tests deep-copy it before mutating)."""
    root = Path(root).resolve()
    yaml_files = {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted((root / "infra").rglob("*"))
        if p.suffix in (".yaml", ".yml") and p.is_file()
    }
    for name in (RUNTIME_ENV, RAYCLUSTER, RAYJOB, AWS_CLUSTER):
        if name not in yaml_files:
            raise BundleError(f"{name}: missing")
    docs = {name: load_docs(yaml_files[name], name) for name in (RUNTIME_ENV, RAYCLUSTER, RAYJOB, AWS_CLUSTER)}
    text = _read(root, DOCKERFILE)
    try:
        pyproject = tomllib.loads(_read(root, PYPROJECT))
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{PYPROJECT} does not parse: {exc}") from exc
    return {
        "root": root,
        "yaml_files": yaml_files,
        "dockerfile_text": text,
        "dockerfile": parse_dockerfile(text),
        "dockerignore": _read(root, DOCKERIGNORE).splitlines() if (root / DOCKERIGNORE).exists() else [],
        "runtime_env": first_mapping(docs[RUNTIME_ENV], RUNTIME_ENV),
        "raycluster": one_kind(docs[RAYCLUSTER], "RayCluster", RAYCLUSTER),
        "rayjob": one_kind(docs[RAYJOB], "RayJob", RAYJOB),
        "aws": first_mapping(docs[AWS_CLUSTER], AWS_CLUSTER),
        "deploy_doc": _read(root, DEPLOY_DOC) if (root / DEPLOY_DOC).exists() else "",
        "pyproject": pyproject,
    }


@functools.cache
def composed(root: Path, *overrides: str) -> Config:
    """The campaign config as `heygem-ray render` composes it from the checkout `root`'s `conf/`,
    resolved to plain dataclasses; memoised (the checks only read it; a failing compose is not
    cached). The dataclasses are this checkout's."""
    from heygem_ray.cli import compose
    from heygem_ray.config import to_plain

    return to_plain(compose(list(overrides), config_dir=str((root / "conf").resolve())))


def gpu_config(root: Path = ROOT) -> Config:
    """The composed `cluster=gpu` config, as the job's driver would see it."""
    return composed(root, *GPU_OVERRIDES)


# --------------------------------------------------------------------------- small helpers


def cpu_quantity(value: Any) -> float | None:
    """Kubernetes CPU quantity ("8", 8, "7500m") in cores; None when absent or unreadable."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def memory_bytes(value: Any) -> float | None:
    if value is None:
        return None
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    text = str(value).strip()
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    try:
        return float(text)
    except ValueError:
        return None


def image_tag(image: str) -> str | None:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else None


def pod_containers(template: dict | None) -> list[dict]:
    return ((template or {}).get("spec") or {}).get("containers") or []


def cluster_specs(raycluster: dict, rayjob: dict) -> Iterator[tuple[str, dict]]:
    yield "infra/k8s/raycluster.yaml", raycluster.get("spec") or {}
    if (rayjob.get("spec") or {}).get("rayClusterSpec"):
        yield "infra/k8s/rayjob.yaml rayClusterSpec", rayjob["spec"]["rayClusterSpec"]


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff_paths(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff_paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


# --------------------------------------------------------------------------- checks


def image_problems(b: Bundle) -> list[str]:
    """Dockerfile label, RayCluster, RayJob, AWS launcher and docs all name the same, versioned image."""
    df = b["dockerfile"]
    expected = df["labels"].get("heygem.image")
    if not expected:
        return ["infra/Dockerfile: no LABEL heygem.image=<the image name this Dockerfile builds>"]
    problems = []
    version = b["pyproject"]["project"]["version"]
    if image_tag(expected) != version:
        problems.append(f"infra/Dockerfile: image {expected} is not tagged with the package version {version}")
    if df["labels"].get("org.opencontainers.image.version") != version:
        problems.append(f"infra/Dockerfile: org.opencontainers.image.version is not {version}")
    found: list[tuple[str, str | None]] = []
    for where, spec in cluster_specs(b["raycluster"], b["rayjob"]):
        head = spec.get("headGroupSpec") or {}
        found += [
            (f"{where} head container {c.get('name')}", c.get("image")) for c in pod_containers(head.get("template"))
        ]
        for group in spec.get("workerGroupSpecs") or []:
            found += [
                (f"{where} group {group.get('groupName')} container {c.get('name')}", c.get("image"))
                for c in pod_containers(group.get("template"))
            ]
        if (spec.get("autoscalerOptions") or {}).get("image"):
            found.append((f"{where} autoscalerOptions", spec["autoscalerOptions"]["image"]))
    submitter = (b["rayjob"].get("spec") or {}).get("submitterPodTemplate")
    found += [
        (f"infra/k8s/rayjob.yaml submitter container {c.get('name')}", c.get("image"))
        for c in pod_containers(submitter)
    ]
    docker = b["aws"].get("docker") or {}
    found.append(("infra/aws/cluster.yaml docker.image", docker.get("image")))
    for key in ("head_image", "worker_image"):
        if docker.get(key):
            found.append((f"infra/aws/cluster.yaml docker.{key}", docker[key]))
    for name, node_type in (b["aws"].get("available_node_types") or {}).items():
        for key in ("image", "head_image", "worker_image"):
            if (node_type.get("docker") or {}).get(key):
                found.append((f"infra/aws/cluster.yaml {name}.docker.{key}", node_type["docker"][key]))
    problems += [f"{where}: image {image!r}, expected {expected!r}" for where, image in found if image != expected]
    if expected not in b["deploy_doc"]:
        problems.append(f"docs/deploy.md does not mention the image {expected}")
    # every tag the page's commands and the Dockerfile's build comment give: a `docker run` line
    # left at the last release starts nodes of another image, which Ray refuses or feeds no segments
    repository = expected.rsplit(":", 1)[0]
    named = re.compile(re.escape(repository) + r":\w(?:[\w.+-]*\w)?")  # a tag; not a sentence's full stop
    for where, text in (("docs/deploy.md", b["deploy_doc"]), ("infra/Dockerfile", b["dockerfile_text"])):
        for line_number, line in enumerate(text.splitlines(), 1):
            problems += [
                f"{where}:{line_number}: image {image!r}, expected {expected!r}"
                for image in named.findall(line)
                if image != expected
            ]
    return problems


def ray_version_problems(b: Bundle) -> list[str]:
    """The base image is a pinned Ray release, KubeRay's rayVersion says the same version, and so
    does the package's own requirement: a head, worker or client of another Ray version (a venv
    head beside image workers, `ray job submit` from a laptop) is refused by Ray ("Version
    mismatch")."""
    froms = b["dockerfile"]["from"]
    if len(froms) != 1:
        return [f"infra/Dockerfile: expected one FROM, found {froms}"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-(gpu|cu\d+)", froms[0])
    if not match:
        return [f"infra/Dockerfile: FROM {froms[0]} is not a pinned Ray GPU image (rayproject/ray:X.Y.Z-pyNNN-gpu)"]
    problems = []
    for where, spec in cluster_specs(b["raycluster"], b["rayjob"]):
        if str(spec.get("rayVersion")) != match.group(1):
            problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} but the image has Ray {match.group(1)}")
    pinned = [d for d in b["pyproject"]["project"]["dependencies"] if re.match(r"ray\b", d)]
    if pinned != [f"ray[default]=={match.group(1)}"]:
        problems.append(f"pyproject.toml: {pinned} does not pin the image's Ray: ray[default]=={match.group(1)}")
    return problems


def k8s_group_problems(where: str, group: dict, need_cpus: float, need_gpus: float) -> list[str]:
    """One renderer actor (need_gpus GPUs) plus its CPUs and one task's CPU fit in a pod of this group."""
    problems = []
    containers = pod_containers(group.get("template"))
    if not containers:
        return [f"{where}: no containers"]
    ray_container = containers[0]  # KubeRay runs Ray in the first container
    resources = ray_container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    params = group.get("rayStartParams") or {}
    if need_gpus > 0:
        gpus = limits.get("nvidia.com/gpu")
        if gpus is None or float(gpus) < math.ceil(need_gpus):
            problems.append(f"{where}: limits nvidia.com/gpu {gpus} < actor num_gpus {need_gpus}")
        if "nvidia.com/gpu" in requests and str(requests["nvidia.com/gpu"]) != str(gpus):
            problems.append(f"{where}: requests nvidia.com/gpu {requests['nvidia.com/gpu']} != limits {gpus}")
        if "num-gpus" in params and float(params["num-gpus"]) < need_gpus:
            problems.append(f"{where}: rayStartParams num-gpus {params['num-gpus']} < actor num_gpus {need_gpus}")
        tolerations = ((group.get("template") or {}).get("spec") or {}).get("tolerations") or []
        if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
            problems.append(f"{where}: no toleration for nvidia.com/gpu")
    for kind, table in (("limits", limits), ("requests", requests)):
        cpus = cpu_quantity(table.get("cpu"))
        if cpus is None or cpus < need_cpus:
            problems.append(f"{where}: {kind} cpu {table.get('cpu')} < actor num_cpus + task_cpus = {need_cpus}")
        if memory_bytes(table.get("memory")) is None:
            problems.append(f"{where}: no {kind} memory")
    if "num-cpus" in params and float(params["num-cpus"]) < need_cpus:
        problems.append(f"{where}: rayStartParams num-cpus {params['num-cpus']} < {need_cpus}")
    return problems


def ray_pod_problems(where: str, group: dict) -> list[str]:
    """Every Ray container stops Ray before the pod goes and has a memory-backed /dev/shm that holds
    the object store."""
    problems = []
    spec = (group.get("template") or {}).get("spec") or {}
    shm_volumes = {
        v.get("name"): v for v in spec.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"
    }
    for c in pod_containers(group.get("template"))[:1]:
        command = " ".join((((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or [])
        if "ray stop" not in command:
            problems.append(f"{where}: container {c.get('name')} has no preStop `ray stop`")
        mounts = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
        if not mounts or mounts[0].get("name") not in shm_volumes:
            problems.append(f"{where}: container {c.get('name')} has no emptyDir(medium: Memory) at /dev/shm")
            continue
        limit = memory_bytes(shm_volumes[mounts[0]["name"]]["emptyDir"].get("sizeLimit"))
        store = (group.get("rayStartParams") or {}).get("object-store-memory")
        if limit is not None and store is not None and float(store) > limit:
            problems.append(f"{where}: object-store-memory {store} does not fit /dev/shm sizeLimit {limit:.0f}")
    return problems


def k8s_cluster_problems(where: str, spec: dict, cfg: Config) -> list[str]:
    """KubeRay cluster shape: autoscaling, a CPU-only head advertising 0 CPUs, one GPU group 0..N whose
    pods fit a renderer actor plus a task."""
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: enableInTreeAutoscaling is not true")
    head = spec.get("headGroupSpec") or {}
    params = head.get("rayStartParams") or {}
    if str(params.get("num-cpus")) != "0":
        problems.append(f'{where}: head rayStartParams num-cpus is {params.get("num-cpus")!r}, not "0"')
    if str(params.get("dashboard-host")) != "0.0.0.0":
        problems.append(f"{where}: head dashboard-host is {params.get('dashboard-host')!r}, not 0.0.0.0")
    if float(params.get("num-gpus", 0)) != 0:
        problems.append(f"{where}: head advertises GPUs")
    for c in pod_containers(head.get("template")):
        res = c.get("resources") or {}
        if any("nvidia.com/gpu" in (res.get(k) or {}) for k in ("limits", "requests")):
            problems.append(f"{where}: head container {c.get('name')} asks for a GPU")
    problems += ray_pod_problems(f"{where} head", head)
    groups = spec.get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if g.get("groupName") == GPU_GROUP]
    if len(gpu_groups) != 1:
        return problems + [
            f"{where}: expected one worker group {GPU_GROUP!r}, found {[g.get('groupName') for g in groups]}"
        ]
    group = gpu_groups[0]
    low, high = group.get("minReplicas"), group.get("maxReplicas")
    if low != 0:
        problems.append(f"{where}: {GPU_GROUP} minReplicas is {low}, not 0")
    if not isinstance(high, int) or high < 1:
        problems.append(f"{where}: {GPU_GROUP} maxReplicas {high!r} is not a positive integer")
    elif not 0 <= int(group.get("replicas", 0)) <= high:
        problems.append(f"{where}: {GPU_GROUP} replicas outside [minReplicas, maxReplicas]")
    actor = cfg.cluster.actor
    problems += k8s_group_problems(
        f"{where} {GPU_GROUP}", group, actor.num_cpus + cfg.cluster.task_cpus, actor.num_gpus
    )
    problems += ray_pod_problems(f"{where} {GPU_GROUP}", group)
    mode = (spec.get("authOptions") or {}).get("mode")
    if mode != "token":
        problems.append(f"{where}: authOptions.mode is {mode!r}, not 'token': the cluster takes any client")
    for name, pod_group in (("head", head), (GPU_GROUP, group)):
        problems += pod_wiring_problems(f"{where} {name}", pod_group)
    return problems + head_stop_problems(f"{where} head", head)


def pod_wiring_problems(where: str, group: dict) -> list[str]:
    """The pods run as the ServiceAccount the S3 role is bound to, and every folder their env names
    (the node cache, TMPDIR) is on a volume they mount (else it is the container's own layer, which
    the pod's ephemeral-storage request does not size)."""
    problems = []
    spec = (group.get("template") or {}).get("spec") or {}
    if spec.get("serviceAccountName") != SERVICE_ACCOUNT:
        problems.append(f"{where}: serviceAccountName is {spec.get('serviceAccountName')!r}, not {SERVICE_ACCOUNT!r}")
    for c in pod_containers(group.get("template")):
        mounts = [str(m.get("mountPath", "")).rstrip("/") for m in c.get("volumeMounts") or []]
        for env in c.get("env") or []:
            value = str(env.get("value", ""))
            if env.get("name") in PATH_ENV and not any(value == m or value.startswith(m + "/") for m in mounts):
                problems.append(f"{where}: {env['name']}={value} is on no volume the container mounts")
    return problems


def head_stop_problems(where: str, head: dict) -> list[str]:
    """A head pod that goes (a deleted RayJob, a drained node) stops its campaigns as `ray job stop`
    does before `ray stop`, and lives long enough for them to write their results: `ray stop` alone
    kills each job's supervisor, and the supervisor's watcher then SIGKILLs the driver."""
    problems = []
    spec = (head.get("template") or {}).get("spec") or {}
    for c in pod_containers(head.get("template"))[:1]:
        command = " ".join((((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or [])
        if "stop_job" not in command or command.find("stop_job") > command.find("ray stop"):
            problems.append(f"{where}: preStop does not stop the running jobs before `ray stop`")
        waits = {e.get("name"): e.get("value") for e in c.get("env") or []}.get("RAY_JOB_STOP_WAIT_TIME_S")
        if waits is None:
            problems.append(f"{where}: RAY_JOB_STOP_WAIT_TIME_S not set (3 s: too short for a results table)")
            continue
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if not isinstance(grace, int) or grace < float(waits) + STOP_MARGIN_SECONDS:
            problems.append(
                f"{where}: terminationGracePeriodSeconds {grace} < RAY_JOB_STOP_WAIT_TIME_S {waits} + "
                f"{STOP_MARGIN_SECONDS} s: the pod is killed before its campaigns wrote their results"
            )
    return problems


def aws_problems(config: dict, cfg: Config) -> list[str]:
    """AWS launcher: CPU head advertising 0 CPUs, GPU worker types that declare resources fitting an actor
    plus a task (and no more than the instance has), RAY_AUTH_MODE the same everywhere Ray starts."""
    problems = []
    types = config.get("available_node_types") or {}
    head_name = config.get("head_node_type")
    if head_name not in types:
        return [f"infra/aws/cluster.yaml: head_node_type {head_name!r} is not in available_node_types"]
    head = types[head_name]
    head_res = head.get("resources") or {}
    if head_res.get("CPU") != 0:
        problems.append(f"infra/aws/cluster.yaml: head resources CPU is {head_res.get('CPU')!r}, not 0")
    if head_res.get("GPU", 0) != 0:
        problems.append("infra/aws/cluster.yaml: head advertises GPUs")
    head_instance = str((head.get("node_config") or {}).get("InstanceType", ""))
    if re.match(r"^(g\d|p\d)", head_instance):
        problems.append(f"infra/aws/cluster.yaml: head instance type {head_instance} is a GPU machine")
    actor = cfg.cluster.actor
    need_cpus, need_gpus = actor.num_cpus + cfg.cluster.task_cpus, actor.num_gpus
    gpu_types = {n: t for n, t in types.items() if n != head_name and (t.get("resources") or {}).get("GPU", 0) > 0}
    if not gpu_types:
        problems.append("infra/aws/cluster.yaml: no worker type declares resources with GPU > 0")
    for name, node_type in gpu_types.items():
        res = node_type["resources"]
        where = f"infra/aws/cluster.yaml {name}"
        if res.get("GPU", 0) < need_gpus:
            problems.append(f"{where}: GPU {res.get('GPU')} < actor num_gpus {need_gpus}")
        if res.get("CPU") is None or res["CPU"] < need_cpus:
            problems.append(f"{where}: CPU {res.get('CPU')} < actor num_cpus + task_cpus = {need_cpus}")
        if not (node_type.get("node_config") or {}).get("ImageId"):
            problems.append(f"{where}: no node_config.ImageId (the launcher's default AMI has a driver too old)")
        instance = (node_type.get("node_config") or {}).get("InstanceType")
        if instance in EC2_SHAPES:
            cpus, gpus = EC2_SHAPES[instance]
            if res.get("CPU", 0) > cpus or res.get("GPU", 0) > gpus:
                problems.append(f"{where}: declares {res} but {instance} has {cpus} vCPU, {gpus} GPU")
        if node_type.get("min_workers") != 0:
            problems.append(f"{where}: min_workers is {node_type.get('min_workers')!r}, not 0")
        if not isinstance(node_type.get("max_workers"), int) or node_type["max_workers"] < 1:
            problems.append(f"{where}: max_workers is not a positive integer")
    modes: dict[str, set[str]] = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = "\n".join(config.get(key) or [])
        modes[key] = set(re.findall(r"\bRAY_AUTH_MODE=(\w+)", text))
        if not modes[key]:
            problems.append(f"infra/aws/cluster.yaml: {key} does not export RAY_AUTH_MODE")
    run_options = " ".join((config.get("docker") or {}).get("run_options") or [])
    modes["docker.run_options"] = set(re.findall(r"\bRAY_AUTH_MODE=(\w+)", run_options))
    if not modes["docker.run_options"]:
        problems.append("infra/aws/cluster.yaml: docker.run_options does not set RAY_AUTH_MODE")
    seen = set().union(*modes.values())
    if len(seen) > 1:
        problems.append(f"infra/aws/cluster.yaml: RAY_AUTH_MODE differs between {modes}")
    if "token" in seen and "~/.ray/auth_token" not in (config.get("file_mounts") or {}):
        problems.append("infra/aws/cluster.yaml: RAY_AUTH_MODE=token but file_mounts does not sync ~/.ray/auth_token")
    if "ray start --head" not in " ".join(config.get("head_start_ray_commands") or []):
        problems.append("infra/aws/cluster.yaml: head_start_ray_commands has no `ray start --head`")
    if "ray start --address" not in " ".join(config.get("worker_start_ray_commands") or []):
        problems.append("infra/aws/cluster.yaml: worker_start_ray_commands has no `ray start --address`")
    return problems


def entrypoint_problems(entrypoint: str, workdir: str | None, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """The RayJob runs jobs/render_campaign.py (by absolute path inside the image's WORKDIR, or relative
    to it) with cluster=gpu; returns (problems, Hydra overrides)."""
    try:
        argv = shlex.split(entrypoint or "")
    except ValueError as exc:
        return [f"infra/k8s/rayjob.yaml: entrypoint does not parse: {exc}"], []
    if not argv or not re.fullmatch(r"python3?(\.\d+)?", PurePosixPath(argv[0]).name) or len(argv) < 2:
        return [f"infra/k8s/rayjob.yaml: entrypoint {entrypoint!r} does not start with `python <script>`"], []
    script, overrides = argv[1], argv[2:]
    problems = []
    if script.startswith("/"):
        if not workdir or not script.startswith(workdir.rstrip("/") + "/"):
            problems.append(
                f"infra/k8s/rayjob.yaml: entrypoint script {script} is not under the image WORKDIR {workdir}"
            )
            relative = script
        else:
            relative = script[len(workdir.rstrip("/")) + 1 :]
    else:
        relative = script
    if relative != ENTRY_SCRIPT:
        problems.append(f"infra/k8s/rayjob.yaml: entrypoint runs {script}, not {ENTRY_SCRIPT}")
    elif not (root / relative).is_file():
        problems.append(f"{relative} does not exist")
    if "cluster=gpu" not in overrides:
        problems.append("infra/k8s/rayjob.yaml: entrypoint does not select cluster=gpu")
    return problems, overrides


def rayjob_problems(b: Bundle) -> list[str]:
    """RayJob: entrypoint, cleanup, its Hydra overrides compose, its actors fit the GPU group and the
    autoscaler can provide them, and its cluster has raycluster.yaml's shape."""
    spec = b["rayjob"].get("spec") or {}
    problems, overrides = entrypoint_problems(spec.get("entrypoint", ""), b["dockerfile"]["workdir"], b["root"])
    if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
        problems.append("infra/k8s/rayjob.yaml: set exactly one of rayClusterSpec and clusterSelector")
    if spec.get("rayClusterSpec"):
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("infra/k8s/rayjob.yaml: shutdownAfterJobFinishes is not true")
        if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
            problems.append("infra/k8s/rayjob.yaml: ttlSecondsAfterFinished is not a non-negative integer")
        problems += [
            f"infra/k8s/rayjob.yaml rayClusterSpec{p} differs from infra/k8s/raycluster.yaml spec"
            for p in diff_paths(spec["rayClusterSpec"], b["raycluster"].get("spec") or {})
        ]
    cluster_spec = spec.get("rayClusterSpec") or b["raycluster"].get("spec") or {}
    if problems and not overrides:
        return problems
    try:
        cfg = composed(b["root"], *[o for o in overrides if "=" in o])
    except Exception as exc:  # noqa: BLE001 - any compose failure is the finding
        return problems + [f"infra/k8s/rayjob.yaml: entrypoint overrides do not compose: {type(exc).__name__}: {exc}"]
    problems += k8s_cluster_problems("infra/k8s/rayjob.yaml (entrypoint config)", cluster_spec, cfg)
    groups = [g for g in cluster_spec.get("workerGroupSpecs") or [] if g.get("groupName") == GPU_GROUP]
    if groups and cfg.cluster.actor.num_gpus > 0:
        group = groups[0]
        limits = ((pod_containers(group.get("template")) or [{}])[0].get("resources") or {}).get("limits", {})
        pod = {"CPU": cpu_quantity(limits.get("cpu")) or 0.0, "GPU": float(limits.get("nvidia.com/gpu", 0))}
        actor = cfg.cluster.actor
        # Ray packs actors by their CPUs and GPU share; the prepare/stitch tasks need a task's CPUs
        # somewhere: on every pod where actors leave them, else on one pod kept free of actors
        per_pod = fit_actors([pod], actor.num_cpus, actor.num_gpus, 0)
        pods = int(group.get("maxReplicas") or 0)
        room_for_tasks = pod["CPU"] - per_pod * actor.num_cpus >= cfg.cluster.task_cpus
        reachable = per_pod * (pods if room_for_tasks else max(pods - 1, 0))
        actors = cfg.cluster.actors
        if actors < 1:
            problems.append(
                "infra/k8s/rayjob.yaml: entrypoint leaves cluster.actors=0; with GPU workers scaled to 0 "
                "at submit time that starts a single actor (set cluster.actors)"
            )
        elif actors > reachable:
            problems.append(
                f"infra/k8s/rayjob.yaml: cluster.actors={actors} but {GPU_GROUP} reaches {reachable} "
                f"({per_pod} per pod x {'maxReplicas' if room_for_tasks else 'maxReplicas - 1, one pod for tasks'}; "
                "the driver would wait forever for the rest)"
            )
    return problems


def secret_problems(obj: Any, where: str) -> list[str]:
    """No env var named like a secret (…SECRET…, …PASSWORD…, …TOKEN…, …ACCESS_KEY…) carries a literal
    value, whether as a mapping key, a Kubernetes env entry or NAME=value text; no AWS key ids anywhere."""
    problems = []

    def literal(value: Any) -> bool:
        return value is not None and str(value).strip() != "" and not PLACEHOLDER.match(str(value).strip())

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if (
                isinstance(node.get("name"), str)
                and "value" in node
                and SECRET_NAME.search(node["name"])
                and literal(node["value"])
            ):
                problems.append(f"{where}{path}: env {node['name']} has a literal value")
            for key, value in node.items():
                if (
                    isinstance(key, str)
                    and ENV_NAME.match(key)
                    and SECRET_NAME.search(key)
                    and not isinstance(value, (dict, list))
                    and literal(value)
                ):
                    problems.append(f"{where}{path}.{key}: literal value for a secret")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, str):
            problems.extend(text_secret_problems(node, f"{where}{path}"))

    walk(obj, "")
    return problems


def text_secret_problems(text: str, where: str) -> list[str]:
    problems = [
        f"{where}: {name}=… sets a secret literally"
        for name, value in ENV_ASSIGNMENT.findall(text)
        if SECRET_NAME.search(name) and not PLACEHOLDER.match(value.strip("'\";"))
    ]
    if AWS_KEY_ID.search(text):
        problems.append(f"{where}: contains an AWS access key id")
    return problems


def runtime_env_problems(b: Bundle) -> list[str]:
    """runtime_env.yaml: env_vars (strings) and excludes only, no auth mode, no secrets; the RayJob's
    runtimeEnvYAML has the same env_vars and ships nothing local."""
    env = b["runtime_env"]
    problems = []
    extra = set(env) - {"env_vars", "excludes"}
    if extra:
        problems.append(
            f"infra/runtime_env.yaml: unexpected keys {sorted(extra)} (deps belong in the image, "
            "working_dir on the command line)"
        )
    env_vars = env.get("env_vars") or {}
    problems += [
        f"infra/runtime_env.yaml: env var {k} value {v!r} is not a string (Ray requires strings)"
        for k, v in env_vars.items()
        if not isinstance(v, str)
    ]
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if name in env_vars:
            problems.append(f"infra/runtime_env.yaml: {name} is a client/node setting, not a job env var")
    problems += secret_problems(env, "infra/runtime_env.yaml")
    job_env_text = (b["rayjob"].get("spec") or {}).get("runtimeEnvYAML")
    try:
        job_env = yaml.safe_load(job_env_text) if job_env_text else {}
    except yaml.YAMLError as exc:
        problems.append(f"infra/k8s/rayjob.yaml runtimeEnvYAML does not parse: {' '.join(str(exc).split())}")
        job_env = {}
    if not isinstance(job_env, dict):
        problems.append("infra/k8s/rayjob.yaml runtimeEnvYAML is not a mapping")
        job_env = {}
    job_vars = (job_env or {}).get("env_vars") or {}
    for key in sorted(set(env_vars) | set(job_vars)):
        if env_vars.get(key) != job_vars.get(key):
            problems.append(
                f"env var {key}: infra/runtime_env.yaml {env_vars.get(key)!r} "
                f"!= infra/k8s/rayjob.yaml runtimeEnvYAML {job_vars.get(key)!r}"
            )
    for key in ("pip", "conda", "uv"):
        if key in (job_env or {}):
            problems.append(f"infra/k8s/rayjob.yaml runtimeEnvYAML: per-job {key} (deps belong in the image)")
    working_dir = (job_env or {}).get("working_dir")
    if working_dir and "://" not in str(working_dir):
        problems.append("infra/k8s/rayjob.yaml runtimeEnvYAML: a RayJob cannot upload a local working_dir")
    return problems


def upload_excludes_problems(excludes: list[str], root: Path = ROOT) -> list[str]:
    """With Ray's own matcher: heavy local dirs and the package source are excluded from the
    working_dir upload, the entrypoint and configs are not."""
    from ray._private.runtime_env.packaging import _get_excludes

    match = _get_excludes(root, list(excludes))
    must_exclude = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "heygem-demo/output/a.mp4",
        "outputs/2026-01-01/run.log",
        "benchmarks/results/clip.mp4",
    ]
    # the package and its configs travel together (the CLI reads the conf/ beside the package it runs)
    must_keep = [
        ENTRY_SCRIPT,
        "conf/config.yaml",
        "conf/cluster/gpu.yaml",
        "heygem_ray/cli.py",
        "heygem_ray/__init__.py",
    ]
    problems = [f"infra/runtime_env.yaml excludes: {p} would be uploaded" for p in must_exclude if not match(root / p)]
    problems += [f"infra/runtime_env.yaml excludes: {p} would be left out" for p in must_keep if match(root / p)]
    return problems


def dockerfile_problems(b: Bundle) -> list[str]:
    """Pinned base, a WORKDIR holding jobs/ and conf/, the package installed from pyproject (with its
    readme), torch installed, no weights or downloads baked in, and .dockerignore keeping what COPY needs."""
    df = b["dockerfile"]
    problems = []
    workdir = df["workdir"]
    if not workdir or not workdir.startswith("/"):
        problems.append(f"infra/Dockerfile: WORKDIR {workdir!r} is not an absolute path")
    copied = {(PurePosixPath(src).as_posix().rstrip("/"), dest) for srcs, dest in df["copies"] for src in srcs}
    for needed in ("jobs", "conf"):
        if not any(
            src == needed and (dest.rstrip("/") == needed or dest.rstrip("/") == f"{workdir}/{needed}")
            for src, dest in copied
        ):
            problems.append(f"infra/Dockerfile: {needed}/ is not copied into the WORKDIR")
    sources = {src for src, _ in copied}
    readme = b["pyproject"]["project"].get("readme")
    for needed in ("pyproject.toml", "heygem_ray", "conf", readme):
        if needed and needed not in sources:
            problems.append(f"infra/Dockerfile: {needed} is not copied (the package build needs it)")
    runs = "\n".join(df["runs"])
    if not re.search(r"pip install\b[^\n]*torch==", runs):
        problems.append("infra/Dockerfile: no pinned torch install")
    if not re.search(r"pip install\b[^\n]*(/tmp/heygem-src|\s\.)(\s|$)", runs):
        problems.append("infra/Dockerfile: the package itself is not pip-installed")
    weights = re.compile(r"\.(pth|pt|ckpt|onnx|safetensors|bin)\b")
    for srcs, _ in df["copies"] + df["adds"]:
        problems += [f"infra/Dockerfile: copies weights {s}" for s in srcs if weights.search(s)]
        problems += [f"infra/Dockerfile: ADD of a URL {s}" for s in srcs if "://" in s]
    if re.search(r"\b(wget|curl)\b", runs):
        problems.append("infra/Dockerfile: downloads at build time (weights come from a URI at run time)")
    problems += text_secret_problems(b["dockerfile_text"], "infra/Dockerfile")
    ignore = [line.strip() for line in b["dockerignore"] if line.strip() and not line.strip().startswith("#")]
    for src in sorted(sources):
        if not (b["root"] / src).exists():
            problems.append(f"infra/Dockerfile: COPY source {src} does not exist")
        for pattern in ignore:
            if not pattern.startswith("!") and dockerignore_matches(pattern, src):
                problems.append(f".dockerignore: {pattern!r} excludes {src}, which infra/Dockerfile copies")
    return problems


def dockerignore_matches(pattern: str, path: str) -> bool:
    """Whether a .dockerignore pattern excludes `path` or one of its parent folders (or, for a folder,
    anything inside it). Close enough to Docker's rules for the simple patterns used here."""
    pattern = pattern.strip("/")
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        return any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts)
    if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
        return True
    # a pattern naming something inside a copied folder (e.g. heygem_ray/conf) also hurts the build
    return "/" in pattern and pattern.split("/")[0] == parts[0] and len(parts) == 1


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Ray's INFO lines from `logger_name` stay out of the tool's output."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def yaml_problems(b: Bundle) -> list[str]:
    """Every YAML file under infra/ parses and holds at least one document."""
    problems = []
    for name, text in sorted(b["yaml_files"].items()):
        try:
            if not [doc for doc in yaml.safe_load_all(text) if doc is not None]:
                problems.append(f"{name}: no YAML document")
        except yaml.YAMLError as exc:
            problems.append(f"{name} does not parse: {' '.join(str(exc).split())}")
    return problems


def upload_problems(b: Bundle) -> list[str]:
    """What `ray job submit --working-dir .` with infra/runtime_env.yaml would zip, walked with Ray's
    own traversal (its default excludes, .gitignore files, our excludes): the entrypoint, the configs
    and the package go, .venv and .git do not, and the whole stays under Ray's upload limit."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root: Path = b["root"]
    files: dict[str, int] = {}

    def handler(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    excludes = get_runtime_env_default_excludes() + list(b["runtime_env"].get("excludes") or [])
    with _quiet("ray._private.runtime_env.packaging"):  # it logs every .gitignore it reads
        _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=True)
    where = "infra/runtime_env.yaml: the `--working-dir .` upload"
    problems = [
        f"{where} would not contain {name}"
        for name in (ENTRY_SCRIPT, "conf/cluster/gpu.yaml", "heygem_ray/cli.py")
        if name not in files
    ]
    problems += [f"{where} would contain {name}" for name in sorted(files) if name.startswith((".venv/", ".git/"))]
    total = sum(files.values())
    if total >= UPLOAD_LIMIT:
        biggest = sorted(files, key=files.__getitem__, reverse=True)[:3]
        problems.append(
            f"{where} is {total / 2**20:.1f} MiB, over Ray's {UPLOAD_LIMIT / 2**20:.0f} MiB limit (largest: {biggest})"
        )
    return problems


def aws_schema_problems(b: Bundle) -> list[str]:
    """infra/aws/cluster.yaml passes the launcher's own schema (ray-schema.json) after filling in its
    AWS defaults, as `ray up` does."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with _quiet("ray.autoscaler._private.util"):  # it logs the defaults it fills in
            validate_config(prepare_config(copy.deepcopy(b["aws"])))
    except Exception as exc:  # noqa: BLE001 - any rejection is the finding
        message = getattr(exc, "message", None) or " ".join(str(exc).split())
        path = ".".join(str(p) for p in getattr(exc, "absolute_path", None) or [])
        return [f"infra/aws/cluster.yaml: Ray's launcher schema rejects {path or 'the config'}: {message}"]
    return []


def cluster_secret_problems(b: Bundle) -> list[str]:
    """No literal secrets in the cluster files (runtime_env.yaml and the Dockerfile have their own)."""
    problems = []
    for key, name in (("raycluster", RAYCLUSTER), ("rayjob", RAYJOB), ("aws", AWS_CLUSTER)):
        problems += secret_problems(b[key], name)
    return problems


# --------------------------------------------------------------------------- all checks

#: every check, by name, in the order they run
CHECKS: dict[str, Callable[[Bundle], list[str]]] = {
    "yaml": yaml_problems,
    "image": image_problems,
    "ray-version": ray_version_problems,
    "dockerfile": dockerfile_problems,
    "runtime-env": runtime_env_problems,
    "upload-excludes": lambda b: upload_excludes_problems(b["runtime_env"].get("excludes") or [], b["root"]),
    "upload": upload_problems,
    "raycluster": lambda b: k8s_cluster_problems(RAYCLUSTER, b["raycluster"].get("spec") or {}, gpu_config(b["root"])),
    "rayjob": rayjob_problems,
    "aws": lambda b: aws_problems(b["aws"], gpu_config(b["root"])),
    "aws-schema": aws_schema_problems,
    "secrets": cluster_secret_problems,
}


def all_problems(b: Bundle) -> list[str]:
    """Every check's problems, in CHECKS order."""
    return [problem for check in CHECKS.values() for problem in check(b)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.check",
        description="Check that the deployment files under infra/ agree with each other and with the code.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="the repository checkout to check (default: the one this tool is in)",
    )
    args = parser.parse_args(argv)
    try:
        bundle = load_bundle(args.root)
    except BundleError as exc:
        print(f"infra: cannot load the files under {args.root}: {exc}")
        return 1
    problems = []
    for name, check in CHECKS.items():
        try:
            problems += check(bundle)
        except Exception as exc:  # noqa: BLE001 - a check that crashes is reported, the others still run
            problems.append(f"infra: the {name} check failed to run: {type(exc).__name__}: {exc}")
    for problem in problems:
        print(problem.replace("\n", " "))
    if problems:
        print(f"infra: {len(problems)} problem(s) found by {len(CHECKS)} checks", file=sys.stderr)
        return 1
    print(f"infra: {len(CHECKS)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
