"""X-Request-ID: taken from the client when well-formed, made otherwise; echoed on every answer (app/middleware/
front.py) and passed to the upstreams."""

from __future__ import annotations

import random
import re

from starlette.types import Scope

HEADER = b"x-request-id"
_VALID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# Request ids need to be unique, not secret: 128 bits from a generator seeded once from the system's randomness,
# 32 hex digits as uuid4().hex gives, without its system call per request.
_random = random.Random()


def new_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's id: the client's, when well-formed; a new one otherwise."""
    for name, value in headers:
        if name == HEADER:
            # A client-chosen id goes into logs and upstream calls: anything odd is replaced, never passed on.
            if _VALID.match(value):
                return value.decode("ascii")
            break
    return f"{_random.getrandbits(128):032x}"


def request_id_of(scope: Scope) -> str:
    rid: str = scope.get("state", {}).get("request_id", "")
    return rid
