"""Streams in a real ``edge-agent run`` (#12): a camera that goes away and comes back, and bad streams.

An HTTP MJPEG camera (a small test server) is stopped and restarted: the stream reconnects on its
own while HTTP inference keeps answering 200. A stream with a model that takes no image, an
unknown model or an unreachable URL is marked with its reason and the agent keeps serving.
"""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from edge_agent.telemetry.outbox import DB_FILE, Outbox
from tests.support.env import free_port
from tests.support.streams import get_json, start_agent
from tests.support.video import MjpegServer, digit_frame
from tests.support.wait import wait_for


def _stream(url: str, sid: str) -> dict:
    return next(s for s in get_json(url, "/agent/streams")[1]["streams"] if s["id"] == sid)


def _infer(url: str) -> int:
    """One digits inference over HTTP; its status."""
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": np.zeros(64).tolist()}]})  # fmt: skip
    conn = http.client.HTTPConnection(*url.split(":"), timeout=10)
    try:
        conn.request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def _infer_forever(url: str, stop: threading.Event, codes: list[int]) -> None:
    while not stop.is_set():
        codes.append(_infer(url))
        stop.wait(0.02)


def test_camera_stops_and_restarts_while_http_keeps_serving(tmp_path: Path) -> None:
    digits = load_digits()
    camera = MjpegServer(digit_frame(digits.data[3]), fps=30).start()
    port = free_port()
    config = f"""
[[streams]]
id = "ipcam"
source = "{camera.url}"
model = "digits"
max_fps = 20
reconnect_s = 0.2
max_reconnect_s = 1.0
sample = {{ on_low_confidence = 1.0, max_per_hour = 2 }}

[[streams]]
id = "tabular"
source = "{camera.url}"
model = "maintenance"

[[streams]]
id = "ghost"
source = "{camera.url}"
model = "no_such_model"

[[streams]]
id = "nowhere"
source = "http://127.0.0.1:9/none.mjpg"
model = "digits"
reconnect_s = 0.2
"""
    proc = start_agent(config, tmp_path / "data", port)
    url = f"127.0.0.1:{port}"
    stop, codes = threading.Event(), []
    client = threading.Thread(target=_infer_forever, args=(url, stop, codes))
    try:
        first = wait_for(lambda: get_json(url, "/agent/streams/ipcam/latest")[0] == 200, 30, "a first result")
        assert first
        latest = get_json(url, "/agent/streams/ipcam/latest")[1]
        assert latest["result"]["classes"][0]["label"] == "3" and latest["frame_size"] == [128, 128]
        client.start()
        camera.stop()
        down = wait_for(lambda: (s := _stream(url, "ipcam"))["state"] == "reconnecting" and s, 30, "reconnecting")
        assert "stopped delivering frames" in down["last_error"] or "cannot open" in down["last_error"]
        seen = get_json(url, "/agent/streams/ipcam/latest")[1]["frame"]
        camera.start()  # same port: the camera comes back
        # More frames than the one the slot may still have held when the camera went away.
        wait_for(lambda: get_json(url, "/agent/streams/ipcam/latest")[1]["frame"] > seen + 5, 30, "frames again")
        back = _stream(url, "ipcam")
        assert back["state"] == "running" and back["reconnects"] >= 1 and back["last_error"] is None, (down, back)
        # The bad streams are marked with their reasons; nothing else is affected.
        tab = wait_for(lambda: (s := _stream(url, "tabular"))["state"] == "failed" and s, 30, "tabular failed")
        assert "not an image model" in tab["last_error"]
        ghost = wait_for(lambda: (s := _stream(url, "ghost"))["state"] == "failed" and s, 30, "ghost failed")
        assert "unknown model 'no_such_model'" in ghost["last_error"]
        nowhere = _stream(url, "nowhere")
        assert nowhere["state"] == "reconnecting" and "cannot open" in nowhere["last_error"]
        assert get_json(url, "/agent/streams/nope/latest") == (404, {"error": "unknown stream 'nope' (configured: "
                                                                    "['ghost', 'ipcam', 'nowhere', 'tabular'])"})  # fmt: skip
        assert get_json(url, "/agent/streams/nowhere/latest")[0] == 503
        status = get_json(url, "/agent/status")[1]
        assert [s["id"] for s in status["streams"]] == ["ipcam", "tabular", "ghost", "nowhere"]
        metrics = http.client.HTTPConnection(*url.split(":"), timeout=10)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        assert 'edgefleet_stream_frames_total{outcome="processed",stream="ipcam"}' in text
        assert 'edgefleet_stream_source_state{state="failed",stream="tabular"} 1.0' in text
        # An open SSE feed ends cleanly on SIGTERM: the drain does not wait for (or cut off) its client.
        feed = http.client.HTTPConnection(*url.split(":"), timeout=30)
        feed.request("GET", "/agent/streams/ipcam/events")
        events = feed.getresponse()
        frames = []
        for _ in range(3):  # the newest result first, then one event per processed frame
            assert events.readline() == b"event: result\n"
            frames.append(json.loads(events.readline().removeprefix(b"data: "))["frame"])
            assert events.readline() == b"\n"
        assert frames == sorted(set(frames)), frames
        stop.set()
        client.join(30)
        proc.terminate()
        assert proc.wait(30) == 0
        events.read()  # a feed cut off by the server's forced exit raises IncompleteRead here
    finally:
        stop.set()
        camera.stop()
        if proc.poll() is None:
            proc.kill()
    assert codes and set(codes) == {200}, f"{len(codes)} requests, codes {set(codes)}"
    # Frames sampled into the telemetry outbox: every frame is below confidence 1.0, capped at 2 an hour.
    outbox = Outbox(tmp_path / "data" / DB_FILE)
    predictions = [json.loads(body) for _, kind, _, body in outbox.read_after(0, 10**8) if kind == "prediction"]
    samples = [b for b in predictions if "stream" in b]  # the others are the HTTP requests' records
    outbox.close()
    assert [(b["stream"], b["sample_reason"]) for b in samples] == [("ipcam", "low_confidence")] * 2
    assert all(b["inputs"]["frame"]["shape"] == [128, 128, 3] for b in samples)


def test_an_agent_without_streams_never_loads_opencv(tmp_path: Path) -> None:
    port = free_port()
    proc = start_agent("", tmp_path / "data", port)
    url = f"127.0.0.1:{port}"
    try:
        assert get_json(url, "/agent/streams") == (200, {"streams": []})
        assert get_json(url, "/agent/streams/cam/latest")[0] == 404
        assert _infer(url) == 200
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "cv2" not in maps and "opencv" not in maps.lower()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
