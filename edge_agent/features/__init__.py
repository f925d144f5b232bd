"""edge_agent.features."""
