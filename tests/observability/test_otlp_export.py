"""Traces leave the process: a real `gateway serve`, configured by the standard OTEL_* variables alone, exports its
spans over OTLP/HTTP to a real receiver in this test (decoded with opentelemetry-proto), and its log lines carry
the same trace and span ids."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from tests.support.gateway import GatewayProcess, gateway_process
from tests.support.net import free_port
from tests.support.upstream import Behavior, UpstreamServer


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _values(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        assert isinstance(kv, KeyValue)
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field) if field else None
    return out


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1: decodes every export request and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.paths: list[str] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._received(self.path, self.headers.get("Content-Type", ""), body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    def _received(self, path: str, content_type: str, body: bytes) -> None:
        assert content_type == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            ReceivedSpan(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                attributes=_values(span.attributes),
                resource=_values(resource_spans.resource.attributes),
            )
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._cond:
            self.paths.append(path)
            self.spans.extend(spans)
            self._cond.notify_all()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 20) -> list[ReceivedSpan]:
        with self._cond:
            if not self._cond.wait_for(lambda: done(self.spans), timeout=timeout):
                raise AssertionError(f"spans not received within {timeout} s: {self.spans}")
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def log_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.stderr().splitlines() if line.startswith("{")]


def wait_for_line(gw: GatewayProcess, match: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in log_lines(gw) if match(line)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, gw.stderr()
        time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


def test_spans_reach_an_otlp_receiver_with_the_trace_id_of_the_log_lines(
    tmp_path: Path, upstream: UpstreamServer, receiver: OtlpReceiver
) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7}))
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[server]
drain_delay_s = 0
log_format = "json"
[compute]
enabled = false
[database]
startup_check = false
min_connections = 0
executor_threads = 1
[upstreams.users]
base_url = "{upstream.url}"
[queries.recent]
sql = "SELECT 1 AS one"
""")
    env = {
        # Nothing in the file: the standard variables alone switch tracing on and shape it.
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci,service.name=overridden,team=platform%20api",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms instead of 5 s
        # Nothing listens there: the query source fails, and the database pool logs a warning mid-request.
        "GATEWAY_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none",
    }
    body = {
        "sources": {"profile": {"upstream": "users", "path": "/users/7"}, "orders": {"query": "recent"}},
        "deadline_ms": 5000,
    }
    with gateway_process(config, tmp_path, env=env) as gw:
        request = urllib.request.Request(
            f"{gw.url}/aggregate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer = json.load(resp)
        assert answer["results"]["profile"]["ok"] is True
        assert answer["results"]["orders"]["error"]["type"] == "db_unavailable"

        access = wait_for_line(gw, lambda line: line.get("event") == "request" and line["route"] == "/aggregate")
        trace_id, span_id = access["trace_id"], access["span_id"]
        assert len(trace_id) == 32
        assert len(span_id) == 16
        # The per-source summary is on the same line.
        assert access["sources"]["profile"]["outcome"] == "ok"
        warning = wait_for_line(gw, lambda line: "cannot connect to the database" in line["msg"])
        assert warning["level"] == "warning"
        assert (warning["trace_id"], warning["span_id"]) == (trace_id, span_id), "a warning logged from a DB thread"
        # Lines written outside any request carry no trace.
        ready = wait_for_line(gw, lambda line: line.get("event") == "ready")
        assert "trace_id" not in ready

        spans = receiver.wait_for(lambda spans: {"source profile", "source orders"} <= {s.name for s in spans})
    assert set(receiver.paths) == {"/v1/traces"}
    (root,) = [s for s in spans if s.name == "POST /aggregate"]
    assert (root.trace_id, root.span_id) == (trace_id, span_id), "the log line names the request's span"
    assert root.attributes["http.route"] == "/aggregate"
    assert root.attributes["http.response.status_code"] == 200
    assert root.resource["service.name"] == "gateway-under-test"  # OTEL_SERVICE_NAME wins over the attribute
    assert root.resource["deployment.environment"] == "ci"
    assert root.resource["team"] == "platform api"
    for name, outcome in (("source profile", "ok"), ("source orders", "db_unavailable")):
        (source,) = [s for s in spans if s.name == name]
        assert source.trace_id == trace_id
        assert source.parent_span_id == span_id
        assert source.attributes["gateway.outcome"] == outcome
    # The upstream was called as part of the same trace.
    (call,) = upstream.requests
    assert call.headers["traceparent"].split("-")[1] == trace_id


def test_the_gateways_own_settings_win_over_otel_variables(tmp_path: Path, receiver: OtlpReceiver) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("""
[server]
drain_delay_s = 0
log_format = "json"
[compute]
enabled = false
[observability.tracing]
enabled = false
""")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with gateway_process(config, tmp_path, env=env) as gw:
        with pytest.raises(urllib.error.HTTPError) as refused:  # no CPU pool here: 503, logged all the same
            urllib.request.urlopen(f"{gw.url}/transform", timeout=10)
        refused.value.close()
        access = wait_for_line(gw, lambda line: line.get("event") == "request")
        # No span, yet the log line still has the trace id every upstream of this request would be sent.
        assert len(access["trace_id"]) == 32
    assert receiver.spans == []
