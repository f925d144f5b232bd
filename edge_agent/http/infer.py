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

The sequence is written once, in :meth:`InferPath.infer`; where the steps run is the only thing
that varies. A body over ``OFFLOAD_BODY_BYTES`` takes the whole path in a worker thread
(:meth:`InferPath.infer_sync` runs the same coroutine with every step placed on that thread).
Otherwise decode and encode stay on the event loop; the join goes to a thread when it reads
more than ``JOIN_INLINE_ENTITIES`` entities, and predict when the model's warm latency times
the batch is not below ``inline_below_s`` (for tiny models a thread hop costs more than the
invoke).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

from edge_agent.config import HttpConfig
from edge_agent.features.join import ENTITIES_PARAM, ENTITY_PARAM, Joiner, JoinMetrics
from edge_agent.features.precomputed import PrecomputedFirst
from edge_agent.telemetry.recorder import IdSource, Recorder
from edge_agent.wire import kserve_v2 as v2

if TYPE_CHECKING:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from edge_agent.features.cache import FeatureCache
    from edge_agent.inference.batching import Batching
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.inference.stats import InferenceStats
    from edge_agent.models.taps import Later, ModelTaps

INLINE_BELOW_S = 0.001  # run predict on the event loop when (warm latency x batch) is below this
OFFLOAD_BODY_BYTES = 256 * 1024  # decode/encode bodies above this off the event loop
JOIN_INLINE_ENTITIES = 32  # feature-cache reads for more entities than this run off the event loop
MAX_TENSOR_ELEMENTS = HttpConfig().max_tensor_elements  # values per request, all inputs together

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
        taps: ModelTaps | None = None,
        batching: Batching | None = None,
        stats: InferenceStats | None = None,
    ) -> None:
        self.features = features
        self.batching = batching  # models with dynamic batching (inference/batching.py); off: None or empty
        self.stats = stats  # the statistics extension's counters (inference/stats.py)
        self.taps = taps  # recent figures and shadow copies (models.taps), fed after every predict
        self.recorder = recorder
        self.new_id = recorder.new_id if recorder is not None else IdSource()
        self.registry = registry
        self.inline_below_s = inline_below_s
        self.workers = workers
        self.max_elements = max_elements
        self._joiners: dict[str, Joiner] = {}  # model name -> joiner of the manifest last seen
        self.precomputed = PrecomputedFirst(features, registry)  # models whose manifest declares precomputed
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
    async def infer(
        self, model: LoadedModel, body: bytes, header_length: bytes | None, on_thread: bool = False
    ) -> Response:
        """Serve one request body on ``model``: the one sequence of steps (module doc).

        Each step runs on the event loop or in a worker thread (``in_thread``), as the module doc
        says. ``on_thread``: the caller is already a worker thread (:meth:`infer_sync`): every step
        runs here and no dynamic batching, so the coroutine never suspends.
        """
        batcher = self.batching.get(model) if self.batching and not on_thread else None
        big = len(body) > OFFLOAD_BODY_BYTES and not on_thread
        if big and batcher is None:
            return await self.in_thread(self.infer_trimmed, model, body, header_length)
        t0 = time.perf_counter()
        request = (
            await self.in_thread(self.decode, model, body, header_length)
            if big
            else self.decode(model, body, header_length)
        )
        pre = self.precomputed.first(model, request) if model.manifest.precomputed is not None else None
        if pre is not None and pre.outputs is not None:  # answered from the cache: no predict, no taps
            self.record(model, request, pre.outputs, t0, None)
            return self.encode(model, request, pre.outputs, pre.params)
        if model.manifest.feature_joins and not on_thread and self._many_entities(request):
            params = await self.in_thread(self.complete, model, request)
        else:
            params = self.complete(model, request)
        warm = model.warm_latency_s
        tp = time.perf_counter()
        queued = infer_s = 0.0
        if batcher is not None:  # shares one invoke with concurrent requests; gets back exactly its own rows
            outputs, queued, infer_s = await batcher.infer(request.inputs, request.raw_outputs)
        elif on_thread or (warm is not None and warm * request.batch_size < self.inline_below_s):
            outputs = model.predict_checked(request.inputs, request.raw_outputs)
        else:
            outputs = await self.in_thread(model.predict_checked, request.inputs, request.raw_outputs)
        te = time.perf_counter()
        self.record(model, request, outputs, t0, tp, None if on_thread else asyncio.get_running_loop().call_soon)
        if pre is not None:
            params = self.precomputed.live(model, pre, params)
        response = self.encode(model, request, outputs, params)
        self.count(model, request.batch_size, (t0, tp, te), queued, infer_s if batcher is not None else None)
        return response

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
        """:meth:`infer` with every step on the calling thread: its coroutine returns at the first ``send``."""
        steps = self.infer(model, body, header_length, on_thread=True)
        try:
            steps.send(None)
        except StopIteration as done:
            return cast(Response, done.value)
        steps.close()
        raise RuntimeError("InferPath.infer suspended on a worker thread")  # a step placed off the thread: a bug

    def count(
        self,
        model: LoadedModel,
        rows: int,
        marks: tuple[float, float, float],
        queued: float = 0.0,
        batch_s: float | None = None,
    ) -> None:
        """The request's phases into the statistics (``marks``: start, predict start, predict end; encode ends now).

        ``batch_s``: the invoke time of the dynamic batch it rode in (counted as an execution by the batcher).
        """
        if self.stats is not None:
            t0, tp, te = marks
            infer_s = te - tp - queued if batch_s is None else batch_s
            self.stats.phases(
                model.name, model.version, rows, tp - t0, queued, infer_s, time.perf_counter() - te, batch_s is None
            )

    # -- the steps ----------------------------------------------------------------------
    def decode(self, model: LoadedModel, body: bytes, header_length: bytes | None) -> v2.InferRequest:
        """Step 1; joined inputs may be missing until :meth:`complete` fills them."""
        return v2.decode_request(
            body,
            header_length,
            allow_no_inputs=bool(model.manifest.feature_joins or model.manifest.precomputed),
            max_elements=self.max_elements,
        )

    def complete(self, model: LoadedModel, request: v2.InferRequest) -> dict[str, Any] | None:
        """Steps 2 and 3: fill the joined inputs, then the request's one check; return the join's parameters."""
        many = request.parameters.get(ENTITIES_PARAM) if request.parameters else None
        model.check_batch(max(len(many), request.batch_size) if isinstance(many, list) else request.batch_size)
        params = self.joiner(model).fill(request) if model.manifest.feature_joins else None
        v2.check_request(request, model.manifest)
        return params

    def record(
        self,
        model: LoadedModel,
        request: v2.InferRequest,
        outputs: dict[str, np.ndarray],
        t0: float,
        tp: float | None,
        later: Later | None = None,
    ) -> None:
        """Give the inference its id (the client's or a new one), queue its telemetry record, feed the taps.

        ``tp``: when predict started (the taps get the predict time: what versions are compared on);
        None: no predict ran (a precomputed answer, ``features.precomputed``), so no taps. ``later``:
        on the event loop, its ``call_soon``: a shadow copy is taken once the response is sent.
        """
        if self.taps is not None and tp is not None:
            self.taps.observe(model, request, outputs, time.perf_counter() - tp, later)
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
