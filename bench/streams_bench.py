"""Camera streams (#12), side by side in one run; Markdown on stdout.

    .venv/bin/python bench/streams_bench.py [--quick] [--base REV] [--only start]

``--only start`` runs section 3 alone (a few minutes, no model work): the start-time and RSS check.

1. **Throughput**: MediaPipe's face detector on a 512x512 MJPG clip of the astronaut photo: the
   stream pipeline (policy ``every``, unpaced file: capture and inference threads, postprocessing
   included) against a raw single-thread loop of OpenCV ``read`` + ``frame_to_tensor`` + ``invoke``.
   Frames per second, and frame read → result latency.
2. **Latest vs every with a source faster than the model**: a 256x256 clip paced at 100 fps, the
   model slowed to ~25 ms a frame (its backend sleeps in ``invoke``). Process CPU use, the frame's
   age when inference starts, and how far the result lags behind the source's own clock.
3. **The agent without streams**: ``edge-agent run`` start time (spawn → ready) and RSS once ready,
   this working tree against ``edge_agent`` as committed at ``--base REV`` (default ``5e4ad96``, the
   commit before streams landed; it also predates the rest of #8-#11 and #13, which that commit
   carried), alternating, with bytecode cached (``PYTHONPYCACHEPREFIX``; a warm-up start per side);
   and the import time and Python heap of the stream modules such an agent loads (#12's part alone).
   The base is read with ``git archive REV`` into a temp dir and imported through the shim of
   ``bench/batching_bench.py``: git's state (HEAD, index, working tree) is not touched.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.batching_bench import mode_env  # noqa: E402
from bench.gitcode import tree_at  # noqa: E402
from bench.procstat import rss_mb  # noqa: E402
from bench.run import free_port  # noqa: E402
from edge_agent.inference.preprocess import frame_to_tensor  # noqa: E402
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402
from edge_agent.streams.manager import StreamManager  # noqa: E402
from tests.support.mediapipe import FACE_FIELDS, astronaut_bgr, face_detector  # noqa: E402
from tests.support.streams import slow_backend, stream_config  # noqa: E402
from tests.support.video import write_clip  # noqa: E402

BIN = Path(sys.executable).parent
SOURCE_FPS = 100
DEFAULT_BASE = "5e4ad96"  # the last landed commit before #9-#13 (camera streams among them)


def install_face(work: Path, options: RuntimeOptions | None = None) -> ModelServer:
    """The face detector with the docs/vision.md fields, served by a ModelServer."""
    import json

    fields = work / "face.json"
    fields.write_text(json.dumps(FACE_FIELDS))
    data = work / f"data-{len(list(work.iterdir()))}"
    cmd = [str(BIN / "edge-agent"), "models", "install", str(face_detector()), "--name", "face",
           "--manifest", str(fields), "--data-dir", str(data)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    store = ModelStore(data)
    server = ModelServer(store, options or RuntimeOptions(pool_size=1))
    server.sync()
    return server


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def raw_loop(model: LoadedModel, clip: Path) -> dict[str, float]:
    """OpenCV read + preprocess + invoke, one thread, on a raw interpreter."""
    import cv2

    from edge_agent.inference.interpreter import open_interpreter

    interp, _ = open_interpreter(model.source, RuntimeOptions(pool_size=1))
    inp = interp.get_input_details()[0]["index"]
    outs = [d["index"] for d in interp.get_output_details()]
    pre = model.manifest.preprocessing
    cap = cv2.VideoCapture(str(clip))
    lat: list[float] = []
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        ok, frame = cap.read()
        if not ok:
            break
        interp.set_tensor(inp, frame_to_tensor(frame, pre)[0])
        interp.invoke()
        for o in outs:
            interp.get_tensor(o)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    cap.release()
    return {"fps": len(lat) / elapsed, "p50_ms": pct(lat, 50) * 1e3, "p95_ms": pct(lat, 95) * 1e3, "n": len(lat)}


def run_stream(server: ModelServer, clip: Path, seconds: float | None = None, **cfg: Any) -> dict[str, Any]:
    """One stream over ``clip``: until it ends (``loop=False``) or for ``seconds``; fps, latency, CPU, age, lag."""
    manager = StreamManager([stream_config(source=str(clip), model="face", **cfg)], server, _registry())
    stream = manager.get("cam")
    docs: list[dict[str, Any]] = []
    stream.subscribe(docs.append)
    cpu0, t0 = _cpu(), time.perf_counter()
    manager.start()
    try:
        if seconds is None:
            while stream.state != "ended":
                time.sleep(0.01)
        else:
            time.sleep(seconds)
    finally:
        elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
        status = stream.status()
        manager.stop()
    lat = [d["latency_ms"] for d in docs]
    ages = [d["age_at_inference_ms"] for d in docs]
    src = cfg.get("source_fps") or 0
    first = docs[0]["frame_ts"] - (docs[0]["frame"] - 1) / src if src else 0.0
    lags = [(d["frame_ts"] - first - (d["frame"] - 1) / src) * 1e3 + d["latency_ms"] for d in docs] if src else []
    return {
        "fps": len(docs) / elapsed,
        "fps_in": status["frames"]["read"] / elapsed,
        "dropped": status["frames"]["dropped"],
        "p50_ms": pct(lat, 50),
        "p95_ms": pct(lat, 95),
        "age_p50": pct(ages, 50),
        "age_p95": pct(ages, 95),
        "lag_end_ms": lags[-1] if lags else 0.0,
        "cpu_pct": 100.0 * cpu / elapsed,
        "n": len(docs),
    }


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


STREAM_MODULES = (
    "edge_agent.streams",
    "edge_agent.config.streams",
    "edge_agent.http.streams",
    "edge_agent.wire.model.vision",
)


def cached_env(work: Path) -> dict[str, str]:
    """The environment without ``EDGEFLEET_*``, with bytecode cached under ``work`` (as an installed agent has it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pyc")
    return env


def stream_import_ms(work: Path, runs: int) -> float:
    """The import time (self, summed) of the stream modules an agent without streams loads; min over ``runs``."""
    best = float("inf")
    for _ in range(runs + 1):  # the first run writes the bytecode cache
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import edge_agent.app"], env=cached_env(work),
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
        rows = [line.split("|") for line in err.splitlines() if line.rsplit("|", 1)[-1].strip() in STREAM_MODULES]
        best = min(best, sum(int(r[0].split(":")[1]) for r in rows) / 1000.0)
    return best


# Run in a child: the Python heap each stream module keeps once imported (its code, functions, classes and
# anything it is the first to import), summed over the outermost imports so nothing counts twice.
HEAP_PROBE = """
import sys, tracemalloc
from importlib.machinery import PathFinder

NAMES = set(sys.argv[1].split(","))
total = depth = 0


class Probe:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = PathFinder.find_spec(name, path, target) if name in NAMES else None
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            global total, depth
            depth += 1
            before = tracemalloc.get_traced_memory()[0]
            try:
                real(module)
            finally:
                depth -= 1
                if depth == 0:
                    total += tracemalloc.get_traced_memory()[0] - before

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Probe)
tracemalloc.start()
import edge_agent.app
print(total)
"""


def stream_import_kib(work: Path) -> float:
    """The Python heap the stream modules keep in an agent without streams (tracemalloc), KiB."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, ",".join(STREAM_MODULES)], env=cached_env(work),
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.strip()) / 1024.0


def agent_start(mode: str, head: Path, work: Path) -> tuple[float, int]:
    """(seconds from spawn to /v2/health/ready, RSS bytes once ready) of an agent with no streams."""
    env = cached_env(work)
    env["EDGEFLEET_MODELS_DIR"] = str(REPO / "models")
    env.update(mode_env(mode, head))
    data = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    t0 = time.perf_counter()
    cmd = [str(BIN / "edge-agent"), "run", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.01)
            if time.perf_counter() - t0 > 60:
                raise SystemExit(f"{mode} agent did not become ready")
        took = time.perf_counter() - t0
        time.sleep(1.0)  # settle: the watcher and first sync have run
        return took, int(rss_mb(proc.pid) * 1024 * 1024)
    finally:
        proc.terminate()
        proc.wait(30)


def start_section(base: str, work: Path, rounds: int) -> None:
    """Section 3: an agent without streams, this tree against ``base``: start time, RSS, stream import time."""
    tree, sha = tree_at(base, work)
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    names = {"base": f"base {base} ({sha})", "this": f"this tree (HEAD {here.strip()} + uncommitted changes)"}
    results: dict[str, list[tuple[float, int]]] = {"base": [], "this": []}
    env_mode = {"base": "HEAD", "this": "off"}  # batching_bench's modes: "HEAD" runs the extracted tree
    for side in results:
        agent_start(env_mode[side], tree, work)  # warm-up: writes the bytecode cache
    for i in range(rounds):
        for side in ("base", "this") if i % 2 == 0 else ("this", "base"):
            results[side].append(agent_start(env_mode[side], tree, work))
    print(f"\n### `edge-agent run` without streams: spawn → ready, RSS once ready (median of {rounds})\n")
    print("| code | start s | RSS MiB |\n| --- | ---: | ---: |")
    for side, rows in results.items():
        print(f"| {names[side]} | {statistics.median(t for t, _ in rows):.2f} "
              f"| {statistics.median(r for _, r in rows) / 2**20:.1f} |")  # fmt: skip
    print(f"\nThe stream modules in an agent without streams ({', '.join(STREAM_MODULES)}): import time "
          f"{stream_import_ms(work, rounds):.2f} ms (min of {rounds}), Python heap kept "
          f"{stream_import_kib(work):.0f} KiB at most (tracemalloc; with what they are first to import); "
          "OpenCV is not imported.")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer frames and rounds (smoke run)")
    ap.add_argument("--base", default=DEFAULT_BASE, metavar="REV",
                    help=f"the revision section 3 compares against (default {DEFAULT_BASE})")  # fmt: skip
    ap.add_argument("--only", choices=("all", "start"), default="all", help="start: section 3 alone")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-streams-bench-"))
    n_frames, rounds, window = (60, 2, 2.0) if args.quick else (300, 5, 5.0)
    if args.only == "start":
        start_section(args.base, work, rounds)
        return 0
    clip = write_clip(work / "astronaut.avi", [astronaut_bgr()] * n_frames, fps=30)
    server = install_face(work)
    model = server.get("face")
    model.warmup()

    raw = [raw_loop(model, clip) for _ in range(rounds)]
    every = [run_stream(server, clip, policy="every", loop=False) for _ in range(rounds)]
    raw_fps, stream_fps = statistics.median(r["fps"] for r in raw), statistics.median(r["fps"] for r in every)
    print(f"### Throughput: face detector, {n_frames}-frame 512x512 MJPG clip (median of {rounds})\n")
    print("| loop | frames/s | read → result p50 ms | p95 ms |\n| --- | ---: | ---: | ---: |")
    for name, rows in (("raw OpenCV read + preprocess + invoke", raw), ("stream (policy every)", every)):
        med = {k: statistics.median(r[k] for r in rows) for k in ("fps", "p50_ms", "p95_ms")}
        print(f"| {name} | {med['fps']:.1f} | {med['p50_ms']:.2f} | {med['p95_ms']:.2f} |")
    print(f"\nstream / raw throughput: **{stream_fps / raw_fps:.2f}x** (goal ≥ 0.9x)\n")

    import cv2

    small = write_clip(work / "small.avi", [cv2.resize(astronaut_bgr(), (256, 256))] * n_frames, fps=30)
    slow = install_face(work, RuntimeOptions(pool_size=1, backend=slow_backend(0.025)))
    print(f"### Source at {SOURCE_FPS} fps (256x256 clip), model ~25 ms a frame ({window:.0f} s each)\n")
    print("| policy | fps in | fps processed | dropped | CPU % | age at inference p50 / p95 ms "
          "| result lag behind the source at the end ms |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for policy in ("latest", "every"):
        r = run_stream(slow, small, seconds=window, policy=policy, source_fps=SOURCE_FPS)
        print(f"| {policy} | {r['fps_in']:.0f} | {r['fps']:.1f} | {r['dropped']} | {r['cpu_pct']:.0f} "
              f"| {r['age_p50']:.1f} / {r['age_p95']:.1f} | {r['lag_end_ms']:.0f} |")  # fmt: skip
    slow.stop()
    server.stop()

    start_section(args.base, work, rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
