"""Batch scoring (#9): the device's own runtime over a dataset, on a local process pool or a Ray cluster."""
