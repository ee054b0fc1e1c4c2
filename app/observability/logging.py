"""Log setup: one JSON object per line in production, readable text for the demo."""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

# (trace id, span id) of the request being served, set by the HTTP middleware for as long as it is: every line
# logged meanwhile, from the loop or from a thread the request's context was copied to, carries both.
request_trace: ContextVar[tuple[str, str] | None] = ContextVar("request_trace", default=None)

# Attributes every LogRecord has; anything else was passed through `extra=` and belongs in the JSON line.
_OWN = vars(logging.LogRecord("", 0, "", 0, "", (), None))
_STANDARD = set(_OWN) | {"message", "asctime", "taskName"}
# How many attributes a LogRecord sets itself, before any extra (logging refuses an extra that would replace one).
_FIRST_EXTRA = len(_OWN)


class JsonFormatter(logging.Formatter):
    """One JSON object per record. Formatting runs under the handler's lock, so the cached second is never shared
    between two threads at once."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # the date and time formatted once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = vars(record)
        # The extras are the record's last attributes (LogRecord sets its own first): only those are looked at.
        for key in list(fields)[_FIRST_EXTRA:]:
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = fields[key]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TraceContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = request_trace.get()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


def configure_logging(level: str, fmt: str, *, access_log: bool = True) -> None:
    # Neither format uses the caller's file and line, the thread or the process: skip collecting them for every
    # record (the logging HOWTO's "Optimization" flags), a third of the cost of each request's log line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # One line per request comes from the gateway's own middleware, not uvicorn's access log.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("app.access").setLevel(logging.INFO if access_log else logging.WARNING)
