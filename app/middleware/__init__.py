"""Pure ASGI middleware: cheap, streaming-safe, and never buffering a body."""
