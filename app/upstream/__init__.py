"""Upstream HTTP services: one shared aiohttp session, calls run on the event loop."""
