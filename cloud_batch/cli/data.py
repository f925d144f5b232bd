"""``cloud-batch ingest`` and ``cloud-batch data summary|labeled``: thin commands over ``cloud_batch.ingest``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from cloud_batch.cli.common import SubParsers, add_command, add_group, positive, tls_args

STORE_HELP = "telemetry store directory (Parquet dataset + ledger)"
IDLE_HELP = "stop after S seconds without a message (default: 2; never with --follow)"
DATA_DOC = """read the telemetry store: summary, training rows

Read what `cloud-batch ingest` stored.

Example:
cloud-batch data summary --store telemetry
cloud-batch data labeled digits --store telemetry --out digits-labeled.parquet
"""


def _ingest(args: argparse.Namespace) -> None:
    """store device telemetry from the broker, exactly once

    Consume the fleet's telemetry batches (edgefleet/v1/fleets/F/devices/+/telemetry) over a
    persistent MQTT session and store them exactly once by (device_id, seq) in a Parquet dataset
    (kind=.../date=.../). A batch is acknowledged to the broker only after its rows are durable;
    each device then gets the highest contiguous stored seq, retained, on .../telemetry/ack.
    Without --follow it stops after --idle-exit-s seconds without a message (default 2).

    Example:
    cloud-batch ingest --fleet plant-7 --broker mqtt://broker:1883 --store telemetry
    cloud-batch ingest --fleet plant-7 --broker mqtts://broker:8883 --store telemetry --follow
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cloud_batch.fleetops.broker import tls_config
    from cloud_batch.ingest.consumer import IngestOptions, run_ingest
    from cloud_batch.progress import Reporter

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tls = tls_config(args.tls_ca, args.tls_cert, args.tls_key)
    options = IngestOptions(
        args.fleet, args.broker, args.store, follow=args.follow, idle_exit_s=args.idle_exit_s, tls=tls
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reporter = Reporter(not args.no_progress)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=reporter.console,
        disable=args.no_progress,
    )
    task = progress.add_task(f"ingest {args.fleet}: waiting for telemetry")

    def shown(stats: Any, _result: Any) -> None:
        rate = stats.rows / max(1e-9, progress.tasks[task].elapsed or 1e-9)
        progress.update(
            task,
            description=f"ingest {args.fleet}: {stats.rows} rows ({rate:,.0f}/s), {stats.messages} messages, "
            f"{stats.duplicates} duplicates, {stats.rejected} rejected",
        )

    with progress:
        stats = run_ingest(options, stop=stop, on_commit=shown)
    print(stats.summary())


def _summary(args: argparse.Namespace) -> None:
    """rows, label coverage, gaps, drops and drift per device

    Rows per device and kind, label coverage per model, seq gaps (never received), drops the
    devices reported, rejected messages, and the newest drift (PSI) per device and model.

    Example:
    cloud-batch data summary --store telemetry
    cloud-batch data summary --store telemetry --json | jq .models
    """
    from cloud_batch.ingest.summary import format_summary, summarize

    summary = summarize(args.store)
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else format_summary(summary))


def _labeled(args: argparse.Namespace) -> None:
    """sampled inputs joined with feedback labels, as training rows

    Join MODEL's predictions that carry sampled inputs with their feedback labels (same device
    and request id; the latest label wins when one was replaced) and write them as Parquet.

    Example:
    cloud-batch data labeled digits --store telemetry --out digits-labeled.parquet
    """
    from cloud_batch.ingest.labeled import write_labeled

    n = write_labeled(args.store, args.model, args.out)
    print(f"wrote {n} labeled {args.model} rows to {args.out}")


def register_commands(sub: SubParsers) -> None:
    """``ingest`` and the ``data`` group."""
    ingest = add_command(sub, "ingest", _ingest)
    ingest.add_argument("--fleet", required=True, help="fleet whose telemetry to ingest")
    ingest.add_argument("--broker", required=True, metavar="URL", help="mqtt://host:1883 or mqtts://host:8883")
    ingest.add_argument("--store", required=True, type=Path, metavar="DIR", help=STORE_HELP)
    ingest.add_argument("--follow", action="store_true", help="keep running until SIGTERM/Ctrl-C")
    ingest.add_argument("--idle-exit-s", type=positive, metavar="S", help=IDLE_HELP)
    tls_args(ingest)
    ingest.add_argument("--no-progress", action="store_true", help="no progress line")

    data = add_group(sub, "data", dest="data_command", doc=DATA_DOC)
    summary = add_command(data, "summary", _summary)
    summary.add_argument("--store", required=True, type=Path, metavar="DIR", help=STORE_HELP)
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")

    labeled = add_command(data, "labeled", _labeled)
    labeled.add_argument("model", metavar="MODEL", help="model name")
    labeled.add_argument("--store", required=True, type=Path, metavar="DIR", help=STORE_HELP)
    labeled.add_argument("--out", required=True, type=Path, metavar="FILE.parquet", help="where to write the rows")
