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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gitcode import tree_at, tree_env  # noqa: E402
from bench.run import free_port, http_bench, start_agent  # noqa: E402
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
        results: dict[tuple[str, str, int], dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for side in ("base", "this") if r % 2 == 0 else ("this", "base"):
                for label, binary, conc in CASES:
                    res = http_bench(agents[side][1], "digits", x, binary, args.requests, conc)
                    got = results.setdefault((side, label, conc), {"p50": [], "p99": [], "rps": []})
                    got["p50"].append(res["p50_ms"])
                    got["p99"].append(res["p99_ms"])
                    got["rps"].append(res["throughput_per_s"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for proc, _ in agents.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"base = {args.base} ({sha}); this = the working tree {this_env or ''}; "
          f"medians over {args.rounds} rounds of {args.requests} requests")  # fmt: skip
    print(
        "| encoding | concurrency | base p50 ms | this p50 ms | base p99 ms | this p99 ms | base req/s | this req/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, _, conc in CASES:
        b, t = results[("base", label, conc)], results[("this", label, conc)]
        cells = [statistics.median(v[k]) for k in ("p50", "p99") for v in (b, t)]
        rps = [statistics.median(v["rps"]) for v in (b, t)]
        print(f"| {label} | {conc} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {rps[0]:,.0f} | {rps[1]:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
