"""/docs and /redoc in a real headless Chromium, against a real `gateway demo`: the pages render the operations,
Swagger UI's "Try it out" calls the demo and gets 200, and no request leaves the machine while they load.

The browser is driven over the DevTools protocol (a few commands, no driver library). Any host but 127.0.0.1 fails
to resolve in it, and every request the page makes is recorded, so the test sees an outside request even when
it fails. `make test` installs Debian's chromium when it is missing (scripts/install-chromium.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.net import free_port

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Every wait below is a poll with this deadline, never a fixed sleep.
WAIT_S = 30.0


def browser_path() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail("no chromium on PATH: run scripts/install-chromium.sh (make test does)")


class Page:
    """One browser tab over the DevTools protocol: commands, and the events recorded since it was opened."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self._ws = ws
        self._session = session_id
        self._ids = itertools.count(1000)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.requests: list[str] = []
        self.problems: list[str] = []

    async def command(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[ident] = answer
        await self._ws.send_json({"id": ident, "sessionId": self._session, "method": method, "params": params})
        result = await asyncio.wait_for(answer, WAIT_S)
        if "error" in result:
            raise AssertionError(f"{method}: {result['error']}")
        return dict(result.get("result", {}))

    def dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message and message["id"] in self._pending:
            self._pending.pop(message["id"]).set_result(message)
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.problems.append(json.dumps(params["exceptionDetails"])[:500])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.problems.append(params["entry"]["text"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """The expression's value once it is truthy; fails after WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                html = await self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"not true within {WAIT_S} s: {expression}\n{html}\n{self.problems}")
            await asyncio.sleep(0.05)

    async def open(self, url: str) -> None:
        await self.command("Page.navigate", url=url)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium; yields its DevTools websocket URL."""
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [
            browser_path(),
            "--headless=new",
            "--no-sandbox",  # root in CI; the pages are the gateway's own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--metrics-recording-only",
            # Nothing but loopback resolves: a page that needed the internet would visibly break.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT_S
        while not (active.exists() and len(active.read_text().splitlines()) == 2):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port, path = active.read_text().splitlines()
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """`gateway demo` on a free port (authentication off, as the demo runs); yields its base URL."""
    port = free_port()
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "demo", "--port", str(port), "--failure-rate", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "gateway demo is running" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out_path.read_text()


@pytest.fixture
async def page(browser: str) -> AsyncIterator[Page]:
    async with aiohttp.ClientSession() as session, session.ws_connect(browser, max_msg_size=0) as ws:
        await ws.send_json({"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}})
        created = await ws.receive_json(timeout=WAIT_S)
        target = created["result"]["targetId"]
        attach = {"targetId": target, "flatten": True}
        await ws.send_json({"id": 2, "method": "Target.attachToTarget", "params": attach})
        while True:
            message = await ws.receive_json(timeout=WAIT_S)
            if message.get("id") == 2:
                break
        tab = Page(ws, message["result"]["sessionId"])

        async def pump() -> None:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    tab.dispatch(json.loads(message.data))

        reader = asyncio.create_task(pump())
        try:
            for domain in ("Network", "Page", "Runtime", "Log"):
                await tab.command(f"{domain}.enable")
            yield tab
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def outside(requests: list[str], base: str) -> list[str]:
    return [url for url in requests if not url.startswith((base + "/", "data:", "blob:", "about:"))]


async def test_swagger_ui_and_redoc_render_and_try_it_out_reaches_the_demo(demo: str, page: Page) -> None:
    await page.open(f"{demo}/docs")
    await page.wait_for("document.querySelectorAll('.opblock').length >= 5")
    paths = await page.evaluate(
        "[...document.querySelectorAll('.opblock')].map(b => "
        "b.querySelector('.opblock-summary-method').innerText + ' ' + b.querySelector('[data-path]').dataset.path)"
    )
    assert {"POST /aggregate", "GET /transform"} <= set(paths), paths
    # The document names what the demo serves: one path per composite and per transform.
    assert any(p.startswith("GET /aggregate/") for p in paths), paths
    assert "POST /transform/stats" in paths, paths

    # Try it out on GET /transform (the transforms the demo serves): expand, "Try it out", "Execute".
    block = (
        "[...document.querySelectorAll('.opblock-get')].find(b => "
        "b.querySelector('[data-path]').dataset.path === '/transform')"
    )
    await page.evaluate(f"{block}.querySelector('.opblock-summary-control').click()")
    await page.wait_for(f"!!{block}.querySelector('.try-out__btn')")
    await page.evaluate(f"{block}.querySelector('.try-out__btn').click()")
    await page.wait_for(f"!!{block}.querySelector('.execute')")
    await page.evaluate(f"{block}.querySelector('.execute').click()")
    status = await page.wait_for(
        f"(() => {{ const s = {block}.querySelector('.live-responses-table tbody .response-col_status');"
        " return s && s.innerText.trim(); })()"
    )
    assert status == "200"
    body = await page.evaluate(f"{block}.querySelector('.live-responses-table .microlight').innerText")
    assert "prime_count" in body
    assert f"{demo}/transform" in page.requests, page.requests

    await page.open(f"{demo}/redoc")
    await page.wait_for("document.querySelectorAll('[data-section-id^=\"operation/\"]').length >= 5")
    text = await page.evaluate("document.body.innerText")
    assert "/aggregate/" in text
    assert "/transform/stats" in text

    assert outside(page.requests, demo) == [], "a request left the machine"
    assert f"{demo}/openapi.json" in page.requests
    assert any("/docs/assets/" in url and url.endswith("redoc.standalone.js") for url in page.requests)
    assert page.problems == [], "errors in the page (a refused script or style, say)"
