"""Shadow candidates: a version fed a sampled copy of live requests, in its own process, never answering a client.

``runner`` (the agent's side: sampling on the request path, shipping in bulk, the figures),
``child`` (the process that runs the versions and compares them), ``blob`` (the message
between them), ``compare`` (the per-row agreement rule).
"""

from edge_agent.models.shadow.compare import compare
from edge_agent.models.shadow.runner import LOAD_TIMEOUT_S, ShadowModel, ShadowRunner

__all__ = ["LOAD_TIMEOUT_S", "ShadowModel", "ShadowRunner", "compare"]
