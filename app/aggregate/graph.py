"""The graph the references of one aggregate make, checked before anything is sent: every reference names a source
of the same aggregate that can return JSON, there is no cycle, and no chain is longer than limits.max_chain_depth.

Used for a client's request at planning (app/aggregate/plan.py: each problem a 422 error, located) and for the
composites of the configuration when it is loaded (app/settings: each problem a config error).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from app.aggregate.refs import EACH, BadReferenceError, Ref, Template, parse


@dataclass(frozen=True)
class Node:
    """One source as the graph sees it: its references (each with where it is written) and what it can answer."""

    refs: tuple[tuple[str, Ref], ...] = ()  # (location, reference)
    json: bool = True  # False for a HEAD: it never answers a body to refer to
    for_each: bool = False


@dataclass(frozen=True)
class Problem:
    loc: str
    msg: str
    type: str


@dataclass
class Graph:
    """The sources each source waits for, and the problems found. ``depth``: sources in the longest chain."""

    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    depth: int = 0


def check(nodes: Mapping[str, Node], *, max_depth: int) -> Graph:
    graph = Graph()
    for name, node in nodes.items():
        needs: list[str] = []
        for loc, ref in node.refs:
            if ref.source == EACH:
                if not node.for_each:
                    graph.problems.append(
                        Problem(loc, f"'${{{ref.text}}}' is for a source with for_each", "bad_reference")
                    )
                continue
            if ref.source not in nodes:
                msg = f"'${{{ref.text}}}' names no source of this aggregate ('{ref.source}')"
                graph.problems.append(Problem(loc, msg, "unknown_source"))
            elif not nodes[ref.source].json:
                msg = f"'${{{ref.text}}}': {ref.source} is a HEAD, which never answers a body to refer to"
                graph.problems.append(Problem(loc, msg, "reference_to_head"))
            elif ref.source not in needs:
                needs.append(ref.source)
        graph.needs[name] = tuple(needs)
    _cycles(graph, nodes)
    if not any(p.type == "cycle" for p in graph.problems):
        _depths(graph, nodes, max_depth)
    return graph


def _first_loc(nodes: Mapping[str, Node], source: str, target: str) -> str:
    return next(loc for loc, ref in nodes[source].refs if ref.source == target)


def _cycles(graph: Graph, nodes: Mapping[str, Node]) -> None:
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []
    seen: set[frozenset[str]] = set()

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for parent in graph.needs.get(name, ()):
            if state.get(parent) == 1:
                cycle = path[path.index(parent) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    # Named as the references go: each source refers to the next.
                    msg = f"references make a cycle: {' → '.join([*cycle, cycle[0]])}"
                    # Located where the first source named refers to the second.
                    loc = _first_loc(nodes, cycle[0], cycle[1] if len(cycle) > 1 else cycle[0])
                    graph.problems.append(Problem(loc, msg, "cycle"))
            elif parent not in state:
                visit(parent)
        path.pop()
        state[name] = 2

    for name in nodes:
        if name not in state:
            visit(name)


def _depths(graph: Graph, nodes: Mapping[str, Node], max_depth: int) -> None:
    depth: dict[str, int] = {}

    def of(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((of(parent) for parent in graph.needs[name]), default=0)
        return depth[name]

    for name in nodes:
        # Where a chain first goes over: the sources further down it are over for the same reason.
        if of(name) == max_depth + 1:
            parent = max(graph.needs[name], key=of)
            msg = f"{name} ends a chain of {of(name)} sources, over limits.max_chain_depth ({max_depth})"
            graph.problems.append(Problem(_first_loc(nodes, name, parent), msg, "chain_too_deep"))
    graph.depth = max(depth.values(), default=0)


def source_node(
    loc: str, texts: Mapping[str, str], *, for_each: str | None, json: bool = True
) -> tuple[Node, list[Problem]]:
    """The node of the source at ``loc`` whose texts (``{"path": ..., "params.user_id": ...}``) may hold
    references, and the problems in how they are written. ``for_each``: its for_each, if any."""
    refs: list[tuple[str, Ref]] = []
    problems: list[Problem] = []
    for where, value in texts.items():
        found, problem = template_refs(f"{loc}.{where}", value)
        refs.extend(found)
        if problem is not None:
            problems.append(problem)
    if for_each is not None:
        ref, problem = for_each_ref(f"{loc}.for_each", for_each)
        if problem is not None:
            problems.append(problem)
        elif ref is not None:
            refs.append((f"{loc}.for_each", ref))
    return Node(tuple(refs), json=json, for_each=for_each is not None), problems


def template_refs(loc: str, value: str) -> tuple[list[tuple[str, Ref]], Problem | None]:
    """The references in one text, or the problem with how they are written ([*] is for for_each alone)."""
    try:
        parsed = parse(value)
    except BadReferenceError as exc:
        return [], Problem(loc, str(exc), "bad_reference")
    if isinstance(parsed, str):
        return [], None
    for ref in parsed.refs:
        if ref.star is not None:
            return [], Problem(loc, f"'${{{ref.text}}}': '[*]' is for for_each alone", "bad_reference")
    return [(loc, ref) for ref in parsed.refs], None


def for_each_ref(loc: str, value: str) -> tuple[Ref | None, Problem | None]:
    """The one reference, with [*], that a for_each must be."""
    try:
        parsed = parse(value)
    except BadReferenceError as exc:
        return None, Problem(loc, str(exc), "bad_reference")
    whole = parsed.whole if isinstance(parsed, Template) else None
    if whole is None or whole.star is None or whole.source == EACH:
        msg = "for_each is one reference to a list, with '[*]' where its elements are: '${orders.data[*].id}'"
        return None, Problem(loc, msg, "bad_reference")
    return whole, None
