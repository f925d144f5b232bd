"""``edge-agent``: a thin command line over the agent's library functions.

Each command parses its flags, makes one library call and prints the result. Errors the
agent raises on purpose print ``error: ...`` and exit 1; bad usage exits 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.cli.common import Handler
from edge_agent.cli.common import add_command as _add
from edge_agent.cli.common import common_args as _common
from edge_agent.cli.common import config_from_args as _config
from edge_agent.cli.shadow import add_shadow_command
from edge_agent.errors import EdgeError, NotFoundError
from edge_agent.models.shadow.child import SHADOW_COMMAND
from edge_agent.update.validate import VALIDATE_COMMAND
from edge_agent.update.validate import main as validate_main
from edge_agent.wire.model.calibration import calibration_of
from edge_agent.wire.model.calibration import describe as describe_calibration

if TYPE_CHECKING:  # imported lazily at run time: `edge-agent --help` stays fast
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.models.store import ModelStore


def _store(args: argparse.Namespace) -> ModelStore:
    from edge_agent.models.store import ModelStore

    cfg = _config(args)
    return ModelStore(cfg.data_dir, keep=cfg.keep_versions, fleet_key=cfg.ota.fleet_key)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- commands -------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from edge_agent.app import Agent

    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    agent = Agent(cfg)
    agent.install_signal_handlers()
    agent.prepare()
    agent.serve()
    return agent.exit_code  # RESTART_EXIT (75) after an agent slot switch: systemd starts the new slot


def cmd_models_install(args: argparse.Namespace) -> int:
    """The file is untrusted: it is loaded, measured and validated only in the isolated child, as over the air."""
    from edge_agent.inference.modelpack import apply_manifest_fields
    from edge_agent.update.validate import build_and_validate
    from edge_agent.wire.model.merge import load_fields

    cfg = _config(args)
    if not args.file.is_file():
        raise NotFoundError(f"model file not found: {args.file}")
    fields = load_fields(args.manifest) if args.manifest else None  # checked before any work

    def isolated(tflite: Path, out_dir: Path, *, name: str, version: str) -> None:
        build_and_validate(
            tflite,
            out_dir,
            name=name,
            version=version,
            runtime_options=cfg.runtime.options(),
            timeout_s=cfg.ota.validate_timeout_s,
        )
        if fields:
            apply_manifest_fields(out_dir, fields)  # JSON only: merged, validated, golden renamed

    m = _store(args).install_file(args.file, args.name, args.version, builder=isolated)
    print(f"installed {m.name} version {m.version} (sha256 {m.sha256[:12]}…)")
    return 0


def cmd_models_activate(args: argparse.Namespace) -> int:
    _store(args).activate(args.name, args.version)
    print(f"activated {args.name} version {args.version}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    version = _store(args).rollback(args.name)
    print(f"rolled back {args.name} to version {version}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    rows = _store(args).list()
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no models installed")
        return 0
    print(f"{'NAME':<20} {'ACTIVE':<8} {'PREVIOUS':<9} VERSIONS")
    for r in rows:
        print(f"{r['name']:<20} {r['active'] or '-':<8} {r['previous'] or '-':<9} {', '.join(r['versions'])}")
    return 0


def _active_model(args: argparse.Namespace) -> LoadedModel:
    store = _store(args)
    version = store.active(args.name)
    if version is None:
        raise NotFoundError(f"model {args.name!r} is not installed (see `edge-agent models list`)")
    return store.load(args.name, version, _config(args).runtime.options())  # sealed: decrypted in memory


def cmd_predict(args: argparse.Namespace) -> int:
    from edge_agent.inference.preprocess import load_input_file

    model = _active_model(args)
    if args.video is not None:
        from edge_agent.cli.video import predict_video

        return predict_video(model, args)
    outputs = model.predict(load_input_file(args.input, model.manifest))
    result: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()},
    }
    labels = model.manifest.labels
    if labels and len(outputs) == 1:
        probs = next(iter(outputs.values()))
        if probs.ndim == 2 and probs.shape[1] == len(labels):
            result["labels"] = [labels[i] for i in probs.argmax(axis=1)]
    if args.json:
        _print_json(result)
    else:
        if "labels" in result:
            print(f"{model.name} v{model.version}: {', '.join(result['labels'])}")
        for name, value in outputs.items():
            print(f"{name} = {np.array2string(np.asarray(value), precision=4, suppress_small=True)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    live: dict[str, Any] | None = None
    addr = cfg.listen_address()
    if isinstance(addr, tuple):
        host = "127.0.0.1" if addr[0] in ("0.0.0.0", "") else addr[0]
        try:
            with urllib.request.urlopen(f"http://{host}:{addr[1]}/agent/status", timeout=2) as resp:
                live = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            live = None
    store = _store(args)
    rows = store.list()
    for row in rows:  # the active version's calibration, as the nightly pipeline recorded it
        row["calibration"] = (
            calibration_of(store.manifest(row["name"], row["active"]).metrics) if row["active"] else None
        )
    out: dict[str, Any] = {
        "running": live is not None,
        "listen": cfg.listen,
        "data_dir": str(cfg.data_dir),
        "store": rows,
    }
    if live is not None:
        out["live"] = live
    if args.json:
        _print_json(out)
        return 0
    print(f"agent: {'running' if live else 'not reachable'} on {cfg.listen}; data dir {cfg.data_dir}")
    for row in rows:
        serving = (live or {}).get("models", {}).get(row["name"], {})
        extra = f" serving v{serving['version']} on {serving['delegate']}" if serving else ""
        print(f"  {row['name']}: active {row['active']}, versions {', '.join(row['versions'])}{extra}")
        print(f"    calibration: {describe_calibration(row['calibration'])}")
    for name, err in (live or {}).get("errors", {}).items():
        print(f"  {name}: version {err['version']} failed to load: {err['reason']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.inference.bench import bench_in_process

    model = _active_model(args)
    res = bench_in_process(model, iterations=args.iterations, batch=args.batch)
    if args.json:
        _print_json(res)
        return 0
    print(f"{res['model']} v{res['version']} batch {res['batch']} on {res['delegate']} ({args.iterations} calls each)")
    print(f"{'path':<8} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'calls/s':>10}")
    for key in ("raw", "agent"):
        r = res[key]
        print(f"{key:<8} {r['p50_ms']:>9.4f} {r['p95_ms']:>9.4f} {r['p99_ms']:>9.4f} {r['throughput_per_s']:>10.0f}")
    print(f"agent/raw p50: {res['overhead_p50']:.2f}x")
    return 0


# -- parser -----------------------------------------------------------------------
# name -> (handler, help, example); ``models`` only holds its subcommands (bare, argparse exits 2).
_COMMANDS: dict[str, tuple[Handler, str, str]] = {
    "run": (
        cmd_run,
        "run the agent service (HTTP API, model watcher)",
        "edge-agent run --broker mqtt://broker:1883 --fleet factory-a --device-id cam-7 --trust signing.pub",
    ),
    "models": (lambda a: 2, "install, activate, roll back and list model versions", "edge-agent models list --json"),
    "predict": (
        cmd_predict,
        "run one prediction in-process on the active version",
        "edge-agent predict digits --input digit.png",
    ),
    "status": (
        cmd_status,
        "show installed models and, if running, what the agent serves",
        "edge-agent status --listen 127.0.0.1:8080",
    ),
    "bench": (
        cmd_bench,
        "latency of the raw interpreter vs the agent's predict, in-process",
        "edge-agent bench digits --iterations 5000",
    ),
}
_MODELS_COMMANDS: dict[str, tuple[Handler, str, str]] = {
    "install": (
        cmd_models_install,
        "install a local .tflite file as a new model version",
        "edge-agent models install mobilenet.tflite --name mobilenet --version 3",
    ),
    "activate": (
        cmd_models_activate,
        "make an installed version the serving one (atomic)",
        "edge-agent models activate digits 2",
    ),
    "rollback": (
        cmd_models_rollback,
        "re-activate the version that served before the current one",
        "edge-agent models rollback digits",
    ),
    "list": (
        cmd_models_list,
        "list models, their versions and the active one",
        "edge-agent models list --json --data-dir ./var/agent",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="edgefleet edge agent: serves quantized TFLite models over the Open Inference Protocol.",
        epilog="Example:\n  edge-agent run --data-dir ./var/agent --listen 127.0.0.1:8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run, models, predict, status, bench = (_add(sub, name, *spec) for name, spec in _COMMANDS.items())
    msub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    install, activate, rollback, listing = (_add(msub, name, *spec) for name, spec in _MODELS_COMMANDS.items())
    add_shadow_command(msub)

    _common(run)
    run.add_argument("--listen", help="HOST:PORT or unix:/path/to.sock (default 127.0.0.1:8080)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--broker", help="MQTT broker URL, mqtt://host:1883 or mqtts://host:8883 (none: offline mode)")
    run.add_argument("--device-id", help="this device's id in the fleet (default: host name)")
    run.add_argument("--fleet", help="fleet this device belongs to (default: 'default')")
    run.add_argument(
        "--group", action="append", metavar="G", help="feature partition group of this device (repeatable)"
    )
    run.add_argument(
        "--trust", action="append", metavar="PUBKEY", help="public key trusted to sign releases (repeatable)"
    )
    run.add_argument("--tls-ca", metavar="FILE", help="CA certificate of the broker (mqtts://)")
    run.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS")
    run.add_argument("--tls-key", metavar="FILE", help="client private key for mutual TLS")
    run.add_argument(
        "--fleet-key", metavar="FILE", help="private fleet key (mode 0600) that opens encrypted models (ota.fleet_key)"
    )

    install.add_argument("file", type=Path, metavar="FILE.tflite")
    install.add_argument("--name", required=True)
    install.add_argument("--version", help="version (default: next integer)")
    install.add_argument("--manifest", type=Path, metavar="FILE.json", help="manifest fields to merge (docs/vision.md)")
    activate.add_argument("name")
    activate.add_argument("version")
    rollback.add_argument("name")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    predict.add_argument("name")
    what = predict.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help=".npy, .npz, .json or an image (image models)")
    what.add_argument("--video", type=Path, help="a video file: one JSON line per processed frame (image models)")
    predict.add_argument("--every", type=int, default=1, metavar="N", help="with --video: every Nth frame (default 1)")
    predict.add_argument("--out", type=Path, metavar="FILE.jsonl", help="with --video: write here (default stdout)")
    predict.add_argument("--json", action="store_true")
    status.add_argument("--listen", help="where the running agent listens")
    status.add_argument("--json", action="store_true")
    bench.add_argument("name")
    bench.add_argument("--iterations", type=int, default=2000)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--json", action="store_true")
    for p in (install, activate, rollback, listing, predict, status, bench):
        _common(p)
    from edge_agent.cli.features import add_commands as add_features_commands

    add_features_commands(sub)
    from edge_agent.cli.telemetry import add_commands as add_telemetry_commands

    add_telemetry_commands(sub)
    from edge_agent.cli.agent import add_commands as add_agent_commands

    add_agent_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == [VALIDATE_COMMAND]:  # the validation child of a frozen (PyInstaller) agent
        return validate_main(args_list[1:])
    if args_list[:1] == [SHADOW_COMMAND]:  # the shadow child of a frozen agent (models/shadow/child.py)
        from edge_agent.models.shadow import child

        return child.main(args_list[1:])
    if args_list[:1] == ["__chunk_sink__"]:  # the chunk sink of a frozen agent (mqtt/sink.py)
        from edge_agent.mqtt import sink

        return sink.main(args_list[1:])
    if args_list[:1] == ["__telemetry_writer__"]:  # the telemetry writer of a frozen agent (telemetry/writer/child.py)
        from edge_agent.telemetry.writer import child as telemetry_child

        return telemetry_child.main(args_list[1:])
    if args_list[:1] in (["__selftest__"], ["__boot__"]):  # agent slots (update/agent/selftest.py)
        from edge_agent.update.agent import selftest

        return (selftest.selftest_main if args_list[0] == "__selftest__" else selftest.boot_main)(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
