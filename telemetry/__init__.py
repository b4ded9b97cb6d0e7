"""Tracing across the swarm (OpenTelemetry), off unless asked for: see `telemetry.tracing`."""
