"""Telemetry batches (device → cloud) and their acks (cloud → device): the one codec both sides use.

A batch is zlib-compressed UTF-8 JSON, published QoS 1 on ``topics.telemetry_topic``::

    {"schema_version": 1, "device_id": "dev-1", "fleet": "f", "first_seq": 41, "last_seq": 43,
     "dropped": {"prediction": 2},                 # cumulative drops per kind since the outbox was made
                                                   # (and "inputs": samples stripped from kept predictions)
     "records": [{"seq": 41, "kind": "prediction", "ts": 1700000000.0, "body": {...}}, ...]}

``seq`` is per device, starts at 1 and only grows; a batch's records are strictly increasing (not
necessarily contiguous: the outbox may have dropped rows in between, and says so in ``dropped``).
A batch *covers* ``[first_seq, last_seq]``: ``last_seq`` is its last record's seq, and ``first_seq``
may be lower than its first record's seq — the seqs of the range without a record were dropped on
the device (or acked earlier), so ingest counts the whole range as settled when it computes the
highest contiguous seq. Without that a dropped row would hold the ack back forever.
The compressed payload is at most :data:`MAX_BATCH_BYTES` (the outbox splits batches); the decoder
inflates at most :data:`MAX_DECOMPRESSED_BYTES`.

Ingest acks with a retained JSON document on ``topics.telemetry_ack_topic``:
``{"schema_version": 1, "device_id": ..., "acked_seq": N, "ts": ...}``, where ``N`` is the highest
*contiguous* seq it has durably stored for the device. The device deletes rows up to ``N``.

Record bodies are validated loosely on the wire (a dict), documented in docs/protocol.md:
``prediction`` {model, version, request_id, latency_ms, outputs, entity_id?, inputs?} where ``inputs`` is
``{name: {"shape", "datatype", "b64"}}`` (the tensor's little-endian bytes; earlier agents sent
``"data"``, a flat list of numbers, and :func:`~edge_agent.wire.telemetry.pack.sample_array` reads both),
``predictions`` (a pack of predictions, ``wire.telemetry.pack``: :func:`decode_batch` expands it into
``prediction`` records, so ingest never sees one),
``feedback`` {model, request_id, label, replace?}, ``event`` {type, ...},
``drift`` {model, version, window, psi: {feature: float}, output_psi}.

Rejections: a batch whose envelope is wrong (not zlib, not JSON, too big, bad device id, bad
first/last) raises :class:`TelemetryRejected`. A wrong *record* inside an otherwise valid batch
does not: :func:`decode_batch` returns the good records on the batch and the bad ones as
``(seq, reason)`` in ``TelemetryBatch.rejects``, so ingest keeps the good rows of the same batch.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from edge_agent.errors import ManifestError, TelemetryRejected
from edge_agent.jsonlimits import loads_limited
from edge_agent.wire.names import is_name
from edge_agent.wire.telemetry.pack import PACK_KIND, expand

SCHEMA_VERSION = 1
KINDS = ("prediction", "feedback", "event", "drift")  # the kinds ingest stores
WIRE_KINDS = (*KINDS, PACK_KIND)  # and on the wire: packs of predictions (``pack``), expanded by decode_batch
MAX_EXPANDED = 65_536  # predictions one batch may expand to (8 MiB of packs would otherwise be ~200k dicts)
DROP_KINDS = ("inputs", *KINDS)  # ``dropped`` keys: "inputs" counts sampled inputs stripped from kept predictions
MAX_BATCH_BYTES = 128 * 1024
MAX_DECOMPRESSED_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
_ACK_MAX_BYTES = 4096


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """One outbox row on the wire; the device id lives on the batch."""

    seq: int
    kind: str
    ts: float
    body: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "ts": self.ts, "body": self.body}


@dataclass(frozen=True)
class TelemetryBatch:
    """A run of one device's records; ``rejects`` holds ``(seq, reason)`` of records the decoder refused."""

    device_id: str
    fleet: str
    first_seq: int
    last_seq: int
    records: tuple[TelemetryRecord, ...]
    dropped: dict[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    rejects: tuple[tuple[int, str], ...] = ()


def _is_seq(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def encode_rows(
    device_id: str, fleet: str, first_seq: int, rows: list[tuple[int, str, float, str]], dropped: dict[str, int]
) -> bytes:
    """Compress rows ``(seq, kind, ts, body as JSON text)`` into a batch payload covering ``first_seq..``.

    The outbox's path: bodies are stored as JSON text and are not parsed again. Raises
    TelemetryRejected when the payload is above MAX_BATCH_BYTES (the caller splits the batch).
    """
    if not rows:
        raise TelemetryRejected("a telemetry batch needs at least one record")
    if not _is_seq(first_seq) or first_seq > rows[0][0]:
        raise TelemetryRejected(f"telemetry first_seq {first_seq!r} is after the first record {rows[0][0]}")
    head = json.dumps(
        {"schema_version": SCHEMA_VERSION, "device_id": device_id, "fleet": fleet, "first_seq": first_seq,
         "last_seq": rows[-1][0], "dropped": dropped},
        separators=(",", ":"),
    )  # fmt: skip
    recs = ",".join(
        f'{{"seq":{seq},"kind":"{kind}","ts":{json.dumps(ts, allow_nan=False)},"body":{body}}}'
        for seq, kind, ts, body in rows
    )
    payload = zlib.compress(f'{head[:-1]},"records":[{recs}]}}'.encode(), 6)
    if len(payload) > MAX_BATCH_BYTES:
        raise TelemetryRejected(f"telemetry batch is {len(payload)} bytes compressed; the limit is {MAX_BATCH_BYTES}")
    return payload


def encode_batch(batch: TelemetryBatch) -> bytes:
    """The wire payload of ``batch``; raises TelemetryRejected when it compresses above MAX_BATCH_BYTES."""
    rows = [(r.seq, r.kind, r.ts, json.dumps(r.body, separators=(",", ":"), allow_nan=False)) for r in batch.records]
    return encode_rows(batch.device_id, batch.fleet, batch.first_seq, rows, dict(batch.dropped))


def _inflate(payload: bytes, limit: int, what: str) -> bytes:
    if len(payload) > MAX_BATCH_BYTES:
        raise TelemetryRejected(f"{what} is {len(payload)} bytes; the limit is {MAX_BATCH_BYTES}")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(payload, limit)
    except zlib.error as exc:
        raise TelemetryRejected(f"{what} is not zlib-compressed: {exc}") from exc
    if d.unconsumed_tail:
        raise TelemetryRejected(f"{what} inflates to more than {limit} bytes")
    if not d.eof:
        raise TelemetryRejected(f"{what} is a truncated zlib stream")
    return raw


def _check_record(raw: Any) -> tuple[int | None, TelemetryRecord | str]:
    """``(seq, record)`` for a good record, ``(seq or None, reason)`` for a bad one."""
    if not isinstance(raw, dict):
        return None, "record is not an object"
    seq = raw.get("seq")
    if not _is_seq(seq):
        return None, f"record seq {seq!r} is not an integer >= 1"
    kind, ts, body = raw.get("kind"), raw.get("ts"), raw.get("body")
    if kind not in WIRE_KINDS:
        return seq, f"record kind {kind!r} is not one of {', '.join(WIRE_KINDS)}"
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        return seq, f"record ts {ts!r} is not a finite number"
    if not isinstance(body, dict):
        return seq, "record body is not an object"
    return seq, TelemetryRecord(seq=seq, kind=kind, ts=float(ts), body=body)


def decode_batch(payload: bytes) -> TelemetryBatch:
    """Parse and validate a batch payload; envelope errors raise TelemetryRejected, record errors land in ``rejects``.

    Records must have strictly increasing seqs; one that does not (or has no readable seq) is rejected
    and the rest are kept. ``last_seq`` must be the last record's seq as sent, ``first_seq`` at most the first's.
    """
    doc = loads_limited(
        _inflate(payload, MAX_DECOMPRESSED_BYTES, "telemetry batch"),
        max_depth=MAX_DEPTH,
        what="telemetry batch",
        error=TelemetryRejected,
    )
    if not isinstance(doc, dict):
        raise TelemetryRejected("telemetry batch is not a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise TelemetryRejected(f"telemetry schema_version {doc.get('schema_version')!r} is not {SCHEMA_VERSION}")
    device_id, fleet = doc.get("device_id"), doc.get("fleet")
    if not is_name(device_id):
        raise TelemetryRejected(f"telemetry device_id {device_id!r} is not a valid name")
    if not is_name(fleet):
        raise TelemetryRejected(f"telemetry fleet {fleet!r} is not a valid name")
    first, last, records = doc.get("first_seq"), doc.get("last_seq"), doc.get("records")
    if not _is_seq(first) or not _is_seq(last) or last < first:
        raise TelemetryRejected(f"telemetry first_seq/last_seq {first!r}/{last!r} are not integers 1 <= first <= last")
    if not isinstance(records, list) or not records:
        raise TelemetryRejected("telemetry records must be a non-empty list")
    dropped = doc.get("dropped", {})
    if not isinstance(dropped, dict) or not all(
        k in DROP_KINDS and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in dropped.items()
    ):
        raise TelemetryRejected("telemetry dropped must map known kinds to counts >= 0")
    sent_first = records[0].get("seq") if isinstance(records[0], dict) else None
    sent_last = records[-1].get("seq") if isinstance(records[-1], dict) else None
    if not _is_seq(sent_first) or sent_first < first or sent_last != last:
        raise TelemetryRejected(
            f"telemetry first_seq/last_seq {first}/{last} do not cover the records ({sent_first!r}..{sent_last!r})"
        )
    good: list[TelemetryRecord] = []
    rejects: list[tuple[int, str]] = []
    prev = 0
    for raw in records:
        seq, rec = _check_record(raw)
        if isinstance(rec, str):
            rejects.append((seq or 0, rec))
        elif rec.seq <= prev:
            rejects.append((rec.seq, f"record seq {rec.seq} does not follow {prev}"))
        elif rec.kind == PACK_KIND:
            why = _expand_into(good, rec, prev, first)
            if why:
                rejects.append((rec.seq, why))
            else:
                prev = rec.seq
        else:
            good.append(rec)
            prev = rec.seq
    return TelemetryBatch(
        device_id=device_id,
        fleet=fleet,
        first_seq=first,
        last_seq=last,
        records=tuple(good),
        dropped=dict(dropped),
        rejects=tuple(rejects),
    )


def _expand_into(good: list[TelemetryRecord], rec: TelemetryRecord, prev: int, first: int) -> str | None:
    """Append a pack's predictions to ``good`` (those below the batch's ``first`` were acked already); or why not."""
    try:
        preds = expand(rec.seq, rec.body)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return f"pack {rec.seq}: {exc}"
    if preds[0][0] <= prev:
        return f"pack {rec.seq} starts at seq {preds[0][0]}, not after {prev}"
    if len(good) + len(preds) > MAX_EXPANDED:
        return f"pack {rec.seq}: the batch expands to more than {MAX_EXPANDED} records"
    good.extend(TelemetryRecord(seq, "prediction", ts, body) for seq, ts, body in preds if seq >= first)
    return None


def encode_ack(device_id: str, acked_seq: int) -> bytes:
    """The retained ack ingest publishes: the highest contiguous seq durably stored for ``device_id``."""
    if not is_name(device_id) or not isinstance(acked_seq, int) or acked_seq < 0:
        raise TelemetryRejected(f"cannot ack {device_id!r} up to {acked_seq!r}")
    doc = {"schema_version": SCHEMA_VERSION, "device_id": device_id, "acked_seq": acked_seq, "ts": time.time()}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def decode_ack(payload: bytes, device_id: str | None = None) -> int:
    """``acked_seq`` of an ack document (0 = nothing stored yet); ``device_id``, when given, must match."""
    if len(payload) > _ACK_MAX_BYTES:
        raise TelemetryRejected(f"telemetry ack is {len(payload)} bytes; the limit is {_ACK_MAX_BYTES}")
    doc = loads_limited(payload, max_depth=4, what="telemetry ack", error=TelemetryRejected)
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise TelemetryRejected("telemetry ack is not a schema_version 1 object")
    seq = doc.get("acked_seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise TelemetryRejected(f"telemetry ack acked_seq {seq!r} is not an integer >= 0")
    if device_id is not None and doc.get("device_id") != device_id:
        raise TelemetryRejected(f"telemetry ack is for {doc.get('device_id')!r}, not {device_id!r}")
    return seq


MAX_DRIFT_MODELS, MAX_DRIFT_FEATURES = 64, 16
_LEVELS = ("ok", "watch", "alert")


def check_drift_state(value: Any) -> dict[str, dict[str, Any]]:
    """DeviceState's ``drift``: model -> ``{"version", "level", "psi": {feature: float}}`` (the worst few only)."""
    value = value or {}
    if not isinstance(value, dict) or len(value) > MAX_DRIFT_MODELS:
        raise ManifestError(f"device state: drift must be an object of at most {MAX_DRIFT_MODELS} models")
    for model, d in value.items():
        psi = d.get("psi") if isinstance(d, dict) else None
        if (
            not is_name(model)
            or not isinstance(d.get("version"), str)
            or d.get("level") not in _LEVELS
            or not isinstance(psi, dict)
            or len(psi) > MAX_DRIFT_FEATURES
            or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) for k, v in psi.items()
            )
        ):
            raise ManifestError(f"device state: drift.{model} must be {{version, level, psi: {{feature: number}}}}")
    return dict(value)
