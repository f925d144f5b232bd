"""Import TensorFlow the one way that works beside the edge runtime, quietly and deterministically.

Two facts make this module necessary:

* ``tflite_runtime`` (used by ``edge_agent.inference.runtime`` to run the int8 models exactly as a
  device does) breaks when it is first imported *after* TensorFlow in the same process:
  every model then fails to load with ``vector::reserve``. Imported first, both work. So
  ``cloud_batch`` never imports TensorFlow at module level; it calls ``tensorflow()``.
* TensorFlow prints C++ and oneDNN log lines on import and during conversion. Batch jobs
  should show their own progress, not that noise.

Only ``cloud_batch`` (and the bench scripts) import TensorFlow; ``edge_agent`` never does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from types import ModuleType

from cloud_batch.errors import CloudError


def tensorflow() -> ModuleType:
    """Return the ``tensorflow`` module, importing the edge runtime first and silencing logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN's custom ops announce themselves on import and can change float round-off
    # between runs; off, training is reproducible from the seed.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    late = "tensorflow" in sys.modules and "tflite_runtime.interpreter" not in sys.modules
    from edge_agent.inference.interpreter import default_backend

    # Resolving the backend imports tflite_runtime, which must come before tensorflow.
    if default_backend().name == "tflite-runtime" and late:
        raise CloudError(
            "tensorflow was imported before tflite_runtime in this process, so int8 models cannot be "
            "loaded for evaluation; import cloud_batch (or edge_agent.inference.runtime) before tensorflow"
        )
    with quiet_native_output():
        import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl ships with tensorflow
        pass
    return tf


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TF, and make TF kernels deterministic, so a seed names one model."""
    tf = tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Swallow what C++ code writes to fd 1/2 (and Python warnings) inside the block.

    If the block raises, the captured text is written to stderr, so a failure still
    shows its diagnostics.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace")[-20000:])
