"""Interactive API docs without a CDN: ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), whose scripts, styles and icon
come from the fastapi-offline package (in the runtime lock) and are served by the gateway itself under
``/docs/assets/``. A gateway in a closed network cannot reach a CDN, and a page that loads code from elsewhere would
run it with the gateway's origin. Access follows the schema's rule (app/security/access.py).

Each page carries a Content-Security-Policy of its own, as narrow as the page allows: scripts from the gateway
only (Swagger UI's one inline script by its hash), no request to any other origin (``connect-src 'self'``).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from importlib.metadata import version

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import HTMLResponse, Response

from app.concurrency import run_in_own_thread
from app.errors import NotFoundError

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/docs/assets"
_PACKAGE = "fastapi_offline"
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# The URLs carry the package's version, so a browser may keep each file until the package changes.
_ASSET_CACHE = "public, max-age=604800, immutable"
_REDOC_LOGO = b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"'
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_PAGE_POLICY = (
    "default-src 'none'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@dataclass(frozen=True)
class _Asset:
    body: bytes
    gzipped: bytes


class DocsAssets:
    """The four files, read (and compressed) once, on first use, in a thread of their own: never on the loop."""

    def __init__(self) -> None:
        self.version = version("fastapi-offline")
        self._assets: dict[str, _Asset] | None = None
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> _Asset:
        """Raises NotFoundError for a name that is not one of the assets."""
        if name not in ASSET_TYPES:
            raise NotFoundError(f"no docs asset {name}")
        if self._assets is None:
            async with self._lock:
                if self._assets is None:
                    self._assets = await run_in_own_thread(lambda: _load(self.version), name="docs-assets")
        return self._assets[name]


def _load(asset_version: str) -> dict[str, _Asset]:
    static = importlib.resources.files(_PACKAGE).joinpath("static")
    loaded = {}
    for name in ASSET_TYPES:
        body = static.joinpath(name).read_bytes()
        if name == "redoc.standalone.js":
            # ReDoc's sidebar shows its makers' logo, loaded from their CDN (the page's policy would refuse it):
            # the gateway's own icon instead, relative to /redoc.
            body = body.replace(_REDOC_LOGO, f'src:"{ASSETS_PATH[1:]}/{asset_version}/favicon.png"'.encode())
        loaded[name] = _Asset(body, gzip.compress(body, compresslevel=6, mtime=0))
    return loaded


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(bytes(page.body).decode())
    ]
    page.headers["Content-Security-Policy"] = _PAGE_POLICY.format(scripts=" ".join(["'self'", *hashes]))
    return page


def build_router(*, title: str, openapi_url: str) -> APIRouter:
    """The docs pages and their assets; kept out of the schema (they are not part of the API)."""
    router = APIRouter(include_in_schema=False)
    assets = DocsAssets()

    def asset_url(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{assets.version}/{name}"

    @router.get(DOCS_PATH)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return _with_policy(
            get_swagger_ui_html(
                openapi_url=request.scope.get("root_path", "") + openapi_url,
                title=f"{title} - Swagger UI",
                swagger_js_url=asset_url(request, "swagger-ui-bundle.js"),
                swagger_css_url=asset_url(request, "swagger-ui.css"),
                swagger_favicon_url=asset_url(request, "favicon.png"),
                # Swagger UI would otherwise send the schema to an online validator.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @router.get(REDOC_PATH)
    async def redoc(request: Request) -> HTMLResponse:
        return _with_policy(
            get_redoc_html(
                openapi_url=request.scope.get("root_path", "") + openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=asset_url(request, "redoc.standalone.js"),
                redoc_favicon_url=asset_url(request, "favicon.png"),
                with_google_fonts=False,
            )
        )

    @router.get(ASSETS_PATH + "/{asset_version}/{name}")
    async def asset(request: Request, asset_version: str, name: str) -> Response:
        if asset_version != assets.version:
            raise NotFoundError(f"no docs asset {asset_version}/{name}")
        found = await assets.get(name)
        headers = {"Cache-Control": _ASSET_CACHE, "Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(found.gzipped, media_type=ASSET_TYPES[name], headers=headers)
        return Response(found.body, media_type=ASSET_TYPES[name], headers=headers)

    return router
