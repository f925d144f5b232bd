"""Models encrypted at rest and in transit (#14 section 5), against a real broker, real agents and the real runtime.

A release made with ``cloud-batch release --encrypt`` carries the model sealed for the fleet key
(AES-256-GCM, the content key wrapped with X25519). A device with ``--fleet-key`` installs and
serves it while the plaintext exists only in memory; a device without the key, or with another
fleet's, refuses it with the reason; tampered ciphertext fails its GCM tag.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cloud_batch.cli.main import main as cloud_batch
from cloud_batch.fleetops.keys import generate_keys
from edge_agent.config import OtaConfig, load_config
from edge_agent.errors import ConfigError, ManifestError, SealedModelRejected
from edge_agent.fsutil import sha256_file
from edge_agent.models import sealed
from edge_agent.models.store import ModelStore
from edge_agent.wire.model.manifest import MANIFEST_FILE, MODEL_FILE
from tests.broker import Broker
from tests.support.env import free_port
from tests.support.ota import FLEET, Cloud, Device, relabel

BIN = Path(sys.executable).parent
TFLITE_ID = b"TFL3"  # the flatbuffer file identifier, at offset 4 of every .tflite


def _opts(fleet_key: Path | None) -> OtaConfig:
    return OtaConfig(
        poll_s=0.05,
        rollout_settle_s=0.3,
        max_artifact_bytes=200_000,
        stall_timeout_s=5,
        retry_backoff_s=0.2,
        fleet_key=fleet_key,
    )


def _sealed(src: Path, out: Path, fleet_pub: Path, edit: Callable[[Path], None] | None = None) -> Path:
    sealed.seal_version_dir(src, out, sealed.load_fleet_pub(fleet_pub))
    if edit is not None:
        edit(out)
    return out


def _no_plaintext(root: Path, model: bytes) -> list[str]:
    """Every file under ``root`` that holds the model in clear: a TFLite header, the whole model or a 64-byte piece."""
    pieces = [model[i : i + 64] for i in range(64, len(model) - 64, max(64, len(model) // 16))]
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if data[4:8] == TFLITE_ID or model in data or any(p in data for p in pieces):
            found.append(str(path.relative_to(root)))
    return found


# -- the envelope and the key files -----------------------------------------------------------------
def test_envelope_opens_only_with_its_key_name_and_untouched_bytes(tmp_path: Path, digits_dir: Path) -> None:
    key_path, _ = sealed.generate_fleet_key(tmp_path / "keys")
    assert key_path.stat().st_mode & 0o777 == 0o600
    key, other = sealed.load_fleet_key(key_path), X25519PrivateKey.generate()
    plain = (digits_dir / MODEL_FILE).read_bytes()
    cipher, env = sealed.seal(plain, key.public_key(), name="digits", version="2")
    assert plain not in cipher and cipher[4:8] != TFLITE_ID
    assert sealed.open_sealed(cipher, env, key, name="digits", version="2") == plain
    with pytest.raises(SealedModelRejected, match="no fleet key"):
        sealed.open_sealed(cipher, env, None, name="digits", version="2")
    with pytest.raises(SealedModelRejected, match="this device holds fleet key"):
        sealed.open_sealed(cipher, env, other, name="digits", version="2")
    with pytest.raises(SealedModelRejected, match="tag mismatch"):  # moved under another version
        sealed.open_sealed(cipher, env, key, name="digits", version="3")
    flipped = bytes([cipher[0] ^ 1]) + cipher[1:]
    with pytest.raises(SealedModelRejected, match="tag mismatch"):
        sealed.open_sealed(flipped, env, key, name="digits", version="2")
    bad_wrap = sealed.Envelope(env.kid, env.epk, env.wrap_nonce, bytes(48), env.nonce)
    with pytest.raises(SealedModelRejected, match="wrapped content key"):
        sealed.open_sealed(cipher, bad_wrap, key, name="digits", version="2")
    raw = env.to_dict()
    assert sealed.Envelope.from_dict(raw) == env
    with pytest.raises(ManifestError, match=r"manifest\.encryption\.nonce"):
        sealed.Envelope.from_dict({**raw, "nonce": "not base64!"})
    with pytest.raises(ConfigError, match="already exists"):
        sealed.generate_fleet_key(tmp_path / "keys")


def test_a_fleet_key_readable_by_others_is_refused_at_start(tmp_path: Path) -> None:
    key_path, pub_path = sealed.generate_fleet_key(tmp_path / "keys")
    os.chmod(key_path, 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600"):
        load_config(env={}, overrides={"ota": {"fleet_key": str(key_path)}})
    os.chmod(key_path, 0o600)
    shutil.copyfile(pub_path, key_path)  # a public key where the private one belongs
    with pytest.raises(ConfigError, match=r"cannot read fleet key"):
        load_config(env={}, overrides={"ota": {"fleet_key": str(key_path)}})
    signing_key, _ = generate_keys(tmp_path / "signing")  # an Ed25519 key, 0600
    with pytest.raises(ConfigError, match=r"is not an X25519 private key"):
        load_config(env={}, overrides={"ota": {"fleet_key": str(signing_key)}})


def test_the_store_keeps_a_sealed_version_encrypted_and_refuses_tampered_bytes(
    tmp_path: Path, digits_dir: Path
) -> None:
    key_path, pub_path = sealed.generate_fleet_key(tmp_path / "keys")
    version = _sealed(digits_dir, tmp_path / "sealed", pub_path)
    store = ModelStore(tmp_path / "data", fleet_key=key_path)
    store.install_dir(version)  # verify=True: golden samples run on the plaintext, in memory
    model = store.load("digits", "1")
    golden = np.load(digits_dir / "golden.npz")
    np.testing.assert_allclose(model.predict({"pixels": golden["in:pixels"]})["probs"], golden["out:probs"], atol=0.01)
    assert _no_plaintext(tmp_path / "data", (digits_dir / MODEL_FILE).read_bytes()) == []
    with pytest.raises(SealedModelRejected, match="no fleet key"):
        ModelStore(tmp_path / "data").load("digits", "1")
    enc = store.version_dir("digits", "1") / sealed.SEALED_FILE
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x40
    enc.write_bytes(bytes(data))
    with pytest.raises(SealedModelRejected, match="tag mismatch"):
        ModelStore(tmp_path / "data", fleet_key=key_path).load("digits", "1")


# -- over the air, real broker ------------------------------------------------------------------------
def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if data else {}


def _wait_served(port: int, proc: subprocess.Popen, name: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if _request(port, "GET", f"/v2/models/{name}/ready")[0] == 200:
                return _request(port, "GET", f"/v2/models/{name}")[1]
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{name} was never served")


def test_an_encrypted_release_installs_serves_and_no_plaintext_reaches_the_disk(
    tmp_path: Path, broker: Broker, digits_dir: Path
) -> None:
    """`cloud-batch release --encrypt` → `edge-agent run --fleet-key` → active → an inference answers."""
    keys = tmp_path / "keys"
    assert cloud_batch(["keys", "generate", "--out", str(keys)]) == 0
    assert cloud_batch(["keys", "generate", "--out", str(keys), "--fleet-key"]) == 0
    registry = tmp_path / "registry"
    relabel(digits_dir, registry / "digits" / "1", "1")
    data_dir, port = tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(EDGEFLEET_MODELS_DIR="", EDGEFLEET_WATCH_INTERVAL_S="0.2")
    agent = [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"]
    agent += ["--broker", broker.url, "--fleet", FLEET, "--device-id", "cam-1", "--trust", str(keys / "signing.pub")]
    proc = subprocess.Popen(
        [*agent, "--fleet-key", str(keys / "fleet.key")], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        release = ["release", "digits", "--version", "1", "--fleet", FLEET, "--registry", str(registry)]
        release += ["--key", str(keys / "signing.key"), "--broker", broker.url, "--health-window-s", "0.5"]
        assert cloud_batch([*release, "--encrypt", "--no-progress"]) == 0
        meta = _wait_served(port, proc, "digits")
        assert meta["versions"] == ["1"] and meta["parameters"]["active_version"] == "1", meta
        golden = np.load(digits_dir / "golden.npz")
        x = golden["in:pixels"][:4]
        status, out = _request(
            port,
            "POST",
            "/v2/models/digits/infer",
            {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]},
        )
        assert status == 200, out
        probs = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(4, 10)
        np.testing.assert_allclose(probs, golden["out:probs"][:4], atol=0.01)
        installed = data_dir / "models" / "digits" / "versions" / "1"
        manifest = json.loads((installed / MANIFEST_FILE).read_text())
        assert manifest["encrypted"] is True and manifest["file"] == sealed.SEALED_FILE
        assert not (installed / MODEL_FILE).exists()
        assert _no_plaintext(data_dir, (digits_dir / MODEL_FILE).read_bytes()) == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_device_without_the_fleet_key_or_with_another_refuses_and_keeps_serving(
    tmp_path: Path, cloud: Cloud, make_device: Callable[..., Device], digits_dir: Path
) -> None:
    _, pub_path = sealed.generate_fleet_key(tmp_path / "keys")
    other_key, _ = sealed.generate_fleet_key(tmp_path / "other")
    keyless = make_device(options=_opts(None))
    stranger = make_device(options=_opts(other_key))
    v2 = _sealed(relabel(digits_dir, tmp_path / "v2", "2"), tmp_path / "v2-sealed", pub_path)
    doc = cloud.release(v2)
    for device, why in ((keyless, "this device has no fleet key"), (stranger, "this device holds fleet key")):
        report = cloud.wait_result(device.device_id, doc["release_id"])
        assert report.state == "failed", report  # refused after download: final, nothing installed
        assert "is encrypted for fleet key" in (report.reason or "") and why in (report.reason or ""), report
        device.nothing_installed()


def test_tampered_ciphertext_is_rejected_by_its_gcm_tag(
    tmp_path: Path, cloud: Cloud, make_device: Callable[..., Device], digits_dir: Path
) -> None:
    """Signed, sha256 right (tampered before signing): only the AEAD tag can tell, and it does."""
    key_path, pub_path = sealed.generate_fleet_key(tmp_path / "keys")
    device = make_device(options=_opts(key_path))

    def flip(out: Path) -> None:
        enc = out / sealed.SEALED_FILE
        data = bytearray(enc.read_bytes())
        data[100] ^= 0x01
        enc.write_bytes(bytes(data))
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        manifest["sha256"] = sha256_file(enc)
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))

    v2 = _sealed(relabel(digits_dir, tmp_path / "v2", "2"), tmp_path / "v2-sealed", pub_path, flip)
    doc = cloud.release(v2)
    report = cloud.wait_result(device.device_id, doc["release_id"])
    assert report.state == "failed", report
    assert "ciphertext failed authentication (AES-GCM tag mismatch)" in (report.reason or ""), report
    device.nothing_installed()
