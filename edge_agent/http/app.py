"""The local inference API: the Open Inference Protocol (KServe V2) over REST, as a raw ASGI app.

Endpoints::

    GET  /v2/health/live                          200 while the process serves HTTP
    GET  /v2/health/ready                         200 once the initial model sync finished, else 503
    GET  /v2                                      server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}[/versions/{v}]         model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready   200 when that model (version) serves, else 503/404
    POST /v2/models/{name}[/versions/{v}]/infer   inference (JSON or binary tensor data)
    GET  /metrics                                 Prometheus text format
    GET  /agent/status                            the agent's status document

Errors are always JSON ``{"error": "..."}``: 400 malformed request, 404 unknown model,
version or route, 405 wrong method, 413 body over the limit, 415 unsupported
Content-Encoding, 503 not ready; 500 only for the server's own faults (logged).

Feature joins (``join.py``): a request for a model whose manifest declares ``feature_joins``
may name the entity in ``parameters.entity_id`` (or ``entity_ids``) instead of sending the
joined inputs; the agent reads them from the feature cache. 404 unknown entity (no default),
409 stale features under ``stale_policy = "reject"``, 503 feature set not cached. The
response ``parameters`` carry the set version and age used. Models without joins take the
exact same path as before.

The app is plain ASGI (no framework): the infer path is a handful of dict lookups around
the codec and ``LoadedModel.predict``. Each request resolves its ``LoadedModel`` once and
holds it to the end, so a hot swap never changes the model under a running request. Tiny
models run inline on the event loop (a thread hop costs more than the invoke); slower
ones, and big bodies, run in a thread pool so the loop stays responsive.

Run it with uvicorn, e.g.::

    app = create_app(server)
    uvicorn.run(app, host="127.0.0.1", port=8000, loop="uvloop", http="httptools", access_log=False)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_agent import __version__
from edge_agent.errors import (
    FailedError,
    ManifestError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    RequestError,
)
from edge_agent.features.cache import FeatureCache, FeatureExpired, FeatureNotFound
from edge_agent.features.join import ENTITIES_PARAM, ENTITY_PARAM, FeaturesNotReady, Joiner, JoinMetrics
from edge_agent.http.metrics import UNKNOWN_MODEL, Metrics
from edge_agent.inference.runtime import LoadedModel
from edge_agent.models.serving import ModelServer
from edge_agent.wire import kserve_v2 as v2
from edge_agent.wire.manifest import Manifest, TensorSpec, check_name, parse_version

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
INLINE_BELOW_S = 0.001  # run predict on the event loop when (warm latency x batch) is below this
OFFLOAD_BODY_BYTES = 256 * 1024  # decode/encode bodies above this off the event loop
JOIN_INLINE_ENTITIES = 32  # feature-cache reads for more entities than this run off the event loop
SERVER_NAME = "edgefleet"
EXTENSIONS = ["binary_tensor_data"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_HEADER_LENGTH = v2.HEADER_LENGTH.lower().encode()


class UnsupportedMediaTypeError(RequestError):
    """The request body uses a Content-Encoding this server does not decode (HTTP 415)."""

    status = 415


class _ClientGone(Exception):
    """The client disconnected before sending its whole body."""


class _MethodNotAllowed(Exception):
    def __init__(self, method: str, path: str, allowed: str) -> None:
        super().__init__(f"method {method} not allowed on {path}; use {allowed}")
        self.allowed = allowed


def _error_status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and metrics reason for an exception."""
    if isinstance(exc, PayloadTooLargeError):
        return 413, "payload_too_large"
    if isinstance(exc, RequestError):
        return exc.status, "bad_request"
    if isinstance(exc, FeatureExpired):  # before NotFoundError, its base: the request is fine, the data is stale
        return 409, "feature_stale"
    if isinstance(exc, FeatureNotFound):
        return 404, "feature_missing"
    if isinstance(exc, FeaturesNotReady):
        return 503, "features_not_ready"
    if isinstance(exc, NotFoundError):
        return 404, "not_found"
    if isinstance(exc, NotReadyError):
        return 503, "not_ready"
    if isinstance(exc, FailedError):
        return 503, "unavailable"
    if isinstance(exc, _MethodNotAllowed):
        return 405, "method_not_allowed"
    return 500, "internal"


def _tensor_meta(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _tensor_params(spec: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"native_datatype": spec.native_datatype}
    if spec.quantization is not None:
        out["quantization"] = spec.quantization.to_dict()
    return out


class InferenceAPI:
    """The ASGI application; build it with :func:`create_app`."""

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
    ) -> None:
        self.server = server
        self.features = features
        self._joiners: dict[str, Joiner] = {}  # model name -> joiner of the manifest last seen
        self.max_body_bytes = int(max_body_bytes)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(server)
        self.status = status
        self.inline_below_s = inline_below_s
        self.workers = workers or max(2, min(8, os.cpu_count() or 2))
        self._executor: ThreadPoolExecutor | None = None
        self._version = __version__
        self._static: dict[str, Callable[[Scope], Awaitable[tuple[int, bytes, bytes]]]] = {
            "/v2/health/live": self._live,
            "/v2/health/ready": self._ready,
            "/v2": self._server_metadata,
            "/v2/": self._server_metadata,
            "/metrics": self._metrics,
            "/agent/status": self._status,
        }

    # -- ASGI entry point ---------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/v2/models/"):
                await self._model_route(scope, receive, send, path)
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
        """Stop the worker threads (a later request starts new ones)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _pool(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="edgefleet-api")
        return executor

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    # -- responses ----------------------------------------------------------------------
    @staticmethod
    async def _send(
        send: Send,
        status: int,
        body: bytes,
        content_type: bytes = _JSON,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, send: Send, exc: BaseException, scope: Scope) -> tuple[int, str]:
        status, reason = _error_status(exc)
        extra: list[tuple[bytes, bytes]] = []
        if status == 500:
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            message = f"internal error: {type(exc).__name__}: {exc}"
        else:
            message = str(exc)
        if status == 405:
            extra.append((b"allow", exc.allowed.encode()))  # type: ignore[attr-defined]
        body: dict[str, Any] = {"error": message}
        try:
            await self._send(send, status, v2.dumps(body), _JSON, extra)
        except Exception:  # the client is gone; nothing left to tell it
            log.debug("could not send error response", exc_info=True)
        return status, reason

    # -- static routes ------------------------------------------------------------------
    async def _static_route(self, scope: Scope, send: Send, path: str) -> None:
        handler = self._static.get(path)
        try:
            if handler is None:
                raise NotFoundError(f"no route for {scope['method']} {path}")
            if scope["method"] not in ("GET", "HEAD"):
                raise _MethodNotAllowed(scope["method"], path, "GET, HEAD")
            status, body, content_type = await handler(scope)
            await self._send(send, status, body, content_type)
        except Exception as exc:
            await self._send_error(send, exc, scope)

    async def _live(self, scope: Scope) -> tuple[int, bytes, bytes]:
        return 200, b'{"live":true}', _JSON

    async def _ready(self, scope: Scope) -> tuple[int, bytes, bytes]:
        if not self.server.synced_once:
            return 503, v2.dumps({"error": "not ready: the initial model sync has not finished", "ready": False}), _JSON
        return 200, v2.dumps({"ready": True, "models": sorted(self.server.loaded())}), _JSON

    async def _server_metadata(self, scope: Scope) -> tuple[int, bytes, bytes]:
        return 200, v2.dumps({"name": SERVER_NAME, "version": self._version, "extensions": EXTENSIONS}), _JSON

    async def _metrics(self, scope: Scope) -> tuple[int, bytes, bytes]:
        accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), None)
        body, content_type = self.metrics.render(accept)
        return 200, body, content_type.encode()

    async def _status(self, scope: Scope) -> tuple[int, bytes, bytes]:
        fn = self.status or self.server.status
        return 200, v2.dumps(await self._in_thread(fn)), _JSON

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
                await self._send_error(send, _MethodNotAllowed(method, path, "POST"), scope)
            return
        try:
            if not name or version == "" or action not in ("", "ready"):
                raise NotFoundError(f"no route for {method} {path}")
            if method not in ("GET", "HEAD"):
                raise _MethodNotAllowed(method, path, "GET, HEAD")
            if action == "ready":
                status, body = self._model_ready(name, version)
            else:
                status, body = 200, v2.dumps(self._model_metadata(name, version))
            await self._send(send, status, body)
        except Exception as exc:
            await self._send_error(send, exc, scope)

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

    def _model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """Metadata of the serving version, or of any installed version (read from the store)."""
        try:
            check_name(name)
            if version is not None:
                parse_version(version)
        except ManifestError:  # not a valid model name or version: nothing can exist by that name
            raise NotFoundError(f"unknown model {name!r}" + (f" version {version!r}" if version else "")) from None
        loaded = self.server.loaded().get(name)
        store = self.server.store
        installed = store.versions(name)
        if loaded is not None and (version is None or version == loaded.version):
            manifest: Manifest = loaded.manifest
        else:
            if version is None:
                version = store.active(name)
                if version is None:
                    if not self.server.synced_once:
                        raise NotReadyError("not ready: the agent is still loading its models")
                    raise NotFoundError(f"unknown model {name!r}")
            elif version not in installed:
                raise NotFoundError(
                    f"model {name!r} has no version {version!r}" if installed else f"unknown model {name!r}"
                )
            manifest = store.manifest(name, version)  # a corrupt manifest on disk is a server fault: 500
        serving = loaded is not None and loaded.version == manifest.version
        params: dict[str, Any] = {
            "version": manifest.version,
            "active_version": loaded.version if loaded is not None else None,
            "ready": serving,
            "inputs": {s.name: _tensor_params(s) for s in manifest.inputs},
            "outputs": {s.name: _tensor_params(s) for s in manifest.outputs},
            "labels": manifest.labels,
            "preprocessing": manifest.preprocessing,
            "sha256": manifest.sha256,
            "created_at": manifest.created_at,
        }
        if serving:
            params["runtime"] = loaded.info()  # type: ignore[union-attr]
        if manifest.feature_joins:
            params["feature_joins"] = self._joins_metadata(manifest)
            for name_in, j in manifest.feature_joins.items():
                params["inputs"][name_in]["joined_from"] = j.set
        return {
            "name": manifest.name,
            "versions": installed,
            "platform": "tflite",
            "inputs": [_tensor_meta(s) for s in manifest.inputs],
            "outputs": [_tensor_meta(s) for s in manifest.outputs],
            "parameters": params,
        }

    def _joins_metadata(self, manifest: Manifest) -> dict[str, Any]:
        """Which inputs the feature cache fills, from which set, and the set version cached now."""
        out = {}
        for name_in, j in manifest.feature_joins.items():
            try:
                cached = self.features.version(j.set) if self.features is not None else None
            except FailedError:
                cached = None
            out[name_in] = {
                **j.to_dict(),
                "cached_version": cached,
                "entity_parameters": [ENTITY_PARAM, ENTITIES_PARAM],
            }
        return out

    def _joiner(self, model: LoadedModel) -> Joiner:
        """The joiner of this model version (index maps are kept per model version and set version)."""
        joiner = self._joiners.get(model.name)
        if joiner is None or joiner.manifest is not model.manifest:
            joiner = self._joiners[model.name] = Joiner(
                model.manifest, self.features, JoinMetrics.of(self.metrics.registry)
            )
        return joiner

    # -- inference (the hot path) -------------------------------------------------------
    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
        t0 = time.perf_counter()
        metrics = self.metrics
        try:
            # Resolved once and held to the end: a hot swap cannot pull the model from under the request.
            model = self._get_model(name, version)
        except Exception as exc:
            code, reason = await self._send_error(send, exc, scope)
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
            body = await self._read_body(receive, length)
            if encoding is not None:
                body = self._decode_content(body, encoding)
            if len(body) > OFFLOAD_BODY_BYTES:
                payload, out_hlen = await self._in_thread(self._infer_sync, model, body, hlen)
            elif model.manifest.feature_joins:
                payload, out_hlen = await self._infer_joined(model, body, hlen)
            else:
                request = v2.decode_request(body, hlen, model.manifest)
                warm = model.warm_latency_s
                if warm is not None and warm * request.batch_size < self.inline_below_s:
                    outputs = model.predict(request.inputs, request.raw_outputs)
                else:
                    outputs = await self._in_thread(model.predict, request.inputs, request.raw_outputs)
                payload, out_hlen = v2.encode_response(model.name, model.version, outputs, request)
            if out_hlen is None:
                await self._send(send, 200, payload)
            else:
                await self._send(send, 200, payload, _OCTETS, [(_HEADER_LENGTH, b"%d" % out_hlen)])
        except _ClientGone:
            code = 499  # nginx's "client closed request"
            metrics.error(model.name, "client_disconnected")
        except Exception as exc:
            code, reason = await self._send_error(send, exc, scope)
            metrics.error(model.name, reason)
        finally:
            metrics.inflight.dec()
            metrics.observe(model.name, model.version, code, time.perf_counter() - t0)

    def _infer_sync(self, model: LoadedModel, body: bytes, hlen: bytes | None) -> tuple[bytes, int | None]:
        if model.manifest.feature_joins:
            request, params = self._decode_joined(model, body, hlen)
        else:
            request, params = v2.decode_request(body, hlen, model.manifest), None
        outputs = model.predict(request.inputs, request.raw_outputs)
        return v2.encode_response(model.name, model.version, outputs, request, parameters=params)

    def _decode_joined(self, model: LoadedModel, body: bytes, hlen: bytes | None) -> tuple[v2.InferRequest, Any]:
        """Decode, fill the joined inputs the request lacks from the feature cache, then check against the spec."""
        request = v2.decode_request(body, hlen, allow_no_inputs=True)
        params = self._joiner(model).fill(request)
        v2.check_request(request, model.manifest)
        return request, params

    async def _infer_joined(self, model: LoadedModel, body: bytes, hlen: bytes | None) -> tuple[bytes, int | None]:
        """A model with feature joins: one SQLite probe per entity (microseconds), then as the plain path."""
        request = v2.decode_request(body, hlen, allow_no_inputs=True)
        joiner = self._joiner(model)
        many = request.parameters.get(ENTITIES_PARAM)
        if isinstance(many, list) and len(many) > JOIN_INLINE_ENTITIES:
            params = await self._in_thread(joiner.fill, request)
        else:
            params = joiner.fill(request)
        v2.check_request(request, model.manifest)
        warm = model.warm_latency_s
        if warm is not None and warm * request.batch_size < self.inline_below_s:
            outputs = model.predict(request.inputs, request.raw_outputs)
        else:
            outputs = await self._in_thread(model.predict, request.inputs, request.raw_outputs)
        return v2.encode_response(model.name, model.version, outputs, request, parameters=params)

    def _model_label(self, name: str) -> str:
        """``name`` if the server knows the model, else a fixed label (bounded cardinality)."""
        server = self.server
        return name if name in server.loaded() or name in server.errors() else UNKNOWN_MODEL

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body_bytes
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise RequestError(f"invalid Content-Length {content_length[:40]!r}") from None
            if declared > limit:
                raise PayloadTooLargeError(f"request body of {declared} bytes is over the {limit}-byte limit")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise PayloadTooLargeError(f"request body is over the {limit}-byte limit")
            return body
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _decode_content(self, body: bytes, encoding: bytes) -> bytes:
        """Undo a gzip/deflate Content-Encoding (tritonclient's request compression), within the body limit."""
        enc = encoding.strip().lower()
        if enc == b"identity":
            return body
        if enc not in (b"gzip", b"deflate"):
            raise UnsupportedMediaTypeError(
                f"Content-Encoding {enc.decode('latin-1')!r} is not supported; use gzip or deflate"
            )
        limit = self.max_body_bytes
        decoder = zlib.decompressobj(wbits=31 if enc == b"gzip" else 15)
        try:
            out = decoder.decompress(body, limit + 1)
        except zlib.error as exc:
            raise RequestError(f"cannot decode the {enc.decode()} request body: {exc}") from None
        if len(out) > limit:
            raise PayloadTooLargeError(f"decompressed request body is over the {limit}-byte limit")
        if not decoder.eof:
            raise RequestError(f"the {enc.decode()} request body is truncated")
        return out


def create_app(
    server: ModelServer,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
    inline_below_s: float = INLINE_BELOW_S,
    features: FeatureCache | None = None,
) -> InferenceAPI:
    """The V2 inference API for ``server`` as an ASGI app.

    ``metrics`` defaults to a fresh :class:`Metrics` (own registry), bound to ``server``'s
    swaps. ``status`` supplies ``GET /agent/status`` (default: ``server.status()``). Models
    whose warm latency times the batch size is below ``inline_below_s`` run on the event loop.
    ``features`` is the feature cache that models with ``feature_joins`` read from.
    """
    return InferenceAPI(
        server,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
        status=status,
        inline_below_s=inline_below_s,
        features=features,
    )
