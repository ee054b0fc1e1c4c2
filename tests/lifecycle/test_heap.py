"""The collector on the loop's clock (app/lifecycle/heap.py): the count trigger off, cycles still freed."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry, Histogram

from app.lifecycle.heap import ClockedCollector
from app.settings import ServerSettings, load_settings


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle(on_freed: asyncio.Event) -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    weakref.finalize(a, on_freed.set)  # run by the collection, in the collector's task on this loop
    return weakref.ref(a)


def _pauses() -> Histogram:
    return Histogram("pause", "", ["generation"], registry=CollectorRegistry())


def _count(histogram: Histogram, generation: str) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels == {"generation": generation}:
                return sample.value
    return 0.0


async def test_cycles_are_freed_on_the_clock_with_the_count_trigger_off() -> None:
    was_enabled = gc.isenabled()
    gc.enable()
    pauses = _pauses()
    collector = ClockedCollector(0.02, pauses)
    try:
        await collector.start()
        assert not gc.isenabled(), "allocations no longer set off collections"
        freed = asyncio.Event()
        ref = _cycle(freed)
        assert ref() is not None, "a cycle outlives its last outside reference until a collection"
        await asyncio.wait_for(freed.wait(), timeout=10)
        assert ref() is None, "the clock's collection freed the cycle"
        assert _count(pauses, "0") >= 1, "each collection's pause is observed"
    finally:
        await collector.aclose()
        assert gc.isenabled(), "closing turns the count trigger back on"
        if not was_enabled:
            gc.disable()


@pytest.mark.parametrize("interval_s", [None, 0.0])
async def test_no_interval_leaves_pythons_trigger_alone(interval_s: float | None) -> None:
    was_enabled = gc.isenabled()
    gc.enable()
    collector = ClockedCollector(interval_s, _pauses())
    try:
        await collector.start()
        assert gc.isenabled()
    finally:
        await collector.aclose()
        assert gc.isenabled()
        if not was_enabled:
            gc.disable()


def test_zero_is_the_setting_for_pythons_trigger_also_from_the_environment() -> None:
    settings = load_settings(None, environ=False)
    assert settings.server.gc_interval_s == 1.0
    server = ServerSettings.model_validate({"gc_interval_s": "0"})  # as an environment variable gives it
    assert server.gc_interval_s == 0


async def test_a_collection_is_observed_under_its_generation() -> None:
    pauses = _pauses()
    collector = ClockedCollector(60.0, pauses)
    collector.collect(2)
    assert _count(pauses, "2") == 1
    assert _count(pauses, "0") == 0
