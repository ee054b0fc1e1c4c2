"""Database sources: a named query against a local PostgreSQL through the gateway's bounded DB thread executor.

Two measurements per executor size:
  - the ceiling: closed loop, a query that takes 2 ms on the server, more requests in flight than threads;
  - the loop's lag while the executor is saturated but the loop is not: open loop at 1.5× what the executor can
    do with a 100 ms query, so queries always queue (and the excess is refused as ``overloaded``) while the loop
    has little to do. Lag there is what the executor's threads cost the loop (the GIL), not a busy loop.
"""

from __future__ import annotations

import threading
from typing import Any

from bench.harness import Bench, Goal
from bench.stats import fmt_spread, spread
from bench.variants import VARIANTS

FAST_SQL = "SELECT %(id)s::int AS id, 'widget'::text AS name, 9.99::float8 AS price FROM pg_sleep(0.002)"
SLOW_S = 0.1
SLOW_SQL = f"SELECT %(id)s::int AS id, 'widget'::text AS name, 9.99::float8 AS price FROM pg_sleep({SLOW_S})"
FAST_BODY = b'{"sources": {"item": {"query": "item", "params": {"id": 42}}}}'
SLOW_BODY = b'{"sources": {"item": {"query": "slow", "params": {"id": 42}}}, "deadline_ms": 2000}'
CONNECTIONS = 64  # in flight: above the largest executor, within threads + queue_limit (64) of the smallest
OVERSUBSCRIBE = 1.5
LAG_GOAL_MS = 5.0
METRICS = ("rps", "cpu_us_per_req", "loop_lag_p99_ms", "loop_lag_max_ms", "source_failures", "others_on_server_cpu")


_PG_KEY = "postgres"


def prestart(bench: Bench) -> None:
    """Start PostgreSQL in the background (initdb takes seconds) while earlier scenarios start their processes.
    Started from the harness, which runs on the load CPU: PostgreSQL and its backends inherit that affinity."""
    from app.demo.postgres import EmbeddedPostgres

    pg = EmbeddedPostgres()
    bench.stack.callback(pg.close)
    outcome: dict[str, BaseException | None] = {}

    def start() -> None:
        try:
            pg.start()
            outcome["error"] = None
        except BaseException as exc:  # handed to the scenario, which reports it
            outcome["error"] = exc

    thread = threading.Thread(target=start, name="postgres-start", daemon=True)
    thread.start()
    bench.background[_PG_KEY] = (pg, thread, outcome)


def start_postgres(bench: Bench) -> str:
    """The DSN of the harness's PostgreSQL, started now unless prestart() already began it."""
    if _PG_KEY not in bench.background:
        prestart(bench)
    pg, thread, outcome = bench.background[_PG_KEY]
    thread.join(timeout=120)
    error = outcome.get("error", TimeoutError("PostgreSQL did not start within 120 s"))
    if error is not None:
        raise RuntimeError(f"PostgreSQL did not start: {error}") from error
    return str(pg.dsn)


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    bench.say("database: starting PostgreSQL")
    dsn = start_postgres(bench)
    queries = {
        "item": {"sql": FAST_SQL, "params": {"id": "int"}},
        "slow": {"sql": SLOW_SQL, "params": {"id": "int"}, "timeout_ms": 5000},
    }
    variants = {}
    for size in p.db_sizes:
        database = {"executor_threads": size, "min_connections": min(2, size), "queue_limit": 64}
        variants[size] = bench.start(
            [VARIANTS["gateway"]], {}, tag=f"-db{size}", database=database, queries=queries,
            env={"GATEWAY_DATABASE_URL": dsn},
        )["gateway"]  # fmt: skip
    fast = bench.body_file("database", FAST_BODY)
    slow = bench.body_file("database-slow", SLOW_BODY)
    ceiling: dict[int, list[dict[str, Any]]] = {size: [] for size in p.db_sizes}
    saturated: dict[int, list[dict[str, Any]]] = {size: [] for size in p.db_sizes}
    for v in variants.values():
        bench.closed(v, fast, seconds=p.warmup_s, connections=CONNECTIONS)
    for rnd in range(p.rounds):
        for size, v in variants.items():
            r = bench.closed(v, fast, seconds=p.db_s, connections=CONNECTIONS)
            ceiling[size].append(r)
            rate = OVERSUBSCRIBE * size / SLOW_S
            s = bench.open(v, slow, rate=rate, seconds=max(1.0, p.db_s), warmup=SLOW_S * 2)
            saturated[size].append(s)
            bench.say(
                f"  executor {size} round {rnd + 1}: ceiling {r['rps']:.0f} req/s; saturated at {rate:.0f} req/s: "
                f"loop lag p99 {s.get('loop_lag_p99_ms')} ms, {s.get('source_failures')} sources refused or late"
            )
    bench.stop(variants.values())

    def summarize(runs: dict[int, list[dict[str, Any]]]) -> dict[int, dict[str, Any]]:
        return {
            size: {m: spread([r[m] for r in rs if r.get(m) is not None]) for m in METRICS} for size, rs in runs.items()
        }

    result: dict[str, Any] = {
        "fast_sql": FAST_SQL, "slow_sql": SLOW_SQL, "connections": CONNECTIONS,
        "ceiling": summarize(ceiling), "saturated": summarize(saturated),
        "saturated_rates": {size: OVERSUBSCRIBE * size / SLOW_S for size in p.db_sizes},
        "runs": {"ceiling": ceiling, "saturated": saturated},
    }  # fmt: skip
    lags = {size: s["loop_lag_p99_ms"]["median"] for size, s in result["saturated"].items() if s["loop_lag_p99_ms"]}
    worst = max(lags.values(), default=None)
    others = spread([r["others_on_server_cpu"] for rs in saturated.values() for r in rs if "others_on_server_cpu" in r])
    met = None if worst is None else worst < LAG_GOAL_MS
    why = (
        "From the gateway's loop-lag histogram (interpolated within its buckets), with the executor saturated and "
        "the loop mostly idle. Executor threads compete with the loop for the GIL: a thread holds it while "
        "psycopg2 builds rows and Python code runs, and the loop may wait up to the 5 ms switch interval to get "
        "it back"
        + (f"; other processes used {others['median']:.0%} of the gateway's CPU meanwhile." if others else ".")
    )
    remedy = (
        "a shorter GIL switch interval (sys.setswitchinterval) and no more executor threads than the ceiling needs; "
        "a quiet machine for the tails."
    )
    bench.goals.append(
        Goal(
            "database",
            f"loop lag p99 < {LAG_GOAL_MS:g} ms while the DB executor is saturated",
            "n/a" if worst is None else f"{worst:.2f} ms (worst executor size: {max(lags, key=lambda k: lags[k])})",
            met,
            "" if met else why,
            "" if met else remedy,
        )
    )
    return result


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    lines = [
        "## Database sources (named query through the DB thread executor)",
        "",
        f"One query source per request; PostgreSQL runs locally on the load CPU. **Ceiling**: closed loop with "
        f"{result['connections']} connections and a query that sleeps 2 ms on the server (`{result['fast_sql']}`). "
        f"**Saturated executor**: open loop at {OVERSUBSCRIBE:g}× what the executor can do with a "
        f"{SLOW_S * 1000:.0f} ms query, so queries always queue and the excess is refused at once as `overloaded` "
        "(counted under *refused or late*), while the loop itself has little to do. Median (min–max) over rounds.",
        "",
        "| DB executor threads | ceiling req/s | CPU µs/req | saturated: offered req/s | loop lag p99 ms "
        "| refused or late | others on its CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, c in result["ceiling"].items():
        s = result["saturated"][size]
        lines.append(
            f"| {size} | {fmt_spread(c['rps'])} | {fmt_spread(c['cpu_us_per_req'])} "
            f"| {result['saturated_rates'][size]:.0f} | {fmt_spread(s['loop_lag_p99_ms'], '{:.2f}')} "
            f"| {fmt_spread(s['source_failures'])} "
            f"| {fmt_spread(s['others_on_server_cpu'], '{:.2f}')} |"
        )
    return lines
