"""``edge-agent agent``: the agent's own A/B slots (self-update by hand; docs/deploy.md, "Self-update").

``agent install ARCHIVE --version V`` runs the device steps of an agent update without the broker:
verify, unpack into the inactive slot, self-test, persist ``pending``, switch ``current``. The
running agent notices the switch and exits 75, so systemd starts the new slot, which must confirm
within ``agent_update.health_window_s``. ``agent status`` prints the slots and the last result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_agent.cli.common import add_command, common_args, config_from_args
from edge_agent.errors import NotFoundError
from edge_agent.update.agent.slots import AgentSlots, device_slots


def _slots(args: argparse.Namespace) -> tuple[AgentSlots, float]:
    cfg = config_from_args(args)
    return device_slots(cfg), cfg.agent_update.selftest_timeout_s


def cmd_install(args: argparse.Namespace) -> int:
    if not args.archive.exists():
        raise NotFoundError(f"agent artifact not found: {args.archive}")
    slots, timeout_s = _slots(args)
    slot = slots.install(args.archive, args.version, rollback=args.rollback, selftest_timeout_s=timeout_s)
    print(f"agent {args.version} installed in slot {slot} and self-tested; `current` now points at it")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    slots, _ = _slots(args)
    st: dict[str, Any] = slots.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"agent {st['agent_version']} in slot {st['slot']}")
    if st["pending"]:
        p = st["pending"]
        print(f"  pending: {p['version']} in slot {p['slot']}, start {p['attempts']}")
    if st["last"]:
        last = st["last"]
        print(f"  last update: {last['version']} {last['result']}{': ' + last['reason'] if last['reason'] else ''}")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``agent install`` and ``agent status`` to the ``edge-agent`` subcommands."""
    agent = add_command(sub, "agent", lambda a: 2, "the agent's own A/B slots", "edge-agent agent status --json")
    asub = agent.add_subparsers(dest="agent_command", required=True, metavar="SUBCOMMAND")
    install = add_command(
        asub,
        "install",
        cmd_install,
        "install a new agent build into the inactive slot and switch to it",
        "edge-agent agent install edge-agent-0.2.0.tar --version 0.2.0",
    )
    install.add_argument("archive", type=Path, metavar="ARCHIVE", help="tar of a one-folder build, or the folder")
    install.add_argument("--version", required=True, help="the version the build's VERSION file must hold")
    install.add_argument("--rollback", action="store_true", help="allow an older version (an explicit rollback)")
    status = add_command(asub, "status", cmd_status, "the running slot, a pending update, the last result",
                         "edge-agent agent status")  # fmt: skip
    status.add_argument("--json", action="store_true")
    for p in (install, status):
        common_args(p)
