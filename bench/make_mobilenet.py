"""Generate the benchmark's heavy model: MobileNetV2 (224x224x3, alpha 1.0) quantized to full int8.

    .venv/bin/python bench/make_mobilenet.py [OUT.tflite] [--force]

Weights are random (``weights=None``, seeded): the benchmark measures latency, which does not
depend on what the weights are, and no download is needed. Calibration uses ~20 random images
uniform in [-1, 1], MobileNetV2's input range after ``preprocess_input`` (bench inputs in [0, 1]
fall inside it). The file is written atomically and reused if it exists, so ``bench/run.py``
can call this every time. Output goes to ``bench/out/`` (gitignored) by default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from anywhere

from cloud_batch.train.device_eval import staged_model  # noqa: E402  (imports the edge runtime before TF)
from edge_agent.fsutil import atomic_write_bytes  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "out" / "mobilenet_v2_int8.tflite"
CALIBRATION_IMAGES = 20


def bench_models(registry: Path) -> dict[str, Path]:
    """The version dirs a runtime bench compares: shipped digits and, once built, MobileNetV2-int8 registered."""
    from cloud_batch.registry.models import Registry

    models = {"digits": REPO / "models" / "digits" / "1"}
    if DEFAULT_OUT.exists():
        Registry(registry).register(DEFAULT_OUT, "mobilenet", "1")
        models["mobilenet_int8"] = registry / "mobilenet" / "1"
    else:
        print(f"{DEFAULT_OUT} missing (bench/make_mobilenet.py builds it): digits only", file=sys.stderr)
    return models


def build(out: Path, seed: int = 0) -> None:
    """Create the random-weight MobileNetV2, quantize it to int8 and write it to ``out``."""
    from cloud_batch.train.quantize import representative_samples, to_quantized_tflite
    from cloud_batch.train.tf_env import seed_everything, tensorflow

    tensorflow()
    seed_everything(seed)
    import keras

    inp = keras.Input((224, 224, 3), name="images")
    model = keras.applications.MobileNetV2(input_tensor=inp, alpha=1.0, weights=None, include_top=True)
    images = np.random.default_rng(seed).uniform(-1.0, 1.0, (CALIBRATION_IMAGES, 224, 224, 3)).astype(np.float32)
    tflite = to_quantized_tflite(
        model, representative_samples({"images": images}, n=CALIBRATION_IMAGES, seed=seed), "int8"
    )
    atomic_write_bytes(out, tflite)


def build_float(out: Path, alpha: float = 0.75, seed: int = 0) -> None:
    """A float32 MobileNetV2 (about 10 MB at alpha 0.75): the OTA benchmark's "large model"."""
    from cloud_batch.train.tf_env import seed_everything, tensorflow

    tf = tensorflow()
    seed_everything(seed)
    import keras

    inp = keras.Input((224, 224, 3), name="images")
    model = keras.applications.MobileNetV2(input_tensor=inp, alpha=alpha, weights=None, include_top=True)
    atomic_write_bytes(out, tf.lite.TFLiteConverter.from_keras_model(model).convert())


def check(out: Path) -> None:
    """Load ``out`` with the edge runtime and print its size and the time of one warm invoke."""
    with staged_model(out.read_bytes(), "mobilenet_v2") as (_, model):
        x = model.example_inputs(batch=1)
        t0 = time.perf_counter()
        model.predict(x)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = model.predict(x)
        warm = time.perf_counter() - t0
    spec = model.manifest.inputs[0]
    shapes = {k: list(v.shape) for k, v in outputs.items()}
    print(
        f"{out}: {out.stat().st_size / 1e6:.2f} MB, input {spec.name} {spec.dtype} {list(spec.shape)}, "
        f"outputs {shapes}; invoke {warm * 1e3:.1f} ms (first call {first * 1e3:.1f} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "out", nargs="?", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT.relative_to(REPO)})"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    ap.add_argument("--float32", action="store_true", help="float32 MobileNetV2 alpha 0.75 (~10 MB) instead of int8")
    args = ap.parse_args(argv)
    out: Path = args.out
    if out.is_file() and not args.force:
        print(f"{out} exists, not rebuilding (use --force)")
    else:
        print(f"building {out} (MobileNetV2, random weights, int8; ~15 s)", flush=True)
        t0 = time.perf_counter()
        build_float(out) if args.float32 else build(out)
        print(f"built in {time.perf_counter() - t0:.0f} s")
    check(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
