"""Trace context reaches every upstream; with OpenTelemetry, one span per request and one per source."""

from __future__ import annotations

import re

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.lifecycle.server import build_server
from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


async def test_traceparent_is_propagated_without_opentelemetry(upstream: UpstreamServer) -> None:
    upstream.set("/a", Behavior())
    upstream.set("/b", Behavior())
    settings = make_settings(upstreams={"u": upstream_cfg(upstream.url)})
    body = {"sources": {"a": {"upstream": "u", "path": "/a"}, "b": {"upstream": "u", "path": "/b"}}}
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/aggregate", json=body, headers={"traceparent": incoming}):
            pass
        async with client.post(f"{gw.url}/aggregate", json=body, headers={"traceparent": "garbage"}):
            pass
    parsed = [TRACEPARENT.match(r.headers["traceparent"]) for r in upstream.requests]
    assert all(parsed)
    first, second = parsed[:2], parsed[2:]
    assert {m.group(1) for m in first if m} == {"0af7651916cd43dd8448eb211c80319c"}
    assert {m.group(3) for m in first if m} == {"01"}
    assert len({m.group(2) for m in first if m}) == 2  # a span id per source
    (new_trace,) = {m.group(1) for m in second if m}  # one fresh trace for the whole request
    assert new_trace != "0af7651916cd43dd8448eb211c80319c"


async def test_opentelemetry_spans_per_request_and_source(upstream: UpstreamServer) -> None:
    upstream.set("/ok", Behavior())
    upstream.set("/down", Behavior(status=503))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(
        upstreams={"u": upstream_cfg(upstream.url, retry={"attempts": 2, "backoff_initial_ms": 1})}
    )
    server = build_server(settings, tracer_provider=provider)
    async with running_gateway(settings, server=server) as gw, aiohttp.ClientSession() as client:
        body = {"sources": {"ok": {"upstream": "u", "path": "/ok"}, "down": {"upstream": "u", "path": "/down"}}}
        async with client.post(f"{gw.url}/aggregate", json=body) as resp:
            assert resp.status == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request = spans["POST /aggregate"]
    ok, down = spans["source ok"], spans["source down"]
    assert ok.parent is not None
    assert ok.parent.span_id == request.context.span_id
    assert down.parent is not None
    assert down.parent.span_id == request.context.span_id
    assert ok.attributes["gateway.outcome"] == "ok"
    assert down.attributes["gateway.outcome"] == "upstream_status"
    assert down.attributes["gateway.attempts"] == 2
    assert request.attributes["http.response.status_code"] == 200
    # The upstream saw the source span as its parent.
    seen = {r.path: TRACEPARENT.match(r.headers["traceparent"]) for r in upstream.requests}
    match = seen["/ok"]
    assert match is not None
    assert match.group(1) == format(request.context.trace_id, "032x")
    assert match.group(2) == format(ok.context.span_id, "016x")
