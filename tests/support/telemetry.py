"""A real ``edge-agent run`` process with telemetry on, an HTTP client that remembers inference ids, a real ingest."""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.ingest.consumer import IngestOptions, run_ingest
from cloud_batch.ingest.read import bodies, read_kind
from edge_agent.wire.telemetry.pack import PACK_KIND, expand
from tests.broker import Broker
from tests.support.env import MODELS, free_port
from tests.support.wait import wait_for

BIN = Path(sys.executable).parent


class AgentProcess:
    """``edge-agent run`` on a free port against ``broker_url`` (which may be down), restartable on its data dir."""

    def __init__(self, data_dir: Path, broker_url: str, trust: Path, **telemetry: Any) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        self.env.update(
            EDGEFLEET_MODELS_DIR=str(MODELS),
            EDGEFLEET_MQTT__BROKER=broker_url,
            EDGEFLEET_MQTT__DEVICE_ID="dev-1",
            EDGEFLEET_MQTT__FLEET="tfleet",
            EDGEFLEET_MQTT__TRUST=str(trust),
            EDGEFLEET_TELEMETRY__FLUSH_INTERVAL_MS="50",
            EDGEFLEET_TELEMETRY__RESEND_TIMEOUT_S="3",
            **{f"EDGEFLEET_TELEMETRY__{k.upper()}": str(v) for k, v in telemetry.items()},
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> AgentProcess:
        self.starts += 1
        log = open(self.data_dir.parent / f"agent-{self.starts}.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.data_dir.parent / f"agent-{self.starts}.log").read_text()[-3000:]
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("agent never became ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = self.connect()
        try:
            return call(conn, method, path, body)
        finally:
            conn.close()

    def telemetry(self) -> dict[str, Any]:
        return dict(self.request("GET", "/agent/status")[1]["telemetry"])


def outbox_records(outbox: Any) -> list[tuple[int, str, dict[str, Any]]]:
    """The records of an outbox (or a writer process's) as the cloud reads them, ``(seq, kind, body)``: packs expanded."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    for seq, kind, _, body in outbox.read_after(0, 10**12, limit_rows=10**9):
        doc = json.loads(body)
        if kind == PACK_KIND:
            out += [(s, "prediction", b) for s, _, b in expand(seq, doc)]
        else:
            out.append((seq, kind, doc))
    return out


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, json.loads(raw) if raw else None


def predict_many(agent: AgentProcess, n: int, threads: int = 2, seed: int = 0) -> list[str]:
    """``n`` digits predictions over keep-alive connections; the inference ids the agent returned."""
    x = np.random.default_rng(seed).random((n, 1, 8, 8, 1)).astype(np.float32) * 16
    ids: list[list[str]] = [[] for _ in range(threads)]

    def work(k: int) -> None:
        conn = agent.connect()
        for i in range(k, n, threads):
            body = {
                "inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": x[i].ravel().tolist()}]
            }
            status, out = call(conn, "POST", "/v2/models/digits/infer", body)
            assert status == 200, out
            ids[k].append(out["id"])
        conn.close()

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [i for part in ids for i in part]


def label_many(agent: AgentProcess, ids: list[str]) -> None:
    """One feedback label per id, in batches of 50 (``{"items": [...]}``)."""
    conn = agent.connect()
    for i in range(0, len(ids), 50):
        items = [{"id": rid, "label": int(j % 10)} for j, rid in enumerate(ids[i : i + 50])]
        status, out = call(conn, "POST", "/v2/models/digits/feedback", {"items": items})
        assert status == 200, out
    conn.close()


def wait_until(cond: Any, timeout: float, what: str) -> None:
    """``wait_for`` checking every 0.2 s: a check here is usually an HTTP request to the agent under test."""
    wait_for(cond, timeout, what, step=0.2)


class Ingest:
    """``run_ingest --follow`` for ``fleet`` in a thread, stopped by the test."""

    def __init__(self, broker: Broker, store: Path, fleet: str = "tfleet") -> None:
        self.stop_event = threading.Event()
        opts = IngestOptions(fleet=fleet, broker_url=broker.url, store=store, follow=True)
        self.thread = threading.Thread(target=run_ingest, args=(opts,), kwargs={"stop": self.stop_event}, daemon=True)
        self.store = store

    def __enter__(self) -> Ingest:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)


def stored(store: Path, kind: str) -> list[dict[str, Any]]:
    """The bodies of every ``kind`` row in the store; fails on a duplicate (device, seq)."""
    table = read_kind(store, kind)
    seqs = table.column("seq").to_pylist()
    devices = table.column("device_id").to_pylist()
    dup = [k for k, n in collections.Counter(zip(devices, seqs, strict=True)).items() if n > 1]
    assert not dup, f"duplicate (device, seq) rows: {dup[:5]}"
    return bodies(table)
