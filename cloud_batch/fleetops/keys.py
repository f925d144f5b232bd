"""Release keys (``cloud-batch keys generate``): the Ed25519 signing pair and the X25519 fleet key.

The private signing key (``signing.key``, PKCS#8 PEM, mode 0600) signs release documents; devices
trust the public key (``signing.pub``). The fleet key (``--fleet-key``) is the other way round:
releases are encrypted to ``fleet.pub`` and every device holds ``fleet.key`` (mode 0600) to open
them (``edge_agent.models.sealed``). Generating never overwrites an existing key: a lost key can
be replaced by a new one devices are told to trust, an overwritten one cannot be recovered.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from cloud_batch.errors import InputError, input_errors
from edge_agent.models.sealed import fleet_kid, generate_fleet_key, load_fleet_pub
from edge_agent.wire.signing import generate_keypair, key_id, load_private_key


def generate_keys(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/signing.key`` (0600) and ``out_dir/signing.pub``; InputError if a key is already there."""
    out = Path(out_dir)
    if (out / "signing.pub").exists() and not (out / "signing.key").exists():
        raise InputError(f"{out / 'signing.pub'} already exists; refusing to overwrite a public key")
    try:
        with input_errors():
            return generate_keypair(out)
    except OSError as exc:
        raise InputError(f"cannot write keys to {out}: {exc}") from exc


def generate_fleet_keys(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/fleet.key`` (0600, for the devices) and ``out_dir/fleet.pub``; InputError if either exists."""
    try:
        with input_errors():
            return generate_fleet_key(out_dir)
    except OSError as exc:
        raise InputError(f"cannot write the fleet key to {out_dir}: {exc}") from exc


def load_fleet_public_key(path: str | Path) -> X25519PublicKey:
    """``fleet.pub``; InputError naming the file if it is missing or not an X25519 key."""
    with input_errors():
        return load_fleet_pub(path)


def describe_fleet_key(public: X25519PublicKey) -> str:
    """The fleet key id that sealed manifests carry (``encryption.kid``)."""
    return fleet_kid(public)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The private key at ``path``; InputError naming the file if it is missing or not an Ed25519 key."""
    with input_errors():
        return load_private_key(path)


def describe(key: Ed25519PrivateKey) -> str:
    """The key id devices report when they reject a signature (``signing.key_id``)."""
    return key_id(key.public_key())
