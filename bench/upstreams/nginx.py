"""nginx from Debian as the zero-latency upstream: one process, no logging, every request answered from the
config with the same small JSON object as the fixed-latency server."""

from __future__ import annotations

from pathlib import Path

from bench.upstreams import BODY

CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /healthz {{ return 200 "ok"; }}
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}
}}
"""


def nginx_command(binary: str, workdir: Path, port: int) -> list[str]:
    """Write the config into ``workdir`` and return the command line that serves it in the foreground."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(CONFIG.format(dir=workdir, port=port, body=BODY.decode()))
    return [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
