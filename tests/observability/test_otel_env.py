"""The standard OTEL_* variables fill the tracing settings the file and GATEWAY_* leave unset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.observability.tracing import Tracing
from app.settings import TracingSettings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "GATEWAY_")):
            monkeypatch.delenv(name)


def tracing(tmp_path: Path, toml: str = "") -> TracingSettings:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    return load_settings(path).observability.tracing


def test_without_variables_tracing_stays_off(tmp_path: Path) -> None:
    assert tracing(tmp_path) == TracingSettings()


def test_the_standard_variables_configure_tracing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes, k8s.pod.name=gw-1,note=a%2Cb")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    got = tracing(tmp_path)
    assert got.enabled
    assert got.otlp_endpoint == "http://collector:4318/v1/traces"
    assert got.service_name == "from-attributes"
    assert got.resource_attributes == {"service.name": "from-attributes", "k8s.pod.name": "gw-1", "note": "a,b"}
    assert (got.sample_ratio, got.parent_based) == (0.25, False)

    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-service-name")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces.example:4318/custom")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    got = tracing(tmp_path)
    assert got.service_name == "from-service-name"
    assert got.otlp_endpoint == "https://traces.example:4318/custom"
    assert (got.sample_ratio, got.parent_based) == (0.0, True)


def test_the_gateways_own_settings_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "env-name")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=env,region=eu")
    got = tracing(
        tmp_path,
        """
[observability.tracing]
otlp_endpoint = "http://mine:4318/v1/traces"
service_name = "file-name"
sample_ratio = 0.5
resource_attributes = { team = "file" }
""",
    )
    assert got.otlp_endpoint == "http://mine:4318/v1/traces"
    assert got.service_name == "file-name"
    assert got.sample_ratio == 0.5
    assert got.parent_based is False  # not set by the file: the variable's sampler decides
    assert got.resource_attributes == {"team": "file", "region": "eu"}
    assert got.enabled
    monkeypatch.setenv("GATEWAY_OBSERVABILITY__TRACING__ENABLED", "false")
    assert not tracing(tmp_path).enabled
    monkeypatch.delenv("GATEWAY_OBSERVABILITY__TRACING__ENABLED")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing(tmp_path).enabled


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "collector:4318",
            "OTEL_EXPORTER_OTLP_ENDPOINT: must be an http:// or https://",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL: the gateway exports over http/protobuf"),
        ("OTEL_TRACES_SAMPLER", "jaeger_remote", "OTEL_TRACES_SAMPLER: one of always_on"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "OTEL_TRACES_EXPORTER: the gateway exports with otlp only"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team", "OTEL_RESOURCE_ATTRIBUTES: not key=value: team"),
    ],
)
def test_an_unusable_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        tracing(tmp_path)
    (reported,) = info.value.problems
    assert reported.startswith(problem)


def test_a_bad_sampler_argument_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "half")
    with pytest.raises(ConfigError) as info:
        tracing(tmp_path)
    assert info.value.problems == ["OTEL_TRACES_SAMPLER_ARG: a number from 0 to 1 (not half)"]


async def test_the_provider_follows_the_resolved_settings() -> None:
    settings = TracingSettings(
        enabled=True, service_name="svc", sample_ratio=0.5, parent_based=False, resource_attributes={"team": "t"}
    )
    tracer = Tracing(settings)
    await tracer.start()
    try:
        provider = tracer._provider
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "svc"  # type: ignore[attr-defined]
        assert provider.resource.attributes["team"] == "t"  # type: ignore[attr-defined]
        assert "TraceIdRatioBased{0.5}" in provider.sampler.get_description()  # type: ignore[attr-defined]
        assert "ParentBased" not in provider.sampler.get_description()  # type: ignore[attr-defined]
    finally:
        await tracer.aclose()
