"""cloud_batch.sim."""
