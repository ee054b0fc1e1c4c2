"""What `gateway serve` and `gateway demo` check before they start anything: the whole configuration, as
`gateway check-config` checks it, and the ports they will listen on. A problem found here is reported one line
each and ends the command with exit code 2, before a process, a connection or a socket is left behind."""

from __future__ import annotations

import errno
import re
import socket
import sys
from collections.abc import Sequence
from typing import TextIO

from app.settings import Settings

EXIT_INVALID = 2
# A problem line that begins with a variable's name came from the environment (app/settings.py names it so).
_FROM_ENVIRONMENT = re.compile(r"^(GATEWAY|OTEL)_[A-Z0-9_]*\b")


def config_problems(settings: Settings) -> list[str]:
    """What makes a validated configuration unusable: authentication without keys, unusable TLS files."""
    from app.security.guard import startup_problems
    from app.upstream.client import tls_problems

    return startup_problems(settings) + tls_problems(settings)


def port_problem(host: str, port: int, *, key: str, change: str) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None. ``key`` names the setting, ``change`` how to change it.

    Binds as uvicorn will (SO_REUSEADDR: a port held only by connections closing in TIME_WAIT is free) and
    closes at once: another process may still take the port in between, which the server then reports itself."""
    if port == 0:
        return None  # the kernel picks a free one
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror:
        return f"{key}: cannot listen on {host}: no such address"
    except OSError as exc:
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            return f"{key}: {where} is already in use: choose another port with {change}"
        if exc.errno == errno.EACCES:
            return f"{key}: no permission to listen on {where} (ports below 1024 need privileges): use {change}"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{key}: cannot listen on {host}: not an address of this machine"
        return f"{key}: cannot listen on {where}: {exc.strerror}"
    return None


def listener_problems(settings: Settings, *, port_key: str = "server.port", port_change: str) -> list[str]:
    """Whether the public listener (and the admin listener, when configured) can be opened."""
    server, obs = settings.server, settings.observability
    problems = [port_problem(server.host, server.port, key=port_key, change=port_change)]
    if obs.admin_port is not None:
        admin_host = obs.admin_host or server.host
        if obs.admin_port != 0 and obs.admin_port == server.port and admin_host == server.host:
            problems.append("observability.admin_port: the same port as server.port")
        else:
            change = "observability.admin_port or GATEWAY_OBSERVABILITY__ADMIN_PORT"
            problems.append(port_problem(admin_host, obs.admin_port, key="observability.admin_port", change=change))
    return [p for p in problems if p is not None]


def report(source: str, problems: Sequence[str], *, file: TextIO | None = None) -> None:
    """The report `gateway check-config` prints: what was read, then one indented line per problem."""
    from_env = [bool(_FROM_ENVIRONMENT.match(p)) for p in problems]
    if all(from_env):
        source = "environment"
    elif any(from_env):
        source = f"{source} and environment"
    out = sys.stderr if file is None else file
    print(f"{source}: invalid", file=out)
    for problem in problems:
        print(f"  {problem}", file=out)
