"""The telemetry writer process (``telemetry.writer.remote``, ``telemetry.writer.child``, ``telemetry.writer.columns``).

Real child processes and a real SQLite outbox: the rows are the ones the in-process writer
builds, a killed writer is replaced without losing or repeating a row, past MAX_RESTARTS the
agent writes on its own thread, and the frozen agent's way of starting the child works.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from edge_agent.models.serving import ModelServer
from edge_agent.telemetry.hub import Telemetry
from edge_agent.telemetry.outbox import Row
from edge_agent.telemetry.recorder import ModelPolicy
from edge_agent.telemetry.rows import Item
from edge_agent.telemetry.writer import remote
from tests.support.telemetry import outbox_records


def _telemetry(where: Path, writer: str, **kw: Any) -> Telemetry:
    return Telemetry(
        where, registry=CollectorRegistry(), policy=lambda m: ModelPolicy(True, 0.5),
        flush_interval_s=0.25, max_rows=None, max_bytes=None, writer=writer, **kw,
    )  # fmt: skip


def _items(server: ModelServer, start: int, n: int) -> list[Item]:
    """Batches of 1 and 2 (ragged outputs), some sampled, some with an entity, some with one more output."""
    model = server.get("digits")
    rng = np.random.default_rng(start)
    items: list[Item] = []
    for i in range(start, start + n):
        x = rng.random((1 + i % 2, 8, 8, 1)).astype(np.float32) * 16
        out = model.predict({"pixels": x})
        if i % 7 == 0:  # another set of output names: another column group, rows still in queue order
            out["score"] = np.full((len(x),), i, np.float32)
        entity = None if i % 3 else f"asset-{i}"
        items.append((model.manifest, f"r{i}", 0.0001 * i, 1e9 + i, {"pixels": x}, out, entity, i % 4 == 0))
    return items


def _records(tel: Telemetry) -> list[tuple[int, str, dict[str, Any]]]:
    return outbox_records(tel.outbox)


def test_the_process_writes_the_rows_the_thread_writes_and_survives_a_kill(
    tmp_path: Path, model_server: ModelServer
) -> None:
    thread, proc = _telemetry(tmp_path / "thread", "thread"), _telemetry(tmp_path / "proc", "process")
    try:
        event = [Row("event", 5.0, '{"type":"restart"}')]
        for tel in (thread, proc):
            assert tel.recorder.writer.write(_items(model_server, 0, 40), event, None, 2) == 41
        assert _records(proc) == _records(thread)  # same bodies, same seqs: the columns lose nothing
        assert proc.outbox.dropped() == {"prediction": 2} and proc.outbox.stats().rows == 41

        assert isinstance(proc.outbox, remote.RemoteOutbox)
        first = proc.outbox.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert proc.recorder.writer.write(_items(model_server, 40, 10), None, None, 0) == 10
        status = proc.status()["writer"]
        assert status["mode"] == "process" and status["restarts"] == 1 and status["pid"] not in (None, first)
        seqs = sorted(s for s, _, _ in _records(proc))
        ids = sorted(b["request_id"] for _, k, b in _records(proc) if k == "prediction")
        assert seqs == list(range(1, 52)) and ids == sorted(f"r{i}" for i in range(50))  # nothing lost, nothing twice

        for _ in range(remote.MAX_RESTARTS):  # one more loss than the budget: the agent writes itself
            pid = proc.outbox.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            proc.outbox.count_drop("inputs", 1)
        assert proc.status()["writer"]["mode"] == "thread" and proc.outbox.restarts == remote.MAX_RESTARTS + 1
        assert proc.recorder.writer.write(_items(model_server, 50, 5), None, None, 0) == 5
        assert proc.outbox.stats().rows == 56 and proc.outbox.dropped() == {"prediction": 2, "inputs": 3}
    finally:
        thread.stop()
        proc.stop()


def test_the_writer_also_runs_as_a_fresh_subprocess(tmp_path: Path, model_server: ModelServer) -> None:
    tel = _telemetry(tmp_path / "t", "process", isolation="subprocess")
    try:
        assert tel.outbox.append([Row("event", 1.0, "{}")]) == 1
        assert tel.recorder.writer.write(_items(model_server, 0, 3), None, None, 0) == 3
        assert tel.status()["writer"]["mode"] == "process" and tel.outbox.stats().last_seq == 4
    finally:
        tel.stop()


def test_the_queue_keeps_inputs_only_where_the_writer_reads_them(tmp_path: Path, model_server: ModelServer) -> None:
    tel = _telemetry(tmp_path / "t", "process")  # sample_inputs 0.5; digits has no drift reference
    try:
        for item in _items(model_server, 0, 40):
            tel.recorder.prediction(item[0], item[1], item[2], item[4], item[5], item[6])
        queued = list(tel.recorder._queue)
        assert all(bool(it[4]) == it[7] for it in queued) and 0 < sum(it[7] for it in queued) < 40
        assert tel.flush() == 40
        bodies = {b["request_id"]: b for _, k, b in _records(tel) if k == "prediction"}
        assert [("inputs" in bodies[it[1]]) for it in queued] == [it[7] for it in queued]
    finally:
        tel.stop()
