import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from app.demo.upstream import create_upstream_app, main, user_record

START_DEADLINE = 15.0
EXIT_DEADLINE = 10.0
POLL_INTERVAL = 0.02


@dataclass
class DemoService:
    proc: subprocess.Popen[str]
    url: str


def wait_for_port_file(proc: subprocess.Popen[str], port_file: Path) -> int:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        try:
            # Paces the poll and notices a service that died on start-up.
            proc.wait(timeout=POLL_INTERVAL)
        except subprocess.TimeoutExpired:
            continue
        _, stderr = proc.communicate()
        pytest.fail(f"demo upstream exited with {proc.returncode} before listening:\n{stderr}")
    pytest.fail(f"no port file within {START_DEADLINE}s")


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[..., DemoService]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> DemoService:
        port_file = tmp_path / f"port-{len(procs)}"
        command = [sys.executable, "-m", "app.demo.upstream", "--port", "0", "--port-file", str(port_file)]
        proc = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        port = wait_for_port_file(proc, port_file)
        return DemoService(proc, f"http://127.0.0.1:{port}")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=EXIT_DEADLINE)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def get_json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.get(url, **kwargs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_users_service(start_demo: Callable[..., DemoService], session: aiohttp.ClientSession) -> None:
    users = start_demo("--name", "users", "--latency-ms", "5", "--jitter-ms", "2")

    status, body = await get_json(session, f"{users.url}/users/3")
    assert status == 200
    assert body == user_record(3)
    assert set(body) == {"id", "name", "email", "tier"}
    assert body["id"] == 3
    assert await get_json(session, f"{users.url}/users/3") == (200, body)  # deterministic

    status, listing = await get_json(session, f"{users.url}/users")
    assert status == 200
    assert [user["id"] for user in listing] == list(range(1, 21))
    assert listing[2] == body

    for missing in ("0", "21", "42", "abc"):
        status, error = await get_json(session, f"{users.url}/users/{missing}")
        assert status == 404
        assert error["error"] == "user not found"


async def test_inventory_service(start_demo: Callable[..., DemoService], session: aiohttp.ClientSession) -> None:
    inventory = start_demo("--name", "inventory")

    status, stock = await get_json(session, f"{inventory.url}/stock", params={"sku": "A1"})
    assert status == 200
    assert stock["sku"] == "A1"
    assert isinstance(stock["available"], int)
    assert isinstance(stock["warehouse"], str)
    assert await get_json(session, f"{inventory.url}/stock/A1") == (200, stock)

    status, _ = await get_json(session, f"{inventory.url}/stock")
    assert status == 400
    async with session.get(f"{inventory.url}/users/1") as resp:
        assert resp.status == 404  # users routes belong to the users service only


async def test_echo_shows_forwarded_headers(
    start_demo: Callable[..., DemoService], session: aiohttp.ClientSession
) -> None:
    service = start_demo("--name", "anything")
    headers = {
        "X-Request-Id": "abc",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Authorization": "Bearer secret",
    }

    status, echo = await get_json(
        session, f"{service.url}/echo", params=[("q", "1"), ("tag", "a"), ("tag", "b")], headers=headers
    )

    assert status == 200
    assert echo["method"] == "GET"
    assert echo["path"] == "/echo"
    assert echo["query"] == {"q": "1", "tag": ["a", "b"]}
    assert echo["headers"] == {"x-request-id": "abc", "traceparent": headers["traceparent"]}


async def test_failure_rate_one_fails_everything_but_health(
    start_demo: Callable[..., DemoService], session: aiohttp.ClientSession
) -> None:
    users = start_demo("--name", "users", "--failure-rate", "1.0")

    for _ in range(3):
        assert await get_json(session, f"{users.url}/users/1") == (503, {"error": "injected failure"})
        status, health = await get_json(session, f"{users.url}/health")
        assert status == 200
        assert health == {"status": "ok", "service": "users"}


async def test_latency_is_injected_but_not_on_health(
    start_demo: Callable[..., DemoService], session: aiohttp.ClientSession
) -> None:
    users = start_demo("--name", "users", "--latency-ms", "500")

    started = time.monotonic()
    assert (await get_json(session, f"{users.url}/users/1"))[0] == 200
    assert time.monotonic() - started >= 0.5

    started = time.monotonic()
    assert (await get_json(session, f"{users.url}/health"))[0] == 200
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(start_demo: Callable[..., DemoService], signum: signal.Signals) -> None:
    users = start_demo("--name", "users")

    users.proc.send_signal(signum)
    stdout, stderr = users.proc.communicate(timeout=EXIT_DEADLINE)

    assert users.proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stdout.splitlines() == [f"upstream users listening on {users.url}"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--name", "users", "--failure-rate", "1.5"],
        ["--name", "users", "--latency-ms", "-1"],
        ["--port", "0"],  # --name is required
    ],
)
def test_invalid_arguments_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2


async def statuses_of(app: web.Application, count: int) -> list[int]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as client:
            statuses = []
            for _ in range(count):
                async with client.get(f"http://127.0.0.1:{port}/echo") as resp:
                    statuses.append(resp.status)
            return statuses
    finally:
        await runner.cleanup()


async def test_seed_makes_failures_reproducible() -> None:
    first = await statuses_of(create_upstream_app(name="users", failure_rate=0.5, seed=7), 30)
    second = await statuses_of(create_upstream_app(name="users", failure_rate=0.5, seed=7), 30)

    assert first == second
    assert set(first) == {200, 503}
