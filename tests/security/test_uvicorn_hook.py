"""Fails loudly when a uvicorn release changes the private surface app/security/uvicorn_hook.py relies on.

If one of these fails after an upgrade: read uvicorn's httptools_impl.py for where a request's task is now
started, move the hook there, and keep every assertion below true of the new place."""

from __future__ import annotations

import inspect

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.security.uvicorn_hook import StartHook


def test_requests_start_through_the_one_private_method() -> None:
    hook = inspect.signature(HttpToolsProtocol._start_asgi_task)
    assert list(hook.parameters) == ["self", "cycle", "app"], "uvicorn's _start_asgi_task changed its signature"
    # Both places a request can start from: its head completing, and the one before it (pipelining) finishing.
    for caller in (HttpToolsProtocol.on_headers_complete, HttpToolsProtocol.on_response_complete):
        assert "self._start_asgi_task(" in inspect.getsource(caller), f"{caller.__name__} no longer starts requests"
    # And nowhere else creates a request's task.
    module = inspect.getsource(inspect.getmodule(HttpToolsProtocol))  # type: ignore[arg-type]
    assert module.count("cycle.run_asgi(") == inspect.getsource(HttpToolsProtocol._start_asgi_task).count(
        "cycle.run_asgi("
    ), "uvicorn starts request tasks outside _start_asgi_task"
    assert StartHook._start_asgi_task is not HttpToolsProtocol._start_asgi_task


def test_what_a_canned_answer_touches_still_exists() -> None:
    cycle_fields = set(inspect.signature(RequestResponseCycle.__init__).parameters)
    assert {"scope", "transport", "flow", "message_event", "keep_alive", "on_response"} <= cycle_fields
    source = inspect.getsource(RequestResponseCycle)
    for attribute in ("self.response_started", "self.response_complete", "self.on_response", "self.keep_alive"):
        assert attribute in source, f"RequestResponseCycle no longer has {attribute}"
    protocol = inspect.getsource(HttpToolsProtocol)
    for attribute in ("self.tasks", "self.server_state", "def on_response_complete", "self.config"):
        assert attribute in protocol, f"HttpToolsProtocol no longer has {attribute}"
