"""The Open Inference Protocol (KServe V2) infer request/response codec, without any HTTP framework.

Both tensor encodings of the REST binding are supported:

* JSON tensors: ``{"name", "shape", "datatype", "data"}`` with ``data`` a flat (row-major)
  or nested list;
* the binary tensor data extension: an input with ``parameters.binary_data_size`` takes its
  bytes from the part of the body after the JSON header, whose length the
  ``Inference-Header-Content-Length`` HTTP header gives. Outputs come back binary when
  requested with ``parameters.binary_data`` (per output) or ``parameters.binary_data_output``
  (request level, the default for every output).

Every mistake a client can make raises :class:`~edge_agent.errors.RequestError` with a
message naming the offending field; nothing here raises anything else for bad input. Limits:
JSON depth ``MAX_JSON_DEPTH``, ``MAX_DIMS`` dimensions, ``max_elements`` values (413), and
floating-point data must be finite: NaN/Infinity, overflowing numbers and non-finite binary values are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import PayloadTooLargeError, RequestError
from edge_agent.jsonlimits import loads_limited
from edge_agent.wire.model.manifest import NUMPY_TO_V2, V2_TO_NUMPY, Manifest

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
MAX_JSON_DEPTH = 64  # a request needs ~4 levels plus one per tensor dimension
MAX_DIMS = 16  # numpy allows 32 (1.x) or 64 (2.x); no TFLite model has more than a handful

# Little-endian dtypes: the binary tensor data extension is defined as little-endian.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {k: v.newbyteorder("<") for k, v in V2_TO_NUMPY.items()}
_JSON_KINDS: dict[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # target kind -> accepted JSON kinds
_KIND_NAMES = {"U": "strings", "S": "strings", "O": "null, mixed or out-of-range values", "b": "booleans"}
_KIND_NAMES.update(i="integers", u="integers", f="non-integer numbers", c="complex numbers")
_DTYPE_TO_V2: dict[np.dtype[Any], str] = {dt: v2 for v2, dt in V2_TO_NUMPY.items()}  # faster than dtype.name
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


@dataclass(slots=True)
class RequestedOutput:
    """One entry of the request's ``outputs`` list."""

    name: str
    binary_data: bool | None = None  # None: follow the request-level binary_data_output
    quantized: bool = False  # return the raw INT8/UINT8 values of a quantized output


@dataclass(slots=True)
class InferRequest:
    """A decoded infer request: input arrays (in the client's datatype) and what to send back."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]  # input name -> V2 datatype the client declared
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_data_output: bool = False

    @property
    def raw_outputs(self) -> frozenset[str]:
        """Outputs the client wants as raw quantized integers (for ``LoadedModel.predict``)."""
        if not self.outputs:
            return frozenset()
        return frozenset(o.name for o in self.outputs if o.quantized)

    @property
    def batch_size(self) -> int:
        """The largest leading dimension among the inputs (1 for scalars)."""
        return max((a.shape[0] if a.ndim else 1 for a in self.inputs.values()), default=1)


# -- decoding -----------------------------------------------------------------------------
def parse_header_length(value: str | bytes | int | None, body_len: int) -> int | None:
    """Validate an ``Inference-Header-Content-Length`` value against the body size."""
    if value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{HEADER_LENGTH} must be an integer, got {value!r:.40}") from None
    if n < 0 or n > body_len:
        raise RequestError(f"{HEADER_LENGTH} {n} is outside the request body ({body_len} bytes)")
    return n


def _binary_hint(header_length: int | None) -> str:
    return f" (binary tensor data needs the {HEADER_LENGTH} header)" if header_length is None else ""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise RequestError(f"{where}.parameters.{key} must be true or false, got {value!r:.40}")


def _dict_or_empty(value: Any, what: str, name: str | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(
            f"{what} {name!r} parameters must be an object" if name is not None else f"{what} must be an object"
        )
    return value


def _json_array(data: Any, dtype: np.dtype[Any], shape: list[int], count: int, name: str, datatype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: 'data' must be a list, got {type(data).__name__}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise RequestError(f"input {name!r}: 'data' is a ragged nested list; use a flat or rectangular list") from None
    if arr.size != count:
        raise RequestError(f"input {name!r}: 'data' has {arr.size} values but shape {shape} needs {count}")
    kind = arr.dtype.kind
    if kind not in _JSON_KINDS[dtype.kind]:
        what = _KIND_NAMES.get(kind, arr.dtype.name)
        raise RequestError(f"input {name!r}: 'data' holds {what}, which {datatype} does not accept")
    if dtype.kind in "iu" and kind in "iu" and arr.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise RequestError(f"input {name!r}: values outside the {datatype} range [{info.min}, {info.max}]")
    return _finite(arr.astype(dtype, copy=False).reshape(shape), name)


def _finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(f"input {name!r}: 'data' holds NaN or infinity (or a number beyond the datatype's range)")
    return arr


def decode_request(
    body: bytes | bytearray | memoryview,
    header_length: str | bytes | int | None = None,
    manifest: Manifest | None = None,
    *,
    allow_no_inputs: bool = False,
    max_elements: int | None = None,
) -> InferRequest:
    """Decode an infer request body; with ``manifest``, also check it against the model's spec.

    ``header_length`` is the ``Inference-Header-Content-Length`` header value, if any: the
    JSON part is then ``body[:header_length]`` and the rest is binary tensor data.
    ``allow_no_inputs`` accepts a request without tensors (a model whose every input is joined
    from the feature cache; the caller checks the request once it has filled them).
    ``max_elements`` bounds the values of all tensors together, checked before any is built.
    """
    n = parse_header_length(header_length, len(body))
    head: bytes | bytearray | memoryview
    binary: bytes | memoryview
    if n is None:
        head, binary = body, b""
    else:
        view = memoryview(body)
        head, binary = view[:n], view[n:]
    req = _parse_json(head, n)
    inputs = req.get("inputs")
    if allow_no_inputs and inputs is None:
        inputs = []
    if not isinstance(inputs, list) or not (inputs or allow_no_inputs):
        raise RequestError("request needs 'inputs': a non-empty list of tensors")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'id' must be a string")
    params = _dict_or_empty(req.get("parameters"), "parameters")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    arrays, datatypes = _decode_inputs(inputs, binary, n, max_elements)
    outputs = _decode_outputs(req.get("outputs"))
    request = InferRequest(arrays, datatypes, outputs or None, rid, params, binary_output)
    if manifest is not None:
        check_request(request, manifest)
    return request


def _parse_json(head: bytes | bytearray | memoryview, n: int | None) -> dict[str, Any]:
    """The JSON part of the body, which must be an object."""
    try:
        req = loads_limited(head, max_depth=MAX_JSON_DEPTH, what="request body", error=RequestError)
    except RequestError as exc:
        hint = _binary_hint(n) if "UTF-8" in str(exc) or "Extra data" in str(exc) else ""
        raise RequestError(f"{exc}{hint}") from None
    if not isinstance(req, dict):
        raise RequestError(f"request body must be a JSON object, got {type(req).__name__}")
    return req


def _decode_inputs(
    inputs: list[Any], binary: bytes | memoryview, n: int | None, max_elements: int | None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every input tensor, from JSON ``data`` or from its slice of the binary part, which they must use up."""
    arrays: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = total = 0
    binary_len = len(binary)
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise RequestError(f"inputs[{i}] must be an object")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"inputs[{i}] needs a 'name' string")
        if name in arrays:
            raise RequestError(f"input {name!r} given twice")
        shape, datatype, dtype = _tensor_header(name, t)
        count = math.prod(shape)
        total += count
        if max_elements is not None and total > max_elements:
            raise PayloadTooLargeError(
                f"input {name!r}: the request's tensors hold {total} or more values; the limit is {max_elements}"
            )
        tparams = t.get("parameters")
        size = None if tparams is None else _dict_or_empty(tparams, "input", name).get("binary_data_size")
        if size is not None:
            _check_binary_size(name, t, size, shape, datatype, count * dtype.itemsize, n)
            if offset + size > binary_len:
                raise RequestError(
                    f"binary tensor data too short: input {name!r} needs bytes {offset}..{offset + size}, "
                    f"the body carries {binary_len} after the JSON header"
                )
            arr = _finite(np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape), name)
            offset += size
        else:
            if "data" not in t:
                raise RequestError(f"input {name!r}: missing 'data' (or parameters.binary_data_size)")
            arr = _json_array(t["data"], dtype, shape, count, name, datatype)
        arrays[name] = arr
        datatypes[name] = datatype
    if offset != binary_len:
        raise RequestError(
            f"binary tensor data size mismatch: inputs declare {offset} bytes, the body carries {binary_len} after the JSON header"
        )
    return arrays, datatypes


def _tensor_header(name: str, t: Mapping[str, Any]) -> tuple[list[int], str, np.dtype[Any]]:
    """An input's shape, datatype and wire dtype, each checked."""
    shape = t.get("shape")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r:.60}")
    if len(shape) > MAX_DIMS:
        raise RequestError(f"input {name!r}: 'shape' has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    datatype = t.get("datatype")
    if not isinstance(datatype, str):
        raise RequestError(f"input {name!r}: missing 'datatype'")
    dtype = _WIRE_DTYPES.get(datatype)
    if dtype is None:
        if datatype == "BYTES":
            raise RequestError(f"input {name!r}: datatype BYTES is not supported by this server")
        raise RequestError(f"input {name!r}: unknown datatype {datatype!r}; use one of {sorted(_WIRE_DTYPES)}")
    if math.prod(shape) == 0:
        raise RequestError(f"input {name!r}: shape {shape} is empty")
    return shape, datatype, dtype


def _check_binary_size(
    name: str, t: Mapping[str, Any], size: Any, shape: list[int], datatype: str, expected: int, n: int | None
) -> None:
    """``parameters.binary_data_size`` must be the tensor's exact byte size, with a header to find it by."""
    if not _is_int(size) or size < 0:
        raise RequestError(f"input {name!r}: parameters.binary_data_size must be a non-negative integer")
    if "data" in t:
        raise RequestError(f"input {name!r}: give either 'data' or parameters.binary_data_size, not both")
    if size != expected:
        raise RequestError(
            f"input {name!r}: binary_data_size {size} does not match shape {shape} of {datatype} ({expected} bytes)"
        )
    if n is None:
        raise RequestError(f"input {name!r} has binary data but the request has no {HEADER_LENGTH} header")


def _decode_outputs(raw_outputs: Any) -> list[RequestedOutput] | None:
    """The request's ``outputs`` list (None: every output of the model)."""
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise RequestError("'outputs' must be a list")
    outputs = []
    seen = set()
    for i, o in enumerate(raw_outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise RequestError(f"outputs[{i}] must be an object with a 'name' string")
        oname = o["name"]
        if oname in seen:
            raise RequestError(f"output {oname!r} requested twice")
        seen.add(oname)
        oparams, where = _dict_or_empty(o.get("parameters"), "output", oname), f"outputs[{i}]"
        binary, quantized = _flag(oparams, "binary_data", where), _flag(oparams, "quantized", where)
        outputs.append(RequestedOutput(oname, binary, bool(quantized)))
    return outputs


def check_request(request: InferRequest, manifest: Manifest) -> None:
    """Check names, datatypes and shapes against the model's manifest (``-1`` matches any size).

    The leading (batch) dimension is left to the runtime, which splits batches for
    fixed-batch-1 models. A quantized input accepts FP32 (real values, quantized by the
    server) and its raw INT8/UINT8 type (passed through).
    """
    specs = {s.name: s for s in manifest.inputs}
    for name, arr in request.inputs.items():
        spec = specs.get(name)
        if spec is None:
            raise RequestError(f"unknown input {name!r}; model {manifest.name!r} takes {sorted(specs)}")
        datatype = request.datatypes[name]
        if datatype != spec.datatype and not (spec.quantization is not None and datatype == spec.native_datatype):
            allowed = spec.datatype + (f" or {spec.native_datatype}" if spec.quantization is not None else "")
            raise RequestError(f"input {name!r}: datatype {datatype} not accepted, expected {allowed}")
        shape = arr.shape
        declared = spec.shape
        if len(shape) != len(declared) or any(d != -1 and a != d for a, d in zip(shape[1:], declared[1:], strict=True)):
            raise RequestError(
                f"input {name!r}: shape {list(shape)} does not match the model's {list(declared)} (-1 = any size)"
            )
    for name in specs:
        if name not in request.inputs:
            raise RequestError(f"missing input {name!r}; model {manifest.name!r} takes {sorted(specs)}")
    if request.outputs:
        names = [s.name for s in manifest.outputs]
        for o in request.outputs:
            if o.name not in names:
                raise RequestError(f"unknown output {o.name!r}; model {manifest.name!r} has {names}")


# -- encoding -------------------------------------------------------------------------
def encode_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest | None = None,
    *,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode an infer response; return ``(body, header_length)``.

    ``header_length`` is None for a pure JSON body; otherwise it is the length of the JSON
    header, followed by the binary tensor data, and goes into the response's
    ``Inference-Header-Content-Length`` header. Outputs come in the order requested, else
    in ``outputs``' order.
    """
    default_binary = request.binary_data_output if request is not None else False
    wanted: Iterable[tuple[str, bool]]
    if request is not None and request.outputs:
        wanted = [(o.name, default_binary if o.binary_data is None else o.binary_data) for o in request.outputs]
    else:
        wanted = [(name, default_binary) for name in outputs]
    tensors = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        arr = outputs[name]
        datatype = _DTYPE_TO_V2.get(arr.dtype) or NUMPY_TO_V2.get(arr.dtype.name)
        if datatype is None:
            raise TypeError(f"output {name!r} has dtype {arr.dtype}, which V2 cannot carry")
        if binary:
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            raw = arr.tobytes()
            chunks.append(raw)
            params = {"binary_data_size": len(raw)}
            tensors.append({"name": name, "datatype": datatype, "shape": list(arr.shape), "parameters": params})
        else:
            tensors.append({"name": name, "datatype": datatype, "shape": list(arr.shape), "data": arr.ravel().tolist()})
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request is not None and request.id is not None:
        resp["id"] = request.id
    if parameters:
        resp["parameters"] = dict(parameters)
    resp["outputs"] = tensors
    head = _ENCODER.encode(resp).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (non-JSON values such as paths or numpy scalars become strings)."""
    return json.dumps(obj, separators=(",", ":"), default=_default).encode()


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
