"""Property tests (#15): any input to a decoder gives a value or the package's own error, never another exception.

Covers the V2 codec (JSON and binary), the bundle reader, the MQTT document decoder and the
manifest parser. Bounded for CI (``FUZZ_EXAMPLES``, default 150 per property); ``make fuzz`` runs longer.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_agent.errors import BundleRejected, BundleSchemaError, EdgeError, ManifestError, RequestError
from edge_agent.jsonlimits import json_depth, loads_limited
from edge_agent.wire import kserve_v2 as v2
from edge_agent.wire import protocol
from edge_agent.wire.bundle import read_bundle
from edge_agent.wire.model.manifest import Manifest

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
DIGITS = Manifest.load(Path(__file__).resolve().parents[1] / "models" / "digits" / "1" / "manifest.json")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
datatypes = st.sampled_from([*v2.V2_TO_NUMPY, "BYTES", "FP8", 3])
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["pixels", "x", "", 1]), "datatype": datatypes},
    optional={
        "shape": st.lists(st.integers(-2, 70), max_size=20) | json_values,
        "data": st.lists(st.floats() | st.integers() | st.booleans(), max_size=70) | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 300)}) | json_values,
    },
)
requests = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"outputs": json_values, "parameters": json_values, "id": json_values},
)


def _decode(body: bytes, header_length: Any) -> None:
    try:
        request = v2.decode_request(body, header_length, max_elements=10_000)
        v2.check_request(request, DIGITS)
    except RequestError:
        pass


@FUZZ
@given(doc=requests)
def test_v2_json_requests(doc: dict[str, Any]) -> None:
    _decode(json.dumps(doc).encode(), None)


@FUZZ
@given(doc=requests, tail=st.binary(max_size=300), cut=st.integers(-5, 5))
def test_v2_binary_requests(doc: dict[str, Any], tail: bytes, cut: int) -> None:
    head = json.dumps(doc).encode()
    _decode(head + tail, len(head) + cut)


@FUZZ
@given(body=st.binary(max_size=400), header=st.none() | st.integers(-3, 500) | st.binary(max_size=6))
@example(body=b"[" * 100_000, header=None)
@example(body=b'{"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', header=None)
def test_v2_arbitrary_bytes(body: bytes, header: Any) -> None:
    _decode(body, header)


@FUZZ
@given(doc=json_values | st.fixed_dictionaries({"schema_version": st.just(1)}, optional={"name": json_values}))
def test_manifest_parser(doc: Any) -> None:
    try:
        Manifest.from_dict(doc)
    except ManifestError:
        pass


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"[" * 100_000)
def test_manifest_and_depth_limited_json(raw: bytes) -> None:
    try:
        loads_limited(raw, max_depth=32, what="manifest", error=ManifestError)
    except ManifestError:
        pass


@FUZZ
@given(payload=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
@example(payload=b"[" * 200_000)  # within the 256 KiB document limit: a RecursionError before the depth limit
@example(payload=b'{"release_id": NaN}')
def test_protocol_decoder(payload: bytes) -> None:
    try:
        doc = protocol.decode(payload, "release")
        protocol.Release.from_dict(doc)
    except EdgeError:
        pass


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@FUZZ
@given(
    info=json_values,
    rows=st.integers(0, 4),
    shape=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
    flip=st.integers(0, 400),
)
@example(info={}, rows=3, shape=[10**9, 3], flip=0)  # the npz bomb: 3 rows declared, a billion in the array header
def test_bundle_reader(tmp_path_factory: Any, info: Any, rows: int, shape: list[int], flip: int) -> None:
    root = tmp_path_factory.mktemp("b")
    good = {
        "entities": np.array([f"e{i}" for i in range(rows)]),
        "event_ts": np.zeros(rows),
        "values": np.zeros((rows, 2)),
    }
    blob = bytearray(_npz(good))
    # forge the "values" header's shape (no data behind it), as a crafted bundle would
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["values.npy"] = members["values.npy"].replace(str((rows, 2)).encode(), str(tuple(shape)).encode(), 1)
    blob = bytearray(_zip(members))
    if flip and flip < len(blob):
        blob[flip] ^= 0xFF
    _write_bundle_dir(root, bytes(blob), rows, info)
    try:
        read_bundle(root)
    except BundleRejected:
        pass


def _write_bundle_dir(root: Path, blob: bytes, rows: int, info: Any = None) -> None:
    """A bundle directory around ``blob`` (as data.npz) whose bundle.json hashes it, so the reader gets past integrity."""
    import hashlib

    doc = {
        "schema_version": 1,
        "type": "feature_bundle",
        "set": "s",
        "version": "1",
        "kind": "snapshot",
        "base_version": None,
        "entity_key": "id",
        "features": [{"name": "a", "dtype": "float64"}, {"name": "b", "dtype": "float64"}],
        "ttl_s": None,
        "stale_policy": "serve",
        "partition": {"by": None, "key": None},
        "rows": rows,
        "deletes": 0,
        "created_at": "",
        "data_sha256": hashlib.sha256(blob).hexdigest(),
    }
    if isinstance(info, dict):
        doc.update(info)
    (root / "bundle.json").write_text(json.dumps(doc))
    (root / "data.npz").write_bytes(blob)


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return out.getvalue()


def _one_row_members() -> dict[str, bytes]:
    members = {"entities": np.array(["e0"]), "event_ts": np.zeros(1), "values": np.zeros((1, 2))}
    with zipfile.ZipFile(io.BytesIO(_npz(members))) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_a_nul_byte_in_an_npy_header_is_a_rejection(tmp_path: Path) -> None:
    """numpy tokenizes .npy headers; on Python 3.12+ a NUL there is a tokenize.TokenError, not a ValueError."""
    files = _one_row_members()
    files["values.npy"] = files["values.npy"].replace(b"'descr'", b"'de\x00cr'", 1)
    _write_bundle_dir(tmp_path, _zip(files), rows=1)
    with pytest.raises(BundleRejected):
        read_bundle(tmp_path)


def test_an_npy_header_of_version_3_is_refused_by_name(tmp_path: Path) -> None:
    """Version 3.0 headers are not parsed apart from their array, so their shape cannot be checked first."""
    files = _one_row_members()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((1, 2)), version=(3, 0))
    files["values.npy"] = buf.getvalue()
    _write_bundle_dir(tmp_path, _zip(files), rows=1)
    with pytest.raises(BundleSchemaError, match=r"header other than 1\.0/2\.0"):
        read_bundle(tmp_path)


def test_a_corrupt_compressed_member_is_a_rejection(tmp_path: Path) -> None:
    """A deflated member whose stream is broken raises zlib.error inside numpy: still the bundle's own error."""
    blob = bytearray(_zip(_one_row_members(), zipfile.ZIP_DEFLATED))
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as zf:
        info = zf.getinfo("values.npy")
    data_at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    blob[data_at : data_at + 8] = b"\xff" * 8  # a deflate stream cannot start with a reserved block type
    _write_bundle_dir(tmp_path, bytes(blob), rows=1)
    with pytest.raises(BundleRejected):
        read_bundle(tmp_path)


_tricky_text = st.text(alphabet=st.sampled_from('"\\[]{}/ abé\u2028\n\t\x00'), max_size=8)
_tricky_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_tricky_text, inner, max_size=4),
    max_leaves=30,
)


def _walk_depth(value: Any) -> int:
    """Nesting depth of a parsed value: the oracle both byte-level implementations must match."""
    if isinstance(value, list):
        return 1 + max((_walk_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_walk_depth(v) for v in value.values()), default=0)
    return 0


def _numpy_depth(raw: bytes) -> int:
    """The previous json_depth (per-byte escape analysis in numpy), kept as a second oracle."""
    a = np.frombuffer(raw, np.uint8)
    if not len(a):
        return 0
    opens = np.zeros(256, np.int8)
    opens[[ord("["), ord("{")]] = 1
    opens[[ord("]"), ord("}")]] = -1
    quotes = a == ord('"')
    idx = np.arange(len(a))
    last_plain = np.maximum.accumulate(np.where(a != ord("\\"), idx, -1))
    run = np.empty(len(a), np.int64)
    run[0] = 0
    run[1:] = idx[:-1] - last_plain[:-1]
    real = quotes & (run % 2 == 0)
    outside = (np.cumsum(real) - real) % 2 == 0
    return int(np.cumsum(np.where(outside, opens[a], 0), dtype=np.int64).max(initial=0))


@FUZZ
@given(value=_tricky_json, ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]))
@example(value={'a\\"[[': [['"\\']]}, ascii_only=False, indent=None)
def test_json_depth_matches_old_and_parsed(value: Any, ascii_only: bool, indent: int | None) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    depth = json_depth(raw)
    assert depth == _walk_depth(json.loads(raw))
    assert depth == _numpy_depth(raw)
