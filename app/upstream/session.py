"""The shared aiohttp ClientSession: one connector for every upstream, opened and closed by the lifespan."""

from __future__ import annotations

import aiohttp
import orjson

from app.errors import ResourceClosedError
from app.settings import HttpClientSettings


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def new_session(max_connections: int) -> aiohttp.ClientSession:
    """A session as every upstream call uses: the shared one, and one per endpoint of a balanced upstream
    (app/upstream/endpoints.py), whose connections it then closes alone. Call on the event loop."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,  # per-upstream bounds are the gateway's semaphores, kept below this connector's
        ttl_dns_cache=60,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        json_serialize=_dumps,
        auto_decompress=True,
        # No session-wide timeout: every call gets its own, derived from the request's deadline.
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
        # No cookie jar: the session is shared by every client, and a cookie one upstream answer sets must
        # never be sent on another client's call. (A jar also costs a cookie filter on every request.)
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class HttpSession:
    def __init__(self, settings: HttpClientSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = new_session(self._settings.max_connections)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session. Raises ResourceClosedError before start() or after aclose()."""
        if self._session is None or self._session.closed:
            raise ResourceClosedError("http session is not open")
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
