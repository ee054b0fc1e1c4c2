"""Third-party transforms found through the real ``gateway.transforms`` entry-point group.

The example distribution in tests/compute/plugin_dist is a real installed-style package (module + .dist-info with
entry_points.txt); importlib.metadata discovers it from sys.path exactly as it would from site-packages.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from app.worker.registry import ENTRY_POINT_GROUP, discover_plugins
from tests.compute.helpers import NPY, acme_plugins, compute_settings, from_npy, npy_bytes, shm_guard
from tests.support.gateway import running_gateway

pytestmark = pytest.mark.usefixtures("shm_guard")
__all__ = ["acme_plugins", "shm_guard"]


def test_entry_points_are_discovered_from_an_installed_distribution(acme_plugins: Path) -> None:
    dist = importlib.metadata.distribution("acme-transforms")
    assert {ep.group for ep in dist.entry_points} == {ENTRY_POINT_GROUP}
    assert ("moving_average", "acme_transforms:MOVING_AVERAGE") in discover_plugins()


async def test_a_plugin_transform_is_listed_and_served_by_the_workers(acme_plugins: Path) -> None:
    async with running_gateway(compute_settings(workers=1)) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/transform") as resp:
            listed = {t["name"]: t for t in (await resp.json())["transforms"]}
        assert listed["moving_average"]["params"]["properties"]["window"]["default"] == 3
        x = np.random.default_rng(5).standard_normal(10_000)
        expected = np.convolve(x, np.full(4, 0.25), mode="valid")
        url = f"{gw.url}/transform/moving_average"
        async with client.post(url, json={"data": x.tolist(), "params": {"window": 4}}) as resp:
            assert resp.status == 200
            got: Any = orjson.loads(await resp.read())["result"]
        np.testing.assert_array_equal(got, expected)
        headers = {"Content-Type": NPY}
        async with client.post(url, data=npy_bytes(x), params={"window": "4"}, headers=headers) as resp:
            assert resp.status == 200
            np.testing.assert_array_equal(from_npy(await resp.read()), expected)
        async with client.post(url, json={"data": [1.0, 2.0], "params": {"window": 5}}) as resp:
            assert resp.status == 422
            assert "longer than the data" in (await resp.json(content_type=None))["detail"]


async def test_without_plugins_loading_the_entry_points_are_ignored(acme_plugins: Path) -> None:
    async with running_gateway(compute_settings(workers=1, load_plugins=False)) as gw:
        assert "moving_average" not in gw.state.cpu.registry
        url = f"{gw.url}/transform/moving_average"
        async with aiohttp.ClientSession() as client, client.post(url, json={"data": [1]}) as resp:
            assert resp.status == 404
