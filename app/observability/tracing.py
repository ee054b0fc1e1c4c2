"""Trace context: W3C ``traceparent`` to every upstream call, always; OpenTelemetry spans when configured.

Without OpenTelemetry the gateway still propagates: an incoming ``traceparent`` keeps its trace id (a new one is made
when it is absent or malformed), and each source gets a span id of its own, so upstream logs of one request share a
trace id. With ``[observability.tracing] enabled = true`` (or an OTLP endpoint in the standard OTEL_* variables:
otel_env.py), there is a span per request and one per source, carrying the outcome and the attempts, exported over
OTLP/HTTP. Either way every log line written while a request is served carries its ``trace_id`` and ``span_id``
(``log_ids``), so that logs and traces join.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from app.concurrency import run_in_own_thread
from app.errors import StartupError
from app.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_STATE_KEY = "trace"
_random = random.Random()


def _incoming(scope: Scope) -> tuple[str, str]:
    """(trace id, flags) of this request, parsed once and kept in the request's state."""
    state = scope.setdefault("state", {})
    cached: tuple[str, str] | None = state.get(_STATE_KEY)
    if cached is not None:
        return cached
    raw = next((v for k, v in scope.get("headers", []) if k == b"traceparent"), b"").decode("latin-1").strip()
    match = _TRACEPARENT.match(raw)
    if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
        result = (match.group(1), match.group(3))
    else:
        result = (f"{_random.getrandbits(128) or 1:032x}", "00")
    state[_STATE_KEY] = result
    return result


class Tracing:
    def __init__(self, settings: TracingSettings, *, provider: TracerProvider | None = None) -> None:
        self._settings = settings
        self._provider = provider
        self._owns_provider = provider is None
        self._tracer: Tracer | None = None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    async def start(self) -> None:
        """Raises StartupError when tracing is enabled but the OpenTelemetry SDK is not installed."""
        if self._provider is None and not self._settings.enabled:
            return
        if self._provider is None:
            self._provider = _sdk_provider(self._settings)
        self._tracer = self._provider.get_tracer("gateway")

    async def aclose(self) -> None:
        provider = self._provider
        if provider is not None and self._owns_provider and hasattr(provider, "shutdown"):
            # Flushing exports is blocking network I/O.
            await run_in_own_thread(provider.shutdown, name="tracing-shutdown")

    @contextlib.contextmanager
    def request_span(self, scope: Scope, name: str) -> Iterator[Span | None]:
        if self._tracer is None:
            yield None
            return
        from opentelemetry import context, propagate, trace

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = propagate.extract(carrier)
        with self._tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER) as span:
            token = context.attach(trace.set_span_in_context(span))
            try:
                yield span
            finally:
                context.detach(token)

    @staticmethod
    def traceparent(scope: Scope) -> str:
        """Without OpenTelemetry: this request's trace id and a new span id, for one source's upstream call.

        Span ids need to be unique, not secret (OpenTelemetry's own SDK draws them from ``random`` too): no system
        call per source."""
        trace_id, flags = _incoming(scope)
        return f"00-{trace_id}-{_random.getrandbits(64) or 1:016x}-{flags}"

    @contextlib.contextmanager
    def source_span(self, scope: Scope, source: str, kind: str) -> Iterator[tuple[dict[str, str], Span | None]]:
        """A span for one source, and the headers that carry it to the upstream."""
        if self._tracer is None:
            yield {"traceparent": self.traceparent(scope)}, None
            return
        from opentelemetry import propagate, trace

        with self._tracer.start_as_current_span(
            f"source {source}", kind=trace.SpanKind.CLIENT, attributes={"gateway.source": source, "gateway.kind": kind}
        ) as span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            yield headers, span


def log_ids(scope: Scope, span: Span | None) -> tuple[str, str]:
    """(trace id, span id) for this request's log lines: the request span's, or without one the trace id the
    upstreams are sent and a span id of the request's own."""
    if span is not None:
        context = span.get_span_context()
        if context.is_valid:
            return f"{context.trace_id:032x}", f"{context.span_id:016x}"
    trace_id, _ = _incoming(scope)
    return trace_id, f"{_random.getrandbits(64) or 1:016x}"


def record_outcome(span: Span | None, outcome: str, attempts: int, extra: Mapping[str, Any] | None = None) -> None:
    if span is None:
        return
    span.set_attribute("gateway.outcome", outcome)
    span.set_attribute("gateway.attempts", attempts)
    for key, value in (extra or {}).items():
        span.set_attribute(key, value)
    if outcome != "ok":
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, outcome))


def _sdk_provider(settings: TracingSettings) -> TracerProvider:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise StartupError("tracing is enabled but the OpenTelemetry SDK is missing: reinstall the gateway") from exc
    ratio = TraceIdRatioBased(settings.sample_ratio)
    provider = SdkTracerProvider(
        resource=Resource.create({**settings.resource_attributes, "service.name": settings.service_name}),
        sampler=ParentBased(ratio) if settings.parent_based else ratio,
    )
    if settings.otlp_endpoint is not None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise StartupError("an OTLP endpoint is set but the exporter is missing: reinstall the gateway") from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    return provider
