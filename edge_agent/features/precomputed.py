"""Precomputed-first answers: serve a model's batch-scored outputs from the feature cache, run live otherwise.

A model whose manifest declares ``precomputed`` (``wire/model/precomputed.py``) has its outputs scored
per entity by a batch job and pushed as a feature set. A request naming the entity
(``parameters.entity_id``, or ``entity_ids`` for a batch: the same parameters the joins read)
is then answered from the cached rows, without running the interpreter, when every named entity
has a **fresh** row: ``age_s <= max_age_s`` and, when the set has a ``ttl_s``, within it too.
All rows of one answer come from one committed version of the set (``FeatureCache.get_many``
reads one snapshot), so a bundle applied meanwhile never mixes two versions into one response.

Otherwise the request runs live when it carries the model's live inputs (every input that no
``feature_joins`` entry fills), and when it does not:

- entity missing from the set: ``FeatureNotFound`` (404), as a join;
- row stale: ``FeatureExpired`` (409), as a join under ``stale_policy = "reject"``;
- set not cached, or without the declared columns: ``FeaturesNotReady`` (503).

Response ``parameters``::

    {"source": "precomputed", "precomputed": {"set": "maintenance_scores", "version": "3", "age_s": 812.4}}
    {"source": "live", "precomputed": {"set": "maintenance_scores", "miss": "stale"}}   (+ any join's parameters)

``miss`` is one of ``MISSES``; ``age_s`` is the oldest row's. Answers are counted in
``edgefleet_infer_source_total{model,source}`` (``JoinMetrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.errors import FeatureExpired, FeatureNotFound, FeatureSetNotFound, FeaturesNotReady, RequestError
from edge_agent.features.join import JoinMetrics, entity_ids, one_row_per_entity
from edge_agent.inference.runtime import quantize
from edge_agent.wire.model.manifest import V2_TO_NUMPY

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edge_agent.features.cache import FeatureCache
    from edge_agent.features.records import FeatureRow, SetMeta
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.wire.kserve_v2 import InferRequest
    from edge_agent.wire.model.manifest import Manifest
    from edge_agent.wire.model.precomputed import Precomputed

SOURCE = "source"
PRECOMPUTED, LIVE = "precomputed", "live"
MISSES = ("no_entity", "missing", "stale", "not_cached")


@dataclass(slots=True)
class Answer:
    """What precomputed-first decided: ``outputs`` when served from the cache, else None (run live)."""

    outputs: dict[str, np.ndarray] | None
    params: dict[str, Any]


class _Layout:
    """How one committed version of the set maps onto the model's outputs: one column index per value."""

    __slots__ = ("index", "meta")

    def __init__(self, meta: SetMeta, index: dict[str, np.ndarray] | None) -> None:
        self.meta = meta
        self.index = index  # output -> column indices; None: the set lacks a declared column


class PrecomputedFirst:
    """Answers requests to models with ``manifest.precomputed`` from ``cache``; thread-safe."""

    def __init__(self, cache: FeatureCache | None, registry: CollectorRegistry | None = None) -> None:
        self.cache = cache
        self.registry = registry
        self._metrics: JoinMetrics | None = None  # at the first answer: no series on agents without such models
        self._layouts: dict[str, tuple[Precomputed, _Layout]] = {}  # model name -> its declaration's layout

    def first(self, model: LoadedModel, request: InferRequest) -> Answer:
        """Serve ``request`` from the cache if every named entity's row is fresh; else say why (or raise)."""
        manifest = model.manifest
        decl = manifest.precomputed
        assert decl is not None, "only for models that declare precomputed"
        entities = entity_ids(request.parameters) if request.parameters else None
        if entities is None:
            return self._miss(manifest, decl, request, "no_entity", None)
        model.check_batch(len(entities))
        one_row_per_entity(request.inputs, len(entities))
        rows = self._rows(decl, entities)
        if rows is None:
            return self._miss(manifest, decl, request, "not_cached", None)
        for entity, row in zip(entities, rows, strict=True):
            if row is None:
                return self._miss(manifest, decl, request, "missing", entity)
            if row.expired or row.age_s > decl.max_age_s:
                return self._miss(manifest, decl, request, "stale", row)
        first = rows[0]
        assert first is not None
        layout = self._layout(manifest.name, decl, first.meta)
        if layout.index is None:
            return self._miss(manifest, decl, request, "not_cached", None)
        values = first.values[None] if len(rows) == 1 else np.stack([r.values for r in rows if r is not None])
        outputs = self._outputs(manifest, layout.index, values, request)
        age = max(r.age_s for r in rows if r is not None)
        self._count(manifest.name, PRECOMPUTED)
        info = {"set": decl.set, "version": first.version, "age_s": round(age, 3)}
        return Answer(outputs, {SOURCE: PRECOMPUTED, PRECOMPUTED: info})

    def live(self, model: LoadedModel, answer: Answer, join_params: dict[str, Any] | None) -> dict[str, Any]:
        """The parameters of an answer that ran live (the join's, if any, and the source); counts it."""
        self._count(model.name, LIVE)
        return answer.params if join_params is None else {**join_params, **answer.params}

    def _count(self, model: str, source: str) -> None:
        metrics = self._metrics
        if metrics is None and self.registry is not None:
            metrics = self._metrics = JoinMetrics.of(self.registry)
        if metrics is not None:
            metrics.source(model, source)

    # -- reading -----------------------------------------------------------------------
    def _rows(self, decl: Precomputed, entities: list[str]) -> list[FeatureRow | None] | None:
        """One row (or None) per entity from one committed version of the set; None when not cached."""
        cache = self.cache
        if cache is None:
            return None
        try:
            if len(entities) == 1:
                return [cache.get(decl.set, entities[0])]
            return cache.get_many(decl.set, entities)
        except FeatureSetNotFound:
            return None

    def _layout(self, model: str, decl: Precomputed, meta: SetMeta) -> _Layout:
        """The column map of this model version and set version (rebuilt when either changes)."""
        cached = self._layouts.get(model)
        if cached is not None and cached[0] is decl and cached[1].meta is meta:
            return cached[1]
        position = {name: i for i, name in enumerate(meta.features)}
        known = all(c in position for cols in decl.outputs.values() for c in cols)
        index = (
            {o: np.array([position[c] for c in cols], np.intp) for o, cols in decl.outputs.items()} if known else None
        )
        layout = _Layout(meta, index)
        self._layouts[model] = (decl, layout)
        return layout

    @staticmethod
    def _outputs(
        manifest: Manifest, index: dict[str, np.ndarray], values: np.ndarray, request: InferRequest
    ) -> dict[str, np.ndarray]:
        """The model's outputs, shaped as a live answer's; raw quantized integers where the request asks."""
        raw = request.raw_outputs
        if request.outputs:
            names = [s.name for s in manifest.outputs]
            for o in request.outputs:
                if o.name not in names:
                    raise RequestError(f"unknown output {o.name!r}; model {manifest.name!r} has {names}")
        n = len(values)
        out: dict[str, np.ndarray] = {}
        for spec in manifest.outputs:
            real = values[:, index[spec.name]].reshape((n, *spec.shape[1:]))
            if spec.name in raw and spec.quantization is not None:
                out[spec.name] = quantize(real, spec.quantization, np.dtype(spec.dtype))
            else:
                out[spec.name] = real.astype(V2_TO_NUMPY[spec.datatype], copy=False)
        return out

    # -- misses --------------------------------------------------------------------------
    def _miss(self, manifest: Manifest, decl: Precomputed, request: InferRequest, why: str, about: Any) -> Answer:
        """Run live when the request carries the live inputs; else the join's 404 / 409 / 503."""
        live = [s.name for s in manifest.inputs if s.name not in manifest.feature_joins]
        if why == "no_entity" or all(name in request.inputs for name in live):
            return Answer(None, {SOURCE: LIVE, PRECOMPUTED: {"set": decl.set, "miss": why}})
        what = f"model {manifest.name!r} has no precomputed answer"
        hint = f"send input(s) {live} to run it live"
        if why == "missing":
            raise FeatureNotFound(f"{what} for entity {about!r} in feature set {decl.set!r}; {hint}")
        if why == "stale":
            row: FeatureRow = about
            raise FeatureExpired(
                f"{what} for entity {row.entity!r} fresh enough: its row in feature set {decl.set!r} (version "
                f"{row.version}) is {row.age_s:.1f}s old, over max_age_s {decl.max_age_s:g}"
                + (f" or the set's ttl {row.meta.ttl_s:g}s" if row.meta.ttl_s is not None else "")
                + f"; {hint}",
                row,
            )
        raise FeaturesNotReady(
            f"{what}: feature set {decl.set!r} is not cached on this device (or lacks the columns "
            f"{sorted({c for cols in decl.outputs.values() for c in cols})[:5]} it declares); {hint}"
        )


__all__ = ["LIVE", "MISSES", "PRECOMPUTED", "Answer", "PrecomputedFirst"]
