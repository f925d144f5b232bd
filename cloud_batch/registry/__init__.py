"""The model registry: ``models`` (``DIR/<name>/<version>/`` version dirs, atomic and immutable). The feature registry is ``cloud_batch.features.build``."""
