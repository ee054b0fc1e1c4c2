"""Process lifecycle: the lifespan that owns resources, readiness, the server runner, and the drain on SIGTERM."""
