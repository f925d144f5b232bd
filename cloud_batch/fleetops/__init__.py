"""cloud_batch.fleetops."""
