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
from bench.profiling import profile_under_load
from bench.stats import fmt_spread, spread
from bench.variants import VARIANTS, Variant, has_setting

NPY = "application/x-npy"
SHM_GOAL = 5.0
WORKERS_GOAL = 1.8
LAG_GOAL_MS = 5.0
BODY_LIMIT = 600 * 2**20


def compute_limits() -> dict[str, int]:
    """Builds with their own caps on transform bodies get them raised to fit the largest array (256 MB float64)."""
    wanted = (("max_body_bytes", BODY_LIMIT), ("max_elements", 64 * 2**20))
    return {key: value for key, value in wanted if has_setting(f"compute.{key}")}


JOB_TARGET_S = 0.05  # calibrate the pure-Python job to about this long
CONNECTIONS = 4  # two jobs per worker in flight at most: both cores busy, none idle waiting
PROFILE_S = 1.0


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
        try:
            result["workers"] = workers(bench, python[0], npy_ok=python[0] in npy)
        except RuntimeError as exc:
            result["missing"].append(str(exc))
            result["why"]["workers"] = str(exc)
    result["gil"] = gil_thread(bench, (result["workers"] or {}).get("job_s", JOB_TARGET_S))
    goals(bench, result)
    return result


def shm_vs_pickle(bench: Bench, name: str, setting: str) -> dict[str, Any]:
    p = bench.profile
    modes = {"shm": 1, "pickle": 2**50}
    variants = bench.start_gateways(
        {
            mode: {
                "tag": f"-{mode}",
                "limits": {"max_body_bytes": BODY_LIMIT},
                "compute": {"enabled": True, "workers": 1, setting: threshold, **compute_limits()},
            }
            for mode, threshold in modes.items()
        }
    )
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
    biggest = max(p.transform_mb)
    body = npy_bytes(np.linspace(0.0, 1.0, biggest * 2**20 // 8, dtype=np.float64))
    shm_gateway = variants["shm"]

    def load() -> None:
        started = time.perf_counter()
        for _ in range(50):  # bounded; enough requests to outlast the profile
            post_timed(shm_gateway, name, body, NPY)
            if time.perf_counter() - started > PROFILE_S + 1:
                return

    out["profile"] = profile_under_load(
        shm_gateway.service.pid, PROFILE_S, load, bench.workdir.parent / f"profile-gateway-transform-{biggest}mb.txt"
    )
    out["profile"]["mb"] = biggest
    bench.stop(variants.values())
    return out


# Inputs tried for the pure-Python transform, in order, each grown ×4 until a job takes JOB_TARGET_S: two integers
# [0, n] (work that grows with the values, such as a sieve: a tiny body), then n integers, then n floats.
SHAPES = ("values", "integers", "floats")


def _python_body(shape: str, n: int, npy_ok: bool) -> tuple[bytes, str]:
    if shape == "values":
        array: np.ndarray[Any, Any] = np.array([0, n], dtype=np.int64)
    elif shape == "integers":
        array = np.arange(n, dtype=np.int64)
    else:
        array = np.linspace(0.0, 1.0, n, dtype=np.float64)
    if npy_ok:
        return npy_bytes(array), NPY
    return orjson.dumps({"data": array.tolist()}), "application/json"


def calibrate(v: Variant, name: str, npy_ok: bool) -> tuple[str, int, float, bytes, str]:
    """A body whose job takes about JOB_TARGET_S; raises RuntimeError when no input shape gets there."""
    tried = []
    for shape in SHAPES:
        n = 1024
        while n <= 64 * 2**20:  # bounded: at most 8 steps per shape
            body, ctype = _python_body(shape, n, npy_ok)
            job_s, status, _ = post_timed(v, name, body, ctype)
            if status != 200:
                tried.append(f"{shape} n={n}: {status}")
                break
            if job_s >= JOB_TARGET_S:
                return shape, n, job_s, body, ctype
            n *= 4
        else:
            tried.append(f"{shape}: under {JOB_TARGET_S * 1000:.0f} ms up to n={n // 4}")
    raise RuntimeError(f"no input makes {name} take {JOB_TARGET_S * 1000:.0f} ms ({'; '.join(tried)})")


def workers(bench: Bench, name: str, *, npy_ok: bool) -> dict[str, Any]:
    p = bench.profile
    variants = {
        int(key): v
        for key, v in bench.start_gateways(
            {
                str(w): {
                    "tag": f"-w{w}",
                    "limits": {"max_body_bytes": BODY_LIMIT},
                    "compute": {"enabled": True, "workers": w, **compute_limits()},
                }
                for w in (1, 2)
            },
            unpinned=True,
        ).items()
    }
    shape, n, job_s, body, ctype = calibrate(variants[1], name, npy_ok)
    path = bench.body_file("python-transform", body)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for _ in range(p.rounds):
        for w, v in variants.items():
            before = v.service.children_cpu_seconds()
            r = bench.closed(
                v, path, seconds=p.workers_s, path=f"/transform/{name}", connections=CONNECTIONS, content_type=ctype
            )
            r["workers_core_share"] = round((v.service.children_cpu_seconds() - before) / r["elapsed_s"], 2)
            runs[w].append(r)
    bench.stop(variants.values())
    rps = {w: [r["rps"] for r in rs] for w, rs in runs.items()}
    ratio = spread([b / a for a, b in zip(rps[1], rps[2], strict=True) if a > 0])
    lag = spread([r["loop_lag_p99_ms"] for r in runs[2] if r.get("loop_lag_p99_ms") is not None])
    shares = {
        "workers": spread([r["workers_core_share"] for r in runs[2]]),
        "gateway": spread([r["cpu_util"] for r in runs[2]]),
    }
    return {
        "transform": name, "input": shape, "n": n, "job_s": job_s, "runs": runs, "ratio": ratio, "loop_lag_p99_ms": lag,
        "core_shares": shares,
    }  # fmt: skip


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


def _profile_note(prof: dict[str, Any] | None) -> str:
    if not prof or "top_self" not in prof:
        return ""
    top = ", ".join(f"`{name}` {share:.0%}" for name, share in prof["top_self"][:5])
    return f" The gateway's loop thread during {prof['mb']} MB requests (py-spy, self time): {top}."


def goals(bench: Bench, result: dict[str, Any]) -> None:
    why_shm = result["why"].get("shm", "")
    missing = result["why"].get("workers", "")
    shm = result["shm"]
    big = [e for mb, e in (shm or {}).get("sizes", {}).items() if mb >= 64 and e["ratio"] is not None]
    shm_met = (min(e["ratio"] for e in big) >= SHM_GOAL) if big else None
    bench.goals.append(
        Goal(
            "transforms",
            f"shared memory ≥ {SHM_GOAL:g}× faster than pickle end to end at ≥ 64 MB",
            f"{min(e['ratio'] for e in big):.1f}×" if big else "n/a",
            shm_met,
            (why_shm or "no size ≥ 64 MB in this profile")
            if not big
            else (
                ""
                if shm_met
                else "End to end, both transports also pay the HTTP upload and download of the array and its .npy "
                "checks; only the hop to the worker differs, and it is not where the time goes."
                + _profile_note(shm.get("profile") if shm else None)
            ),
            ""
            if shm_met or not big
            else "take the copies the profile shows off the loop: read the body straight "
            "into the segment the worker maps, and answer from the segment the worker wrote.",
        )
    )
    w = result["workers"]
    shares = (w or {}).get("core_shares", {})
    workers_met = (w["ratio"]["median"] >= WORKERS_GOAL) if w and w["ratio"] else None
    bench.goals.append(
        Goal(
            "transforms",
            f"2 workers ≥ {WORKERS_GOAL:g}× 1 worker on the pure-Python transform",
            f"{fmt_spread(w['ratio'], '{:.2f}')}×" if w and w["ratio"] else "n/a",
            workers_met,
            missing
            if not w
            else (
                ""
                if workers_met
                else f"With 2 workers, the workers used {fmt_spread(shares.get('workers'), '{:.2f}')} of the 2 "
                f"cores and the gateway's own process {fmt_spread(shares.get('gateway'), '{:.2f}')}; the load "
                "generator and other processes had the rest. On 2 cores the second worker has no core of its own."
            ),
            ""
            if workers_met or not w
            else "a core per worker plus one for the loop and the clients; "
            "it is the machine, not the pool, that caps the speed-up here.",
        )
    )
    lag = w["loop_lag_p99_ms"] if w else None
    gil = result["gil"]["loop_lag_p99_ms"] if result["gil"] else None
    lag_met = (lag["median"] < LAG_GOAL_MS) if lag else None
    thread = f"The same work in a thread of the serving process: {fmt_spread(gil, '{:.1f}')} ms." if gil else ""
    bench.goals.append(
        Goal(
            "transforms",
            f"loop lag p99 < {LAG_GOAL_MS:g} ms while both cores run transforms",
            f"{fmt_spread(lag, '{:.2f}')} ms" if lag else "n/a",
            lag_met,
            " ".join(
                x
                for x in (
                    thread,
                    ""
                    if lag_met or not w
                    else "The loop's thread competes with two CPU-bound workers for 2 cores "
                    "and waits for the scheduler, not for the GIL.",
                    "" if w else missing,
                )
                if x
            ),
            ""
            if lag_met or not w
            else "leave the loop a core (compute.workers = usable CPUs − 1), or run the "
            "workers at a lower priority (os.nice in the worker initializer) so that the loop preempts them.",
        )
    )


def _describe_input(w: dict[str, Any]) -> str:
    return {"values": f"input [0, {w['n']}]", "integers": f"{w['n']} integers", "floats": f"{w['n']} floats"}[
        w["input"]
    ]


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
            f"Pure-Python transform `{w['transform']}` ({_describe_input(w)}, about {w['job_s'] * 1000:.0f} ms "
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
