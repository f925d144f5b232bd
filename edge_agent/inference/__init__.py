"""Running models: the TFLite backend seam, the interpreter pool, golden samples, version directories.

``interpreter`` (where interpreters come from: tflite-runtime or ai-edge-litert, injectable),
``runtime`` (``LoadedModel``: bindings, (de)quantization, batching, pool), ``golden``,
``modelpack`` (build and verify a version directory), ``preprocess`` (files to tensors), ``bench``.
"""
