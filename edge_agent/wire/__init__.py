"""edge_agent.wire."""
