"""edgefleet cloud batch side: train, quantize, gate and register models for the edge agent.

One job per module:

==========================  ==================================================================
``cli``                     ``cloud-batch`` command line (thin: parse, call, print)
``registry``                ``DIR/<name>/<version>/`` version dirs, atomic and immutable
``digits``                  the digits CNN job (sklearn ``load_digits``, int8)
``maintenance``             the predictive-maintenance job (two inputs, int16x8)
``maintenance_data``        seeded synthetic fleet sensor history
``maintenance_features``    per-asset aggregates (``asset_features``), shared with the feature store
``quantize``                Keras -> full-integer ``.tflite``
``device_eval``             run a candidate exactly as the device will (``edge_agent.inference.runtime``)
``gate``                    the quality gate (refuse before registering)
``evalreport``              ``eval.json`` / ``eval.png`` beside a version
``progress``                rich progress on stderr
``tf_env``                  the only way TensorFlow is imported (after tflite_runtime, quiet)
``result``, ``errors``      what jobs return and raise
==========================  ==================================================================

TensorFlow is imported lazily, inside training functions only: the CLI's help, the registry
and the feature code work without loading it, and ``edge_agent`` never imports it.
"""
