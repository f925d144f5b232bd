"""Release signing keys: one Ed25519 key pair per fleet operator (``cloud-batch keys generate``).

The private key (``signing.key``, PKCS#8 PEM, mode 0600) signs release documents; devices
trust the public key (``signing.pub``). Generating never overwrites an existing key: a lost
key can be replaced by a new one devices are told to trust, an overwritten one cannot be
recovered.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_batch.errors import InputError
from edge_agent.errors import EdgeError
from edge_agent.wire.signing import generate_keypair, key_id, load_private_key


def generate_keys(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/signing.key`` (0600) and ``out_dir/signing.pub``; InputError if a key is already there."""
    out = Path(out_dir)
    if (out / "signing.pub").exists() and not (out / "signing.key").exists():
        raise InputError(f"{out / 'signing.pub'} already exists; refusing to overwrite a public key")
    try:
        return generate_keypair(out)
    except EdgeError as exc:
        raise InputError(str(exc)) from exc
    except OSError as exc:
        raise InputError(f"cannot write keys to {out}: {exc}") from exc


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The private key at ``path``; InputError naming the file if it is missing or not an Ed25519 key."""
    try:
        return load_private_key(path)
    except EdgeError as exc:
        raise InputError(str(exc)) from exc


def describe(key: Ed25519PrivateKey) -> str:
    """The key id devices report when they reject a signature (``signing.key_id``)."""
    return key_id(key.public_key())
