"""Request-time feature joins: fill a model's declared inputs from the feature cache for the entity a request names.

A model's manifest declares which inputs come from which cached feature set
(``manifest.feature_joins``, see ``manifest.py``). A V2 infer request then names the entity
instead of sending those inputs::

    {"parameters": {"entity_id": "asset-17"}, "inputs": [{"name": "live", ...}]}          batch of 1
    {"parameters": {"entity_ids": ["asset-17", "asset-4"]}, "inputs": [... batch of 2]}   one row per entity

and :meth:`Joiner.fill` reads one row per entity (one primary-key probe each, ``FeatureCache``),
reorders its values from the set's feature order to the input's column order (an index map
computed once per model version and set version), and adds the input to the request.

Rules:

- **The client wins.** A joined input the request carries itself is used as sent and not read
  from the cache (what-if calls, backfills, clients that already hold the features). A request
  carrying every joined input is served exactly like a model without joins.
- **Unknown entity**: ``FeatureNotFound`` (HTTP 404) naming the entity and the set, unless the
  join declares a ``default`` row: then that row is used and the response says so.
- **Stale value** (older than the set's ``ttl_s``): under ``stale_policy = "reject"``
  ``FeatureExpired`` (HTTP 409: the request is fine, the device's copy of the features is not);
  under ``"serve"`` the value is used and flagged.
- **Set not cached** (or cached without a feature the model needs): ``FeaturesNotReady``
  (HTTP 503): the device has not received the data yet; a default row does not paper over that.

The response ``parameters`` report what was used, per set::

    {"features": {"asset_features": {"version": "3", "age_s": 12.5, "stale": false, "default": false}},
     "feature_stale": false, "feature_default": false}

``age_s`` is the age of the oldest row used (null when only defaults were used).

Errors::

    NotFoundError
    ├── features.FeatureNotFound    unknown entity and no default                  404
    └── features.FeatureExpired     stale value, stale_policy "reject"             409 (api.py)
    NotReadyError
    └── FeaturesNotReady            set not cached / lacks a feature the model needs  503
    RequestError                    entity_id/entity_ids malformed, batch mismatch  400
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_agent.errors import FeatureExpired, FeatureNotFound, FeatureSetNotFound, FeaturesNotReady, RequestError
from edge_agent.features.records import SetMeta, check_text
from edge_agent.wire.bundle import MAX_ENTITY_LEN
from edge_agent.wire.model.manifest import V2_TO_NUMPY, FeatureJoin, Manifest

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edge_agent.features.cache import FeatureCache
    from edge_agent.features.records import FeatureRow
    from edge_agent.wire.kserve_v2 import InferRequest

ENTITY_PARAM = "entity_id"
ENTITIES_PARAM = "entity_ids"
# Join outcomes counted per request and joined set (edgefleet_feature_joins_total{outcome}).
OUTCOMES = ("hit", "default", "stale_served", "missing", "stale_rejected", "not_ready")


def entity_ids(params: Mapping[str, Any]) -> list[str] | None:
    """The entities a request names (``entity_id`` or ``entity_ids``), or None; RequestError when malformed."""
    one, many = params.get(ENTITY_PARAM), params.get(ENTITIES_PARAM)
    if one is None and many is None:
        return None
    if one is not None and many is not None:
        raise RequestError(f"give parameters.{ENTITY_PARAM} or parameters.{ENTITIES_PARAM}, not both")
    if one is not None:
        _check_entity(one, f"parameters.{ENTITY_PARAM}")
        return [one]
    if not isinstance(many, list) or not many:
        raise RequestError(f"parameters.{ENTITIES_PARAM} must be a non-empty list of entity ids")
    for i, e in enumerate(many):
        _check_entity(e, f"parameters.{ENTITIES_PARAM}[{i}]")
    return many


def one_row_per_entity(inputs: Mapping[str, np.ndarray], n: int) -> None:
    """RequestError unless every input the request carries has a batch of ``n`` (the entities it names)."""
    for name, arr in inputs.items():
        if (arr.shape[0] if arr.ndim else 1) != n:
            raise RequestError(
                f"input {name!r} has a batch of {arr.shape[0] if arr.ndim else 1} but the "
                f"request names {n} entit{'y' if n == 1 else 'ies'}: one row per entity"
            )


def _check_entity(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ENTITY_LEN:
        raise RequestError(
            f"{where} must be a non-empty string of at most {MAX_ENTITY_LEN} characters, got {value!r:.60}"
        )
    check_text(value, where)


class JoinMetrics:
    """The feature cache's serving metrics in the API's registry (one per registry).

    ``edgefleet_feature_joins_total{model,set,outcome}`` and, for models that declare precomputed
    answers (``precomputed.py``), ``edgefleet_infer_source_total{model,source}``.
    """

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, JoinMetrics]] = weakref.WeakKeyDictionary()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self.joins = Counter(
            "edgefleet_feature_joins",
            f"Feature joins by model, feature set and outcome ({', '.join(OUTCOMES)}).",
            ("model", "set", "outcome"),
            registry=registry,
        )
        self.sources = Counter(
            "edgefleet_infer_source",
            "Answers of models with precomputed outputs, by model and source (precomputed, live).",
            ("model", "source"),
            registry=registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}

    @classmethod
    def of(cls, registry: CollectorRegistry) -> JoinMetrics:
        with cls._lock:
            m = cls._by_registry.get(registry)
            if m is None:
                m = cls._by_registry[registry] = cls(registry)
            return m

    def count(self, model: str, feature_set: str, outcome: str) -> None:
        key = (model, feature_set, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.joins.labels(model, feature_set, outcome)
        child.inc()

    def source(self, model: str, source: str) -> None:
        key = (model, source)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.sources.labels(model, source)
        child.inc()


class _Plan:
    """How one committed version of a set maps onto one joined input: the column index map."""

    __slots__ = ("index", "meta")

    def __init__(self, meta: SetMeta, index: np.ndarray | None) -> None:
        self.meta = meta
        self.index = index  # None: the set's feature order already is the input's column order


class Joiner:
    """Fills the joined inputs of one model version from ``cache``; thread-safe, built once per model version."""

    def __init__(self, manifest: Manifest, cache: FeatureCache | None, metrics: JoinMetrics | None = None) -> None:
        self.manifest = manifest
        self.cache = cache
        self.metrics = metrics
        self.joins: tuple[FeatureJoin, ...] = tuple(manifest.feature_joins.values())
        specs = {s.name: s for s in manifest.inputs}
        self._datatype = {j.input: specs[j.input].datatype for j in self.joins}
        self._dtype = {j.input: V2_TO_NUMPY[specs[j.input].datatype] for j in self.joins}
        self._default = {
            j.input: None if j.default is None else np.asarray(j.default, self._dtype[j.input]) for j in self.joins
        }
        self._plans: dict[str, _Plan] = {}  # input name -> plan for the set version seen last

    def fill(self, request: InferRequest) -> dict[str, Any] | None:
        """Add the joined inputs ``request`` lacks; return the response parameters (None: nothing to join)."""
        todo = [j for j in self.joins if j.input not in request.inputs]
        if not todo:
            return None
        entities = entity_ids(request.parameters)
        m = self.manifest
        if entities is None:
            j = todo[0]
            raise RequestError(
                f"model {m.name!r} fills input {j.input!r} from feature set {j.set!r}: name the "
                f"entity in parameters.{ENTITY_PARAM} (or {ENTITIES_PARAM}), or send the input"
            )
        n = len(entities)
        one_row_per_entity(request.inputs, n)
        cache = self.cache
        if cache is None:
            raise FeaturesNotReady(
                f"model {m.name!r} joins feature set {todo[0].set!r} but this agent has no feature cache"
            )
        used: dict[str, dict[str, Any]] = {}
        any_stale = any_default = False
        for j in todo:
            arr, info = self._join(cache, j, entities)
            request.inputs[j.input] = arr
            request.datatypes[j.input] = self._datatype[j.input]
            used[j.set] = info
            any_stale = any_stale or info["stale"]
            any_default = any_default or info["default"]
        return {"features": used, "feature_stale": any_stale, "feature_default": any_default}

    # -- one input ---------------------------------------------------------------------
    def _join(self, cache: FeatureCache, j: FeatureJoin, entities: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            if len(entities) == 1:
                rows: list[FeatureRow | None] = [cache.get(j.set, entities[0])]
            else:
                rows = cache.get_many(j.set, entities)
        except FeatureSetNotFound as exc:
            self._count(j, "not_ready")
            raise FeaturesNotReady(
                f"feature set {j.set!r} is not cached on this device yet (model "
                f"{self.manifest.name!r} {self.manifest.version} joins it into input "
                f"{j.input!r})"
            ) from exc
        width = len(j.features)
        out = np.empty((len(entities), width), self._dtype[j.input])
        version: str | None = None
        age: float | None = None
        stale = defaulted = False
        for i, row in enumerate(rows):
            if row is None:
                default = self._default[j.input]
                if default is None:
                    self._count(j, "missing")
                    held = cache.version(j.set)
                    if held is None:  # the set was deleted between the two reads
                        raise FeaturesNotReady(f"feature set {j.set!r} is not cached on this device")
                    raise FeatureNotFound(
                        f"entity {entities[i]!r} is not in feature set {j.set!r} (version "
                        f"{held}) and model {self.manifest.name!r} declares no default for "
                        f"input {j.input!r}"
                    )
                out[i] = default
                defaulted = True
                continue
            if row.expired:
                if row.meta.stale_policy != "serve":
                    self._count(j, "stale_rejected")
                    raise FeatureExpired(
                        f"features of entity {entities[i]!r} in set {j.set!r} (version {row.version}) are stale: "
                        f"age {row.age_s:.1f}s > ttl {row.meta.ttl_s:g}s and the set's stale_policy is reject",
                        row,
                    )
                stale = True
            out[i] = self._columns(j, row)
            version = row.version
            age = row.age_s if age is None else max(age, row.age_s)
        if version is None:  # only defaults: report the version the cache holds
            version = cache.version(j.set)
        self._count(j, "stale_served" if stale else "default" if defaulted else "hit")
        return out, {
            "version": version,
            "age_s": None if age is None else round(age, 3),
            "stale": stale,
            "default": defaulted,
        }

    def _columns(self, j: FeatureJoin, row: FeatureRow) -> np.ndarray:
        plan = self._plans.get(j.input)
        if plan is None or plan.meta is not row.meta:  # first use, or another committed version of the set
            plan = self._plans[j.input] = self._plan(j, row.meta)
        return row.values if plan.index is None else row.values[plan.index]

    def _plan(self, j: FeatureJoin, meta: SetMeta) -> _Plan:
        if meta.features == j.features:
            return _Plan(meta, None)
        position = {name: i for i, name in enumerate(meta.features)}
        missing = [f for f in j.features if f not in position]
        if missing:
            self._count(j, "not_ready")
            raise FeaturesNotReady(
                f"feature set {j.set!r} version {meta.version} lacks feature(s) {missing[:5]} that model "
                f"{self.manifest.name!r} {self.manifest.version} needs for input {j.input!r}"
            )
        return _Plan(meta, np.fromiter((position[f] for f in j.features), np.intp, len(j.features)))

    def _count(self, j: FeatureJoin, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count(self.manifest.name, j.set, outcome)


__all__ = [
    "ENTITIES_PARAM",
    "ENTITY_PARAM",
    "FeaturesNotReady",
    "JoinMetrics",
    "Joiner",
    "entity_ids",
    "one_row_per_entity",
]
