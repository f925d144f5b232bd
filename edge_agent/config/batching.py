"""``[models.NAME.batching]``: per-model dynamic batching (off unless the table is present; docs/serving.md).

::

    [models.mobilenet.batching]
    max_batch_size = 8             # rows per invoke (capped by the model's max_batch)
    max_queue_delay_us = 500       # the longest a request waits for others to join its batch
    preferred_batch_sizes = [4, 8] # send at once on reaching the largest; cut to one of these when it fits

Environment: ``EDGEFLEET_MODELS__MOBILENET__BATCHING__MAX_BATCH_SIZE=8`` (lists comma-separated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_agent.errors import ConfigError, EdgeError
from edge_agent.inference.batching import BatchPolicy
from edge_agent.wire.names import check_name

MAX_QUEUE_DELAY_US = 1_000_000  # one second: more is a misconfiguration, not a batching window
MAX_BATCH_SIZE = 1024
KEYS = ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes")


def _int(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if not low <= n <= high:
        raise ConfigError(f"{where}: {n} is outside {low}..{high}")
    return n


def parse_policy(where: str, table: Any) -> BatchPolicy:
    """One ``batching`` table as a :class:`BatchPolicy`; ConfigError naming the key otherwise."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table with keys {list(KEYS)}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]}; known: {list(KEYS)}")
    d = BatchPolicy()
    size = _int(f"{where}.max_batch_size", table.get("max_batch_size", d.max_batch_size), 1, MAX_BATCH_SIZE)
    delay = _int(
        f"{where}.max_queue_delay_us", table.get("max_queue_delay_us", d.max_queue_delay_us), 0, MAX_QUEUE_DELAY_US
    )
    raw = table.get("preferred_batch_sizes", list(d.preferred_batch_sizes))
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{where}.preferred_batch_sizes: expected a list of integers, got {raw!r}")
    preferred = sorted({_int(f"{where}.preferred_batch_sizes", p, 1, size) for p in items if str(p).strip()})
    return BatchPolicy(size, delay, tuple(preferred))


def batching_policies(models: Mapping[str, Any]) -> dict[str, BatchPolicy]:
    """``{model name: policy}`` for every ``[models.NAME]`` table that has a ``batching`` table."""
    out: dict[str, BatchPolicy] = {}
    for name, table in models.items():
        try:
            check_name(name)
        except EdgeError as exc:
            raise ConfigError(f"models.{name}: {exc}") from None
        if isinstance(table, Mapping) and "batching" in table:
            out[name] = parse_policy(f"models.{name}.batching", table["batching"])
    return out
