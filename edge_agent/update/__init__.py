"""edge_agent.update."""
