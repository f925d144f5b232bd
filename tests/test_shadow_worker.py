"""The shadow child's idle-priority worker and the main thread's takeover when it starves.

The takeover logic runs in process with a stand-in for the copies' work (a sleep per block); the
capability runs in the real shadow process on the real runtime: a thread of it is ``SCHED_IDLE``,
and on a CPU saturated by busy processes the copies are still compared because the nice-10 main
thread takes over.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.models.shadow import ShadowModel, ShadowRunner, runner, worker
from edge_agent.models.shadow.blob import Block
from tests.support.shadow import offer

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")


def _block(first: int, copies: int) -> Block:
    rows = np.arange(first, first + copies, dtype=np.float32)[:, None]
    return Block([1] * copies, [0.001] * copies, {"x": rows}, {"y": rows})


class Recorder:
    """The copies run (their first value, in order), on which thread, and the messages sent."""

    def __init__(self, seconds_per_block: float = 0.0) -> None:
        self.seconds_per_block = seconds_per_block
        self.values: list[float] = []
        self.threads: set[str] = set()
        self.sent: list[dict[str, Any]] = []

    def run(self, block: Block) -> None:
        time.sleep(self.seconds_per_block)
        self.values += block.inputs["x"][:, 0].tolist()
        self.threads.add(threading.current_thread().name)

    def report(self) -> dict[str, Any]:
        return {"samples": len(self.values)}


def _wait(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_copies_run_on_the_idle_thread_in_order_and_freed_slots_are_answered_once() -> None:
    rec = Recorder()
    work = worker.Worker(rec.run, rec.report, rec.sent.append, idle=True, starved_s=60.0)
    assert work.take_report() == {"samples": 0, "priority": "idle"}  # the resumed figures go first
    work.submit([_block(0, 40)], 40)
    work.submit([_block(40, 3)], None)
    _wait(lambda: len(rec.values) == 43)
    _wait(lambda: work.take_report() == {"samples": 43, "priority": "idle"})  # the queued copies' figures are due
    assert rec.values == list(range(43)) and rec.threads == {"shadow-idle"}
    assert rec.sent[0]["freed"] == 40 and rec.sent[0]["priority"] == "idle" and len(rec.sent) == 1
    assert work.priority == "idle"


def test_the_main_thread_takes_over_a_starved_worker_after_its_slice() -> None:
    """A hand-over waiting ``starved_s``: the worker stops after its slice, the rest runs here, once and in order."""
    rec = Recorder(seconds_per_block=0.02)
    work = worker.Worker(rec.run, rec.report, rec.sent.append, idle=True, starved_s=0.1)
    copies = 20 * worker.SLICE
    work.submit([_block(0, copies)], copies)
    work.check()  # not starved yet: nothing happens
    assert work.priority == "idle"
    time.sleep(0.15)
    work.check()
    assert work.priority == "nice" and not work.waiting()
    assert rec.values == list(range(copies)), "every copy once, in order"
    assert rec.threads == {"shadow-idle", threading.current_thread().name}
    assert [m["freed"] for m in rec.sent] == [copies] and rec.sent[0]["priority"] == "nice"
    work.submit([_block(copies, 2)], None)  # from now on, on the submitting thread
    assert rec.values[-2:] == [copies, copies + 1]


def test_idle_false_runs_everything_on_the_submitting_thread() -> None:
    rec = Recorder()
    work = worker.Worker(rec.run, rec.report, rec.sent.append, idle=False, starved_s=0.1)
    work.submit([_block(0, 5)], 5)
    assert rec.values == list(range(5)) and rec.threads == {threading.current_thread().name}
    assert rec.sent == [{"samples": 5, "priority": "nice", "freed": 5}]


def _policies(pid: int) -> dict[str, int]:
    """Scheduling policy per thread name of process ``pid`` (/proc: 0 normal, 5 idle)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        out[name] = int(stat[stat.rindex(")") + 2 :].split()[38])  # field 41: policy
    return out


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


def test_the_real_shadow_process_runs_copies_idle_and_keeps_comparing_on_a_saturated_cpu(
    digits_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "IDLE_WORKER", True)  # off by default (runner.IDLE_WORKER)
    monkeypatch.setattr(worker, "STARVED_S", 0.3)
    shadow = ShadowRunner(
        ShadowModel("digits", "2", digits_dir), "1", 1.0, reference=ShadowModel("digits", "1", digits_dir)
    )
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    spinners: list[Any] = []
    try:
        assert shadow.ready.wait(60), shadow.failure
        assert shadow.child_pid is not None
        offer(shadow, digits_dir, 20)
        _wait(lambda: shadow.figures().samples >= 20 and shadow.priority == "idle", 60)
        assert 5 in _policies(shadow.child_pid).values(), _policies(shadow.child_pid)  # one SCHED_IDLE thread
        # Busy processes on every core at normal priority: the idle thread gets (almost) nothing.
        spinners = [ctx.Process(target=_spin, args=(stop,)) for _ in range(2 * (os.cpu_count() or 1))]
        for p in spinners:
            p.start()
        offer(shadow, digits_dir, 3000)  # one hand-over: ~0.2 s of the idle thread's CPU, which it no longer gets
        _wait(lambda: shadow.figures().samples >= 3020, 120)
        assert shadow.priority == "nice", "the main thread took over"
        assert shadow.failure is None and shadow.figures().agreement == 1.0
    finally:
        stop.set()
        for p in spinners:
            p.join(10)
        shadow.stop()
