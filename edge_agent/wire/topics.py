"""MQTT topic names: every topic and filter is built and parsed here, nowhere else.

Topics (``ROOT = "edgefleet/v1"``)::

    ROOT/fleets/{fleet}/releases/{name}           retained  signed Release (JSON)
    ROOT/fleets/{fleet}/rollouts/{name}           retained  Rollout control (JSON, unsigned)
    ROOT/fleets/{fleet}/devices/{id}/state        retained  DeviceState (JSON)
    ROOT/fleets/{fleet}/devices/{id}/presence     retained  "online" / "offline" (LWT)
    ROOT/fleets/{fleet}/devices/{id}/streams/{stream}/results   QoS 0  a camera stream's results (JSON)
    ROOT/fleets/{fleet}/features/{set}/{by}/{key} retained  signed Release of kind "features"
                                                            (by/key: all/all, device/{id}, group/{g})
    ROOT/artifacts/{sha256}/{index}               retained  raw chunk bytes

Every segment that names something (fleet, device, model, set) goes through
``names.check_segment``, so no wildcard or slash can reach a topic.
"""

from __future__ import annotations

from edge_agent.errors import ManifestError
from edge_agent.wire.names import check_segment

ROOT = "edgefleet/v1"


def _fleet_topic(fleet: str, *rest: str) -> str:
    return "/".join((ROOT, "fleets", check_segment(fleet, "fleet"), *rest))


def release_topic(fleet: str, name: str) -> str:
    return _fleet_topic(fleet, "releases", check_segment(name, "name"))


def rollout_topic(fleet: str, name: str) -> str:
    return _fleet_topic(fleet, "rollouts", check_segment(name, "name"))


PARTITION_KINDS = ("all", "device", "group")


def features_topic(fleet: str, feature_set: str, by: str = "all", key: str = "all") -> str:
    """Where a feature bundle release for one partition (everyone, one device, one group) is retained."""
    if by not in PARTITION_KINDS or (by == "all") != (key == "all"):
        raise ManifestError(f"invalid partition {by}/{key}: use all/all, device/<id> or group/<name>")
    return (
        f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/features/{check_segment(feature_set, 'feature set')}"
        f"/{by}/{check_segment(key, 'partition key')}"
    )


def features_filters(fleet: str, device_id: str, groups: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The subscriptions through which a device receives every feature release meant for it."""
    base = f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/features/+"
    return [
        f"{base}/all/all",
        f"{base}/device/{check_segment(device_id, 'device id')}",
        *(f"{base}/group/{check_segment(g, 'group')}" for g in groups),
    ]


def features_set_filter(fleet: str, feature_set: str) -> str:
    """Every partition topic of one feature set of ``fleet`` (what ``features push`` reads back)."""
    return _fleet_topic(fleet, "features", check_segment(feature_set, "feature set"), "+", "+")


def device_state_topic(fleet: str, device_id: str) -> str:
    return _fleet_topic(fleet, "devices", check_segment(device_id, "device id"), "state")


def presence_topic(fleet: str, device_id: str) -> str:
    return _fleet_topic(fleet, "devices", check_segment(device_id, "device id"), "presence")


def chunk_topic(sha256: str, index: int) -> str:
    return f"{ROOT}/artifacts/{sha256}/{index}"


def chunk_filter(sha256: str) -> str:
    """Every chunk of one artifact: a fresh download's single subscription."""
    return f"{ROOT}/artifacts/{sha256}/+"


def parse_chunk_topic(topic: str) -> tuple[str, int] | None:
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == ROOT and parts[2] == "artifacts" and parts[4].isdigit():
        return parts[3], int(parts[4])
    return None


def state_filter(fleet: str) -> str:
    """Every device's retained state in ``fleet``; ``parse_device_topic`` names the device of a match."""
    return _fleet_topic(fleet, "devices", "+", "state")


def presence_filter(fleet: str) -> str:
    """Every device's retained presence (online/offline) in ``fleet``."""
    return _fleet_topic(fleet, "devices", "+", "presence")


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """``(fleet, device id, "state" | "presence")`` of a device topic (segments unchecked), else None."""
    p = _fleet_parts(topic, 7, ("devices",))
    return (p[0], p[2], p[3]) if p and p[3] in ("state", "presence") else None


def sync_probe_topic(client_id: str, nonce: str) -> str:
    """A private, unretained topic a reader publishes to itself to learn the retained messages are in."""
    return f"{ROOT}/_sync/{client_id}/{nonce}"


def acl_filters(fleet: str) -> dict[str, str]:
    """The filters a broker ACL names (``cloud_batch.pki``), with mosquitto's ``%u`` (user) and ``%c`` (client id)."""
    base = _fleet_topic(fleet)
    return {
        "own_device": f"{base}/devices/%u/#",  # a device's state, presence, telemetry and its ack
        "releases": f"{base}/releases/+",
        "rollouts": f"{base}/rollouts/+",
        "features": f"{base}/features/#",
        "artifacts": f"{ROOT}/artifacts/#",
        "states": f"{base}/devices/+/state",
        "presence": f"{base}/devices/+/presence",
        "telemetry": f"{base}/devices/+/telemetry",
        "telemetry_ack": f"{base}/devices/+/telemetry/ack",
        "sync": f"{ROOT}/_sync/%c/#",  # a reader's own probe topic (``sync_probe_topic``)
    }


# -- subscriptions and received topics of the update agent (and the fleet simulator) ----------------
def rollout_filter(fleet: str) -> str:
    """Every model's rollout document of ``fleet`` (``rollout_topic`` refuses the ``+`` wildcard)."""
    return _fleet_topic(fleet, "rollouts", "+")


def release_filter(fleet: str) -> str:
    """Every model's release document of ``fleet``."""
    return _fleet_topic(fleet, "releases", "+")


def parse_model_topic(topic: str) -> tuple[str, str, str] | None:
    """``(fleet, "releases" | "rollouts", model)`` of a release or rollout topic (segments unchecked), else None."""
    p = _fleet_parts(topic, 6, ("releases", "rollouts"))
    return (p[0], p[1], p[2]) if p else None


def parse_features_topic(topic: str) -> tuple[str, str, str] | None:
    """``(feature set, by, key)`` of a ``features_topic`` (segments unchecked), or None for another topic."""
    p = _fleet_parts(topic, 8, ("features",))
    return (p[2], p[3], p[4]) if p else None


def _fleet_parts(topic: str, n: int, kinds: tuple[str, ...]) -> list[str] | None:
    """``[fleet, kind, ...]`` of a fleet topic of ``n`` segments whose kind is one of ``kinds`` (unchecked)."""
    parts = topic.split("/")
    if len(parts) != n or "/".join(parts[:3]) != f"{ROOT}/fleets" or parts[4] not in kinds:
        return None
    return parts[3:]


def stream_results_topic(fleet: str, device_id: str, stream: str) -> str:
    """Where a device publishes a camera stream's results (QoS 0, not retained; edge_agent/streams)."""
    device, name = check_segment(device_id, "device id"), check_segment(stream, "stream")
    return _fleet_topic(fleet, "devices", device, "streams", name, "results")


# -- telemetry (device -> cloud) and its acknowledgement (cloud -> device) -------------------------
def telemetry_topic(fleet: str, device_id: str) -> str:
    """Where a device publishes its telemetry batches (QoS 1, not retained)."""
    return _fleet_topic(fleet, "devices", check_segment(device_id, "device id"), "telemetry")


def telemetry_ack_topic(fleet: str, device_id: str) -> str:
    """Where ingest retains the highest contiguous ``seq`` it durably stored for the device (QoS 1)."""
    return _fleet_topic(fleet, "devices", check_segment(device_id, "device id"), "telemetry", "ack")


def telemetry_filter(fleet: str) -> str:
    """Every device's telemetry batches in ``fleet`` (ingest's subscription)."""
    return _fleet_topic(fleet, "devices", "+", "telemetry")


def parse_telemetry_topic(topic: str) -> tuple[str, str] | None:
    """``(fleet, device id)`` of a ``telemetry_topic`` (segments unchecked), or None for another topic."""
    p = _fleet_parts(topic, 7, ("devices",))
    return (p[0], p[2]) if p and p[3] == "telemetry" else None


PRESENCE_ONLINE, PRESENCE_OFFLINE = b"online", b"offline"


def presence(fleet: str, device_id: str, online: bool) -> tuple[str, bytes]:
    """A device's retained presence message, ``(topic, payload)``; the offline one is also its last will."""
    return presence_topic(fleet, device_id), PRESENCE_ONLINE if online else PRESENCE_OFFLINE
