"""edgefleet cloud batch side: train, register, build features, release to the fleet, simulate it.

One job per package (layers, top to bottom; import-linter enforces them):

=============  ====================================================================================
``cli``        ``cloud-batch`` command line (thin: parse, call one library function, print)
``sim``        the fleet simulator: thousands of protocol-faithful devices for tests and benchmarks
``features``   feature tables, recipes, snapshot/delta bundles in the registry, signed pushes
``fleetops``   keys, signed releases, artifact chunks, phased rollouts, the fleet's device states
``train``      the digits and maintenance jobs, quantization, device-runtime evaluation, the gate
``registry``   ``DIR/<name>/<version>/`` model version dirs, atomic and immutable
``progress``   rich progress on stderr
``errors``     the whole exception tree (``Rejected…`` final, ``Failed…`` retried)
=============  ====================================================================================

TensorFlow is imported lazily, inside training functions only (``train.tf_env``): the CLI's help,
the registry and the feature code work without loading it, and ``edge_agent`` never imports it.
"""
