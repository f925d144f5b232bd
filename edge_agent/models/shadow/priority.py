"""The shadow child's CPU priority: nice 10 while it loads, then ``SCHED_IDLE``, given back by the agent when it starves.

A process scheduled ``SCHED_IDLE`` runs on CPU time nothing else wants: a request thread of the
agent that wakes up preempts it at once. On digits at ``shadow_rate = 1`` that took the primary's
p99 rise from +10.6% (the child at nice 10) to +2.3% (docs/benchmarks.md). On a saturated CPU
such a process gets almost nothing, so the agent's runner, at normal priority, watches it: when a
hand-over has waited ``STARVED_S`` with no word from the child, it calls :func:`restore` on the
child's threads from outside, and the child goes on at nice 10, needing no CPU time of its own to
get there. (A ``SCHED_IDLE`` *thread* inside a nice-10 child did not work: the main thread's
takeover waited for the starved thread to give up the GIL.)

Leaving ``SCHED_IDLE`` is allowed to an unprivileged process only when its nice value is within
its ``RLIMIT_NICE`` (the unit's ``LimitNICE=10``); :func:`go_idle` therefore first proves on a
throwaway thread that the way back is open, and otherwise leaves the child at nice 10.
"""

from __future__ import annotations

import os
import threading
import time

from edge_agent.wire.shadow import PRIORITIES

NICE = 10  # ~1/10 of a normal process's share of a busy core: the agent first, the shadow never starved
STARVED_S = 1.0  # a hand-over waiting this long with no word from an idle child: the agent gives its priority back
IDLE, NICE_NAME = PRIORITIES  # the two priorities in the child's reports, ``ShadowRunner.priority`` and the figures


def go_idle() -> bool:
    """Every thread of this process ``SCHED_IDLE``, if it may leave it again (:func:`reversible`)."""
    if not reversible():
        return False
    if not _move(os.getpid(), os.SCHED_IDLE):
        restore(os.getpid())
        return False
    return True


def reversible() -> bool:
    """Whether a thread of this process can go ``SCHED_IDLE`` and come back (tried on a throwaway thread)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            result.append(False)
            return
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            result.append(True)
        except OSError:  # stuck there: the thread ends, and nothing else of this process went idle
            result.append(False)

    thread = threading.Thread(target=attempt, name="shadow-idle-probe")
    thread.start()
    thread.join()
    _gone(thread.native_id)  # left before the threads are listed (a probe stuck idle may take longer: harmless)
    return result == [True]


def _gone(tid: int | None, timeout_s: float = 1.0) -> None:
    """Wait until thread ``tid`` of this process has left /proc (``join`` returns a moment before it exits)."""
    deadline = time.monotonic() + timeout_s
    while tid is not None and os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.001)


def restore(pid: int) -> bool:
    """Every thread of process ``pid`` back to the normal policy (its nice value stays); False if refused or gone."""
    return _move(pid, os.SCHED_OTHER)


def _move(pid: int, policy: int) -> bool:
    """Every thread of process ``pid`` to ``policy``; False if one was refused or the process is gone."""
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError:
            return False
    return True


def current() -> str:
    """This thread's priority as the reports name it."""
    idle = hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
    return IDLE if idle else NICE_NAME
