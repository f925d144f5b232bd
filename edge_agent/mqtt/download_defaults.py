"""The ``Downloader``'s pacing defaults, in a module that imports nothing.

``OtaConfig`` (``[ota] chunk_window`` and ``stall_timeout_s``) takes its defaults from here: config sits
above mqtt in the layers, and importing ``mqtt.download`` (paho, the chunk store) would make every
``edge-agent`` command pay for the MQTT client just to read two numbers.
"""

CHUNK_WINDOW = 8  # chunk subscriptions outstanding at once
STALL_TIMEOUT_S = 30.0  # with chunks outstanding and none arriving this long, subscribe the window again
