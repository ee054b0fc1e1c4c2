"""ASGI middleware. One layer, app/middleware/front.py, holds every cross-cutting rule a request meets."""
