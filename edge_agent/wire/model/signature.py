"""A model's signature and the one rule that keeps a new version's clients working.

The signature is what a client depends on: the input and output names, their V2 datatypes
(what clients send and receive) and their shapes apart from the batch dimension. A new
version whose signature differs from the version it replaces breaks clients; the registry
(``cloud-batch register``) refuses it, and a device refuses to activate it, unless the
change is declared breaking (``--breaking``; a signed release's ``policy.breaking``).

Converters often give tensors generic names (``output_0``, ``serving_default_x:0``,
``StatefulPartitionedCall:0``); ``positional_names`` takes the previous version's names for
them, by position, so re-registering a model keeps its clients' names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from edge_agent.errors import IncompatibleModelError
from edge_agent.wire.model.manifest import Manifest, TensorSpec

GENERIC = re.compile(
    r"(input|output)_?\d+|serving_default_.*|StatefulPartitionedCall(_\d+)?(:\d+)?|Identity(_\d+)?(:\d+)?"
)

Entry = tuple[str, str, tuple[int, ...]]  # name, V2 datatype, shape without the batch dimension


def entries(specs: Sequence[TensorSpec]) -> list[Entry]:
    """The signature of one side (inputs or outputs), in order."""
    return [(s.name, s.datatype, tuple(s.shape[1:])) for s in specs]


def is_generic(name: str) -> bool:
    """A converter's placeholder name rather than one a client would choose."""
    return GENERIC.fullmatch(name) is not None


def positional_names(new: Sequence[TensorSpec], previous: Sequence[TensorSpec]) -> dict[str, str]:
    """``{generic new name: the previous version's name at that position}`` (empty if the counts differ)."""
    if len(new) != len(previous):
        return {}
    return {n.name: p.name for n, p in zip(new, previous, strict=True) if is_generic(n.name) and n.name != p.name}


def _side(what: str, old: Sequence[TensorSpec], new: Sequence[TensorSpec]) -> list[str]:
    a, b = {e[0]: e for e in entries(old)}, {e[0]: e for e in entries(new)}
    out = [f"{what} {n!r} is gone" for n in a if n not in b]
    out += [f"new {what} {n!r}" for n in b if n not in a]
    for n in a.keys() & b.keys():
        if a[n][1] != b[n][1]:
            out.append(f"{what} {n!r} datatype {a[n][1]} -> {b[n][1]}")
        if a[n][2] != b[n][2]:
            out.append(f"{what} {n!r} shape [batch, {_dims(a[n][2])}] -> [batch, {_dims(b[n][2])}]")
    return sorted(out)


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape)) or "-"


def differences(old: Manifest, new: Manifest) -> list[str]:
    """How ``new``'s signature differs from ``old``'s (empty: compatible)."""
    return spec_differences(old.inputs, old.outputs, new.inputs, new.outputs)


def spec_differences(
    old_in: Sequence[TensorSpec],
    old_out: Sequence[TensorSpec],
    new_in: Sequence[TensorSpec],
    new_out: Sequence[TensorSpec],
) -> list[str]:
    """``differences`` of specs not yet in a manifest (``cloud-batch register`` checks before it writes)."""
    return _side("input", old_in, new_in) + _side("output", old_out, new_out)


DEVICE_HOW = "the release does not say policy.breaking = true"


def require_compatible(old: Manifest, new: Manifest, *, breaking: bool, how: str = DEVICE_HOW) -> list[str]:
    """The differences; IncompatibleModelError naming them unless ``breaking`` (``how``: how to declare it)."""
    diff = differences(old, new)
    if diff and not breaking:
        raise IncompatibleModelError(
            f"{new.name} {new.version} changes the signature of {old.name} {old.version} "
            f"({'; '.join(diff)}): its clients would break; {how}"
        )
    return diff
