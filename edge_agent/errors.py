"""The edge agent's exception tree, and the one table that turns an exception into an HTTP status.

Everything the agent raises on purpose derives from ``EdgeError``::

    EdgeError
    ├── ConfigError                 bad config file, env var or CLI argument
    ├── RejectedError               final: the input is wrong, never retried
    │   ├── ManifestError           malformed or inconsistent manifest
    │   ├── IncompatibleModelError  the runtime cannot load/run this model (custom op, bad file)
    │   ├── ValidationError         golden samples or latency budget not met
    │   ├── RequestError            a client's inference request is malformed (HTTP 400)
    │   │   ├── PayloadTooLargeError        request body above the configured limit (HTTP 413)
    │   │   ├── UnsupportedMediaTypeError   a Content-Encoding the server does not decode (HTTP 415)
    │   │   └── MethodNotAllowedError       wrong HTTP method for the route (HTTP 405)
    │   ├── signing.SignatureRejected   unsigned, untrusted key, bad signature
    │   └── bundle.BundleRejected   a feature bundle is refused (schema, values, keys, integrity;
    │                               features: VersionNotNewer, DeltaBaseMismatch, CacheFull)
    ├── NotFoundError               unknown model or version (HTTP 404)
    │   ├── features.FeatureSetNotFound   unknown feature set (404)
    │   ├── FeatureNotFound         the set has no row for the entity a request names (404)
    │   └── FeatureExpired          value older than the set's TTL, policy "reject" (HTTP 409)
    ├── NotReadyError               model known but not loaded/ready (HTTP 503)
    │   └── FeaturesNotReady        a joined feature set is not cached yet (503)
    └── FailedError                 transient: I/O, broker gone; retried with backoff (HTTP 503)
        ├── StoreError              the model store could not be read or written
        ├── transfer.TransferError  an artifact download did not finish (resumes when retried)
        └── features.FeatureCacheError  SQLite I/O on the feature cache

``Rejected…`` errors are final; ``Failed…`` errors may succeed when retried.
Lower-layer exceptions are translated where they cross into the agent, keeping
the cause with ``raise ... from exc``.

:data:`HTTP_STATUS` is the only place an exception gets its HTTP status (and the reason
label of ``edgefleet_errors_total``); :func:`http_status` looks an exception up by its
most specific class, so the table's order does not matter and a subclass inherits its
base's status unless it has its own row. Anything not in it is the server's fault: 500.
"""

from __future__ import annotations

from typing import Any


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


class PayloadTooLargeError(RequestError):
    """A request body is above the configured limit (HTTP 413)."""


class UnsupportedMediaTypeError(RequestError):
    """The request body uses a Content-Encoding this server does not decode (HTTP 415)."""


class MethodNotAllowedError(RequestError):
    """The route exists but not for this HTTP method (HTTP 405); ``allowed`` goes into the Allow header."""

    def __init__(self, method: str, path: str, allowed: str) -> None:
        super().__init__(f"method {method} not allowed on {path}; use {allowed}")
        self.allowed = allowed


class NotFoundError(EdgeError):
    """An unknown model or version (HTTP 404)."""


class FeatureNotFound(NotFoundError):
    """The set has no row for this entity."""


class FeatureExpired(NotFoundError):
    """The entity's row is older than the set's ``ttl_s`` and its ``stale_policy`` is ``reject``.

    A 409, not a 404: the request is fine, the device's copy of the features is not.
    """

    def __init__(self, message: str, row: Any) -> None:  # row: the stale features.cache.FeatureRow
        super().__init__(message)
        self.row = row


class NotReadyError(EdgeError):
    """The model is known but cannot serve right now (HTTP 503)."""


class FeaturesNotReady(NotReadyError):
    """The feature set a model joins is not cached on this device, or lacks a feature the model needs."""


class FailedError(EdgeError):
    """A transient failure (I/O, broker unreachable); worth retrying later."""


class StoreError(FailedError):
    """The model store could not be read or written."""


INTERNAL = (500, "internal")

# exception class -> (HTTP status, edgefleet_errors_total reason); looked up by the most specific class.
HTTP_STATUS: dict[type[BaseException], tuple[int, str]] = {
    RequestError: (400, "bad_request"),
    PayloadTooLargeError: (413, "payload_too_large"),
    UnsupportedMediaTypeError: (415, "bad_request"),
    MethodNotAllowedError: (405, "method_not_allowed"),
    NotFoundError: (404, "not_found"),
    FeatureNotFound: (404, "feature_missing"),
    FeatureExpired: (409, "feature_stale"),
    NotReadyError: (503, "not_ready"),
    FeaturesNotReady: (503, "features_not_ready"),
    FailedError: (503, "unavailable"),
}


def http_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and metrics reason for ``exc``: its nearest class in :data:`HTTP_STATUS`, else 500."""
    for cls in type(exc).__mro__:
        hit = HTTP_STATUS.get(cls)
        if hit is not None:
            return hit
    return INTERNAL
