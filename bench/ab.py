"""``python -m bench.ab --against REV``: this working tree's gateway against another revision's, side by side.

For an optimisation's proof: both builds run at once on the server CPU, each round loads every build once (in a
rotated order), and the ratios are paired within a round. A second copy of the other revision runs as a control
(A/A): the spread of its ratio is the noise floor of this machine, and an effect smaller than that is no effect.

    python -m bench.ab --against HEAD~1 --n 8 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import PROFILES, Bench
from bench.procs import Pinning, Service, free_port
from bench.stats import fmt_spread, paired_ratio, spread
from bench.tools import ensure_tools
from bench.variants import GATEWAY_ENV, VARIANTS, Variant, aggregate_body, toml, upstream_names

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    """The app package of ``rev``, as committed, in its own folder."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "app"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def minimal_config(upstreams: dict[str, str]) -> dict[str, Any]:
    """Only settings every revision has, so that both builds read the same file (loop, metrics and logs at their
    defaults: uvloop, on, JSON)."""
    return {
        "server": {"host": "127.0.0.1", "log_format": "json"},
        "http": {"max_connections": 1024, "max_in_flight": 1024},
        "compute": {"enabled": False},
        "upstreams": {name: {"base_url": url, "max_concurrency": 512} for name, url in upstreams.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("--against", required=True, help="a git revision (e.g. HEAD~1, main)")
    p.add_argument("--n", type=int, default=8, help="sources per aggregate")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=int, default=2, help="one closed-loop run")
    args = p.parse_args(argv)
    pinning = Pinning.detect()
    tools = ensure_tools(install=True, say=print)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        trees = {
            "this": ROOT,
            "other": export(args.against, work / "other"),
            "other (control)": export(args.against, work / "control"),
        }
        bench = Bench(PROFILES["quick"], work, tools, pinning, print)
        with bench.stack:
            upstream = bench.upstream(0)
            variants: dict[str, Variant] = {}
            for name, tree in trees.items():
                port = free_port()
                config = work / f"{len(variants)}.toml"
                config.write_text(toml(minimal_config(upstream_names(args.n, upstream))))
                # `python -m app` from the tree's folder imports that tree's app package.
                argv_ = [
                    "bash",
                    "-c",
                    f"cd {tree} && exec {sys.executable} -m app serve --config {config} --port {port}",
                ]
                health = f"http://127.0.0.1:{port}/readyz"
                service = Service(f"ab-{len(variants)}", argv_, cpus=pinning.every, health_url=health, log_dir=work,
                                  env=GATEWAY_ENV)  # fmt: skip
                bench.own(service.start())
                variants[name] = Variant(VARIANTS["gateway"], service, f"http://127.0.0.1:{port}")
            for v in variants.values():
                v.service.wait_ready()
                v.service.pin(pinning.server)
            body = bench.body_file("ab", aggregate_body(args.n))
            for v in variants.values():
                bench.closed(v, body, seconds=1)
            cpu: dict[str, list[float | None]] = {k: [] for k in variants}
            rps: dict[str, list[float | None]] = {k: [] for k in variants}
            keys = list(variants)
            for rnd in range(args.rounds):
                for key in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:
                    r = bench.closed(variants[key], body, seconds=args.seconds)
                    cpu[key].append(r["cpu_us_per_req"])
                    rps[key].append(r["rps"])
    result = {
        key: {
            "cpu_us_per_req": spread([c for c in cpu[key] if c is not None]),
            "rps": spread([r for r in rps[key] if r is not None]),
            "cpu_vs_other": paired_ratio(cpu[key], cpu["other"]),
            "rps_vs_other": paired_ratio(rps[key], rps["other"]),
        }
        for key in variants
    }
    print(f"\nN = {args.n}, {args.rounds} rounds of {args.seconds} s; ratios paired within rounds, median (min–max)")
    for key, r in result.items():
        print(
            f"{key:16s} CPU µs/req {fmt_spread(r['cpu_us_per_req'])}  req/s {fmt_spread(r['rps'])}  "
            f"CPU vs other {fmt_spread(r['cpu_vs_other'], '{:.3f}')}  req/s vs other "
            f"{fmt_spread(r['rps_vs_other'], '{:.3f}')}"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
