"""This repository's code as it was at a git commit, for side-by-side benchmarks (old code vs today's).

``module_at``: one module, executed in this process. ``tree_at``: whole packages (``edge_agent`` by
default) extracted for another process, which ``tree_env`` makes import them instead of the editable install.
Read-only git (``rev-parse``, ``show``, ``archive``): HEAD, the index and the working tree stay as they are.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import types
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_at(ref: str, path: str) -> types.ModuleType | None:
    """Execute ``path`` (e.g. ``edge_agent/mqtt/chunks.py``) as of git ``ref``; None when git or the commit is missing.

    Its imports resolve against today's tree. The module is registered in ``sys.modules`` (dataclasses look it up).
    """
    try:
        src = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{ref}:{path}"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(f"{Path(path).stem}_at_{ref}")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{ref}:{path}", "exec"), mod.__dict__)
    return mod


# Loaded at start by an agent given ``tree_env`` (PYTHONPATH): edge_agent from the extracted tree.
SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, {tree!r})
"""


def tree_at(rev: str, work: Path, packages: Sequence[str] = ("edge_agent",)) -> tuple[Path, str]:
    """``packages`` as committed at ``rev``, extracted under ``work`` with their import shim; (tree, short sha)."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--short", f"{rev}^{{commit}}"], cwd=REPO,
                           capture_output=True, text=True)  # fmt: skip
    if found.returncode != 0:
        raise SystemExit(f"error: {rev}: not a commit of {REPO}")
    sha = found.stdout.strip()
    data = subprocess.run(["git", "archive", sha, *packages], cwd=REPO, check=True, capture_output=True).stdout
    out = work / f"tree-{sha}"
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    shim = work / f"shim-{sha}"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tree=str(out)))
    return out, sha


def tree_env(tree: Path) -> dict[str, str]:
    """The environment entries that make a Python process import the packages of ``tree`` (``tree_at``) from it."""
    return {"PYTHONPATH": str(tree.parent / tree.name.replace("tree-", "shim-", 1))}
