"""The models on this device: ``store`` (immutable version slots, one atomic active pointer) and ``serving`` (hot swap)."""
