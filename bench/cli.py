"""``python -m bench``: start everything, run the scenarios, print the report, write JSON and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import report
from bench.harness import PROFILES, Bench
from bench.procs import Pinning
from bench.scenarios import balancing, chain, database, drain, fanout, hotkeys, latency, overload, transforms
from bench.tools import ensure_tools, machine

SCENARIOS: dict[str, ModuleType] = {
    "fanout": fanout,
    "latency": latency,
    "chain": chain,
    "database": database,
    "transforms": transforms,
    "overload": overload,
    "drain": drain,
    "balancing": balancing,
    "hotkeys": hotkeys,
}
ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="profile", help="about 5 minutes")
    mode.add_argument("--profile", choices=sorted(PROFILES), help="full (the default), quick, smoke")
    p.set_defaults(profile="full")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: " + ", ".join(SCENARIOS)
    )
    p.add_argument("--out", type=Path, help="results folder (default: bench/results/<profile>-<time>)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown report to write")
    p.add_argument("--no-docs", action="store_true", help="write no markdown report (JSON only)")
    p.add_argument("--no-install", action="store_true", help="never apt-get missing tools; fall back instead")
    p.add_argument("--keep-logs", action="store_true", help="keep every process's log in the results folder")
    p.add_argument("--build-label", help="what is measured, for the report (default: git describe of this tree)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = PROFILES[args.profile]
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        print(f"unknown scenarios: {', '.join(unknown)}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.UTC)
    # Absolute: services (nginx) are started with paths under it from their own working directories.
    out = (args.out or ROOT / "bench" / "results" / f"{profile.name}-{stamp:%Y%m%dT%H%M%SZ}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    pinning = Pinning.detect()
    tools = ensure_tools(install=not args.no_install, say=say)
    info = machine(tools)
    if pinning.load:
        # The harness itself (scrapes, checks, and anything it starts without taskset) stays off the server CPU.
        os.sched_setaffinity(0, {int(c) for c in pinning.load.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    bench = Bench(profile=profile, workdir=workdir, tools=tools, pinning=pinning, say=say)
    if not tools.get("wrk"):
        bench.notes.append("wrk is not installed: closed-loop runs used the harness's own generator (slower).")
    if not tools.get("nginx"):
        bench.notes.append("nginx is not installed: the zero-latency upstream is the uvloop server at 0 ms.")
    failed: list[str] = []
    with bench.stack:
        if "database" in chosen and "fanout" in chosen:
            database.prestart(bench)  # initdb overlaps the fan-out variants' start-up, which is not measured
        for key in chosen:
            say(f"scenario {key}")
            try:
                bench.results[key] = SCENARIOS[key].run(bench)
            except Exception as exc:
                failed.append(key)
                bench.notes.append(f"scenario {key} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    meta: dict[str, Any] = {
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "profile": profile.name,
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": info,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "build": args.build_label or build_label(),
        "pinning": pinning.describe(),
        "closed_loop_tool": "wrk" if tools.get("wrk") else "the harness's generator (closed-loop mode)",
        "zero_upstream": "nginx (Debian, one worker, answer from config)" if tools.get("nginx") else "uvloop server",
        "scenarios": chosen,
        "failed": failed,
    }
    sections = [(key, SCENARIOS[key].markdown) for key in chosen]
    text = report.markdown(bench, meta, sections, closing_notes(bench, failed))
    report.write_json(out / "results.json", bench, meta)
    print(text)
    if not args.no_docs:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        args.docs.write_text(text)
        report.write_json(args.docs.with_suffix(".json"), bench, meta)
        say(f"wrote {args.docs} and {args.docs.with_suffix('.json')}")
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"results in {out / 'results.json'}")
    return 1 if failed else 0


def build_label() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, timeout=10, check=False
        )
    except OSError:
        return "unknown"
    return done.stdout.decode().strip() or "unknown (not a git checkout)"


def closing_notes(bench: Bench, failed: list[str]) -> list[str]:
    lines = ["## Closing note", ""]
    missed = [g for g in bench.goals if g.met is False]
    absent = [g for g in bench.goals if g.met is None]
    for key in failed:
        lines.append(f"- **Scenario {key} did not complete**; its goals were not evaluated (see the notes above).")
    if not missed and not absent and not failed:
        lines.append("Every goal was met in this run.")
    previous = None
    for g in missed:
        if (g.note, g.remedy) == previous:
            lines.append(f"- **Missed: {g.goal}** ({g.measured}). Same cause as above.")
            continue
        previous = (g.note, g.remedy)
        remedy = f" *To close it:* {g.remedy}" if g.remedy else ""
        lines.append(f"- **Missed: {g.goal}** ({g.measured}). {g.note}{remedy}")
    for g in absent:
        lines.append(f"- **Not measured: {g.goal}.** {g.note}")
    return lines
