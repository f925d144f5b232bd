"""The device's MQTT connection: connect, reconnect with backoff, TLS/mTLS, last will, subscriptions.

One ``MqttLink`` per process. Handlers run on paho's network thread and must be quick: they
hand work to other threads. Subscriptions are remembered and re-made after every reconnect
(clean start), so a broker restart needs nothing from the caller.

It speaks MQTT 5 so that it can announce a Maximum Packet Size (``max_packet_bytes``): the
broker then never sends this client a larger message (mosquitto drops it), so a 60 MB junk
document on a subscribed topic costs the device nothing, not even the read.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import ConfigError, FailedError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)


class PublishLink(Protocol):
    """What a component that only sends needs of a link (``MqttLink``): stream results, for one."""

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float | None = None
    ) -> None: ...


@dataclass(frozen=True)
class TlsConfig:
    """Server CA and, for mutual TLS, the client certificate and key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip hostname checks (test brokers only)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` → (host, port, tls)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    tls = u.scheme == "mqtts"
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from exc
    return u.hostname, port, tls


class MqttLink:
    """A resilient paho-mqtt client (MQTT 5, clean start) with remembered subscriptions."""

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        *,
        tls: TlsConfig | None = None,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        keepalive: int = 30,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_packet_bytes: int | None = None,
    ) -> None:
        """``max_packet_bytes``: the largest message the broker may send (None: the broker's limit)."""
        self.host, self.port, use_tls = parse_broker_url(url)
        self.client_id = client_id or f"edgefleet-{uuid.uuid4().hex[:12]}"
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self._connect_props: Properties | None = None
        if max_packet_bytes is not None:
            if max_packet_bytes < 1024:
                raise ConfigError(f"max_packet_bytes {max_packet_bytes} is too small (at least 1024)")
            self._connect_props = Properties(PacketTypes.CONNECT)
            self._connect_props.MaximumPacketSize = max_packet_bytes
        self._client.reconnect_delay_set(min_delay=max(1, int(min_backoff_s)), max_delay=int(max_backoff_s))
        self._client.max_inflight_messages_set(64)
        self._client.max_queued_messages_set(10000)
        if use_tls or tls is not None:
            t = tls or TlsConfig()
            try:
                self._client.tls_set(
                    ca_certs=t.ca_file,
                    certfile=t.cert_file,
                    keyfile=t.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"broker TLS setup failed: {exc}") from exc
            if t.insecure:
                self._client.tls_insecure_set(True)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._keepalive = keepalive
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._on_connect_cb = on_connect
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open
        self.connects = 0
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; keeps retrying with backoff until ``stop``."""
        self._client.connect_async(
            self.host, self.port, keepalive=self._keepalive, clean_start=True, properties=self._connect_props
        )
        self._client.loop_start()

    def stop(self, publish_before: tuple[str, bytes, bool] | None = None) -> None:
        if publish_before is not None and self.connected:
            info = self._client.publish(publish_before[0], publish_before[1], qos=1, retain=publish_before[2])
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- pub/sub -------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        # Read `connected` under the lock _on_connect holds while it snapshots the handlers and sets
        # it: either the reconnect snapshot includes this filter or we send it ourselves, never neither.
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
            connected = self.connected
        if connected:
            self._client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
            connected = self.connected
        if connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float | None = None
    ) -> None:
        """Queue a message (kept while offline); with ``wait_s``, block until the broker has it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise FailedError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if wait_s is not None:
            try:
                info.wait_for_publish(timeout=wait_s)
            except (RuntimeError, ValueError) as exc:
                raise FailedError(f"publish to {topic} not acknowledged: {exc}") from exc
            if not info.is_published():
                raise FailedError(f"publish to {topic} not acknowledged within {wait_s}s")

    # -- paho callbacks (network thread) ---------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        self.connects += 1
        # Snapshot, re-subscribe and mark connected atomically with respect to subscribe()/unsubscribe()
        # (which never call paho while holding the lock, so this cannot deadlock).
        with self._lock:
            subs = [(t, q) for t, (_, q) in self._handlers.items()]
            if subs:
                client.subscribe(subs)
            self._connected.set()
        log.info("connected to broker %s:%d", self.host, self.port)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect callback failed")

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # MQTT is request/response with small control packets (SUBSCRIBE, PUBACK, ...); with Nagle's
        # algorithm each can wait ~40 ms for the peer's delayed ACK. paho does not set TCP_NODELAY.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting with backoff", reason_code)
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for f, (h, _) in self._handlers.items() if mqtt.topic_matches_sub(f, msg.topic)]
        for handler in handlers:
            try:
                handler(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:
                log.exception("handler for %s failed", msg.topic)
