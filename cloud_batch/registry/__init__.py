"""cloud_batch.registry."""
