"""What a release downloads: the artifact's bytes described by their hashes, whole and per chunk.

Every chunk is named by its SHA-256 (``chunks``, which every agent checks) and, where the
publisher has the ``blake3`` module, also by its BLAKE3 (``chunks_blake3``). BLAKE3 is as
collision-resistant for this use and ~3x cheaper here (2.6 against 7.3 ms for 12.9 MB on one
core with SHA-NI; more where the CPU has no SHA instructions, as on many ARM boards), so an
agent that has the module checks a chunk by it (``chunk_matches``), and an older agent, which
ignores the field, by SHA-256. Both lists are inside the signed release. The whole-artifact
SHA-256 is checked once more before anything is unpacked (the update machine's verifying step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.errors import ManifestError
from edge_agent.wire.names import is_sha256

DEFAULT_CHUNK_SIZE = 128 * 1024  # AWS IoT Core's message size limit

try:
    from blake3 import blake3 as _blake3

    BLAKE3: Callable[[bytes | memoryview], Any] | None = _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; a platform without its wheel falls back
    BLAKE3 = None


def iter_chunks(blob: bytes, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    for i, off in enumerate(range(0, max(len(blob), 1), chunk_size)):
        yield i, blob[off : off + chunk_size]


@dataclass
class Artifact:
    """What to download: the packed bytes, their hash, and how they are chunked."""

    sha256: str
    size: int
    chunk_size: int
    chunks: list[str]  # sha256 of each chunk, in order
    format: str = "tar"
    url: str | None = None  # optional second transport (HTTP(S)); same bytes
    chunks_blake3: list[str] | None = None  # BLAKE3 of each chunk (checked instead of sha256 where available)

    @classmethod
    def from_blob(cls, blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, url: str | None = None) -> Artifact:
        pieces = [data for _, data in iter_chunks(blob, chunk_size)]
        chunks = [hashlib.sha256(data).hexdigest() for data in pieces]
        fast = None if BLAKE3 is None else [BLAKE3(data).hexdigest() for data in pieces]
        return cls(hashlib.sha256(blob).hexdigest(), len(blob), chunk_size, chunks, url=url, chunks_blake3=fast)

    def chunk_matches(self, index: int, data: bytes | memoryview) -> bool:
        """Whether ``data`` hashes to chunk ``index``: by BLAKE3 when both sides have it, else by SHA-256."""
        if self.chunks_blake3 is not None and BLAKE3 is not None:
            return bool(BLAKE3(data).hexdigest() == self.chunks_blake3[index])
        return hashlib.sha256(data).hexdigest() == self.chunks[index]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; a missing ``chunks_blake3`` is left out, as older publishers wrote it."""
        out = asdict(self)
        if self.chunks_blake3 is None:
            out.pop("chunks_blake3")
        return out


def check_artifact(artifact: Artifact, where: str = "artifact") -> Artifact:
    """The consistency a device relies on before touching disk or the network (ManifestError if not)."""
    fast = artifact.chunks_blake3
    if not is_sha256(artifact.sha256) or not all(is_sha256(c) for c in [*artifact.chunks, *(fast or [])]):
        raise ManifestError(f"{where}: sha256 and blake3 values must be 64 lowercase hex digits")
    if artifact.size < 0 or artifact.chunk_size <= 0:
        raise ManifestError(f"{where}: size must be >= 0 and chunk_size > 0")
    if len(artifact.chunks) != max(1, -(-artifact.size // artifact.chunk_size)):
        raise ManifestError(f"{where}: size, chunk_size and the chunk list disagree")
    if fast is not None and len(fast) != len(artifact.chunks):
        raise ManifestError(f"{where}: chunks and chunks_blake3 differ in length")
    return artifact


def artifact_from_dict(art: Any) -> Artifact:
    """An ``Artifact`` from its JSON form (types coerced; ``check_artifact`` checks the values)."""
    if not isinstance(art, Mapping):
        raise ManifestError("release: artifact must be an object")
    fast = art.get("chunks_blake3")
    if fast is not None and not isinstance(fast, list):
        raise ManifestError("release: chunks_blake3 must be a list")
    return Artifact(
        sha256=str(art["sha256"]),
        size=int(art["size"]),
        chunk_size=int(art["chunk_size"]),
        chunks=[str(c) for c in art["chunks"]],
        format=str(art.get("format", "tar")),
        url=art.get("url"),
        chunks_blake3=None if fast is None else [str(c) for c in fast],
    )
