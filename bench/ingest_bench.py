"""Ingest throughput into the Parquet store: rows/s of ``TelemetryStore.commit``, side by side with decode alone.

Workload: ``--devices`` devices x ``--rows`` records each, in batches of ``--per-batch``; 20% of the
predictions carry sampled inputs (64 floats, the digits image); every 10th record is a feedback
label. Groups of ``--group`` messages per commit, as ``cloud-batch ingest`` commits them. The full
path is decode (zlib, JSON, validation) + dedup against the ledger + Parquet (zstd) files fsynced +
SQLite ledger commit (``synchronous=FULL``) + rename; a second pass re-commits everything to
measure the duplicate path (broker redelivery / device re-sends).

    .venv/bin/python bench/ingest_bench.py            # ~10 s: records as agents before packs sent them
    .venv/bin/python bench/ingest_bench.py --packs    # the predictions as the agent's packs (expanded by decode)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.ingest.store import TelemetryStore
from edge_agent.telemetry.rows import Item, prediction_rows
from edge_agent.wire.model.manifest import Manifest
from edge_agent.wire.telemetry import TelemetryBatch, TelemetryRecord, decode_batch, encode_batch, encode_rows
from edge_agent.wire.topics import telemetry_topic

FLEET = "bench"


def body(device: str, seq: int) -> tuple[str, dict[str, Any]]:
    if seq % 10 == 0:
        return "feedback", {"model": "digits", "request_id": f"{device}-{seq - 1}", "label": seq % 10}
    b: dict[str, Any] = {
        "model": "digits",
        "version": "1",
        "request_id": f"{device}-{seq}",
        "latency_ms": 0.21,
        "outputs": {"probs": {"top_k": [[seq % 10, 0.93], [(seq + 1) % 10, 0.04]]}},
    }
    if seq % 5 == 0:
        b["inputs"] = {
            "pixels": {"shape": [1, 8, 8, 1], "datatype": "FP32", "data": [float(i % 17) for i in range(64)]}
        }
    return "prediction", b


def messages(devices: int, rows: int, per_batch: int) -> list[tuple[str, bytes]]:
    out = []
    t0 = time.time()
    for d in range(devices):
        device = f"dev-{d:04d}"
        for first in range(1, rows + 1, per_batch):
            last = min(first + per_batch - 1, rows)
            recs = tuple(TelemetryRecord(s, *_kind_body(device, s, t0)) for s in range(first, last + 1))
            out.append(
                (telemetry_topic(FLEET, device), encode_batch(TelemetryBatch(device, FLEET, first, last, recs, {})))
            )
    return out


def pack_messages(devices: int, rows: int, per_batch: int) -> list[tuple[str, bytes]]:
    """The same workload with the predictions of each batch as the agent's packs (``telemetry.rows``)."""
    manifest = Manifest.load(Path(__file__).resolve().parents[1] / "models" / "digits" / "1" / "manifest.json")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 256).astype(np.float32).reshape(256, 1, 10)
    pixels = rng.uniform(0, 16, (256, 1, 8, 8, 1)).astype(np.float32)
    out, t0 = [], time.time()
    for d in range(devices):
        device = f"dev-{d:04d}"
        for first in range(1, rows + 1, per_batch):
            seqs = range(first, min(first + per_batch - 1, rows) + 1)
            items: list[Item] = [
                (manifest, f"{device}-{s}", 0.00021, t0 + s * 0.001, {"pixels": pixels[s % 256]},
                 {"probs": probs[s % 256]}, None, s % 5 == 0)
                for s in seqs if s % 10
            ]  # fmt: skip
            wire, seq = [], first - 1
            for row in prediction_rows(items)[0]:
                seq += row.n
                wire.append((seq, row.kind, row.ts, row.body))
            for s in seqs:
                if s % 10 == 0:
                    seq += 1
                    kind, ts, doc = _kind_body(device, s, t0)
                    wire.append((seq, kind, ts, json.dumps(doc, separators=(",", ":"))))
            out.append((telemetry_topic(FLEET, device), encode_rows(device, FLEET, first, wire, {})))
    return out


def _kind_body(device: str, seq: int, t0: float) -> tuple[str, float, dict[str, Any]]:
    kind, b = body(device, seq)
    return kind, t0 + seq * 0.001, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--per-batch", type=int, default=500)
    ap.add_argument("--group", type=int, default=20)
    ap.add_argument("--packs", action="store_true", help="predictions as prediction packs (agents since 2026-12-02)")
    args = ap.parse_args()
    msgs = (pack_messages if args.packs else messages)(args.devices, args.rows, args.per_batch)
    total = args.devices * args.rows
    size = sum(len(p) for _, p in msgs)
    print(f"{len(msgs)} batches, {total} rows, {size / total:.1f} compressed bytes/row")

    t = time.perf_counter()
    for _, p in msgs:
        decode_batch(p)
    decode_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp, TelemetryStore(Path(tmp) / "store", FLEET) as store:
        t = time.perf_counter()
        stored = sum(store.commit(msgs[i : i + args.group]).rows for i in range(0, len(msgs), args.group))
        commit_s = time.perf_counter() - t
        t = time.perf_counter()
        dups = sum(store.commit(msgs[i : i + args.group]).duplicates for i in range(0, len(msgs), args.group))
        dup_s = time.perf_counter() - t
        files = sum(1 for _ in (Path(tmp) / "store").rglob("*.parquet"))
    assert stored == total and dups == total
    print(f"{'path':<44} {'rows/s':>10}")
    print(f"{'decode_batch only (wire codec)':<44} {total / decode_s:>10,.0f}")
    print(f"{'commit: decode+dedup+Parquet+ledger+rename':<44} {total / commit_s:>10,.0f}")
    print(f"{'commit of duplicates only (redelivery)':<44} {total / dup_s:>10,.0f}")
    print(f"{files} Parquet files, {len(msgs) // args.group} commits")


if __name__ == "__main__":
    main()
