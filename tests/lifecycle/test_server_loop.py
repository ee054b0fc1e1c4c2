from __future__ import annotations

import asyncio

import pytest
import uvloop

from app.errors import ConfigError
from app.lifecycle.server import build_server
from app.settings import load_settings
from tests.support.gateway import make_settings


@pytest.mark.parametrize(("setting", "loop_type"), [("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)])
def test_the_server_runs_on_the_configured_loop(setting: str, loop_type: type[asyncio.AbstractEventLoop]) -> None:
    server = build_server(make_settings(server={"loop": setting}))
    factory = server.config.get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, loop_type)
        if setting == "asyncio":
            assert not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_uvloop_is_the_default_and_other_loops_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_settings().server.loop == "uvloop"
    monkeypatch.setenv("GATEWAY_SERVER__LOOP", "trio")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert any(p.startswith("GATEWAY_SERVER__LOOP (server.loop):") for p in info.value.problems)
