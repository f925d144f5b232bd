"""cloud_batch.cli."""
