"""``cloud-batch agent register``: a thin command over ``cloud_batch.registry.agents.register_agent``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud_batch.cli.common import SubParsers, add_command, add_group, registry_arg


def _register(args: argparse.Namespace) -> None:
    from cloud_batch.registry.agents import register_agent

    path = register_agent(args.registry, args.dist_dir, args.version)
    print(f"registered agent {args.version} in {path}")
    print(f"  release it: cloud-batch release edge-agent --kind agent --version {args.version} --fleet F ...")


def register_commands(sub: SubParsers) -> None:
    """``agent register``."""
    group = add_group(
        sub,
        "agent",
        dest="agent_command",
        help="the edge agent's own builds (self-update, docs/deploy.md)",
        description="Register frozen agent builds; release them with `cloud-batch release edge-agent --kind agent`.",
        example="cloud-batch agent register dist/edge-agent --version 0.2.0 --registry models",
    )
    parser = add_command(
        group,
        "register",
        handler=_register,
        help="store a one-folder agent build (make package) in the registry",
        description="Check DIST_DIR (SHA256SUMS, VERSION = --version) and store its tar as agent version V,\n"
        "ready for `cloud-batch release edge-agent --kind agent --version V`.",
        example="cloud-batch agent register dist/edge-agent --version 0.2.0 --registry models",
    )
    parser.add_argument("dist_dir", type=Path, metavar="DIST_DIR", help="the one-folder build (dist/edge-agent)")
    parser.add_argument("--version", required=True, metavar="V", help="the version its VERSION file holds")
    registry_arg(parser)
