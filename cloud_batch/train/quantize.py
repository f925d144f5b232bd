"""Turn a trained Keras model into a full-integer quantized ``.tflite`` file.

Full-integer means every op runs in integer arithmetic and the input and output tensors
are integers too; the edge runtime quantizes FP32 requests on the way in. Two modes:

* ``"int8"``: int8 weights and activations (``TFLITE_BUILTINS_INT8``). What the cheapest
  CPUs run fastest and what int8 accelerators require. The default.
* ``"int16x8"``: int8 weights, int16 activations and I/O
  (``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``). Needed when one input
  tensor packs raw features of very different magnitudes (rpm ~1800 beside a vibration
  std ~0.3): a tensor has a single scale, and at 8 bits the small features round away.

The quantization ranges of every tensor are calibrated on a representative dataset, which
must come from the training split (calibrating on held-out data would leak it into the
evaluation).

The Keras model is exported as a SavedModel first, so the TFLite serving signature takes
its input names from the ``keras.Input(name=...)`` of the model (``pixels``, ``live``, ...);
outputs come out as ``output_0``, ``output_1``...
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from cloud_batch.errors import CloudError, InputError
from cloud_batch.train.tf_env import quiet_native_output, tensorflow

RepresentativeData = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def representative_samples(inputs: Mapping[str, np.ndarray], n: int = 300, seed: int = 0) -> RepresentativeData:
    """A calibration generator: ``n`` single-sample feeds drawn (seeded) from the given input arrays."""
    sizes = {len(a) for a in inputs.values()}
    if len(sizes) != 1:
        raise CloudError(f"representative inputs disagree on length: {sorted(sizes)}")
    total = sizes.pop()
    idx = np.random.default_rng(seed).permutation(total)[: min(n, total)]

    def gen() -> Iterable[Mapping[str, np.ndarray]]:
        for i in idx:
            yield {name: np.asarray(a[i : i + 1], np.float32) for name, a in inputs.items()}

    return gen


MODES = ("int8", "int16x8")


def to_quantized_tflite(model: Any, representative: RepresentativeData, mode: str = "int8") -> bytes:
    """Convert ``model`` (Keras 3) to a full-integer TFLite flatbuffer in ``mode`` and return its bytes."""
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; use one of {list(MODES)}")
    tf = tensorflow()
    if mode == "int8":
        ops, io_type = tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.int8
    else:
        ops, io_type = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8, tf.int16
    with tempfile.TemporaryDirectory(prefix="cloud-batch-export-") as tmp, quiet_native_output():
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [ops]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
        try:
            return bytes(converter.convert())
        except Exception as exc:  # the converter raises assorted internal types
            raise CloudError(f"{mode} conversion failed: {exc}") from exc
