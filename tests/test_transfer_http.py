"""Publishing artifacts as retained chunks, and fetching them over HTTP(S) Range with MQTT as the fallback.

A real mosquitto and a real local HTTP server: only missing chunks are fetched, and a failing server
falls back to the chunks on the broker.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from cloud_batch.fleetops.publish import clear_artifact, publish_artifact
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import Artifact
from edge_agent.wire.topics import chunk_filter, parse_chunk_topic
from tests.support.transfer import KIB, chunk_of


# -- publisher --------------------------------------------------------------------------
def retained_chunks(link: MqttLink, sha: str, timeout: float = 10) -> dict[int, bytes]:
    """The retained chunks a fresh subscriber gets for ``sha``; a marker published after the
    SUBSCRIBE on the same connection arrives after every retained message, so none is missed."""
    got: dict[int, bytes] = {}
    done = threading.Event()
    marker = chunk_filter(sha).replace("+", f"end-marker-{os.getpid()}")  # under the filter, not a chunk

    def on(topic: str, payload: bytes, retained: bool) -> None:
        if topic == marker:
            done.set()
        elif payload and (chunk := parse_chunk_topic(topic)) is not None:
            got[chunk[1]] = payload

    link.subscribe(chunk_filter(sha), on)
    link.publish(marker, b"end", qos=1)
    assert done.wait(timeout), "marker never arrived"
    link.unsubscribe(chunk_filter(sha))
    return got


def test_publish_and_clear_artifact(mk_link) -> None:
    pub = mk_link()
    blob = os.urandom(500_000)
    art = publish_artifact(pub, blob, 64 * KIB, url="https://cdn.example/a.tar")
    assert art.url == "https://cdn.example/a.tar" and art.size == len(blob)
    got = retained_chunks(mk_link(), art.sha256)
    assert b"".join(got[i] for i in sorted(got)) == blob and sorted(got) == list(range(len(art.chunks)))

    clear_artifact(pub, art)
    assert retained_chunks(mk_link(), art.sha256) == {}


# -- HTTP(S) Range transport --------------------------------------------------------
class ArtifactServer(http.server.ThreadingHTTPServer):
    """A real local HTTP server for one blob: ``mode`` = range (206), full (ignores Range) or error (503)."""

    def __init__(self, blob: bytes, mode: str) -> None:
        self.blob, self.mode, self.ranges = blob, mode, []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/artifact.tar"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ArtifactServer

    def do_GET(self) -> None:
        srv = self.server
        if srv.mode == "error":
            self.send_error(503)
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if srv.mode == "range" and m:
            a, b = int(m.group(1)), min(int(m.group(2)), len(srv.blob) - 1)
            srv.ranges.append((a, b))
            body = srv.blob[a : b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(srv.blob)}")
        else:
            body = srv.blob
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("mode", ["range", "full"])
def test_http_fetches_only_missing_chunks(mk_link, tmp_path: Path, mode: str) -> None:
    blob = os.urandom(1_000_000)
    srv = ArtifactServer(blob, mode)
    try:
        art = Artifact.from_blob(blob, 64 * KIB, url=srv.url)  # nothing on MQTT: HTTP must do it all
        total = len(art.chunks)
        store = ChunkStore(tmp_path, art)
        for i in range(0, total, 3):
            store.put(i, chunk_of(blob, art, i))
        already = store.count()
        dl = Downloader(mk_link(), store)
        assert dl.run(timeout_s=30).read_bytes() == blob
        s = dl.stats
        assert s.http_chunks == s.chunks_received == total - already and s.receipts == {} and s.http_errors == 0
        if mode == "range":  # one request per run of consecutive missing chunks, nothing already on disk
            cs = art.chunk_size
            runs = [(i * cs, min((i + 2) * cs, len(blob)) - 1) for i in range(1, total, 3)]
            assert srv.ranges == runs
    finally:
        srv.close()


def test_http_failure_falls_back_to_mqtt(mk_link, tmp_path: Path) -> None:
    blob = os.urandom(500_000)
    srv = ArtifactServer(blob, "error")
    try:
        art = publish_artifact(mk_link(), blob, 64 * KIB, url=srv.url)
        dl = Downloader(mk_link(), ChunkStore(tmp_path, art))
        assert dl.run(timeout_s=30).read_bytes() == blob
        s = dl.stats
        assert s.http_errors == 1 and s.http_chunks == 0 and s.chunks_received == len(art.chunks)
        assert s.receipts == {i: 1 for i in range(len(art.chunks))}
    finally:
        srv.close()
