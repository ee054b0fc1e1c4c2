"""The standard OpenTelemetry variables, read once by ``load_settings()`` into ``[observability.tracing]``.

Each key the file and the ``GATEWAY_*`` variables leave unset takes its value from the standard variable, so a
collector's usual environment works unchanged while the gateway's own settings win where set:

    otlp_endpoint        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces
    enabled              true when an endpoint is known, unless OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none
    service_name         OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES
    sample_ratio,        OTEL_TRACES_SAMPLER (always_on, always_off, traceidratio and their parentbased_ forms)
      parent_based         with OTEL_TRACES_SAMPLER_ARG
    resource_attributes  OTEL_RESOURCE_ATTRIBUTES, under the configured ones

The exporter reads its own transport variables itself (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION,
_CERTIFICATE, and their _TRACES_ forms), as does the batch processor (OTEL_BSP_*).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from app.errors import ConfigError

# OTEL_TRACES_SAMPLER: (ratio, or None for OTEL_TRACES_SAMPLER_ARG; parent-based).
SAMPLERS: dict[str, tuple[float | None, bool]] = {
    "always_on": (1.0, False),
    "always_off": (0.0, False),
    "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True),
    "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def otel_updates(tracing: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """What the OTEL_* variables change in ``tracing`` (the [observability.tracing] settings; typed loosely so
    that this module imports nothing of app/settings.py, which calls it), where those settings are unset.

    Raises ConfigError naming each variable whose value cannot be used."""
    explicit = tracing.model_fields_set
    update: dict[str, Any] = {}
    problems: list[str] = []

    def get(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    if "otlp_endpoint" not in explicit:
        endpoint, var = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        if endpoint is None and (base := get("OTEL_EXPORTER_OTLP_ENDPOINT")) is not None:
            # The base endpoint gets the signal's path (OTLP exporter specification).
            endpoint, var = base.rstrip("/") + "/v1/traces", "OTEL_EXPORTER_OTLP_ENDPOINT"
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(f"{var}: must be an http:// or https:// URL")
            else:
                update["otlp_endpoint"] = endpoint
    for var in _PROTOCOLS:
        protocol = get(var)
        if protocol is not None and protocol != "http/protobuf":
            problems.append(f"{var}: the gateway exports over http/protobuf only (not {protocol})")
            break

    attributes, bad = _resource_attributes(get("OTEL_RESOURCE_ATTRIBUTES"))
    if bad:
        problems.append(f"OTEL_RESOURCE_ATTRIBUTES: not key=value: {', '.join(bad)}")
    if attributes:
        update["resource_attributes"] = {**attributes, **tracing.resource_attributes}
    if "service_name" not in explicit:
        name = get("OTEL_SERVICE_NAME") or attributes.get("service.name")
        if name:
            update["service_name"] = name

    sampler = get("OTEL_TRACES_SAMPLER")
    if sampler is not None:
        if sampler.lower() not in SAMPLERS:
            problems.append(f"OTEL_TRACES_SAMPLER: one of {', '.join(SAMPLERS)} (not {sampler})")
        else:
            ratio, parent_based = SAMPLERS[sampler.lower()]
            if ratio is None:
                ratio = _ratio(get("OTEL_TRACES_SAMPLER_ARG"), problems)
            if "sample_ratio" not in explicit and ratio is not None:
                update["sample_ratio"] = ratio
            if "parent_based" not in explicit:
                update["parent_based"] = parent_based

    if "enabled" not in explicit:
        exporters = {e.strip().lower() for e in (get("OTEL_TRACES_EXPORTER") or "otlp").split(",")}
        if exporters - {"otlp", "none"}:
            problems.append("OTEL_TRACES_EXPORTER: the gateway exports with otlp only (or none)")
        disabled = (get("OTEL_SDK_DISABLED") or "").lower() == "true" or exporters == {"none"}
        enabled = not disabled and update.get("otlp_endpoint", tracing.otlp_endpoint) is not None
        if enabled != tracing.enabled:
            update["enabled"] = enabled

    if problems:
        raise ConfigError(problems)
    return update


def _resource_attributes(raw: str | None) -> tuple[dict[str, str], list[str]]:
    """OTEL_RESOURCE_ATTRIBUTES: comma-separated key=value pairs, values percent-encoded (W3C Baggage style)."""
    attributes: dict[str, str] = {}
    bad: list[str] = []
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(item.strip())
            continue
        attributes[key.strip()] = unquote(value.strip())
    return attributes, bad


def _ratio(raw: str | None, problems: list[str]) -> float | None:
    if raw is None:
        return 1.0  # the specification's default for the ratio samplers
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        problems.append(f"OTEL_TRACES_SAMPLER_ARG: a number from 0 to 1 (not {raw})")
        return None
    return ratio
