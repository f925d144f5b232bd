"""The model manifest and its parts: tensors, feature joins, drift reference, calibration, precomputed answers,
vision pre/postprocessing, the signature rule and the ``--manifest`` merge."""
