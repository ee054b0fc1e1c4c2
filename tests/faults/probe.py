"""A prober, run as its own process: one request every ``interval`` on one kept-alive connection, until its
standard input closes; prints ``[[status, seconds], ...]`` as JSON.

A process of its own, with blocking sockets, so that what it measures is the gateway and not the prober's event
loop or a GIL shared with test servers. By default it asks GET /healthz; with --path and --body it asks anything.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time


def read_answer(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the probe connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--body", default="")
    args = parser.parse_args()
    body = args.body.encode()
    request = (
        f"{args.method} {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    answers: list[tuple[int, float]] = []
    with socket.create_connection(("127.0.0.1", args.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        print("ready", flush=True)
        while not select.select([sys.stdin], [], [], args.interval)[0]:
            started = time.perf_counter()
            sock.sendall(request)
            status = read_answer(sock)
            answers.append((status, time.perf_counter() - started))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
