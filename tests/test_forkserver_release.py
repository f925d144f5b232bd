"""``childproc.release``: the forkserver and the resource tracker stop when no child needs them, and come back."""

from __future__ import annotations

import multiprocessing.forkserver
import os
from multiprocessing.connection import Connection
from pathlib import Path

from edge_agent.inference import childproc
from edge_agent.update.validate import validate_candidate


def _server_pid() -> int | None:
    return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined,no-any-return]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _echo(conn: Connection) -> None:
    """A child that lives until its parent closes the connection."""
    while True:
        try:
            conn.send(conn.recv())
        except (EOFError, OSError):
            return


def test_release_stops_an_idle_forkserver_and_the_next_child_starts_another(digits_dir: Path) -> None:
    assert validate_candidate(digits_dir, max_latency_ms=None)["ok"]
    first = _server_pid()
    assert first is not None and _alive(first)
    assert childproc.release() is True
    assert _server_pid() is None and not _alive(first)  # reaped: no zombie either
    assert validate_candidate(digits_dir, max_latency_ms=None)["ok"]  # forked from a new server
    second = _server_pid()
    assert second is not None and second != first and _alive(second)


def test_a_live_child_keeps_the_forkserver(digits_dir: Path) -> None:
    child = childproc.Child(_echo, "tests.test_forkserver_release", "__none__", "forkserver")
    server = _server_pid()
    try:
        assert server is not None
        assert childproc.release() is False  # the child reports its exit through the server
        assert _alive(server) and child.exitcode is None
        child.conn.send("ping")
        assert child.conn.poll(10) and child.conn.recv() == "ping"
    finally:
        child.stop(5.0)
    assert child.exitcode == 0  # its exit status still came back through the server
    assert childproc.release() is True and not _alive(server)
