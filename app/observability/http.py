"""How requests are labelled in metrics, spans and the one-line-per-request log (written by app/middleware/front.py).

Labels use the route template (``/aggregate/{composite}``), never the raw path, so thousands of distinct paths
cannot blow up the metric's cardinality; requests that match no route are counted under ``<unmatched>``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

log = logging.getLogger("app.access")

UNMATCHED = "<unmatched>"
SUMMARY_KEY = "log_summary"


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def add_log_fields(scope: Scope, **fields: Any) -> None:
    """Attach compact fields (e.g. an aggregate's per-source summary) to this request's log line."""
    scope.setdefault("state", {}).setdefault(SUMMARY_KEY, {}).update(fields)
