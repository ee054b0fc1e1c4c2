"""Every deployment validator accepts the project's files and rejects a deliberately broken copy of them.

The broken copies differ from the real files by one small, realistic mistake each, so a validator that passes
the real file and fails the copy is shown to be checking, not just running.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from scripts import deploy_sync
from scripts import validate_deploy as v
from scripts.kustomize_render import render

ROOT = v.ROOT


def broken_copy(src: Path, dest: Path, old: str, new: str) -> Path:
    """A copy of ``src`` at ``dest`` with one occurrence of ``old`` replaced by ``new``."""
    text = src.read_text()
    assert old in text, f"{old!r} not in {src}: the test no longer breaks anything"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text.replace(old, new, 1))
    return dest


def assert_rejects(result: v.Result, *fragments: str) -> None:
    assert not result.ok, f"the broken copy passed:\n{result.output}"
    for fragment in fragments:
        assert fragment in result.output, result.output


def assert_accepts(result: v.Result) -> None:
    assert result.ok, result.output


# --- yamllint ---


def test_yamllint_accepts_every_yaml_file() -> None:
    files = v.yaml_files()
    assert ROOT / "docker-compose.yml" in files
    assert ROOT / "deploy/kubernetes/base/deployment.yaml" in files
    assert_accepts(v.yamllint(files))


def test_yamllint_rejects_a_duplicate_key_and_bad_indentation(tmp_path: Path) -> None:
    dup = broken_copy(
        ROOT / "deploy/kubernetes/base/service.yaml",
        tmp_path / "service.yaml",
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  type: NodePort\n",
    )
    assert_rejects(v.yamllint([dup]), "duplication of key")
    indent = broken_copy(
        ROOT / "deploy/compose/prometheus.yml",
        tmp_path / "prometheus.yml",
        "  scrape_interval: 15s",
        "   scrape_interval: 15s",
    )
    assert_rejects(v.yamllint([indent]))


# --- hadolint ---


def test_hadolint_accepts_the_dockerfile() -> None:
    assert_accepts(v.hadolint())


def test_hadolint_rejects_an_error_level_mistake(tmp_path: Path) -> None:
    # DL3000 (error): a relative WORKDIR depends on whatever the base image's directory was.
    bad = broken_copy(ROOT / "Dockerfile", tmp_path / "Dockerfile", "WORKDIR /src", "WORKDIR src")
    assert_rejects(v.hadolint(bad), "DL3000")


# --- compose ---


def compose_copy(tmp_path: Path, old: str, new: str) -> Path:
    # In the project root's place, so that the relative bind-mount paths still resolve.
    dest = broken_copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml", old, new)
    for rel in ("deploy", "app"):
        (tmp_path / rel).symlink_to(ROOT / rel)
    return dest


def test_compose_validators_accept_the_compose_file() -> None:
    assert_accepts(v.compose_schema())
    assert_accepts(v.compose_config())


def test_compose_schema_rejects_an_unknown_depends_on_condition(tmp_path: Path) -> None:
    bad = compose_copy(tmp_path, "condition: service_healthy", "condition: service_ready")
    assert_rejects(v.compose_schema(bad), "service_ready")
    assert_rejects(v.compose_config(bad))


def test_compose_config_rejects_a_dependency_on_a_missing_service(tmp_path: Path) -> None:
    # Valid against the schema; only Compose itself knows that the service does not exist.
    bad = compose_copy(
        tmp_path, "      users:\n        condition: service_healthy", "      user:\n        condition: service_healthy"
    )
    assert_accepts(v.compose_schema(bad))
    assert_rejects(v.compose_config(bad), "user")


# --- Kubernetes ---


def rendered(overlay: str = "overlays/production") -> list[dict[str, object]]:
    return render(v.KUSTOMIZATIONS / overlay)


def test_kubernetes_validators_accept_every_kustomization() -> None:
    result = v.kubernetes()
    assert_accepts(result)
    assert "passed for resource deployment/gateway" in result.output


def mutate(
    docs: list[dict[str, object]], kind: str, change: Callable[[dict[str, object]], None]
) -> list[dict[str, object]]:
    target = next(d for d in docs if d["kind"] == kind)
    change(target)
    return docs


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    def typo(deployment: dict[str, object]) -> None:
        container = deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
        container["readinesProbes"] = container.pop("readinessProbe")

    assert_rejects(v.kubernetes_manifests(mutate(rendered(), "Deployment", typo)), "readinesProbes")


def test_kubernetes_validate_rejects_a_wrong_type() -> None:
    def wrong(pdb: dict[str, object]) -> None:
        pdb["spec"]["maxUnavailable"] = True  # type: ignore[index]

    assert_rejects(v.kubernetes_manifests(mutate(rendered(), "PodDisruptionBudget", wrong)))


def test_kubernetes_validate_rejects_an_api_version_it_does_not_know() -> None:
    def wrong(hpa: dict[str, object]) -> None:
        hpa["apiVersion"] = "autoscaling/v3"

    assert_rejects(v.kubernetes_manifests(mutate(rendered(), "HorizontalPodAutoscaler", wrong)), "Couldn't find schema")


def test_custom_resource_schemas_reject_a_misspelt_field() -> None:
    def typo(monitor: dict[str, object]) -> None:
        endpoint = monitor["spec"]["endpoints"][0]  # type: ignore[index]
        endpoint["intervall"] = endpoint.pop("interval")

    assert_rejects(v.kubernetes_manifests(mutate(rendered(), "ServiceMonitor", typo)), "intervall")


def test_custom_resource_schemas_reject_a_bad_duration() -> None:
    def bad(rule: dict[str, object]) -> None:
        rule["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"  # type: ignore[index]

    assert_rejects(v.kubernetes_manifests(mutate(rendered(), "PrometheusRule", bad)), "5 minutes")


def test_kubernetes_check_rejects_a_kustomization_that_does_not_render(tmp_path: Path) -> None:
    shutil.copytree(v.KUSTOMIZATIONS, tmp_path / "kubernetes")
    broken_copy(
        tmp_path / "kubernetes/overlays/production/kustomization.yaml",
        tmp_path / "kubernetes/overlays/production/kustomization.yaml",
        "  - path: hpa-patch.yaml",
        "  - path: missing-patch.yaml",
    )
    assert_rejects(v.kubernetes(tmp_path / "kubernetes"), "missing-patch.yaml")


# --- promtool ---


def test_promtool_accepts_the_rules_their_tests_and_every_query() -> None:
    assert_accepts(v.promtool_check_rules())
    assert_accepts(v.promtool_test_rules())
    assert_accepts(v.prometheus_rules_in_manifests())
    assert_accepts(v.dashboard_promql())
    assert_accepts(v.adapter_promql())


def test_promtool_check_rules_rejects_broken_promql(tmp_path: Path) -> None:
    bad = broken_copy(
        v.ALERTS,
        tmp_path / "alerts.yml",
        "rate(gateway_event_loop_lag_seconds_bucket[5m])",
        "rate(gateway_event_loop_lag_seconds_bucket[5m]",
    )
    assert_rejects(v.promtool_check_rules(bad), "parse error")


def test_promtool_test_rules_fails_when_an_alert_no_longer_fires(tmp_path: Path) -> None:
    # The unit tests catch a threshold that drifted: loop lag at 250 ms no longer crosses 500 ms.
    broken_copy(v.ALERTS, tmp_path / "alerts.yml", "[5m])) > 0.1", "[5m])) > 0.5")
    shutil.copy(v.ALERTS_TEST, tmp_path / "alerts_test.yml")
    assert_rejects(v.promtool_test_rules(tmp_path / "alerts_test.yml"), "GatewayEventLoopLagHigh")


def test_dashboard_check_rejects_a_broken_query_and_an_unknown_variable(tmp_path: Path) -> None:
    dashboard = json.loads(v.DASHBOARD.read_text())
    panel = next(p for p in dashboard["panels"] if p.get("targets"))
    panel["targets"][0]["expr"] = "sum by (route) (rate(gateway_http_requests_total[$__rate_interval])"
    bad = tmp_path / "dashboard.json"
    bad.write_text(json.dumps(dashboard))
    assert_rejects(v.dashboard_promql(bad), panel["title"])
    panel["targets"][0]["expr"] = "sum(rate(gateway_http_requests_total{route=~'$route'}[5m]))"
    bad.write_text(json.dumps(dashboard))
    assert_rejects(v.dashboard_promql(bad), "$route")


def test_adapter_check_rejects_a_broken_metrics_query(tmp_path: Path) -> None:
    bad = broken_copy(v.ADAPTER_VALUES, tmp_path / "values.yaml", "max by (<<.GroupBy>>)", "max by <<.GroupBy>>")
    assert_rejects(v.adapter_promql(bad))


def test_prometheusrule_check_rejects_broken_promql_in_the_manifest(tmp_path: Path) -> None:
    shutil.copytree(v.KUSTOMIZATIONS, tmp_path / "kubernetes")
    rule = tmp_path / "kubernetes/monitoring/prometheusrule.yaml"
    broken_copy(rule, rule, "gateway_upstream_breaker_state[1m]) == 2", "gateway_upstream_breaker_state[1m]) === 2")
    assert_rejects(v.prometheus_rules_in_manifests(tmp_path / "kubernetes"))


# --- generated files ---


def test_generated_files_match_their_sources() -> None:
    assert_accepts(v.generated_files())


def test_generated_files_check_notices_a_stale_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale_rule = broken_copy(deploy_sync.PROMETHEUS_RULE, tmp_path / "prometheusrule.yaml", "for: 5m", "for: 10m")
    monkeypatch.setattr(deploy_sync, "PROMETHEUS_RULE", stale_rule)
    assert_rejects(v.generated_files(), "prometheusrule.yaml")


def test_the_prometheusrule_carries_exactly_the_alert_rules() -> None:
    rule = yaml.safe_load(deploy_sync.PROMETHEUS_RULE.read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(v.ALERTS.read_text())["groups"]
    dashboard = yaml.safe_load(deploy_sync.DASHBOARD_CONFIGMAP.read_text())
    assert json.loads(dashboard["data"]["gateway-dashboard.json"]) == json.loads(v.DASHBOARD.read_text())


# --- the command itself ---


def test_every_check_is_wired_into_the_command() -> None:
    assert set(v.CHECKS) == {
        "yamllint",
        "hadolint",
        "compose-schema",
        "compose-config",
        "generated-files",
        "kubernetes",
        "promtool-check-rules",
        "promtool-test-rules",
        "prometheusrule-promql",
        "dashboard-promql",
        "adapter-promql",
    }
    assert v.main(["hadolint", "promtool-test-rules"]) == 0
