"""Plain helpers shared by test modules (no fixtures here: those live in tests/conftest.py)."""
