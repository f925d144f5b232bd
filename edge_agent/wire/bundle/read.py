"""Reading a bundle directory on a device: header, integrity, then every array rule.

Nothing is allocated on a file's word: ``bundle.json`` is parsed with a depth limit, and each
array's ``.npy`` header (shape, dtype) is checked against ``bundle.json`` before the array is read,
so a small ``data.npz`` cannot declare gigabytes (an "npz bomb").
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from pathlib import Path

import numpy as np

from edge_agent.errors import BundleIntegrityError, BundleRejected, BundleSchemaError, BundleValueError
from edge_agent.jsonlimits import loads_limited
from edge_agent.wire.bundle.arrays import validate_arrays
from edge_agent.wire.bundle.info import BUNDLE_FILE, DATA_FILE, MAX_ENTITY_LEN, Bundle, BundleInfo
from edge_agent.wire.npy import NPY_ERRORS, read_header

_ARRAYS = ("entities", "event_ts", "values", "deleted")
MAX_JSON_DEPTH = 16  # bundle.json is 3 levels deep
_MAX_ITEMSIZE = 4 * MAX_ENTITY_LEN  # the widest array item a valid bundle has (an entity id as <U256)


def read_info(path: str | Path) -> BundleInfo:
    """Parse and validate ``bundle.json`` alone (cheap: no arrays, no hashing)."""
    file = Path(path) / BUNDLE_FILE
    if not file.exists():
        raise BundleIntegrityError(f"{file}: not found (is this a feature bundle directory?)")
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise BundleSchemaError(f"{file}: not valid JSON: cannot read it: {exc}") from exc
    return BundleInfo.from_dict(loads_limited(text, max_depth=MAX_JSON_DEPTH, what=str(file), error=BundleSchemaError))


def read_bundle(path: str | Path, *, max_rows: int | None = None) -> Bundle:
    """Read and fully validate a bundle directory; raise a BundleRejected subclass on any problem.

    ``max_rows`` refuses a bundle that declares more rows before its data is loaded (the cache
    passes its bound, so an oversized bundle does not cost a device its memory).
    """
    root = Path(path)
    info = read_info(root)
    if max_rows is not None and info.rows > max_rows:
        raise BundleIntegrityError(f"bundle {info.id}: {info.rows} rows exceed this device's limit of {max_rows}")
    data_file = root / DATA_FILE
    try:
        blob = data_file.read_bytes()
    except FileNotFoundError as exc:
        raise BundleIntegrityError(f"bundle {info.id}: {DATA_FILE} is missing") from exc
    except OSError as exc:
        raise BundleIntegrityError(f"bundle {info.id}: cannot read {DATA_FILE}: {exc}") from exc
    sha = hashlib.sha256(blob).hexdigest()
    if sha != info.data_sha256:
        raise BundleIntegrityError(
            f"bundle {info.id}: {DATA_FILE} has sha256 {sha[:12]}…, bundle.json says {info.data_sha256[:12]}…"
        )
    arrays = _load_npz(blob, info)
    bundle = validate_arrays(info, arrays["entities"], arrays["event_ts"], arrays["values"], arrays["deleted"])
    return Bundle(bundle.info, bundle.entities, bundle.event_ts, bundle.values, bundle.deleted, root)


def _load_npz(blob: bytes, info: BundleInfo) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        raise BundleIntegrityError(f"bundle {info.id}: {DATA_FILE} is not a readable .npz (not a zip archive)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            names = set(npz.files)
            unknown = names - set(_ARRAYS)
            if unknown:
                raise BundleSchemaError(f"bundle {info.id}: unexpected arrays in {DATA_FILE}: {sorted(unknown)}")
            missing = {"entities", "event_ts", "values"} - names
            if missing:
                raise BundleSchemaError(f"bundle {info.id}: {DATA_FILE} lacks arrays {sorted(missing)}")
            _check_headers(npz.zip, names, info)
            out = {}
            for k in names:
                try:
                    out[k] = npz[k]
                except ValueError as exc:  # allow_pickle=False refusing an object array
                    raise BundleValueError(f"bundle {info.id}: {k} is not a numeric/string array: {exc}") from exc
    except BundleRejected:
        raise
    except NPY_ERRORS as exc:
        raise BundleIntegrityError(f"bundle {info.id}: {DATA_FILE} is not a readable .npz: {exc}") from exc
    out.setdefault("deleted", np.empty(0, dtype="<U1"))
    return out


def _check_headers(zf: zipfile.ZipFile, names: set[str], info: BundleInfo) -> None:
    """Each array's declared shape and dtype against ``bundle.json``, read from its header alone."""
    expected = {
        "entities": (info.rows,),
        "event_ts": (info.rows,),
        "values": (info.rows, len(info.features)),
        "deleted": (info.deletes,),
    }
    for k in names:
        with zf.open(f"{k}.npy") as fh:
            header = read_header(fh)
        if header is None:
            raise BundleSchemaError(f"bundle {info.id}: {k} in {DATA_FILE} has an .npy header other than 1.0/2.0")
        shape, dtype = header.shape, header.dtype
        if len(shape) > 2 or math.prod(shape) > math.prod(expected[k]):  # smaller: validate_arrays words it
            raise BundleSchemaError(
                f"bundle {info.id}: {k} in {DATA_FILE} declares shape {tuple(shape)}, bundle.json implies {expected[k]}"
            )
        if dtype.itemsize > _MAX_ITEMSIZE:
            raise BundleSchemaError(f"bundle {info.id}: {k} in {DATA_FILE} has an oversized dtype {dtype}")
