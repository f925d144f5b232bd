"""A real ``UpdateMachine`` on a real ``ModelStore``, its other seams faked: fetcher, validator, server, clocks.

``Rig`` holds digits 1 active and a packed candidate digits 2, with a machine wired to the fakes, so every
path of the state machine runs in milliseconds. Shared by ``tests/test_update.py`` and
``tests/test_update_policy.py``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import OtaConfig
from edge_agent.errors import FailedError, NotFoundError
from edge_agent.models.store import ModelStore
from edge_agent.update.machine import UpdateMachine
from edge_agent.update.seams import Seams
from edge_agent.update.states import UpdateRecord
from edge_agent.wire.model.manifest import MANIFEST_FILE
from edge_agent.wire.policy import Policy
from edge_agent.wire.protocol import Artifact, Release, pack_dir


def make_version(src: Path, out: Path, version: str) -> Path:
    """A copy of a version directory relabelled as ``version`` (same model file, so still valid)."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copyfile(f, out / f.name)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["version"] = version
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


class FakeModel:
    def __init__(self, version: str) -> None:
        self.version = version
        self.calls = 0
        self.failures = 0


class FakeServer:
    """Serves whatever the store's pointer says, as the real server's hot swap does after ``sync``."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.models: dict[str, FakeModel] = {}

    def sync(self) -> None:
        for name, version in self.store.active_map().items():
            if name not in self.models or self.models[name].version != version:
                self.models[name] = FakeModel(version)

    def get(self, name: str) -> FakeModel:
        if name not in self.models:
            raise NotFoundError(name)
        return self.models[name]

    def errors(self) -> dict[str, Any]:
        return {}


class FakeFetcher:
    """Writes the artifact's bytes where the downloader would; can fail or crash on demand."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.failures_left = 0
        self.calls = 0
        self.discarded: list[str] = []

    def fetch(self, artifact: Artifact, out_path: Path, stop: threading.Event) -> Path:
        self.calls += 1
        if self.failures_left:
            self.failures_left -= 1
            raise FailedError("broker unreachable")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(self.blobs[artifact.sha256])
        return out_path

    def discard(self, artifact: Artifact) -> None:
        self.discarded.append(artifact.sha256)


class FakeClock:
    """Wall and monotonic time that advance only when the machine waits; hooks run on every wait."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0
        self.hooks: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def wait(self, event: threading.Event, seconds: float) -> bool:
        self.wall += seconds
        self.mono += seconds
        for hook in list(self.hooks):
            hook()
        return event.is_set()


def local_time(hour: int, minute: int = 0) -> float:
    t = time.localtime()
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, hour, minute, 0, 0, 0, -1))


class Rig:
    """A store with digits 1 active, a candidate digits 2 packed, and a machine wired to fakes."""

    def __init__(self, tmp_path: Path, digits_dir: Path, **policy: Any) -> None:
        self.data = tmp_path / "data"
        self.store = ModelStore(self.data)
        self.store.install_dir(digits_dir, verify=False)
        self.server = FakeServer(self.store)
        self.server.sync()
        self.blob = pack_dir(make_version(digits_dir, tmp_path / "v2", "2"))
        self.artifact = Artifact.from_blob(self.blob, 4096)
        self.fetcher = FakeFetcher({self.artifact.sha256: self.blob})
        self.clock = FakeClock(local_time(12))
        self.validated: list[Path] = []
        self.validate_error: Exception | None = None
        self.changes: list[tuple[str, str | None]] = []
        policy.setdefault("health_window_s", 5.0)
        self.release = Release(
            release_id="digits-2-r1",
            fleet="f",
            name="digits",
            version="2",
            artifact=self.artifact,
            policy=Policy(**policy),
        )
        self.machine = self.make_machine()

    def validate(self, path: Path, max_latency_ms: float | None, stop: threading.Event) -> dict[str, Any]:
        self.validated.append(path)
        if self.validate_error is not None:
            raise self.validate_error
        return {"ok": True, "p50_ms": 0.5}

    def make_machine(self, health: Any = None, **kwargs: Any) -> UpdateMachine:
        seams = Seams(
            store=self.store,
            server=self.server,
            fetcher=self.fetcher,
            validate=self.validate,
            now=self.clock.now,
            monotonic=self.clock.monotonic,
            wait=self.clock.wait,
            health=health,
        )
        kwargs.setdefault("poll_s", 1.0)
        kwargs.setdefault("retry_backoff_s", 0.1)
        config = OtaConfig(**kwargs)
        return UpdateMachine(self.data, seams, config, on_change=lambda r: self.changes.append((r.state, r.result)))

    def record(self) -> UpdateRecord:
        return self.machine.create(self.release, self.release.to_dict())

    def on_disk(self) -> UpdateRecord:
        record = self.machine.records.load("digits")
        assert record is not None
        return record

    def states(self) -> list[str]:
        return [s for s, _ in self.on_disk().history]
