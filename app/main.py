"""The app factory. Building the app opens nothing: the lifespan does, when the server starts it."""

from __future__ import annotations

from fastapi import FastAPI

from app import __version__, problems
from app.lifecycle.lifespan import build_lifespan
from app.responses import JSONResponse
from app.routes import aggregate, health, metrics, transform
from app.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="gateway",
        version=__version__,
        lifespan=build_lifespan(settings),
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    problems.install(app)
    for module in (health, metrics, aggregate, transform):
        app.include_router(module.router)
    return app
