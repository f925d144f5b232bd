"""``cloud-batch pki``: the CA and identities, and the mTLS + ACL broker they configure, proven on a real mosquitto.

The broker runs the generated ``mosquitto.conf`` and ``acl`` unchanged (``Broker(listener=...)``
only adds persistence and a log). Attacks are made with real client certificates over TLS; each
is checked by a witness with the release service's identity and by the broker's retained
messages, and each has a control that goes through, so a test that sees nothing could have
seen something.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_batch.cli import main as cloud_cli
from cloud_batch.errors import BrokerUnreachableError, InputError
from cloud_batch.fleetops.broker import open_link, tls_config
from cloud_batch.fleetops.fleet import fleet_status
from cloud_batch.fleetops.keys import generate_keys
from cloud_batch.pki import acl_text, init_ca, issue_device, issue_service, write_broker_config
from edge_agent.mqtt.link import MqttLink, TlsConfig
from edge_agent.wire.topics import (
    chunk_topic,
    device_state_topic,
    features_topic,
    release_topic,
    rollout_topic,
    sync_probe_topic,
    telemetry_ack_topic,
    telemetry_filter,
    telemetry_topic,
)
from tests.broker import Broker, retained
from tests.support.env import MODELS, free_port
from tests.support.ota import relabel

FLEET = "plant-t"
WAIT_S = 90.0


def identity(ca: Path, kind: str, cn: str) -> TlsConfig:
    d = ca / ("devices" if kind == "device" else "services") / cn
    return TlsConfig(str(d / "ca.pem"), str(d / f"{cn}.pem"), str(d / f"{cn}.key"))


@dataclass
class Pki:
    ca: Path
    broker: Broker

    def tls(self, cn: str) -> TlsConfig:
        return identity(self.ca, "service" if cn in ("release-service", "ingest") else "device", cn)

    def link(self, cn: str) -> MqttLink:
        link = MqttLink(self.broker.url, f"{cn}-{os.urandom(3).hex()}", tls=self.tls(cn))
        link.start()
        assert link.wait_connected(10), f"{cn} could not connect over mTLS"
        return link

    def cli_tls(self, cn: str) -> list[str]:
        t = self.tls(cn)
        return ["--tls-ca", str(t.ca_file), "--tls-cert", str(t.cert_file), "--tls-key", str(t.key_file)]


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    """A CA, two devices, both services, and a mosquitto running the generated TLS listener and ACL."""
    ca = tmp_path / "pki"
    init_ca(ca)
    for dev in ("dev-1", "dev-2"):
        issue_device(ca, dev, FLEET)
    issue_service(ca, "release-service")
    issue_service(ca, "ingest")
    port = free_port()
    files = write_broker_config(ca, FLEET, tmp_path / "broker-conf", port=port, bind="127.0.0.1")
    broker = Broker(tmp_path / "mosquitto", port, listener=files.conf.read_text()).start()
    yield Pki(ca, broker)
    broker.stop()


class Witness:
    """The release service subscribed to the topics an attacker aims at; records every message it is sent."""

    def __init__(self, link: MqttLink, filters: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        for f in filters:
            link.subscribe(f, self._on)
        # Subscriptions are asynchronous: a probe to itself, after them, comes back once they are live.
        probe = sync_probe_topic(link.client_id, "witness")
        link.subscribe(probe, self._on)
        link.publish(probe, b"probe", qos=1)
        self.wait_for(probe, b"probe")

    def _on(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.cond:
            self.got.append((topic, payload))
            self.cond.notify_all()

    def wait_for(self, topic: str, payload: bytes) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: (topic, payload) in self.got, timeout=20), (
                f"never saw {topic}: {self.got}"
            )


# -- the CA and its identities -------------------------------------------------------------------------
def test_ca_and_identities_keys_0600_fields_and_refusals(tmp_path: Path) -> None:
    ca = tmp_path / "pki"
    ca_pem = init_ca(ca)
    dev = issue_device(ca, "cam-7", "plant-7")
    svc = issue_service(ca, "release-service")
    for key in (ca / "ca.key", dev.key, svc.key):
        assert os.stat(key).st_mode & 0o777 == 0o600, key
    root = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    cert = x509.load_pem_x509_certificate(dev.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "plant-7"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(root)  # raises if the CA did not sign it
    index = json.loads((ca / "index.json").read_text())["issued"]
    assert index["cam-7"]["kind"] == "device" and index["cam-7"]["fleet"] == "plant-7"
    assert index["release-service"]["kind"] == "service"

    before = (ca / "ca.key").read_bytes()
    with pytest.raises(InputError, match="already holds a CA"):
        init_ca(ca)
    assert (ca / "ca.key").read_bytes() == before
    # One name, one kind: a device called release-service would get the release service's ACL rights.
    with pytest.raises(InputError, match="already issued as a service"):
        issue_device(ca, "release-service", "plant-7", tmp_path / "evil")
    with pytest.raises(InputError, match="already issued as a device"):
        issue_service(ca, "cam-7", tmp_path / "evil2")
    key_before = dev.key.read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite a private key"):
        issue_device(ca, "cam-7", "plant-7")
    assert dev.key.read_bytes() == key_before
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(InputError, match="invalid device name"):
            issue_device(ca, bad, "plant-7")
    with pytest.raises(InputError, match="not a CA directory"):
        issue_device(tmp_path / "nowhere", "cam-8", "plant-7")


def test_acl_rules_and_broker_config_refusals(tmp_path: Path) -> None:
    acl = acl_text("plant-7")
    assert "pattern readwrite edgefleet/v1/fleets/plant-7/devices/%u/#" in acl
    assert "pattern write" not in acl and "pattern readwrite edgefleet/v1/fleets/plant-7/releases" not in acl
    section = acl.split("user release-service")[1].split("user ingest")[0]
    assert "topic readwrite edgefleet/v1/fleets/plant-7/releases/+" in section
    assert "topic read edgefleet/v1/fleets/plant-7/devices/+/telemetry" in acl.split("user ingest")[1]
    with pytest.raises(InputError, match="invalid fleet"):
        acl_text("plant/7")
    with pytest.raises(InputError, match="different identities"):
        acl_text("plant-7", "svc", "svc")
    ca = tmp_path / "pki"
    init_ca(ca)
    with pytest.raises(InputError, match="invalid broker host"):
        write_broker_config(ca, "plant-7", tmp_path / "b", hosts=["bad host"])
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


def test_cli_init_issue_and_broker_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, out = tmp_path / "pki", tmp_path / "conf"
    assert cloud_cli.main(["pki", "init", "--out", str(ca)]) == 0
    assert "mode 0600" in capsys.readouterr().out
    assert cloud_cli.main(["pki", "issue", "device", "cam-7", "--fleet", "plant-7", "--ca", str(ca)]) == 0
    assert "CN=cam-7" in capsys.readouterr().out and (ca / "devices" / "cam-7" / "cam-7.key").is_file()
    assert cloud_cli.main(["pki", "issue", "service", "release-service", "--ca", str(ca)]) == 0
    capsys.readouterr()
    args = ["pki", "broker-config", "--fleet", "plant-7", "--ca", str(ca), "--out", str(out), "--host", "mq.example"]
    assert cloud_cli.main(args) == 0
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in capsys.readouterr().out
    conf = (out / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false"):
        assert line in conf
    broker_cert = x509.load_pem_x509_certificate((out / "edgefleet-broker.pem").read_bytes())
    assert broker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["mq.example"]
    # Errors are one line and exit 2; nothing is overwritten.
    assert cloud_cli.main(args) == 2
    assert capsys.readouterr().err.startswith("error: ") and (out / "acl").is_file()
    assert cloud_cli.main(["pki", "issue", "device", "release-service", "--fleet", "plant-7", "--ca", str(ca)]) == 2
    assert "already issued as a service" in capsys.readouterr().err


# -- the broker enforces it ------------------------------------------------------------------------------
def test_a_device_certificate_cannot_publish_releases_rollouts_or_another_devices_state(pki: Pki) -> None:
    svc, dev1, dev2, ingest = (pki.link(cn) for cn in ("release-service", "dev-1", "dev-2", "ingest"))
    try:
        svc.publish(release_topic(FLEET, "digits"), b"authentic release", retain=True, wait_s=10)
        svc.publish(rollout_topic(FLEET, "digits"), b"authentic rollout", retain=True, wait_s=10)
        dev2.publish(device_state_topic(FLEET, "dev-2"), b"dev-2's own state", retain=True, wait_s=10)
        targets = [
            release_topic(FLEET, "digits"),
            rollout_topic(FLEET, "digits"),
            device_state_topic(FLEET, "dev-2"),
            features_topic(FLEET, "asset_features"),
            chunk_topic("ab" * 32, 0),
        ]
        witness = Witness(svc, [*targets, device_state_topic(FLEET, "dev-1")])
        witness.wait_for(device_state_topic(FLEET, "dev-2"), b"dev-2's own state")  # retained, delivered on subscribe
        for attacker in (dev1, ingest):
            for topic in targets:
                attacker.publish(topic, b'{"forged": true}', retain=True, wait_s=10)  # acknowledged, then dropped
        # Control: a device's own state goes through, after the forgeries on the same connection.
        dev1.publish(device_state_topic(FLEET, "dev-1"), b"dev-1's own state", retain=True, wait_s=10)
        witness.wait_for(device_state_topic(FLEET, "dev-1"), b"dev-1's own state")
        assert all(b"forged" not in payload for _, payload in witness.got), witness.got

        kept = retained(pki.broker.url, pki.tls("release-service"))
        assert kept[release_topic(FLEET, "digits")] == b"authentic release"
        assert kept[rollout_topic(FLEET, "digits")] == b"authentic rollout"
        assert kept[device_state_topic(FLEET, "dev-2")] == b"dev-2's own state"
        assert features_topic(FLEET, "asset_features") not in kept and chunk_topic("ab" * 32, 0) not in kept
        # A device reads its fleet's release but not another device's state.
        seen_by_dev1 = retained(pki.broker.url, pki.tls("dev-1"))
        assert release_topic(FLEET, "digits") in seen_by_dev1
        assert device_state_topic(FLEET, "dev-2") not in seen_by_dev1

        # Ingest may read telemetry and acknowledge it; a device's telemetry reaches it.
        tel = Witness(ingest, [telemetry_filter(FLEET)])
        dev1.publish(telemetry_topic(FLEET, "dev-1"), b"batch 1", wait_s=10)
        tel.wait_for(telemetry_topic(FLEET, "dev-1"), b"batch 1")
        ack = Witness(dev1, [telemetry_ack_topic(FLEET, "dev-1")])
        ingest.publish(telemetry_ack_topic(FLEET, "dev-1"), b"1", retain=True, wait_s=10)
        ack.wait_for(telemetry_ack_topic(FLEET, "dev-1"), b"1")
    finally:
        for link in (svc, dev1, dev2, ingest):
            link.stop()


def test_unknown_or_missing_certificates_are_refused(pki: Pki, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    init_ca(other)
    issue_device(other, "dev-1", FLEET)  # the right name, the wrong CA
    real_ca = pki.tls("dev-1").ca_file
    stranger = TlsConfig(real_ca, *(str(other / "devices" / "dev-1" / f"dev-1.{x}") for x in ("pem", "key")))
    log = pki.broker.dir / "mosquitto.log"
    for tls, why in (
        (stranger, "certificate verify failed"),
        (TlsConfig(real_ca), "peer did not return a certificate"),
    ):
        link = MqttLink(pki.broker.url, f"stranger-{os.urandom(3).hex()}", tls=tls)
        link.start()
        try:  # wait for the broker's verdict in its log (not for a timeout), then check the client never got in
            deadline = time.monotonic() + 20
            while why not in log.read_text():
                assert time.monotonic() < deadline, f"mosquitto never logged {why!r}"
                time.sleep(0.05)
            assert not link.connected
        finally:
            link.stop()
    assert "u'dev-1'" not in log.read_text()  # no connection was ever accepted as dev-1
    # The cloud side says so instead of hanging.
    with pytest.raises(BrokerUnreachableError, match="TLS"), open_link(pki.broker.url, 1.0, tls=stranger):
        pass
    with pytest.raises(InputError, match="go together"):
        tls_config(real_ca, cert_file=stranger.cert_file)
    with pytest.raises(InputError, match="no such file"):
        tls_config(str(tmp_path / "missing.pem"))


def test_agent_end_to_end_over_mqtts_and_fleet_status_over_mtls(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge-agent run` with its device certificate; `cloud-batch release` and `fleet status` with the service's."""
    key, pub = generate_keys(tmp_path / "keys")
    registry = tmp_path / "registry"
    relabel(MODELS / "digits" / "1", registry / "digits" / "2", "2")
    dev = pki.tls("dev-1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["EDGEFLEET_MODELS_DIR"] = str(MODELS)
    port = free_port()
    agent = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "edge-agent"),
            "run",
            *("--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}"),
            *("--broker", pki.broker.url, "--fleet", FLEET, "--device-id", "dev-1", "--trust", str(pub)),
            *("--tls-ca", str(dev.ca_file), "--tls-cert", str(dev.cert_file), "--tls-key", str(dev.key_file)),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    svc_tls = pki.tls("release-service")
    try:
        with open_link(pki.broker.url, tls=svc_tls) as link:
            wait_rows(link, lambda rows: rows.get("dev-1") and rows["dev-1"].presence == "online", agent)
        release = ["release", "digits", "--version", "2", "--fleet", FLEET, "--registry", str(registry)]
        release += ["--key", str(key), "--broker", pki.broker.url, "--health-window-s", "0.5", "--no-progress"]
        assert cloud_cli.main([*release, *pki.cli_tls("release-service")]) == 0, capsys.readouterr().err
        assert "released digits 2" in capsys.readouterr().out
        with open_link(pki.broker.url, tls=svc_tls) as link:
            row = wait_rows(
                link,
                lambda rows: (
                    rows.get("dev-1")
                    and rows["dev-1"].last_update is not None
                    and rows["dev-1"].last_update.result is not None
                ),
                agent,
            )["dev-1"]
        assert row.last_update is not None and row.last_update.result == "success", row.last_update
        assert row.models["digits"] == "2"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v2/models/digits")
        assert json.loads(conn.getresponse().read())["versions"][-1] == "2"

        status = ["fleet", "status", "--fleet", FLEET, "--broker", pki.broker.url, "--json"]
        assert cloud_cli.main([*status, *pki.cli_tls("release-service")]) == 0
        shown = {r["device_id"]: r for r in json.loads(capsys.readouterr().out)}
        assert shown["dev-1"]["models"]["digits"] == "2" and shown["dev-1"]["presence"] == "online"
        # Without a client certificate the same command is refused, with a clear error.
        assert cloud_cli.main([*status, "--tls-ca", str(svc_tls.ca_file)]) == 2
        assert capsys.readouterr().err.startswith(f"error: cannot reach the MQTT broker at {pki.broker.url}")
    finally:
        agent.terminate()
        agent.wait(timeout=30)


def wait_rows(link: object, pred: object, agent: subprocess.Popen) -> dict:
    """Poll fleet status until ``pred(rows)``; the deadline is a safety net, not a speed assertion."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = {r.device_id: r for r in fleet_status(link, FLEET)}  # type: ignore[arg-type]
        if pred(rows):  # type: ignore[operator]
            return rows
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        assert time.monotonic() < deadline, f"timed out: {rows}"
        time.sleep(0.3)
