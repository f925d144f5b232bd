"""The Debian package (#11 part 2): built with dpkg-deb, installed with dpkg -i into this machine, run, removed, purged.

Needs root and dpkg (the CI image has both); one package test at a time per machine (a file lock).
"""

from __future__ import annotations

import ctypes.util
import errno
import grp
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.update.agent.slots import verify_manifest
from tests.support.deb import AGENT, CONF, PKG, STATE, UNIT, build_deb, dpkg, package_machine
from tests.support.env import PYTHON, REPO
from tests.support.frozen import FrozenAgent, digits_body

AGENT_DIR = AGENT.relative_to("/").as_posix()  # "opt/edgefleet/agent", as dpkg-deb -c lists it

# The children that lower their priority (os.nice: setpriority; the shadow's SCHED_IDLE: sched_setscheduler, both
# in @resources), each run to its end over a closed pipe, under a seccomp filter that denies those calls with the
# unit's action (a systemd that does not re-allow them); the shadow child then stays at the priority it has.
NICE_CHILDREN = """
import ctypes, multiprocessing, sys
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW the rest
for name in (b"setpriority", b"nice", b"sched_setscheduler"):
    assert lib.seccomp_rule_add(ctx, int(sys.argv[1]), lib.seccomp_syscall_resolve_name(name), 0) == 0
assert lib.seccomp_load(ctx) == 0
from edge_agent.models.shadow.child import serve as shadow
from edge_agent.telemetry.writer.child import serve as writer
from edge_agent.models.shadow import priority
for serve in (writer, shadow):
    ours, theirs = multiprocessing.Pipe()
    ours.close()
    serve(theirs)
print("ok" if (priority.go_idle(), priority.current()) == (False, "nice") else "went idle")
"""


@pytest.fixture
def deb(frozen_agent: Path, tmp_path: Path) -> Iterator[Path]:
    """``make deb``'s package of the session's build; the machine is locked for package tests meanwhile."""
    with package_machine():
        yield build_deb(frozen_agent, tmp_path)


def package_modes(deb: Path) -> dict[str, str]:
    """``dpkg-deb -c``: every path of the package (``/opt/...``, a trailing ``/`` for directories) and its
    ``ls -l`` mode string, with the owner (``drwxr-xr-x root/root``) and a symlink's target."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    out = {}
    for line in listing.splitlines():
        mode, who, _size, _day, _time, name = line.split(maxsplit=5)
        name, _, target = name.partition(" -> ")
        out[name.removeprefix(".")] = f"{mode} {who}" + (f" -> {target}" if target else "")
    return out


def expected_modes(folder: Path) -> dict[str, str]:
    """The package the rule says: every path of ``folder`` under slots/a plus the links, the unit and the config;
    all root-owned (postinst gives the agent to edgefleet); directories, the binary and shared libraries 0755,
    symlinks as they are, every other file 0644."""
    slot = f"/{AGENT_DIR}/slots/a"
    dirs = ["/", "/etc/", "/etc/edgefleet/", "/lib/", "/lib/systemd/", "/lib/systemd/system/", "/opt/",
            "/opt/edgefleet/", f"/{AGENT_DIR}/", f"/{AGENT_DIR}/slots/", f"{slot}/"]  # fmt: skip
    out = {d: "drwxr-xr-x root/root" for d in dirs}
    out |= {str(p): "-rw-r--r-- root/root" for p in (CONF, UNIT)}
    out |= {f"/{AGENT_DIR}/{link}": "lrwxrwxrwx root/root -> slots/a" for link in ("current", "good")}
    for p in folder.rglob("*"):
        rel = f"{slot}/{p.relative_to(folder)}"
        if p.is_symlink():
            out[rel] = f"lrwxrwxrwx root/root -> {os.readlink(p)}"
        elif p.is_dir():
            out[rel + "/"] = "drwxr-xr-x root/root"
        elif p.name == "edge-agent" or p.name.endswith(".so") or ".so." in p.name:
            out[rel] = "-rwxr-xr-x root/root"
        else:
            out[rel] = "-rw-r--r-- root/root"
    return out


def owner(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def unit_settings() -> dict[str, list[str]]:
    """``packaging/edge-agent.service``'s ``[Service]`` directives, every value of each."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (REPO / "packaging" / "edge-agent.service").read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_sandbox_refuses_a_filtered_call_with_eperm_and_the_children_go_on() -> None:
    """Under ``~@resources`` a filtered call must fail (EPERM), not kill the telemetry writer or shadow child (SIGSYS)."""
    unit = unit_settings()
    assert "~@privileged @resources" in unit["SystemCallFilter"]
    assert unit["SystemCallFilter"][-1] == "setpriority sched_setscheduler"  # lowering one's priority stays allowed
    assert unit["LimitNICE"] == ["10"]  # ... and the agent may give the shadow child nice 10 back (shadow.priority)
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed: the filter cannot be reproduced here")
    errno_name = unit.get("SystemCallErrorNumber", [""])[-1]
    # systemd's action for a filtered call: SCMP_ACT_ERRNO(n) with SystemCallErrorNumber=, else SCMP_ACT_KILL_PROCESS
    action = 0x00050000 | getattr(errno, errno_name) if errno_name else 0x80000000
    done = subprocess.run([PYTHON, "-c", NICE_CHILDREN, str(action)], capture_output=True, text=True, cwd=REPO)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), f"{done.returncode}: {done.stderr[-1500:]}"


def test_install_run_remove_purge(deb: Path, frozen_agent: Path, tmp_path: Path) -> None:
    version = (frozen_agent / "VERSION").read_text().strip()
    assert deb.name == f"{PKG}_{version}_{dpkg('--print-architecture').stdout.strip()}.deb"
    packaged = package_modes(deb)
    expected = expected_modes(frozen_agent)
    assert sorted(set(packaged) ^ set(expected)) == []  # the file list is the expected tree, nothing more
    assert {p: m for p, m in packaged.items() if m != expected[p]} == {}  # every mode, owner and link
    for _ in range(2):  # the maintainer scripts are idempotent: a reinstall runs them again
        done = dpkg("-i", str(deb))
        assert done.returncode == 0, done.stderr + done.stdout

    # the user, the slots, the unit, the conffile, the state directory
    user = pwd.getpwnam("edgefleet")
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_dir == str(STATE) and user.pw_uid < 1000
    assert os.readlink(AGENT / "current") == os.readlink(AGENT / "good") == "slots/a"
    assert verify_manifest(AGENT / "slots" / "a") == []  # every file, byte for byte
    for p in [AGENT, *AGENT.rglob("*")]:  # every installed file: the package's mode, given to edgefleet
        assert owner(p)[:2] == ("edgefleet", "edgefleet"), p
        if not p.is_symlink():
            assert stat.filemode(p.lstat().st_mode) == packaged[str(p) + ("/" if p.is_dir() else "")][:10], p
    assert owner(AGENT / "slots" / "a" / "edge-agent") == ("edgefleet", "edgefleet", 0o755)
    assert owner(UNIT) == ("root", "root", 0o644)
    assert owner(CONF) == ("root", "edgefleet", 0o640)
    assert owner(STATE) == ("edgefleet", "edgefleet", 0o700)
    conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", PKG], capture_output=True, text=True).stdout
    assert str(CONF) in conffiles
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr

    # the installed agent, as its unit runs it: user edgefleet, ExecStartPre, the packaged config, the state dir
    as_user = ("setpriv", "--reuid=edgefleet", "--regid=edgefleet", "--clear-groups")
    boot = subprocess.run([*as_user, str(AGENT / "good" / "edge-agent"), "__boot__", "--config", str(CONF)],
                          capture_output=True, text=True, env={"EDGEFLEET_DATA_DIR": str(STATE)})  # fmt: skip
    assert boot.returncode == 0 and boot.stdout.strip() == f"agent {version} in slot a", boot.stderr
    agent = FrozenAgent(AGENT / "current" / "edge-agent", STATE, log=tmp_path / "agent.log", prefix=as_user)
    agent.start("--config", str(CONF))
    try:
        agent.wait_ready()
        status, out = agent.request("POST", "/v2/models/digits/infer", digits_body())
        assert status == 200, out
    finally:
        assert agent.terminate() == 0, agent.log.read_text()[-2000:]
    assert owner(STATE / "models")[0] == "edgefleet"

    done = dpkg("--remove", PKG)
    assert done.returncode == 0, done.stderr
    assert not AGENT.exists() and not UNIT.exists()
    assert CONF.is_file() and (STATE / "models").is_dir()  # remove keeps configuration and state
    done = dpkg("--purge", PKG)
    assert done.returncode == 0, done.stderr
    assert not STATE.exists() and not CONF.parent.exists() and not Path("/opt/edgefleet").exists()
    with pytest.raises(KeyError):
        pwd.getpwnam("edgefleet")
