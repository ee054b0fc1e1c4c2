"""Process lifecycle: the lifespan that owns resources, readiness, and the server runner."""
