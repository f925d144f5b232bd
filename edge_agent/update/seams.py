"""Everything the update machine touches outside itself, as typed seams, and how other threads steer it.

The machine never imports the model store, the model server or MQTT: it is handed objects
that satisfy the Protocols below (the real ``ModelStore``/``ModelServer``/``MqttFetcher``, or
small fakes in ``tests/support/update.py``), so the logic is tested fast and proven elsewhere
with the real parts. ``Control`` is the one handle through which a lane shuts an update down
(resume later) or aborts it (a transition of the table).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.config import OtaConfig
from edge_agent.errors import EdgeError
from edge_agent.features.cache import FeatureCache
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.mqtt.link import MqttLink
from edge_agent.mqtt.sink import ChunkSink
from edge_agent.update.states import FINAL, PRE_ACTIVATION, TRANSITIONS, Event, ModelPointer, State
from edge_agent.wire.protocol import Artifact, Release

if TYPE_CHECKING:
    from edge_agent.models.shadow import ShadowModel
    from edge_agent.models.taps import ModelTaps
    from edge_agent.wire.model.manifest import Manifest

log = logging.getLogger(__name__)


class ServedModel(Protocol):
    """What the health window reads from the serving model (``LoadedModel``)."""

    @property
    def version(self) -> str: ...

    @property
    def calls(self) -> int: ...

    @property
    def failures(self) -> int: ...


class LoadFailure(Protocol):
    """Why a version could not be loaded (``serving.LoadError``)."""

    @property
    def version(self) -> str: ...

    @property
    def reason(self) -> str: ...


class ModelServing(Protocol):
    """The model server as the machine sees it: who serves, and what failed to load."""

    def get(self, name: str) -> ServedModel: ...

    def sync(self) -> object: ...

    def errors(self) -> Mapping[str, LoadFailure]: ...


class ModelSlots(ModelPointer, Protocol):
    """The model store's slots: install beside the active version, switch the pointer, mark good."""

    def active_map(self) -> dict[str, str]: ...

    def versions(self, name: str) -> list[str]: ...

    def install_dir(self, src: Path, *, verify: bool = ...) -> object: ...

    def rollback(self, name: str) -> str: ...

    def mark_good(self, name: str, version: str) -> None: ...

    def manifest(self, name: str, version: str) -> Manifest: ...


class ArtifactFetcher(Protocol):
    """Gets an artifact's bytes onto disk (``MqttFetcher`` over MQTT; a fake in unit tests)."""

    def fetch(self, artifact: Artifact, out_path: Path, stop: threading.Event) -> Path:
        """Download (resuming) and assemble ``artifact`` at ``out_path``, sha256-checked; FailedError to retry."""
        ...

    def discard(self, artifact: Artifact) -> None:
        """Forget partial downloads of ``artifact``."""
        ...


# (version dir, max p50 ms, stop) -> report; raises Rejected… (bad model) or Failed… (e.g. stopped)
Validator = Callable[[Path, "float | None", threading.Event], Mapping[str, Any]]
HealthSource = Callable[[str], "tuple[str | None, int, int]"]  # name -> (serving version, calls, failures)
Admit = Callable[[Release, Mapping[str, Any]], None]  # raises RejectedError when the release may not apply
Wait = Callable[[threading.Event, float], bool]  # sleep up to s seconds; True if the event got set


def event_wait(event: threading.Event, seconds: float) -> bool:
    """The default ``Wait``: sleep on the event, so a shutdown or abort ends the sleep at once."""
    return event.wait(seconds)


def server_health(server: ModelServing) -> HealthSource:
    """Health from a ModelServer: the serving LoadedModel's ``calls``/``failures`` counters."""

    def read(name: str) -> tuple[str | None, int, int]:
        try:
            model = server.get(name)
        except EdgeError:
            return None, 0, 0
        return model.version, model.calls, model.failures

    return read


@dataclass
class Seams:
    """Everything the machine touches outside itself."""

    store: ModelSlots
    server: ModelServing
    fetcher: ArtifactFetcher
    validate: Validator
    admit: Admit | None = None  # re-checked in ``idle``: the device may have changed since the intake
    health: HealthSource | None = None  # default: server_health(server)
    now: Callable[[], float] = time.time  # wall clock: the maintenance window, timestamps
    monotonic: Callable[[], float] = time.monotonic  # the health window, timeouts
    wait: Wait = event_wait
    features: FeatureCache | None = None  # set: releases of kind "features" are applied to this cache
    taps: ModelTaps | None = None  # the request path's figures: shadowing and the health signals (models.taps)
    load: Callable[[str, str], ShadowModel] | None = None  # (name, version) -> what the shadow process loads
    warm: Callable[[], None] | None = None  # called as a download starts: the validator's forkserver starts meanwhile
    cool: Callable[[], None] | None = None  # called when a model update ends: the forkserver stops if no child needs it


class MqttFetcher:
    """``ArtifactFetcher`` over the broker: ``Downloader`` with chunks under ``root``.

    With ``options.chunk_sink`` (the default) it starts the chunk sink (``mqtt.sink``) on its
    first download and keeps it until ``close``; one that cannot start, or died, is logged and
    the download stores its chunks in this process.
    """

    def __init__(self, link: MqttLink, root: Path, options: OtaConfig) -> None:
        self.link = link
        self.root = Path(root)
        self.options = options
        self._sink: ChunkSink | None = None
        self._sink_lock = threading.Lock()

    def fetch(self, artifact: Artifact, out_path: Path, stop: threading.Event) -> Path:
        store = ChunkStore(self.root, artifact)
        dl = Downloader(
            self.link,
            store,
            window=self.options.chunk_window,
            bandwidth_bps=self.options.bandwidth_bps,
            stall_timeout_s=self.options.stall_timeout_s,
            out_path=out_path,
            sink=self.sink(),
        )
        return dl.run(stop=stop, timeout_s=self.options.download_timeout_s)

    def sink(self) -> ChunkSink | None:
        """The running chunk sink (started now if needed), or None when it is off or cannot start."""
        if not self.options.chunk_sink:
            return None
        with self._sink_lock:
            if self._sink is not None and not self._sink.alive:
                log.warning("chunk sink (pid %s) died; starting another", self._sink.pid)
                self._sink.close()
                self._sink = None
            if self._sink is None:
                try:
                    self._sink = ChunkSink()
                except (OSError, EdgeError) as exc:
                    log.warning("chunk sink did not start (%s): chunks are stored in the agent", exc)
            return self._sink

    def close(self) -> None:
        """Stop the chunk sink (the next download starts it again)."""
        with self._sink_lock:
            if self._sink is not None:
                self._sink.close()
                self._sink = None

    def discard(self, artifact: Artifact) -> None:
        ChunkStore(self.root, artifact).discard()


class Control:
    """How other threads steer a running update: shut down (resume later) or abort (a transition)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.interrupt = threading.Event()  # set by both; steps stop waiting when it is set
        self.shutting_down = False
        self.abort_reason: str | None = None
        self.keep_download = False
        self.state: State | None = None

    def shutdown(self) -> None:
        with self.lock:
            self.shutting_down = True
            self.interrupt.set()

    def abort(self, reason: str, *, before_activation_only: bool = False, keep_download: bool = False) -> bool:
        """Ask the update to leave by the ``abort`` event; False when it is past the point this allows."""
        with self.lock:
            if self.state in FINAL or (before_activation_only and self.state not in PRE_ACTIVATION):
                return False
            if (self.state, Event.ABORT) not in TRANSITIONS and self.state is not None:
                return False  # e.g. already rolling back
            self.abort_reason = reason
            self.keep_download = keep_download
            self.interrupt.set()
            return True
