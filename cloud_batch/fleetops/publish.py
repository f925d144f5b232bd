"""Publishing an artifact as retained chunks, and clearing it again (the cloud half of the transfer).

The wire contract is in ``edge_agent.wire.protocol`` (``chunk_topic``, ``Artifact``); devices
fetch with ``edge_agent.mqtt.download``. No server has to stay up: the broker's retained store
*is* the download server. This lives on the cloud side so that devices ship no publisher code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cloud_batch.errors import BrokerError
from cloud_batch.fleetops.broker import BrokerLink
from edge_agent.errors import FailedError
from edge_agent.wire.artifact import DEFAULT_CHUNK_SIZE, Artifact, check_artifact, iter_chunks
from edge_agent.wire.topics import chunk_topic

log = logging.getLogger(__name__)


def publish_artifact(
    link: BrokerLink,
    blob: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    url: str | None = None,
    timeout_s: float = 60.0,
    parallel: int = 16,
    on_acked: Callable[[], None] | None = None,
) -> Artifact:
    """Publish ``blob`` as retained QoS 1 chunk messages and wait for every PUBACK; return its Artifact.

    A zero-byte artifact publishes nothing (an empty retained payload would be a deletion);
    devices need no message for it. Publishing the same blob again is harmless (same topics).
    ``on_acked`` runs after each acknowledged chunk (a progress bar). BrokerError if not acknowledged.
    """
    artifact = Artifact.from_blob(blob, chunk_size, url=url)
    chunks = [(i, data) for i, data in iter_chunks(blob, chunk_size) if data]
    messages = [(chunk_topic(artifact.sha256, i), data) for i, data in chunks]
    _publish_all(link, messages, timeout_s, parallel, on_acked)
    log.info("published artifact %s: %d bytes in %d retained chunk(s)", artifact.sha256[:12], len(blob), len(chunks))
    return artifact


def clear_artifact(link: BrokerLink, artifact: Artifact, *, timeout_s: float = 60.0, parallel: int = 16) -> None:
    """Delete the retained chunks of a superseded artifact (empty retained payloads), waiting for PUBACKs."""
    check_artifact(artifact)
    topics = [(chunk_topic(artifact.sha256, i), b"") for i in range(len(artifact.chunks))]
    _publish_all(link, topics, timeout_s, parallel, None)
    log.info("cleared artifact %s (%d chunk topic(s))", artifact.sha256[:12], len(topics))


def _publish_all(
    link: BrokerLink,
    messages: list[tuple[str, bytes]],
    timeout_s: float,
    parallel: int,
    on_acked: Callable[[], None] | None,
) -> None:
    if not messages:
        return
    if not link.wait_connected(timeout_s):
        raise BrokerError(f"not connected to broker {link.host}:{link.port} after {timeout_s}s")

    def one(msg: tuple[str, bytes]) -> None:
        try:
            link.publish(msg[0], msg[1], retain=True, qos=1, wait_s=timeout_s)
        except FailedError as exc:  # the link's own error: translated where it crosses into cloud_batch
            raise BrokerError(str(exc)) from exc
        if on_acked is not None:
            on_acked()

    # PUBACK waits in parallel: one round trip per chunk would make a long-RTT upload crawl.
    with ThreadPoolExecutor(
        max_workers=max(1, min(parallel, len(messages))), thread_name_prefix="publish-artifact"
    ) as pool:
        for fut in [pool.submit(one, m) for m in messages]:
            fut.result()
