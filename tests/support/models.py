"""Candidate models that fail in known ways, for the validation and OTA tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edge_agent.inference.modelpack import sha256_file
from edge_agent.wire.model.manifest import MANIFEST_FILE, MODEL_FILE


def replace_model(version_dir: Path, data: bytes) -> Path:
    """Swap in other model bytes and fix the manifest's sha256 and size, so only the model itself is at fault."""
    (version_dir / MODEL_FILE).write_bytes(data)
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(version_dir / MODEL_FILE)
    manifest["size"] = len(data)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    return version_dir


def crashing_model(valid: bytes) -> bytes:
    """A crafted .tflite that segfaults tflite-runtime on load (ai-edge-litert refuses it cleanly).

    tflite-runtime's Python loader builds the flatbuffer model without running the flatbuffer
    verifier, so pointing the root table offset (the first 4 bytes) far outside the file makes
    the loader read unmapped memory: SIGSEGV, not a Python exception. ai-edge-litert verifies
    the buffer and raises "The model is not a valid Flatbuffer buffer".
    """
    return struct.pack("<I", 0x7FFFFF00) + valid[4:]


# What crashing_model() may do to the runtime: crash it (only the validation child dies) or be refused
# by it. Both are correct; what matters is that it is refused with the reason and the agent goes on.
BROKEN_MODEL_REASONS = (
    "validation process crashed (SIGSEGV)",
    "cannot load model.tflite on this device's runtime (ai-edge-litert): The model is not a valid Flatbuffer buffer",
)
