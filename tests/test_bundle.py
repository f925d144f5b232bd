"""Feature bundles: the on-disk format, its round trip, and every rule a device enforces."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from edge_agent.errors import (
    BundleIntegrityError,
    BundleKeyError,
    BundleRejected,
    BundleSchemaError,
    BundleValueError,
    RejectedError,
)
from edge_agent.wire.bundle import BUNDLE_FILE, DATA_FILE, FeatureSpec, read_bundle, read_info, write_bundle
from edge_agent.wire.protocol import pack_dir, unpack_to

REPO = Path(__file__).resolve().parents[1]
NAMES = ["temp_mean", "temp_std", "vib_mean"]


def _write(path: Path, **kw: Any):
    args: dict[str, Any] = dict(
        set="maint",
        version="2",
        kind="snapshot",
        entities=["b", "a", "c"],
        event_ts=[10.0, 20.0, 30.0],
        values=np.arange(9, dtype=np.float32).reshape(3, 3),
        features=NAMES,
        ttl_s=3600,
    )
    args.update(kw)
    return write_bundle(path, **args)


def _tamper(
    path: Path,
    meta: dict[str, Any] | None = None,
    arrays: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    fix_sha: bool = True,
) -> None:
    """Rewrite a bundle's JSON and/or arrays the way a broken producer would."""
    raw = json.loads((path / BUNDLE_FILE).read_text())
    if arrays is not None or drop:
        with np.load(path / DATA_FILE, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files if k not in drop}
        data.update(arrays or {})
        with open(path / DATA_FILE, "wb") as fh:
            np.savez(fh, **data)
        if fix_sha:
            raw["data_sha256"] = hashlib.sha256((path / DATA_FILE).read_bytes()).hexdigest()
    raw.update(meta or {})
    for key in [k for k, v in raw.items() if v is _DROP]:
        del raw[key]
    (path / BUNDLE_FILE).write_text(json.dumps(raw))


_DROP = object()


def feature_list(*specs: str) -> list[dict[str, str]]:
    """``"name:dtype"`` per feature, as bundle.json spells them (bad schemas read one per line)."""
    return [dict(zip(("name", "dtype"), spec.split(":"), strict=True)) for spec in specs]


def test_round_trip_sorts_by_entity_and_keeps_rows_together(tmp_path: Path) -> None:
    info = _write(tmp_path / "b", partition={"by": "group", "key": "line-3"}, stale_policy="serve")
    assert (tmp_path / "b" / BUNDLE_FILE).is_file() and (tmp_path / "b" / DATA_FILE).is_file()
    b = read_bundle(tmp_path / "b")
    assert b.info == info == read_info(tmp_path / "b")
    assert b.info.feature_names == tuple(NAMES) and b.info.dtype == np.dtype("<f4")
    assert b.entities.tolist() == ["a", "b", "c"]
    assert b.event_ts.tolist() == [20.0, 10.0, 30.0]
    assert b.values.tolist() == [[3, 4, 5], [0, 1, 2], [6, 7, 8]]
    assert b.deleted.tolist() == []
    assert b.info.partition == {"by": "group", "key": "line-3"} and b.info.stale_policy == "serve"
    raw = json.loads((tmp_path / "b" / BUNDLE_FILE).read_text())
    assert raw["schema_version"] == 1 and raw["type"] == "feature_bundle" and raw["rows"] == 3
    assert raw["data_sha256"] == hashlib.sha256((tmp_path / "b" / DATA_FILE).read_bytes()).hexdigest()


def test_delta_round_trip_and_through_the_ota_packing(tmp_path: Path) -> None:
    _write(
        tmp_path / "d",
        version="3",
        kind="delta",
        base_version="2",
        entities=["x"],
        event_ts=5.0,
        values=[[1, 2, 3]],
        deleted=["a", "q"],
        features=[FeatureSpec(n, "int64") for n in NAMES],
    )
    blob = pack_dir(tmp_path / "d")
    (tmp_path / "art.tar").write_bytes(blob)
    assert sorted(unpack_to(tmp_path / "art.tar", tmp_path / "out")) == [BUNDLE_FILE, DATA_FILE]
    b = read_bundle(tmp_path / "out")
    assert (b.info.kind, b.info.base_version, b.info.dtype) == ("delta", "2", np.dtype("<i8"))
    assert b.values.tolist() == [[1, 2, 3]] and b.event_ts.tolist() == [5.0]
    assert b.deleted.tolist() == ["a", "q"]


def test_empty_snapshot_is_valid(tmp_path: Path) -> None:
    _write(tmp_path / "e", entities=[], event_ts=[], values=np.empty((0, 3), np.float32))
    b = read_bundle(tmp_path / "e")
    assert b.info.rows == 0 and b.values.shape == (0, 3)


def test_unknown_top_level_keys_survive(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    _tamper(tmp_path / "b", meta={"future_field": {"x": 1}})
    assert read_bundle(tmp_path / "b").info.to_dict()["future_field"] == {"x": 1}


def test_maintenance_asset_features_make_a_bundle(tmp_path: Path) -> None:
    """The cloud's per-asset aggregates fit the format as they are, in the model's feature order."""
    from cloud_batch.train.maintenance.data import generate
    from cloud_batch.train.maintenance.features import FEATURE_NAMES, asset_features

    manifest = json.loads((REPO / "models" / "maintenance" / "1" / "manifest.json").read_text())
    df = generate(n_assets=5, days=10, seed=0)
    as_of = pd.Timestamp(df["timestamp"].max())
    feats = asset_features(df, as_of)
    info = write_bundle(
        tmp_path / "m",
        "maintenance",
        "1",
        "snapshot",
        feats.index.to_numpy(str),
        as_of.timestamp(),
        feats.to_numpy(),
        list(FEATURE_NAMES),
        ttl_s=86400,
    )
    b = read_bundle(tmp_path / "m")
    assert list(b.info.feature_names) == manifest["feature_names"]["asset_features"]
    assert info.dtype == np.float32 and b.values.shape == (len(feats), len(FEATURE_NAMES))


# -- every rule, its own error ------------------------------------------------------------
@pytest.mark.parametrize(
    "meta, message",
    [
        ({"schema_version": 2}, "schema_version"),
        ({"schema_version": _DROP}, "schema_version"),
        ({"type": "model"}, "type must be"),
        ({"set": "../etc"}, "feature set name"),
        ({"version": "v2"}, "version"),
        ({"kind": "patch"}, "kind"),
        ({"ttl_s": -1}, "ttl_s"),
        ({"ttl_s": "1h"}, "ttl_s"),
        ({"stale_policy": "maybe"}, "stale_policy"),
        ({"features": []}, "features"),
        ({"features": feature_list("a:float16", "b:float16", "c:float16")}, "numbers only"),
        ({"features": feature_list("a:string", "b:string", "c:string")}, "numbers only"),
        ({"features": feature_list("a:float32", "a:float32", "c:float32")}, "duplicate feature"),
        ({"features": feature_list("a:float32", "b:int64", "c:float32")}, "mixed dtypes"),
        ({"features": [{"name": "a", "dtype": "float32"}, {"name": "b", "dtype": "float32"}]}, "shape"),
        ({"features": [{"name": n, "dtype": "float64"} for n in NAMES]}, "does not match the declared"),
        ({"rows": 4}, "rows=4"),
        ({"deletes": 1}, "snapshot cannot delete"),
        ({"partition": {"by": "region", "key": "x"}}, "partition"),
        ({"base_version": "1"}, "snapshot must have base_version null"),
        ({"data_sha256": "XYZ"}, "data_sha256"),
        ({"ttl_s": _DROP}, "missing field 'ttl_s'"),
    ],
)
def test_bad_schema_is_a_schema_error(tmp_path: Path, meta: dict[str, Any], message: str) -> None:
    _write(tmp_path / "b")
    _tamper(tmp_path / "b", meta=meta)
    with pytest.raises(BundleSchemaError, match=message) as err:
        read_bundle(tmp_path / "b")
    assert err.value.code == "schema" and isinstance(err.value, RejectedError)


def test_bundle_json_that_is_not_json(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    (tmp_path / "b" / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(BundleSchemaError, match="not valid JSON"):
        read_bundle(tmp_path / "b")


def test_delta_without_base_version(tmp_path: Path) -> None:
    with pytest.raises(BundleSchemaError, match="needs base_version"):
        _write(tmp_path / "w", kind="delta")  # the writer refuses it too
    _write(tmp_path / "b", version="3", kind="delta", base_version="2")
    _tamper(tmp_path / "b", meta={"base_version": None})
    with pytest.raises(BundleSchemaError, match="needs base_version"):
        read_bundle(tmp_path / "b")
    _tamper(tmp_path / "b", meta={"base_version": "3"})
    with pytest.raises(BundleSchemaError, match="not older"):
        read_bundle(tmp_path / "b")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"values": np.array([["a", "b", "c"]] * 3)}, "numbers only"),
        ({"values": np.ones((3, 3), dtype=bool)}, "numbers only"),
        ({"values": np.array([[1, 2, np.nan], [0, 0, 0], [0, 0, 0]], dtype=np.float32)}, "NaN and infinity"),
        ({"values": np.array([[1, 2, 3], [0, np.inf, 0], [0, 0, 0]], dtype=np.float32)}, "NaN and infinity"),
        ({"event_ts": np.array([1.0, np.nan, 2.0])}, "event_ts"),
        ({"event_ts": np.array([1.0, -5.0, 2.0])}, "event_ts"),
        ({"event_ts": np.array(["now", "now", "now"])}, "event_ts must be numeric"),
    ],
)
def test_non_numeric_or_non_finite_values_are_value_errors(
    tmp_path: Path, arrays: dict[str, Any], message: str
) -> None:
    _write(tmp_path / "b")
    _tamper(tmp_path / "b", arrays=arrays)
    with pytest.raises(BundleValueError, match=message) as err:
        read_bundle(tmp_path / "b")
    assert err.value.code == "values"


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    _tamper(tmp_path / "b", arrays={"values": np.array([[{"x": 1}] * 3] * 3, dtype=object)})
    with pytest.raises(BundleValueError, match="not a numeric/string array"):
        read_bundle(tmp_path / "b")


def test_the_writer_refuses_what_a_reader_would(tmp_path: Path) -> None:
    with pytest.raises(BundleValueError, match="NaN"):
        _write(tmp_path / "a", values=np.full((3, 3), np.nan))
    with pytest.raises(BundleValueError, match="numbers only"):
        _write(tmp_path / "b", values=[["x", "y", "z"]] * 3)
    with pytest.raises(BundleValueError, match="int64"):
        _write(tmp_path / "c", values=np.ones((3, 3)), features=[FeatureSpec(n, "int64") for n in NAMES])
    with pytest.raises(BundleKeyError, match="duplicate"):
        _write(tmp_path / "d", entities=["a", "b", "a"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "arrays, meta, message",
    [
        ({"entities": np.array(["a", "b", "a"])}, {}, "duplicate entity id 'a'"),
        ({"entities": np.array(["a", "", "c"])}, {}, "empty entity id"),
        ({"entities": np.array([1, 2, 3])}, {}, "unicode string array"),
        ({"deleted": np.array(["x", "x"])}, {"deletes": 2}, "deleted: duplicate entity id 'x'"),
        ({"deleted": np.array(["z", "b"])}, {"deletes": 2}, "both upserted and deleted"),
    ],
)
def test_bad_keys_are_key_errors(tmp_path: Path, arrays: dict[str, Any], meta: dict[str, Any], message: str) -> None:
    _write(tmp_path / "b", version="3", kind="delta", base_version="2")
    _tamper(tmp_path / "b", meta=meta, arrays=arrays)
    with pytest.raises(BundleKeyError, match=message) as err:
        read_bundle(tmp_path / "b")
    assert err.value.code == "keys"


def test_sha_mismatch_is_an_integrity_error(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    _tamper(tmp_path / "b", arrays={"values": np.zeros((3, 3), np.float32)}, fix_sha=False)
    with pytest.raises(BundleIntegrityError, match="sha256") as err:
        read_bundle(tmp_path / "b")
    assert err.value.code == "integrity"


def test_missing_or_unreadable_files_are_integrity_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleIntegrityError, match="not found"):
        read_bundle(tmp_path / "nothing")
    _write(tmp_path / "b")
    (tmp_path / "b" / DATA_FILE).write_bytes(b"not a zip")
    _tamper(tmp_path / "b", meta={"data_sha256": hashlib.sha256(b"not a zip").hexdigest()})
    with pytest.raises(BundleIntegrityError, match="readable"):
        read_bundle(tmp_path / "b")
    (tmp_path / "b" / DATA_FILE).unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        read_bundle(tmp_path / "b")


def test_missing_and_unexpected_arrays(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    _tamper(tmp_path / "b", drop=("event_ts",))
    with pytest.raises(BundleSchemaError, match="lacks arrays"):
        read_bundle(tmp_path / "b")
    _write(tmp_path / "c")
    _tamper(tmp_path / "c", arrays={"extra": np.zeros(3)})
    with pytest.raises(BundleSchemaError, match="unexpected arrays"):
        read_bundle(tmp_path / "c")


def test_max_rows_refuses_before_loading(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    (tmp_path / "b" / DATA_FILE).unlink()  # never read: the declared row count already exceeds
    with pytest.raises(BundleIntegrityError, match="exceed"):
        read_bundle(tmp_path / "b", max_rows=2)


def test_every_rejection_is_a_bundle_rejected() -> None:
    for cls in (BundleSchemaError, BundleValueError, BundleKeyError, BundleIntegrityError):
        assert issubclass(cls, BundleRejected) and issubclass(cls, RejectedError)
