"""Ed25519 signatures over canonical JSON documents (release manifests, feature bundles).

A signed document carries ``"signature": {"alg": "ed25519", "key_id": ..., "value": base64}``; the
signature covers the canonical JSON of the document without that field. Devices trust a list of
public keys, so a fleet can rotate keys by trusting old and new during the changeover.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import ConfigError, SignatureRejected

ALG = "ed25519"


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8, ``signature`` left out."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub`` (SPKI PEM) into ``out_dir``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / "signing.key", out / "signing.pub"
    if key_path.exists():
        raise ConfigError(f"{key_path} already exists; refusing to overwrite a signing key")
    write_key_pair(Ed25519PrivateKey.generate(), key_path, pub_path)
    return key_path, pub_path


def write_key_pair(private: Any, key_path: Path, pub_path: Path) -> None:
    """Write ``private`` (PKCS#8 PEM, mode 0600) and its public half (SPKI PEM), each atomically."""
    from edge_agent.fsutil import atomic_write_bytes

    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(key_path, pem, mode=0o600)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(pub_path, public)


def read_pem_key(path: str | Path, cls: type, *, private: bool, what: str, expected: str) -> Any:
    """A PEM key of type ``cls``; ConfigError "cannot read {what} {path}" or "{path} is not {expected}"."""
    try:
        data = Path(path).read_bytes()
        key: Any = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(key, cls):
        raise ConfigError(f"{path} is not {expected}")
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    return read_pem_key(path, Ed25519PrivateKey, private=True, what="signing key", expected="an Ed25519 private key")


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return read_pem_key(path, Ed25519PublicKey, private=False, what="public key", expected="an Ed25519 public key")


def sign(doc: Mapping[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``doc`` with its ``signature`` field set."""
    value = private.sign(canonical_bytes(doc))
    out = {k: v for k, v in doc.items() if k != "signature"}
    out["signature"] = {"alg": ALG, "key_id": key_id(private.public_key()), "value": base64.b64encode(value).decode()}
    return out


def verify(doc: Mapping[str, Any], trusted: Iterable[Ed25519PublicKey]) -> str:
    """Check ``doc``'s signature against the trusted keys; return the key id or raise SignatureRejected."""
    sig = doc.get("signature")
    if not isinstance(sig, Mapping) or not sig.get("value"):
        raise SignatureRejected("unsigned: the document has no signature")
    if sig.get("alg") != ALG:
        raise SignatureRejected(f"unsupported signature algorithm {sig.get('alg')!r}")
    keys = {key_id(k): k for k in trusted}
    kid = sig.get("key_id")
    if kid not in keys:
        raise SignatureRejected(f"signed by untrusted key {kid!r} (trusted: {sorted(keys) or 'none'})")
    try:
        raw = base64.b64decode(str(sig["value"]), validate=True)
        keys[kid].verify(raw, canonical_bytes(doc))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureRejected(
            f"bad signature for key {kid}: the document was altered or signed by another key"
        ) from exc
    return str(kid)
