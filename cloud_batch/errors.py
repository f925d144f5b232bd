"""The cloud batch side's exception tree, all of it, in one place.

Everything ``cloud_batch`` raises on purpose derives from ``CloudError``::

    CloudError
    ├── RejectedError               final: the input or the state forbids it; retrying changes nothing
    │   ├── InputError              bad argument, data set or file handed to a job (CLI exit 2)
    │   ├── RegistryError           the model registry refused or could not do a write/read
    │   │                           (version exists with different content, unknown version, bad model file)
    │   ├── QualityGateError        model refused: the int8 model is too inaccurate (absolute floor,
    │   │                           or too far below the float model); nothing was registered
    │   ├── RolloutError            no release/rollout for the model, or its state forbids the operation
    │   │   └── WatchTimeout        ``rollout.watch`` gave up before its condition held (``.status``: the last one)
    │   ├── StoreError              the telemetry store cannot be used (not a store, ledger unreadable, in use)
    │   └── PipelineError           a nightly-pipeline step failed (names the step and the cause), or the
    │                               model's run lock is held by another run
    └── FailedError                 transient: the broker could not be used; retrying later may work
        └── BrokerError             connect failed, publish or subscription not acknowledged
            └── BrokerUnreachableError   no connection within the timeout (wrong URL, broker down, network)

Errors from ``edge_agent`` (``EdgeError``) that cross into cloud_batch are translated
(``raise ... from exc``, keeping the cause), so a caller only needs to catch ``CloudError``.
The names mirror ``edge_agent.errors`` (``Rejected…`` final, ``Failed…`` retried).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edge_agent.errors import EdgeError


class CloudError(Exception):
    """Base class of every error the cloud batch side raises on purpose."""


class RejectedError(CloudError):
    """Final: the input, the registry or the rollout's state says no; retrying the same call changes nothing."""


class FailedError(CloudError):
    """Transient: an outside service (the MQTT broker) could not be used; the same call may work later."""


class InputError(RejectedError):
    """An argument, data set or file handed to a batch job is invalid."""


@contextmanager
def input_errors() -> Iterator[None]:
    """The boundary rule: an ``edge_agent`` refusal (bad name, file, key or document) is the caller's InputError."""
    try:
        yield
    except EdgeError as exc:
        raise InputError(str(exc)) from exc


class RegistryError(RejectedError):
    """The model registry could not read or write a version, or refused to."""


class QualityGateError(RejectedError):
    """The quantized model is not good enough to ship; nothing was registered.

    ``metrics`` carries the measured numbers so callers can report them.
    """

    def __init__(self, message: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metrics = dict(metrics or {})


class RolloutError(RejectedError):
    """There is no rollout to act on, or its state forbids the operation (e.g. advancing an aborted one)."""


class WatchTimeout(RolloutError):
    """``rollout.watch`` timed out; ``status`` is the last ``RolloutStatus`` seen (None if none was)."""

    def __init__(self, message: str, status: Any) -> None:
        super().__init__(message)
        self.status = status


class StoreError(RejectedError):
    """The telemetry store (``cloud_batch.ingest``) cannot be opened: not a store, unreadable ledger, or in use."""


class PipelineError(RejectedError):
    """A ``cloud-batch pipeline run`` step failed (the message names the step and cause), or the run is locked."""


class BrokerError(FailedError):
    """The broker could not be used: a publish was not acknowledged, a subscription failed."""


class BrokerUnreachableError(BrokerError):
    """No connection to the broker within the timeout (wrong URL, broker down, network)."""
