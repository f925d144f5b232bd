"""``edge-agent feedback``: a label for an inference, written to the telemetry outbox (``<data-dir>/telemetry.db``).

``cli.main.build_parser`` calls ``add_commands(sub)``; the library call is
``telemetry.feedback.submit_to_outbox`` (the same rules as ``POST /v2/models/{name}/feedback``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_agent.cli.common import add_command, common_args, config_from_args
from edge_agent.errors import NotFoundError
from edge_agent.models.store import ModelStore
from edge_agent.telemetry.feedback import parse_cli_label, submit_to_outbox
from edge_agent.telemetry.outbox import DB_FILE


def cmd_feedback(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    store = ModelStore(cfg.data_dir)
    version = store.active(args.model)
    if version is None:
        raise NotFoundError(f"model {args.model!r} is not installed in {cfg.data_dir}")
    stored = submit_to_outbox(
        Path(cfg.data_dir) / DB_FILE, store.manifest(args.model, version), args.id, parse_cli_label(args.label),
        replace=args.replace,
    )  # fmt: skip
    _print(stored, args.json)
    return 0


def _print(stored: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(stored, sort_keys=True))
    else:
        print(f"labelled {stored['id']}: {stored['label']}")


def add_commands(sub: Any) -> None:
    """Add ``feedback`` to the ``edge-agent`` subcommands."""
    p = add_command(
        sub,
        "feedback",
        cmd_feedback,
        "give an inference its true label (class index, class name or value)",
        "edge-agent feedback digits 3f2a9c1e-17 7 --data-dir ./var/agent",
    )
    p.add_argument("model")
    p.add_argument("id", help="the inference id (the response's 'id')")
    p.add_argument("label", help="class index, class name or number")
    p.add_argument("--replace", action="store_true", help="replace a label the inference already has")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common_args(p)
