"""Readiness: ready only when every resource has started and the gateway is not draining."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Readiness:
    expected: list[str]
    started: set[str] = field(default_factory=set)
    draining: bool = False
    stopping: bool = False

    def mark_started(self, name: str) -> None:
        self.started.add(name)

    def mark_stopped(self, name: str) -> None:
        self.started.discard(name)

    @property
    def ready(self) -> bool:
        return not self.draining and not self.stopping and not self.missing()

    def missing(self) -> list[str]:
        return [name for name in self.expected if name not in self.started]

    def report(self) -> dict[str, object]:
        # Draining comes first, stopping (the lifespan closing resources) after it.
        if self.stopping:
            status = "stopping"
        elif self.draining:
            status = "draining"
        elif self.missing():
            status = "starting"
        else:
            status = "ready"
        return {"status": status, "not_ready": self.missing()}
