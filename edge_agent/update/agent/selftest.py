"""``edge-agent __selftest__`` and ``edge-agent __boot__``: the hidden commands of an agent slot.

``__selftest__ --data-dir D [--options JSON] [--fleet-key FILE]`` is run by the *running* agent on
the *new* slot's binary before the switch: it loads every active model of the store in ``D`` with
this build's runtime and the device's runtime options and fleet key (a sealed model, #14, is
opened in memory as the agent would), re-runs its golden samples, prints one JSON line and exits
0 only when all pass. The flags are those of ``__validate__``; flags it does not know are ignored,
so that a later agent can still self-test this build (an explicit rollback).

``__boot__ [--config F]`` is the unit's ``ExecStartPre``, run by the *good* slot's binary before
every start: ``AgentSlots.boot`` counts the start of a pending update, reverts after
``agent_update.max_starts``, and finishes any switch or revert a kill -9 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.errors import EdgeError
from edge_agent.update.agent.slots import device_slots

if TYPE_CHECKING:
    from edge_agent.inference.runtime import RuntimeOptions


def selftest(data_dir: Path, options: RuntimeOptions | None = None, fleet_key: Path | None = None) -> dict[str, Any]:
    """Load and golden-check every active model in ``data_dir``; ``ok`` is False with the first failure."""
    from edge_agent.inference.golden import check_golden, load_golden
    from edge_agent.models.store import ModelStore

    store = ModelStore(data_dir, fleet_key=fleet_key)
    report: dict[str, Any] = {"ok": True, "agent_version": __version__, "models": {}}
    for name, version in sorted(store.active_map().items()):
        try:
            model = store.load(name, version, options)
            golden = model.manifest.golden
            worst = check_golden(model, load_golden(store.version_dir(name, version) / golden)) if golden else {}
            report["models"][name] = {"version": version, "worst": worst}
        except EdgeError as exc:
            report.update(ok=False, error=f"{name} {version}: {exc}")
            break
    return report


def selftest_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent __selftest__", description="check a new agent slot")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--options", default="{}", help="the device's runtime options as JSON (num_threads, delegates)")
    parser.add_argument("--fleet-key", type=Path, metavar="FILE", help="the device's private fleet key (sealed models)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"__selftest__: ignoring flags of a later agent: {' '.join(unknown)}", file=sys.stderr)
    from edge_agent.inference.childproc import options_from_json

    report = selftest(args.data_dir, options_from_json(args.options), args.fleet_key)
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


def boot_main(argv: Sequence[str]) -> int:
    from edge_agent.config import load_config

    parser = argparse.ArgumentParser(prog="edge-agent __boot__", description="A/B slot accounting before a start")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, overrides={"data_dir": args.data_dir})
        print(device_slots(cfg).boot(), flush=True)
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
