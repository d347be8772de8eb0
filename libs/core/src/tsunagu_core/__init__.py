"""Shared core of every Tsunagu service: config, bus, broker, envelope, telemetry, lifecycle."""
