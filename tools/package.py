"""``make package``: the one-folder PyInstaller build of the agent, with ``VERSION`` and a SHA-256 manifest.

    python tools/package.py [--dist dist] [--work build/pyinstaller] [--version V]

Builds ``<dist>/edge-agent/`` from ``packaging/edge-agent.spec``, then writes
``<dist>/edge-agent/VERSION`` (the agent's ``__version__`` unless ``--version``) and
``<dist>/edge-agent/SHA256SUMS`` (``sha256sum -c`` format: every other file of the folder; the
format's one definition is ``edge_agent.update.agent.slots.write_manifest``, which the agent checks
before it installs an agent update).
``--sizes`` prints the folder's size broken down by library. The library functions are used by
the test fixture (``tests/support/frozen.py``) and by ``tools/deb.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from edge_agent.inference.interpreter import selected_runtime
from edge_agent.update.agent.slots import write_manifest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "packaging" / "edge-agent.spec"
NAME = "edge-agent"
# Everything the frozen build is made from: a change to any of these means a new build.
SOURCES = ("edge_agent", "models", "packaging/edge-agent.spec", "tools/package.py")
# ... and the installed distributions it bundles or is built with: a bump of any of them also means a
# new build (a cached build of the same sources would otherwise ship the old numpy or runtime).
BUILD_DEPS = ("pyinstaller", "pyinstaller-hooks-contrib", "numpy", "tflite-runtime", "ai-edge-litert", "uvicorn",
              "paho-mqtt", "opencv-python-headless", "cryptography", "httptools", "uvloop", "starlette")  # fmt: skip


def dependency_versions() -> list[str]:
    """``name==version`` (``name absent`` when not installed) for every ``BUILD_DEPS`` entry, and the Python."""
    from importlib import metadata

    # The one runtime the build bundles: edge-agent.spec takes the one the agent would load here.
    out = [f"python {sys.version}", f"bundled runtime {selected_runtime()[0]}"]
    for name in BUILD_DEPS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} absent")
    return out


def source_digest(root: Path = ROOT) -> str:
    """A sha256 over the build's dependency versions and the paths and contents of every source (the test cache key)."""
    h = hashlib.sha256("\n".join(dependency_versions()).encode() + b"\0")
    for rel in SOURCES:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            if "__pycache__" in p.parts or p.suffix == ".pyc" or ".eval" in p.parent.name:
                continue
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def agent_version() -> str:
    ns: dict[str, str] = {}
    exec((ROOT / "edge_agent" / "__init__.py").read_text(), ns)  # no import: the build must not load the agent
    return ns["__version__"]


def build(dist: Path, work: Path, version: str | None = None, python: str = sys.executable) -> Path:
    """Run PyInstaller on the spec into ``dist/edge-agent`` and write its VERSION and manifest."""
    cmd = [python, "-m", "PyInstaller", str(SPEC), "--noconfirm", "--log-level", "WARN"]
    cmd += ["--distpath", str(dist), "--workpath", str(work)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    folder = dist / NAME
    write_manifest(folder, version or agent_version())
    return folder


def sizes(folder: Path) -> list[tuple[str, int]]:
    """Bytes per library: the first path part under ``_internal`` (``numpy``, ``tflite_runtime``, ``libpython…``)."""
    per: Counter[str] = Counter()
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            parts = p.relative_to(folder).parts
            key = parts[1] if parts[0] == "_internal" and len(parts) > 1 else parts[0]
            key = key.split(".cpython")[0].split(".so")[0] if not key.endswith(".libs") else key
            per[key] += p.stat().st_size
    return per.most_common()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "pyinstaller")
    parser.add_argument("--version", help="the VERSION written into the folder (default: edge_agent.__version__)")
    parser.add_argument("--sizes", action="store_true", help="print the size per library")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    folder = build(args.dist, args.work, args.version)
    total = sum(n for _, n in sizes(folder))
    print(f"built {folder} in {time.monotonic() - t0:.0f} s: {total / 1e6:.1f} MB, version {agent_version()}")
    if args.sizes:
        for key, n in sizes(folder):
            if n >= 100_000:
                print(f"  {n / 1e6:8.1f} MB  {key}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
