"""Transforms in the process pool: pickle vs shared memory for large float64 arrays, 1 vs 2 workers on a
pure-Python transform, and the event loop's lag while both cores run transforms, against the same kind of work
run in a thread of the serving process (which holds the GIL).

Built against the described behaviour: ``POST /transform/{name}`` taking ``application/x-npy`` bodies, shared
memory above a threshold (a ``[compute]`` setting whose name mentions ``shm`` or ``shared``), and a transform
described as pure Python. Each part that this build lacks is reported as not available, never guessed.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from typing import Any

import numpy as np
import orjson

from bench.harness import Bench, Goal
from bench.procs import Service, free_port, http_request
from bench.stats import fmt_spread, spread
from bench.variants import VARIANTS, Variant

NPY = "application/x-npy"
SHM_GOAL = 5.0
WORKERS_GOAL = 1.8
LAG_GOAL_MS = 5.0
BODY_LIMIT = 600 * 2**20
JOB_TARGET_S = 0.05  # calibrate the pure-Python job to about this long
CONNECTIONS = 4  # two jobs per worker in flight at most: both cores busy, none idle waiting


def npy_bytes(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def shm_setting() -> str | None:
    from app.settings import ComputeSettings

    for name in ComputeSettings.model_fields:
        if ("shm" in name or "shared" in name) and ("threshold" in name or "min" in name or "bytes" in name):
            return name
    return None


def listed(v: Variant) -> list[dict[str, str]]:
    status, body, _ = http_request(v.url + "/transform")
    if status != 200:
        return []
    items: list[dict[str, str]] = orjson.loads(body).get("transforms", [])
    return items


def accepts_npy(v: Variant, name: str) -> tuple[bool, str]:
    status, _body, headers = http_request(
        f"{v.url}/transform/{name}", method="POST", body=npy_bytes(np.arange(8, dtype=np.float64)), content_type=NPY
    )
    return status == 200, f"{status} {headers.get('content-type', '')}".strip()


def post_timed(v: Variant, name: str, body: bytes, content_type: str) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    status, out, _ = http_request(
        f"{v.url}/transform/{name}", method="POST", body=body, content_type=content_type, timeout=300
    )
    return time.perf_counter() - started, status, out


def run(bench: Bench) -> dict[str, Any]:
    result: dict[str, Any] = {"shm": None, "workers": None, "gil": None, "missing": [], "why": {}}
    probe = bench.start(
        [VARIANTS["gateway"]],
        {},
        tag="-tprobe",
        compute={"enabled": True, "workers": 1},
        limits={"max_body_bytes": BODY_LIMIT},
    )["gateway"]
    transforms = listed(probe)
    result["listed"] = transforms
    npy = [t["name"] for t in transforms if accepts_npy(probe, t["name"])[0]]
    why_npy = "; ".join(f"{t['name']}: {accepts_npy(probe, t['name'])[1]}" for t in transforms) or "none listed"
    python = [t["name"] for t in transforms if "python" in (t["name"] + t.get("description", "")).lower()]
    probe.service.stop()

    setting = shm_setting()
    shm_missing = []
    if not npy:
        shm_missing.append(f"no transform accepts {NPY} bodies in this build ({why_npy})")
    if setting is None:
        shm_missing.append("no shared-memory threshold setting in [compute] in this build")
    result["missing"] += shm_missing
    result["why"]["shm"] = "; ".join(shm_missing)
    if npy and setting is not None:
        result["shm"] = shm_vs_pickle(bench, npy[0], setting)
    if not python:
        result["missing"].append("no pure-Python transform is listed by GET /transform in this build")
        result["why"]["workers"] = result["missing"][-1]
    else:
        result["workers"] = workers(bench, python[0], npy_ok=python[0] in npy)
    result["gil"] = gil_thread(bench, (result["workers"] or {}).get("job_s", JOB_TARGET_S))
    goals(bench, result)
    return result


def shm_vs_pickle(bench: Bench, name: str, setting: str) -> dict[str, Any]:
    p = bench.profile
    modes = {"shm": 1, "pickle": 2**50}
    variants = {
        mode: bench.start(
            [VARIANTS["gateway"]],
            {},
            tag=f"-{mode}",
            limits={"max_body_bytes": BODY_LIMIT},
            compute={"enabled": True, "workers": 1, setting: threshold},
        )["gateway"]
        for mode, threshold in modes.items()
    }
    out: dict[str, Any] = {"transform": name, "setting": setting, "sizes": {}}
    for mb in p.transform_mb:
        array = np.linspace(0.0, 1.0, mb * 2**20 // 8, dtype=np.float64)
        body = npy_bytes(array)
        times: dict[str, list[float]] = {m: [] for m in modes}
        statuses: set[int] = set()
        before = {mode: bench.scrape(v) for mode, v in variants.items()}
        for _ in range(p.transform_reps):
            for mode, v in variants.items():
                secs, status, answer = post_timed(v, name, body, NPY)
                statuses.add(status)
                if status == 200 and len(answer) < len(body) // 2:
                    statuses.add(-1)  # an answer too small to be the transformed array
                times[mode].append(secs)
        entry: dict[str, Any] = {m: statistics.median(t) for m, t in times.items()}
        entry["ratio"] = entry["pickle"] / entry["shm"] if entry["shm"] > 0 else None
        entry["statuses"] = sorted(statuses)
        entry["loop_lag_p99_ms"] = {
            mode: bench.gateway_window(v, before[mode]).get("loop_lag_p99_ms") for mode, v in variants.items()
        }
        out["sizes"][mb] = entry
        bench.say(f"  transform {mb} MB: shm {entry['shm']:.3f} s, pickle {entry['pickle']:.3f} s")
    for v in variants.values():
        v.service.stop()
    return out


def _python_body(n: int, npy_ok: bool) -> tuple[bytes, str]:
    array = np.linspace(0.0, 1.0, n, dtype=np.float64)
    if npy_ok:
        return npy_bytes(array), NPY
    return orjson.dumps({"data": array.tolist()}), "application/json"


def workers(bench: Bench, name: str, *, npy_ok: bool) -> dict[str, Any]:
    p = bench.profile
    variants = {
        w: bench.start(
            [VARIANTS["gateway"]],
            {},
            tag=f"-w{w}",
            unpinned=True,
            limits={"max_body_bytes": BODY_LIMIT},
            compute={"enabled": True, "workers": w},
        )["gateway"]
        for w in (1, 2)
    }
    n, job_s = 1024, 0.0
    while n < 64_000_000:  # calibrate: a job of about JOB_TARGET_S, bounded in steps
        body, ctype = _python_body(n, npy_ok)
        job_s, status, _ = post_timed(variants[1], name, body, ctype)
        if status != 200 or job_s >= JOB_TARGET_S:
            break
        n *= 4
    path = bench.body_file("python-transform", body)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for _ in range(p.rounds):
        for w, v in variants.items():
            runs[w].append(
                bench.closed(
                    v, path, seconds=p.workers_s, path=f"/transform/{name}", connections=CONNECTIONS, content_type=ctype
                )
            )
    for v in variants.values():
        v.service.stop()
    rps = {w: [r["rps"] for r in rs] for w, rs in runs.items()}
    ratio = spread([b / a for a, b in zip(rps[1], rps[2], strict=True) if a > 0])
    lag = spread([r["loop_lag_p99_ms"] for r in runs[2] if r.get("loop_lag_p99_ms") is not None])
    return {"transform": name, "elements": n, "job_s": job_s, "runs": runs, "ratio": ratio, "loop_lag_p99_ms": lag}


def gil_thread(bench: Bench, job_s: float) -> dict[str, Any]:
    """The same kind of pure-Python work in a thread of the serving process, at the same concurrency."""
    port = free_port()
    service = Service(
        "gil-thread",
        [sys.executable, "-m", "bench.refs.gil_thread", "--port", str(port)],
        cpus=bench.pinning.every,
        health_url=f"http://127.0.0.1:{port}/healthz",
        log_dir=bench.workdir,
    )
    bench.own(service.start()).wait_ready()
    variant = Variant(VARIANTS["floor"], service, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/metrics")
    iterations = 100_000
    while iterations < 100_000_000:
        started = time.perf_counter()
        http_request(f"{variant.url}/work?iterations={iterations}", method="POST", body=b"")
        if time.perf_counter() - started >= job_s:
            break
        iterations *= 2
    body = bench.body_file("gil", b"")
    runs = [
        bench.closed(
            variant,
            body,
            seconds=bench.profile.workers_s,
            path=f"/work?iterations={iterations}",
            connections=CONNECTIONS,
        )
        for _ in range(bench.profile.rounds)
    ]
    service.stop()
    return {
        "iterations": iterations,
        "runs": runs,
        "loop_lag_p99_ms": spread([r["loop_lag_p99_ms"] for r in runs if r.get("loop_lag_p99_ms") is not None]),
    }


def goals(bench: Bench, result: dict[str, Any]) -> None:
    why_shm = result["why"].get("shm", "")
    missing = result["why"].get("workers", "")
    shm = result["shm"]
    big = [e for mb, e in (shm or {}).get("sizes", {}).items() if mb >= 64 and e["ratio"] is not None]
    bench.goals.append(
        Goal(
            "transforms",
            f"shared memory ≥ {SHM_GOAL:g}× faster than pickle end to end at ≥ 64 MB",
            f"{min(e['ratio'] for e in big):.1f}×" if big else "n/a",
            (min(e["ratio"] for e in big) >= SHM_GOAL) if big else None,
            "" if big else (why_shm or "no size ≥ 64 MB in this profile"),
        )
    )
    w = result["workers"]
    bench.goals.append(
        Goal(
            "transforms",
            f"2 workers ≥ {WORKERS_GOAL:g}× 1 worker on the pure-Python transform",
            f"{fmt_spread(w['ratio'], '{:.2f}')}×" if w and w["ratio"] else "n/a",
            (w["ratio"]["median"] >= WORKERS_GOAL) if w and w["ratio"] else None,
            "" if w else missing,
        )
    )
    lag = w["loop_lag_p99_ms"] if w else None
    gil = result["gil"]["loop_lag_p99_ms"] if result["gil"] else None
    bench.goals.append(
        Goal(
            "transforms",
            f"loop lag p99 < {LAG_GOAL_MS:g} ms while both cores run transforms",
            f"{fmt_spread(lag, '{:.2f}')} ms" if lag else "n/a",
            (lag["median"] < LAG_GOAL_MS) if lag else None,
            "; ".join(
                x
                for x in (f"same work in a thread: {fmt_spread(gil, '{:.1f}')} ms" if gil else "", "" if w else missing)
                if x
            ),
        )
    )


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    lines = ["## Transforms (process pool)", ""]
    for m in result["missing"]:
        lines.append(f"- Not available in this build: {m}.")
    if result["missing"]:
        lines.append("")
    shm = result["shm"]
    if shm:
        lines += [
            f"`POST /transform/{shm['transform']}` with an `{NPY}` body, one request at a time, median of "
            f"{bench.profile.transform_reps}; `compute.{shm['setting']}` set so that every array goes by shared "
            "memory, or every array by pickle. End to end, as the client sees it.",
            "",
            "| array MB | shared memory s | pickle s | pickle / shm | loop lag p99 ms (shm / pickle) | statuses |",
            "|---|---|---|---|---|---|",
        ]
        for mb, e in shm["sizes"].items():
            ratio = f"{e['ratio']:.1f}×" if e["ratio"] else "n/a"
            lag = e["loop_lag_p99_ms"]
            lines.append(
                f"| {mb} | {e['shm']:.3f} | {e['pickle']:.3f} | {ratio} | {lag['shm']} / {lag['pickle']} "
                f"| {e['statuses']} |"
            )
        lines.append("")
    w = result["workers"]
    if w:
        lines += [
            f"Pure-Python transform `{w['transform']}` ({w['elements']} elements, about {w['job_s'] * 1000:.0f} ms "
            f"a job), closed loop with {CONNECTIONS} connections, gateway unpinned (both cores):",
            "",
            "| workers | req/s | loop lag p99 ms |",
            "|---|---|---|",
        ]
        for n, rs in w["runs"].items():
            lags = spread([r["loop_lag_p99_ms"] for r in rs if r.get("loop_lag_p99_ms") is not None])
            lines.append(
                f"| {n} | {fmt_spread(spread([r['rps'] for r in rs]), '{:.1f}')} | {fmt_spread(lags, '{:.2f}')} |"
            )
        lines += ["", f"2 workers / 1 worker: {fmt_spread(w['ratio'], '{:.2f}')}×.", ""]
    gil = result["gil"]
    if gil:
        lines += [
            f"The same kind of pure-Python work ({gil['iterations']} iterations a job) in a thread of the serving "
            f"process (`bench/refs/gil_thread.py`, {CONNECTIONS} connections): loop lag p99 "
            f"{fmt_spread(gil['loop_lag_p99_ms'], '{:.1f}')} ms, measured with the gateway's own sampler. The thread "
            "holds the GIL for up to the switch interval at a time, and the loop waits for it.",
        ]
    return lines
