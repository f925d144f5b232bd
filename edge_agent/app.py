"""Wiring for ``edge-agent run``: config → store, feature cache → model server → HTTP API (+ OTA), SIGTERM drain.

This is the one place that knows how the parts fit; each part stays usable on its own. It also applies the
process-level limits: the data dir is made private (0700: the feature cache, keys and update records inside are
readable by the agent's user only), a ``unix:`` socket gets ``http.socket_mode`` (0660), and uvicorn runs with
``http.limit_concurrency`` (capped below the fd limit), the keep-alive timeout and ``http.guard``'s read timeout and
idle-connection eviction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from edge_agent import __version__, sdnotify
from edge_agent.config import AgentConfig, socket_mode
from edge_agent.errors import EdgeError
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.heartbeat import Heartbeat
from edge_agent.http.app import create_app
from edge_agent.http.ext.repository import control_allowed
from edge_agent.http.guard import guarded_protocol
from edge_agent.http.metrics import Metrics
from edge_agent.inference.interpreter import default_backend
from edge_agent.models.serving import ModelServer
from edge_agent.models.shipped import install_shipped_models
from edge_agent.models.store import ModelStore
from edge_agent.streams import open_streams
from edge_agent.telemetry import DriftMonitor, Telemetry
from edge_agent.update.agent import liveness
from edge_agent.update.agent.slots import RESTART_EXIT
from edge_agent.update.agent.watch import open_slot_watch

if TYPE_CHECKING:
    from edge_agent.mqtt.link import MqttLink
    from edge_agent.update.coordinator import OtaAgent
from edge_agent.update.shadow.local import LocalShadows
from edge_agent.update.shadow.verdict import ShadowHost

log = logging.getLogger("edge_agent")

FD_RESERVE = 64  # file descriptors kept free of client connections (models, SQLite, MQTT, the watcher)


class Agent:
    """The long-running service: owns the store, the feature cache, the model server and the API app."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        make_private_dir(Path(cfg.data_dir))
        self.store = ModelStore(cfg.data_dir, keep=cfg.keep_versions, fleet_key=cfg.ota.fleet_key)
        self.features = open_feature_cache(cfg)
        self.server = ModelServer(self.store, cfg.runtime.options())
        self.local_shadows = LocalShadows(cfg.data_dir, self.store, ShadowHost.of(self.store, self.server))
        self.metrics = Metrics()
        self.metrics.watch(self.server)
        self.telemetry = open_telemetry(cfg, self.metrics)
        self._seen_events: dict[str, tuple[Any, ...]] = {}
        self.streams = open_streams(cfg.streams, self.server, self.metrics.registry, self.telemetry)  # None: no streams
        self.app = create_app(
            self.server,
            max_body_bytes=cfg.max_body_bytes,
            metrics=self.metrics,
            status=self.status,
            features=self.features,
            max_elements=cfg.http.max_tensor_elements,
            telemetry=self.telemetry,
            streams=self.streams,
            batching=cfg.batching(),
            repository_control=control_allowed(cfg.listen, cfg.allow_repository_control),
        )
        self._uvicorn: _Server | None = None
        self._stop_requested = False
        self.link: MqttLink | None = None  # with ota: set up when a broker is configured (paho imported only then)
        self.ota: OtaAgent | None = None
        status = lambda: liveness.status_line(self.server, self.link, self.ota)  # noqa: E731
        self.heartbeat = Heartbeat(sdnotify.notify, sdnotify.watchdog_period_s(), status=status)
        self.exit_code = 0  # RESTART_EXIT when the agent slot changed (self-update, docs/deploy.md)
        healthy = lambda: liveness.healthy(self.server, bool(self._uvicorn and self._uvicorn.started), self.link)  # noqa: E731
        self.slot_watch = open_slot_watch(cfg, healthy, self.request_restart)
        if self.slot_watch is not None:
            self.slot_watch.start()
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
        if self.streams is not None:
            self.streams.attach(self.link, m.fleet, device_id)
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
        if self.slot_watch is not None:  # a frozen agent in A/B slots also takes releases of itself (kind "agent")
            liveness.attach_self_update(self.ota, self.slot_watch, self.request_restart, self.cfg.agent_update)
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
            if self.streams is not None:
                self.streams.closing.set()  # SSE feeds end, so the drain does not wait for their clients
            sdnotify.notify("STOPPING=1", "STATUS=draining")
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
        self.local_shadows.start()  # `edge-agent models shadow` requests, a pending one resumed
        if self.streams is not None:
            self.streams.start()
        if self.telemetry is not None:
            self.telemetry.event("restart", agent_version=__version__, pid=os.getpid())
            self.telemetry.poll = self._telemetry_events
            self.telemetry.start()
        if self.ota is not None and self.link is not None:
            self.link.start()  # connects in the background; serving never waits for the broker
            self.ota.start()  # resumes any update a crash interrupted, then subscribes
            self.ota.on_tick = self.heartbeat.register("update loop")

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
            "agent_update": self.slot_watch.slots.status() if self.slot_watch is not None else None,
            **self.server.status(),
            "store": self.store.list(),
            "features": self._feature_sets(),
            "telemetry": self.telemetry.status() if self.telemetry is not None else None,
            "streams": self.streams.status() if self.streams is not None else None,
        }

    def request_restart(self, reason: str) -> None:
        """Drain and exit ``RESTART_EXIT`` so that systemd starts the agent slot ``current`` points at."""
        self.exit_code = RESTART_EXIT
        sdnotify.notify("STOPPING=1", f"STATUS=restarting: {reason}")
        self._stop_requested = True
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def _listening(self) -> None:
        """On the event loop once the API listens: beat from the loop, start the pings, then READY=1."""
        self.heartbeat.start_on_loop("event loop")
        sdnotify.notify("READY=1")

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
        self._uvicorn.on_started = self._listening
        try:
            if not self._stop_requested:
                self._uvicorn.run(sockets=sockets)
        finally:
            self.heartbeat.stop()
            if self.ota is not None and self.link is not None:
                self.ota.stop()
                self.link.stop()
            if self.streams is not None:
                self.streams.stop()
            self.local_shadows.stop()
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
            quotas=t.quotas(),
            paced=t.paced(),
            tick_s=t.min_flush_interval_s(),
            writer=t.writer,
        )
    except EdgeError as exc:
        log.error("telemetry outbox unavailable, serving without telemetry: %s", exc)
        return None


class _Server(uvicorn.Server):
    """uvicorn without its signal handling (it re-raises SIGTERM: exit -15); ``on_started`` runs once listening."""

    on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.on_started is not None and not self.should_exit:
            self.on_started()

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
