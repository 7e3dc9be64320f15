"""The package's layers: a module imports only from its own layer or the ones below, at the top of
the file or inside a function (no import hidden in a function to dodge a cycle)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "heygem_ray"

#: bottom first; a module's layer is its longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    ("scratch", "daemon_threads", "release", "stopping"),
    ("storage", "errors", "plan", "devices", "pinning", "metrics", "layout", "config", "results", "markers", "qa"),
    ("output_lock",),
    ("manifest", "media"),
    ("models", "detect"),
    ("render",),
    ("prepare", "segment", "stitch", "startup"),
    ("report", "progress", "executors", "rows"),
    ("shared_work",),
    ("actor_pool", "observers", "segment_queue"),
    ("campaign",),
    ("studio",),
    ("demo", "cli"),
]


def _layer(module: str) -> int:
    """module: dotted name inside the package, e.g. 'media.audio'."""
    for level, names in enumerate(LAYERS):
        if module.split(".")[0] in names:
            return level
    raise AssertionError(f"heygem_ray.{module} is in no layer: add it to LAYERS")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("heygem_ray"):
            base = node.module.removeprefix("heygem_ray").lstrip(".")
            targets = [f"{base}.{a.name}".lstrip(".") if not base else base for a in node.names]
            found += [(node.lineno, t) for t in targets]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.removeprefix("heygem_ray."))
                for a in node.names
                if a.name.startswith("heygem_ray.")
            ]
    return found


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if module in ("__init__", ""):
            continue
        for line, target in _imports(path):
            if target and _layer(target) > _layer(module):
                upward.append(f"heygem_ray/{path.relative_to(PACKAGE)}:{line} imports heygem_ray.{target}")
    assert not upward, "\n".join(upward)


def test_the_architecture_page_names_every_layer_in_order():
    """docs/architecture.md lists the layers for readers: a module added to LAYERS and not there
    left the page short of it."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    listed = " ".join(text.split("Layers, bottom first", 1)[1].split("A module imports only", 1)[0].split())
    places = [[listed.find(name) for name in names] for names in LAYERS]
    assert all(p >= 0 for layer in places for p in layer), [n for ns in LAYERS for n in ns if n not in listed]
    assert all(max(a) < min(b) for a, b in itertools.pairwise(places)), places


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from heygem_ray.campaign import Campaign\n")
    assert _imports(bad) == [(2, "campaign")] and _layer("campaign") > _layer("media.audio")


def test_every_package_is_installed():
    """pyproject lists the packages a wheel carries: one left out installs a heygem_ray that cannot
    import itself (an editable install would not notice)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(root).parent.parts) for p in (root / "heygem_ray").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


def test_the_driver_imports_neither_torch_nor_pandas(tmp_path):
    """Whatever the driver imports, every run waits for: torch (~1.5 s) is the actors' business and
    pandas (~0.4 s, which pyarrow's read_table pulls in) nobody's."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"audio": ["a.wav"], "avatar": ["b.png"]}), manifest)
    code = (
        "import sys\n"
        "from heygem_ray import campaign, cli\n"
        "from heygem_ray.executors import ray_cluster\n"
        "from heygem_ray.manifest import read_manifest\n"
        f"rows = read_manifest({str(manifest)!r}, {str(tmp_path)!r})\n"
        "print(len(rows), sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "[]"], out


def test_the_codes_version_is_the_same_installed_or_checked_out(tmp_path):
    """A wheel holds `conf/` inside the package (`heygem_ray.conf`), a checkout beside it: the code's
    version (a forced rerun's and unfinished segments' key) differed between the two, so a forced
    rerun started from a checkout started over when resumed by the image's CLI."""
    import shutil
    import subprocess
    import sys

    versions = []
    for shape in ("checkout", "wheel"):
        package = tmp_path / shape / "heygem_ray"
        shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "conf"))
        if shape == "wheel":
            (package / "conf").mkdir()
            (package / "conf" / "__init__.py").write_text("")
        code = "import heygem_ray.release as r; print(r.code_version())"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path / shape, check=True
        )
        versions.append(out.stdout.strip())
    assert versions[0] == versions[1] and len(versions[0]) == 16
