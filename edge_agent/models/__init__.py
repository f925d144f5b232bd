"""edge_agent.models."""
