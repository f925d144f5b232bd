"""``edge-agent models shadow NAME VERSION [--rate R]``: a shadow release for an air-gapped device.

A thin command over ``update.local_shadow``: it saves the request the running agent picks up,
then waits for the verdict (after the health window) and prints the figures. Exit 0 promoted,
1 rejected, rolled back or failed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from edge_agent.cli.common import add_command, common_args, config_from_args
from edge_agent.errors import RejectedError


def cmd_models_shadow(args: argparse.Namespace) -> int:
    from edge_agent.models.store import ModelStore
    from edge_agent.update.shadow import local as local_shadow
    from edge_agent.wire.shadow import describe, parse_promote_if

    cfg = config_from_args(args)
    store = ModelStore(cfg.data_dir, keep=cfg.keep_versions, fleet_key=cfg.ota.fleet_key)
    policy: dict[str, Any] = {"shadow_rate": args.rate, "breaking": args.breaking}
    policy |= {"shadow_min_samples": args.min_samples, "shadow_window_s": args.window_s}
    policy |= {"health_window_s": args.health_window_s}
    if args.promote_if:
        policy |= parse_promote_if(args.promote_if)
    req = local_shadow.request(store, cfg.data_dir, args.name, args.version, policy)
    print(f"shadowing {req.name} {req.version} against {req.previous} on {args.rate:.0%} of live requests")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.window_s + args.health_window_s + args.timeout_s
    while True:
        current = local_shadow.load(cfg.data_dir, args.name)
        if current is not None and current.state in local_shadow.FINAL:
            break
        if time.monotonic() > deadline:
            waited = args.window_s + args.health_window_s + args.timeout_s
            raise RejectedError(f"no verdict after {waited:g}s: is the agent running?")
        time.sleep(0.2)
    if current.figures:
        print(f"  {describe(current.figures)}")
    print(f"{current.state}: {current.reason}")
    return 0 if current.state == "promoted" else 1


def _number(low: float, high: float | None, kind: type = float) -> Any:
    """An argparse type: a number (``kind``) in ``[low, high]`` (``high`` None: no upper bound; low exclusive for 0)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < low or (high is not None and value > high) or (low == 0 and high is None and value == 0):
            bounds = f"between {low:g} and {high:g}" if high is not None else "above 0"
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value

    return parse


def add_shadow_command(models: Any) -> None:
    """Add ``shadow`` to the ``edge-agent models`` subcommands."""
    p = add_command(
        models,
        "shadow",
        cmd_models_shadow,
        "run an installed version in shadow of the active one on live traffic; promote it if the rules hold",
        "edge-agent models shadow digits 2 --rate 0.5 --promote-if agreement>=0.99,latency<=1.1",
    )
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument(
        "--rate", type=_number(0, 1), default=0.2, metavar="R", help="share of live requests copied (default 0.2)"
    )
    p.add_argument(
        "--min-samples", type=_number(1, None, int), default=200, metavar="N", help="verdict after N compared requests"
    )
    p.add_argument(
        "--window-s", type=_number(0, None), default=600.0, metavar="S", help="... or after S seconds (default 600)"
    )
    p.add_argument("--promote-if", metavar="RULES", help="e.g. agreement>=0.98,latency<=1.2,errors<=0.01")
    p.add_argument(
        "--health-window-s",
        type=_number(0, None),
        default=30.0,
        metavar="S",
        help="after promoting, roll back if the error rate breaches within S seconds (default 30)",
    )
    p.add_argument("--breaking", action="store_true", help="allow a signature that differs from the active version's")
    p.add_argument("--no-wait", action="store_true", help="return once the agent has the request")
    p.add_argument(
        "--timeout-s", type=_number(0, None), default=60.0, metavar="S", help="extra wait past the window (default 60)"
    )
    common_args(p)
