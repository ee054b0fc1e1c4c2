"""Metrics, logs and event-loop health. The registry is created in the lifespan, never at import."""
