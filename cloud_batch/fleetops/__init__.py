"""Operating a fleet over MQTT: ``broker`` (the link seam), ``keys``, ``release``, ``publish`` (chunks), ``rollout``, ``fleet`` (device states)."""
