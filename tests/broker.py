"""A real Mosquitto broker per test, on a free port, with persistence in a temp dir (so it can be restarted)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

from edge_agent.mqtt.link import MqttLink, TlsConfig
from edge_agent.wire.topics import sync_probe_topic
from tests.support.env import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """``mosquitto -c conf`` that a test can stop, kill and start again on the same port and store."""

    def __init__(self, workdir: Path, port: int | None = None, *, listener: str | None = None) -> None:
        """``listener``: config text replacing the plain anonymous listener (e.g. ``pki broker-config``'s TLS one)."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            ""
            # As root, mosquitto would drop to the 'mosquitto' user and lose access to this temp dir.
            + ("user root\n" if os.geteuid() == 0 else "")
            + (listener if listener is not None else f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
            + "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "message_size_limit 0\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
        )
        self.proc: subprocess.Popen | None = None
        self.tls = listener is not None and "require_certificate" in listener

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError as exc:
                if self.proc.poll() is not None:
                    log = (self.dir / "mosquitto.log").read_text()[-2000:]
                    raise RuntimeError(f"mosquitto exited: {log}") from exc
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its retained messages to disk."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def retained(url: str, tls: TlsConfig | None = None) -> dict[str, bytes]:
    """Every retained message on the broker (a fresh subscriber to '#', synced with a probe message).

    Over mutual TLS the probe topic must be one the identity may use (the ACL's ``_sync/<client id>/#``).
    """
    got: dict[str, bytes] = {}
    done = threading.Event()
    client_id = f"retained-{uuid.uuid4().hex[:8]}"
    probe = sync_probe_topic(client_id, "probe") if tls else f"test/probe/{uuid.uuid4().hex}"
    link = MqttLink(url, client_id, tls=tls)
    link.start()
    try:
        assert link.wait_connected(10)

        def on_msg(topic: str, payload: bytes, is_retained: bool) -> None:
            if topic == probe:
                done.set()
            elif is_retained and payload:
                got[topic] = payload

        link.subscribe("#", on_msg, qos=0)
        link.publish(probe, b"x", qos=1)
        assert done.wait(10), "probe message never came back"
    finally:
        link.stop()
    return got
