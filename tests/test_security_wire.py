"""#14 "Trust nothing on the wire": each finding of the security review, performed as an attack against a
real mosquitto and real agents (``tests.support.ota.Device``: real store, server, link), with the safe
outcome asserted. The counts in docs/security.md come from these tests.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.wire.freshness import SeqLedger, require_fresh
from edge_agent.wire.protocol import Rollout, encode
from edge_agent.wire.signing import sign
from edge_agent.wire.topics import release_topic, rollout_topic
from tests.support.ota import FLEET, Cloud, Device, relabel

SETTLE_S = 1.0  # longer than the agent's rollout settle time in these tests (0.3 s)


# -- 1. replay -> downgrade ---------------------------------------------------------------------------
def test_a_replayed_signed_rollback_is_refused_after_a_newer_release(
    cloud: Cloud, v2: Path, digits_dir: Path, tmp_path: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    assert cloud.wait_result(dev.device_id, cloud.release(v2)["release_id"]).result == "success"
    back = cloud.release(digits_dir, rollback=True)  # a legitimate rollback, captured by the attacker
    assert cloud.wait_result(dev.device_id, back["release_id"]).result == "success"
    assert dev.store.active("digits") == "1"
    v3 = relabel(v2, tmp_path / "v3", "3")
    newer = cloud.release(v3)
    assert cloud.wait_result(dev.device_id, newer["release_id"]).result == "success"
    cloud.publish_release("digits", encode(back))  # the replay, byte for byte
    time.sleep(SETTLE_S)
    assert dev.store.active("digits") == "3" and dev.server.get("digits").version == "3"
    assert cloud.report(dev.device_id, "digits").release_id == newer["release_id"]  # not overwritten
    # Persisted: a fresh agent on the same data dir refuses it too.
    dev.restart_agent()
    cloud.publish_release("digits", encode(back))
    time.sleep(SETTLE_S)
    assert dev.store.active("digits") == "3"
    ledger = json.loads((dev.data_dir / "updates" / ".seq.json").read_text())
    assert ledger["highest"]["model/digits"] == [newer["seq"], newer["release_id"]]


def test_replays_of_every_older_release_are_all_refused(
    cloud: Cloud, v2: Path, tmp_path: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    old = [cloud.release(relabel(v2, tmp_path / f"r{v}", str(v)), release_id=f"digits-{v}") for v in (2, 3, 4)]
    cloud.wait(lambda: (r := cloud.report(dev.device_id, "digits")) and r.release_id == "digits-4" and r.result, "4")
    assert dev.store.active("digits") == "4"
    for doc in old[:-1] * 5:  # 10 replays of superseded, authentic releases
        cloud.publish_release("digits", encode(doc))
    time.sleep(SETTLE_S)
    assert dev.store.active("digits") == "4" and cloud.report(dev.device_id, "digits").release_id == "digits-4"


def test_a_rollback_needs_an_expiry_and_an_expired_one_is_refused(
    cloud: Cloud, digits_dir: Path, v2: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    assert cloud.wait_result(dev.device_id, cloud.release(v2)["release_id"]).result == "success"
    cloud.release(digits_dir, rollback=True, expires_at=time.time() - 1)
    time.sleep(SETTLE_S)
    assert dev.store.active("digits") == "2"


def test_freshness_rule() -> None:
    assert require_fresh("r", 1, "a", None) is True
    assert require_fresh("r", 5, "a", (5, "a")) is False  # the same document again: a re-delivery
    for seq, doc_id in ((5, "b"), (4, "c"), (0, "d")):
        with pytest.raises(Exception, match="replay"):
            require_fresh("r", seq, doc_id, (5, "a"))
    ledger = SeqLedger(None)
    ledger.accept("model/x", 3, "a")
    ledger.accept("model/x", 2, "b")  # never lowers
    assert ledger.highest("model/x") == (3, "a")


# -- 2./3. rollouts: signed, failing closed --------------------------------------------------------------
def _forged_rollout(cloud: Cloud, release_id: str, percent: int, status: str, *, seq: int = 99) -> None:
    doc = Rollout(release_id, percent, status=status, seq=seq, fleet=FLEET, name="digits").to_dict()
    cloud.link.publish(rollout_topic(FLEET, "digits"), encode(doc), retain=True, wait_s=10)


def test_forged_deleted_and_unsigned_rollouts_are_ignored(
    cloud: Cloud, v2: Path, make_device: Callable[..., Device], keys: dict[str, Any]
) -> None:
    dev = make_device()
    release_id = "digits-staged"
    cloud.rollout("digits", release_id, percent=0)  # signed: nobody yet
    cloud.release(v2, release_id=release_id, stages=[5, 100])
    for attack in (
        lambda: _forged_rollout(cloud, release_id, 100, "active"),  # widen to everyone, unsigned
        lambda: cloud.link.publish(rollout_topic(FLEET, "digits"), b"", retain=True, wait_s=10),  # delete it
        lambda: cloud.link.publish(  # signed by a stranger
            rollout_topic(FLEET, "digits"),
            encode(sign(Rollout(release_id, 100, seq=99, fleet=FLEET, name="digits").to_dict(), keys["stranger"])),
            retain=True,
            wait_s=10,
        ),
    ):
        attack()
    cloud.wait(lambda: dev.dropped("rollout") >= 3, "the three forged rollouts to be dropped")
    time.sleep(SETTLE_S)
    dev.nothing_installed()
    assert cloud.report(dev.device_id, "digits") is None
    cloud.rollout("digits", release_id, percent=100)  # the authentic widening
    assert cloud.wait_result(dev.device_id, release_id).result == "success"
    _forged_rollout(cloud, release_id, 100, "aborted")  # a forged abort does not roll back
    time.sleep(SETTLE_S)
    assert dev.store.active("digits") == "2"


def test_a_staged_release_without_its_signed_rollout_is_not_applied(
    cloud: Cloud, v2: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    cloud.release(v2, stages=[5, 100])  # no rollout document at all
    time.sleep(SETTLE_S * 2)
    dev.nothing_installed()


def test_a_replayed_old_rollout_of_the_same_release_is_refused(
    cloud: Cloud, v2: Path, digits_dir: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    release_id = "digits-r"
    first = cloud.rollout("digits", release_id, percent=100)
    cloud.release(v2, release_id=release_id, stages=[50, 100])
    assert cloud.wait_result(dev.device_id, release_id).result == "success"
    cloud.rollout("digits", release_id, percent=100, status="aborted")
    cloud.wait(lambda: cloud.report(dev.device_id, "digits").result == "rolled-back", "the abort's rollback")
    cloud.link.publish(rollout_topic(FLEET, "digits"), encode(first), retain=True, wait_s=10)  # un-abort?
    time.sleep(SETTLE_S)
    assert dev.store.active("digits") == "1"


# -- 3. report only what is authenticated; bounded memory; parse after the size check ------------------
def test_a_forged_copy_under_the_real_release_id_does_not_hide_its_failure(
    cloud: Cloud, v2: Path, tmp_path: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    bad = relabel(v2, tmp_path / "bad", "2", lambda m: m.update(sha256="0" * 64))
    doc = cloud.release(bad)
    assert cloud.wait_result(dev.device_id, doc["release_id"]).result == "failed"
    forged = {**doc, "policy": {**doc["policy"], "max_failure_rate": 1.0}}  # not re-signed
    cloud.publish_release("digits", encode(forged))
    cloud.wait(lambda: dev.dropped() >= 1, "the forged copy to be dropped")
    report = cloud.report(dev.device_id, "digits")
    assert report is not None and report.release_id == doc["release_id"] and report.result == "failed"


def test_a_junk_flood_on_many_topics_stays_out_of_the_state_and_off_the_disk(
    cloud: Cloud, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    n = 300
    for i in range(n):
        junk = json.dumps({"type": "release", "schema_version": 1, "release_id": f"junk-{i}", "x": "y" * 300})
        cloud.link.publish(release_topic(FLEET, f"junk{i}"), junk.encode(), retain=True)
    cloud.wait(lambda: dev.dropped() >= n, f"{n} junk documents dropped")
    state = dev.ota.device_state()
    assert state.updates == {} and len(encode(state.to_dict())) < 1000
    assert not (dev.data_dir / "updates" / ".rejected.json").exists()
    dev.restart_agent()  # and nothing survives a restart either
    cloud.wait(lambda: dev.dropped() >= n, "the retained junk dropped again by the new agent")
    assert dev.ota.device_state().updates == {}
    for i in range(n):
        cloud.link.publish(release_topic(FLEET, f"junk{i}"), b"", retain=True)


def test_an_oversized_payload_is_dropped_before_parsing_and_costs_no_memory(
    cloud: Cloud, make_device: Callable[..., Device], tmp_path: Path
) -> None:
    dev = make_device()
    cloud.wait(lambda: dev.link.connected, "connected")
    big = tmp_path / "big.json"  # 60 MB, published from another process (mosquitto_pub)
    big.write_bytes(b'{"type": "release", "pad": "' + b"x" * (60 * 1024 * 1024) + b'"}')
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, MB
    pub = ["mosquitto_pub", "-h", cloud.link.host, "-p", str(cloud.link.port), "-q", "1", "-r"]
    subprocess.run([*pub, "-t", release_topic(FLEET, "digits"), "-f", str(big)], check=True, timeout=60)
    mid = b'{"type": "release", "pad": "' + b"x" * (512 * 1024) + b'"}'  # > max_document_bytes, < the packet limit
    cloud.link.publish(release_topic(FLEET, "other"), mid, retain=True, wait_s=30)
    cloud.wait(lambda: dev.dropped() >= 1, "the 512 kB document dropped unparsed")
    time.sleep(SETTLE_S)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert grown < 8, f"peak RSS grew {grown:.1f} MB"  # the broker never sent the 60 MB message to the agent
    assert dev.link.connected and dev.ota.device_state().updates == {}
    cloud.link.publish(release_topic(FLEET, "digits"), b"", retain=True, wait_s=10)
    cloud.link.publish(release_topic(FLEET, "other"), b"", retain=True, wait_s=10)
