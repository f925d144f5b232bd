"""One worker thread per artifact (a model, or a feature set): its updates one at a time, the newest release winning.

A lane runs what the coordinator has already admitted and let through the rollout gate: it
never calls back into the coordinator. Its collaborators are explicit: the update machine, the
model store (to check a committed update still serves before undoing it) and the agent's stop
event (to pause before resuming after an unexpected error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.update.machine import UpdateMachine
from edge_agent.update.seams import Control, ModelSlots
from edge_agent.update.states import State
from edge_agent.wire.names import parse_version
from edge_agent.wire.protocol import Release

log = logging.getLogger("edge_agent.update.coordinator")


class Lane:
    """One artifact's worker thread (a model, or a feature set): its updates one at a time, newest release winning."""

    def __init__(self, machine: UpdateMachine, store: ModelSlots, stopped: threading.Event, name: str) -> None:
        self.machine = machine
        self.store = store
        self.stopped = stopped
        self.name = name  # the record key: a model name or "features:<set>"
        self.cond = threading.Condition()
        # ("resume", count_load) | ("release", (Release, doc)) | ("rollback", (release_id, reason))
        self.queue: list[tuple[str, Any]] = []
        self.current: Release | None = None
        self.control: Control | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"ota-{name}", daemon=True)
        self.thread.start()

    def busy(self) -> bool:
        with self.cond:
            return bool(self.queue) or self.control is not None

    def pending_version(self) -> str | None:
        """The highest version queued or running here (None: idle)."""
        with self.cond:
            versions = [item[0].version for kind, item in self.queue if kind == "release"]
            if self.current is not None:
                versions.append(self.current.version)
        return max(versions, key=parse_version, default=None)

    def knows(self, release_id: str) -> bool:
        with self.cond:
            return (self.current is not None and self.current.release_id == release_id) or any(
                kind == "release" and item[0].release_id == release_id for kind, item in self.queue
            )

    def put(self, kind: str, item: Any) -> None:
        with self.cond:
            self.queue.append((kind, item))
            self.cond.notify()

    def offer(self, release: Release, doc: Mapping[str, Any]) -> None:
        """Queue ``release``; it replaces a queued one and supersedes a running one not yet activating."""
        with self.cond:
            if self.knows(release.release_id):
                return
            self.queue = [(k, i) for k, i in self.queue if k != "release"]
            self.queue.append(("release", (release, doc)))
            if self.control is not None and self.current is not None:
                same = self.current.artifact.sha256 == release.artifact.sha256
                if self.control.abort(
                    f"superseded by release {release.release_id}", before_activation_only=True, keep_download=same
                ):
                    log.info("update %s (%s): superseded by %s", self.current.release_id, self.name, release.release_id)
            self.cond.notify()

    def abort(self, release_id: str, reason: str) -> bool:
        """Stop ``release_id`` if queued or running here; True when it was."""
        with self.cond:
            before = len(self.queue)
            self.queue = [(k, i) for k, i in self.queue if not (k == "release" and i[0].release_id == release_id)]
            hit = len(self.queue) != before
            if self.current is not None and self.current.release_id == release_id and self.control is not None:
                hit = self.control.abort(reason) or hit  # False once past rolling back / final: see the record
            return hit

    def _saved_release(self) -> Release | None:
        """The release of the saved, unfinished update (so a newer release can supersede a resumed one)."""
        try:
            record = self.machine.records.load(self.name)
            return None if record is None or record.final else record.release_obj
        except EdgeError:
            return None

    def shutdown(self) -> None:
        with self.cond:
            self.stopping = True
            if self.control is not None:
                self.control.shutdown()
            self.cond.notify_all()

    def _loop(self) -> None:
        machine = self.machine
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                kind, item = self.queue.pop(0)
                control = self.control = Control()
                self.current = item[0] if kind == "release" else self._saved_release()
            try:
                if kind == "resume":
                    machine.resume(self.name, control, count_load=bool(item))
                elif kind == "release":
                    release, doc = item
                    machine.run(machine.create(release, doc), control)
                elif kind == "rollback":
                    release_id, reason = item
                    record = machine.records.load(self.name)
                    if (
                        record is not None
                        and record.release_id == release_id
                        and record.state == State.COMMITTED
                        and record.kind == "model"
                        and self.store.active(self.name) == record.version
                    ):
                        machine.rollback_committed(record, reason, control)
            except Exception:
                log.exception("update lane %s: unexpected error; resuming the saved update shortly", self.name)
                if not self.stopped.wait(5.0):
                    self.put("resume", True)
            finally:
                with self.cond:
                    self.control = None
                    self.current = None


class Lanes:
    """The lanes of one agent by record key, created on first use."""

    def __init__(self, machine: UpdateMachine, store: ModelSlots, stopped: threading.Event) -> None:
        self.machine, self.store, self.stopped = machine, store, stopped
        self._lock = threading.Lock()
        self._lanes: dict[str, Lane] = {}

    def get(self, name: str) -> Lane | None:
        with self._lock:
            return self._lanes.get(name)

    def __call__(self, name: str) -> Lane:
        """The lane of ``name``, started if need be."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = Lane(self.machine, self.store, self.stopped, name)
            return lane

    def shutdown(self, deadline: float) -> None:
        """Stop every lane at its update's next step boundary; wait for them until ``deadline`` (monotonic)."""
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.shutdown()
        for lane in lanes:
            lane.thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            self._lanes.clear()
