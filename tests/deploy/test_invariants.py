"""Cross-file invariants: the deployment files agree with each other and with the gateway itself.

Each Kubernetes invariant holds for the base and for every overlay, as rendered (patches applied), so an overlay
that raises the CPU limit without the pool size, or the drain without the grace period, fails here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from app.cli import _parser
from app.errors import ConfigError
from app.main import create_app
from app.security.guard import build_rate_limiter
from app.security.keys import hash_key
from app.security.redis_ratelimit import RedisRateLimiter
from app.settings import Settings, load_settings
from tests.deploy.manifests import (
    COMPOSE_CONFIG,
    DOCKERFILE,
    OVERLAYS,
    MiB,
    Rendered,
    alert_rules,
    compose,
    compose_bytes,
    compose_seconds,
    contract,
    contract_name,
    cpu_limit_cores,
    dockerfile_stages,
    exec_form,
    expressions_used,
    final_stage,
    metric_names,
    metrics_used,
    quantity,
    rendered,
)
from tests.support.gateway import make_settings, running_gateway

GATEWAY = str(Path(sys.executable).parent / "gateway")
DUMMY_DSN = "postgresql://gateway@db.invalid:5432/gateway"
DUMMY_REDIS_URL = "redis://:password@redis.invalid:6379/0"
# What the Secret's api-keys entry holds: hashes only (this one is the hash of a throwaway test key).
DUMMY_KEYS = '[{"name": "ops", "hash": "sha256:' + "ab" * 32 + '", "scopes": ["aggregate", "transform", "metrics"]}]'
# Budget (docs/deploy.md), measured: the main process idles at about 85 MB RSS and a worker at about 35 MB.
MAIN_PROCESS_BUDGET = 256 * MiB
WORKER_BUDGET = 128 * MiB
HEADROOM = 128 * MiB
# After drain_delay_s + drain_timeout_s the gateway still stops its workers and closes its pools.
SHUTDOWN_MARGIN_S = 10


@pytest.fixture(params=OVERLAYS)
def k8s(request: pytest.FixtureRequest) -> Rendered:
    return rendered(request.param)


def app_paths() -> set[str]:
    """Paths the app answers GET on (from its own route table, as published in its OpenAPI document)."""
    paths = create_app(make_settings()).openapi()["paths"]
    return {path for path, methods in paths.items() if "get" in methods}


def effective_settings(
    config_text: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings a pod or container gets: its config file under the environment it sets."""
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in {**secret_values(), **env}.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "gateway.toml"
    path.write_text(config_text)
    try:
        return load_settings(path)
    except ConfigError as exc:
        pytest.fail(f"config does not load: {exc.problems}")


def secret_values() -> dict[str, str]:
    """What the Secret gateway-secrets holds (docs/deploy.md), as the variables the Deployment maps it to."""
    return {
        "GATEWAY_DATABASE_URL": DUMMY_DSN,
        "GATEWAY_AUTH__KEYS": DUMMY_KEYS,
        "GATEWAY_RATE_LIMIT__REDIS_URL": DUMMY_REDIS_URL,
    }


def k8s_settings(k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    return effective_settings(k8s.config_toml(), k8s.env_literals(), tmp_path, monkeypatch)


def compose_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    env = {k: str(v) for k, v in compose()["services"]["gateway"]["environment"].items() if k != "GATEWAY_DATABASE_URL"}
    return effective_settings(COMPOSE_CONFIG.read_text(), env, tmp_path, monkeypatch)


# --- probes, paths and ports ---


def test_probes_hit_real_endpoints_on_the_served_port(
    k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    paths = app_paths()
    container = k8s.container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.server.port, "admin": settings.observability.admin_port}
    assert settings.server.host == "0.0.0.0"
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in paths
        assert ports[probe["port"]] == settings.server.port


def test_service_and_service_monitor_reach_the_container_port() -> None:
    k8s = rendered("overlays/production")  # the overlay with both the gateway and its monitoring
    service = k8s.one("Service", "gateway")
    container_ports = {p["name"] for p in k8s.container["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} <= container_ports
    monitor = k8s.one("ServiceMonitor", "gateway")
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] in app_paths()
        assert compose_seconds(endpoint["scrapeTimeout"]) < compose_seconds(endpoint["interval"])


def test_image_and_compose_check_real_endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = final_stage()
    settings = compose_settings(tmp_path, monkeypatch)
    assert stage["EXPOSE"] == [str(settings.server.port)]
    assert "GATEWAY_SERVER__PORT=8080" in stage["ENV"][0].replace(" ", "")
    assert "/healthz" in stage["HEALTHCHECK"][0]
    gateway = compose()["services"]["gateway"]
    check = " ".join(gateway["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.server.port}/readyz" in check
    assert "/readyz" in app_paths()
    assert f"127.0.0.1:{settings.server.port}" in " ".join(gateway["ports"])


async def test_every_probed_path_answers_200_from_the_running_gateway() -> None:
    probed = {"/healthz", "/readyz", "/metrics"}
    for overlay in OVERLAYS:
        container = rendered(overlay).container
        probed |= {container[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    probed |= {e["path"] for e in rendered("monitoring").one("ServiceMonitor", "gateway")["spec"]["endpoints"]}
    assert probed <= app_paths()
    async with running_gateway(make_settings()) as gw, aiohttp.ClientSession() as client:
        for path in sorted(probed):
            async with client.get(f"{gw.url}{path}") as resp:
                assert resp.status == 200, path


# --- drain and grace period ---


def test_grace_period_covers_the_drain(k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = k8s_settings(k8s, tmp_path, monkeypatch).server
    grace = k8s.pod["terminationGracePeriodSeconds"]
    assert grace >= server.drain_delay_s + server.drain_timeout_s + SHUTDOWN_MARGIN_S
    # The delay is what covers endpoint propagation: it must be there, since no preStop hook sleeps instead.
    assert server.drain_delay_s >= 5
    assert "lifecycle" not in k8s.container


def test_work_admitted_before_a_drain_finishes_within_it(
    k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    assert settings.limits.max_deadline_ms / 1000 <= settings.server.drain_timeout_s
    assert settings.compute.job_timeout_s <= settings.server.drain_timeout_s


def test_compose_stop_grace_period_covers_the_drain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = compose_settings(tmp_path, monkeypatch).server
    grace = compose_seconds(compose()["services"]["gateway"]["stop_grace_period"])
    assert grace > server.drain_delay_s + server.drain_timeout_s + 5
    assert compose()["services"]["gateway"]["stop_grace_period"] == "30s"


# --- configuration ---


def check_config(config_text: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text)
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    return subprocess.run(
        [GATEWAY, "check-config", str(path)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_configmap_passes_gateway_check_config(k8s: Rendered, tmp_path: Path) -> None:
    env = {**secret_values(), **k8s.env_literals()}
    result = check_config(k8s.config_toml(), env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout
    # The same file without the Secret's database URL is refused: the Secret reference is what makes it valid.
    env.pop("GATEWAY_DATABASE_URL")
    without_db = check_config(k8s.config_toml(), env, tmp_path)
    assert without_db.returncode == 2
    assert "GATEWAY_DATABASE_URL" in without_db.stderr


def test_compose_config_passes_gateway_check_config(tmp_path: Path) -> None:
    env = {k: str(v) for k, v in compose()["services"]["gateway"]["environment"].items()}
    env["GATEWAY_DATABASE_URL"] = env["GATEWAY_DATABASE_URL"].replace("${GATEWAY_DB_PASSWORD:-gateway}", "gateway")
    result = check_config(COMPOSE_CONFIG.read_text(), env, tmp_path)
    assert result.returncode == 0, result.stderr


def test_secrets_are_referenced_never_committed(k8s: Rendered) -> None:
    assert not [d for d in k8s.docs if d["kind"] == "Secret"]
    env = {e["name"]: e for e in k8s.container["env"]}
    assert env["GATEWAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-secrets",
        "key": "database-url",
    }
    assert "database_url" not in k8s.config()
    assert "password" not in k8s.config_toml().lower()


def test_config_is_mounted_where_the_arguments_point(k8s: Rendered) -> None:
    args = _parser().parse_args(["serve", *k8s.container["args"]])
    mount = next(m for m in k8s.container["volumeMounts"] if m["name"] == "config")
    assert args.config == Path(mount["mountPath"]) / "gateway.toml"
    assert mount["readOnly"] is True


# --- the image ---


def test_image_entrypoint_runs_gateway_serve() -> None:
    stage = final_stage()
    entrypoint = exec_form(stage["ENTRYPOINT"][-1])
    assert entrypoint[:3] == ["/usr/bin/tini", "-s", "--"]
    assert entrypoint[3:] == ["gateway", "serve"]
    assert exec_form(stage["CMD"][-1]) == []
    assert stage["STOPSIGNAL"] == ["SIGTERM"]
    # `gateway` is the project's console script, and `serve` one of its commands.
    pyproject = tomllib.loads((DOCKERFILE.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["gateway"] == "app.cli:main"
    assert _parser().parse_args(["serve"]).command == "serve"
    # The compose service and the Deployment pass only arguments of `gateway serve`.
    compose_args = _parser().parse_args(["serve", *compose()["services"]["gateway"]["command"]])
    assert compose_args.config == Path("/etc/gateway/gateway.toml")


def test_image_can_export_traces_and_serve_its_docs() -> None:
    # What the image installs is the runtime lock (test above): the exporter and the docs assets must be in it.
    lock = (DOCKERFILE.parent / "requirements/runtime.txt").read_text()
    pinned = {line.split("==")[0] for line in lock.splitlines() if "==" in line and not line.startswith(" ")}
    assert {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "fastapi-offline"} <= pinned


def test_image_runs_as_the_user_kubernetes_expects(k8s: Rendered) -> None:
    user = final_stage()["USER"][-1]
    uid, _, gid = user.partition(":")
    pod_security = k8s.pod["securityContext"]
    assert (int(uid), int(gid)) == (pod_security["runAsUser"], pod_security["runAsGroup"])
    assert int(uid) != 0


def test_dockerfile_builds_from_the_lock_files_dependencies_first() -> None:
    build = [(i.keyword, i.args) for i in dockerfile_stages()[0]]
    copies = [args for keyword, args in build if keyword == "COPY"]
    assert copies[0].startswith("requirements/runtime.txt requirements/build.txt")
    runs = " ".join(args for keyword, args in build if keyword == "RUN")
    assert "--require-hashes -r requirements/runtime.txt" in runs
    assert "compileall" in runs
    assert build[0][1].startswith("${PYTHON_IMAGE}")


# --- sizing ---


def test_process_pool_follows_the_cpu_limit(k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    resources = k8s.container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS: requests equal limits"
    assert settings.compute.enabled
    assert settings.compute.workers == max(1, cpu_limit_cores(k8s.container) - 1)


def test_memory_limit_and_shm_cover_the_workers(k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    shm = k8s.volume("dshm")["emptyDir"]
    assert shm["medium"] == "Memory"
    shm_bytes = quantity(shm["sizeLimit"])
    jobs = settings.compute.workers + settings.compute.queue_limit
    assert shm_bytes >= 2 * jobs * 2 * settings.limits.max_body_bytes
    memory = quantity(k8s.container["resources"]["limits"]["memory"])
    assert memory >= MAIN_PROCESS_BUDGET + settings.compute.workers * WORKER_BUDGET + shm_bytes + HEADROOM
    mount = next(m for m in k8s.container["volumeMounts"] if m["name"] == "dshm")
    assert mount["mountPath"] == "/dev/shm"


def test_compose_sizes_follow_the_same_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compose_settings(tmp_path, monkeypatch)
    gateway = compose()["services"]["gateway"]
    assert settings.compute.workers == max(1, math.ceil(float(gateway["cpus"])) - 1)
    shm = compose_bytes(gateway["shm_size"])
    assert shm >= 2 * (settings.compute.workers + settings.compute.queue_limit) * 2 * settings.limits.max_body_bytes
    memory = compose_bytes(gateway["mem_limit"])
    assert memory >= MAIN_PROCESS_BUDGET + settings.compute.workers * WORKER_BUDGET + shm + HEADROOM


def test_database_connections_stay_within_budget(
    k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The HPA's ceiling times each pod's pool: what the database must allow (docs/deploy.md).
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    hpa = k8s.one("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["maxReplicas"] * settings.db_pool_size <= 200


# --- pod security and rollout ---


def test_pod_is_locked_down(k8s: Rendered) -> None:
    pod, container = k8s.pod, k8s.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # A Service named `gateway` would otherwise inject GATEWAY_* variables into the settings' namespace.
    assert pod["enableServiceLinks"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert len(pod["containers"]) == 1, "one gateway process per pod"
    # Every writable path is a volume: /tmp (the forkserver's socket) and /dev/shm.
    assert {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")} == {"/tmp", "/dev/shm"}


def test_rollout_never_drops_capacity_and_autoscaling_owns_replicas(k8s: Rendered) -> None:
    spec = k8s.deployment["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "replicas" not in spec
    hpa = k8s.one("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = k8s.one("PodDisruptionBudget", "gateway")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_autoscaler_metrics_are_served(k8s: Rendered) -> None:
    hpa = k8s.one("HorizontalPodAutoscaler", "gateway")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    custom = kinds["Pods"]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((DOCKERFILE.parent / "deploy/kubernetes/prometheus-adapter/values.yaml").read_text())
    rule = next(r for r in adapter["rules"]["custom"] if r["name"]["as"] == custom)
    series = rule["seriesQuery"].split("{")[0]
    assert series in {r.get("record") for r in alert_rules()}, "the adapter reads the recording rule"


def test_selectors_match_the_pods(k8s: Rendered) -> None:
    pod_labels = k8s.deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s.one("Service", "gateway")
    selectors: list[dict[str, Any]] = [
        service["spec"]["selector"],
        k8s.deployment["spec"]["selector"]["matchLabels"],
        k8s.one("PodDisruptionBudget", "gateway")["spec"]["selector"]["matchLabels"],
        k8s.one("NetworkPolicy", "gateway")["spec"]["podSelector"]["matchLabels"],
        *[c["labelSelector"]["matchLabels"] for c in k8s.pod["topologySpreadConstraints"]],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    monitor = rendered("monitoring").one("ServiceMonitor", "gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_network_policy_lets_the_gateway_reach_what_it_is_configured_for(
    k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    policy = k8s.one("NetworkPolicy", "gateway")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule.get("ports", [])}
    for name, upstream in settings.upstreams.items():
        for url in upstream.endpoints or [upstream.base_url]:  # what is dialled: each endpoint, when given
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            assert port in egress_ports, f"upstream {name} ({url}) is blocked by the NetworkPolicy"
    assert 5432 in egress_ports
    assert 53 in egress_ports
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["http", "admin"]
    (admin_rule,) = [rule for rule in policy["ingress"] if rule["ports"][0]["port"] == "admin"]
    assert admin_rule["from"], "the admin port must not be open to every pod"


def test_production_shares_rate_limits_through_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 to 20 replicas: per-pod buckets would multiply every key's limit by the pods up.
    production = rendered("overlays/production")
    assert production.one("HorizontalPodAutoscaler", "gateway")["spec"]["maxReplicas"] > 1
    settings = k8s_settings(production, tmp_path, monkeypatch)
    assert settings.rate_limit.enabled
    assert settings.auth.enabled
    assert settings.rate_limit.backend == "redis"
    limiter = build_rate_limiter(settings)
    assert isinstance(limiter, RedisRateLimiter)
    (url_var,) = [e for e in production.container["env"] if e["name"] == "GATEWAY_RATE_LIMIT__REDIS_URL"]
    assert url_var["valueFrom"]["secretKeyRef"] == {"name": "gateway-secrets", "key": "redis-url"}


def test_network_policy_lets_the_gateway_reach_redis(
    k8s: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = k8s_settings(k8s, tmp_path, monkeypatch)
    egress_ports = {p["port"] for rule in k8s.one("NetworkPolicy", "gateway")["spec"]["egress"] for p in rule["ports"]}
    if settings.rate_limit.backend == "redis":
        assert settings.rate_limit.redis_url is not None
        assert (urlsplit(settings.rate_limit.redis_url.get_secret_value()).port or 6379) in egress_ports


# --- compose ---


def test_compose_rate_limits_go_through_its_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert "ports" not in redis, "only the gateway reaches Redis"
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert services["gateway"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    settings = compose_settings(tmp_path, monkeypatch)
    limiter = build_rate_limiter(settings)
    assert isinstance(limiter, RedisRateLimiter), "authentication on and the redis backend: limits are shared"
    assert settings.rate_limit.redis_url is not None
    url = urlsplit(settings.rate_limit.redis_url.get_secret_value())
    assert (url.hostname, url.port) == ("redis", 6379)
    # The laptop key of the compose file (docs/deploy.md) is the one configured.
    monkeypatch.delenv("GATEWAY_AUTH__KEYS")
    keys = load_settings(tmp_path / "gateway.toml").auth.keys
    assert [k.hash for k in keys] == [hash_key("laptop-key-not-a-secret-6ZkQ2rVx9mWc")]


def test_compose_services_are_healthchecked_and_ordered() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "users", "inventory", "postgres", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["init"] is True, name
        check = service["healthcheck"]
        assert {"interval", "start_period", "timeout", "retries"} <= set(check), name
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"] == "service_healthy", name
    assert set(services["gateway"]["depends_on"]) == {"postgres", "redis", "users", "inventory"}
    assert "gateway" in services["prometheus"]["depends_on"]


def test_compose_wires_the_monitoring_files() -> None:
    services = compose()["services"]
    prometheus = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus/alerts.yml:" in prometheus
    grafana = " ".join(services["grafana"]["volumes"])
    assert "./deploy/grafana/gateway-dashboard.json:" in grafana
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in grafana
    postgres = " ".join(services["postgres"]["volumes"])
    assert "./app/demo/seed.sql:/docker-entrypoint-initdb.d/" in postgres
    gateway = services["gateway"]
    assert "./deploy/compose/gateway.toml:/etc/gateway/gateway.toml:ro" in gateway["volumes"]
    assert "GATEWAY_DATABASE_URL" in gateway["environment"]
    targets = yaml.safe_load((DOCKERFILE.parent / "deploy/compose/prometheus.yml").read_text())
    admin_port = compose_settings_port()
    assert targets["scrape_configs"][0]["static_configs"][0]["targets"] == [f"gateway:{admin_port}"]


def compose_settings_port() -> int:
    import tomllib

    data = tomllib.loads((DOCKERFILE.parent / "deploy/compose/gateway.toml").read_text())
    port: int = data["observability"]["admin_port"]
    return port


# --- metrics ---


def test_dashboard_and_alerts_read_only_contract_metrics() -> None:
    metrics = contract()
    unknown = {
        f"{where}: {name}"
        for where, expr in expressions_used().items()
        for name in metric_names(expr)
        if contract_name(name, metrics) is None
    }
    assert not unknown, "metrics not in docs/metrics.md:\n" + "\n".join(sorted(unknown))


def test_dashboard_shows_every_execution_model() -> None:
    used = {contract_name(name, contract()) for name in metrics_used()}
    required = {
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds",
        "gateway_event_loop_lag_seconds",
        "gateway_event_loop_lag_max_seconds",
        "gateway_cpu_pool_busy",
        "gateway_db_executor_busy",
        "gateway_cpu_pool_queued",
        "gateway_db_executor_queued",
        "gateway_cpu_pool_rejected_total",
        "gateway_db_executor_rejected_total",
        "gateway_http_requests_shed_total",
        "gateway_upstream_request_duration_seconds",
        "gateway_upstream_breaker_state",
        "gateway_db_pool_connections",
        "gateway_draining",
        "gateway_ready",
    }
    assert required <= used, sorted(required - used)


def test_every_alert_has_a_runbook_and_a_severity() -> None:
    alerts = [r for r in alert_rules() if "alert" in r]
    names = {a["alert"] for a in alerts}
    assert {
        "GatewayDown",
        "GatewayHttp5xxRatioHigh",
        "GatewayLatencyHigh",
        "GatewayAggregatePartialAnswers",
        "GatewayRequiredSourceFailing",
        "GatewayEventLoopLagHigh",
        "GatewayCpuPoolSaturated",
        "GatewayDbExecutorSaturated",
        "GatewayShedding",
        "GatewayUpstreamBreakerOpen",
        "GatewayUpstreamErrorRateHigh",
        "GatewayRateLimitBackendErrors",
        "GatewayCpuWorkerRestarts",
        "GatewayDrainOverrun",
    } <= names
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), alert["alert"]
    tested = yaml.safe_load((DOCKERFILE.parent / "deploy/prometheus/alerts_test.yml").read_text())
    covered = {case["alertname"] for test in tested["tests"] for case in test.get("alert_rule_test", [])}
    # Every alert has a promtool case, and each case has one where it fires (not only silences).
    assert covered == names
    firing = {
        case["alertname"] for test in tested["tests"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    assert firing == names
    recorded = {r["record"] for r in alert_rules() if "record" in r}
    expr_tested = {case["expr"] for test in tested["tests"] for case in test.get("promql_expr_test", [])}
    assert recorded <= expr_tested
