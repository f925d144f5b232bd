"""Sealed models: encrypted at rest and in transit, opened only into memory (the envelope format).

The cloud seals a version directory for a fleet (``seal_version_dir``); a device holding the
fleet's private key opens the model into memory (``model_source``) and hands the bytes to
``Interpreter(model_content=...)``: the plaintext is never written to disk, not even a temp file.

A sealed version directory holds ``model.tflite.enc`` (the ciphertext), ``golden.npz`` and a
manifest with ``"file": "model.tflite.enc"``, ``"encrypted": true`` and the envelope::

    "encryption": {"alg": "X25519-HKDF-SHA256-A256GCM",
                   "kid": "<16 hex: sha256 of the fleet's raw X25519 public key>",
                   "epk": "<b64: ephemeral X25519 public key, 32 bytes>",
                   "wrap_nonce": "<b64: 12 bytes>", "wrapped_key": "<b64: 48 bytes>",
                   "nonce": "<b64: 12 bytes>"}

- content: AES-256-GCM under a fresh random 256-bit content key (CEK), nonce ``nonce``, associated
  data ``edgefleet-model:v1:<name>:<version>`` (ciphertext moved under another name or version fails);
- key wrap (ECIES, as HPKE's base mode): an ephemeral X25519 key pair; ``shared = X25519(eph,
  fleet_pub)``; ``KEK = HKDF-SHA256(shared, salt = epk || fleet_pub, info = "edgefleet model key
  wrap v1")``; ``wrapped_key = AES-256-GCM(KEK, wrap_nonce, CEK, associated data = kid)``;
- the manifest's ``sha256``/``size`` are the ciphertext's: the file on disk is what a device can
  check without the key (docs/protocol.md "Encrypted models" says why).

Fleet keys are X25519 PEM files: ``fleet.key`` (PKCS#8, mode 0600, on every device) and
``fleet.pub`` (SPKI, on the release machine). A private key file readable by group or others is
refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_agent.errors import ConfigError, ManifestError, SealedModelRejected
from edge_agent.fsutil import atomic_write_bytes, sha256_file
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from edge_agent.wire.signing import read_pem_key, write_key_pair

ALG = "X25519-HKDF-SHA256-A256GCM"
SEALED_FILE = "model.tflite.enc"
FLEET_KEY_FILE, FLEET_PUB_FILE = "fleet.key", "fleet.pub"
_WRAP_INFO = b"edgefleet model key wrap v1"
_NONCE_BYTES = 12
_MAKE = "(`cloud-batch keys generate --fleet-key` makes one)"


# -- fleet keys ------------------------------------------------------------------------------------
def fleet_kid(public: X25519PublicKey) -> str:
    """The fleet key's id: the first 16 hex digits of sha256 over its raw 32 bytes."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_fleet_key(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``fleet.key`` (PKCS#8 PEM, 0600) and ``fleet.pub`` (SPKI PEM); ConfigError if either exists."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / FLEET_KEY_FILE, out / FLEET_PUB_FILE
    for p in (key_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p} already exists; refusing to overwrite a fleet key")
    write_key_pair(X25519PrivateKey.generate(), key_path, pub_path)
    return key_path, pub_path


def load_fleet_key(path: str | Path) -> X25519PrivateKey:
    """The device's private fleet key; ConfigError if missing, not X25519, or readable by group/others."""
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read fleet key {path}: {exc}") from exc
    if mode & 0o077:
        raise ConfigError(f"fleet key {path} has mode {mode:04o}; it must be readable by its owner only (chmod 600)")
    return read_pem_key(
        path, X25519PrivateKey, private=True, what="fleet key", expected=f"an X25519 private key {_MAKE}"
    )


def load_fleet_pub(path: str | Path) -> X25519PublicKey:
    """The fleet's public key (``fleet.pub``); ConfigError if missing or not X25519."""
    return read_pem_key(
        path, X25519PublicKey, private=False, what="fleet public key", expected=f"an X25519 public key {_MAKE}"
    )


# -- the envelope ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Envelope:
    """``manifest.encryption``: how the content key is wrapped and the content nonce."""

    kid: str
    epk: bytes
    wrap_nonce: bytes
    wrapped_key: bytes
    nonce: bytes

    def to_dict(self) -> dict[str, Any]:
        b64 = _b64
        return {
            "alg": ALG,
            "kid": self.kid,
            "epk": b64(self.epk),
            "wrap_nonce": b64(self.wrap_nonce),
            "wrapped_key": b64(self.wrapped_key),
            "nonce": b64(self.nonce),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Envelope:
        """Validate ``manifest.encryption``; ManifestError names the field."""
        if not isinstance(raw, Mapping):
            raise ManifestError("manifest.encryption: expected an object (the encrypted model's envelope)")
        if raw.get("alg") != ALG:
            raise ManifestError(
                f"manifest.encryption.alg: {raw.get('alg')!r} is not supported (this agent reads {ALG})"
            )
        kid = raw.get("kid")
        if not isinstance(kid, str) or len(kid) != 16:
            raise ManifestError("manifest.encryption.kid: expected the fleet key id (16 hex digits)")
        sizes = {"epk": 32, "wrap_nonce": _NONCE_BYTES, "wrapped_key": 48, "nonce": _NONCE_BYTES}
        fields = {k: _unb64(raw.get(k), f"manifest.encryption.{k}", n) for k, n in sizes.items()}
        return cls(kid=kid, **fields)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, where: str, size: int) -> bytes:
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if len(data) != size:
        raise ManifestError(f"{where}: expected {size} bytes in base64")
    return data


def envelope_of(manifest: Manifest) -> Envelope | None:
    """The manifest's envelope when it says ``"encrypted": true``, else None; ManifestError if inconsistent."""
    flag = manifest.extra.get("encrypted", False)
    if not isinstance(flag, bool):
        raise ManifestError("manifest.encrypted: expected true or false")
    if not flag:
        if "encryption" in manifest.extra:
            raise ManifestError("manifest.encryption is set but manifest.encrypted is not true")
        return None
    return Envelope.from_dict(manifest.extra.get("encryption"))


def _aad(name: str, version: str) -> bytes:
    return f"edgefleet-model:v1:{name}:{version}".encode()


def _kek(shared: bytes, epk: bytes, fleet_pub: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + fleet_pub, info=_WRAP_INFO)
    return AESGCM(hkdf.derive(shared))


def seal(plain: bytes, fleet_pub: X25519PublicKey, *, name: str, version: str) -> tuple[bytes, Envelope]:
    """Encrypt a model for the fleet: (ciphertext with its 16-byte GCM tag, envelope)."""
    cek, nonce, wrap_nonce = AESGCM.generate_key(bit_length=256), os.urandom(_NONCE_BYTES), os.urandom(_NONCE_BYTES)
    eph = X25519PrivateKey.generate()
    epk = _raw(eph.public_key())
    kid = fleet_kid(fleet_pub)
    wrapped = _kek(eph.exchange(fleet_pub), epk, _raw(fleet_pub)).encrypt(wrap_nonce, cek, kid.encode())
    cipher = AESGCM(cek).encrypt(nonce, plain, _aad(name, version))
    return cipher, Envelope(kid=kid, epk=epk, wrap_nonce=wrap_nonce, wrapped_key=wrapped, nonce=nonce)


def unwrap_key(env: Envelope, key: X25519PrivateKey | None, what: str) -> bytes:
    """The content key, or SealedModelRejected saying why not (no key, another fleet's key, tampered wrap)."""
    if key is None:
        raise SealedModelRejected(
            f"{what} is encrypted for fleet key {env.kid}, and this device has no fleet key (ota.fleet_key)"
        )
    public = key.public_key()
    if fleet_kid(public) != env.kid:
        raise SealedModelRejected(
            f"{what} is encrypted for fleet key {env.kid}; this device holds fleet key {fleet_kid(public)}"
        )
    try:
        peer = X25519PublicKey.from_public_bytes(env.epk)
        return _kek(key.exchange(peer), env.epk, _raw(public)).decrypt(
            env.wrap_nonce, env.wrapped_key, env.kid.encode()
        )
    except (InvalidTag, ValueError) as exc:
        raise SealedModelRejected(f"{what}: the wrapped content key failed authentication (tampered envelope)") from exc


def open_sealed(cipher: bytes, env: Envelope, key: X25519PrivateKey | None, *, name: str, version: str) -> bytes:
    """Decrypt a sealed model into memory; SealedModelRejected when the key or the GCM tag does not fit."""
    what = f"model {name} {version}"
    cek = unwrap_key(env, key, what)
    try:
        return AESGCM(cek).decrypt(env.nonce, cipher, _aad(name, version))
    except InvalidTag as exc:
        raise SealedModelRejected(
            f"{what}: the ciphertext failed authentication (AES-GCM tag mismatch): tampered or corrupt"
        ) from exc


# -- version directories ----------------------------------------------------------------------------
def model_source(version_dir: str | Path, manifest: Manifest, key: X25519PrivateKey | None) -> Path | bytes:
    """What to load: the model file for a plain version, the plaintext (in memory only) for a sealed one."""
    path = Path(version_dir) / manifest.file
    env = envelope_of(manifest)
    if env is None:
        return path
    try:
        cipher = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{manifest.name} {manifest.version}: cannot read {manifest.file}: {exc}") from exc
    return open_sealed(cipher, env, key, name=manifest.name, version=manifest.version)


def check_key(manifest: Manifest, key: X25519PrivateKey | None) -> None:
    """Before validating: the device can unwrap this sealed model's key (the model is not decrypted here)."""
    env = envelope_of(manifest)
    if env is not None:
        unwrap_key(env, key, f"model {manifest.name} {manifest.version}")


def seal_version_dir(src: str | Path, out_dir: str | Path, fleet_pub: X25519PublicKey) -> Manifest:
    """Write a sealed copy of the plain version directory ``src`` into ``out_dir`` (a new, empty dir).

    The writer applies the reader's rules: the manifest is re-validated and the result opens
    with the matching private key (``model_source``).
    """
    src, out = Path(src), Path(out_dir)
    plain = Manifest.load(src / MANIFEST_FILE)
    if envelope_of(plain) is not None:
        raise ManifestError(f"{src}: {plain.name} {plain.version} is already encrypted")
    cipher, env = seal((src / plain.file).read_bytes(), fleet_pub, name=plain.name, version=plain.version)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SEALED_FILE, cipher)
    if plain.golden:
        shutil.copyfile(src / plain.golden, out / plain.golden)
    raw = plain.to_dict()
    raw.update(
        file=SEALED_FILE,
        sha256=sha256_file(out / SEALED_FILE),
        size=len(cipher),
        encrypted=True,
        encryption=env.to_dict(),
    )
    sealed = Manifest.from_dict(raw)
    atomic_write_bytes(out / MANIFEST_FILE, sealed.to_json().encode())
    return sealed
