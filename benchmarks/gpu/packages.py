"""Which Python distributions the GPU node has, which the kit carries there as wheels, and an import
guard that makes this machine behave like the node (for the CPU dry run).

Standard library only: the kit's orchestrator imports this before any wheel is installed.

The carried set is the smallest that the kit's code paths import on the node (measured by importing
them with everything else blocked, see `NodeImports`): PyAV, for all media. Hydra and OmegaConf are
not needed (`heygem_ray.config` imports them only to compose a config), nor librosa (the Wav2Lip mel
filterbank ships with the package). Ray is not carried (its wheel alone is ~78 MB, over the 64 MiB the
device tool carries); the kit runs `RenderWorker` in plain processes instead (see node.py).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Carried:
    """A distribution the node lacks and the kit needs, with the reason it is needed."""

    dist: str
    why: str


CARRIED: tuple[Carried, ...] = (
    Carried("av", "PyAV: decode, encode and mux (heygem_ray.media, prepare, stitch, demo)"),
)

#: What the node's /opt/torch/.venv (Python 3.12) holds: the package list the device tool's
#: KINDS.md gives for the nvidia-h200 image (read 2026-11-17).
NODE_HAS: frozenset[str] = frozenset(
    [
        "absl-py",
        "accelerate",
        "aiofiles",
        "aiohappyeyeballs",
        "aiohttp",
        "aiosignal",
        "annotated-doc",
        "anyio",
        "attrs",
        "botorch",
        "build",
        "certifi",
        "charset-normalizer",
        "chex",
        "click",
        "cloudpickle",
        "cmake",
        "colorama",
        "contourpy",
        "coverage",
        "cuda-bindings",
        "cuda-core",
        "cuda-pathfinder",
        "cuda-toolkit",
        "cupy-cuda13x",
        "cycler",
        "cython",
        "diffrax",
        "e3nn",
        "einops",
        "equinox",
        "etils",
        "execnet",
        "filelock",
        "flatbuffers",
        "flax",
        "fonttools",
        "formulaic",
        "frozenlist",
        "fsspec",
        "gpytorch",
        "grpcio",
        "h11",
        "h5py",
        "hf-xet",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "humanize",
        "hypothesis",
        "idna",
        "imageio",
        "iniconfig",
        "interface-meta",
        "jax",
        "jax-cuda13-pjrt",
        "jax-cuda13-plugin",
        "jaxlib",
        "jaxtyping",
        "jinja2",
        "joblib",
        "kiwisolver",
        "lazy-loader",
        "lightning",
        "lightning-utilities",
        "linear-operator",
        "lineax",
        "llvmlite",
        "lxml",
        "markdown",
        "markdown-it-py",
        "markupsafe",
        "matplotlib",
        "mdurl",
        "meson",
        "ml-dtypes",
        "mpi4py",
        "mpmath",
        "msgpack",
        "multidict",
        "multipledispatch",
        "mypy-extensions",
        "nanobind",
        "narwhals",
        "networkx",
        "ninja",
        "numba",
        "numba-cuda",
        "numpy",
        "numpyro",
        "nvidia-cublas",
        "nvidia-cuda-cupti",
        "nvidia-cuda-nvrtc",
        "nvidia-cuda-runtime",
        "nvidia-cudnn-cu13",
        "nvidia-cufft",
        "nvidia-cufile",
        "nvidia-curand",
        "nvidia-cusolver",
        "nvidia-cusparse",
        "nvidia-cusparselt-cu13",
        "nvidia-ml-py",
        "nvidia-nccl-cu13",
        "nvidia-nvjitlink",
        "nvidia-nvshmem-cu13",
        "nvidia-nvtx",
        "onnx",
        "onnx-ir",
        "onnxruntime",
        "onnxscript",
        "opencv-python-headless",
        "optax",
        "opt-einsum",
        "opt-einsum-fx",
        "optimistix",
        "orbax-checkpoint",
        "packaging",
        "pandas",
        "pathspec",
        "patsy",
        "peft",
        "pillow",
        "pip",
        "pluggy",
        "portalocker",
        "prometheus-client",
        "propcache",
        "protobuf",
        "psutil",
        "pyarrow",
        "pybind11",
        "py-cpuinfo",
        "pygments",
        "pyparsing",
        "pyproject-hooks",
        "pyre-extensions",
        "pytest",
        "pytest-benchmark",
        "pytest-cov",
        "pytest-mock",
        "pytest-timeout",
        "pytest-xdist",
        "python-dateutil",
        "pytorch-lightning",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "sacrebleu",
        "safetensors",
        "scikit-build-core",
        "scikit-image",
        "scikit-learn",
        "scipy",
        "seaborn",
        "sentencepiece",
        "sentence-transformers",
        "setuptools",
        "shellingham",
        "simplejson",
        "six",
        "sortedcontainers",
        "statsmodels",
        "sympy",
        "tabulate",
        "tensorboard",
        "tensorboard-data-server",
        "tensorstore",
        "threadpoolctl",
        "tifffile",
        "tiktoken",
        "timm",
        "tokenizers",
        "toolz",
        "torch",
        "torchaudio",
        "torchdiffeq",
        "torch-geometric",
        "torchmetrics",
        "torchvision",
        "tqdm",
        "transformers",
        "treescope",
        "triton",
        "typer",
        "typing-extensions",
        "typing-inspect",
        "urllib3",
        "uvloop",
        "wadler-lindig",
        "werkzeug",
        "wheel",
        "wrapt",
        "xarray",
        "xxhash",
        "yarl",
        "zipp",
    ]
)

#: top-level modules of this repository (never installed from a wheel)
LOCAL_MODULES = frozenset({"heygem_ray", "benchmarks", "tests", "conf", "recipe_weights"})


def normalize(dist: str) -> str:
    """PEP 503 name: 'PyYAML' -> 'pyyaml', 'lazy_loader' -> 'lazy-loader'."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def carried_names() -> frozenset[str]:
    return frozenset(normalize(c.dist) for c in CARRIED)


def allowed_dists() -> frozenset[str]:
    """Distributions importable on the node once the carried wheels are installed."""
    return NODE_HAS | carried_names()


def modules_by_dist() -> dict[str, set[str]]:
    """Installed distribution (normalized) -> the top-level modules it provides, here."""
    out: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            out.setdefault(normalize(dist), set()).add(module)
    return out


def blocked_modules(allowed: Iterable[str] | None = None) -> frozenset[str]:
    """Top-level modules installed here that the node would not have: provided only by
    distributions outside `allowed` (default `allowed_dists()`), and not local or stdlib."""
    allowed = frozenset(normalize(d) for d in (allowed_dists() if allowed is None else allowed))
    providers: dict[str, set[str]] = {}
    for dist, modules in modules_by_dist().items():
        for module in modules:
            providers.setdefault(module, set()).add(dist)
    return frozenset(
        module
        for module, dists in providers.items()
        if not dists & allowed and module not in LOCAL_MODULES and module not in sys.stdlib_module_names
    )


class NodeImports:
    """Makes `import X` fail here as it would on the node, for every X in `blocked`: stands in for
    the standard PathFinder and answers "not found" for those names, so optional imports
    (`try: import soundfile`) and `importlib.util.find_spec` probes see the module as absent,
    exactly as on the node, while everything else imports normally. Installed-distribution
    metadata (`importlib.metadata`) is filtered the same way: only `allowed` distributions and
    this repository's own show."""

    def __init__(self, blocked: frozenset[str], allowed: frozenset[str] | None = None):
        self.blocked = blocked
        self.allowed = allowed_dists() if allowed is None else allowed
        self.refused: set[str] = set()

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        top = name.partition(".")[0]
        if top in self.blocked:
            self.refused.add(top)
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args: object, **kwargs: object) -> Iterable[importlib.metadata.Distribution]:
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            name = normalize(dist.metadata["Name"] or "")
            if name in self.allowed or name == "heygem-ray":
                yield dist

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()

    def install(self) -> None:
        """Replace the PathFinder in sys.meta_path (idempotent); modules already imported stay."""
        for i, finder in enumerate(sys.meta_path):
            if finder is importlib.machinery.PathFinder:
                sys.meta_path[i] = self
                return
        if self not in sys.meta_path:
            sys.meta_path.append(self)
