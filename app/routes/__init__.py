"""HTTP routes. Every route is ``async def``: blocking work goes through its own bounded executor or pool."""
