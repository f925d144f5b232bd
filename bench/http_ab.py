"""The HTTP request path of this tree against ``edge_agent`` at another commit, side by side in one run.

    .venv/bin/python bench/http_ab.py --base REV [--rounds 6] [--requests 2000] [--this-env KEY=VALUE ...] [--env KEY=VALUE ...]

Two real ``edge-agent run`` processes on the same machine (the base one imports ``edge_agent`` from
``git archive REV``, ``bench/gitcode.py``), the shipped digits model, tritonclient.http; rounds
alternate between the two agents (base, this, this, base, ...) so drift in the machine's speed
falls on both. Prints p50/p99 per round and pooled for JSON and binary at concurrency 1, and
req/s at concurrency 8.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gitcode import tree_at, tree_env  # noqa: E402
from bench.run import free_port, http_bench, start_agent  # noqa: E402
from bench.sidebyside import alternate, table  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402

CASES = (("JSON", False, 1), ("binary", True, 1), ("JSON", False, 8), ("binary", True, 8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare with (e.g. HEAD~1)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=2000, help="per case and round")
    ap.add_argument("--this-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of this tree's agent only, e.g. EDGEFLEET_TELEMETRY__ENABLED=false")  # fmt: skip
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of both agents")
    args = ap.parse_args()
    both = dict(item.split("=", 1) for item in args.env)
    this_env = {**both, **dict(item.split("=", 1) for item in args.this_env)}
    from sklearn.datasets import load_digits

    x = load_digits().images[:1].astype(np.float32)[..., None]
    work = Path(tempfile.mkdtemp(prefix="edgefleet-http-ab-"))
    agents: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        tree, sha = tree_at(args.base, work)
        for side, env in (("base", {**both, **tree_env(tree)}), ("this", this_env)):
            ModelStore(work / side).install_dir(REPO / "models" / "digits" / "1")
            port = free_port()
            agents[side] = (start_agent(work / side, port, env), port)
        results = alternate(
            ("base", "this"),
            [(label, conc) for label, _, conc in CASES],
            args.rounds,
            lambda side, case: http_bench(agents[side][1], "digits", x, case[0] == "binary", args.requests, case[1]),
        )
    finally:
        for proc, _ in agents.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"base = {args.base} ({sha}); this = the working tree {this_env or ''}; "
          f"medians over {args.rounds} rounds of {args.requests} requests")  # fmt: skip
    table(results, ("base", "this"), [(label, conc) for label, _, conc in CASES], ["encoding", "concurrency"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
