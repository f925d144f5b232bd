"""Table-driven bad-input tests: one readable id per case, and the signing-key placeholders they use.

A case is ``(change, error type, message)``; ``change`` is one field of the call's arguments
set to a bad value. The key placeholders stand for files that only exist inside a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def case_ids(cases: Sequence[tuple[dict[str, Any], Any, Any]], width: int | None = None) -> list[str]:
    """``field=value`` per case (the value cut to ``width`` characters), so a failure names its input."""
    ids = []
    for change, _, _ in cases:
        field, value = next(iter(change.items()))
        ids.append(f"{field}={str(value)[:width]}")
    return ids


def resolve_key(args: dict[str, Any], keys: tuple[Path, Path], tmp_path: Path) -> None:
    """Swap ``args["key"]``: "missing" → a path that does not exist, "public" → the public key, not the private."""
    if args["key"] == "missing":
        args["key"] = tmp_path / "nope.key"
    elif args["key"] == "public":
        args["key"] = keys[1]
