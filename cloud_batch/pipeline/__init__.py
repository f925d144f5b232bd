"""The nightly loop (#10): ingest, dataset, features, train, quantize, calibrate, gate, register, release, report."""
