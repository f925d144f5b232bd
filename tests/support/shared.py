"""Build a test artifact once per pytest run, shared by every xdist worker.

A ``scope="session"`` fixture runs once per *worker* under pytest-xdist: with four workers, a
TensorFlow build of ~20 s ran four times per run. ``built_once`` builds into a directory beside
the workers' temp dirs (``getbasetemp().parent``, common to all workers of one run), under a file
lock; the first worker builds, the others wait for it and reuse the result. The pattern is
pytest-xdist's own advice ("Making session-scoped fixtures execute only once").
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

DONE = ".built"


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The directory ``name`` that ``build(dir)`` filled, built by the first worker of this run to ask.

    ``build`` gets an empty directory. A build that raised leaves nothing behind, so the next
    worker tries again (and fails the same way, with its own error).
    """
    root = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{root}.lock"):
        if not (root / DONE).is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            try:
                build(root)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            (root / DONE).touch()
    return root
