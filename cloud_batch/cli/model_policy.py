"""``cloud-batch release`` options of the model-aware policy (``fleetops.model_policy``): shadow, breaking, health."""

from __future__ import annotations

import argparse
from typing import Any

from cloud_batch.cli.common import positive, positive_int, rate

FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--shadow", {"action": "store_true", "help": "devices first run the candidate on a copy of live traffic"}),
    ("--shadow-rate", {"type": rate, "metavar": "R", "help": "share of live requests copied (default: 0.2)"}),
    ("--shadow-min-samples", {"type": positive_int, "metavar": "N", "help": "verdict after N compared (default: 200)"}),
    ("--shadow-window-s", {"type": positive, "metavar": "S", "help": "... or after S seconds (default: 600)"}),
    ("--promote-if", {"metavar": "RULES", "help": "e.g. agreement>=0.98,latency<=1.2,errors<=0.01 (the defaults)"}),
    ("--breaking", {"action": "store_true", "help": "devices may activate it although its signature differs"}),
    ("--max-latency-ratio", {"type": positive, "metavar": "X", "help": "roll back on p99 > X x the previous p99"}),
    ("--max-output-psi", {"type": positive, "metavar": "PSI", "help": "roll back on an output shift above this PSI"}),
]


def add_model_policy_args(parser: argparse.ArgumentParser) -> None:
    """``--shadow [--shadow-rate R] [--promote-if ...]``, ``--breaking``, ``--max-latency-ratio``, ``--max-output-psi``."""
    group = parser.add_argument_group("shadow release and model health (docs/shadow.md)")
    for flag, kwargs in FLAGS:
        group.add_argument(flag, **kwargs)


def model_policy_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as ``fleetops.model_policy.model_policy`` keywords."""
    names = ("shadow", "shadow_rate", "shadow_min_samples", "shadow_window_s", "promote_if", "breaking")
    return {n: getattr(args, n) for n in (*names, "max_latency_ratio", "max_output_psi")}
