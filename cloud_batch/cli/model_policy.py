"""``cloud-batch release`` options of the model-aware policy (``fleetops.model_policy``): shadow, breaking, health."""

from __future__ import annotations

import argparse
from typing import Any

from cloud_batch.cli.common import positive, positive_int, rate
from edge_agent.wire.policy import Policy

_D = Policy()  # the defaults the help names (devices apply them when a release leaves a field out)

FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--shadow", {"action": "store_true", "help": "devices first run the candidate on a copy of live traffic"}),
    (
        "--shadow-rate",
        {"type": rate, "metavar": "R", "help": f"share of live requests copied (default: {_D.shadow_rate:g})"},
    ),
    (
        "--shadow-min-samples",
        {"type": positive_int, "metavar": "N", "help": f"verdict after N compared (default: {_D.shadow_min_samples})"},
    ),
    (
        "--shadow-window-s",
        {"type": positive, "metavar": "S", "help": f"... or after S seconds (default: {_D.shadow_window_s:g})"},
    ),
    (
        "--promote-if",
        {
            "metavar": "RULES",
            "help": (
                f"e.g. agreement>={_D.promote_min_agreement:g},latency<={_D.promote_max_latency_ratio:g},"
                f"errors<={_D.promote_max_error_rate:g} (the defaults)"
            ),
        },
    ),
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
