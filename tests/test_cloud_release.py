"""``cloud-batch keys generate`` and ``cloud-batch release`` against a real mosquitto.

What the broker holds after a release is read back by a separate MQTT client: the retained
chunks (each matching its hash, together the packed version directory), the rollout control
and the signed release document (it verifies with the public key and parses). Every bad
input fails with a clear error before anything is published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest

from cloud_batch.cli import ota as ota_cli
from cloud_batch.errors import BrokerUnreachableError, CloudError, InputError, RegistryError
from cloud_batch.fleetops.broker import BrokerLink, open_link
from cloud_batch.fleetops.keys import generate_keys
from cloud_batch.fleetops.release import parse_stages, release
from cloud_batch.registry.models import Registry
from edge_agent.wire.model.manifest import MANIFEST_FILE
from edge_agent.wire.protocol import Release, Rollout, pack_dir
from edge_agent.wire.signing import load_public_key, verify
from edge_agent.wire.topics import chunk_topic, parse_chunk_topic, release_topic, rollout_topic
from tests.broker import Broker, retained
from tests.support.bad_inputs import case_ids, resolve_key
from tests.support.cli import subcommands
from tests.support.env import MODELS, free_port

FLEET = "plant-7"
CHUNK = 4096  # the digits artifact (~55 KB) becomes a dozen chunks


# -- helpers -------------------------------------------------------------------------------
def make_registry(root: Path, versions: tuple[str, ...] = ("1", "2")) -> Path:
    """A registry holding the shipped digits model as each of ``versions`` (only the manifest's version differs)."""
    for version in versions:
        out = root / "digits" / version
        shutil.copytree(MODELS / "digits" / "1", out)
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        manifest["version"] = version
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert Registry(root).versions("digits") == list(versions)
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return make_registry(tmp_path / "registry")


# -- keys --------------------------------------------------------------------------------------
def test_keys_generate_writes_a_private_key_only_the_owner_can_read_and_refuses_to_overwrite(tmp_path: Path) -> None:
    key, pub = generate_keys(tmp_path / "k")
    assert (key.name, pub.name) == ("signing.key", "signing.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    before = key.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        generate_keys(tmp_path / "k")
    assert key.read_bytes() == before


def test_keys_generate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ota_cli.main(["keys", "generate", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "signing.key" in out and "key id" in out
    assert ota_cli.main(["keys", "generate", "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err


# -- a release on the broker ---------------------------------------------------------------------
def test_release_publishes_retained_chunks_rollout_and_a_signed_release(
    broker: Broker, cloud_link: BrokerLink, key_files: tuple[Path, Path], registry: Path
) -> None:
    rel = release(
        registry,
        "digits",
        "1",
        FLEET,
        key_files[0],
        cloud_link,
        stages=[5, 25, 100],
        max_failure_rate=0.2,
        max_latency_ms=5.0,
        window="02:00-04:00",
        chunk_size=CHUNK,
        health_window_s=0,
        progress=True,
    )
    held = retained(broker.url)

    # The signed release: verifies with the public key, parses, says what was asked.
    doc = json.loads(held[release_topic(FLEET, "digits")])
    verify(doc, [load_public_key(key_files[1])])
    parsed = Release.from_dict(doc)
    assert parsed.release_id == rel.release_id and parsed.release_id.startswith("digits-1-")
    assert (parsed.fleet, parsed.name, parsed.version, parsed.kind, parsed.rollback) == (
        FLEET,
        "digits",
        "1",
        "model",
        False,
    )
    assert parsed.policy.stages == [5, 25, 100] and parsed.policy.max_failure_rate == 0.2
    assert parsed.policy.max_latency_ms == 5.0 and parsed.policy.window == "02:00-04:00"
    assert parsed.signature == rel.signature

    # The rollout control: first stage, active, for this release.
    ro = Rollout.from_dict(json.loads(held[rollout_topic(FLEET, "digits")]))
    assert (ro.release_id, ro.stage, ro.percent, ro.status) == (rel.release_id, 0, 5, "active")

    # The chunks: each matches its hash; together they are the packed version directory.
    art = parsed.artifact
    blob = pack_dir(registry / "digits" / "1")
    assert art.sha256 == hashlib.sha256(blob).hexdigest() and art.size == len(blob) and art.chunk_size == CHUNK
    chunks = {parse_chunk_topic(t): p for t, p in held.items() if parse_chunk_topic(t)}
    assert sorted(i for _, i in chunks) == list(range(len(art.chunks))) and len(art.chunks) > 8
    assert all(sha == art.sha256 for sha, _ in chunks)
    for i, digest in enumerate(art.chunks):
        assert hashlib.sha256(chunks[(art.sha256, i)]).hexdigest() == digest
    assert b"".join(chunks[(art.sha256, i)] for i in range(len(art.chunks))) == blob


def test_a_new_release_clears_the_superseded_artifact_but_not_a_shared_one(
    broker: Broker, cloud_link: BrokerLink, key_files: tuple[Path, Path], registry: Path
) -> None:
    first = release(registry, "digits", "1", FLEET, key_files[0], cloud_link, chunk_size=CHUNK, progress=False)
    # The same artifact again (a re-release): its chunks must stay.
    again = release(registry, "digits", "1", FLEET, key_files[0], cloud_link, chunk_size=CHUNK, progress=False)
    assert again.release_id != first.release_id and again.artifact.sha256 == first.artifact.sha256
    held = retained(broker.url)
    assert all(chunk_topic(first.artifact.sha256, i) in held for i in range(len(first.artifact.chunks)))

    second = release(registry, "digits", "2", FLEET, key_files[0], cloud_link, chunk_size=CHUNK, progress=False)
    assert second.artifact.sha256 != first.artifact.sha256  # the manifest differs (version 2)
    held = retained(broker.url)
    assert not [t for t in held if f"/{first.artifact.sha256}/" in t], "superseded chunks still retained"
    assert all(chunk_topic(second.artifact.sha256, i) in held for i in range(len(second.artifact.chunks)))
    assert Release.from_dict(json.loads(held[release_topic(FLEET, "digits")])).release_id == second.release_id


# -- bad inputs publish nothing ------------------------------------------------------------------
BAD_INPUTS = [
    ({"name": "nosuch"}, RegistryError, "not in the registry"),
    ({"version": "9"}, RegistryError, "has no version '9'"),
    ({"stages": "5,5,100"}, InputError, "strictly increasing"),
    ({"stages": "50,25,100"}, InputError, "strictly increasing"),
    ({"stages": "0,100"}, InputError, "between 1 and 100"),
    ({"stages": "5,101"}, InputError, "between 1 and 100"),
    ({"stages": "5,50"}, InputError, "last stage must be 100"),
    ({"stages": "5,x,100"}, InputError, "comma-separated whole percentages"),
    ({"stages": ""}, InputError, "comma-separated whole percentages"),
    ({"window": "2-4"}, InputError, "is not HH:MM-HH:MM"),
    ({"window": "25:00-01:00"}, InputError, "invalid time"),
    ({"max_failure_rate": 1.5}, InputError, "between 0 and 1"),
    ({"max_latency_ms": -1.0}, InputError, "positive"),
    ({"fleet": "a/b"}, InputError, "invalid fleet"),
    ({"key": "missing"}, InputError, "cannot read signing key"),
    ({"key": "public"}, InputError, "cannot read signing key"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS, ids=case_ids(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_publishes_nothing(
    broker: Broker,
    cloud_link: BrokerLink,
    key_files: tuple[Path, Path],
    registry: Path,
    tmp_path: Path,
    change: dict,
    error: type[CloudError],
    message: str,
) -> None:
    args = {"name": "digits", "version": "1", "fleet": FLEET, "key": key_files[0], "stages": "10,100"}
    args.update(change)
    resolve_key(args, key_files, tmp_path)
    with pytest.raises(error, match=message):
        release(
            registry,
            args.pop("name"),
            args.pop("version"),
            args.pop("fleet"),
            args.pop("key"),
            cloud_link,
            progress=False,
            **args,
        )
    assert retained(broker.url) == {}


def test_unreachable_broker_names_the_url(key_files: tuple[Path, Path], registry: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnreachableError, match=f"cannot reach the MQTT broker at {url}"), open_link(url, 1.0):
        pass
    with pytest.raises(InputError, match="must look like mqtt://"), open_link("http://example.com"):
        pass


def test_parse_stages() -> None:
    assert parse_stages("5, 25,100") == [5, 25, 100]
    assert parse_stages([100]) == [100]
    with pytest.raises(InputError):
        parse_stages([True, 100])  # type: ignore[list-item]


# -- CLI wiring ---------------------------------------------------------------------------------
def _all_commands() -> list[list[str]]:
    return [[]] + [path for path, _ in subcommands(ota_cli.build_parser())]


def test_every_ota_command_has_help_ending_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    paths = {" ".join(p) for p in _all_commands()}
    assert {"keys generate", "release", "rollout status", "rollout advance", "rollout abort", "fleet status"} <= paths
    for path in _all_commands():
        with pytest.raises(SystemExit) as exit_info:
            ota_cli.main([*path, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        example = text.rstrip().rsplit("Example:", 1)
        assert len(example) == 2, f"`cloud-batch {' '.join(path)} --help` has no Example: block"
        assert all(line.strip().startswith("cloud-batch") for line in example[1].strip().splitlines())


def test_release_cli(
    broker: Broker, key_files: tuple[Path, Path], registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "release",
        "digits",
        "--version",
        "1",
        "--fleet",
        FLEET,
        "--registry",
        str(registry),
        "--key",
        str(key_files[0]),
        "--broker",
        broker.url,
    ]
    assert (
        ota_cli.main(
            [
                *base,
                "--rollout",
                "5,25,100",
                "--max-failure-rate",
                "0.2",
                "--max-latency-ms",
                "4",
                "--window",
                "01:00-03:00",
                "--urgent",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "released digits 1 to fleet plant-7: digits-1-" in out and "stage 1/3 at 5%" in out
    doc = Release.from_dict(json.loads(retained(broker.url)[release_topic(FLEET, "digits")]))
    assert doc.policy.urgent and doc.policy.max_latency_ms == 4.0 and doc.policy.stages == [5, 25, 100]

    assert ota_cli.main([*base, "--rollout", "5,5,100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rollout stages [5, 5, 100]: must be strictly increasing") and "Traceback" not in err
    assert ota_cli.main([*base[:-1], f"mqtt://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the MQTT broker" in capsys.readouterr().err
