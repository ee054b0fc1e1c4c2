"""References from one source's values to another source's result: ``${profile.data.org_id}``.

The grammar is a path and nothing more, never an expression, never evaluated:

    reference := "${" source ( "." key | "[" index "]" | "[" '"' text '"' "]" | "[*]" )* "}"
    source    := a source name, then "data" as the first step; or "each", the current element of a for_each
    key       := [A-Za-z0-9_-]+            index := -?[0-9]+ (from the end when negative)

``[*]`` (once) is for ``for_each`` alone. ``$${`` writes a literal ``${``. A string that is exactly one reference
stands for the value itself (a number stays a number); a reference inside longer text stands for the value as text.
Nothing here imports the gateway's other modules: the settings check composites with it at load time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EACH = "each"  # the current element of a source's for_each
_SOURCE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
_STEP = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(-?[0-9]{1,9})\]|\[\"([^\"\\\x00-\x1f]*)\"\]|\[(\*)\]")
Step = str | int | None  # an object key, a list index, or None for [*]


class BadReferenceError(ValueError):
    """A reference that does not parse; the message says where."""


@dataclass(frozen=True, slots=True)
class Ref:
    source: str  # a source's name, or EACH
    steps: tuple[Step, ...]  # after "data" (after "each" for the element)
    text: str  # as written, without "${" and "}": for messages

    @property
    def star(self) -> int | None:
        """The position of [*] in ``steps``, or None."""
        return self.steps.index(None) if None in self.steps else None


@dataclass(frozen=True, slots=True)
class Template:
    """Text with references in it: literal parts (already unescaped) and references, in order."""

    parts: tuple[str | Ref, ...]

    @property
    def whole(self) -> Ref | None:
        """The reference when the text is exactly one (it then stands for the value, typed)."""
        return self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], Ref) else None

    @property
    def refs(self) -> tuple[Ref, ...]:
        return tuple(part for part in self.parts if isinstance(part, Ref))


def has_ref(text: str) -> bool:
    """Whether ``text`` may hold a reference (or an escaped ``$${``): the one check a value without any pays."""
    return "${" in text


def parse(text: str) -> str | Template:
    """``text`` as it is when it holds no reference (``$${`` unescaped), else its Template.

    Raises BadReferenceError naming what is wrong and where."""
    if "${" not in text:
        return text
    parts: list[str | Ref] = []
    literal: list[str] = []
    i = 0
    while True:
        j = text.find("${", i)
        if j < 0:
            literal.append(text[i:])
            break
        if j > 0 and text[j - 1] == "$":  # "$${": a literal "${"
            literal.append(text[i : j - 1] + "${")
            i = j + 2
            continue
        literal.append(text[i:j])
        end = text.find("}", j + 2)
        if end < 0:
            raise BadReferenceError(f"'${{' at {j} is not closed by '}}' (write '$${{' for a literal '${{')")
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(parse_ref(text[j + 2 : end]))
        i = end + 1
    if "".join(literal):
        parts.append("".join(literal))
    if not any(isinstance(p, Ref) for p in parts):
        return "".join(p for p in parts if isinstance(p, str))
    return Template(tuple(parts))


def parse_ref(inner: str) -> Ref:
    """One reference's inside (``profile.data.org_id``). Raises BadReferenceError."""
    match = _SOURCE.match(inner)
    if match is None:
        raise BadReferenceError(f"'${{{inner}}}' does not start with a source name")
    source, pos = match.group(), match.end()
    steps: list[Step] = []
    while pos < len(inner):
        step = _STEP.match(inner, pos)
        if step is None:
            raise BadReferenceError(
                f"'${{{inner}}}': expected '.key', '[index]' or '[\"key\"]' at '{inner[pos:]}'"
                " (a path, not an expression)"
            )
        key, index, quoted, star = step.groups()
        if star is not None:
            steps.append(None)
        elif index is not None:
            steps.append(int(index))
        else:
            steps.append(key if key is not None else quoted)
        pos = step.end()
    if steps.count(None) > 1:
        raise BadReferenceError(f"'${{{inner}}}': '[*]' may appear once")
    if source != EACH:
        if not steps or steps[0] != "data":
            raise BadReferenceError(f"'${{{inner}}}': a reference reads a source's data: '${{{source}.data...}}'")
        steps = steps[1:]
    return Ref(source, tuple(steps), inner)


class MissingValueError(LookupError):
    """The path leads nowhere in the value; the message says where it stopped."""


def lookup(value: Any, steps: Sequence[Step], *, what: str) -> Any:
    """Follow ``steps`` (no [*]) into ``value``. Raises MissingValueError; ``what`` names ``value`` in messages."""
    for step in steps:
        if isinstance(step, str):
            if not isinstance(value, dict) or step not in value:
                kind = "has no key" if isinstance(value, dict) else f"is {_kind(value)}, not an object: no key"
                raise MissingValueError(f"{what} {kind} '{step}'")
            value = value[step]
            what = f"{what}.{step}"
        elif isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                kind = f"has {len(value)} elements" if isinstance(value, list) else f"is {_kind(value)}, not a list"
                raise MissingValueError(f"{what} {kind}: no [{step}]")
            value = value[step]
            what = f"{what}[{step}]"
        else:
            raise MissingValueError(f"{what}: '[*]' is for for_each alone")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return "not JSON"


def describe(value: Any) -> str:
    """What kind of JSON value this is, for a message (never the value itself: it may be huge or hostile)."""
    return _kind(value)
