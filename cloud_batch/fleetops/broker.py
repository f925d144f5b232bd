"""The cloud tools' one seam to the MQTT broker: the ``BrokerLink`` protocol and ``open_link``.

Library functions (release, rollout, fleet, feature pushes) take an open ``BrokerLink`` and
never connect by themselves; the CLI opens one per command with ``open_link`` (after checking
its local inputs, so a bad input publishes nothing and says so even when the broker is down).
Tests pass a link to the real broker, or a fake with these methods.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from cloud_batch.errors import BrokerError, BrokerUnreachableError, InputError, input_errors
from edge_agent.errors import FailedError
from edge_agent.mqtt.link import MqttLink, TlsConfig
from edge_agent.wire.protocol import encode

DEFAULT_CONNECT_TIMEOUT_S = 5.0

Handler = Callable[[str, bytes, bool], None]  # (topic, payload, retained), called on the network thread


class BrokerLink(Protocol):
    """What the cloud side needs from a connection (``edge_agent.mqtt.link.MqttLink`` has it).

    ``publish`` raises ``edge_agent.errors.FailedError`` when the broker does not acknowledge
    within ``wait_s``; subscriptions are remembered across reconnects.
    """

    host: str
    port: int
    client_id: str

    def wait_connected(self, timeout: float) -> bool: ...

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float | None = None
    ) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...


def tls_config(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> TlsConfig | None:
    """TLS settings from the CLI's ``--tls-ca/--tls-cert/--tls-key`` (None: none given); InputError if unusable.

    A client certificate needs its key (mutual TLS, the service's identity from ``cloud-batch pki``);
    without ``ca_file`` the system's CAs verify the broker.
    """
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if (cert_file is None) != (key_file is None):
        raise InputError("--tls-cert and --tls-key go together (a client certificate needs its private key)")
    for name, path in (("--tls-ca", ca_file), ("--tls-cert", cert_file), ("--tls-key", key_file)):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{name} {path}: no such file")
    return TlsConfig(ca_file=ca_file, cert_file=cert_file, key_file=key_file)


@contextmanager
def open_link(
    broker_url: str,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    client_prefix: str = "cloud-batch",
    *,
    tls: TlsConfig | None = None,
) -> Iterator[MqttLink]:
    """A connected MqttLink for one cloud command; BrokerUnreachableError (with the URL) if none in ``timeout_s``.

    ``tls`` (or an ``mqtts://`` URL) makes it a TLS connection; a refused certificate shows as unreachable.
    """
    with input_errors():  # ConfigError: the URL itself is wrong
        link = MqttLink(broker_url, client_id=f"{client_prefix}-{uuid.uuid4().hex[:10]}", tls=tls)
    # A plain TCP connect first: "connection refused" is known at once, MqttLink would keep retrying.
    try:
        socket.create_connection((link.host, link.port), timeout=timeout_s).close()
    except OSError as exc:
        raise BrokerUnreachableError(f"cannot reach the MQTT broker at {broker_url}: {exc.strerror or exc}") from exc
    link.start()
    try:
        if not link.wait_connected(timeout_s):
            hint = (
                " (TLS: is the certificate from the broker's CA, and the CA the broker's?)"
                if tls or broker_url.startswith("mqtts:")
                else ""
            )
            raise BrokerUnreachableError(f"cannot reach the MQTT broker at {broker_url} within {timeout_s:g}s{hint}")
        yield link
    finally:
        link.stop()


def publish_acked(link: BrokerLink, topic: str, payload: bytes, *, retain: bool = True, wait_s: float = 10.0) -> None:
    """Publish (QoS 1) and wait for the broker's acknowledgement; BrokerError if it does not come."""
    try:
        link.publish(topic, payload, retain=retain, qos=1, wait_s=wait_s)
    except FailedError as exc:
        raise BrokerError(f"broker {link.host}:{link.port}: {exc}") from exc


def publish_doc(
    link: BrokerLink, topic: str, doc: dict[str, Any], *, retain: bool = True, wait_s: float = 10.0
) -> None:
    """Publish a JSON document (QoS 1) and wait for the broker's acknowledgement."""
    publish_acked(link, topic, encode(doc), retain=retain, wait_s=wait_s)
