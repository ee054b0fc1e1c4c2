"""The ``gateway`` command: serve, demo, check-config, hash-key."""

from __future__ import annotations

import argparse
import contextlib
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

    hash_key = sub.add_parser(
        "hash-key",
        help="print the hash of an API key read from standard input (never from the command line)",
        description="Reads one key from standard input and prints the sha256:<hex> form to put in [[auth.keys]] "
        "hash. The key is never an argument, so it stays out of shell history and the process list.",
    )
    hash_key.add_argument(
        "--generate", action="store_true", help="generate a new random key, print it and its hash (stdin unused)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        sys.exit(_check_config(args.config))
    if args.command == "serve":
        sys.exit(_serve(args.config, args.host, args.port))
    if args.command == "doctor":
        sys.exit(_doctor(args.config, args.replicas, args.shm_path))
    if args.command == "hash-key":
        sys.exit(_hash_key(generate=args.generate))
    if args.command == "demo":
        from app.demo.runner import run_demo

        sys.exit(run_demo(port=args.port, latency_ms=args.latency_ms, failure_rate=args.failure_rate))


def _check_config(path: Path) -> int:
    from app.preflight import EXIT_INVALID, config_problems, report
    from app.settings import load_settings

    try:
        settings = load_settings(path)
        problems = config_problems(settings)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        report(str(path), exc.problems)
        return EXIT_INVALID
    print(
        f"{path}: ok ({len(settings.upstreams)} upstreams, {len(settings.queries)} queries, "
        f"{len(settings.composites)} composites)"
    )
    return 0


def _doctor(config: Path | None, replicas: int, shm_path: Path) -> int:
    from app.diagnostics.doctor import run_doctor
    from app.preflight import EXIT_INVALID, report
    from app.settings import load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        report(str(config) if config is not None else "configuration", exc.problems)
        return EXIT_INVALID
    return run_doctor(settings, replicas=replicas, shm_path=shm_path)


def _hash_key(*, generate: bool) -> int:
    import getpass
    import secrets

    from app.security.keys import MIN_KEY_CHARS, hash_key

    if generate:
        key = secrets.token_urlsafe(32)
        print(f"key:  {key}\nhash: {hash_key(key)}")
        return 0
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
        # The hash is fast on purpose (see app/security/keys.py): that is only safe for long random keys.
        print(
            f"refused: an API key must be a random token of at least {MIN_KEY_CHARS} printable ASCII characters "
            "without spaces (gateway hash-key --generate makes one)",
            file=sys.stderr,
        )
        return 2
    print(hash_key(key))
    return 0


def _raise_fd_limit() -> None:
    # Every connection is a file descriptor; a soft limit of 1024 (the default of many systems) would refuse
    # connections long before the gateway is busy. Raise it to the hard limit the operator allows.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # keep the soft limit: it works, with fewer connections
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _serve(config: Path | None, host: str | None, port: int | None) -> int:
    # First, before the heavy imports: as PID 1 a SIGTERM that finds no handler is dropped, not acted on.
    from app.lifecycle.signals import EarlySignals

    early = EarlySignals().install()

    from pydantic import ValidationError

    from app.lifecycle.heap import freeze_startup_heap
    from app.lifecycle.server import serve
    from app.observability.logging import configure_logging
    from app.preflight import EXIT_INVALID, config_problems, listener_problems, report
    from app.settings import ServerSettings, load_settings

    # Everything is checked before anything starts, and reported as check-config reports it (exit 2).
    try:
        settings = load_settings(config)
        overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        if overrides:
            try:
                server = ServerSettings(**{**settings.server.model_dump(), **overrides})
            except ValidationError as exc:
                raise ConfigError([f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors()]) from exc
            settings = settings.model_copy(update={"server": server})
        change = "--port, server.port or GATEWAY_SERVER__PORT"
        problems = config_problems(settings) + listener_problems(settings, port_change=change)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        report(str(config) if config is not None else "configuration", exc.problems)
        return EXIT_INVALID
    configure_logging(
        settings.server.log_level, settings.server.log_format, access_log=settings.observability.access_log
    )
    _raise_fd_limit()
    thresholds = settings.server.gc_thresholds
    return serve(settings, early=early, on_ready=lambda _: freeze_startup_heap(thresholds))
