"""Read the deployment files the way the platforms read them, for the cross-file invariant tests."""

from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from scripts.kustomize_render import render
from scripts.validate_deploy import ADAPTER_VALUES, ALERTS, DASHBOARD, KUSTOMIZATIONS, ROOT, dashboard_queries

Obj = dict[str, Any]
OVERLAYS = ["base", "overlays/production"]
METRICS_DOC = ROOT / "docs/metrics.md"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "deploy/compose/gateway.toml"
DOCKERFILE = ROOT / "Dockerfile"

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {
    None: 1,
    "m": 0.001,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
MiB = 2**20


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2", "1Gi") as a number (cores or bytes)."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"not a quantity: {value}")
    return float(match.group(1)) * _FACTORS[match.group(2)]


def compose_bytes(value: str | int) -> int:
    """A compose size ("256m", "1g", "512mb") in bytes."""
    match = re.match(r"^(\d+)([bkmg]?)b?$", str(value).lower())
    if match is None:
        raise ValueError(f"not a compose size: {value}")
    return int(match.group(1)) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)]


def compose_seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@dataclass(frozen=True)
class Rendered:
    name: str
    docs: list[Obj]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [d for d in self.docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> Obj:
        return self.one("Deployment", "gateway")

    @property
    def pod(self) -> Obj:
        return dict(self.deployment["spec"]["template"]["spec"])

    @property
    def container(self) -> Obj:
        containers = [c for c in self.pod["containers"] if c["name"] == "gateway"]
        assert len(containers) == 1
        return dict(containers[0])

    def env_literals(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.container.get("env", []) if "value" in e}

    def config_toml(self) -> str:
        volume = next(v for v in self.pod["volumes"] if v["name"] == "config")
        config_map = self.one("ConfigMap", volume["configMap"]["name"])
        return str(config_map["data"]["gateway.toml"])

    def config(self) -> Obj:
        return tomllib.loads(self.config_toml())

    def volume(self, name: str) -> Obj:
        return dict(next(v for v in self.pod["volumes"] if v["name"] == name))


@cache
def rendered(name: str) -> Rendered:
    return Rendered(name, render(KUSTOMIZATIONS / name))


def cpu_limit_cores(container: Obj) -> int:
    return math.ceil(quantity(container["resources"]["limits"]["cpu"]))


@dataclass(frozen=True)
class DockerInstruction:
    keyword: str
    args: str


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[DockerInstruction]]:
    """The Dockerfile's instructions, grouped by stage (continuation lines joined, comments dropped)."""
    stages: list[list[DockerInstruction]] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = logical.partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(DockerInstruction(keyword.upper(), args.strip()))
    return stages


def final_stage(path: Path = DOCKERFILE) -> dict[str, list[str]]:
    stage = dockerfile_stages(path)[-1]
    found: dict[str, list[str]] = {}
    for instruction in stage:
        found.setdefault(instruction.keyword, []).append(instruction.args)
    return found


def exec_form(args: str) -> list[str]:
    value = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert isinstance(value, list)
    return [str(v) for v in value]


def compose() -> Obj:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def contract() -> dict[str, str]:
    """docs/metrics.md: metric name -> type."""
    rows = re.findall(r"^\| `(gateway_\w+)` \| (\w+) \|", METRICS_DOC.read_text(), re.MULTILINE)
    assert rows, "no metrics found in docs/metrics.md"
    return dict(rows)


_METRIC = re.compile(r"(?<![\w:])gateway_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(expr: str) -> set[str]:
    """The gateway metrics a PromQL expression reads (recording-rule names like gateway:x:y are not metrics)."""
    return set(_METRIC.findall(expr))


def contract_name(sample_name: str, metrics: dict[str, str]) -> str | None:
    """The contract metric a sample name belongs to (a histogram's _bucket/_count/_sum included), or None."""
    if sample_name in metrics:
        return sample_name
    for suffix in HISTOGRAM_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and metrics.get(base) == "histogram":
            return base
    return None


def alert_rules() -> list[Obj]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def expressions_used() -> dict[str, str]:
    """Every PromQL expression of the alert rules, the dashboard and the adapter rule: where -> expression."""
    exprs = {}
    for rule in alert_rules():
        exprs[f"alerts.yml {rule.get('alert') or rule.get('record')}"] = str(rule["expr"])
    for index, (title, expr) in enumerate(dashboard_queries(json.loads(DASHBOARD.read_text()))):
        exprs[f"dashboard #{index} {title}"] = expr
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        exprs[f"adapter {rule['name']['as']}"] = rule["seriesQuery"]
    return exprs


def metrics_used() -> set[str]:
    """Sample names read by the dashboard and the alert rules."""
    names: set[str] = set()
    for expr in expressions_used().values():
        names |= metric_names(expr)
    return names
