"""/transform through the real app, a real uvicorn server and real worker processes: results, formats, transports,
and every kind of bad input."""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from app.compute.jsonarray import ENVELOPE_LIMIT
from tests.compute.helpers import (
    NPY,
    assert_no_segments,
    compute_settings,
    from_npy,
    npy_bytes,
    primes_upto,
    shm_guard,
    trig_log_reference,
)
from tests.support.gateway import RunningGateway, running_gateway

pytestmark = pytest.mark.usefixtures("shm_guard")
__all__ = ["shm_guard"]

Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(compute_settings(load_plugins=False)) as gateway:
        yield gateway


async def post(gw: RunningGateway, name: str, body: bytes, content_type: str, **kwargs: Any) -> Reply:
    headers = {"Content-Type": content_type, **kwargs.pop("headers", {})}
    data: bytes | io.BytesIO = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp streams a BytesIO
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{gw.url}/transform/{name}", data=data, headers=headers, **kwargs) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def post_json(gw: RunningGateway, name: str, data: Any, params: dict[str, Any] | None = None) -> Reply:
    body = {"data": data} if params is None else {"data": data, "params": params}
    return await post(gw, name, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), "application/json")


async def post_npy(
    gw: RunningGateway, name: str, array: np.ndarray[Any, Any], accept: str | None = None, **params: Any
) -> Reply:
    headers = {"Accept": accept} if accept else {}
    query = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in params.items()}
    return await post(gw, name, npy_bytes(array), NPY, headers=headers, params=query)


def result(reply: Reply) -> Any:
    status, headers, body = reply
    assert status == 200, body
    if headers["Content-Type"] == NPY:
        return from_npy(body)
    assert headers["Content-Type"] == "application/json"
    return orjson.loads(body)["result"]


def problem(reply: Reply) -> tuple[int, str]:
    status, headers, body = reply
    assert headers["Content-Type"] == "application/problem+json", body
    doc = orjson.loads(body)
    assert doc["status"] == status
    assert doc["detail"]
    assert "Traceback" not in doc["detail"]
    return status, doc["type"].removeprefix("urn:gateway:problem:")


RNG = np.random.default_rng(2024)
MATRIX = RNG.standard_normal((6, 5))


async def test_get_transform_lists_transforms_with_schemas_and_limits(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as client, client.get(f"{gw.url}/transform") as resp:
        assert resp.status == 200
        doc = await resp.json()
    by_name = {t["name"]: t for t in doc["transforms"]}
    assert set(by_name) >= {"trig_log", "stats", "sort", "prime_count"}
    assert by_name["stats"]["params"]["properties"]["percentiles"]["type"] == "array"
    assert by_name["stats"]["formats"] == ["json"]
    assert by_name["prime_count"]["dtypes"] == [
        "int64",
        "int32",
        "int16",
        "int8",
        "uint64",
        "uint32",
        "uint16",
        "uint8",
    ]
    assert by_name["prime_count"]["max_elements"] == 100_000
    assert by_name["trig_log"]["ranks"] == {"min": 0, "max": 8}
    assert by_name["sort"]["nonfinite"] == "allowed"
    assert doc["limits"]["max_body_bytes"] == gw.state.settings.compute.max_body_bytes
    assert doc["formats"] == ["application/json", NPY]


async def test_trig_log_equals_numpy(gw: RunningGateway) -> None:
    scalar = result(await post_json(gw, "trig_log", 0.5))
    assert isinstance(scalar, float)
    assert scalar == trig_log_reference(np.float64(0.5))
    zero_d = result(await post_npy(gw, "trig_log", np.float64(-2.0)))
    assert zero_d.shape == ()
    assert zero_d == trig_log_reference(np.float64(-2.0))
    np.testing.assert_array_equal(result(await post_json(gw, "trig_log", MATRIX)), trig_log_reference(MATRIX))
    np.testing.assert_array_equal(result(await post_json(gw, "trig_log", [1, 2, 3])), trig_log_reference([1, 2, 3]))
    for dtype in (np.float32, np.int16, np.uint8):
        x = (MATRIX * 10).astype(dtype)
        np.testing.assert_array_equal(result(await post_npy(gw, "trig_log", x)), trig_log_reference(x))
    fortran = np.asfortranarray(MATRIX)
    np.testing.assert_array_equal(result(await post_npy(gw, "trig_log", fortran)), trig_log_reference(MATRIX))


async def test_stats_equals_numpy(gw: RunningGateway) -> None:
    got = result(await post_json(gw, "stats", MATRIX, {"percentiles": [5, 50, 99.5], "ddof": 1}))
    assert got["count"] == MATRIX.size
    assert got["mean"] == np.mean(MATRIX)
    assert got["std"] == np.std(MATRIX, ddof=1)
    assert (got["min"], got["max"]) == (MATRIX.min(), MATRIX.max())
    assert got["percentiles"] == dict(zip(["5", "50", "99.5"], np.percentile(MATRIX, [5, 50, 99.5]), strict=True))
    per_axis = result(await post_npy(gw, "stats", MATRIX, axis=0, percentiles=[25, 75]))
    assert per_axis["count"] == 6
    np.testing.assert_array_equal(per_axis["mean"], np.mean(MATRIX, axis=0))
    np.testing.assert_array_equal(per_axis["std"], np.std(MATRIX, axis=0))
    np.testing.assert_array_equal(per_axis["percentiles"]["75"], np.percentile(MATRIX, 75, axis=0))
    assert "percentiles" not in result(await post_json(gw, "stats", [1, 2, 3]))


async def test_sort_equals_numpy(gw: RunningGateway) -> None:
    np.testing.assert_array_equal(result(await post_json(gw, "sort", MATRIX)), np.sort(MATRIX))
    np.testing.assert_array_equal(
        result(await post_json(gw, "sort", MATRIX, {"axis": 0, "descending": True})), np.sort(MATRIX, axis=0)[::-1]
    )
    ints = RNG.integers(-1000, 1000, size=500)
    got = result(await post_json(gw, "sort", ints.tolist(), {"stable": True}))
    assert got == sorted(ints.tolist())
    with_nan = np.array([3.0, np.nan, -np.inf, 1.0])
    np.testing.assert_array_equal(result(await post_npy(gw, "sort", with_nan)), np.sort(with_nan))
    np.testing.assert_array_equal(
        result(await post_npy(gw, "sort", with_nan, descending="true")), np.sort(with_nan)[::-1]
    )
    as_json = result(await post_npy(gw, "sort", with_nan, accept="application/json"))
    assert as_json == [None, 1.0, 3.0, None]  # NaN and infinity have no JSON spelling: null (.npy keeps them)


async def test_prime_count_equals_a_numpy_sieve(gw: RunningGateway) -> None:
    values = [0, 1, 2, 10, 97, 1000, 123_456, 1_000_000]
    assert result(await post_json(gw, "prime_count", values)) == [primes_upto(n) for n in values]
    got = result(await post_npy(gw, "prime_count", np.array(values, dtype=np.int32)))
    assert got.dtype == np.int64
    assert got.tolist() == [primes_upto(n) for n in values]
    assert result(await post_json(gw, "prime_count", 100)) == 25


async def test_accept_header_picks_the_answer_format(gw: RunningGateway) -> None:
    x = np.arange(4.0)
    for accept, expected in [
        (None, NPY),
        ("*/*", NPY),
        ("application/json", "application/json"),
        ("application/json, */*", "application/json"),
        ("application/x-npy;q=0.5, application/json;q=0.9", "application/json"),
    ]:
        status, headers, _ = await post_npy(gw, "sort", x, accept=accept)
        assert (status, headers["Content-Type"]) == (200, expected), accept
    status, headers, body = await post(
        gw, "sort", orjson.dumps({"data": [2, 1]}), "application/json", headers={"Accept": NPY}
    )
    assert from_npy(body).tolist() == [1, 2]
    assert problem(await post_npy(gw, "stats", x, accept=NPY)) == (406, "not-acceptable")


@pytest.mark.parametrize("transport", ["shm", "pickle"])
async def test_large_json_bodies_and_answers_use_the_configured_transport(transport: str) -> None:
    threshold = 1 if transport == "shm" else 1 << 30
    async with running_gateway(compute_settings(load_plugins=False, shm_threshold_bytes=threshold)) as gw:
        before = gw.state.cpu.stats().counters
        x = RNG.standard_normal(50_000)
        np.testing.assert_array_equal(result(await post_json(gw, "trig_log", x)), trig_log_reference(x))
        counters = gw.state.cpu.stats().counters
        assert counters.get(f"{transport}_inputs", 0) - before.get(f"{transport}_inputs", 0) == 1
        assert counters.get(f"{transport}_outputs", 0) - before.get(f"{transport}_outputs", 0) == 1
        assert_no_segments()


async def test_shared_memory_and_pickle_paths_give_identical_answers() -> None:
    cases: list[tuple[str, bytes, str, dict[str, str]]] = [
        ("trig_log", npy_bytes(RNG.standard_normal((300, 70))), NPY, {}),
        ("sort", npy_bytes(RNG.integers(-(2**40), 2**40, 30_000)), NPY, {"descending": "true"}),
        ("sort", orjson.dumps({"data": RNG.standard_normal((40, 500)).tolist(), "params": {"axis": 0}}), "", {}),
        ("stats", npy_bytes(RNG.standard_normal((200, 100))), NPY, {"axis": "1", "percentiles": "1,50"}),
        ("prime_count", orjson.dumps({"data": list(range(0, 200_000, 7))}), "", {}),
    ]
    answers: dict[str, list[bytes]] = {}
    for transport, threshold in (("shm", 1), ("pickle", 1 << 30)):
        settings = compute_settings(load_plugins=False, shm_threshold_bytes=threshold)
        async with running_gateway(settings) as gw:
            replies = []
            for name, body, content_type, query in cases:
                status, _, answer = await post(gw, name, body, content_type or "application/json", params=query)
                assert status == 200, answer
                replies.append(answer)
            counters = gw.state.cpu.stats().counters
            assert counters.get(f"{transport}_inputs") == len(cases), counters
            answers[transport] = replies
            assert_no_segments()
    assert answers["shm"] == answers["pickle"]


async def test_a_64_mb_array_goes_through_shared_memory_not_through_pickle(gw: RunningGateway) -> None:
    x = RNG.standard_normal(8 * 1024 * 1024)  # 64 MiB of float64
    before = gw.state.cpu.stats().counters
    status, headers, body = await post_npy(gw, "trig_log", x)
    assert status == 200
    assert int(headers["Content-Length"]) == len(body) == x.nbytes + 128
    # Off the loop: the reference over 64 MiB takes the test's thread for about a second on a loaded machine, and
    # the gateway runs on this loop.
    await asyncio.to_thread(lambda: np.testing.assert_array_equal(from_npy(body), trig_log_reference(x)))
    after = gw.state.cpu.stats().counters
    assert after["shm_inputs"] - before.get("shm_inputs", 0) == 1
    assert after["shm_outputs"] - before.get("shm_outputs", 0) == 1
    assert after["shm_bytes"] - before.get("shm_bytes", 0) == 2 * x.nbytes + 128
    pickled = after["pickle_bytes"] - before.get("pickle_bytes", 0)
    assert pickled < 4096, f"{pickled} bytes went through the worker pipe"
    assert_no_segments()


def npy_with_header(header: str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    raw = header.encode("latin1")
    raw += b" " * (-(len(raw) + 11) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack("<H", len(raw)) + raw + data


BAD_INPUTS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    # (transform, content type, body, query, status, problem type)
    ("nope", "application/json", b'{"data": [1]}', {}, 404, "not-found"),
    ("trig_log", "text/plain", b"1,2,3", {}, 415, "unsupported-media-type"),
    ("trig_log", "application/json", b'{"data": [1, "2"]}', {}, 422, "non-numeric-data"),
    ("trig_log", "application/json", b'{"data": [[1, 2], [3]]}', {}, 422, "ragged-data"),
    ("trig_log", "application/json", b'{"data": [1, 2}', {}, 400, "malformed-input"),
    ("trig_log", "application/json", b"", {}, 400, "malformed-input"),
    ("trig_log", "application/json", b'{"data": [1]}', {"x": "1"}, 422, "invalid-params"),
    ("trig_log", "application/json", b'{"data": [1], "params": {"x": 1}}', {}, 422, "invalid-params"),
    ("stats", "application/json", b'{"data": [1, 2], "params": {"percentiles": [150]}}', {}, 422, "invalid-params"),
    ("stats", "application/json", b'{"data": 5}', {}, 422, "unsupported-rank"),
    ("stats", "application/json", b'{"data": [1], "params": {"ddof": 1}}', {}, 422, "invalid-input"),
    ("sort", "application/json", b'{"data": [1, 2], "params": {"axis": 3}}', {}, 422, "invalid-input"),
    ("prime_count", "application/json", b'{"data": [1.5, 2]}', {}, 422, "unsupported-dtype"),
    ("prime_count", "application/json", b'{"data": [[1, 2], [3, 4]]}', {}, 422, "unsupported-rank"),
    ("prime_count", "application/json", b'{"data": [-1]}', {}, 422, "invalid-input"),
    ("prime_count", "application/json", b'{"data": [50000001]}', {}, 422, "invalid-input"),
    ("prime_count", NPY, npy_bytes(np.zeros(100_001, np.int64)), {}, 422, "too-many-elements"),
    ("trig_log", NPY, npy_bytes(np.array([1.0, np.nan])), {}, 422, "non-finite-data"),
    ("trig_log", NPY, npy_bytes(np.array([np.inf])), {}, 422, "non-finite-data"),
    ("trig_log", NPY, npy_bytes(np.ones(3, np.complex128)), {}, 422, "unsupported-dtype"),
    ("trig_log", NPY, npy_bytes(np.ones(3, bool)), {}, 422, "unsupported-dtype"),
    ("trig_log", NPY, npy_bytes(np.ones(3, ">f8")), {}, 422, "unsupported-dtype"),
    (
        "trig_log",
        NPY,
        npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"x" * 8),
        {},
        422,
        "unsupported-dtype",
    ),
    ("trig_log", NPY, npy_bytes(np.ones((1,) * 9)), {}, 422, "unsupported-rank"),
    ("trig_log", NPY, npy_bytes(np.ones(0)), {}, 422, "invalid-input"),
    ("trig_log", NPY, b"NOTNUMPY" + b"\0" * 100, {}, 400, "malformed-input"),
    ("trig_log", NPY, npy_bytes(np.ones(100))[:-8], {}, 400, "malformed-input"),
    ("trig_log", NPY, npy_bytes(np.ones(100)) + b"extra", {}, 400, "malformed-input"),
    ("trig_log", NPY, npy_with_header("{'descr': '<f8', 'shape': (", b""), {}, 400, "malformed-input"),
    ("trig_log", NPY, npy_bytes(np.ones(3))[:5], {}, 400, "malformed-input"),
    ("trig_log", NPY, npy_with_header("{}", b"", version=(9, 0)), {}, 400, "malformed-input"),
    ("stats", NPY, npy_bytes(np.ones(3)), {"percentiles": "50,x"}, 422, "invalid-params"),
    ("stats", NPY, npy_bytes(np.ones(3)), {"axis": "1"}, 422, "invalid-input"),
    ("sort", NPY, npy_bytes(np.ones(3)), {"axis": "0", "bogus": "1"}, 422, "invalid-params"),
    ("sort", NPY, npy_bytes(np.ones(3)), {"axis": ["0", "1"]}, 422, "invalid-params"),  # type: ignore[dict-item]
    (
        "trig_log",
        "application/json",
        b'{"data": [1], "params": {"p": "' + b"x" * ENVELOPE_LIMIT + b'"}}',
        {},
        413,
        "payload-too-large",
    ),
]


@pytest.mark.parametrize(
    ("name", "content_type", "body", "query", "status", "kind"),
    BAD_INPUTS,
    ids=[f"{case[0]}-{case[5]}-{i}" for i, case in enumerate(BAD_INPUTS)],
)
async def test_bad_input_is_refused_with_a_named_problem_and_never_reaches_a_worker(
    gw: RunningGateway, name: str, content_type: str, body: bytes, query: Any, status: int, kind: str
) -> None:
    params = [(k, v) for k, values in query.items() for v in (values if isinstance(values, list) else [values])]
    reply = await post(gw, name, body, content_type, params=params)
    assert problem(reply) == (status, kind), reply[2]
    counters = gw.state.cpu.stats().counters
    assert not any(k.startswith("jobs_") for k in counters), counters
    assert_no_segments()


async def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    settings = compute_settings(load_plugins=False, max_body_bytes=1 << 20)
    async with running_gateway(settings) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        # Declared too large: the answer comes before a single body byte is sent.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /transform/trig_log HTTP/1.1\r\nHost: x\r\nContent-Type: {NPY}\r\n"
            f"Content-Length: {64 << 20}\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 413"), status_line
        writer.close()
        # Chunked, no length: refused as soon as the running count passes the limit, while the client still sends.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /transform/trig_log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"[" + b"1," * 32767 + b"1]"
        sent = 0
        answer = asyncio.ensure_future(reader.readline())
        while not answer.done() and sent < 8 << 20:
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
            await asyncio.sleep(0)
        status_line = await asyncio.wait_for(answer, 10)
        assert status_line.startswith(b"HTTP/1.1 413"), status_line
        assert sent < 4 << 20, f"the client could send {sent} bytes before the refusal"
        writer.close()
        assert_no_segments()


async def test_an_answer_in_json_of_a_large_array_is_streamed_from_shared_memory(gw: RunningGateway) -> None:
    x = RNG.standard_normal((512, 512))
    status, headers, body = await post_npy(gw, "sort", x, accept="application/json", axis="1")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    np.testing.assert_array_equal(np.array(orjson.loads(body)["result"]), np.sort(x, axis=1))
    assert gw.state.cpu.stats().counters["shm_outputs"] == 1


def test_npy_helper_round_trips() -> None:
    buf = io.BytesIO(npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", b"\0" * 16))
    assert np.load(buf).tolist() == [0.0, 0.0]
