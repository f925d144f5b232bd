"""``python -m edge_agent`` is ``edge-agent`` (also the PyInstaller entry point)."""

import multiprocessing
import sys

if getattr(sys, "frozen", False):
    # A frozen agent starts its forkserver (and multiprocessing's resource tracker) by re-running
    # its own binary with ``-c "from multiprocessing.forkserver import main ..."``; PyInstaller's
    # runtime hook makes this call run that code and exit, before the agent's own CLI sees it.
    multiprocessing.freeze_support()

from edge_agent.cli.main import main

raise SystemExit(main())
