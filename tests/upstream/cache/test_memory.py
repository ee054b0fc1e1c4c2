"""The in-memory store: bounded by bytes, least recently used out, expired entries forgotten (injected clock)."""

from __future__ import annotations

from app.upstream.cache.entry import ENTRY_OVERHEAD, Entry, decode, encode
from app.upstream.cache.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(body: bytes, *, at: float = 1000.0, lifetime: float = 60.0, stale: float = 0.0) -> Entry:
    return Entry(200, body, {"content-type": "application/json"}, at, 0.0, lifetime, stale, False)


async def test_least_recently_used_out_first_within_the_byte_budget() -> None:
    evicted: list[int] = []
    one = entry(b"x" * 1000).size("k0")
    store = MemoryStore(3 * one, clock=Clock(), on_evict=evicted.append)
    for i in range(3):
        assert await store.put(f"k{i}", entry(b"x" * 1000))
    assert await store.get("k0") is not None  # k0 is now the most recently used; k1 the least
    assert await store.put("k3", entry(b"x" * 1000))
    assert await store.get("k1") is None
    assert all([await store.get(k) for k in ("k0", "k2", "k3")])
    assert evicted == [1]
    assert store.entries == 3
    assert store.bytes_held == 3 * one


async def test_an_entry_larger_than_the_budget_is_not_stored_and_evicts_nothing() -> None:
    store = MemoryStore(1024 * 1024, clock=Clock())
    assert await store.put("small", entry(b"s" * 100))
    assert not await store.put("big", entry(b"b" * 10 * 1024 * 1024))
    assert await store.get("big") is None
    assert await store.get("small") is not None
    assert store.bytes_held == entry(b"s" * 100).size("small") < 1024 * 1024


async def test_replacing_a_key_counts_its_bytes_once() -> None:
    store = MemoryStore(10_000, clock=Clock())
    await store.put("k", entry(b"a" * 100))
    await store.put("k", entry(b"a" * 200))
    assert store.entries == 1
    assert store.bytes_held == 200 + 1 + ENTRY_OVERHEAD + len("content-type") + len("application/json")


async def test_an_entry_past_its_stale_window_is_forgotten() -> None:
    clock = Clock()
    store = MemoryStore(10_000, clock=clock)
    await store.put("k", entry(b"a", lifetime=10, stale=5))
    clock.now += 14.9
    got = await store.get("k")
    assert got is not None
    assert not got.fresh(clock.now)
    assert got.usable_stale(clock.now)
    clock.now += 0.2
    assert await store.get("k") is None
    assert (store.entries, store.bytes_held) == (0, 0)


def test_the_shared_format_round_trips_and_refuses_what_it_does_not_know() -> None:
    e = Entry(203, b'{"a":1}\n\x00binary', {"content-type": "x/y", "etag": '"1"'}, 12.5, 3.0, 60.0, 30.0, True)
    assert decode(encode(e)) == e
    assert decode(b"not an entry") is None
    assert decode(b'{"v": 99}\nbody') is None
    assert decode(b'{"v": 1, "s": 200}\nbody') is None
