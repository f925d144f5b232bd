"""The local inference API: the Open Inference Protocol (KServe V2) over REST, as a raw ASGI app.

Endpoints::

    GET  /v2/health/live                          200 while the process serves HTTP
    GET  /v2/health/ready                         200 once the initial model sync finished, else 503
    GET  /v2                                      server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}[/versions/{v}]         model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready   200 when that model (version) serves, else 503/404
    POST /v2/models/{name}[/versions/{v}]/infer   inference (JSON or binary tensor data); the response
                                                  carries the inference ``id`` (the request's or a new one)
    POST /v2/models/{name}/feedback               a label for an inference id (telemetry/feedback.py):
                                                  200 stored, 400 bad body or label, 404 unknown id, 409 labelled
    GET  /metrics                                 Prometheus text format
    GET  /agent/status                            the agent's status document
    GET  /agent/streams[/{id}/latest|/{id}/events] camera streams: status, newest result, SSE (``streams.py``)
    GET  /v2/openapi.json                         this API as OpenAPI 3 (``docs/openapi.yaml``, shipped as JSON)
    GET  /v2/models[/{name}[/versions/{v}]]/stats  statistics extension, Triton's shape (``stats.py``)
    POST /v2/repository/index, .../models/{name}/load|unload   repository extension (``repository.py``;
                                                  403 unless loopback/unix listener or allow_repository_control)

Errors are always JSON ``{"error": "..."}``: 400 malformed request (or a batch over the model's
``max_batch``), 404 unknown model, version or route, 405 wrong method, 408 request not sent within
``http.read_timeout_s``, 413 body or tensor values over the limit, 415 unsupported
Content-Encoding, 503 not ready or too busy; 500 only for the server's own faults (logged).

Feature joins (``features/join.py``): a request for a model whose manifest declares ``feature_joins``
may name the entity in ``parameters.entity_id`` (or ``entity_ids``) instead of sending the
joined inputs; the agent reads them from the feature cache. 404 unknown entity (no default),
409 stale features under ``stale_policy = "reject"``, 503 feature set not cached. The
response ``parameters`` carry the set version and age used. Models without joins take the
exact same path as before.

The app is plain ASGI (no framework): this module routes; ``infer.py`` is the one inference
path (decode → join → check → predict → encode, and which steps leave the event loop),
``asgi.py`` reads bodies and writes responses, ``metadata.py`` builds the model document, and
``errors.http_status`` gives every error its status. Each request resolves its
``LoadedModel`` once and holds it to the end, so a hot swap never changes the model under a
running request.

Run it with uvicorn, e.g.::

    app = create_app(server)
    uvicorn.run(app, host="127.0.0.1", port=8000, loop="uvloop", http="httptools", access_log=False)
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.errors import ClientGone, MethodNotAllowedError, NotFoundError, NotReadyError, RequestError
from edge_agent.features.cache import FeatureCache
from edge_agent.http.asgi import (
    JSON,
    OCTETS,
    Receive,
    Scope,
    Send,
    decode_content,
    read_body,
    send_error,
    send_response,
)
from edge_agent.http.ext.repository import PREFIX as REPOSITORY_PREFIX
from edge_agent.http.ext.repository import Repository
from edge_agent.http.ext.repository import handle as handle_repository
from edge_agent.http.ext.shadow_metrics import watch_shadows
from edge_agent.http.ext.stats import handle as handle_stats
from edge_agent.http.ext.stats import is_stats_path
from edge_agent.http.infer import INLINE_BELOW_S, MAX_TENSOR_ELEMENTS, InferPath
from edge_agent.http.metadata import model_metadata
from edge_agent.http.metrics import UNKNOWN_MODEL, Metrics
from edge_agent.http.openapi import openapi_json
from edge_agent.http.streams import PREFIX as STREAMS_PREFIX
from edge_agent.http.streams import handle as handle_streams
from edge_agent.inference.batching import Batching, BatchPolicy
from edge_agent.inference.runtime import LoadedModel
from edge_agent.jsonlimits import loads_limited
from edge_agent.models.serving import ModelServer
from edge_agent.telemetry.feedback import parse_feedback
from edge_agent.telemetry.hub import Telemetry
from edge_agent.wire import kserve_v2 as v2

if TYPE_CHECKING:
    from edge_agent.streams.manager import StreamManager

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
SERVER_NAME = "edgefleet"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]

_HEADER_LENGTH = v2.HEADER_LENGTH.lower().encode()

Handler = Callable[[Scope], Awaitable[tuple[int, bytes, bytes]]]


class InferenceAPI:
    """The V2 inference API for ``server`` as an ASGI app (``create_app`` is this class).

    ``metrics`` defaults to a fresh :class:`Metrics` (own registry), bound to ``server``'s
    swaps. ``status`` supplies ``GET /agent/status`` (default: ``server.status()``). Models
    whose warm latency times the batch size is below ``inline_below_s`` run on the event loop.
    ``features`` is the feature cache that models with ``feature_joins`` read from.
    ``max_elements`` bounds the tensor values of one request (413 above). ``telemetry`` records
    predictions and takes feedback labels (None: ids are still given, nothing is recorded).
    ``streams`` serves ``/agent/streams`` (``http/streams.py``; None: no streams configured).
    ``batching``: ``{model: BatchPolicy}`` for dynamic batching (off for the others).
    ``repository_control``: allow ``/v2/repository/*`` (the agent passes ``repository.control_allowed``).
    """

    def __init__(
        self,
        server: ModelServer,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        metrics: Metrics | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        inline_below_s: float = INLINE_BELOW_S,
        workers: int | None = None,
        features: FeatureCache | None = None,
        max_elements: int = MAX_TENSOR_ELEMENTS,
        telemetry: Telemetry | None = None,
        streams: StreamManager | None = None,
        batching: Mapping[str, BatchPolicy] | None = None,
        repository_control: bool = False,
    ) -> None:
        self.server = server
        self.streams = streams
        self.features = features
        self.telemetry = telemetry
        self.max_body_bytes = int(max_body_bytes)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(server)
        watch_shadows(self.metrics.registry, server.taps)  # edgefleet_shadow_* while a candidate is shadowed
        self.status = status
        self.path = InferPath(
            features,
            self.metrics.registry,
            inline_below_s=inline_below_s,
            workers=workers or max(2, min(8, os.cpu_count() or 2)),
            max_elements=max_elements,
            recorder=telemetry.recorder if telemetry is not None else None,
            taps=server.taps,
            batching=Batching(batching or {}, self.metrics.stats),
            stats=self.metrics.stats,
        )
        self.repository = Repository(server, repository_control)
        self._static: dict[str, Handler] = {
            "/v2/health/live": self._live,
            "/v2/health/ready": self._ready,
            "/v2": self._server_metadata,
            "/v2/": self._server_metadata,
            "/metrics": self._metrics,
            "/agent/status": self._status,
            "/v2/openapi.json": self._openapi,
        }

    # -- ASGI entry point ---------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/v2/models/"):
                if is_stats_path(path):
                    await handle_stats(scope, send, self.metrics.stats, self.server, self.path.in_thread)
                else:
                    await self._model_route(scope, receive, send, path)
            elif path.startswith(REPOSITORY_PREFIX):
                await handle_repository(scope, receive, send, self.repository, self.path.in_thread)
            elif path.startswith(STREAMS_PREFIX):
                await handle_streams(scope, receive, send, self.streams)
            else:
                await self._static_route(scope, send, path)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        """Stop the worker threads and the batchers (a later request starts new ones)."""
        self.path.close()
        if self.path.batching is not None:
            self.path.batching.close()

    # -- static routes ------------------------------------------------------------------
    async def _static_route(self, scope: Scope, send: Send, path: str) -> None:
        handler = self._static.get(path)
        try:
            if handler is None:
                raise NotFoundError(f"no route for {scope['method']} {path}")
            if scope["method"] not in ("GET", "HEAD"):
                raise MethodNotAllowedError(scope["method"], path, "GET, HEAD")
            status, body, content_type = await handler(scope)
            await send_response(send, status, body, content_type)
        except Exception as exc:
            await send_error(send, exc, scope)

    async def _live(self, scope: Scope) -> tuple[int, bytes, bytes]:
        return 200, b'{"live":true}', JSON

    async def _ready(self, scope: Scope) -> tuple[int, bytes, bytes]:
        if not self.server.synced_once:
            return 503, v2.dumps({"error": "not ready: the initial model sync has not finished", "ready": False}), JSON
        return 200, v2.dumps({"ready": True, "models": sorted(self.server.loaded())}), JSON

    async def _server_metadata(self, scope: Scope) -> tuple[int, bytes, bytes]:
        return 200, v2.dumps({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}), JSON

    async def _metrics(self, scope: Scope) -> tuple[int, bytes, bytes]:
        accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), None)
        body, content_type = self.metrics.render(accept)
        return 200, body, content_type.encode()

    async def _openapi(self, scope: Scope) -> tuple[int, bytes, bytes]:
        return 200, openapi_json(), JSON

    async def _status(self, scope: Scope) -> tuple[int, bytes, bytes]:
        fn = self.status or self.server.status
        return 200, v2.dumps(await self.path.in_thread(fn)), JSON

    # -- model routes -------------------------------------------------------------------
    async def _model_route(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        parts = path[len("/v2/models/") :].split("/")
        name, rest = parts[0], parts[1:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        method = scope["method"]
        if action == "infer" and name and version != "":
            if method == "POST":
                await self._infer(scope, receive, send, name, version)
            else:
                await send_error(send, MethodNotAllowedError(method, path, "POST"), scope)
            return
        if action == "feedback" and name and version is None:
            if method == "POST":
                await self._feedback(scope, receive, send, name)
            else:
                await send_error(send, MethodNotAllowedError(method, path, "POST"), scope)
            return
        try:
            if not name or version == "" or action not in ("", "ready"):
                raise NotFoundError(f"no route for {method} {path}")
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowedError(method, path, "GET, HEAD")
            if action == "ready":
                status, body = self._model_ready(name, version)
            else:
                status, body = 200, v2.dumps(model_metadata(self.server, self.features, name, version))
            await send_response(send, status, body)
        except Exception as exc:
            await send_error(send, exc, scope)

    def _get_model(self, name: str, version: str | None) -> LoadedModel:
        try:
            return self.server.get(name, version)
        except NotFoundError:
            if not self.server.synced_once:
                raise NotReadyError("not ready: the agent is still loading its models") from None
            raise

    def _model_ready(self, name: str, version: str | None) -> tuple[int, bytes]:
        try:
            model = self._get_model(name, version)
        except NotReadyError as exc:
            return 503, v2.dumps({"error": str(exc), "name": name, "ready": False})
        return 200, v2.dumps({"name": name, "version": model.version, "ready": True})

    # -- inference (the hot path) -------------------------------------------------------
    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
        """The HTTP side of an infer request: model, body, metrics; ``InferPath.infer`` does the rest."""
        t0 = time.perf_counter()
        metrics = self.metrics
        try:
            # Resolved once and held to the end: a hot swap cannot pull the model from under the request.
            model = self._get_model(name, version)
        except Exception as exc:
            code, reason = await send_error(send, exc, scope)
            label = self._model_label(name)
            metrics.error(label, reason)
            metrics.observe(label, "", code, time.perf_counter() - t0)
            return
        metrics.inflight.inc()
        code = 200
        try:
            hlen = encoding = length = None
            for key, value in scope["headers"]:
                if key == b"content-length":
                    length = value
                elif key == _HEADER_LENGTH:
                    hlen = value
                elif key == b"content-encoding":
                    encoding = value
            body = await read_body(receive, length, self.max_body_bytes)
            if encoding is not None:
                body = decode_content(body, encoding, self.max_body_bytes)
            payload, out_hlen = await self.path.infer(model, body, hlen)
            if out_hlen is None:
                await send_response(send, 200, payload)
            else:
                await send_response(send, 200, payload, OCTETS, [(_HEADER_LENGTH, b"%d" % out_hlen)])
        except ClientGone:
            code = 499  # nginx's "client closed request"
            metrics.error(model.name, "client_disconnected")
        except Exception as exc:
            code, reason = await send_error(send, exc, scope)
            metrics.error(model.name, reason)
        finally:
            metrics.inflight.dec()
            metrics.observe(model.name, model.version, code, time.perf_counter() - t0)

    # -- feedback labels ------------------------------------------------------------------
    async def _feedback(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        """Validate a feedback body and commit its labels to the outbox before answering 200."""
        try:
            model = self._get_model(name, None)
            if self.telemetry is None:
                raise NotReadyError("telemetry is off on this agent: feedback cannot be stored")
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            body = await read_body(receive, length, self.max_body_bytes)
            doc = loads_limited(body, max_depth=8, what="feedback body", error=RequestError)
            items = parse_feedback(doc)
            stored = await self.path.in_thread(self.telemetry.feedback, model.manifest, items)
            await send_response(send, 200, v2.dumps({"model_name": name, "stored": len(stored), "items": stored}))
        except Exception as exc:
            await send_error(send, exc, scope)

    def _model_label(self, name: str) -> str:
        """``name`` if the server knows the model, else a fixed label (bounded cardinality)."""
        server = self.server
        return name if name in server.loaded() or name in server.errors() else UNKNOWN_MODEL


create_app = InferenceAPI  # the V2 inference API for ``server`` as an ASGI app (options: InferenceAPI)
