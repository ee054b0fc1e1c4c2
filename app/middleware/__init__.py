"""Pure ASGI middleware: cheap and streaming-safe. Only the JSON depth check holds a body whole, and only a JSON
body the app would parse whole anyway, already capped by the body limit."""
