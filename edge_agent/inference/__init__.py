"""edge_agent.inference."""
