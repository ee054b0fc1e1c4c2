"""The reference grammar (a path, never an expression) and the graph checks, on their own."""

from __future__ import annotations

from typing import Any

import pytest

from app.aggregate.graph import Node, check
from app.aggregate.refs import BadReferenceError, MissingValueError, Ref, Template, lookup, parse


def test_text_without_references_is_kept_as_it_is() -> None:
    assert parse("/users/7") == "/users/7"
    assert parse("cost: $5 {x}") == "cost: $5 {x}"
    assert parse("$${literal}") == "${literal}"


@pytest.mark.parametrize(
    ("text", "source", "steps"),
    [
        ("${profile.data}", "profile", ()),
        ("${profile.data.org_id}", "profile", ("org_id",)),
        ("${orders.data[0].id}", "orders", (0, "id")),
        ("${orders.data[-1].id}", "orders", (-1, "id")),
        ('${page.data["odd key.with dots"]}', "page", ("odd key.with dots",)),
        ("${orders.data[*].id}", "orders", (None, "id")),
        ("${each}", "each", ()),
        ("${each.sku}", "each", ("sku",)),
        ("${my-source_2.data.a-b}", "my-source_2", ("a-b",)),
    ],
)
def test_a_whole_reference(text: str, source: str, steps: tuple[Any, ...]) -> None:
    parsed = parse(text)
    assert isinstance(parsed, Template)
    assert parsed.whole == Ref(source, steps, text[2:-1])


def test_references_inside_text() -> None:
    parsed = parse("/orgs/${p.data.org}/users/${p.data.id}.json")
    assert isinstance(parsed, Template)
    assert parsed.whole is None
    assert [p if isinstance(p, str) else p.text for p in parsed.parts] == [
        "/orgs/",
        "p.data.org",
        "/users/",
        "p.data.id",
        ".json",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "${}",
        "${profile}",  # no data
        "${profile.status}",
        "${profile.data.}",
        "${profile.data[x]}",
        "${profile.data['x']}",
        "${profile.data.a + 1}",
        "${profile.data.a()}",
        "${__import__('os').data}",
        "${profile.data[*][*]}",
        "${1abc.data}",
        "/x/${profile.data.a",
    ],
)
def test_anything_but_a_path_is_refused(text: str) -> None:
    with pytest.raises(BadReferenceError):
        parse(text)


def test_lookup_follows_keys_and_indexes_and_says_where_it_stopped() -> None:
    data = {"a": [{"b": 1}, {"b": 2}]}
    assert lookup(data, ("a", -1, "b"), what="s.data") == 2
    with pytest.raises(MissingValueError, match=r"s\.data\.a has 2 elements: no \[5\]"):
        lookup(data, ("a", 5), what="s.data")
    with pytest.raises(MissingValueError, match=r"s\.data\.a\[0\] has no key 'c'"):
        lookup(data, ("a", 0, "c"), what="s.data")
    with pytest.raises(MissingValueError, match="is a string, not an object"):
        lookup("text", ("a",), what="s.data")


def node(*refs: str, json: bool = True) -> Node:
    found = []
    for text in refs:
        parsed = parse(text)
        assert isinstance(parsed, Template)
        found += [(f"at.{text}", ref) for ref in parsed.refs]
    return Node(tuple(found), json=json)


def test_the_graph_gives_each_source_what_it_waits_for() -> None:
    graph = check(
        {"a": node(), "b": node("${a.data.x}", "${a.data.y}"), "c": node("${a.data.x}${b.data.z}")}, max_depth=4
    )
    assert graph.problems == []
    assert graph.needs == {"a": (), "b": ("a",), "c": ("a", "b")}
    assert graph.depth == 3


def test_a_longer_cycle_is_named_once() -> None:
    graph = check({"a": node("${c.data}"), "b": node("${a.data}"), "c": node("${b.data}")}, max_depth=4)
    assert [(p.type, p.msg) for p in graph.problems] == [("cycle", "references make a cycle: a → c → b → a")]
