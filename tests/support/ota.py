"""The two sides of an over-the-air test, in this process: the cloud's release job and an edge device.

``Cloud`` publishes signed releases (chunks with ``publish_artifact``, the release document
retained) and watches the devices' retained state and presence; ``Device`` runs ``OtaAgent``
with a real ``ModelStore`` and ``ModelServer``. Shared by every OTA test module, so each
proves its capability against the same real broker, store and runtime.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from cloud_batch.fleetops.publish import publish_artifact
from cloud_batch.registry.signed import SignedLog
from edge_agent.config import OtaConfig
from edge_agent.inference.runtime import RuntimeOptions
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.mqtt.link import MqttLink
from edge_agent.update.coordinator import OtaAgent, will_for
from edge_agent.wire.model.manifest import MANIFEST_FILE
from edge_agent.wire.policy import Policy
from edge_agent.wire.protocol import Artifact, DeviceState, Release, Rollout, UpdateReport, encode, pack_dir
from edge_agent.wire.signing import sign
from edge_agent.wire.topics import presence_filter, release_topic, rollout_topic, state_filter

FLEET = "plant-7"
CHUNK = 4096  # small chunks: every artifact takes a dozen or more
WAIT_S = 90.0
# Every state a successful update saves and reports, in order (the on-disk names).
COMMITTED_PATH = ["idle", "downloading", "verifying", "validating", "activating", "health_check", "committed"]


def relabel(src: Path, out: Path, version: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of a version directory as ``version`` (same model and golden samples, so a valid candidate)."""
    shutil.copytree(src, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["version"] = version
    if edit is not None:
        edit(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


class Cloud:
    """The release job and the fleet dashboard: publishes releases, reads device states."""

    def __init__(self, url: str, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.signed = SignedLog(tempfile.mkdtemp(prefix="cloud-signed-"))  # issues every seq, like the registry
        self.link = MqttLink(url, f"cloud-{uuid.uuid4().hex[:6]}")
        self.states: dict[str, DeviceState] = {}
        self.presence: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.link.subscribe(state_filter(FLEET), self._on_state)
        self.link.subscribe(presence_filter(FLEET), self._on_presence)
        self.link.start()
        assert self.link.wait_connected(10)

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        state = DeviceState.from_dict(json.loads(payload))
        with self.cond:
            self.states[state.device_id] = state
            self.cond.notify_all()

    def _on_presence(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.cond:
            self.presence[topic.split("/")[-2]] = payload
            self.cond.notify_all()

    def close(self) -> None:
        self.link.stop()

    def release(
        self,
        version_dir: Path,
        *,
        version: str | None = None,
        release_id: str | None = None,
        key: Ed25519PrivateKey | str | None = "default",
        fleet: str = FLEET,
        rollback: bool = False,
        publish_chunks: bool = True,
        artifact: Artifact | None = None,
        after_sign: Callable[[dict[str, Any]], None] | None = None,
        expires_at: float | None = None,
        **policy: Any,
    ) -> dict[str, Any]:
        """Pack, publish the chunks and the signed release (retained, next seq); return the release document.

        A rollback expires in an hour unless ``expires_at`` says otherwise.
        """
        manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
        blob = pack_dir(version_dir)
        if artifact is None:
            artifact = publish_artifact(self.link, blob, CHUNK) if publish_chunks else Artifact.from_blob(blob, CHUNK)
        policy.setdefault("health_window_s", 0.5)
        rel = Release(
            release_id=release_id or f"{manifest['name']}-{uuid.uuid4().hex[:8]}",
            fleet=fleet,
            name=manifest["name"],
            version=version or manifest["version"],
            artifact=artifact,
            rollback=rollback,
            policy=Policy(**policy),
            expires_at=expires_at if expires_at is not None or not rollback else time.time() + 3600,
        )
        signer = self.key if key == "default" else key

        def build(seq: int) -> dict[str, Any]:
            rel.seq = seq
            doc = rel.to_dict()
            return sign(doc, signer) if signer is not None else doc  # type: ignore[arg-type]

        doc = self.signed.issue(fleet, "model", rel.name, build)
        if after_sign is not None:
            after_sign(doc)
        self.publish_release(manifest["name"], encode(doc))
        return doc

    def publish_release(self, name: str, payload: bytes) -> None:
        self.link.publish(release_topic(FLEET, name), payload, retain=True, wait_s=10)

    def rollout(
        self, name: str, release_id: str, percent: int, status: str = "active", *, signed: bool = True
    ) -> dict[str, Any]:
        """Publish a rollout document (signed with the next rollout seq unless ``signed`` is False); return it."""

        def build(seq: int) -> dict[str, Any]:
            doc = Rollout(release_id, percent, status=status, seq=seq, fleet=FLEET, name=name).to_dict()
            return sign(doc, self.key) if signed else doc

        doc = self.signed.issue(FLEET, "rollout", name, build)
        self.link.publish(rollout_topic(FLEET, name), encode(doc), retain=True, wait_s=10)
        return doc

    def wait(self, pred: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred()
                if got:
                    return got
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}; device states: {self.states}"
                self.cond.wait(min(left, 0.2))

    def report(self, device_id: str, name: str) -> UpdateReport | None:
        state = self.states.get(device_id)
        return state.updates.get(name) if state else None

    def wait_result(
        self, device_id: str, release_id: str, name: str = "digits", state: str | None = None
    ) -> UpdateReport:
        """The device's report for ``release_id`` once it has a result (or reaches ``state``)."""

        def done() -> UpdateReport | None:
            r = self.report(device_id, name)
            if r is None or r.release_id != release_id:
                return None
            return r if (r.state == state if state else r.result is not None) else None

        return self.wait(done, f"{release_id} on {device_id} to reach {state or 'a result'}")


class Device:
    """An edge agent process's OTA parts, in this process: store, model server, MQTT link, OtaAgent."""

    def __init__(
        self,
        url: str,
        data_dir: Path,
        trusted: list[Any],
        install: list[Path],
        *,
        device_id: str | None = None,
        options: OtaConfig | None = None,
        **seams: Any,
    ) -> None:
        self.device_id = device_id or f"dev-{uuid.uuid4().hex[:6]}"
        self.data_dir = data_dir
        self.store = ModelStore(data_dir, fleet_key=options.fleet_key if options else None)
        for d in install:
            self.store.install_dir(d)
        self.server = ModelServer(self.store, RuntimeOptions(num_threads=1, pool_size=2), warmup_runs=1)
        self.server.sync()
        self.server.start(0.05)
        self.swaps: list[tuple[str, str | None, str | None]] = []
        self.server.add_listener(
            lambda n, old, new: self.swaps.append((n, old.version if old else None, new.version if new else None))
        )
        opts = options or OtaConfig(
            poll_s=0.05, rollout_settle_s=0.3, max_artifact_bytes=120_000, stall_timeout_s=5, retry_backoff_s=0.2
        )
        self.link = MqttLink(
            url, self.device_id, will=will_for(FLEET, self.device_id), max_packet_bytes=opts.max_message_bytes
        )
        self.metrics = CollectorRegistry()
        self.ota = OtaAgent(
            self.link,
            self.store,
            self.server,
            data_dir,
            self.device_id,
            FLEET,
            trusted,
            options=opts,
            metrics=self.metrics,
            **seams,
        )
        self.link.start()
        assert self.link.wait_connected(10)
        self.ota.start()

    def dropped(self, kind: str = "release") -> float:
        """``edgefleet_ota_rejected_unauthenticated_total{kind}`` of this agent (since its last restart)."""
        value = self.metrics.get_sample_value("edgefleet_ota_rejected_unauthenticated_total", {"kind": kind})
        return value or 0.0

    def restart_agent(self, **seams: Any) -> None:
        self.ota.stop()
        self.metrics = CollectorRegistry()
        self.ota = OtaAgent(
            self.link,
            self.store,
            self.server,
            self.data_dir,
            self.device_id,
            FLEET,
            self.ota.trusted,
            options=self.ota.options,
            metrics=self.metrics,
            **seams,
        )
        self.ota.start()

    def close(self) -> None:
        self.ota.stop()
        self.link.stop()
        self.server.stop()

    def nothing_installed(self, name: str = "digits", *, staged: bool = False) -> None:
        """The store holds and serves version 1 only; no candidate is left staged unless ``staged``."""
        assert self.store.versions(name) == ["1"]
        assert self.store.active(name) == "1"
        assert self.server.get(name).version == "1"
        staging = self.data_dir / "staging"
        assert staged or not staging.exists() or not any(staging.iterdir())
