"""The cloud batch side's exception tree.

Everything ``cloud_batch`` raises on purpose derives from ``CloudError``::

    CloudError
    ├── InputError          bad argument, data set or file handed to a job (CLI exit 2)
    ├── RegistryError       the model registry refused or could not do a write/read
    │                       (version exists with different content, unknown version, bad model file)
    └── QualityGateError    model refused: the int8 model is too inaccurate (absolute floor,
                            or too far below the float model); nothing was registered

Errors from ``edge_agent`` (``EdgeError``) that cross into the registry are translated into
``RegistryError`` with the cause kept (``raise ... from exc``), so a caller of cloud_batch
only needs to catch ``CloudError``.
"""

from __future__ import annotations

from typing import Any


class CloudError(Exception):
    """Base class of every error the cloud batch side raises on purpose."""


class InputError(CloudError):
    """An argument, data set or file handed to a batch job is invalid."""


class RegistryError(CloudError):
    """The model registry could not read or write a version, or refused to."""


class QualityGateError(CloudError):
    """The quantized model is not good enough to ship; nothing was registered.

    ``metrics`` carries the measured numbers so callers can report them.
    """

    def __init__(self, message: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metrics = dict(metrics or {})
