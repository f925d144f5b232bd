"""edgefleet edge agent."""
