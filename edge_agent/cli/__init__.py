"""edge_agent.cli."""
