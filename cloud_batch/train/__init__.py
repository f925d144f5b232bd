"""Training jobs: ``digits``, ``maintenance/`` (job, data, features), the shared ``job`` runner, ``quantize``,
``device_eval`` (the device runtime), ``gate``, ``evalreport``, ``reference`` (the drift reference),
``tf_env`` (the only TensorFlow import).
"""
