"""The agent against MLServer on the same digits model, side by side in one run.

    python3.11 -m venv /tmp/mlsvenv && /tmp/mlsvenv/bin/pip install mlserver==1.7.1 tflite-runtime==2.14.0 'numpy<2' 'uvloop<0.21'
    .venv/bin/python bench/mlserver_bench.py --mlserver-python /tmp/mlsvenv/bin/python [--rounds 6] [--requests 2000]

MLServer is never a project dependency: it runs from its own venv, with ``bench/mlserver_side.py``
as its runtime (MLServer ships none for TFLite). A real ``edge-agent run`` and a real
``mlserver start`` serve the shipped digits ``.tflite``; tritonclient.http sends JSON (MLServer
rejects binary tensor bodies) at concurrency 1 and 8, rounds alternating between the two servers
(agent, MLServer, MLServer, agent, ...) so drift in the machine's speed falls on both. Before
timing, both answer the same 64 digits and the largest difference of their outputs is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import free_port, http_bench, start_agent, wait_ready  # noqa: E402
from bench.sidebyside import alternate, table  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402

MODEL_DIR = REPO / "models" / "digits" / "1"
CONCURRENCY = (1, 8)


def start_mlserver(python: Path, work: Path, port: int, workers: int) -> subprocess.Popen:
    """``mlserver start`` on one model folder: settings, model settings and the runtime module beside them."""
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    model = work / "digits"
    model.mkdir(parents=True)
    shutil.copyfile(REPO / "bench" / "mlserver_side.py", model / "mlserver_side.py")

    def tensors(key: str) -> list[dict]:
        return [{"name": t["name"], "datatype": "FP32", "shape": t["shape"]} for t in manifest[key]]

    settings = {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": workers}
    (work / "settings.json").write_text(json.dumps(settings))
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "digits",
                "implementation": "mlserver_side.TFLiteRuntime",
                "parameters": {"uri": str(MODEL_DIR / manifest["file"])},
                "inputs": tensors("inputs"),
                "outputs": tensors("outputs"),
            }
        )
    )
    proc = subprocess.Popen(
        [str(python.parent / "mlserver"), "start", str(work)],
        cwd=model,
        env={"PATH": str(python.parent) + ":/usr/bin:/bin", "PYTHONPATH": str(model)},
        stdout=subprocess.DEVNULL,
        stderr=open(work / "mlserver.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    if not wait_ready(proc, f"http://127.0.0.1:{port}/v2/models/digits/ready", 120):
        proc.kill()
        raise RuntimeError(f"mlserver not ready (exit {proc.poll()}): {(work / 'mlserver.log').read_text()[-2000:]}")
    return proc


def answers(port: int, x: np.ndarray) -> np.ndarray:
    """One JSON infer of ``x`` (batch of digits) through tritonclient; the first output."""
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = th.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        return np.asarray(client.infer("digits", [inp]).as_numpy("probs"), dtype=np.float32)
    finally:
        client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlserver-python", required=True, type=Path, help="python of a venv with mlserver installed")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=2000, help="per server, concurrency and round")
    ap.add_argument("--parallel-workers", type=int, default=1, help="MLServer's parallel_workers (its default: 1)")
    args = ap.parse_args()
    if not (args.mlserver_python.parent / "mlserver").is_file():
        ap.error(f"no mlserver next to {args.mlserver_python}; install it as the docstring shows")
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)[..., None]
    x = images[:1]
    work = Path(tempfile.mkdtemp(prefix="edgefleet-mlserver-"))
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        ModelStore(work / "agent").install_dir(MODEL_DIR)
        port = free_port()
        servers["agent"] = (start_agent(work / "agent", port), port)
        port = free_port()
        servers["mlserver"] = (
            start_mlserver(args.mlserver_python, work / "mlserver", port, args.parallel_workers),
            port,
        )
        got = {side: answers(p, images[:64]) for side, (_, p) in servers.items()}
        diff = float(np.max(np.abs(got["agent"] - got["mlserver"])))
        same = int(np.sum(got["agent"].argmax(1) == got["mlserver"].argmax(1)))
        print(f"64 digits: max |agent - mlserver| = {diff:g}, same class {same}/64", flush=True)
        results = alternate(
            ("agent", "mlserver"),
            CONCURRENCY,
            args.rounds,
            lambda side, conc: http_bench(servers[side][1], "digits", x, False, args.requests, conc),
        )
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"digits, JSON, medians over {args.rounds} rounds of {args.requests} requests; "
          f"MLServer parallel_workers={args.parallel_workers}")  # fmt: skip
    table(results, ("agent", "mlserver"), CONCURRENCY, ["concurrency"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
