"""``cloud-batch`` commands for over-the-air releases: keys, release, rollout, fleet.

``register_commands(sub)`` adds them to the ``cloud-batch`` parser (``cli.py`` calls it).
Thin, like the rest of the CLI: each handler makes one library call and prints the result.
``--json`` prints the machine-readable form on stdout. Exit codes: 0 done, 1 the rollout
halted (``rollout advance``/``status`` found the failure threshold crossed), 2 an error
(printed as ``error: ...`` by ``cli.main``). ``python -m cloud_batch.cli.ota`` runs these
commands alone, with the same error handling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.wire.protocol import DEFAULT_CHUNK_SIZE

EXIT_HALTED = 1
SubParsers = Any  # argparse's _SubParsersAction is private


# -- handlers ------------------------------------------------------------------------------------
def _keys_generate(args: argparse.Namespace) -> None:
    from cloud_batch.fleetops.keys import describe, generate_keys, load_signing_key

    key, pub = generate_keys(args.out)
    print(
        f"wrote {key} (private, mode 0600) and {pub} (give this one to the devices); "
        f"key id {describe(load_signing_key(key))}"
    )


def _release(args: argparse.Namespace) -> None:
    from cloud_batch.fleetops.release import release

    rel = release(
        args.registry,
        args.name,
        args.version,
        args.fleet,
        args.key,
        args.broker,
        stages=args.rollout,
        max_failure_rate=args.max_failure_rate,
        max_latency_ms=args.max_latency_ms,
        window=args.window,
        urgent=args.urgent,
        rollback=args.rollback,
        chunk_size=args.chunk_size,
        health_window_s=args.health_window_s,
        progress=not args.no_progress,
    )
    a = rel.artifact
    stages = rel.policy.stages
    print(f"released {rel.name} {rel.version} to fleet {rel.fleet}: {rel.release_id}")
    print(f"  artifact {a.sha256[:12]}… {a.size:,} bytes in {len(a.chunks)} chunk(s) of {a.chunk_size:,}")
    print(
        f"  rollout stage 1/{len(stages)} at {stages[0]}% (stages {','.join(map(str, stages))}), "
        f"halts above {rel.policy.max_failure_rate:.0%} failures"
    )


def _rollout(args: argparse.Namespace) -> int:
    from cloud_batch.fleetops import rollout

    op = {"status": rollout.rollout_status, "advance": rollout.advance, "abort": rollout.abort}[args.action]
    status = op(args.broker, args.name, args.fleet)
    print(status.to_json() if args.json else status.summary())
    return EXIT_HALTED if status.action == "halted" else 0


def _fleet_status(args: argparse.Namespace) -> None:
    from cloud_batch.fleetops.fleet import fleet_status, render_table, rows_json

    rows = fleet_status(args.broker, args.fleet, timeout_s=args.timeout)
    if args.json:
        print(rows_json(rows))
    else:
        render_table(rows, args.fleet)


# -- argument types --------------------------------------------------------------------------
def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _broker_fleet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", required=True, metavar="F", help="fleet name (a topic segment)")
    parser.add_argument("--broker", required=True, metavar="URL", help="MQTT broker, e.g. mqtt://localhost:1883")


# -- wiring ------------------------------------------------------------------------------------
def register_commands(sub: SubParsers) -> None:
    """Add ``keys``, ``release``, ``rollout`` and ``fleet`` to the ``cloud-batch`` subparsers."""
    from cloud_batch.cli.main import DEFAULT_REGISTRY, _positive_int, add_command

    keys = add_command(
        sub,
        "keys",
        help="release signing keys",
        description="Manage the Ed25519 key pair that signs releases. Devices trust the public key.",
        example="cloud-batch keys generate --out keys/",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    gen = add_command(
        keys_sub,
        "generate",
        handler=_keys_generate,
        help="write signing.key and signing.pub",
        description="Write DIR/signing.key (PKCS#8 PEM, mode 0600) and DIR/signing.pub (give it to the devices).\n"
        "Refuses to overwrite an existing key.",
        example="cloud-batch keys generate --out keys/",
    )
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the key pair")

    rel = add_command(
        sub,
        "release",
        handler=_release,
        help="publish a signed model release to a fleet over MQTT",
        description="Pack NAME version V from the registry, publish it as retained chunks, then a rollout\n"
        "document (first stage) and the signed release, retained on the fleet's topics. The previous\n"
        "release's artifact is cleared from the broker. Stages are cumulative percentages of the fleet;\n"
        "`cloud-batch rollout advance` moves to the next one while failures stay under the threshold.",
        example="cloud-batch release digits --version 2 --fleet plant-7 --registry models --key keys/signing.key "
        "--broker mqtt://localhost:1883\n"
        "cloud-batch release digits --version 3 --fleet plant-7 --registry models --key keys/signing.key "
        "--broker mqtt://localhost:1883 --rollout 5,25,100 --window 02:00-04:00",
    )
    rel.add_argument("name", metavar="NAME", help="model name in the registry")
    rel.add_argument("--version", required=True, metavar="V", help="registered version to release")
    rel.add_argument("--fleet", required=True, metavar="F", help="fleet name (a topic segment)")
    rel.add_argument(
        "--registry",
        type=Path,
        default=DEFAULT_REGISTRY,
        metavar="DIR",
        help="registry directory (default: ./registry)",
    )
    rel.add_argument("--key", required=True, type=Path, metavar="KEYFILE", help="signing.key from `keys generate`")
    rel.add_argument("--broker", required=True, metavar="URL", help="MQTT broker, e.g. mqtt://localhost:1883")
    rel.add_argument(
        "--rollout",
        default="100",
        metavar="5,25,100",
        help="increasing stage percentages ending at 100 (default: 100, everyone at once)",
    )
    rel.add_argument(
        "--max-failure-rate",
        type=_rate,
        default=0.1,
        metavar="R",
        help="halt when more than this share of the devices that tried failed (default: 0.1)",
    )
    rel.add_argument("--max-latency-ms", type=_positive, metavar="MS", help="devices refuse a slower candidate (p50)")
    rel.add_argument("--window", metavar="HH:MM-HH:MM", help="devices activate only inside this local time window")
    rel.add_argument("--urgent", action="store_true", help="activate immediately, ignoring --window")
    rel.add_argument("--rollback", action="store_true", help="a signed rollback: may carry a lower version")
    rel.add_argument(
        "--health-window-s",
        type=float,
        default=30.0,
        metavar="S",
        help="error-rate watch after activation before committing (default: 30)",
    )
    rel.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"artifact chunk size (default: {DEFAULT_CHUNK_SIZE})",
    )
    rel.add_argument("--no-progress", action="store_true", help="no progress bar")

    ro = add_command(
        sub,
        "rollout",
        help="status, advance or abort a phased rollout",
        description="Follow and steer the rollout of a model's current release. Every command first checks the\n"
        "failure rate among the cohort's devices that tried the release and halts the rollout if it\n"
        "is above the release's threshold (exit code 1).",
        example="cloud-batch rollout status digits --fleet plant-7 --broker mqtt://localhost:1883\n"
        "cloud-batch rollout advance digits --fleet plant-7 --broker mqtt://localhost:1883",
    )
    ro_sub = ro.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text, description in (
        (
            "status",
            "show the current stage and the devices' outcomes",
            (
                "Show the rollout's stage, the cohort, and the outcome of every device in it that tried the release;\n"
                "halts the rollout if the failure threshold is crossed."
            ),
        ),
        (
            "advance",
            "move to the next stage (or complete the last one)",
            (
                "Move to the next stage while the failure rate among devices that tried stays within the\n"
                "threshold; otherwise halt the rollout and say why (exit code 1)."
            ),
        ),
        (
            "abort",
            "abort: devices that applied the release roll back",
            "Publish the rollout as aborted: devices stop the release, and those that applied it roll back.",
        ),
    ):
        p = add_command(
            ro_sub,
            action,
            handler=_rollout,
            help=help_text,
            description=description,
            example=f"cloud-batch rollout {action} digits --fleet plant-7 --broker mqtt://localhost:1883",
        )
        p.add_argument("name", metavar="NAME", help="model name")
        _broker_fleet(p)
        p.add_argument("--json", action="store_true", help="print JSON")

    fleet = add_command(
        sub,
        "fleet",
        help="devices of a fleet, from the broker",
        description="What the broker knows about a fleet's devices (their retained state and presence).",
        example="cloud-batch fleet status --fleet plant-7 --broker mqtt://localhost:1883",
    )
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)
    st = add_command(
        fleet_sub,
        "status",
        handler=_fleet_status,
        help="one row per device: presence, versions, last update",
        description="One row per device: online/offline (the device's last will), active model versions,\n"
        "the last update with its result and reason, and when the device last published its state.",
        example="cloud-batch fleet status --fleet plant-7 --broker mqtt://localhost:1883\n"
        "cloud-batch fleet status --fleet plant-7 --broker mqtt://localhost:1883 --json",
    )
    _broker_fleet(st)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument(
        "--timeout",
        type=_positive,
        default=2.0,
        metavar="S",
        help="longest wait for the retained messages (default: 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (``python -m cloud_batch.cli.ota``, tests)."""
    from cloud_batch.cli.main import PROG

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="edgefleet over-the-air releases.",
        epilog="Example:\n  cloud-batch release digits --version 2 --fleet plant-7 --registry models "
        "--key keys/signing.key --broker mqtt://localhost:1883",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these commands with ``cli.main``'s error handling; return the exit code."""
    from cloud_batch.cli.main import run

    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
