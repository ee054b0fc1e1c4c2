"""Which paths are open and which scope every other one needs: the one table the auth middleware and the OpenAPI
document both read, so the two can never disagree.

Paths not listed need a valid key of any scope (and then usually find no route: 404). create_app() checks that
every route it serves has a rule, so a new route cannot go out unprotected by oversight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

OPEN: Final = "<open>"  # not a scope: no key needed
SCHEMA_PATH: Final = "/openapi.json"
# Liveness and readiness answer anyone (the kubelet has no key); the schema describes the API, not its config.
OPEN_PATHS = ("/healthz", "/readyz", SCHEMA_PATH)
# The interactive docs (pages and their assets) show the schema: whoever may read it may read them.
SCHEMA_VIEWS = ("/docs", "/redoc")
# /debug is on the public listener only with authentication on (app/main.py), and then only for `admin` keys.
SCOPED_PREFIXES = (
    ("/aggregate", "aggregate"),
    ("/transform", "transform"),
    ("/metrics", "metrics"),
    ("/debug", "admin"),
)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class AccessRules:
    def __init__(
        self,
        open_paths: Iterable[str] = OPEN_PATHS,
        scoped: Iterable[tuple[str, str]] = SCOPED_PREFIXES,
        schema_views: Iterable[str] = SCHEMA_VIEWS,
    ) -> None:
        self.open_paths = frozenset(open_paths)
        self.scoped = tuple(sorted(scoped, key=lambda item: -len(item[0])))
        self.schema_views = tuple(schema_views)

    def scope_for(self, path: str) -> str | None:
        """OPEN, the scope the path needs, or None: any valid key (the path has no rule of its own)."""
        if path in self.open_paths:
            return OPEN
        if any(_under(path, prefix) for prefix in self.schema_views):
            return self.scope_for(SCHEMA_PATH)
        for prefix, scope in self.scoped:
            if _under(path, prefix):
                return scope
        return None

    def unruled(self, route_paths: Iterable[str]) -> list[str]:
        """Route templates that no rule covers."""
        return sorted(p for p in route_paths if self.scope_for(p) is None)
