"""Prometheus metrics of the inference API, in their own registry.

Each :class:`Metrics` owns a ``CollectorRegistry`` (not the process-global one), so
several agents or tests can live in one process. The per-request path only touches
pre-resolved label children, cached per (model, version[, code]).

Metrics::

    edgefleet_requests_total{model,version,code}        infer requests by HTTP status
    edgefleet_request_latency_seconds{model,version}    infer latency, request in to response out
    edgefleet_errors_total{model,reason}                failed infer requests by reason
    edgefleet_active_version{model,version}             1 for the version serving each model
    edgefleet_inflight_requests                          infer requests being processed
    nv_inference_*{model,version}                       Triton's names, from ``stats`` (http/ext/nvmetrics.py)
    edgefleet_infer_source_total{model,source}          precomputed vs live answers (features/precomputed.py)

``version`` is the version that served (empty when none did, e.g. a 404); ``model`` is
``UNKNOWN_MODEL`` for names the server does not know, so clients cannot blow up the
label cardinality.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from edge_agent.http.ext.nvmetrics import TritonCollector
from edge_agent.inference.stats import InferenceStats

if TYPE_CHECKING:
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.models.serving import ModelServer

# From 50 µs (a tiny int8 model invoked inline) to 1 s (a big model on a slow CPU).
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
UNKNOWN_MODEL = "_unknown"  # model names cannot start with "_", so this never collides


class Metrics:
    """The API's metrics; ``watch`` a ModelServer to track its active versions."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        model_version = ("model", "version")
        self.requests = Counter(
            "edgefleet_requests",
            "Inference requests by model, served version and HTTP status code.",
            (*model_version, "code"),
            registry=r,
        )
        self.latency = Histogram(
            "edgefleet_request_latency_seconds",
            "Inference request latency inside the agent, in seconds.",
            model_version,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "edgefleet_errors", "Failed inference requests by model and reason.", ("model", "reason"), registry=r
        )
        self.active_version = Gauge(
            "edgefleet_active_version", "1 for the model version that is serving.", model_version, registry=r
        )
        self.inflight = Gauge("edgefleet_inflight_requests", "Inference requests being processed.", registry=r)
        self.stats = InferenceStats()  # the statistics extension's counters; nv_* series read them
        r.register(TritonCollector(self.stats))
        if process:
            from prometheus_client import PlatformCollector, ProcessCollector

            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}  # (metric, *label values) -> its child
        self._active: dict[str, str] = {}
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[ModelServer] = weakref.WeakSet()

    # -- per request (hot path) -----------------------------------------------------
    def observe(self, model: str, version: str, code: int, seconds: float) -> None:
        """Count one infer request and record its latency."""
        self._child(self.requests, model, version, code).inc()
        self._child(self.latency, model, version).observe(seconds)
        if version:  # a request that reached a model version
            self.stats.request(model, version, code == 200, seconds)

    def error(self, model: str, reason: str) -> None:
        self._child(self.errors, model, reason).inc()

    def _child(self, metric: Any, *values: object) -> Any:
        """``metric.labels(*values)``, cached: prometheus_client's own lookup is slower than the request."""
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*map(str, values))
        return child

    # -- active versions ------------------------------------------------------------
    def set_active(self, model: str, version: str | None) -> None:
        """Mark ``version`` as the serving one (None: the model is gone); drop the old label set."""
        with self._lock:
            old = self._active.pop(model, None)
            if old is not None and old != version:
                try:
                    self.active_version.remove(model, old)
                except KeyError:
                    pass
            if version is not None:
                self._active[model] = version
                self.active_version.labels(model, version).set(1)

    def on_swap(self, name: str, old: LoadedModel | None, new: LoadedModel | None) -> None:
        """A ``ModelServer`` swap listener."""
        self.set_active(name, new.version if new is not None else None)

    def watch(self, server: ModelServer) -> None:
        """Follow ``server``'s swaps and record what it serves now (idempotent per server)."""
        with self._lock:
            if server in self._watched:
                return
            self._watched.add(server)
        server.add_listener(self.on_swap)
        for name, model in server.loaded().items():
            self.set_active(name, model.version)

    # -- exposition -----------------------------------------------------------------
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the text format the ``Accept`` header asks for; return (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
