"""Reading the store back: one kind's committed rows as an Arrow table, bodies parsed on demand.

Readers never take the ingest lock: committed files are immutable and pending ones are hidden
(``.``-prefixed, which pyarrow, DuckDB globs on ``*.parquet`` and Spark all skip).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from cloud_batch.errors import StoreError
from cloud_batch.ingest.ledger import Ledger
from cloud_batch.ingest.store import LEDGER_FILE, SCHEMA


def open_ledger(store: str | Path) -> Ledger:
    """The store's ledger, read-only; StoreError when ``store`` is not a telemetry store."""
    return Ledger(Path(store) / LEDGER_FILE, readonly=True)


def read_kind(store: str | Path, kind: str) -> pa.Table:
    """Every committed row of ``kind`` (schema ``store.SCHEMA`` plus ``date``); empty when there is none."""
    base = Path(store) / f"kind={kind}"
    if not base.is_dir():
        return SCHEMA.empty_table()
    try:
        table = ds.dataset(base, format="parquet", partitioning="hive", schema=None).to_table()
    except (OSError, pa.ArrowInvalid) as exc:
        raise StoreError(f"cannot read {base}: {exc}") from exc
    # A partition whose only files are still hidden (``.pending``, mid-commit) reads as no columns at all.
    return table if table.num_rows else SCHEMA.empty_table()


def bodies(table: pa.Table) -> list[dict[str, Any]]:
    """The ``body`` column parsed back into dicts."""
    return [json.loads(b) for b in table.column("body").to_pylist()]
