"""The API's one inference path: decode → join → check → predict → encode, and where each step runs.

Every infer request takes these steps, in this order, whatever its model or size:

1. **decode** the V2 body (``kserve_v2.decode_request``); a model with ``feature_joins`` may
   leave its joined inputs out;
   Tensors over ``max_elements`` values in all are refused before they are built (413);
2. **join**: fill the joined inputs the request lacks from the feature cache (``Joiner``);
3. **check** the complete request against the manifest, once (``kserve_v2.check_request``):
   names, datatypes and shapes, with the messages clients see, and the model's ``max_batch``
   (checked before the join, so a request cannot make the cache read more entities than that);
4. **predict** on the already-checked inputs (``LoadedModel.predict_checked``: conversion
   and the batch rules only, no second check);
5. **encode** the response, with the join's parameters when there were any, and the inference
   ``id`` (the request's, or one generated here); with telemetry on, the prediction is queued
   for the outbox (``telemetry.Recorder.prediction``: a deque append, no I/O).

Where the steps run is the only thing that varies. A body over ``OFFLOAD_BODY_BYTES`` takes
the whole path in a worker thread. Otherwise decode and encode stay on the event loop; the
join goes to a thread when it reads more than ``JOIN_INLINE_ENTITIES`` entities, and predict
when the model's warm latency times the batch is not below ``inline_below_s`` (for tiny
models a thread hop costs more than the invoke).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from edge_agent.features.join import ENTITIES_PARAM, ENTITY_PARAM, Joiner, JoinMetrics
from edge_agent.telemetry.recorder import IdSource, Recorder
from edge_agent.wire import kserve_v2 as v2

if TYPE_CHECKING:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from edge_agent.features.cache import FeatureCache
    from edge_agent.inference.runtime import LoadedModel

INLINE_BELOW_S = 0.001  # run predict on the event loop when (warm latency x batch) is below this
OFFLOAD_BODY_BYTES = 256 * 1024  # decode/encode bodies above this off the event loop
JOIN_INLINE_ENTITIES = 32  # feature-cache reads for more entities than this run off the event loop
MAX_TENSOR_ELEMENTS = 4 * 1024 * 1024  # values per request, all inputs together (config: http.max_tensor_elements)

T = TypeVar("T")
Response = tuple[bytes, "int | None"]  # body, and the JSON header length when binary data follows


class InferPath:
    """Runs infer requests on a resolved ``LoadedModel``; owns the worker threads and the joiners."""

    def __init__(
        self,
        features: FeatureCache | None,
        registry: CollectorRegistry,
        *,
        inline_below_s: float = INLINE_BELOW_S,
        workers: int = 2,
        max_elements: int = MAX_TENSOR_ELEMENTS,
        recorder: Recorder | None = None,
    ) -> None:
        self.features = features
        self.recorder = recorder
        self.new_id = recorder.new_id if recorder is not None else IdSource()
        self.registry = registry
        self.inline_below_s = inline_below_s
        self.workers = workers
        self.max_elements = max_elements
        self._joiners: dict[str, Joiner] = {}  # model name -> joiner of the manifest last seen
        self._executor: ThreadPoolExecutor | None = None

    # -- worker threads ---------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads (a later request starts new ones)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread, awaited from the event loop."""
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="edgefleet-api")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # -- the path -----------------------------------------------------------------------
    async def infer(self, model: LoadedModel, body: bytes, header_length: bytes | None) -> Response:
        """Serve one request body on ``model``, running each step on the loop or in a thread (module doc)."""
        if len(body) > OFFLOAD_BODY_BYTES:
            return await self.in_thread(self.infer_trimmed, model, body, header_length)
        t0 = time.perf_counter()
        request = self.decode(model, body, header_length)
        if model.manifest.feature_joins and self._many_entities(request):
            params = await self.in_thread(self.complete, model, request)
        else:
            params = self.complete(model, request)
        warm = model.warm_latency_s
        if warm is not None and warm * request.batch_size < self.inline_below_s:
            outputs = model.predict_checked(request.inputs, request.raw_outputs)
        else:
            outputs = await self.in_thread(model.predict_checked, request.inputs, request.raw_outputs)
        self.record(model, request, outputs, t0)
        return self.encode(model, request, outputs, params)

    def infer_trimmed(self, model: LoadedModel, body: bytes, header_length: bytes | None) -> Response:
        """:meth:`infer_sync`, then hand the heap's free pages back to the OS (large bodies only).

        The interpreter's arena is freed by the runtime; what a big request leaves behind is the
        decoded arrays and the response's many small objects, which glibc keeps unless trimmed.
        """
        try:
            return self.infer_sync(model, body, header_length)
        finally:
            trim_heap()

    def infer_sync(self, model: LoadedModel, body: bytes, header_length: bytes | None) -> Response:
        """The same steps, all on the calling thread."""
        t0 = time.perf_counter()
        request = self.decode(model, body, header_length)
        params = self.complete(model, request)
        outputs = model.predict_checked(request.inputs, request.raw_outputs)
        self.record(model, request, outputs, t0)
        return self.encode(model, request, outputs, params)

    # -- the steps ----------------------------------------------------------------------
    def decode(self, model: LoadedModel, body: bytes, header_length: bytes | None) -> v2.InferRequest:
        """Step 1; joined inputs may be missing until :meth:`complete` fills them."""
        return v2.decode_request(
            body, header_length, allow_no_inputs=bool(model.manifest.feature_joins), max_elements=self.max_elements
        )

    def complete(self, model: LoadedModel, request: v2.InferRequest) -> dict[str, Any] | None:
        """Steps 2 and 3: fill the joined inputs, then the request's one check; return the join's parameters."""
        many = request.parameters.get(ENTITIES_PARAM) if request.parameters else None
        model.check_batch(max(len(many), request.batch_size) if isinstance(many, list) else request.batch_size)
        params = self.joiner(model).fill(request) if model.manifest.feature_joins else None
        v2.check_request(request, model.manifest)
        return params

    def record(self, model: LoadedModel, request: v2.InferRequest, outputs: dict[str, np.ndarray], t0: float) -> None:
        """Give the inference its id (the client's or a new one) and queue its telemetry record."""
        rid = request.id
        if rid is None:
            rid = request.id = self.new_id()
        if self.recorder is not None:
            p = request.parameters
            entity = (p.get(ENTITY_PARAM) or p.get(ENTITIES_PARAM)) if p else None
            self.recorder.prediction(model.manifest, rid, time.perf_counter() - t0, request.inputs, outputs, entity)

    @staticmethod
    def encode(
        model: LoadedModel, request: v2.InferRequest, outputs: dict[str, np.ndarray], params: dict[str, Any] | None
    ) -> Response:
        """Step 5."""
        return v2.encode_response(model.name, model.version, outputs, request, parameters=params)

    def joiner(self, model: LoadedModel) -> Joiner:
        """The joiner of this model version (index maps are kept per model version and set version)."""
        joiner = self._joiners.get(model.name)
        if joiner is None or joiner.manifest is not model.manifest:
            joiner = self._joiners[model.name] = Joiner(model.manifest, self.features, JoinMetrics.of(self.registry))
        return joiner

    @staticmethod
    def _many_entities(request: v2.InferRequest) -> bool:
        many = request.parameters.get(ENTITIES_PARAM)
        return isinstance(many, list) and len(many) > JOIN_INLINE_ENTITIES


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap() -> None:
    """``malloc_trim(0)``: return freed heap pages to the OS (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
