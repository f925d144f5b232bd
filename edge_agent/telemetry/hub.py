"""``Telemetry``: the outbox, the recorder, drift and the uploader on one background thread, with metrics.

The thread flushes the recorder every ``flush_interval_s`` (the power-loss window) and, when a
broker link is attached, steps the uploader in between. Events (update results, load errors,
restarts) are queued by any thread with :meth:`Telemetry.event` and committed by the next flush.

``writer="thread"`` (the agent's default, ``[telemetry] writer``) builds and commits rows on this
thread (``writer.local.LocalWriter``); ``"process"`` hands each flush to a writer process that owns
the outbox (``telemetry.writer.remote``), falling back to the thread after repeated deaths.

Metrics (in the API's registry)::

    edgefleet_outbox_dropped_total{kind}            records dropped by the bound or a full queue
    edgefleet_outbox_rows                           rows waiting for the cloud's ack
    edgefleet_telemetry_writer_restarts_total       writer processes lost (restarted, or the fallback)
    edgefleet_drift_psi{model,version,feature}      PSI of the newest closed window (feature
                                                    "output:<name>" for an output's classes)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge_agent.errors import EdgeError
from edge_agent.inference.childproc import Isolation
from edge_agent.telemetry.drift import OUTPUT_PREFIX, DriftMonitor, DriftResult
from edge_agent.telemetry.feedback import FeedbackItem, submit
from edge_agent.telemetry.outbox import DB_FILE, Outbox, Quota, Row
from edge_agent.telemetry.pacing import Pacing
from edge_agent.telemetry.recorder import ModelPolicy, Recorder
from edge_agent.telemetry.uploader import Link, Uploader
from edge_agent.telemetry.writer.child import Spec
from edge_agent.telemetry.writer.remote import RemoteOutbox
from edge_agent.wire.kserve_v2 import dumps
from edge_agent.wire.model.manifest import Manifest

log = logging.getLogger(__name__)

POLL_S = 1.0


class Telemetry:
    """Everything telemetry on one device; build with the ``[telemetry]``/``[drift]`` values of the config."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        registry: CollectorRegistry,
        policy: Callable[[str], ModelPolicy],
        flush_interval_s: float,
        max_rows: int | None,
        max_bytes: int | None,
        drift: DriftMonitor | None = None,
        queue_max: int = 50_000,
        state_top: int = 3,
        quotas: Mapping[str, Quota] | None = None,
        paced: bool = False,
        tick_s: float | None = None,
        writer: str = "thread",
        isolation: Isolation | None = None,
    ) -> None:
        """``quotas``, ``paced`` (the policy has per-model ``max_bps``/``flush_interval_s``) and ``tick_s``
        (the writer's period, the smallest flush interval) carry the per-model limits (``pacing``).
        ``writer``: ``process`` or ``thread`` (module doc); ``isolation``: how the process starts (``inference.childproc``).
        """
        self.flush_interval_s = flush_interval_s if tick_s is None else min(tick_s, flush_interval_s)
        self.state_top = state_top
        self._dropped = Counter(
            "edgefleet_outbox_dropped_total",
            "Telemetry records dropped by the outbox bound",
            ["kind"],
            registry=registry,
        )
        self._psi = Gauge(
            "edgefleet_drift_psi", "PSI of the newest drift window", ["model", "version", "feature"], registry=registry
        )
        self._restarts = Counter(
            "edgefleet_telemetry_writer_restarts",
            "Telemetry writer processes lost (restarted, or the in-process fallback)",
            registry=registry,
        )
        self.drift = drift
        pacing = (
            Pacing(
                lambda m: policy(m).flush_interval_s,
                lambda m: policy(m).max_bps,
                default_interval_s=flush_interval_s,
                tick_s=self.flush_interval_s,
            )
            if paced
            else None
        )
        path = Path(data_dir) / DB_FILE
        self.outbox: Outbox | RemoteOutbox  # both are an ``outbox.Store``
        if writer == "process":
            spec = Spec(str(path), max_rows, max_bytes, dict(quotas or {}), _drift_spec(drift), paced)
            self.outbox = RemoteOutbox(
                spec,
                on_drop=self._on_drop,
                on_drift=self._on_drift,
                drift=drift,
                pacing=pacing,
                on_restart=self._restarts.inc,
                isolation=isolation,
            )
        else:
            self.outbox = Outbox(path, max_rows=max_rows, max_bytes=max_bytes, on_drop=self._on_drop, quotas=quotas)
        rows = Gauge("edgefleet_outbox_rows", "Telemetry rows waiting for the ingest's ack", registry=registry)
        rows.set_function(lambda: self.outbox.stats().rows)
        self.recorder = Recorder(
            self.outbox,
            policy,
            drift=drift,
            on_drift=self._on_drift,
            queue_max=queue_max,
            pacing=pacing,
            writer=self.outbox if isinstance(self.outbox, RemoteOutbox) else None,
        )
        self.uploader: Uploader | None = None
        self.on_drift_change: Callable[[], None] | None = None  # e.g. re-publish the DeviceState
        # Polled about once a second for events (load errors, update results): ``[(type, fields), ...]``.
        self.poll: Callable[[], list[tuple[str, dict[str, Any]]]] | None = None
        self._events: list[Row] = []
        self._events_lock = threading.Lock()
        self._psi_labels: dict[str, list[tuple[str, str, str]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.writer_cpu_s = 0.0  # CPU seconds of the telemetry thread so far (flush, drift, upload)

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, link: Link, fleet: str, device_id: str, *, max_bps: float | None, resend_timeout_s: float) -> None:
        """Upload through ``link`` (call before :meth:`start`)."""
        self.uploader = Uploader(
            self.outbox, link, fleet, device_id, max_bps=max_bps, resend_timeout_s=resend_timeout_s
        )
        self.uploader.start()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgefleet-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and commit what is queued."""
        self._stop.set()
        if self.uploader is not None:
            self.uploader.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        self.outbox.close()

    def _run(self) -> None:
        next_flush = next_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self.poll is not None and now >= next_poll:
                next_poll = now + POLL_S
                self._poll_events()
            if now >= next_flush:
                self.flush(force=False)
                next_flush = now + self.flush_interval_s
                self.writer_cpu_s = time.thread_time()
            wait = next_flush - now
            if self.uploader is not None:
                try:
                    wait = min(wait, self.uploader.step())
                except EdgeError as exc:
                    log.warning("telemetry upload step failed: %s", exc)
                if wait > 0:
                    self.uploader.wake.wait(max(0.0, wait))
                    self.uploader.wake.clear()
            else:
                self._stop.wait(max(0.0, wait))

    def _poll_events(self) -> None:
        try:
            for type_, fields in self.poll() if self.poll is not None else ():
                self.event(type_, **fields)
        except Exception:  # a broken probe must not stop telemetry
            log.exception("telemetry event poll failed")

    def flush(self, *, force: bool = True) -> int:
        """Commit queued predictions and events now; errors are logged (the next flush retries events).

        ``force=False`` (the writer's tick) leaves a model's predictions queued until its own interval passed.
        """
        with self._events_lock:
            events, self._events = self._events, []
        try:
            return self.recorder.flush(extra=events, force=force)
        except EdgeError as exc:
            log.error("telemetry flush failed: %s", exc)
            with self._events_lock:
                self._events[:0] = events
            return 0

    # -- inputs from the rest of the agent ---------------------------------------------------
    def event(self, type_: str, **fields: Any) -> None:
        """Queue an ``event`` record (``{"type": ..., **fields}``) for the next flush."""
        row = Row("event", time.time(), dumps({"type": type_, **fields}).decode(), model=fields.get("model"))
        with self._events_lock:
            self._events.append(row)

    def feedback(self, manifest: Manifest, items: list[FeedbackItem]) -> list[dict[str, Any]]:
        """Validate and commit labels (``feedback.submit``); returns what was stored."""
        return submit(self.recorder, manifest, items)

    # -- outputs ----------------------------------------------------------------------------
    def _on_drop(self, kind: str, n: int) -> None:
        self._dropped.labels(kind).inc(n)

    def _on_drift(self, result: DriftResult) -> None:
        for labels in self._psi_labels.pop(result.model, []):
            try:
                self._psi.remove(*labels)
            except KeyError:
                pass
        current = [(result.model, result.version, f) for f in result.psi]
        for (m, v, f), value in zip(current, result.psi.values(), strict=True):
            self._psi.labels(m, v, f).set(value)
        if result.output_psi is not None:
            out = (result.model, result.version, f"{OUTPUT_PREFIX}{result.model}")
            self._psi.labels(*out).set(result.output_psi)
            current.append(out)
        self._psi_labels[result.model] = current
        if result.level != "ok":
            log.warning("drift %s on %s:%s: %s", result.level, result.model, result.version, result.worst(3))
        if self.on_drift_change is not None:
            try:
                self.on_drift_change()
            except EdgeError as exc:
                log.warning("could not publish the drift state: %s", exc)

    def drift_summary(self) -> dict[str, dict[str, Any]]:
        """Per model, the newest window's level and worst features (for DeviceState)."""
        return self.drift.summary(self.state_top) if self.drift is not None else {}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "outbox": self.outbox.stats().to_dict(),
            "queued": self.recorder.pending(),
            "writer_cpu_s": round(self.writer_cpu_s, 4),
        }
        if isinstance(self.outbox, RemoteOutbox):
            box = self.outbox
            out["writer"] = {
                "mode": box.mode,
                "pid": box.pid,
                "cpu_s": round(box.child_cpu_s, 4),
                "restarts": box.restarts,
            }
        else:
            out["writer"] = {"mode": "thread"}
        if self.uploader is not None:
            out["upload"] = self.uploader.status()
        out["drift"] = self.drift_summary()
        return out


def _drift_spec(drift: DriftMonitor | None) -> dict[str, Any] | None:
    """The settings a writer process builds its own ``DriftMonitor`` from."""
    if drift is None:
        return None
    return {"window": drift.window, "window_s": drift.window_s, "watch": drift.watch, "alert": drift.alert}
