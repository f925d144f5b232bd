"""``cloud-batch agent register`` and ``cloud-batch release edge-agent --kind agent`` (#11 part 4) through the CLI.

The build is a small one-folder stand-in (an ``edge-agent`` file, ``VERSION``, ``SHA256SUMS``):
the commands check the manifest and the version, not the binary, and the real frozen build's
release to a device is tests/test_agent_ota.py. The release goes to a real mosquitto and is read
back by a separate client: signed, kind ``agent``, staged, windowed, chunked.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from cloud_batch.cli.main import main as cloud_batch
from edge_agent.update.agent.installer import ARCHIVE
from edge_agent.update.agent.slots import write_manifest
from edge_agent.wire.protocol import Release, Rollout, unpack_to
from edge_agent.wire.signing import load_public_key, verify
from edge_agent.wire.topics import parse_chunk_topic, release_topic, rollout_topic
from tests.broker import Broker, retained

FLEET = "plant-7"


def build(folder: Path, version: str) -> Path:
    """A one-folder build as ``make package`` lays it out (a stand-in binary: nothing here runs it)."""
    (folder / "_internal").mkdir(parents=True)
    (folder / "edge-agent").write_bytes(b"\x7fELF stand-in " + version.encode())
    (folder / "_internal" / "lib.so").write_bytes(os.urandom(16384))  # does not compress
    write_manifest(folder, version)
    return folder


def test_agent_register_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg, dist = tmp_path / "reg", build(tmp_path / "dist", "0.2.0")
    assert cloud_batch(["agent", "register", str(dist), "--version", "0.2.0", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert f"registered agent 0.2.0 in {reg / 'edge-agent' / '0.2.0'}" in out
    assert "cloud-batch release edge-agent --kind agent --version 0.2.0" in out
    stored = reg / "edge-agent" / "0.2.0"
    assert (stored / "VERSION").read_text() == "0.2.0\n"
    with tarfile.open(stored / ARCHIVE) as tar:
        assert sorted(tar.getnames()) == ["edge-agent", *(f"edge-agent/{n}" for n in
                                          ("SHA256SUMS", "VERSION", "_internal", "_internal/lib.so", "edge-agent"))]  # fmt: skip

    # one-line errors, nothing stored: another version, a second registration, a tampered file
    assert cloud_batch(["agent", "register", str(dist), "--version", "0.3.0", "--registry", str(reg)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {dist}/VERSION says 0.2.0, not 0.3.0")
    assert cloud_batch(["agent", "register", str(dist), "--version", "0.2.0", "--registry", str(reg)]) == 2
    assert capsys.readouterr().err.startswith("error: agent 0.2.0 is already registered")
    (dist / "_internal" / "lib.so").write_bytes(b"changed after the manifest")
    assert (
        cloud_batch(["agent", "register", str(dist), "--version", "0.2.0", "--registry", str(tmp_path / "reg2")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "SHA256SUMS: _internal/lib.so" in err and "Traceback" not in err
    assert not (tmp_path / "reg2" / "edge-agent" / "0.2.0").exists()


def test_release_kind_agent_cli(
    tmp_path: Path, broker: Broker, key_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    reg = tmp_path / "reg"
    assert cloud_batch(["agent", "register", str(build(tmp_path / "dist", "0.2.0")), "--version", "0.2.0",
                        "--registry", str(reg)]) == 0  # fmt: skip
    base = ["release", "edge-agent", "--kind", "agent", "--version", "0.2.0", "--fleet", FLEET, "--registry",
            str(reg), "--key", str(key_files[0]), "--broker", broker.url, "--no-progress", "--chunk-size", "1024"]  # fmt: skip
    # refused before anything is published: another name, an encrypted agent, an unregistered version
    assert cloud_batch([*base[:1], "digits", *base[2:]]) == 2
    assert "an agent release is named 'edge-agent'" in capsys.readouterr().err
    assert cloud_batch([*base, "--encrypt"]) == 2
    assert capsys.readouterr().err.startswith("error: --encrypt seals models")
    assert cloud_batch([*base[:5], "0.9.0", *base[6:]]) == 2
    assert capsys.readouterr().err.startswith("error: agent 0.9.0 is not registered")
    assert retained(broker.url) == {}

    assert cloud_batch([*base, "--rollout", "50,100", "--window", "02:00-04:00"]) == 0
    assert "released edge-agent 0.2.0 to fleet plant-7" in capsys.readouterr().out
    held = retained(broker.url)
    doc = json.loads(held[release_topic(FLEET, "edge-agent")])
    verify(doc, [load_public_key(key_files[1])])
    rel = Release.from_dict(doc)
    assert (rel.name, rel.version, rel.kind, rel.rollback) == ("edge-agent", "0.2.0", "agent", False)
    assert rel.policy.stages == [50, 100] and rel.policy.window == "02:00-04:00"
    ro = Rollout.from_dict(json.loads(held[rollout_topic(FLEET, "edge-agent")]))
    assert (ro.release_id, ro.stage, ro.percent, ro.status) == (rel.release_id, 0, 50, "active")
    # the artifact: the registered tar and VERSION, chunked, each chunk matching its hash
    art = rel.artifact
    chunks = {i: p for t, p in held.items() if (c := parse_chunk_topic(t)) and c[0] == art.sha256 for i in [c[1]]}
    blob = b"".join(chunks[i] for i in range(len(art.chunks)))
    assert hashlib.sha256(blob).hexdigest() == art.sha256 and len(art.chunks) > 1
    (tmp_path / "artifact.tar").write_bytes(blob)
    out = tmp_path / "unpacked"
    assert sorted(unpack_to(tmp_path / "artifact.tar", out)) == ["VERSION", ARCHIVE]
    assert (out / "VERSION").read_text() == "0.2.0\n"
    assert (out / ARCHIVE).read_bytes() == (reg / "edge-agent" / "0.2.0" / ARCHIVE).read_bytes()
