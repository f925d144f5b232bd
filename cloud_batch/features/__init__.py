"""cloud_batch.features."""
