"""The transform registry: the built-ins plus what third-party packages contribute.

Built-ins live in ``app.worker.transforms`` (and the gateway's internal ``json_digest``); other packages add
theirs through the ``gateway.transforms`` entry-point group, each entry naming a ``TransformSpec`` object::

    [project.entry-points."gateway.transforms"]
    moving_average = "acme_transforms:MOVING_AVERAGE"

The gateway discovers entry points once, at start-up, and hands their ``module:attr`` references to its workers,
which import exactly those: both sides always agree on the set.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterator, Mapping
from typing import Any

from app.worker.jsondigest import JSON_DIGEST
from app.worker.spec import TransformDefinitionError, TransformSpec
from app.worker.transforms import BUILTINS

ENTRY_POINT_GROUP = "gateway.transforms"


class Registry(Mapping[str, TransformSpec]):
    """Transforms by name, and the entry-point references a worker needs to load the same set."""

    def __init__(self, specs: list[TransformSpec], plugin_refs: list[tuple[str, str]]) -> None:
        self._specs: dict[str, TransformSpec] = {}
        for spec in specs:
            spec.validate_definition()
            if spec.name in self._specs:
                raise TransformDefinitionError(f"two transforms are named {spec.name!r}")
            self._specs[spec.name] = spec
        self.plugin_refs = list(plugin_refs)

    def __getitem__(self, name: str) -> TransformSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def builtin_specs() -> list[TransformSpec]:
    return [*BUILTINS, JSON_DIGEST]


def _load_ref(name: str, ref: str) -> TransformSpec:
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:  # any import-time failure of a third-party module
        raise TransformDefinitionError(f"entry point {name} = {ref!r} cannot be loaded: {exc}") from exc
    if not isinstance(obj, TransformSpec):
        raise TransformDefinitionError(f"entry point {name} = {ref!r} is not a TransformSpec")
    if obj.name != name:
        raise TransformDefinitionError(f"entry point {name} = {ref!r} names a transform called {obj.name!r}")
    return obj


def discover_plugins() -> list[tuple[str, str]]:
    """``(name, "module:attr")`` of every entry point in the ``gateway.transforms`` group, sorted by name."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted((ep.name, ep.value) for ep in eps)


def load_registry(plugin_refs: list[tuple[str, str]]) -> Registry:
    """Built-ins plus the given plugin references. Raises TransformDefinitionError for a broken one."""
    specs = builtin_specs()
    specs.extend(_load_ref(name, ref) for name, ref in plugin_refs)
    return Registry(specs, plugin_refs)
