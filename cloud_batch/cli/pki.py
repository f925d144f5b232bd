"""``cloud-batch pki``: the broker's CA, device and service certificates, and its mTLS + ACL config.

Thin: each handler makes one ``cloud_batch.pki`` call and prints what it wrote. Keys are
written 0600 and never overwritten; a name is one kind of identity for ever (see
``cloud_batch.pki.certs``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cloud_batch.cli.common import SubParsers, add_command, add_group, positive_int, run, standalone_parser

DEFAULT_CA = Path("pki")


PKI_DOC = """the broker's CA, client certificates and mTLS/ACL config

A P-256 CA for the MQTT link. Devices and cloud services connect with certificates it
issued; the broker takes the certificate's CN as the user name and enforces per-identity ACLs.
Signatures protect content, ACLs protect topics, TLS protects the link (docs/deploy.md).

Example:
cloud-batch pki init --out pki
cloud-batch pki issue device cam-7 --fleet plant-7 --ca pki
cloud-batch pki broker-config --fleet plant-7 --ca pki --out broker --host broker.example.com
"""

ISSUE_DOC = """issue a device or service client certificate

Issue a client certificate (CN = the device id or service name) and its key (mode 0600).

Example:
cloud-batch pki issue device cam-7 --fleet plant-7 --ca pki
cloud-batch pki issue service release-service --ca pki
"""


def _init(args: argparse.Namespace) -> None:
    """create the CA (ca.pem, ca.key)

    Create a CA in DIR: ca.pem (give it to devices and the broker), ca.key (P-256, mode 0600)
    and index.json (every name issued). Refuses to overwrite an existing CA.

    Example:
    cloud-batch pki init --out pki
    """
    from cloud_batch.pki.certs import CA_KEY, init_ca

    cert = init_ca(args.out, name=args.name, days=args.days)
    print(f"wrote CA {cert} and {cert.parent / CA_KEY} (private, mode 0600: keep this directory offline)")


def _issue_device(args: argparse.Namespace) -> None:
    """a device's certificate (CN = device id, OU = fleet)

    Write ID.pem, ID.key (mode 0600) and ca.pem into --out (default: CA/devices/ID/): what
    `edge-agent run --tls-cert --tls-key --tls-ca` needs. A name issued as a service is refused.

    Example:
    cloud-batch pki issue device cam-7 --fleet plant-7 --ca pki --registry registry
    cloud-batch pki issue device cam-8 --fleet plant-7 --ca pki --out /media/provision/cam-8
    """
    from cloud_batch.pki.certs import DEFAULT_DEVICE_DAYS, issue_device

    days = args.days or DEFAULT_DEVICE_DAYS
    print(issue_device(args.ca, args.id, args.fleet, args.out, days=days, registry=args.registry).summary())
    if args.registry is not None:
        print(f"{args.id} is a known device of fleet {args.fleet} in {args.registry}")


def _issue_service(args: argparse.Namespace) -> None:
    """a cloud service's certificate (release service, ingest)

    Write NAME.pem, NAME.key (mode 0600) and ca.pem into --out (default: CA/services/NAME/)
    for `cloud-batch ... --tls-cert --tls-key --tls-ca`. The broker ACL gives the names passed to
    `broker-config` (default release-service and ingest) their rights. A device's name is refused.

    Example:
    cloud-batch pki issue service release-service --ca pki
    cloud-batch pki issue service ingest --ca pki
    """
    from cloud_batch.pki.certs import DEFAULT_SERVICE_DAYS, issue_service

    print(issue_service(args.ca, args.name, args.out, days=args.days or DEFAULT_SERVICE_DAYS).summary())


def _broker_config(args: argparse.Namespace) -> None:
    """write a mosquitto mTLS listener config and ACL for a fleet

    Issue the broker's server certificate (for every --host) and write DIR/mosquitto.conf
    (TLS listener, require_certificate, use_identity_as_username) and DIR/acl: a device publishes
    only under fleets/F/devices/<its CN>/#; only the release service publishes releases, rollouts,
    features and artifacts; ingest reads telemetry and publishes its acks.

    Example:
    cloud-batch pki broker-config --fleet plant-7 --ca pki --out /etc/mosquitto/edgefleet --host broker.example.com
    """
    from cloud_batch.pki.mosquitto import write_broker_config

    hosts = args.host or ("localhost", "127.0.0.1")
    services = {"release_service": args.release_service, "ingest_service": args.ingest_service}
    files = write_broker_config(args.ca, args.fleet, args.out, hosts=hosts, port=args.port, bind=args.bind, **services)
    print(files.summary())


def _ca_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca", type=Path, default=DEFAULT_CA, metavar="DIR", help=f"the CA directory (default: ./{DEFAULT_CA})"
    )


def _days_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--days", type=positive_int, metavar="N", help=f"validity in days (default: {default})")


def register_commands(sub: SubParsers) -> None:
    """Add ``pki init``, ``pki issue device|service`` and ``pki broker-config`` to the ``cloud-batch`` subparsers."""
    pki = add_group(sub, "pki", dest="pki_command", doc=PKI_DOC)
    init = add_command(pki, "init", _init)
    init.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the CA")
    init.add_argument("--name", default="edgefleet CA", metavar="CN", help="the CA's common name")
    init.add_argument("--days", type=positive_int, default=3650, metavar="N", help="validity in days (default: 3650)")

    issue = add_group(pki, "issue", dest="issue_kind", metavar="KIND", doc=ISSUE_DOC)
    dev = add_command(issue, "device", _issue_device)
    dev.add_argument("id", metavar="ID", help="device id (the agent's --device-id)")
    dev.add_argument("--fleet", required=True, metavar="F", help="the device's fleet")
    _ca_arg(dev)
    dev.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: CA/devices/ID)")
    _days_arg(dev, "3650")
    dev.add_argument(
        "--registry", type=Path, metavar="DIR", help="also add the device to the fleet's known devices (`fleet add`)"
    )

    svc = add_command(issue, "service", _issue_service)
    svc.add_argument("name", metavar="NAME", help="service name (the certificate CN)")
    _ca_arg(svc)
    svc.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: CA/services/NAME)")
    _days_arg(svc, "825")

    bc = add_command(pki, "broker-config", _broker_config)
    bc.add_argument("--fleet", required=True, metavar="F", help="the fleet this broker serves")
    _ca_arg(bc)
    bc.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the config and broker key")
    bc.add_argument(
        "--host",
        action="append",
        metavar="NAME|IP",
        help="a name or address devices dial (repeatable; default: localhost and 127.0.0.1)",
    )
    bc.add_argument("--port", type=positive_int, default=8883, metavar="N", help="TLS listener port (default: 8883)")
    bc.add_argument("--bind", metavar="ADDR", help="listen on this address only (default: all)")
    bc.add_argument(
        "--release-service", default="release-service", metavar="NAME", help="CN of the release service identity"
    )
    bc.add_argument("--ingest-service", default="ingest", metavar="NAME", help="CN of the telemetry ingest identity")


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (``python -m cloud_batch.cli.pki``, tests)."""
    return standalone_parser("edgefleet broker PKI.", "cloud-batch pki init --out pki", register_commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these commands with ``common.run``'s error handling; return the exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
