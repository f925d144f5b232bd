"""Candidate models that fail in known ways, for the validation and OTA tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edge_agent.inference.modelpack import sha256_file
from edge_agent.wire.manifest import MANIFEST_FILE, MODEL_FILE


def replace_model(version_dir: Path, data: bytes) -> Path:
    """Swap in other model bytes and fix the manifest's sha256 and size, so only the model itself is at fault."""
    (version_dir / MODEL_FILE).write_bytes(data)
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(version_dir / MODEL_FILE)
    manifest["size"] = len(data)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    return version_dir


def crashing_model(valid: bytes) -> bytes:
    """A crafted .tflite that segfaults tflite-runtime on load.

    The runtime's Python loader builds the flatbuffer model without running the flatbuffer
    verifier, so pointing the root table offset (the first 4 bytes) far outside the file makes
    the loader read unmapped memory: SIGSEGV, not a Python exception.
    """
    return struct.pack("<I", 0x7FFFFF00) + valid[4:]
