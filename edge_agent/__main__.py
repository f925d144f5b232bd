"""``python -m edge_agent`` is ``edge-agent`` (also the PyInstaller entry point)."""

from edge_agent.cli import main

raise SystemExit(main())
