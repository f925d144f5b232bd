"""The naming and versioning rules every document, topic and directory shares, in one place.

A *name* (model, feature set, fleet, device id, group) is 1-64 letters, digits, ``_``, ``.`` or
``-`` starting with a letter or digit: safe as a directory name and as an MQTT topic segment (no
wildcards, no slashes). A *version* is ``"3"`` or a dotted ``"1.2.0"`` and compares numerically.
A *digest* is a lowercase hex SHA-256. ``require_newer`` is the one anti-rollback rule: models,
feature sets and their releases all go through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeGuard

from edge_agent.errors import ManifestError, RejectedError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_segment(value: object, what: str) -> str:
    """A topic segment or directory name (fleet, device id, model name): no wildcards, slashes or empties."""
    if not is_name(value):
        raise ManifestError(f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return value


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe model name (also a directory name), else raise."""
    if not is_name(name):
        raise ManifestError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def parse_version(version: str) -> tuple[int, ...]:
    """Parse ``"3"`` or ``"1.2.0"`` into a comparable tuple (so '10' sorts after '9'); raise ManifestError otherwise."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ManifestError(f"invalid version {version!r}: use a number such as '3' or a dotted one such as '1.2.0'")
    return tuple(int(part) for part in version.split("."))


def is_name(value: object) -> TypeGuard[str]:
    """True for a safe name (see ``check_name``), for callers that word their own error."""
    return isinstance(value, str) and bool(_NAME_RE.fullmatch(value))


def is_sha256(value: object) -> bool:
    """True for a lowercase hex SHA-256 digest."""
    return isinstance(value, str) and bool(_SHA256_RE.fullmatch(value))


def is_newer(incoming: str, current: str | None) -> bool:
    """True when ``incoming`` sorts after ``current`` (anything is newer than nothing)."""
    return current is None or parse_version(incoming) > parse_version(current)


def require_newer(
    what: str,
    incoming: str,
    current: str | None,
    *,
    rollback: bool = False,
    error: Callable[[str], Exception] = RejectedError,
    held: str = "current",
) -> None:
    """The anti-rollback rule: ``incoming`` must be newer than ``current`` unless this is a signed rollback.

    ``what`` names the thing in the message ("version 3 of digits"); ``held`` says where ``current``
    is ("active" model, "cached" feature set); ``error`` lets a layer raise its own subclass (e.g.
    the feature cache's ``VersionNotNewer``).
    """
    if rollback or is_newer(incoming, current):
        return
    raise error(
        f"anti-rollback: {what} {incoming} is not newer than the {held} version {current} "
        "and the release is not a signed rollback"
    )
