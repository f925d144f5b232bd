"""Helpers of the camera tests: stream configs, an in-process stream stack, waiting on conditions."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

from edge_agent.config.streams import StreamConfig, parse_stream
from tests.support.wait import wait_for


def stream_config(**fields: Any) -> StreamConfig:
    """A ``[[streams]]`` entry validated like the agent's config (``parse_stream``)."""
    return parse_stream({"id": "cam", **fields}, 0)


def get_json(url: str, path: str) -> tuple[int, Any]:
    """GET ``path`` on ``host:port``; (status, decoded JSON)."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def slow_backend(delay_s: float) -> Any:
    """The installed TFLite backend whose ``invoke`` also sleeps ``delay_s``: a model slower than the camera.

    Injected through ``RuntimeOptions.backend`` (the runtime's seam), not monkeypatched.
    """
    from edge_agent.inference.interpreter import Backend, default_backend

    real = default_backend()

    class Slow:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._interp = real.interpreter(*args, **kwargs)

        def invoke(self) -> None:
            time.sleep(delay_s)
            self._interp.invoke()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._interp, name)

    return Backend(real.name, Slow, real.load_delegate)


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def start_agent(config: str, data_dir: Any, port: int) -> Any:
    """``edge-agent run`` in a child process with ``config`` (TOML text), the shipped models, on ``port``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.env import MODELS

    cfg = Path(data_dir).with_name("agent.toml")
    cfg.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["EDGEFLEET_MODELS_DIR"] = str(MODELS)
    cmd = [str(Path(sys.executable).with_name("edge-agent")), "run", "--config", str(cfg), "--data-dir",
           str(data_dir), "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return get_json(url, "/v2/health/ready")[0] == 200
        except OSError:
            return False

    wait_for(ready, 60, "the agent to be ready")
    return proc


PROBE = b'{"probe":true}'


def subscribe_ready(listener: Any, publisher: Any, topic: str, sink: list[dict[str, Any]]) -> None:
    """Subscribe ``listener`` to ``topic`` (QoS 0) and return once the broker routes it: probes until one arrives.

    A QoS 0 message published before the SUBACK is simply lost, so tests that count messages wait here.
    """
    seen = threading.Event()

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if payload == PROBE:
            seen.set()
        else:
            sink.append(json.loads(payload))

    listener.subscribe(topic, on_message, qos=0)
    wait_for(lambda: publisher.publish(topic, PROBE, qos=0) or seen.wait(0.2), 20, f"a subscription to {topic}")


def started_stream(cfg: StreamConfig, server: Any, registry: Any) -> tuple[Any, Any, list[dict]]:
    """A started one-stream manager, its stream ``cam`` and the list its results are appended to."""
    from edge_agent.streams.manager import StreamManager

    manager = StreamManager([cfg], server, registry)
    stream = manager.get("cam")
    docs: list[dict] = []
    stream.subscribe(docs.append)
    manager.start()
    return manager, stream, docs
