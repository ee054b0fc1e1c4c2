"""The ``gateway`` command: serve, demo, check-config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="A production-grade API gateway in Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="TOML config file (GATEWAY_* variables override it)")
    serve.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default from config: 8080; 0 picks a free one)")

    demo = sub.add_parser("demo", help="run the whole product locally: PostgreSQL, two upstreams, the gateway")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument("--latency-ms", type=float, default=20.0, help="demo upstream latency")
    demo.add_argument("--failure-rate", type=float, default=0.05, help="demo upstream failure probability")

    check = sub.add_parser("check-config", help="validate a config file without serving")
    check.add_argument("config", type=Path)

    doctor = sub.add_parser("doctor", help="check this host against the config before deploying")
    doctor.add_argument("--config", type=Path, help="TOML config file (GATEWAY_* variables override it)")
    doctor.add_argument("--replicas", type=int, default=1, help="gateway replicas sharing the database")
    doctor.add_argument("--shm-path", type=Path, default=Path("/dev/shm"), help="shared-memory mount to check")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        sys.exit(_check_config(args.config))
    if args.command == "serve":
        sys.exit(_serve(args.config, args.host, args.port))
    if args.command == "doctor":
        sys.exit(_doctor(args.config, args.replicas, args.shm_path))
    if args.command == "demo":
        from app.demo.runner import run_demo

        sys.exit(run_demo(port=args.port, latency_ms=args.latency_ms, failure_rate=args.failure_rate))


def _check_config(path: Path) -> int:
    from app.settings import load_settings

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"{path}: invalid", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(
        f"{path}: ok ({len(settings.upstreams)} upstreams, {len(settings.queries)} queries, "
        f"{len(settings.composites)} composites)"
    )
    return 0


def _doctor(config: Path | None, replicas: int, shm_path: Path) -> int:
    from app.diagnostics.doctor import run_doctor
    from app.settings import load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return run_doctor(settings, replicas=replicas, shm_path=shm_path)


def _serve(config: Path | None, host: str | None, port: int | None) -> int:
    # First, before the heavy imports: as PID 1 a SIGTERM that finds no handler is dropped, not acted on.
    from app.lifecycle.signals import EarlySignals

    early = EarlySignals().install()

    from app.lifecycle.server import serve
    from app.observability.logging import configure_logging
    from app.settings import ServerSettings, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        try:
            server = ServerSettings(**{**settings.server.model_dump(), **overrides})
        except ValueError as exc:
            print(f"invalid --host/--port: {exc}", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"server": server})
    configure_logging(
        settings.server.log_level, settings.server.log_format, access_log=settings.observability.access_log
    )
    return serve(settings, early=early)
