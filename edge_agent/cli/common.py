"""What every ``edge-agent`` command module shares: config from flags, the help-with-example rule.

Kept apart from ``main`` (which lists the commands) so command modules (``features``) depend on
this and ``main`` depends on them, never the other way round.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, load_config

Handler = Callable[[argparse.Namespace], int]


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The effective config: file/env, overridden by whichever flags this command has."""
    overrides: dict[str, Any] = {"data_dir": getattr(args, "data_dir", None), "listen": getattr(args, "listen", None)}
    mqtt = {
        "broker": getattr(args, "broker", None),
        "device_id": getattr(args, "device_id", None),
        "fleet": getattr(args, "fleet", None),
        "groups": getattr(args, "group", None),
        "trust": getattr(args, "trust", None),
        "ca_file": getattr(args, "tls_ca", None),
        "cert_file": getattr(args, "tls_cert", None),
        "key_file": getattr(args, "tls_key", None),
    }
    if any(v is not None for v in mqtt.values()):
        overrides["mqtt"] = {k: v for k, v in mqtt.items() if v is not None}
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    if getattr(args, "fleet_key", None):
        overrides["ota"] = {"fleet_key": args.fleet_key}
    cfg = load_config(getattr(args, "config", None), overrides=overrides)
    from edge_agent.inference.interpreter import RUNTIME_ENV  # (numpy: not for the hidden child commands)

    os.environ[RUNTIME_ENV] = cfg.runtime.backend  # for default_backend here and in every child (one rule)
    return cfg


def add_command(sub: Any, name: str, handler: Handler, help: str, example: str) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose help ends with an ``Example:`` line, bound to ``handler``."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"Example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=handler)
    return p


def common_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``, which every command that touches agent state takes."""
    p.add_argument("--config", help="agent TOML config (default: embedded; env EDGEFLEET_CONFIG)")
    p.add_argument("--data-dir", type=Path, help="agent state directory (overrides config)")
