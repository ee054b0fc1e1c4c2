"""The global in-flight limit: the excess is answered 503 + Retry-After at once; probes are never shed; the limit
follows the event loop's lag when asked to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson
from prometheus_client import generate_latest

from app.security.admission import Admission
from tests.aggregate.conftest import upstream_cfg
from tests.security.conftest import metric
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


async def test_excess_is_shed_at_once_and_admitted_requests_finish(upstream: UpstreamServer) -> None:
    upstream.set("/slow", Behavior(latency=0.5))
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url, timeout_ms=5000)},
        limits={"max_in_flight_requests": 3, "shed_retry_after_s": 2},
    )
    body = {"sources": {"s": {"upstream": "a", "path": "/slow"}}, "deadline_ms": 5000}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:

        async def call() -> tuple[int, float, str | None]:
            started = time.perf_counter()
            async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                await resp.read()
                return resp.status, time.perf_counter() - started, resp.headers.get("Retry-After")

        admitted = [asyncio.create_task(call()) for _ in range(3)]
        await upstream.await_requests(3)
        shed = await asyncio.gather(*(call() for _ in range(10)))
        async with client.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200  # exempt
        async with client.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 200
        done = await asyncio.gather(*admitted)
        async with client.post(f"{gw.url}/aggregate", json=body) as resp:
            assert resp.status == 200  # capacity is back
        text = generate_latest(gw.state.metrics.registry).decode()
    assert [s for s, _, _ in done] == [200, 200, 200]
    assert all(status == 503 and retry == "2" for status, _, retry in shed)
    assert max(elapsed for _, elapsed, _ in shed) < 0.25, "the excess must not wait for capacity"
    assert upstream.count() == 4
    assert metric(text, "gateway_http_requests_shed_total", reason="in_flight") == 10


# The limit that follows the loop's lag -------------------------------------------------------------------------


def steered(*, ceiling: int = 64, floor: int = 4, target_ms: float = 20.0, busy: int | None = None) -> Admission:
    """An admission whose limit follows the lag, with ``busy`` requests in flight (default: the whole limit)."""
    admission = Admission(
        limit=ceiling, retry_after_s=1, exempt=frozenset(), floor=floor, target_lag_s=target_ms / 1000
    )
    for _ in range(ceiling if busy is None else busy):
        admission.enter()
    return admission


def test_a_lagging_loop_cuts_the_limit_by_a_quarter_down_to_its_floor() -> None:
    admission = steered()
    limits = []
    for _ in range(12):
        admission.adapt(0.050)
        limits.append(admission.limit)
    assert limits == [48, 36, 27, 20, 15, 11, 8, 6, 4, 4, 4, 4]


def test_lag_while_the_limit_is_not_what_loads_the_loop_leaves_it() -> None:
    # Under half the limit in use: the lag comes from elsewhere (a collection, a scrape), and cutting would only
    # shed requests.
    admission = steered(busy=31)
    for _ in range(10):
        admission.adapt(0.050)
    assert admission.limit == 64
    admission.enter()  # 32 of 64: the limit now counts
    admission.adapt(0.050)
    assert admission.limit == 48


def test_the_limit_rises_by_one_step_per_run_of_calm_samples() -> None:
    admission = steered()
    admission.adapt(0.050)
    assert admission.limit == 48
    # Within the band (between half the target and the target): held.
    for _ in range(20):
        admission.adapt(0.015)
    assert admission.limit == 48
    # Calm samples broken by one busy moment: no rise.
    for lag in (0.001, 0.001, 0.001, 0.001, 0.012, 0.001, 0.001, 0.001, 0.001):
        admission.adapt(lag)
    assert admission.limit == 48
    admission.adapt(0.001)  # the fifth calm sample in a row
    assert admission.limit == 54
    # The next step needs a run of its own.
    limits = []
    for _ in range(5):
        admission.adapt(0.001)
        limits.append(admission.limit)
    assert limits == [54, 54, 54, 54, 60]
    for _ in range(50):
        admission.adapt(0.0)
    assert admission.limit == 64, "never past the configured limit"


def test_a_zero_target_keeps_the_limit_fixed() -> None:
    admission = steered(target_ms=0)
    for _ in range(10):
        admission.adapt(5.0)
    assert admission.limit == 64


def test_the_shed_answer_names_why() -> None:
    admission = steered(ceiling=2, floor=1)
    _, at_limit = admission.shed()
    admission.adapt(1.0)
    assert admission.limit == 1
    _, saturated = admission.shed()
    assert orjson.loads(at_limit)["detail"] == "more than 2 requests in flight"
    assert orjson.loads(saturated)["detail"] == "the gateway's event loop is saturated"
    assert admission.shed_total == 2


async def test_a_saturated_loop_lowers_the_limit_and_a_calm_one_restores_it(upstream: UpstreamServer) -> None:
    # The real sampler, admission and protocol: with every slot taken by slow requests, the loop is kept busy
    # (30 ms callbacks back to back) until the limit sits at its floor; a request past it is shed as `loop_lag`;
    # once the loop is calm again the limit climbs back to the configured one.
    upstream.set("/slow", Behavior(latency=2.0))
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url, timeout_ms=5000)},
        limits={"max_in_flight_requests": 4, "min_in_flight_requests": 2, "shed_loop_lag_ms": 5},
        observability={"loop_lag_interval_ms": 20},
    )
    body = {"sources": {"s": {"upstream": "a", "path": "/slow"}}, "deadline_ms": 5000}
    loop = asyncio.get_running_loop()
    hogging = True

    def hog() -> None:
        end = time.perf_counter() + 0.03
        while time.perf_counter() < end:
            pass
        if hogging:
            loop.call_soon(hog)

    async def poll(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admission = gw.state.admission
        assert admission is not None
        assert admission.limit == 4

        async def call() -> tuple[int, dict[str, object]]:
            async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                return resp.status, orjson.loads(await resp.read())

        admitted = [asyncio.create_task(call()) for _ in range(4)]
        await upstream.await_requests(4)
        loop.call_soon(hog)
        try:
            await poll(lambda: admission.limit == 2, "the limit never reached its floor")
            shed = await call()
            text = generate_latest(gw.state.metrics.registry).decode()
        finally:
            hogging = False
        assert shed == (503, {**shed[1], "detail": "the gateway's event loop is saturated"})
        assert metric(text, "gateway_http_requests_shed_total", reason="loop_lag") == 1
        assert metric(text, "gateway_http_admission_limit") == 2
        assert [status for status, _ in await asyncio.gather(*admitted)] == [200] * 4
        await poll(lambda: admission.limit == 4, "the limit never climbed back")
        text = generate_latest(gw.state.metrics.registry).decode()
    assert metric(text, "gateway_http_admission_limit") == 4
