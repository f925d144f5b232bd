"""``edge-agent``: ``main`` (the commands), ``features`` (``edge-agent features …``), ``common`` (shared argument handling)."""
