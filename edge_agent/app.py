"""Wiring for ``edge-agent run``: config → store, feature cache → model server → HTTP API (+ OTA), SIGTERM drain.

This is the one place that knows how the parts fit; each part stays usable on its own. It also
applies the process-level limits: the data dir is made private (0700: the feature cache, keys and
update records inside are readable by the agent's user only), a ``unix:`` socket gets
``http.socket_mode`` (0660), and uvicorn runs with ``http.limit_concurrency`` (capped below the
fd limit), the keep-alive timeout and ``http.guard``'s read timeout and idle-connection eviction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from edge_agent import __version__
from edge_agent.config import AgentConfig, socket_mode
from edge_agent.errors import EdgeError
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.http.app import create_app
from edge_agent.http.guard import guarded_protocol
from edge_agent.http.metrics import Metrics
from edge_agent.inference.interpreter import default_backend
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.telemetry import DriftMonitor, Telemetry
from edge_agent.wire.manifest import MANIFEST_FILE

log = logging.getLogger("edge_agent")

BOOTSTRAP_MARKER = ".bootstrapped"
FD_RESERVE = 64  # file descriptors kept free of client connections (models, SQLite, MQTT, the watcher)


def install_shipped_models(store: ModelStore, models_dir: Path | None, data_dir: Path) -> list[str]:
    """On the first start only, install every version found in the shipped registry folder."""
    marker = Path(data_dir) / BOOTSTRAP_MARKER
    if marker.exists() or models_dir is None or not Path(models_dir).is_dir():
        return []
    installed = []
    for manifest_path in sorted(Path(models_dir).glob(f"*/*/{MANIFEST_FILE}")):
        try:
            m = store.install_dir(manifest_path.parent)
            installed.append(f"{m.name}:{m.version}")
        except EdgeError as exc:
            log.error("shipped model %s not installed: %s", manifest_path.parent, exc)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    return installed


class Agent:
    """The long-running service: owns the store, the feature cache, the model server and the API app."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        make_private_dir(Path(cfg.data_dir))
        self.store = ModelStore(cfg.data_dir, keep=cfg.keep_versions, fleet_key=cfg.ota.fleet_key)
        self.features = open_feature_cache(cfg)
        self.server = ModelServer(self.store, cfg.runtime.options())
        self.metrics = Metrics()
        self.metrics.watch(self.server)
        self.telemetry = open_telemetry(cfg, self.metrics)
        self._seen_events: dict[str, tuple[Any, ...]] = {}
        self.app = create_app(
            self.server,
            max_body_bytes=cfg.max_body_bytes,
            metrics=self.metrics,
            status=self.status,
            features=self.features,
            max_elements=cfg.http.max_tensor_elements,
            telemetry=self.telemetry,
        )
        self._uvicorn: Any = None
        self._stop_requested = False
        self.link: Any = None
        self.ota: Any = None
        if cfg.mqtt.broker:
            self._setup_ota()

    def _setup_ota(self) -> None:
        """Connect the OTA pipeline: MQTT link (with its last will), trusted keys, the update agent."""
        from edge_agent.mqtt.link import MqttLink, TlsConfig
        from edge_agent.update.coordinator import OtaAgent, will_for
        from edge_agent.wire.signing import load_public_key

        m = self.cfg.mqtt
        device_id = m.device_id or socket.gethostname().split(".")[0]
        tls = TlsConfig(m.ca_file, m.cert_file, m.key_file) if (m.ca_file or m.cert_file or m.key_file) else None
        self.link = MqttLink(
            m.broker or "",
            client_id=f"edgefleet-{m.fleet}-{device_id}",
            tls=tls,
            will=will_for(m.fleet, device_id),
            keepalive=m.keepalive_s,
            max_packet_bytes=self.cfg.ota.max_message_bytes,
        )
        self.ota = OtaAgent(
            self.link,
            self.store,
            self.server,
            self.cfg.data_dir,
            device_id,
            m.fleet,
            [load_public_key(p) for p in m.trust],
            options=self.cfg.ota,
            metrics=self.metrics.registry,
            runtime_options=self.cfg.runtime.options(),
            features=self.features,
            groups=m.groups,
        )
        if self.telemetry is not None:
            self.ota.publisher.drift = self.telemetry.drift_summary
            self.telemetry.on_drift_change = self.ota.publisher.publish
            t = self.cfg.telemetry
            self.telemetry.attach(self.link, m.fleet, device_id, max_bps=t.max_bps, resend_timeout_s=t.resend_timeout_s)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop accepting, drain in-flight requests, exit 0 (also during start-up)."""

        def handle(signum: int, frame: Any) -> None:
            if self._uvicorn is not None:
                if self._uvicorn.should_exit and signum == signal.SIGINT:
                    self._uvicorn.force_exit = True  # a second Ctrl-C skips the drain
                self._uvicorn.should_exit = True
            self._stop_requested = True
            log.info("received %s; draining", signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handle)

    def prepare(self) -> None:
        """Recover the store after any crash, install shipped models on first start, load and start watching."""
        self.store.recover()
        shipped = install_shipped_models(self.store, self.cfg.models_dir, Path(self.cfg.data_dir))
        if shipped:
            log.info("installed shipped models: %s", ", ".join(shipped))
        if self.ota is not None:
            self.ota.before_serving()  # a candidate that crashed the agent at every start is rolled back here
        self.server.sync()
        self.server.start(self.cfg.watch_interval_s)
        if self.telemetry is not None:
            self.telemetry.event("restart", agent_version=__version__, pid=os.getpid())
            self.telemetry.poll = self._telemetry_events
            self.telemetry.start()
        if self.ota is not None:
            self.link.start()  # connects in the background; serving never waits for the broker
            self.ota.start()  # resumes any update a crash interrupted, then subscribes

    def status(self) -> dict[str, Any]:
        return {
            "agent": {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 1)},
            "runtime": {"backend": (self.server.options.backend or default_backend()).name},
            "data_dir": str(self.cfg.data_dir),
            "listen": self.cfg.listen,
            "broker": {"url": self.cfg.mqtt.broker, "connected": bool(self.link and self.link.connected)}
            if self.cfg.mqtt.broker
            else None,
            "ota": self.ota.device_state().to_dict() if self.ota is not None else None,
            **self.server.status(),
            "store": self.store.list(),
            "features": self._feature_sets(),
            "telemetry": self.telemetry.status() if self.telemetry is not None else None,
        }

    def _telemetry_events(self) -> list[tuple[str, dict[str, Any]]]:
        """New model load errors and finished updates since the last poll, as telemetry events."""
        found: dict[str, tuple[tuple[Any, ...], str, dict[str, Any]]] = {}
        for name, e in self.server.errors().items():
            found[f"load:{name}"] = (
                (e.version, e.reason),
                "load_error",
                {"model": name, "version": e.version, "reason": e.reason},
            )
        if self.ota is not None:
            for key, r in self.ota.device_state().updates.items():
                if r.result is not None:
                    fields = {"model": r.name, "version": r.version, "release_id": r.release_id, "state": r.state,
                              "result": r.result, "reason": r.reason}  # fmt: skip
                    found[f"update:{key}"] = ((r.release_id, r.result, r.at), "update", fields)
        out = []
        for key, (ident, type_, fields) in found.items():
            if self._seen_events.get(key) != ident:
                self._seen_events[key] = ident
                out.append((type_, fields))
        return out

    def _feature_sets(self) -> list[dict[str, Any]] | None:
        if self.features is None:
            return None
        try:
            return [s.to_dict() for s in self.features.list_sets()]
        except EdgeError as exc:
            return [{"error": str(exc)}]

    def serve(self) -> None:
        """Serve HTTP until SIGTERM/SIGINT; in-flight requests are drained before returning."""
        addr = self.cfg.listen_address()
        h = self.cfg.http
        kwargs: dict[str, Any] = dict(
            log_level=self.cfg.log_level.lower() if self.cfg.log_level.lower() != "info" else "warning",
            access_log=False,
            lifespan="off",
            http=guarded_protocol(h.read_timeout_s),
            loop="uvloop" if _has_uvloop() else "asyncio",
            timeout_graceful_shutdown=30,
            limit_concurrency=connection_limit(h.limit_concurrency),
            timeout_keep_alive=h.keep_alive_timeout_s,
        )
        sockets: list[socket.socket] | None = None
        if isinstance(addr, str):
            sockets = [bind_unix(addr, socket_mode(h.socket_mode))]
            config = uvicorn.Config(self.app, **kwargs)
            log.info("listening on unix:%s", addr)
        else:
            config = uvicorn.Config(self.app, host=addr[0], port=addr[1], **kwargs)
            log.info("listening on http://%s:%d", *addr)
        self._uvicorn = _Server(config)
        try:
            if not self._stop_requested:
                self._uvicorn.run(sockets=sockets)
        finally:
            if self.ota is not None:
                self.ota.stop()
                self.link.stop()
            self.server.stop()
            if self.telemetry is not None:
                self.telemetry.stop()
            if self.features is not None:
                self.features.close()
            log.info("stopped")


def open_feature_cache(cfg: AgentConfig) -> FeatureCache | None:
    """``<data-dir>/features.db`` with the ``[features]`` bounds; None (logged) if it cannot be opened.

    Models without feature joins must keep serving when the cache file is unusable, so this
    does not stop the agent: joins answer 503 and feature releases are not taken until it is fixed.
    """
    f = cfg.features
    try:
        return FeatureCache(
            Path(cfg.data_dir) / DB_FILE, max_rows=f.max_rows, max_bytes=f.max_bytes, synchronous=f.synchronous
        )
    except EdgeError as exc:
        log.error("feature cache unavailable, serving without it: %s", exc)
        return None


def open_telemetry(cfg: AgentConfig, metrics: Metrics) -> Telemetry | None:
    """``<data-dir>/telemetry.db`` with the ``[telemetry]`` and ``[drift]`` settings; None when off or unusable.

    Like the feature cache, a broken outbox must not stop serving: it is logged and telemetry is off.
    """
    t, d = cfg.telemetry, cfg.drift
    if not t.enabled and not t.models:
        return None
    drift = DriftMonitor(window=d.window, window_s=d.window_s, watch=d.watch, alert=d.alert) if d.enabled else None
    try:
        return Telemetry(
            cfg.data_dir,
            registry=metrics.registry,
            policy=t.policy,
            flush_interval_s=t.flush_interval_ms / 1000.0,
            max_rows=t.max_rows,
            max_bytes=t.max_bytes,
            drift=drift,
            state_top=d.state_top,
        )
    except EdgeError as exc:
        log.error("telemetry outbox unavailable, serving without telemetry: %s", exc)
        return None


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (it re-raises SIGTERM after the drain: exit -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700 when this user owns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def connection_limit(configured: int) -> int:
    """``http.limit_concurrency``, lowered so client connections cannot use the last ``FD_RESERVE`` fds."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(2, min(configured, soft - FD_RESERVE))


def bind_unix(path: str, mode: int) -> socket.socket:
    """A unix stream socket bound at ``path`` with ``mode`` (uvicorn's own ``uds`` forces 0666)."""
    if os.path.exists(path) and _is_socket(path):
        os.unlink(path)  # a stale socket from a previous run
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)  # nobody can connect before listen(), which uvicorn calls after this chmod
    os.chmod(path, mode)
    return sock


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
