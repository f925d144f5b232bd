"""Cloud ingest of device telemetry: broker session → exactly-once Parquet store → summaries and training rows.

``consumer`` (the MQTT session, manual acks), ``store`` (the commit protocol), ``ledger`` (per-device
seq ranges, the commit point), ``read`` (reading the store back), ``summary`` and ``labeled``.
"""
