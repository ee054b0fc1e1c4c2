"""A real Prometheus for the tests: the server binary from Debian's package (scripts/install-promtool.sh), run on
loopback in a temporary directory, and a small client for its HTTP API.

The rules it loads are the shipped deploy/prometheus/alerts.yml passed through ``shorten()``, which divides every
duration in them by one factor and changes nothing else. See its docstring for why range windows shrink too.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from scripts.validate_deploy import tool
from tests.support.gateway import wait_http_ok
from tests.support.net import free_port

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
# A range selector's window, or a subquery's window and resolution: [5m], [5m:30s], [5m:].
RANGE = re.compile(r"\[(\d+(?:ms|s|m|h|d|w))(?::(\d+(?:ms|s|m|h|d|w))?)?\]")


def seconds(duration: str) -> float:
    """A single-unit Prometheus duration ("5m", "500ms") in seconds; ValueError for anything else ("1h30m")."""
    match = _DURATION.fullmatch(duration)
    if match is None:
        raise ValueError(f"not a single-unit duration: {duration!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _duration(value: float) -> str:
    millis = round(value * 1000)
    if millis <= 0:
        raise ValueError(f"{value} s shortens to nothing")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def shorten(rules_text: str, factor: int) -> str:
    """The rule file with every duration divided by ``factor``, and nothing else changed.

    Two kinds of duration, both divided by the same factor:
    - each rule's ``for:``, so that an alert fires in seconds instead of minutes;
    - each range window in an expression (``[5m]``, a subquery's ``[5m:1m]``), so that the rule keeps the same
      relation between its window and its ``for:`` (a 5-minute ratio behind a 2-minute ``for:`` stays a window
      2.5 times the ``for:``), and so that an alert resolves within the test: the window is what holds a
      finished outage's failures, and resolution waits for it to empty.
    Thresholds, labels, annotations, matchers and the expressions' structure are untouched. With 1 s scrapes and a
    factor of 20, a shortened window holds as many samples as the real one does at a 20 s scrape interval. An
    ``offset`` or a multi-unit duration ("1h30m") is refused rather than silently left long.
    """

    def scaled(duration: str) -> str:
        return _duration(seconds(duration) / factor)

    def scale_range(match: re.Match[str]) -> str:
        window, step = match.group(1), match.group(2)
        if ":" not in match.group(0):
            return f"[{scaled(window)}]"
        return f"[{scaled(window)}:{scaled(step) if step else ''}]"

    doc = yaml.safe_load(rules_text)
    for group in doc["groups"]:
        if "interval" in group:
            group["interval"] = scaled(group["interval"])
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = scaled(rule["for"])
            expr = str(rule["expr"])
            if re.search(r"\boffset\b", expr):
                raise ValueError(f"shorten() does not handle offset: {expr}")
            rule["expr"] = RANGE.sub(scale_range, expr)
    return str(yaml.safe_dump(doc, sort_keys=False, width=1000))


def alert_rule(rules_text: str, name: str) -> dict[str, Any]:
    for group in yaml.safe_load(rules_text)["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return dict(rule)
    raise KeyError(f"no alert {name} in the rules")


def for_seconds(rule: dict[str, Any]) -> float:
    return seconds(rule["for"]) if "for" in rule else 0.0


def window_seconds(rule: dict[str, Any]) -> float:
    """The longest range window the rule's expression reads (0 for an instant expression)."""
    return max((seconds(m.group(1)) for m in RANGE.finditer(str(rule["expr"]))), default=0.0)


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    log: Path


@contextlib.contextmanager
def prometheus_server(workdir: Path, rules_text: str, jobs: dict[str, str]) -> Iterator[PrometheusServer]:
    """Prometheus on a free loopback port, scraping each job's one target (host:port) every second and evaluating
    ``rules_text`` every second; its database in ``workdir``. Stopped (SIGTERM, then SIGKILL) on exit."""
    rules = workdir / "rules.yml"
    rules.write_text(rules_text)
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in jobs.items()
                ],
            }
        )
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", log)
    try:
        wait_http_ok(f"{server.url}/-/ready", proc=proc)
        yield server
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Alert:
    name: str
    state: str  # pending or firing
    labels: dict[str, str]

    def matches(self, name: str, labels: dict[str, str]) -> bool:
        return self.name == name and all(self.labels.get(k) == v for k, v in labels.items())


class PrometheusApi:
    """Prometheus' HTTP API: instant queries and the active alerts."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._session = session

    async def _get(self, path: str, **params: str) -> Any:
        async with self._session.get(f"{self.url}{path}", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/query", query=expr)
        return list(data["result"])

    async def alerts(self) -> list[Alert]:
        data = await self._get("/api/v1/alerts")
        return [Alert(a["labels"]["alertname"], a["state"], dict(a["labels"])) for a in data["alerts"]]


@dataclass
class AlertLog:
    """Every answer of /api/v1/alerts, polled a few times per evaluation interval, with when it came."""

    samples: list[tuple[float, list[Alert]]] = field(default_factory=list)

    def add(self, alerts: list[Alert]) -> None:
        self.samples.append((time.monotonic(), alerts))

    def first(self, name: str, labels: dict[str, str], state: str = "firing", *, after: float = 0.0) -> float | None:
        """When the alert was first seen in ``state`` after ``after``."""
        for at, alerts in self.samples:
            if at >= after and any(a.matches(name, labels) and a.state == state for a in alerts):
                return at
        return None

    def gone(self, name: str, labels: dict[str, str], *, after: float) -> float | None:
        """When the alert was first seen neither pending nor firing after ``after``."""
        for at, alerts in self.samples:
            if at >= after and not any(a.matches(name, labels) for a in alerts):
                return at
        return None

    def not_firing_between(self, name: str, labels: dict[str, str], start: float, end: float) -> list[float]:
        """The polls between ``start`` and ``end`` that did not see the alert firing."""
        return [
            at
            for at, alerts in self.samples
            if start <= at <= end and not any(a.matches(name, labels) and a.state == "firing" for a in alerts)
        ]

    def active(self, where: Callable[[Alert], bool], start: float = 0.0, end: float = float("inf")) -> set[str]:
        """Alerts pending or firing between ``start`` and ``end`` that ``where`` selects, as readable strings."""
        return {
            f"{a.name} {a.state} {a.labels}"
            for at, alerts in self.samples
            if start <= at <= end
            for a in alerts
            if where(a)
        }
