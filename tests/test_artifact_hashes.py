"""Chunk hashes in the signed artifact (edge_agent/wire/artifact.py): SHA-256 always, BLAKE3 beside it.

An agent with the ``blake3`` module checks chunks by BLAKE3, one without it (or a release from an
older publisher, which has no ``chunks_blake3``) by SHA-256; an older agent ignores the field and
still verifies the signature, which covers the document as sent.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from blake3 import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import ManifestError
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.wire.artifact import Artifact, artifact_from_dict, check_artifact
from edge_agent.wire.protocol import Release
from edge_agent.wire.signing import sign, verify

CHUNK = 1024


def _release(art: Artifact) -> Release:
    return Release(release_id="r1", fleet="f", name="m", version="1.0.0", artifact=art)


def test_both_hash_lists_are_published_and_round_trip() -> None:
    blob = os.urandom(5 * CHUNK + 10)
    art = Artifact.from_blob(blob, CHUNK)
    pieces = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)]
    assert art.chunks == [hashlib.sha256(p).hexdigest() for p in pieces]
    assert art.chunks_blake3 == [blake3(p).hexdigest() for p in pieces]
    doc = _release(art).to_dict()
    assert Release.from_dict(doc).artifact == art and doc["artifact"]["chunks_blake3"] == art.chunks_blake3


def test_an_older_publishers_artifact_has_no_field_and_is_checked_by_sha256(tmp_path) -> None:
    blob = os.urandom(3 * CHUNK)
    old = Artifact.from_blob(blob, CHUNK)
    old.chunks_blake3 = None
    doc = _release(old).to_dict()
    assert "chunks_blake3" not in doc["artifact"], "written as before: older readers see the same document"
    parsed = Release.from_dict(doc).artifact
    assert parsed.chunks_blake3 is None and parsed.chunk_matches(1, blob[CHUNK : 2 * CHUNK])
    store = ChunkStore(tmp_path, parsed)
    assert store.put(1, blob[CHUNK : 2 * CHUNK]) and not store.put(2, blob[:CHUNK])


def test_blake3_is_what_decides_when_both_sides_have_it() -> None:
    blob = os.urandom(2 * CHUNK)
    art = Artifact.from_blob(blob, CHUNK)
    assert art.chunk_matches(0, blob[:CHUNK]) and not art.chunk_matches(0, blob[CHUNK:])
    art.chunks_blake3 = [blake3(b"other").hexdigest(), art.chunks_blake3[1]]  # type: ignore[index]
    assert not art.chunk_matches(0, blob[:CHUNK]), "a sha256 match does not override a blake3 mismatch"


@pytest.mark.parametrize(
    ("fast", "message"),
    [
        (["ab" * 32], "differ in length"),
        (["AB" * 32, "ab" * 32], "64 lowercase hex"),
        (["zz" * 32, "ab" * 32], "64 lowercase hex"),
    ],
)
def test_malformed_blake3_lists_are_refused(fast: list[str], message: str) -> None:
    art = Artifact.from_blob(os.urandom(2 * CHUNK), CHUNK)
    art.chunks_blake3 = fast
    with pytest.raises(ManifestError, match=message):
        check_artifact(art)
    with pytest.raises(ManifestError, match=message):
        Release.from_dict(_release(art).to_dict())


def test_a_non_list_field_is_a_manifest_error() -> None:
    doc = Artifact.from_blob(b"abc", CHUNK).to_dict()
    doc["chunks_blake3"] = "ab" * 32
    with pytest.raises(ManifestError, match="must be a list"):
        artifact_from_dict(doc)


def test_an_older_agent_verifies_the_signature_of_a_document_with_the_field() -> None:
    """The signature covers the document as sent; a reader that drops unknown fields still verifies it."""
    key = Ed25519PrivateKey.generate()
    doc = sign(_release(Artifact.from_blob(os.urandom(3 * CHUNK), CHUNK)).to_dict(), key)
    assert "chunks_blake3" in doc["artifact"]
    assert verify(doc, [key.public_key()])
    older = {k: v for k, v in doc["artifact"].items() if k != "chunks_blake3"}
    assert artifact_from_dict(older).chunks_blake3 is None
