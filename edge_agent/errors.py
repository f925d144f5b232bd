"""The edge agent's exception tree.

Everything the agent raises on purpose derives from ``EdgeError``::

    EdgeError
    ├── ConfigError                 bad config file, env var or CLI argument
    ├── RejectedError               final: the input is wrong, never retried
    │   ├── ManifestError           malformed or inconsistent manifest
    │   ├── IncompatibleModelError  the runtime cannot load/run this model (custom op, bad file)
    │   ├── ValidationError         golden samples or latency budget not met
    │   ├── RequestError            a client's inference request is malformed (HTTP 400)
    │   │   └── PayloadTooLargeError    request body above the configured limit (HTTP 413)
    │   ├── signing.SignatureRejected   unsigned, untrusted key, bad signature
    │   └── bundle.BundleRejected   a feature bundle is refused (schema, values, keys, integrity;
    │                               features: VersionNotNewer, DeltaBaseMismatch, CacheFull)
    ├── NotFoundError               unknown model or version (HTTP 404)
    │   ├── features.FeatureSetNotFound / FeatureNotFound   unknown set or entity (404)
    │   └── features.FeatureExpired value older than the set's TTL, policy "reject" (HTTP 409)
    ├── NotReadyError               model known but not loaded/ready (HTTP 503)
    │   └── join.FeaturesNotReady   a joined feature set is not cached yet (503)
    └── FailedError                 transient: I/O, broker gone; retried with backoff
        ├── StoreError              the model store could not be read or written
        ├── transfer.TransferError  an artifact download did not finish (resumes when retried)
        └── features.FeatureCacheError  SQLite I/O on the feature cache

``Rejected…`` errors are final; ``Failed…`` errors may succeed when retried.
Lower-layer exceptions are translated where they cross into the agent, keeping
the cause with ``raise ... from exc``.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class of every error the edge agent raises on purpose."""


class ConfigError(EdgeError):
    """A config file, environment variable or command-line argument is invalid."""


class RejectedError(EdgeError):
    """The input is wrong; retrying the same input cannot succeed."""


class ManifestError(RejectedError):
    """A model manifest is malformed or does not match its model."""


class IncompatibleModelError(RejectedError):
    """The TFLite runtime on this device cannot load or run the model."""


class ValidationError(RejectedError):
    """A model loaded but failed its golden samples or latency budget."""


class RequestError(RejectedError):
    """A client's inference request is malformed (HTTP 400)."""

    status = 400


class PayloadTooLargeError(RequestError):
    """A request body is above the configured limit (HTTP 413)."""

    status = 413


class NotFoundError(EdgeError):
    """An unknown model or version (HTTP 404)."""


class NotReadyError(EdgeError):
    """The model is known but cannot serve right now (HTTP 503)."""


class FailedError(EdgeError):
    """A transient failure (I/O, broker unreachable); worth retrying later."""


class StoreError(FailedError):
    """The model store could not be read or written."""
