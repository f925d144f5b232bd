"""Signing and verifying on the cloud side: every release and rollout gets the registry's next ``seq``.

``sign_release`` and ``sign_rollout`` are the only ways the cloud signs a wire document: each
takes the next ``seq`` of its (fleet, kind, name) from ``registry.signed.SignedLog``, signs,
parses the result as a device will, and records it in the registry before anyone publishes it.
``Trust`` is what the read side checks retained documents against (``--trust``, defaulting to
the public half of ``--key``), together with that record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud_batch.errors import InputError, input_errors
from cloud_batch.fleetops.keys import load_signing_key
from cloud_batch.registry.signed import SignedLog
from edge_agent.errors import EdgeError, RejectedError
from edge_agent.wire.protocol import Release, Rollout
from edge_agent.wire.signing import load_public_key, sign, verify


def sign_release(rel: Release, key: Ed25519PrivateKey, log: SignedLog) -> dict[str, Any]:
    """Give ``rel`` the next ``seq``, sign it (setting ``rel.seq`` and ``rel.signature``), record it; return the document.

    InputError if a device would find the document malformed (nothing is recorded then).
    """

    def build(seq: int) -> dict[str, Any]:
        rel.seq = seq
        signed = sign(rel.to_dict(), key)
        try:
            Release.from_dict(signed)  # what every device does first
        except EdgeError as exc:
            raise InputError(f"the release document would be malformed: {exc}") from exc
        rel.signature = signed["signature"]
        return signed

    return log.issue(rel.fleet, rel.kind, rel.name, build)


def sign_rollout(ro: Rollout, key: Ed25519PrivateKey, log: SignedLog) -> Rollout:
    """Give ``ro`` (its ``fleet`` and ``name`` set) the next rollout ``seq``, sign and record it; return it signed."""

    def build(seq: int) -> dict[str, Any]:
        ro.seq = seq
        ro.signature = None
        signed = sign(ro.to_dict(), key)
        ro.signature = signed["signature"]
        return signed

    log.issue(ro.fleet, "rollout", ro.name, build)
    return ro


@dataclass(frozen=True)
class Trust:
    """The public keys the cloud's read commands accept, and the registry's record of what it signed."""

    keys: tuple[Ed25519PublicKey, ...]
    log: SignedLog
    signing: Ed25519PrivateKey | None = None  # for the commands that write (rollout advance / abort)

    @classmethod
    def load(cls, registry_dir: str | Path, trust: Iterable[str | Path] = (), key: str | Path | None = None) -> Trust:
        """``trust`` public key files; with none, the public half of ``key``. InputError when neither is given."""
        signing = load_signing_key(key) if key is not None else None
        keys: list[Ed25519PublicKey] = []
        for path in trust:
            with input_errors():
                keys.append(load_public_key(path))
        if not keys and signing is not None:
            keys.append(signing.public_key())
        if not keys:
            raise InputError("no trusted key: give --trust PUBLIC_KEY (or --key, whose public half is trusted)")
        return cls(tuple(keys), SignedLog(registry_dir), signing)

    def key(self, what: str) -> Ed25519PrivateKey:
        """The signing key a write needs; InputError naming the command otherwise."""
        if self.signing is None:
            raise InputError(f"{what} signs a new rollout document: give --key")
        return self.signing

    def authentic(self, doc: dict[str, Any]) -> str | None:
        """None when ``doc``'s signature verifies against these keys, else why not."""
        try:
            verify(doc, self.keys)
        except RejectedError as exc:
            return str(exc)
        return None
