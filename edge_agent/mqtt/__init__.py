"""The device's transport: ``link`` (the MQTT connection), ``chunks`` (verified chunks on disk), ``download`` (MQTT, with ``http_range`` as the second transport)."""
