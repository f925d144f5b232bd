"""A zoo of tiny TFLite models for the runtime tests, built with TensorFlow once per test session.

The models are built in a **subprocess** (``python -m tests.modelzoo OUT_DIR``), never in
the pytest process: importing ``tensorflow`` before ``tflite_runtime`` in one process breaks
the runtime (``Interpreter(...)`` fails with ``ValueError: vector::reserve`` in
``get_signature_list``), and the edge agent must be tested exactly as it runs on a device,
without TensorFlow loaded.

For every model the build also records, next to ``<name>.tflite``:

* ``<name>.npz`` - inputs and the outputs TensorFlow's own ``tf.lite.Interpreter`` computed
  for them: ``in:<x>`` real (FP32) inputs, ``raw_in:<x>`` the same in the tensor's native
  type, ``out:<y>`` real outputs, ``raw_out:<y>`` native outputs. Quantized inputs are
  drawn as random integers, so their real values are exactly representable.
* an entry in ``zoo.json`` - the signature's tensors as TensorFlow reports them (dtype,
  shape signature with -1, quantization).

Models (all tiny; the whole build takes a few seconds):

==============  =====================================================================
``int8``        conv net, full-integer int8 in/out, dynamic batch (``pixels`` -> ``logits``)
``uint8``       the same with uint8 in/out
``float16``     the same with float16 weights and float32 in/out
``float32``     the same, plain float
``multi_io``    int8, inputs ``a`` [-1,4] and ``b`` [-1,3], outputs ``mix`` [-1,2] and ``gate`` [-1,1]
``fixed_batch`` int8, input ``x`` [1,6] -> ``y`` [1,2]: the batch dim is fixed at 1
``custom_op``   ``BesselI0e``, converted with ``allow_custom_ops``: no TFLite runtime resolves it
==============  =====================================================================

Tests use the session-scoped ``zoo`` fixture from ``tests/conftest.py`` (one build per session).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

MODELS = ("int8", "uint8", "float16", "float32", "multi_io", "fixed_batch", "custom_op")
CUSTOM_OP = "BesselI0e"  # the op the custom_op model needs
DYNAMIC_BATCH = 7  # batch of the recorded samples for dynamic-batch models
FIXED_BATCH_SAMPLES = 4  # samples recorded for the fixed-batch model (run one at a time)


# ---------------------------------------------------------------------------------------------
# Test side (no TensorFlow here)
# ---------------------------------------------------------------------------------------------


@dataclass
class Zoo:
    """The built models in ``root``: paths, the TF-side tensor specs and reference samples."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / f"{name}.tflite"

    def specs(self, name: str) -> dict[str, Any]:
        """``{"inputs": {name: {dtype, shape, quantization}}, "outputs": {...}}`` as TensorFlow saw them."""
        return json.loads((self.root / "zoo.json").read_text())[name]

    def samples(self, name: str) -> dict[str, np.ndarray]:
        with np.load(self.root / f"{name}.npz", allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def part(self, name: str, prefix: str) -> dict[str, np.ndarray]:
        """One kind of sample array (``in:``, ``raw_in:``, ``out:``, ``raw_out:``) keyed by tensor name."""
        return {k[len(prefix) :]: v for k, v in self.samples(name).items() if k.startswith(prefix)}

    def garbage(self, kind: str = "random") -> Path:
        """A file that is not a loadable TFLite model.

        ``random``: 4 KiB of seeded random bytes (bad flatbuffer identifier); ``text``: a text
        file; ``empty``: zero bytes; ``truncated``: the first half of the int8 model (valid
        ``TFL3`` header, the rest missing).
        """
        out = self.root / f"garbage-{kind}.tflite"
        if kind == "random":
            data = bytearray(np.random.default_rng(0).bytes(4096))
            data[4:8] = b"\x00\xffXX"  # never the TFL3 identifier, whatever the seed gives
            out.write_bytes(bytes(data))
        elif kind == "text":
            out.write_bytes(b"this is not a tflite model\n" * 40)
        elif kind == "empty":
            out.write_bytes(b"")
        elif kind == "truncated":
            model = self.path("int8").read_bytes()
            out.write_bytes(model[: len(model) // 2])
        else:
            raise ValueError(f"unknown garbage kind {kind!r}")
        return out


def build_in_subprocess(root: Path, timeout: float = 300) -> Zoo:
    """Run the TensorFlow build in a fresh interpreter so this process never imports TensorFlow."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.modelzoo", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not (root / "zoo.json").is_file():
        raise RuntimeError(
            f"model zoo build failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return Zoo(root)


# ---------------------------------------------------------------------------------------------
# Build side (runs with TensorFlow, in its own process)
# ---------------------------------------------------------------------------------------------


def _build(out: Path) -> None:  # pragma: no cover - runs in the build subprocess
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)  # one stream: weights first, then the samples, in this order
    index: dict[str, Any] = {}
    for name, content in _convert_all(tf, rng).items():
        (out / f"{name}.tflite").write_bytes(content)
        if name == "custom_op":  # TF's interpreter cannot run it either
            index[name] = {"custom_op": CUSTOM_OP}
            continue
        index[name], samples = _record(tf, rng, name, content)
        np.savez(out / f"{name}.npz", **samples)

    (out / "zoo.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _convert_all(tf: Any, rng: np.random.Generator) -> dict[str, bytes]:  # pragma: no cover - build subprocess
    """Every zoo model as .tflite bytes (the weights drawn from ``rng``)."""

    def var(*shape: int, scale: float = 0.5) -> tf.Variable:
        return tf.Variable((rng.standard_normal(shape) * scale).astype(np.float32))

    class ConvNet(tf.Module):
        """pixels [N,8,8,1] -> conv3x3x4 + relu -> global mean -> dense -> logits [N,3]."""

        def __init__(self) -> None:
            self.k = var(3, 3, 1, 4)
            self.w = var(4, 3, scale=1.0)
            self.b = tf.Variable(np.array([0.1, -0.2, 0.3], np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="pixels")])
        def __call__(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            h = tf.nn.relu(tf.nn.conv2d(pixels, self.k, 1, "SAME"))
            h = tf.reduce_mean(h, axis=[1, 2])
            return {"logits": tf.matmul(h, self.w) + self.b}

    class MultiIO(tf.Module):
        """a [N,4], b [N,3] -> mix [N,2] = a@W1 + b@W2, gate [N,1] = sigmoid(b@W3)."""

        def __init__(self) -> None:
            self.w1, self.w2, self.w3 = var(4, 2), var(3, 2, scale=1.5), var(3, 1)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 4], tf.float32, name="a"),
                tf.TensorSpec([None, 3], tf.float32, name="b"),
            ]
        )
        def __call__(self, a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"mix": tf.matmul(a, self.w1) + tf.matmul(b, self.w2), "gate": tf.sigmoid(tf.matmul(b, self.w3))}

    class FixedBatch(tf.Module):
        """x [1,6] -> y [1,2] (the batch dimension is static, like keras Input(batch_size=1))."""

        def __init__(self) -> None:
            self.w, self.b = var(6, 2, scale=1.0), tf.Variable(np.array([0.05, -0.1], np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 6], tf.float32, name="x")])
        def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.nn.relu6(tf.matmul(x, self.w) + self.b)}

    class Custom(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.math.bessel_i0e(x) * 2.0}

    pix: dict[str, tuple[int, ...]] = {"pixels": (8, 8, 1)}
    return {
        "int8": _convert(tf, ConvNet(), quant="int8", shapes=pix),
        "uint8": _convert(tf, ConvNet(), quant="uint8", shapes=pix),
        "float16": _convert(tf, ConvNet(), quant="float16"),
        "float32": _convert(tf, ConvNet(), quant="float32"),
        "multi_io": _convert(tf, MultiIO(), quant="int8", shapes={"a": (4,), "b": (3,)}),
        "fixed_batch": _convert(tf, FixedBatch(), quant="int8", shapes={"x": (6,)}),
        "custom_op": _convert(tf, Custom(), quant="custom"),
    }


def _rep_data(shapes: dict[str, tuple[int, ...]]) -> Any:  # pragma: no cover - build subprocess
    """Calibration inputs for full-integer quantization (a seeded stream of its own)."""

    def gen() -> Any:
        r = np.random.default_rng(7)
        for _ in range(64):
            yield {n: r.uniform(-1.0, 1.0, (1, *s)).astype(np.float32) for n, s in shapes.items()}

    return gen


def _convert(
    tf: Any, module: Any, *, quant: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> bytes:  # pragma: no cover - build subprocess
    """One module as .tflite bytes, quantized as ``quant`` says."""
    conv = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    if quant in ("int8", "uint8"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = _rep_data(shapes or {})
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int8 if quant == "int8" else tf.uint8
    elif quant == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif quant == "custom":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.allow_custom_ops = True
    return conv.convert()


def _real(raw: np.ndarray, quantization: list[float] | None) -> np.ndarray:
    """The FP32 value of a tensor in its native type (dequantized when it is quantized)."""
    if not quantization:
        return raw.astype(np.float32)
    scale, zp = quantization
    return ((raw.astype(np.float32) - np.float32(zp)) * np.float32(scale)).astype(np.float32)


def _record(
    tf: Any, rng: np.random.Generator, name: str, content: bytes
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # pragma: no cover - build subprocess
    """The model's tensor specs as TF reports them, and samples with TF's own outputs for them."""

    def tensor_info(d: dict[str, Any]) -> dict[str, Any]:
        scale, zp = d["quantization"]
        return {
            "tensor": d["name"],
            "dtype": np.dtype(d["dtype"]).name,
            "shape": [int(x) for x in d["shape_signature"]],
            "quantization": [float(scale), int(zp)] if scale > 0 else None,
        }

    interp = tf.lite.Interpreter(model_content=content)
    runner = interp.get_signature_runner("serving_default")
    ins = {n: tensor_info(d) for n, d in runner.get_input_details().items()}
    outs = {n: tensor_info(d) for n, d in runner.get_output_details().items()}

    batch = FIXED_BATCH_SAMPLES if name == "fixed_batch" else DYNAMIC_BATCH
    samples: dict[str, np.ndarray] = {}
    for n, info in ins.items():
        shape = (batch, *info["shape"][1:])
        dtype = np.dtype(info["dtype"])
        if info["quantization"]:
            raw = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, size=shape).astype(dtype)
            real = _real(raw, info["quantization"])
        else:
            real = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
            raw = real.astype(dtype)
        samples["in:" + n], samples["raw_in:" + n] = real, raw

    if name == "fixed_batch":
        parts = [runner(**{n: samples["raw_in:" + n][i : i + 1] for n in ins}) for i in range(batch)]
        results = {k: np.concatenate([p[k] for p in parts]) for k in outs}
    else:
        results = runner(**{n: samples["raw_in:" + n] for n in ins})
    for n, info in outs.items():
        raw = np.asarray(results[n])
        samples["out:" + n], samples["raw_out:" + n] = _real(raw, info["quantization"]), raw
    return {"inputs": ins, "outputs": outs}, samples


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.modelzoo OUT_DIR")
    _build(Path(sys.argv[1]))
