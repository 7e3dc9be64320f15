"""Which code runs: a hash of this package's Python sources, for what must not outlive a change of
code that no version constant names (a forced rerun gone on with, segments an unfinished row left)."""

from __future__ import annotations

import functools
import glob
import hashlib
import os


@functools.cache
def code_version() -> str:
    """A hash of this package's Python sources (16 hex digits): the same on every node running the
    same checkout or image, another after any change to them."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    # not conf/: an installed wheel holds it as a subpackage (`heygem_ray.conf`), a checkout beside it
    conf = os.path.join(root, "conf") + os.sep
    for path in sorted(
        p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True) if not p.startswith(conf)
    ):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]
