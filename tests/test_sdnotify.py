"""systemd notify and watchdog (#11 part 3) over a real NOTIFY_SOCKET: READY, STATUS, STOPPING, and pings that stop when a loop hangs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent import sdnotify
from edge_agent.app import Agent
from edge_agent.config import AgentConfig, MqttConfig
from edge_agent.update.states import State, UpdateRecord
from tests.broker import Broker
from tests.support.env import MODELS, PYTHON, free_port
from tests.support.frozen import FrozenAgent
from tests.support.sdnotify import NotifySocket

EDGE_AGENT = Path(PYTHON).parent / "edge-agent"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def test_notify_sends_one_datagram_and_is_a_no_op_outside_systemd(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(sdnotify.NOTIFY_SOCKET, raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, notify_socket.path)
    assert sdnotify.notify("READY=1", "STATUS=two\nlines") is True
    assert notify_socket.drain() == ["READY=1", "STATUS=two lines"]
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, str(Path(notify_socket.path).parent / "gone.sock"))
    assert sdnotify.notify("WATCHDOG=1") is False  # systemd gone: the agent carries on


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import socket

    name = f"edgefleet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("usec", "pid", "want"), [("2000000", None, 2.0), ("0", None, None), ("", None, None), ("2000000", "1", None)]
)
def test_watchdog_period(monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, want: float | None) -> None:
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC, usec)
    if pid is None:
        monkeypatch.delenv(sdnotify.WATCHDOG_PID, raising=False)
    else:
        monkeypatch.setenv(sdnotify.WATCHDOG_PID, pid)
    assert sdnotify.watchdog_period_s() == want


def test_agent_process_ready_status_watchdog_stopping(notify_socket: NotifySocket, tmp_path: Path) -> None:
    agent = FrozenAgent(EDGE_AGENT, tmp_path / "data", NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="1000000",
                        EDGEFLEET_MODELS_DIR=str(MODELS))  # fmt: skip
    agent.start()
    try:
        notify_socket.wait_for("READY=1")
        # READY=1 means the models are loaded and the API listens: the very next request is served.
        assert agent.request("GET", "/v2/health/ready")[0] == 200
        assert agent.request("GET", "/v2/models/digits/ready")[0] == 200
        assert notify_socket.wait_for("STATUS=") == "STATUS=serving 2 models"
        notify_socket.wait_for("WATCHDOG=1")
    finally:
        code = agent.terminate()
    assert code == 0
    notify_socket.drain()
    assert "STOPPING=1" in notify_socket.messages
    assert notify_socket.messages.index("READY=1") < notify_socket.messages.index("STOPPING=1")


@pytest.fixture
def served_agent(
    tmp_path: Path, broker: Broker, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Agent]:
    """An in-process agent with OTA on (so it has an update loop), a 1 s watchdog, serving in a thread."""
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET, notify_socket.path)
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC, "1000000")
    monkeypatch.delenv(sdnotify.WATCHDOG_PID, raising=False)
    cfg = AgentConfig(data_dir=tmp_path / "data", listen=f"127.0.0.1:{free_port()}", models_dir=MODELS,
                      mqtt=MqttConfig(broker=broker.url, device_id="wd-1", fleet="wd"))  # fmt: skip
    agent = Agent(cfg)
    agent.prepare()
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    notify_socket.wait_for("READY=1")
    yield agent
    agent._uvicorn.should_exit = True
    thread.join(30)


def test_status_names_the_broker_and_an_update_in_progress(served_agent: Agent, notify_socket: NotifySocket) -> None:
    """``STATUS=`` follows the broker link and the update machine's records (what it reports before every step)."""
    notify_socket.wait_for("STATUS=serving 2 models; broker connected; no update in progress")
    record = UpdateRecord("digits-2-r1", "digits", "2", {}, state=State.VALIDATING.value)
    served_agent.ota.machine.on_change(record)
    seen = len(notify_socket.messages)
    notify_socket.wait_for("STATUS=serving 2 models; broker connected; updating digits", after=seen)
    record.state = State.COMMITTED.value
    served_agent.ota.machine.on_change(record)
    seen = len(notify_socket.messages)
    notify_socket.wait_for("STATUS=serving 2 models; broker connected; no update in progress", after=seen)


def frozen_pings_stop(agent: Agent, sock: NotifySocket, loop: str, hang: Callable[[threading.Event], None]) -> None:
    """Pings while healthy; ``hang`` blocks ``loop``: once stale, two more checks send no WATCHDOG=1; released, pings resume."""
    hb = agent.heartbeat
    sock.wait_for("WATCHDOG=1", after=len(sock.messages))
    freeze = threading.Event()
    hang(freeze)
    deadline = time.monotonic() + 30  # each drain() waits up to 50 ms for a datagram: no busy loop
    while loop not in hb.stale():
        assert time.monotonic() < deadline, f"{loop} never went stale: {hb.stale()}"
        sock.drain()
    pings, ticks, seen = hb.pings, hb.ticks, len(sock.messages)
    while hb.ticks < ticks + 2:
        assert time.monotonic() < deadline, "the heartbeat stopped ticking"
        sock.drain()
    sock.drain()
    assert hb.pings == pings
    assert "WATCHDOG=1" not in sock.messages[seen:]
    freeze.set()
    sock.wait_for("WATCHDOG=1", after=len(sock.messages))
    assert hb.stale() == []


def test_a_hung_event_loop_stops_the_pings(served_agent: Agent, notify_socket: NotifySocket) -> None:
    task = served_agent.heartbeat.loop_task
    assert task is not None
    loop = task.get_loop()  # the agent's event loop

    def hang(freeze: threading.Event) -> None:
        loop.call_soon_threadsafe(freeze.wait)  # the event loop blocks in a callback: an injected hang

    frozen_pings_stop(served_agent, notify_socket, "event loop", hang)


def test_a_hung_update_loop_stops_the_pings(served_agent: Agent, notify_socket: NotifySocket) -> None:
    gate = served_agent.ota.gate
    due = gate.due

    def hang(freeze: threading.Event) -> None:
        def stuck() -> list[object]:
            freeze.wait()
            return list(due())

        gate.due = stuck  # the OTA intake loop blocks on its next turn: an injected hang

    frozen_pings_stop(served_agent, notify_socket, "update loop", hang)


def test_heartbeat_rule_with_a_test_clock() -> None:
    from edge_agent.heartbeat import Heartbeat

    sent: list[str] = []
    now = [0.0]
    status = ["serving 1 models"]
    hb = Heartbeat(sent.append, 10.0, status=lambda: status[0], clock=lambda: now[0])
    event, update = hb.register("event loop"), hb.register("update loop")
    assert hb.tick() and sent == ["STATUS=serving 1 models", "WATCHDOG=1"]
    now[0] = 6.0  # past period / 2
    event()
    assert not hb.tick() and hb.stale() == ["update loop"] and len(sent) == 2  # nothing new sent
    update()
    status[0] = "serving 2 models"
    assert hb.tick() and sent[-2:] == ["STATUS=serving 2 models", "WATCHDOG=1"] and hb.pings == 2
