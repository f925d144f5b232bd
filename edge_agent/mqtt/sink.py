"""The chunk sink: a helper process that verifies and writes a fresh download's chunks.

On 2 cores a transfer that hashes and writes its chunks on a thread of the agent runs at ~2x a
raw MQTT fetch, the same work in another process at ~1.5-1.7x (docs/benchmarks.md, "Crash-safe
transfer"): the paho thread and a second Python thread hand the GIL back and forth once or more
per chunk. So for a fresh, unthrottled download over MQTT (``Downloader``'s whole subscription)
the paho thread only copies each chunk's payload into a free slot of a ring in shared memory (an
anonymous ``memfd`` the helper maps, as the shadow's ring does) and sends slot, index and length.
The helper runs a ``ChunkStore`` on the same directory, with the same rules: a chunk is written
only after its size and hash match the signed artifact, chunks are journaled in group commits,
and assembly moves the data file into place (fsynced).

Two ways back, so that the agent's other threads stay off the GIL while chunks stream in:

- one byte per chunk on an *ack pipe* as its slot is free again; the paho thread reads them only
  when the ring is full (slots are used and freed in order);
- the indices stored (``+i+1``) or rejected (``-(i+1)``) on the connection, every ``REPORT_S``
  and as soon as the store holds every chunk: the downloading thread wakes for those only.

The pipe and the connection are kernel buffers: they order the copy before the helper's read, and
the read before the slot's reuse, on any CPU. Crash semantics are the store's: the journal names
only verified, fdatasynced chunks. If the agent dies, the helper reads EOF and exits at once (or
gets SIGKILL: ``die_with_parent``), keeping what is journaled; if the helper dies, the transfer
fails with a ``TransferError`` and the next attempt resumes from the journal in the agent's own
store. One transfer at a time uses the helper; the agent starts it on its first download and keeps
it (a small process: no numpy, no runtime) until it stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import threading
import time
from array import array
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

from edge_agent.errors import CorruptChunksError, EdgeError, TransferError
from edge_agent.fsutil import shared_memory
from edge_agent.inference.childproc import Child, fd_main
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.wire.artifact import artifact_from_dict

log = logging.getLogger(__name__)

COMMAND = "__chunk_sink__"  # hidden first argument of a frozen edge-agent binary (cli.main)
MODULE = "edge_agent.mqtt.sink"
RING_BYTES = 8 << 20  # the ring: 64 chunks of the default 128 KiB
MIN_SLOTS = 4  # an artifact with larger chunks than RING_BYTES // MIN_SLOTS is stored in the agent
REPORT_S = 0.1  # answers are sent this often while chunks come (and at once when the store is complete)
_CHUNK = struct.Struct("<III")  # slot, index, length


class ChunkSink:
    """The agent's end of the helper process: one ring, one connection, one transfer at a time."""

    def __init__(self, ring_bytes: int = RING_BYTES) -> None:
        """Start the helper (``python -m edge_agent.mqtt.sink``, or the frozen binary) and hand it the ring."""
        self.ring_bytes = ring_bytes
        self._fd = shared_memory(ring_bytes, "edgefleet-chunk-ring")
        self.ring = mmap.mmap(self._fd, ring_bytes)
        self.acks, ack_w = os.pipe()
        self._child = Child(serve, MODULE, COMMAND, "subprocess")
        self.pid = self._child.pid
        self._busy = threading.Lock()
        self.broken = False  # a session found its connection closed
        try:
            self._child.conn.send_bytes(b"J" + json.dumps({"ring": ring_bytes}).encode())
            send_handle(self._child.conn, self._fd, self._child.pid or 0)
            send_handle(self._child.conn, ack_w, self._child.pid or 0)
        except OSError as exc:
            self.close()
            raise TransferError(f"chunk sink did not start: {exc}") from exc
        finally:
            os.close(ack_w)  # the helper's copy is the only one: its death reads as EOF here

    @property
    def alive(self) -> bool:
        return not self.broken and self._child.exitcode is None and not self._child.conn.closed

    def session(self, store: ChunkStore) -> SinkSession | None:
        """A transfer into ``store``'s directory through the helper, or None (busy, dead, or chunks too large)."""
        if store.artifact.chunk_size * MIN_SLOTS > self.ring_bytes or not self.alive:
            return None
        if not self._busy.acquire(blocking=False):
            return None
        try:
            return SinkSession(self, store)
        except BaseException:
            self._busy.release()
            raise

    def kill(self) -> None:
        """SIGKILL the helper (tests: a crash in the middle of a transfer)."""
        self._child.kill()

    def close(self) -> None:
        """Stop the helper (EOF on its connection) and free the ring."""
        self._child.stop(2.0)
        self.ring.close()
        os.close(self._fd)
        os.close(self.acks)


class SinkSession:
    """One transfer through the helper: ``put`` on the paho thread, ``results``/``assemble``/``close`` on the caller's."""

    def __init__(self, sink: ChunkSink, store: ChunkStore) -> None:
        self.sink, self.store, self.artifact = sink, store, store.artifact
        self.conn = sink._child.conn
        self.size = self.artifact.chunk_size
        self.slots = sink.ring_bytes // self.size
        self._free = threading.Lock()  # the slots (taken by ``put`` on the paho thread)
        self._available, self._next = self.slots, 0
        _drain(sink.acks)  # acks of an earlier session's last chunks
        self._send = threading.Lock()
        self._rejected: list[int] = []  # found bad here (larger than a slot), reported with the next results
        self._broken: str | None = None
        self._open, self._sealed, self._assembled = True, False, False  # sealed: no more chunks
        store.close()  # the helper is the directory's only writer until ``close``
        commits = {"commit_bytes": store.commit_bytes, "commit_interval_s": store.commit_interval_s}
        # Not waited for: the helper creates the data file while the first chunks come (a failure ends the transfer).
        self._request(
            {"op": "open", "root": str(store.root), "artifact": self.artifact.to_dict(), **commits}, wait=False
        )

    def put(self, index: int, payload: bytes) -> None:
        """paho thread: copy ``payload`` into a free slot and hand it over; waits while the ring is full.

        A payload larger than a slot is rejected here; any other size is the helper's store's to judge.
        """
        if len(payload) > self.size:
            with self._free:
                self._rejected.append(-(index + 1))
            return
        while True:
            with self._free:
                if self._broken is not None or self._sealed:
                    return
                if self._available:
                    slot, self._next = self._next, (self._next + 1) % self.slots
                    self._available -= 1
                    break
            # The ring is full: wait for the helper to free slots (only this thread reads the acks).
            freed = os.read(self.sink.acks, self.slots)
            with self._free:
                self._available += len(freed)
            if not freed:
                self._gone("EOF")
        start = slot * self.size
        self.sink.ring[start : start + len(payload)] = payload
        try:
            with self._send:  # no chunk follows a control message (``_sealed`` is set under this lock)
                if not self._sealed:
                    self.conn.send_bytes(b"C" + _CHUNK.pack(slot, index, len(payload)))
        except (OSError, ValueError) as exc:
            self._gone(exc)

    def results(self, timeout: float) -> list[tuple[int, bool]]:
        """(index, stored) for chunks the helper answered for (waits up to ``timeout`` for the first)."""
        out: list[int] = []
        try:
            while self.conn.poll(timeout if not out else 0):
                out.extend(self._answers(self.conn.recv_bytes()))
        except (EOFError, OSError) as exc:
            self._gone(exc)
        with self._free:
            out.extend(self._rejected)
            self._rejected.clear()
        if self._broken is not None:
            raise TransferError(self._broken)
        return [(abs(v) - 1, v > 0) for v in out]

    def assemble(self, out_path: Path, keep: bool) -> Path:
        """The helper's ``ChunkStore.assemble`` (its errors raised here as they are in the agent)."""
        try:
            reply = self._request({"op": "assemble", "out": str(out_path), "keep": keep})
        finally:
            self._assembled = True  # the helper closed its store, assembled or not
        return Path(reply["path"])

    def close(self) -> None:
        """The helper commits what is pending and closes its store; the agent's store reads the journal again."""
        if not self._open:
            return
        try:
            if self.sink.alive and not self._assembled:
                self._request({"op": "close"})
        except TransferError as exc:
            log.warning("%s", exc)
        finally:
            self._open, self._sealed = False, True
            self.store.reload()
            self.sink._busy.release()

    def _gone(self, why: object) -> None:
        """The helper's end is closed (it died): no session starts on it again, even before its exit is reaped."""
        self.sink.broken = True
        self._fail(f"chunk sink is gone: {why or 'EOF'}")

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason

    def _answers(self, msg: bytes) -> list[int]:
        if msg[:1] != b"R":  # the reply to "open", or an error storing a chunk
            reply = json.loads(msg[1:]) if msg[:1] == b"J" else {"error": f"chunk sink sent {msg[:20]!r}"}
            if "error" in reply:
                self._fail(str(reply["error"]))
            return []
        got = array("i")
        got.frombytes(msg[1:])
        return list(got)

    def _request(self, body: dict[str, Any], wait: bool = True) -> dict[str, Any]:
        """Send a control message (all but "open" seal the session) and wait for its reply (``wait``).

        What comes before the reply is read as ``results`` would: answers to chunks sent earlier.
        """
        try:
            with self._send:
                self._sealed = self._sealed or body["op"] != "open"
                self.conn.send_bytes(b"J" + json.dumps(body).encode())
            reply: dict[str, Any] = {}
            while wait:
                msg = self.conn.recv_bytes()
                reply = json.loads(msg[1:]) if msg[:1] == b"J" else {}
                if reply.get("op") == body["op"]:
                    break
                self._answers(msg)
        except (EOFError, OSError) as exc:
            self._gone(exc)
            raise TransferError(self._broken or "chunk sink is gone") from exc
        if "corrupt" in reply:
            raise CorruptChunksError(list(reply["corrupt"]))
        if "error" in reply:
            raise TransferError(str(reply["error"]))
        return reply


# -- the helper process -------------------------------------------------------------------
class _Helper:
    def __init__(self, conn: Connection, ring: mmap.mmap, acks: int) -> None:
        self.conn, self.view, self.acks = conn, memoryview(ring), acks
        self.store: ChunkStore | None = None
        self.answers = array("i")
        self.due = 0.0  # when the pending answers are sent at the latest

    def chunk(self, msg: bytes) -> None:
        slot, index, n = _CHUNK.unpack_from(msg, 1)
        try:
            store = self.store
            if store is None:  # its "open" failed: the agent ends the transfer
                raise TransferError("chunk sink: a chunk before 'open'")
            start = slot * store.artifact.chunk_size
            ok = 0 <= index < store.total and store.put(index, self.view[start : start + n])
        finally:
            os.write(self.acks, b"\x01")  # the slot is free again, whatever became of the chunk
        if not self.answers:
            self.due = time.monotonic() + REPORT_S
        self.answers.append(index + 1 if ok else -(index + 1))
        if store.complete:
            self.flush()

    def flush(self) -> None:
        if self.answers:
            self.conn.send_bytes(b"R" + self.answers.tobytes())
            self.answers = array("i")

    def wait(self) -> bytes:
        """The next message; pending answers are sent when they are due meanwhile. EOF: the agent is gone."""
        while self.answers and not self.conn.poll(max(0.0, self.due - time.monotonic())):
            self.flush()
        return self.conn.recv_bytes()

    def control(self, body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if op == "open":
            fresh = ChunkStore(
                body["root"],
                artifact_from_dict(body["artifact"]),
                commit_bytes=int(body["commit_bytes"]),
                commit_interval_s=float(body["commit_interval_s"]),
            )
            try:
                fresh.prepare()
            except BaseException:
                with contextlib.suppress(TransferError):
                    fresh.close()
                raise  # not kept: the failed transfer's later chunks find no store and only free their slots
            self.store = fresh
            return {}
        store = self.store
        if store is None:
            raise TransferError(f"chunk sink: {op!r} before 'open'")
        self.store = None  # "assemble" and "close" both end the session
        if op == "close":
            store.close()
            return {}
        try:
            if op != "assemble":
                raise TransferError(f"chunk sink: unknown op {op!r}")
            return {"path": str(store.assemble(body["out"], keep=bool(body["keep"])))}
        finally:
            with contextlib.suppress(TransferError):  # what assembly raised is the answer
                store.close()


def serve(conn: Connection) -> None:
    """The helper's loop: the ring and the ack pipe first, then chunks and control messages until EOF."""
    first = json.loads(conn.recv_bytes()[1:])
    ring = mmap.mmap(recv_handle(conn), int(first["ring"]))
    helper = _Helper(conn, ring, recv_handle(conn))
    while True:
        try:
            msg = helper.wait()
        except (EOFError, OSError):
            os._exit(0)  # the agent is gone: keep what is journaled, as a kill -9 of both would
        body: dict[str, Any] = {}
        try:
            if msg[:1] == b"C":
                helper.chunk(msg)
                continue
            helper.flush()
            body = json.loads(msg[1:])
            reply = {"op": body.get("op"), **helper.control(body)}
        except CorruptChunksError as exc:
            reply = {"op": body.get("op"), "corrupt": exc.indices}
        except (EdgeError, OSError, ValueError, KeyError) as exc:  # for a chunk: a disk error, told now
            helper.flush()
            reply = {"op": "chunk" if msg[:1] == b"C" else body.get("op"), "error": str(exc)}
        conn.send_bytes(b"J" + json.dumps(reply).encode())


def _drain(fd: int) -> None:
    os.set_blocking(fd, False)
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.mqtt.sink --fd N``: serve on the inherited descriptor."""
    return fd_main(argv, MODULE, "Verify and write a download's chunks for the agent (started by it).", serve)


if __name__ == "__main__":
    raise SystemExit(main())
