"""Print, one per line, the uv arguments that give ``uv pip install`` the package sources pip uses here.

``tools/setup_venv.sh`` installs with uv (about 3x faster than pip on this project) and falls back to
pip when uv fails. uv does not read pip's configuration, so this translates it: ``pip config list``
(files and ``PIP_*`` variables) → ``--index-url``, ``--extra-index-url``, ``--find-links`` and
``--constraint``, and ``--cert``; local locations that do not exist are left out (pip only warns about them, uv
fails). ``--index-strategy unsafe-best-match`` makes uv pick the best version across all indexes,
as pip does. Run with the venv's Python: ``python tools/uv_index_args.py``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from urllib.parse import urlparse

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def _exists(location: str) -> bool:
    """A remote location, or a local one that is there."""
    url = urlparse(location)
    if url.scheme in ("http", "https"):
        return True
    return os.path.exists(url.path if url.scheme == "file" else location)


def pip_config() -> dict[str, str]:
    """pip's settings, ``PIP_*`` variables over files (the order pip applies them)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, name = key.rsplit(".", 1)
        rank = 2 if section == ":env:" else 1 if section == "install" else 0
        if name not in settings or rank >= settings[name][0]:
            settings[name] = (rank, str(ast.literal_eval(raw)))
    return {name: value for name, (_, value) in settings.items()}


def uv_args(config: dict[str, str]) -> list[str]:
    """The uv flags for these pip settings."""
    args = ["--index-strategy", "unsafe-best-match"]
    for name, flag in FLAGS.items():
        for location in config.get(name, "").split():
            if _exists(location):
                args += [flag, location]
    for path in config.get("constraint", "").split():
        if os.path.exists(path):
            args += ["--constraint", path]
    if os.path.exists(config.get("cert", "")):
        args += ["--cert", config["cert"]]
    return args


if __name__ == "__main__":
    print("\n".join(uv_args(pip_config())))
