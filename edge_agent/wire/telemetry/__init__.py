"""Telemetry on the wire: batches and acks (``batch``) and prediction packs (``pack``)."""

from edge_agent.wire.telemetry.batch import (
    DROP_KINDS,
    KINDS,
    MAX_BATCH_BYTES,
    MAX_DECOMPRESSED_BYTES,
    SCHEMA_VERSION,
    WIRE_KINDS,
    TelemetryBatch,
    TelemetryRecord,
    check_drift_state,
    decode_ack,
    decode_batch,
    encode_ack,
    encode_batch,
    encode_rows,
)
from edge_agent.wire.telemetry.pack import PACK_KIND, sample_array

__all__ = [
    "DROP_KINDS",
    "KINDS",
    "MAX_BATCH_BYTES",
    "MAX_DECOMPRESSED_BYTES",
    "PACK_KIND",
    "SCHEMA_VERSION",
    "WIRE_KINDS",
    "TelemetryBatch",
    "TelemetryRecord",
    "check_drift_state",
    "decode_ack",
    "decode_batch",
    "encode_ack",
    "encode_batch",
    "encode_rows",
    "sample_array",
]
