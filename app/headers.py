"""What a header name and a header value may hold: one definition for the config's credentials (app/settings.py) and
the headers clients ask to forward (app/aggregate/models.py), so the two can never drift apart.

A name is an RFC 9110 token; a value holds no CR, LF, NUL or other control character. Anything else would break the
request head the gateway writes upstream (the HTTP client would refuse it, too late to be the client's 422). Values
beyond ASCII go out UTF-8 encoded, which RFC 9110 counts as obs-text.
"""

from __future__ import annotations

import re

# Anchored, for JSON Schema (which searches) as much as for Python's fullmatch.
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
HEADER_VALUE_PATTERN = r"^[\t\x20-\x7e\x80-\uffff]*$"

HEADER_NAME = re.compile(HEADER_NAME_PATTERN)
HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN)
