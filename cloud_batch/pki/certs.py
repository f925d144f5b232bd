"""Keys, the CA and the certificates it issues (P-256 ECDSA, which every OpenSSL-based broker accepts).

Every private key is written with mode 0600 from its first byte (``fsutil.atomic_write_bytes``)
and never overwritten: a key that exists is refused, not replaced. ``index.json`` records each
CN the CA issued with its kind, so one name can never be both a device and a service: a device
named ``release-service`` would otherwise inherit the release service's ACL rights.

Certificates start one hour in the past (devices with a slightly slow clock still accept them).
Client certificates carry ``extendedKeyUsage clientAuth``, the broker's ``serverAuth`` with the
host names and addresses devices dial (``subjectAltName``, checked by TLS clients).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_batch.errors import InputError
from cloud_batch.registry.devices import DeviceRegistry
from edge_agent.fsutil import atomic_write_bytes, atomic_write_json, locked
from edge_agent.wire.names import is_name

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
INDEX = "index.json"
KINDS = ("device", "service", "broker")
DEFAULT_CA_DAYS = 3650
DEFAULT_DEVICE_DAYS = 3650  # a device in the field must not lose its link to an expired certificate
DEFAULT_SERVICE_DAYS = 825  # services are easy to re-issue: shorter-lived
SKEW = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    """One issued identity: where its files are and what it says."""

    cn: str
    kind: str
    cert: Path
    key: Path
    ca: Path
    serial: int
    not_after: dt.datetime

    def summary(self) -> str:
        return (
            f"issued {self.kind} certificate CN={self.cn} (serial {self.serial:x}, valid until "
            f"{self.not_after:%Y-%m-%d}): {self.cert}, key {self.key} (mode 0600), CA {self.ca}"
        )


def check_identity(cn: str, what: str) -> str:
    """A CN is an MQTT user name in ACL patterns and a topic segment: the topic-segment rule applies."""
    if not is_name(cn):
        raise InputError(f"invalid {what} {cn!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return cn


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    if path.exists():
        raise InputError(f"{path} already exists; refusing to overwrite it")
    try:
        atomic_write_bytes(path, data, mode)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc}") from exc


def init_ca(out: str | Path, *, name: str = "edgefleet CA", days: int = DEFAULT_CA_DAYS) -> Path:
    """Create a CA in ``out`` (``ca.pem``, ``ca.key`` 0600, an empty index); InputError if one is there."""
    out = Path(out)
    if (out / CA_KEY).exists() or (out / CA_CERT).exists():
        raise InputError(f"{out} already holds a CA; refusing to overwrite it")
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new(out / CA_KEY, _key_pem(key), 0o600)  # the key first: a CA cert without its key is useless
    _write_new(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write_json(out / INDEX, {"issued": {}})
    return out / CA_CERT


def _usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    unused = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only")
    off = dict.fromkeys((*unused, "decipher_only"), False)
    return x509.KeyUsage(digital_signature=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign, **off)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise InputError(f"{ca_dir} is not a CA directory (no {Path(exc.filename).name}; run `pki init`)") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read the CA in {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{ca_dir / CA_KEY} is not an EC private key")
    return cert, key


def issue(
    ca_dir: str | Path,
    cn: str,
    kind: str,
    out: str | Path,
    *,
    days: int,
    fleet: str | None = None,
    hosts: Sequence[str] = (),
) -> Issued:
    """Issue ``kind``'s certificate for ``cn`` into ``out`` (``cn.pem``, ``cn.key``, ``ca.pem``) and index it."""
    if kind not in KINDS:
        raise InputError(f"unknown identity kind {kind!r} (one of {', '.join(KINDS)})")
    ca_dir, out = Path(ca_dir), Path(out)
    check_identity(cn, f"{kind} name")
    ca_cert, ca_key = _load_ca(ca_dir)
    with locked(ca_dir / ".index.lock"):  # one issuer at a time: the index is read, checked, rewritten
        index = _read_index(ca_dir)
        prior = index["issued"].get(cn)
        if prior is not None and prior["kind"] != kind:
            raise InputError(f"{cn!r} is already issued as a {prior['kind']}; one name, one kind of identity")
        if (out / f"{cn}.key").exists():
            raise InputError(f"{out / (cn + '.key')} already exists; refusing to overwrite a private key")
        key = _new_key()
        cert = _leaf(ca_cert, ca_key, key, cn, kind, days, fleet, hosts)
        _write_new(out / f"{cn}.key", _key_pem(key), 0o600)
        atomic_write_bytes(out / f"{cn}.pem", cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
        not_after = cert.not_valid_after_utc
        index["issued"][cn] = {
            "kind": kind,
            "fleet": fleet,
            "serial": f"{cert.serial_number:x}",
            "not_after": not_after.isoformat(),
        }
        atomic_write_json(ca_dir / INDEX, index)
    return Issued(cn, kind, out / f"{cn}.pem", out / f"{cn}.key", out / CA_CERT, cert.serial_number, not_after)


def _read_index(ca_dir: Path) -> dict[str, Any]:
    try:
        index = json.loads((ca_dir / INDEX).read_text())
    except FileNotFoundError:
        return {"issued": {}}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {ca_dir / INDEX}: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("issued"), dict):
        raise InputError(f"{ca_dir / INDEX} is not a CA index")
    return index


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    kind: str,
    days: int,
    fleet: str | None,
    hosts: Sequence[str],
) -> x509.Certificate:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if fleet:
        names.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet))
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() or c in "/\\" for c in host):
            raise InputError(f"invalid broker host name {host!r}") from None
        return x509.DNSName(host)


def issue_device(
    ca_dir: str | Path,
    device_id: str,
    fleet: str,
    out: str | Path | None = None,
    *,
    days: int = DEFAULT_DEVICE_DAYS,
    registry: str | Path | None = None,
) -> Issued:
    """A device's client certificate: CN = device id, OU = fleet (default out: ``CA/devices/ID``).

    With ``registry``, the device also joins the fleet's known devices (``fleet add``), after the
    certificate exists: a known device always has an identity.
    """
    check_identity(fleet, "fleet")
    target = out if out is not None else Path(ca_dir) / "devices" / device_id
    issued = issue(ca_dir, device_id, "device", target, days=days, fleet=fleet)
    if registry is not None:
        DeviceRegistry(registry).add(fleet, [device_id])
    return issued


def issue_service(
    ca_dir: str | Path, name: str, out: str | Path | None = None, *, days: int = DEFAULT_SERVICE_DAYS
) -> Issued:
    """A cloud service's client certificate (the release service, ingest): CN = ``name``."""
    target = out if out is not None else Path(ca_dir) / "services" / name
    return issue(ca_dir, name, "service", target, days=days)
