"""Every shared fixture, in one place: real models from models/, real stores, a real broker, the OTA sides.

Test modules never import fixtures (or each other): pytest finds these by name. Plain helper
classes and functions live in ``tests/support/`` and the support modules next to this file.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# tflite-runtime must be loaded before TensorFlow: TF first makes every later tflite-runtime load
# fail with "vector::reserve". Some tests import TF (to build models), so pin the order here.
import edge_agent.inference.runtime  # noqa: F401
from cloud_batch.fleetops.keys import generate_keys
from edge_agent.http.app import create_app
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.mqtt.link import MqttLink
from tests.apiserver import ApiServer
from tests.broker import Broker
from tests.modelzoo import Zoo, build_in_subprocess
from tests.support.env import MODELS
from tests.support.ota import Cloud, Device, relabel
from tests.support.shared import built_once


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the PyInstaller build (through ``frozen_agent``) ``frozen``.

    The frozen agent carries its own Python (the build's, 3.11); `.ci/run` runs these on that
    leg only (``-m "not frozen"`` on the others), where the build is the shipped configuration.
    """
    for item in items:
        if "frozen_agent" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.frozen)


# -- models and stores ---------------------------------------------------------------------------
@pytest.fixture
def digits_dir() -> Path:
    """The shipped int8 digits model version directory."""
    path = MODELS / "digits" / "1"
    assert (path / "manifest.json").is_file(), "models/digits/1 missing: run `make models`"
    return path


@pytest.fixture
def store(tmp_path: Path, digits_dir: Path) -> ModelStore:
    """A model store in a temp data dir with the shipped digits model installed and active."""
    s = ModelStore(tmp_path / "data")
    s.install_dir(digits_dir)
    return s


@pytest.fixture
def model_server(store: ModelStore) -> Iterator[ModelServer]:
    """A model server over ``store``, synced (digits 1 loaded), stopped afterwards."""
    srv = ModelServer(store)
    srv.sync()
    yield srv
    srv.stop()


@pytest.fixture
def api(model_server: ModelServer) -> Iterator[ApiServer]:
    """The V2 HTTP app over ``model_server`` on a real uvicorn server."""
    with ApiServer(create_app(model_server)) as server:
        yield server


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """All model-zoo models, built with TensorFlow in a subprocess once per run (shared by the xdist workers)."""
    try:
        return Zoo(built_once(tmp_path_factory, "modelzoo", build_in_subprocess))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(str(exc), pytrace=False)


# -- a real broker ---------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto of the test's own, stopped afterwards (tests may stop, kill and restart it)."""
    b = Broker(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture
def cloud_link(broker: Broker) -> Iterator[Any]:
    """An open cloud-tools link to the test's broker, as ``cloud-batch`` opens one per command."""
    from cloud_batch.fleetops.broker import open_link

    with open_link(broker.url) as link:
        yield link


@pytest.fixture
def mk_link(broker: Broker) -> Iterator[Callable[[], MqttLink]]:
    """Make connected ``MqttLink``s to the test's broker (each call a new one); all stopped afterwards."""
    with ExitStack() as links:

        def make() -> MqttLink:
            link = MqttLink(broker.url, min_backoff_s=0.5, max_backoff_s=2)
            link.start()
            links.callback(link.stop)
            assert link.wait_connected(10), "link did not connect"
            return link

        yield make


# -- over the air: the cloud and the devices -------------------------------------------------------
@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    """The fleet's signing key and one the devices do not trust."""
    return {"fleet": Ed25519PrivateKey.generate(), "stranger": Ed25519PrivateKey.generate()}


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    """The fleet's signing key pair as files, as ``cloud-batch keys generate`` writes them: (signing.key, signing.pub)."""
    return generate_keys(tmp_path / "keys")


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    """A ``cloud-batch`` registry folder, not yet created (``features build`` writes into it)."""
    return tmp_path / "registry"


@pytest.fixture
def cloud(broker: Broker, keys: dict[str, Ed25519PrivateKey]) -> Iterator[Cloud]:
    c = Cloud(broker.url, keys["fleet"])
    yield c
    c.close()


@pytest.fixture
def device_class() -> type[Device]:
    """What ``make_device`` builds; a module overrides this to add parts (e.g. a feature cache)."""
    return Device


@pytest.fixture
def make_device(
    broker: Broker, keys: dict[str, Ed25519PrivateKey], digits_dir: Path, tmp_path: Path, device_class: type[Device]
) -> Iterator[Callable[..., Device]]:
    """Devices trusting the fleet key, each in its own data dir with digits 1 installed; closed afterwards."""
    devices: list[Device] = []

    def make(install: list[Path] | None = None, **kwargs: Any) -> Device:
        d = device_class(
            broker.url,
            tmp_path / f"device{len(devices)}",
            [keys["fleet"].public_key()],
            install if install is not None else [digits_dir],
            **kwargs,
        )
        devices.append(d)
        return d

    yield make
    for d in devices:
        d.close()


@pytest.fixture
def v2(digits_dir: Path, tmp_path: Path) -> Path:
    """The shipped digits model relabelled as version 2: a valid candidate."""
    return relabel(digits_dir, tmp_path / "v2", "2")


# -- the frozen agent (#11) ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def frozen_agent() -> Path:
    """``dist/edge-agent/`` built once per source digest (tests/support/frozen.py); skipped only without PyInstaller."""
    from tests.support.frozen import cannot_build, frozen_build

    reason = cannot_build()
    if reason is not None:
        pytest.skip(f"frozen agent not built: {reason}")
    try:
        return frozen_build()[0]
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"PyInstaller build failed: {exc}", pytrace=False)
