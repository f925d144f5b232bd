"""The edge agent never imports TensorFlow (or Keras, or the cloud side), even while serving.

Devices ship only tflite-runtime: a stray ``import tensorflow`` would crash there, and would
also break tflite-runtime in the same process (importing TF first makes its
``Interpreter`` fail). The check runs in a fresh subprocess so nothing the test session has
imported can mask or cause a hit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from edge_agent.wire.model.manifest import MANIFEST_FILE

# Top-level modules that must never be loaded by the edge agent.
FORBIDDEN = ("tensorflow", "tensorflow_core", "tf_keras", "keras", "cloud_batch", "tensorboard", "jax", "torch")

CHILD = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    FORBIDDEN = set(sys.argv[3].split(","))
    version_dir, data_dir = sys.argv[1], sys.argv[2]

    def loaded(names=None):
        return sorted({m.split(".")[0] for m in (names or list(sys.modules))})

    def hits():
        return sorted(FORBIDDEN & set(loaded()))

    import edge_agent
    from edge_agent.inference import runtime
    from edge_agent.inference.runtime import RuntimeOptions
    from edge_agent.models.serving import ModelServer
    from edge_agent.models.store import ModelStore

    store = ModelStore(data_dir)
    manifest = store.install_dir(version_dir)          # verifies sha256, size, tensors, golden samples
    server = ModelServer(store, RuntimeOptions(num_threads=1, pool_size=1), warmup_runs=1)
    swaps = server.sync()
    model = server.get(manifest.name)
    outputs = model.predict(model.example_inputs(batch=3))
    after_serving = hits()

    failed_imports = []
    def onerror(name):
        failed_imports.append(f"{name}: {sys.exc_info()[1]!r}")
    submodules = []
    for info in pkgutil.walk_packages(edge_agent.__path__, "edge_agent.", onerror=onerror):
        if info.name.endswith(".__main__"):
            continue  # runs the CLI on import; it only imports edge_agent.cli.main, covered below
        submodules.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed_imports.append(f"{info.name}: {exc!r}")

    print(json.dumps({
        "backend": runtime.default_backend().name,
        "name": manifest.name,
        "version": manifest.version,
        "swaps": swaps,
        "outputs": {k: [list(v.shape), str(v.dtype)] for k, v in outputs.items()},
        "after_serving": after_serving,
        "after_all_imports": hits(),
        "submodules": submodules,
        "failed_imports": failed_imports,
        "modules": loaded(),
    }))
    """
)


def run_without_tensorflow(version_dir: Path, data_dir: Path) -> dict:
    """Install ``version_dir`` into a fresh store, serve one prediction and import all of edge_agent, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(version_dir), str(data_dir), ",".join(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"child failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_serving_the_shipped_model_never_imports_tensorflow(digits_dir: Path, tmp_path: Path) -> None:
    shipped = json.loads((digits_dir / MANIFEST_FILE).read_text())
    report = run_without_tensorflow(digits_dir, tmp_path / "data")
    modules = "\n  ".join(report["modules"])
    assert report["after_serving"] == [], f"serving loaded {report['after_serving']}; top-level modules:\n  {modules}"
    assert report["after_all_imports"] == [], (
        f"importing every edge_agent module loaded {report['after_all_imports']}; top-level modules:\n  {modules}"
    )
    assert report["failed_imports"] == []
    # It really served: the shipped model was installed, swapped in and answered with every output.
    assert report["backend"] in ("tflite-runtime", "ai-edge-litert")
    assert (report["name"], report["version"]) == (shipped["name"], shipped["version"])
    assert report["swaps"] == [[shipped["name"], None, shipped["version"]]]
    assert set(report["outputs"]) == {o["name"] for o in shipped["outputs"]}
    assert all(shape[0] == 3 for shape, _ in report["outputs"].values())
    # The walk found the agent's modules (not an empty package).
    for mod in (
        "edge_agent.inference.runtime",
        "edge_agent.models.store",
        "edge_agent.models.serving",
        "edge_agent.cli.main",
    ):
        assert mod in report["submodules"]
