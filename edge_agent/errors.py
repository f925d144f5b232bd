"""The edge agent's exception tree, and the one table that turns an exception into an HTTP status.

Everything the agent raises on purpose derives from ``EdgeError``, and every class is here::

    EdgeError
    ├── ConfigError                 bad config file, env var or CLI argument
    ├── RejectedError               final: the input is wrong, never retried
    │   ├── ManifestError           malformed or inconsistent manifest, document or name
    │   ├── IncompatibleModelError  the runtime cannot load/run this model (custom op, bad file)
    │   ├── ValidationError         golden samples or latency budget not met
    │   ├── RequestError            a client's inference request is malformed (HTTP 400)
    │   │   ├── PayloadTooLargeError        request body above the configured limit (HTTP 413)
    │   │   ├── UnsupportedMediaTypeError   a Content-Encoding the server does not decode (HTTP 415)
    │   │   ├── MethodNotAllowedError       wrong HTTP method for the route (HTTP 405)
    │   │   └── ControlRefused              repository control on a non-local listener (HTTP 403)
    │   ├── SignatureRejected       unsigned, untrusted key, bad signature
    │   ├── SealedModelRejected     an encrypted model: no or another fleet key, or its ciphertext fails GCM
    │   ├── StaleRejected           authentic but not fresh: replayed (seq not newer) or expired
    │   ├── ReleaseRejected         a release document that is malformed or not authentic
    │   ├── TelemetryRejected       a telemetry batch or ack that is malformed, oversized or inconsistent
    │   ├── FeedbackConflict        a second label for the same inference id without ``replace`` (HTTP 409)
    │   └── BundleRejected          a feature bundle is refused; ``.code`` names the rule
    │       ├── BundleSchemaError, BundleValueError, BundleKeyError, BundleIntegrityError
    │       └── VersionNotNewer, DeltaBaseMismatch, CacheFull   (the cache's admission plan)
    ├── NotFoundError               unknown model or version (HTTP 404)
    │   ├── FeatureSetNotFound      unknown feature set (404)
    │   ├── FeatureNotFound         the set has no row for the entity a request names (404)
    │   ├── FeatureExpired          value older than the set's TTL, policy "reject" (HTTP 409)
    │   └── InferenceNotFound       feedback names an inference id the device does not know (404)
    ├── NotReadyError               model known but not loaded/ready (HTTP 503)
    │   └── FeaturesNotReady        a joined feature set is not cached yet (503)
    └── FailedError                 transient: I/O, broker gone; retried with backoff (HTTP 503)
        ├── StoreError              the model store could not be read or written
        ├── FeatureCacheError       SQLite I/O on the feature cache
        ├── OutboxError             SQLite I/O on the telemetry outbox
        │   └── WriterLost          the outbox's writer process died or stopped answering
        └── TransferError           an artifact download did not finish (resumes when retried)
            └── CorruptChunksError, TransferTimeout, TransferStopped

Two control-flow signals are not errors: they derive from ``Exception``, never from
``EdgeError``, so no ``except EdgeError`` (and no HTTP status) ever catches them::

    ClientGone                      the HTTP client hung up before its whole body (``http.asgi.read_body``)
    Interrupted                     an update step noticed ``Control.interrupt`` (``update.seams``)

``Rejected…`` errors are final; ``Failed…`` errors may succeed when retried.
Lower-layer exceptions are translated where they cross into the agent, keeping
the cause with ``raise ... from exc``.

:data:`HTTP_STATUS` is the only place an exception gets its HTTP status (and the reason
label of ``edgefleet_errors_total``); :func:`http_status` looks an exception up by its
most specific class, so the table's order does not matter and a subclass inherits its
base's status unless it has its own row. Anything not in it is the server's fault: 500.

:func:`plain` makes a NumPy scalar print as the Python value it holds in any message.
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


class ControlRefused(RequestError):
    """A ``/v2/repository`` call on a listener that is not loopback/unix without ``allow_repository_control``."""


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


class TransferError(FailedError):
    """A transfer did not finish (timeout, stall, disk); transient: retrying resumes it."""


class CorruptChunksError(TransferError):
    """Stored chunks failed their hash while assembling; they were deleted and must be fetched again."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"{len(indices)} stored chunk(s) failed verification and were dropped: {indices[:10]}")
        self.indices = indices


class TransferTimeout(TransferError):
    """``run(timeout_s=...)`` expired before every chunk was stored."""


class TransferStopped(TransferError):
    """The caller's stop event was set; chunks already stored are kept for the next run."""


class ReleaseRejected(RejectedError):
    """A release document that is malformed or not authentic; carries whatever ids were readable."""

    def __init__(self, reason: str, release_id: str = "?", version: str = "?") -> None:
        super().__init__(reason)
        self.release_id, self.version = release_id, version


class FeatureCacheError(FailedError):
    """The feature cache's SQLite file could not be read or written."""


class BundleRejected(RejectedError):
    """A feature bundle breaks a rule; applying the same bundle again cannot succeed.

    Each subclass names its rule in the class statement: ``class X(BundleRejected, code="keys")``.
    """

    code = "rejected"

    def __init_subclass__(cls, code: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code:
            cls.code = code


class BundleSchemaError(BundleRejected, code="schema"):
    """``bundle.json`` is malformed or disagrees with the arrays (shapes, dtypes, feature list)."""


class BundleValueError(BundleRejected, code="values"):
    """A value is not a finite number of the declared dtype, or an ``event_ts`` is invalid."""


class BundleKeyError(BundleRejected, code="keys"):
    """An entity id is empty, invalid, duplicated, or both upserted and deleted."""


class BundleIntegrityError(BundleRejected, code="integrity"):
    """A file is missing or unreadable, or ``data.npz`` does not hash to ``data_sha256``."""


class VersionNotNewer(BundleRejected, code="version"):
    """The bundle's version is not newer than the set's current version."""


class DeltaBaseMismatch(BundleRejected, code="delta_base"):
    """A delta was computed against another version (or feature list) than the cache holds.

    The OTA layer should fetch the latest snapshot of ``set``; ``current_version`` is what the
    device has (None: nothing), ``base_version`` what the delta needs.
    """

    def __init__(self, message: str, *, set: str, current_version: str | None, base_version: str | None) -> None:
        super().__init__(message)
        self.set = set
        self.current_version = current_version
        self.base_version = base_version


class CacheFull(BundleRejected, code="too_large"):
    """Applying the bundle would take the cache above ``max_rows`` or ``max_bytes``."""


class FeatureSetNotFound(NotFoundError):
    """The cache holds no feature set of this name."""


class StaleRejected(RejectedError):
    """An authentic document that is not fresh: its ``seq`` is not newer than one already accepted, or it expired.

    Not news: a device logs it and changes nothing (it is what a replay looks like).
    """


class TelemetryRejected(RejectedError):
    """A telemetry batch or ack is malformed, oversized or inconsistent (final: re-sending it cannot help)."""


class FeedbackConflict(RejectedError):
    """The inference already has a label and the request did not say ``"replace": true`` (HTTP 409)."""


class InferenceNotFound(NotFoundError):
    """Feedback names an inference id that is neither in the outbox nor in the recent index (HTTP 404)."""


class OutboxError(FailedError):
    """The telemetry outbox's SQLite file could not be read or written."""


class WriterLost(OutboxError):
    """The telemetry writer process died or stopped answering (``telemetry.writer.remote`` restarts or falls back)."""


class SignatureRejected(RejectedError):
    """Unsigned, signed by an untrusted key, or the signature does not verify."""


class SealedModelRejected(RejectedError):
    """An encrypted model cannot be opened here: no fleet key, another fleet's key, or it fails authentication.

    Final for this release: the same ciphertext and the same key give the same answer.
    """


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


class Interrupted(Exception):
    """An update step noticed ``Control.interrupt``: leave the step, the machine decides what follows."""


# exception class -> (HTTP status, edgefleet_errors_total reason); looked up by the most specific class.
HTTP_STATUS: dict[type[BaseException], tuple[int, str]] = {
    RequestError: (400, "bad_request"),
    PayloadTooLargeError: (413, "payload_too_large"),
    UnsupportedMediaTypeError: (415, "bad_request"),
    MethodNotAllowedError: (405, "method_not_allowed"),
    ControlRefused: (403, "forbidden"),
    NotFoundError: (404, "not_found"),
    FeatureNotFound: (404, "feature_missing"),
    FeatureExpired: (409, "feature_stale"),
    FeedbackConflict: (409, "feedback_conflict"),
    InferenceNotFound: (404, "inference_not_found"),
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


def plain(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds, anything else unchanged: for messages.

    Under NumPy 2 ``repr()`` of a scalar shows its type (``np.str_('a-2')``, ``np.float32(nan)``,
    ``np.True_``); ``repr(plain(x))`` is ``'a-2'``, ``nan``, ``True`` under NumPy 1 and 2 alike.
    (Duck-typed on ``.item()`` so this module does not import NumPy.)
    """
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value
