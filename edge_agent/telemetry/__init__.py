"""Telemetry from the device to the cloud: the outbox, feedback labels, drift and the uploader.

``hub.Telemetry`` is the one object the agent wires; the modules underneath each have one job:
``outbox`` (SQLite, the bound and its drop order), ``recorder`` (the hot path's queue and the
writer), ``feedback`` (labels), ``drift`` (PSI windows), ``uploader`` (batches out, acks back);
the ``writer`` subpackage builds and commits the rows, on a thread or in a child process.
"""

from edge_agent.telemetry.drift import DriftMonitor, DriftResult
from edge_agent.telemetry.feedback import FeedbackItem, parse_feedback
from edge_agent.telemetry.hub import Telemetry
from edge_agent.telemetry.ids import IdSource
from edge_agent.telemetry.outbox import DB_FILE, Outbox
from edge_agent.telemetry.recorder import ModelPolicy, Recorder
from edge_agent.telemetry.uploader import Uploader

__all__ = [
    "DB_FILE",
    "DriftMonitor",
    "DriftResult",
    "FeedbackItem",
    "IdSource",
    "ModelPolicy",
    "Outbox",
    "Recorder",
    "Telemetry",
    "Uploader",
    "parse_feedback",
]
