"""``make deb``: ``edgefleet-agent_<version>_<arch>.deb`` from the one-folder build, with ``dpkg-deb``.

    python tools/deb.py [--folder dist/edge-agent] [--out dist] [-z 6]

The package tree (docs/deploy.md has the layout)::

    /opt/edgefleet/agent/slots/a/      the frozen agent (VERSION, SHA256SUMS, edge-agent, _internal/)
    /opt/edgefleet/agent/current       -> slots/a
    /opt/edgefleet/agent/good          -> slots/a   (the last confirmed build: ExecStartPre)
    /lib/systemd/system/edge-agent.service
    /etc/edgefleet/agent.toml          conffile

Maintainer scripts (``packaging/deb/``) create the ``edgefleet`` user and ``/var/lib/edgefleet``
and enable the service where systemd runs; on every install or upgrade, postinst makes slot a (the
package's build) the good agent in the slot state, after any self-update (docs/deploy.md). Without
``--folder`` the folder is built first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from package import NAME, ROOT, build  # tools/ is on sys.path when run

from edge_agent.update.agent.slots import VERSION_FILE, verify_manifest

DEB = ROOT / "packaging" / "deb"
UNIT = ROOT / "packaging" / "edge-agent.service"
AGENT_DIR = "opt/edgefleet/agent"
PACKAGE = "edgefleet-agent"


def arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def stage(folder: Path, root: Path) -> str:
    """Lay out the package tree of ``folder`` under ``root``; returns the version (the folder's VERSION)."""
    bad = verify_manifest(folder)
    if bad:
        raise SystemExit(f"error: {folder} does not match its SHA256SUMS: {', '.join(bad[:5])}")
    version = (folder / VERSION_FILE).read_text().strip()
    agent = root / AGENT_DIR
    shutil.copytree(folder, agent / "slots" / "a", symlinks=True)
    os.symlink("slots/a", agent / "current")
    os.symlink("slots/a", agent / "good")
    (root / "lib/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "lib/systemd/system/edge-agent.service")
    (root / "etc/edgefleet").mkdir(parents=True)
    shutil.copy(DEB / "agent.toml", root / "etc/edgefleet/agent.toml")
    meta = root / "DEBIAN"
    meta.mkdir()
    size_kb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) // 1024
    control = (DEB / "control.in").read_text()
    control = control.replace("@VERSION@", version).replace("@ARCH@", arch()).replace("@SIZE_KB@", str(size_kb))
    (meta / "control").write_text(control)
    for script in ("postinst", "prerm", "postrm"):
        shutil.copy(DEB / script, meta / script)
        os.chmod(meta / script, 0o755)
    shutil.copy(DEB / "conffiles", meta / "conffiles")
    for p in [root, *root.rglob("*")]:  # dpkg-deb wants sane modes whatever the umask of the build
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() or os.access(p, os.X_OK) else 0o644)
    return version


def build_deb(folder: Path, out_dir: Path, level: int = 6) -> Path:
    """Build the .deb into ``out_dir``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        root = Path(tmp) / "root"
        version = stage(folder, root)
        deb = out_dir / f"{PACKAGE}_{version}_{arch()}.deb"
        cmd = ["dpkg-deb", "--root-owner-group", f"-z{level}", "-Zgzip", "--build", str(root), str(deb)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an existing one-folder build (default: build dist/edge-agent)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("-z", dest="level", type=int, default=6, choices=range(0, 10), help="gzip level")
    args = parser.parse_args(argv)
    folder = args.folder or build(ROOT / "dist", ROOT / "build" / "pyinstaller")
    if not (folder / NAME).is_file():
        parser.error(f"{folder} is not a one-folder build (no {NAME} in it)")
    print(build_deb(folder, args.out, args.level))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
