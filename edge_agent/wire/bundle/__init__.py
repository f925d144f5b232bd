"""Feature bundles: the artifact that carries a feature set's values from the cloud to a device.

A bundle is a directory (the OTA transfer packs it with ``protocol.pack_dir``) holding two files::

    bundle.json   what the bundle is (below)
    data.npz      entities  <U  [N]     entity ids, unique, non-empty, sorted ascending when written here
                  event_ts  f8  [N]     epoch seconds of the data each row was computed from
                  values    dtype [N,F] one row per entity, columns in ``features`` order
                  deleted   <U  [M]     entity ids to drop (deltas only; absent or empty in snapshots)

``bundle.json``::

    {"schema_version": 1, "type": "feature_bundle", "set": "maintenance", "version": "42",
     "kind": "snapshot" | "delta", "base_version": null | "41",
     "entity_key": "asset_id", "features": [{"name": "temperature_mean_24h", "dtype": "float32"}, ...],
     "ttl_s": 86400 | null, "stale_policy": "reject" | "serve",
     "partition": {"by": "device" | "group" | null, "key": "cam-7" | null},
     "rows": N, "deletes": M, "created_at": "2026-11-28T16:00:00+00:00", "data_sha256": "<64 hex>"}

Rules a reader enforces (``read_bundle``; ``write_bundle`` applies the same ones, so a writer
cannot produce a bundle devices refuse):

- **Numbers only.** Every feature of a set has the same dtype, one of ``float64``, ``float32``,
  ``int64``: a row is one row of a model's input tensor and is stored packed. Strings, booleans,
  objects and mixed dtypes are refused; split such data into several sets.
- **No NaN, no infinity.** A non-finite value is refused, naming the entity and feature. "Missing"
  is expressed by leaving the entity out (the device then reports it unknown); imputation belongs in
  the batch job, where the training pipeline defines it, so a device serves exactly what the model
  was trained on (``asset_features`` already promises no NaN). ``event_ts`` must be finite and >= 0.
- **Unique keys.** An entity id appears at most once in ``entities``, at most once in ``deleted``,
  and never in both. Ids are non-empty, valid UTF-8, without NUL, at most 256 characters.
- **Integrity.** ``data_sha256`` is the SHA-256 of ``data.npz``; ``rows``/``deletes``/the feature
  list must agree with the arrays; ``data.npz`` is loaded with ``allow_pickle=False``.
- **Deltas** carry ``base_version`` (the version they were computed against); snapshots carry null.
- ``ttl_s``: a value older than this (``now - event_ts > ttl_s``) is *expired* when read; null means
  never. ``stale_policy`` says what a join does with an expired value: ``reject`` (treat as missing)
  or ``serve`` (use it, flagged).

Whether a version is newer than what the device holds, and whether a delta's base matches, are
decided by the device's feature cache (``edge_agent.features.plan``).

Modules: ``info`` (``bundle.json`` and its rules, the error classes), ``arrays`` (the rules on
the arrays), ``read`` and ``write``. Import from this package, not from them.

Errors (in ``edge_agent.errors``)::

    RejectedError
    └── BundleRejected              .code says which rule; final for this bundle
        ├── BundleSchemaError       "schema": bundle.json malformed, shapes/dtypes disagree, delta without base
        ├── BundleValueError        "values": non-numeric, NaN/inf, bad event_ts
        ├── BundleKeyError          "keys": empty, duplicate, or both upserted and deleted entity ids
        └── BundleIntegrityError    "integrity": missing/unreadable files, data_sha256 mismatch, too large
"""

from edge_agent.wire.bundle.info import (
    BUNDLE_FILE,
    BUNDLE_TYPE,
    DATA_FILE,
    DTYPES,
    KINDS,
    MAX_ENTITY_LEN,
    PARTITION_BY,
    SCHEMA_VERSION,
    STALE_POLICIES,
    Bundle,
    BundleInfo,
    FeatureSpec,
)
from edge_agent.wire.bundle.read import read_bundle, read_info
from edge_agent.wire.bundle.write import write_bundle

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_TYPE",
    "DATA_FILE",
    "DTYPES",
    "KINDS",
    "MAX_ENTITY_LEN",
    "PARTITION_BY",
    "SCHEMA_VERSION",
    "STALE_POLICIES",
    "Bundle",
    "BundleInfo",
    "FeatureSpec",
    "read_bundle",
    "read_info",
    "write_bundle",
]
