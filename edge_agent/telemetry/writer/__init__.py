"""The telemetry writer: builds prediction rows and commits them to the outbox, off the request path.

``local.LocalWriter`` does it on a thread of the agent (``[telemetry] writer = "thread"``, the
default); in the ``"process"`` mode ``remote.RemoteOutbox`` hands batches, packed by ``columns``, to
a child process (``child``) that runs a ``LocalWriter`` and owns the outbox (docs/telemetry.md).
"""
