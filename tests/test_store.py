"""The model store: immutable versions, atomic activation, rollback, pruning and crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_agent.errors import ManifestError, NotFoundError, RejectedError
from edge_agent.inference.modelpack import build_version_dir, verify_version_dir
from edge_agent.models.store import ModelStore


def _version(digits_dir: Path, tmp: Path, version: str) -> Path:
    out = tmp / f"build-{version}"
    build_version_dir(digits_dir / "model.tflite", out, name="digits", version=version)
    return out


def test_first_install_activates_later_ones_do_not(store: ModelStore, digits_dir: Path, tmp_path: Path) -> None:
    assert store.active("digits") == "1"
    store.install_dir(_version(digits_dir, tmp_path, "2"))
    assert store.versions("digits") == ["1", "2"]
    assert store.active("digits") == "1"


def test_activate_and_rollback(store: ModelStore, digits_dir: Path, tmp_path: Path) -> None:
    store.install_dir(_version(digits_dir, tmp_path, "2"))
    store.activate("digits", "2")
    assert store.active("digits") == "2"
    store.activate("digits", "2")  # idempotent
    assert store.state("digits").history == ["1", "2"]
    assert store.rollback("digits") == "1"
    assert store.active("digits") == "1"
    with pytest.raises(NotFoundError):
        store.rollback("digits")


def test_activate_unknown_version_changes_nothing(store: ModelStore) -> None:
    before = (store.root / "digits" / "state.json").read_bytes()
    with pytest.raises(NotFoundError):
        store.activate("digits", "9")
    with pytest.raises(ManifestError):
        store.activate("digits", "../../etc")
    assert (store.root / "digits" / "state.json").read_bytes() == before


def test_install_file_derives_spec_and_golden(tmp_path: Path, digits_dir: Path) -> None:
    s = ModelStore(tmp_path / "d")
    m = s.install_file(digits_dir / "model.tflite", "mine")
    assert (m.name, m.version) == ("mine", "1")
    assert m.inputs[0].dtype == "int8" and m.inputs[0].quantization is not None
    assert verify_version_dir(s.version_dir("mine", "1")).sha256 == m.sha256
    assert s.install_file(digits_dir / "model.tflite", "mine").version == "2"


def test_same_version_different_content_is_rejected(store: ModelStore, digits_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_version_dir(digits_dir / "model.tflite", other, name="digits", version="1")
    blob = bytearray((other / "model.tflite").read_bytes())
    # Re-register a different file as version 1: build from a copy with one appended byte.
    alt = tmp_path / "alt.tflite"
    alt.write_bytes(bytes(blob) + b"\0")
    alt_dir = tmp_path / "alt"
    build_version_dir(alt, alt_dir, name="digits", version="1")
    with pytest.raises(RejectedError, match="different content"):
        store.install_dir(alt_dir)
    assert (
        verify_version_dir(store.version_dir("digits", "1")).sha256
        != json.loads((alt_dir / "manifest.json").read_text())["sha256"]
    )


def test_corrupt_bundle_is_rejected_and_nothing_installed(store: ModelStore, digits_dir: Path, tmp_path: Path) -> None:
    bad = _version(digits_dir, tmp_path, "2")
    data = bytearray((bad / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(RejectedError, match="sha256"):
        store.install_dir(bad)
    assert store.versions("digits") == ["1"]


def test_keep_last_n_versions(tmp_path: Path, digits_dir: Path) -> None:
    s = ModelStore(tmp_path / "d", keep=3)
    for v in ("1", "2", "3", "4", "5"):
        s.install_dir(_version(digits_dir, tmp_path, v))
        s.activate("digits", v)
    assert s.versions("digits") == ["3", "4", "5"]
    assert s.rollback("digits") == "4"


def test_recover_cleans_partial_copies(store: ModelStore) -> None:
    junk = store.root / "digits" / "versions" / ".tmp-abc"
    junk.mkdir()
    (junk / "model.tflite").write_bytes(b"half")
    store.recover()
    assert not junk.exists()
    assert store.versions("digits") == ["1"]


_WORKER = textwrap.dedent(
    """
    import sys, itertools
    from edge_agent.models.store import ModelStore
    store = ModelStore(sys.argv[1])
    builds = sys.argv[2:]
    print("ready", flush=True)
    for i in itertools.count():
        src = builds[i % len(builds)]
        m = store.install_dir(src, verify=False)
        store.activate(m.name, m.version)
        if i % 3 == 2:
            store.rollback(m.name)
    """
)


def test_kill_9_during_install_and_activation_leaves_a_valid_active_version(
    store: ModelStore, digits_dir: Path, tmp_path: Path
) -> None:
    """Kill the writer at 25 random moments; each time the store must hold a complete, active version."""
    builds = [str(_version(digits_dir, tmp_path, str(v))) for v in range(2, 8)]
    data_dir = store.root.parent
    rng = random.Random(1234)
    for _ in range(25):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(data_dir), *rng.sample(builds, len(builds))], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        fresh = ModelStore(data_dir)
        fresh.recover()
        active = fresh.active("digits")
        assert active in fresh.versions("digits")
        verify_version_dir(fresh.version_dir("digits", active))  # sha256 and golden samples hold
        leftovers = [p.name for p in (fresh.root / "digits" / "versions").iterdir() if p.name.startswith(".")]
        assert leftovers == []
