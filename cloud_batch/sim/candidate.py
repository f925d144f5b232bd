"""What a simulated device does with a candidate: download it with the agent's real ``Downloader`` and
check what it holds, from a worker thread. The MQTT side runs on the fleet's loop thread, so the
Downloader gets ``LoopLink``, whose subscribe/unsubscribe are handed over to that thread.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

from cloud_batch.sim.host import Handler, LinkHost
from edge_agent.config import OtaConfig
from edge_agent.errors import ManifestError
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.wire.model.manifest import MANIFEST_FILE
from edge_agent.wire.protocol import Release, unpack_to


class LoopLink:
    """What ``Downloader`` needs from an MqttLink, served by a SimDevice on the loop thread."""

    def __init__(self, device: LinkHost) -> None:
        self._device = device

    @property
    def connects(self) -> int:
        return self._device.connects

    @property
    def connected(self) -> bool:
        return self._device.connected

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self._device.loop.call_soon(self._device.add_subscription, topic_filter, handler, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self._device.loop.call_soon(self._device.remove_subscription, topic_filter)


def download(
    link: LoopLink,
    downloads: Path,
    release: Release,
    stop: threading.Event,
    stall_timeout_s: float,
    timeout_s: float | None,
) -> Path:
    """Fetch ``release``'s artifact chunk by chunk over MQTT (no HTTP), sha256-checked; TransferStopped if stopped."""
    out = downloads / f"{release.artifact.sha256}.tar"
    Downloader(
        link,
        ChunkStore(downloads, release.artifact),
        window=OtaConfig.chunk_window,
        use_http=False,
        out_path=out,
        stall_timeout_s=stall_timeout_s,
    ).run(stop=stop, timeout_s=timeout_s)
    return out


def check_candidate(blob: Path, release: Release) -> None:
    """Unpack the artifact and check its manifest names the release's model and version; then drop it."""
    staging = Path(tempfile.mkdtemp(prefix="candidate-", dir=blob.parent))
    try:
        unpack_to(blob, staging)
        manifest = json.loads((staging / MANIFEST_FILE).read_text())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        blob.unlink(missing_ok=True)
    if manifest.get("name") != release.name or str(manifest.get("version")) != release.version:
        raise ManifestError(
            f"the artifact holds {manifest.get('name')} {manifest.get('version')}, not {release.name} {release.version}"
        )
