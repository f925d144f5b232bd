"""edge_agent.http."""
