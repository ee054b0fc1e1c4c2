"""The per-layer breakdown of a py-spy profile: self time charged to the innermost frame that belongs to a layer."""

from __future__ import annotations

import pytest

from bench.profiling import LAYER_LABELS, layer_of, summarize_collapsed

ROOT = "_run_module_as_main (<frozen runpy>:198);_run_code (<frozen runpy>:88)"
LOOP = f"{ROOT};run (uvloop/__init__.py:105)"
PROTOCOL = f"{LOOP};HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py:120)"
FRONT = f"{LOOP};RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:401);Front.__call__ (app/middleware/front.py:140)"  # noqa: E501
SAMPLE = [
    f"{PROTOCOL} 10",  # uvicorn's own work
    f"{PROTOCOL};GatewayProtocol.on_headers_complete (app/security/protocol.py:150) 5",  # the gateway's protocol
    f"{FRONT} 20",  # the front layer's own lines
    f"{FRONT};Enum.__hash__ (enum.py:1234) 5",  # a standard-library helper: charged to its caller
    f"{FRONT};LeanAggregate.__call__ (app/routes/aggregate.py:60);BaseModel.model_validate_json (pydantic/main.py:651) 15",  # noqa: E501
    f"{FRONT};Aggregator._one (app/aggregate/execute.py:90);call_once (app/upstream/call.py:70) 5",
    f"{FRONT};Aggregator._one (app/aggregate/execute.py:90);call_once (app/upstream/call.py:70);ClientSession._request (aiohttp/client.py:500) 25",  # noqa: E501
    f"{FRONT};Logger.info (logging/__init__.py:1489) 4",
    f"{FRONT};Histogram.observe (prometheus_client/metrics.py:600) 3",
    f"{LOOP};Task.__step (asyncio/tasks.py:267) 5",
    f"{FRONT};metrics (app/routes/metrics.py:28);generate_latest (prometheus_client/exposition.py:343) 1",
    f"{ROOT} 2",  # no frame of any layer
    "Thread._bootstrap (threading.py:995);Watchdog.run (app/observability/blocking.py:40) 50",  # not the loop's thread
    "garbage without a count",
]


def test_frames_map_to_layers_by_their_file() -> None:
    assert layer_of("HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py:120)") == "server"
    assert layer_of("GatewayProtocol.data_received (app/security/protocol.py:150)") == "server"
    assert layer_of("head_problem (app/security/headers.py:30)") == "front"
    assert layer_of("Router.__call__ (starlette/routing.py:700)") == "framework"
    assert layer_of("Aggregate.one (bench/refs/bare.py:55)") == "endpoint"
    assert layer_of("Enum.__hash__ (enum.py:1234)") is None
    assert layer_of("_run_code (<frozen runpy>:88)") is None


def test_layer_shares_are_self_time_of_the_loop_thread_and_sum_to_one() -> None:
    summary = summarize_collapsed(SAMPLE)
    assert summary["samples"] == 100  # the watchdog's thread and the malformed line are left out
    layers = summary["layers"]
    assert set(layers) == set(LAYER_LABELS)
    assert layers == pytest.approx(
        {
            "server": 0.15,
            "framework": 0.0,
            "front": 0.25,  # its own 20 and the enum helper's 5
            "sources": 0.05,
            "http_client": 0.25,
            "json": 0.15,
            "logging": 0.04,
            "metrics": 0.03,
            "endpoint": 0.0,
            "loop": 0.05,
            "other": 0.02,
            "scrape": 0.01,  # a /metrics scrape, whatever its innermost frame
        }
    )
    assert sum(layers.values()) == pytest.approx(1.0)
    assert summary["top_self"][0] == ("ClientSession._request (aiohttp/client.py)", 0.25)
