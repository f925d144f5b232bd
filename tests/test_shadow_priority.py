"""The shadow child's priority: ``SCHED_IDLE`` after loading, given back (nice 10) by the agent when it starves.

The policy switches run for real (read back from /proc), as root and as an unprivileged user
whose ``RLIMIT_NICE`` does or does not open the way back (the unit's ``LimitNICE``); the
capability runs in the real shadow process on the real runtime: on a CPU saturated by busy
processes its copies are still compared because the agent's runner gives it its nice back.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.inference.childproc import lower_priority
from edge_agent.models.shadow import ShadowModel, ShadowRunner, priority
from edge_agent.wire.shadow import PRIORITIES
from tests.support.shadow import offer
from tests.support.wait import until, wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")

POLICY_IDLE = 5  # SCHED_IDLE in /proc/PID/task/TID/stat


def _policies(pid: int) -> dict[int, int]:
    """Scheduling policy per thread of process ``pid`` (/proc field 41: 0 normal, 5 idle)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        out[int(tid)] = int(stat[stat.rindex(")") + 2 :].split()[38])
    return out


# Run as ``nobody`` with the system Python (the venv's may sit under an unreadable /root): a forked
# child lowers itself and goes idle as the shadow child does; the parent, the same user, gives it back.
# ``priority`` is run from its source; the one name it imports is handed in (argv 2), not the package.
UNPRIVILEGED = """
import os, sys, time, types
shadow = sys.modules["edge_agent.wire.shadow"] = types.ModuleType("edge_agent.wire.shadow")
shadow.PRIORITIES = tuple(sys.argv[2].split(","))
priority = types.ModuleType("priority")
exec(sys.argv[1], priority.__dict__)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.nice(priority.NICE)  # as the child's lower_priority
    os.write(w, b"1" if priority.go_idle() else b"0")
    time.sleep(30)
    os._exit(0)
idle = os.read(r, 1) == b"1"
deadline = time.monotonic() + 30  # a probe thread stuck idle may take a while to finish exiting under load
while len(os.listdir(f"/proc/{pid}/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.01)
def policies():
    tasks = os.listdir(f"/proc/{pid}/task")
    return sorted({int(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[38]) for t in tasks})
before = policies()
restored = priority.restore(pid)
print(idle, before, restored, policies(), os.getpriority(os.PRIO_PROCESS, pid))
os.kill(pid, 9)
"""


@pytest.mark.parametrize(("nice_limit", "expected"), [(0, "False [0] True [0] 10"), (10, "True [5] True [0] 10")])
def test_an_unprivileged_child_goes_idle_only_when_its_nice_limit_lets_the_agent_give_it_back(
    nice_limit: int, expected: str
) -> None:
    """``RLIMIT_NICE`` 0 (no ``LimitNICE``): the way back would be refused, so the child stays at nice 10;
    10 (the unit's ``LimitNICE=10``): it goes idle, and a process of the same user gives it back, nice 10 kept."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"):
        pytest.skip("needs root, setpriv and prlimit to become an unprivileged user")
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    source = Path(priority.__file__).read_text()
    command = ["prlimit", f"--nice={nice_limit}:{nice_limit}", "setpriv", "--reuid=65534", "--regid=65534",
               "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", python, "-c", UNPRIVILEGED, source,
               ",".join(PRIORITIES)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd="/", timeout=60)
    if done.returncode and "failed to set the NICE resource limit" in done.stderr:  # a hard limit below it
        pytest.skip(f"RLIMIT_NICE {nice_limit} cannot be set here (raising the hard limit needs CAP_SYS_RESOURCE)")
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == expected


def test_go_idle_sets_every_thread_and_restore_gives_the_normal_policy_back_keeping_nice() -> None:
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()

    def child() -> None:
        import threading

        threading.Thread(target=done.wait, daemon=True).start()  # a second thread, started before
        lower_priority(priority.NICE)
        if priority.go_idle() and priority.current() == priority.IDLE:
            ready.set()
        done.wait(30)

    proc = ctx.Process(target=child)
    proc.start()
    try:
        assert ready.wait(30), "the child could not go idle"
        assert proc.pid is not None
        assert set(_policies(proc.pid).values()) == {POLICY_IDLE} and len(_policies(proc.pid)) == 2
        assert priority.restore(proc.pid)
        assert set(_policies(proc.pid).values()) == {0}
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == priority.NICE
    finally:
        done.set()
        proc.join(10)
    assert not priority.restore(proc.pid), "a process that is gone"


def _spin(seconds: float, started: Any) -> None:
    """Busy for ``seconds`` (ended early by a kill) once it has said it started: no shared lock or event
    polled while spinning, whose futex waits would let the spinners sleep and hand the idle child the
    CPU they were meant to take."""
    started.release()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_real_shadow_process_runs_idle_and_keeps_comparing_on_a_saturated_cpu(digits_dir: Path) -> None:
    shadow = ShadowRunner(
        ShadowModel("digits", "2", digits_dir), "1", 1.0, reference=ShadowModel("digits", "1", digits_dir)
    )
    ctx = multiprocessing.get_context("fork")
    spinners: list[Any] = []
    try:
        assert shadow.ready.wait(60), shadow.failure
        assert shadow.child_pid is not None and shadow.priority == priority.IDLE
        assert set(_policies(shadow.child_pid).values()) == {POLICY_IDLE}
        offer(shadow, digits_dir, 20)
        wait_for(lambda: shadow.figures().samples >= 20, 60, "20 samples")  # (a busy host may already have starved it)
        # Busy processes on every core at normal priority: the idle child gets (almost) nothing.
        started = ctx.Semaphore(0)
        spinners = [ctx.Process(target=_spin, args=(180.0, started)) for _ in range(2 * (os.cpu_count() or 1))]
        for p in spinners:
            p.start()
        for _ in spinners:  # every spinner running before the copies: on a fast runtime the child would
            assert started.acquire(timeout=30)  # otherwise finish 3,000 copies in the first 0.1 s
        time.sleep(0.3)

        # Copies until the idle child starves: crumbs of CPU let a fast runtime (ai-edge-litert) answer a
        # batch now and then, so one batch of 3,000 copies may be done before any hand-over waits STARVED_S.
        def starved() -> bool:
            return shadow.priority == priority.NICE_NAME

        deadline = time.monotonic() + 120
        while not starved() and time.monotonic() < deadline:
            offer(shadow, digits_dir, 1000)
            until(starved, 2 * priority.STARVED_S)
        assert starved(), "the runner gave the child its nice back"
        assert set(_policies(shadow.child_pid).values()) == {0}
        seen = shadow.figures().samples
        offer(shadow, digits_dir, 100)
        wait_for(
            lambda: shadow.figures().samples >= seen + 20, 120, "20 more samples"
        )  # and it keeps comparing at nice 10
        assert shadow.failure is None and shadow.figures().agreement == 1.0
    finally:
        for p in spinners:
            p.kill()
            p.join(10)
        shadow.stop()
