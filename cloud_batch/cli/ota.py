"""``cloud-batch`` commands for over-the-air releases: keys, release, rollout, fleet.

``register_commands(sub)`` adds them to the ``cloud-batch`` parser (``cli.py`` calls it).
Thin, like the rest of the CLI: each handler makes one library call and prints the result.
``--json`` prints the machine-readable form on stdout. Exit codes: 0 done, 1 the rollout
halted (``rollout advance``/``status`` found the failure threshold crossed), 2 an error
(printed as ``error: ...`` by ``common.run``). ``python -m cloud_batch.cli.ota`` runs these
commands alone, with the same error handling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cloud_batch.cli.common import (
    SubParsers,
    add_command,
    add_group,
    chunk_size_arg,
    positive,
    rate,
    registry_arg,
    run,
    standalone_parser,
    tls_args,
)
from cloud_batch.cli.model_policy import add_model_policy_args, model_policy_args

EXIT_HALTED = 1


# -- handlers ------------------------------------------------------------------------------------
def _keys_generate(args: argparse.Namespace) -> None:
    from cloud_batch.fleetops.keys import describe, generate_keys, load_signing_key

    if args.fleet_key:
        from cloud_batch.fleetops.keys import describe_fleet_key, generate_fleet_keys, load_fleet_public_key

        key, pub = generate_fleet_keys(args.out)
        kid = describe_fleet_key(load_fleet_public_key(pub))
        print(f"wrote {key} (private, mode 0600: install it on every device) and {pub} (for releases); key id {kid}")
        return
    key, pub = generate_keys(args.out)
    print(
        f"wrote {key} (private, mode 0600) and {pub} (give this one to the devices); "
        f"key id {describe(load_signing_key(key))}"
    )


def _release(args: argparse.Namespace) -> None:
    from cloud_batch.fleetops.broker import open_link, tls_config
    from cloud_batch.fleetops.release import plan_release, publish_release

    plan = plan_release(  # every local check first: a bad input publishes nothing, broker or not
        args.registry,
        args.name,
        args.version,
        args.fleet,
        args.key,
        stages=args.rollout,
        max_failure_rate=args.max_failure_rate,
        max_latency_ms=args.max_latency_ms,
        window=args.window,
        urgent=args.urgent,
        rollback=args.rollback,
        chunk_size=args.chunk_size,
        health_window_s=args.health_window_s,
        expires_in_s=args.expires_in,
        encrypt=args.encrypt,
        fleet_pub=args.fleet_pub,
        model=model_policy_args(args),
        kind=args.kind,
    )
    with open_link(args.broker, tls=tls_config(args.tls_ca, args.tls_cert, args.tls_key)) as link:
        rel = publish_release(link, plan, progress=not args.no_progress)
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
    from cloud_batch.fleetops.broker import open_link, tls_config
    from cloud_batch.fleetops.signer import Trust

    op = {"status": rollout.rollout_status, "advance": rollout.advance, "abort": rollout.abort}[args.action]
    rollout.check_target(args.name, args.fleet)
    trust = Trust.load(args.registry, args.trust, args.key)
    if args.action != "status":
        trust.key(f"rollout {args.action}")  # a missing --key is an input error, before connecting
    with open_link(args.broker, tls=tls_config(args.tls_ca, args.tls_cert, args.tls_key)) as link:
        status = op(link, args.name, args.fleet, trust)
    print(status.to_json() if args.json else status.summary())
    failing = status.rollout.status == "active" and status.over_threshold
    return EXIT_HALTED if status.action == "halted" or failing else 0


def _fleet_add(args: argparse.Namespace) -> None:
    from cloud_batch.registry.devices import DeviceRegistry

    new = DeviceRegistry(args.registry).add(args.fleet, args.device_ids)
    print(f"fleet {args.fleet}: added {len(new)} device(s), {len(args.device_ids) - len(new)} already known")


def _fleet_list(args: argparse.Namespace) -> None:
    from cloud_batch.registry.devices import DeviceRegistry

    for device_id in sorted(DeviceRegistry(args.registry).entries(args.fleet)):
        print(device_id)


def _fleet_status(args: argparse.Namespace) -> None:
    from cloud_batch.fleetops.broker import open_link, tls_config
    from cloud_batch.fleetops.fleet import check_fleet, fleet_report, render_table, rows_json

    check_fleet(args.fleet)
    with open_link(args.broker, tls=tls_config(args.tls_ca, args.tls_cert, args.tls_key)) as link:
        rows, problems = fleet_report(link, args.fleet, timeout_s=args.timeout)
    if problems:  # stderr: --json on stdout stays one parseable document
        print(f"warning: skipped {len(problems)} malformed device document(s)", file=sys.stderr)
        for line in problems[:10]:
            print(f"  {line[:300]}", file=sys.stderr)
    if args.json:
        print(rows_json(rows))
    else:
        render_table(rows, args.fleet)


def _broker_fleet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", required=True, metavar="F", help="fleet name (a topic segment)")
    parser.add_argument("--broker", required=True, metavar="URL", help="MQTT broker, e.g. mqtt://localhost:1883")
    tls_args(parser)


# -- wiring ------------------------------------------------------------------------------------
def register_commands(sub: SubParsers) -> None:
    """Add ``keys``, ``release``, ``rollout`` and ``fleet`` to the ``cloud-batch`` subparsers."""
    keys_sub = add_group(
        sub,
        "keys",
        dest="keys_command",
        help="release signing keys",
        description="Manage the Ed25519 key pair that signs releases. Devices trust the public key.",
        example="cloud-batch keys generate --out keys/",
    )
    gen = add_command(
        keys_sub,
        "generate",
        handler=_keys_generate,
        help="write signing.key and signing.pub",
        description="Write DIR/signing.key (PKCS#8 PEM, mode 0600) and DIR/signing.pub (give it to the devices).\n"
        "Refuses to overwrite an existing key.",
        example="cloud-batch keys generate --out keys/\ncloud-batch keys generate --out keys/ --fleet-key",
    )
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the key pair")
    gen.add_argument(
        "--fleet-key",
        action="store_true",
        help="write the X25519 fleet key instead: fleet.key (0600, for every device) and fleet.pub (for --encrypt)",
    )

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
    rel.add_argument("name", metavar="NAME", help="model name in the registry (edge-agent with --kind agent)")
    rel.add_argument("--version", required=True, metavar="V", help="registered version to release")
    rel.add_argument("--kind", choices=("model", "agent"), default="model",
                     help="agent: release the agent itself (cloud-batch agent register; docs/deploy.md)")  # fmt: skip
    rel.add_argument("--fleet", required=True, metavar="F", help="fleet name (a topic segment)")
    registry_arg(rel)
    rel.add_argument("--key", required=True, type=Path, metavar="KEYFILE", help="signing.key from `keys generate`")
    rel.add_argument("--broker", required=True, metavar="URL", help="MQTT broker, e.g. mqtt://localhost:1883")
    tls_args(rel)
    rel.add_argument(
        "--rollout",
        default="100",
        metavar="5,25,100",
        help="increasing stage percentages ending at 100 (default: 100, everyone at once)",
    )
    rel.add_argument(
        "--max-failure-rate",
        type=rate,
        default=0.1,
        metavar="R",
        help="halt when more than this share of the devices that tried failed (default: 0.1)",
    )
    rel.add_argument("--max-latency-ms", type=positive, metavar="MS", help="devices refuse a slower candidate (p50)")
    rel.add_argument("--window", metavar="HH:MM-HH:MM", help="devices activate only inside this local time window")
    rel.add_argument("--urgent", action="store_true", help="activate immediately, ignoring --window")
    rel.add_argument(
        "--rollback", action="store_true", help="a signed rollback: may carry a lower version (expires, default 7 days)"
    )
    rel.add_argument(
        "--expires-in", type=positive, metavar="S", help="devices refuse the release after S seconds (default: never)"
    )
    rel.add_argument(
        "--health-window-s",
        type=float,
        default=30.0,
        metavar="S",
        help="error-rate watch after activation before committing (default: 30)",
    )
    chunk_size_arg(rel)
    rel.add_argument("--no-progress", action="store_true", help="no progress bar")
    rel.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the model for the fleet key (AES-256-GCM, key wrapped with X25519); devices need ota.fleet_key",
    )
    rel.add_argument("--fleet-pub", type=Path, metavar="FILE", help="fleet.pub for --encrypt (default: beside --key)")
    add_model_policy_args(rel)

    ro_sub = add_group(
        sub,
        "rollout",
        dest="action",
        metavar="ACTION",
        help="status, advance or abort a phased rollout",
        description="Follow and steer the rollout of a model's current release. Only signatures that verify\n"
        "against --trust (default: the public half of --key) are believed; the registry keeps the\n"
        "cloud's own record of what it signed. `status` only reads (exit code 1 when the failure rate\n"
        "is above the threshold); `advance` and `abort` sign and publish (they need --key).",
        example="cloud-batch rollout status digits --fleet plant-7 --broker mqtt://localhost:1883 --trust keys/signing.pub\n"
        "cloud-batch rollout advance digits --fleet plant-7 --broker mqtt://localhost:1883 --key keys/signing.key",
    )
    for action, help_text, description in (
        (
            "status",
            "show the current stage and the devices' outcomes",
            (
                "Show the rollout's stage, the cohort, and the outcome of every device in it that tried the release.\n"
                "Read only: it never publishes; exit code 1 when the failure threshold is crossed."
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
            example=f"cloud-batch rollout {action} digits --fleet plant-7 --broker mqtt://localhost:1883 "
            "--key keys/signing.key",
        )
        p.add_argument("name", metavar="NAME", help="model name")
        _broker_fleet(p)
        registry_arg(p)
        p.add_argument("--key", type=Path, metavar="KEYFILE", help="signing.key: signs the new rollout document")
        p.add_argument(
            "--trust",
            type=Path,
            action="append",
            default=[],
            metavar="PUB",
            help="trusted public key (repeatable; default: the public half of --key)",
        )
        p.add_argument("--json", action="store_true", help="print JSON")

    fleet_sub = add_group(
        sub,
        "fleet",
        dest="fleet_command",
        help="devices of a fleet, from the broker",
        description="What the broker knows about a fleet's devices (their retained state and presence).",
        example="cloud-batch fleet status --fleet plant-7 --broker mqtt://localhost:1883",
    )
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
        "--timeout", type=positive, default=2.0, metavar="S", help="longest wait for the retained messages (default: 2)"
    )

    add = add_command(
        fleet_sub,
        "add",
        handler=_fleet_add,
        help="register devices the fleet knows (only they count in rollouts)",
        description="Add device ids to the fleet's device list in the registry (REGISTRY/.fleets/F/devices.csv).\n"
        "Once a fleet has a list, only its devices count toward rollout failure rates and fleet status.",
        example="cloud-batch fleet add dev-001 dev-002 --fleet plant-7 --registry models",
    )
    add.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", help="device ids (the mTLS certificate CN)")
    add.add_argument("--fleet", required=True, metavar="F", help="fleet name")
    registry_arg(add)
    lst = add_command(
        fleet_sub,
        "list",
        handler=_fleet_list,
        help="the devices the fleet knows",
        description="Print the fleet's registered device ids, one per line.",
        example="cloud-batch fleet list --fleet plant-7 --registry models",
    )
    lst.add_argument("--fleet", required=True, metavar="F", help="fleet name")
    registry_arg(lst)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (``python -m cloud_batch.cli.ota``, tests)."""
    return standalone_parser(
        "edgefleet over-the-air releases.",
        "cloud-batch release digits --version 2 --fleet plant-7 --registry models "
        "--key keys/signing.key --broker mqtt://localhost:1883",
        register_commands,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these commands with ``common.run``'s error handling; return the exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
