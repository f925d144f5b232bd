"""The rules on a bundle's arrays, shared by the reader and the writer.

Numbers only, no NaN or infinity, finite ``event_ts`` >= 0, unique non-empty entity ids (never
both upserted and deleted), shapes that agree with ``bundle.json``. Rows come back sorted by entity
id so a device inserts in key order.
"""

from __future__ import annotations

import numpy as np

from edge_agent.errors import BundleKeyError, BundleSchemaError, BundleValueError, plain
from edge_agent.wire.bundle.info import DTYPES, MAX_ENTITY_LEN, Bundle, BundleInfo


def validate_arrays(
    info: BundleInfo, entities: np.ndarray, event_ts: np.ndarray, values: np.ndarray, deleted: np.ndarray
) -> Bundle:
    where = f"bundle {info.id}"
    entities = _check_ids(entities, f"{where}: entities")
    deleted = _check_ids(deleted, f"{where}: deleted")
    n, f = len(entities), len(info.features)
    if n != info.rows:
        raise BundleSchemaError(f"{where}: bundle.json says rows={info.rows}, entities has {n}")
    if len(deleted) != info.deletes:
        raise BundleSchemaError(f"{where}: bundle.json says deletes={info.deletes}, deleted has {len(deleted)}")
    # event_ts
    if event_ts.dtype.kind not in "fiu":
        raise BundleValueError(f"{where}: event_ts must be numeric epoch seconds, got dtype {event_ts.dtype}")
    if event_ts.shape != (n,):
        raise BundleSchemaError(f"{where}: event_ts has shape {event_ts.shape}, expected ({n},)")
    event_ts = np.ascontiguousarray(event_ts, dtype="<f8")
    bad = ~np.isfinite(event_ts) | (event_ts < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise BundleValueError(
            f"{where}: event_ts of entity {plain(entities[i])!r} is {plain(event_ts[i])!r} (need finite, >= 0)"
        )
    # values
    if values.dtype.kind not in "fiu":
        raise BundleValueError(
            f"{where}: values must be numbers ({'/'.join(DTYPES)}), got dtype {values.dtype} — features are numbers only"
        )
    if values.ndim != 2 or values.shape != (n, f):
        raise BundleSchemaError(
            f"{where}: values has shape {values.shape}, expected ({n}, {f}) for {f} features {list(info.feature_names)[:4]}…"
        )
    declared = info.dtype
    if values.dtype.newbyteorder("<") != declared:
        raise BundleSchemaError(
            f"{where}: values dtype {values.dtype} does not match the declared {info.features[0].dtype}"
        )
    values = np.ascontiguousarray(values, dtype=declared)
    if declared.kind == "f" and n:
        finite = np.isfinite(values)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise BundleValueError(
                f"{where}: {info.features[c].name} of entity {plain(entities[r])!r} is {plain(values[r, c])!r}; NaN and infinity "
                "are refused (impute in the batch job or leave the entity out)"
            )
    # keys: sort once, then duplicates are neighbours
    if n > 1 and not bool((entities[1:] > entities[:-1]).all()):
        order = np.argsort(entities, kind="stable")
        entities, event_ts, values = entities[order], event_ts[order], values[order]
    _no_duplicates(entities, f"{where}: entities")
    if len(deleted):
        deleted = np.sort(deleted)
        _no_duplicates(deleted, f"{where}: deleted")
        both = np.intersect1d(entities, deleted, assume_unique=True)
        if len(both):
            raise BundleKeyError(
                f"{where}: entity {str(both[0])!r} is both upserted and deleted ({len(both)} such ids)"
            )
    return Bundle(info, entities, event_ts, np.ascontiguousarray(values), deleted)


def _check_ids(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype.kind != "U":
        raise BundleKeyError(f"{where}: entity ids must be a unicode string array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise BundleSchemaError(f"{where}: expected a 1-D array, got shape {arr.shape}")
    if not len(arr):
        return arr
    lengths = np.char.str_len(arr)
    if (lengths == 0).any():
        raise BundleKeyError(f"{where}: empty entity id at index {int(np.argmin(lengths))}")
    if int(lengths.max()) > MAX_ENTITY_LEN:
        raise BundleKeyError(f"{where}: entity id longer than {MAX_ENTITY_LEN} characters")
    joined = "".join(arr.tolist())
    if "\x00" in joined:
        raise BundleKeyError(f"{where}: entity ids must not contain NUL")
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BundleKeyError(f"{where}: entity ids are not valid UTF-8 text: {exc}") from exc
    return arr


def _no_duplicates(sorted_ids: np.ndarray, where: str) -> None:
    if len(sorted_ids) > 1:
        dup = sorted_ids[1:] == sorted_ids[:-1]
        if dup.any():
            raise BundleKeyError(
                f"{where}: duplicate entity id {str(sorted_ids[1:][dup][0])!r} ({int(dup.sum())} duplicates)"
            )
