"""Database sources: a named query against a local PostgreSQL through the gateway's bounded DB thread executor.
Ceiling against the executor size, and the event loop's lag while the executor is saturated (more requests in
flight than threads, so queries always queue)."""

from __future__ import annotations

from typing import Any

from bench.harness import Bench, Goal
from bench.stats import fmt_spread, spread
from bench.variants import VARIANTS

# 2 ms on the server per query: the executor's size, not PostgreSQL's CPU, is what a query's latency exposes.
QUERY_SQL = "SELECT %(id)s::int AS id, 'widget'::text AS name, 9.99::float8 AS price FROM pg_sleep(0.002)"
BODY = b'{"sources": {"item": {"query": "item", "params": {"id": 42}}}}'
CONNECTIONS = 64  # in flight: above the largest executor, within threads + queue_limit (64) of the smallest
LAG_GOAL_MS = 5.0


def start_postgres(bench: Bench) -> str:
    from app.demo.postgres import EmbeddedPostgres

    pg = EmbeddedPostgres()
    # Started from the harness, which runs on the load CPU: PostgreSQL and its backends inherit that affinity.
    bench.stack.enter_context(pg)
    return str(pg.dsn)


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    bench.say("database: starting PostgreSQL")
    dsn = start_postgres(bench)
    variants = {}
    for size in p.db_sizes:
        database = {"executor_threads": size, "min_connections": min(2, size), "queue_limit": 64}
        queries = {"item": {"sql": QUERY_SQL, "params": {"id": "int"}}}
        variants[size] = bench.start(
            [VARIANTS["gateway"]],
            {},
            tag=f"-db{size}",
            database=database,
            queries=queries,
            env={"GATEWAY_DATABASE_URL": dsn},
        )["gateway"]
    body = bench.body_file("database", BODY)
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in p.db_sizes}
    for v in variants.values():
        bench.closed(v, body, seconds=p.warmup_s, connections=CONNECTIONS)
    for rnd in range(p.rounds):
        for size, v in variants.items():
            r = bench.closed(v, body, seconds=p.db_s, connections=CONNECTIONS)
            runs[size].append(r)
            bench.say(
                f"  executor {size} round {rnd + 1}: {r['rps']:.0f} req/s, loop lag p99 {r.get('loop_lag_p99_ms')} ms, "
                f"{r.get('source_failures')} source failures"
            )
    for v in variants.values():
        v.service.stop()
    summary = {
        size: {
            m: spread([r[m] for r in rs if r.get(m) is not None])
            for m in (
                "rps",
                "cpu_us_per_req",
                "loop_lag_p99_ms",
                "loop_lag_max_ms",
                "source_failures",
                "others_on_server_cpu",
            )
        }
        for size, rs in runs.items()
    }
    worst = max(
        (s["loop_lag_p99_ms"]["median"] for s in summary.values() if s["loop_lag_p99_ms"] is not None), default=None
    )
    others = spread([r["others_on_server_cpu"] for rs in runs.values() for r in rs if "others_on_server_cpu" in r])
    met = None if worst is None else worst < LAG_GOAL_MS
    bench.goals.append(
        Goal(
            "database",
            f"loop lag p99 < {LAG_GOAL_MS:g} ms while the DB executor is saturated",
            "n/a" if worst is None else f"{worst:.2f} ms (worst executor size)",
            met,
            "From the gateway's loop-lag histogram (interpolated within its buckets). Executor threads compete "
            "with the loop for the GIL: a thread holds it while psycopg2 builds rows and Python code runs, and "
            "the loop may wait up to the 5 ms switch interval to get it back"
            + (f"; other processes used {others['median']:.0%} of the gateway's CPU meanwhile." if others else "."),
            ""
            if met
            else "a shorter GIL switch interval (sys.setswitchinterval) and fewer executor threads than "
            "the ceiling needs no more of; a quiet machine for the tails.",
        )
    )
    return {"sql": QUERY_SQL, "connections": CONNECTIONS, "runs": runs, "summary": summary}


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    lines = [
        "## Database sources (named query through the DB thread executor)",
        "",
        f"One query source per request; the query sleeps 2 ms on the server (`{result['sql']}`). Closed loop with "
        f"{result['connections']} connections, so the executor is saturated and queries queue. PostgreSQL runs "
        "locally on the load CPU. Median (min–max) over rounds.",
        "",
        "| DB executor threads | req/s | CPU µs/req | loop lag p99 ms | loop lag max ms | source failures "
        "| others on its CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, s in result["summary"].items():
        lines.append(
            f"| {size} | {fmt_spread(s['rps'])} | {fmt_spread(s['cpu_us_per_req'])} "
            f"| {fmt_spread(s['loop_lag_p99_ms'], '{:.2f}')} | {fmt_spread(s['loop_lag_max_ms'], '{:.1f}')} "
            f"| {fmt_spread(s['source_failures'])} | {fmt_spread(s['others_on_server_cpu'], '{:.2f}')} |"
        )
    return lines
