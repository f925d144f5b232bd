"""``python -m edge_agent`` is ``edge-agent`` (also the PyInstaller entry point)."""

from edge_agent.cli.main import main

raise SystemExit(main())
