"""mqtt-bridge: Relays MQTT telemetry to channels and client commands to devices."""
