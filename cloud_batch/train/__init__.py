"""cloud_batch.train."""
