"""Stopping the listener: what a plain close does to the accept queue, and what the gateway does instead."""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from app.lifecycle.listener import refuse_new_connections

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the SYN filter is Linux only")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def connect_and_send(port: int) -> socket.socket:
    """A client whose handshake the kernel completed and whose request is on the wire, not yet accepted."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    return client


def wait_for_syn_sent(port: int, timeout: float = 5.0) -> None:
    """Until a connection attempt to ``port`` waits for an answer to its SYN (state SYN_SENT in /proc/net/tcp)."""
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        if any(row[2].endswith(f":{port:04X}") and row[3] == "02" for row in rows):
            return
        assert time.monotonic() < deadline, "the late connection attempt never left"
        time.sleep(0.005)


def test_closing_a_listener_resets_the_connections_in_its_accept_queue(listener: socket.socket) -> None:
    client = connect_and_send(listener.getsockname()[1])
    listener.close()
    with client, pytest.raises(ConnectionResetError):
        client.recv(100)


def test_refused_new_connections_keep_the_accept_queue(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    queued = connect_and_send(port)
    assert refuse_new_connections([listener])

    late: dict[str, object] = {}

    def connect_late() -> None:
        started = time.monotonic()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            late["outcome"] = "connected"
        except OSError as exc:
            late["outcome"] = errno.errorcode.get(exc.errno or 0, str(exc))
        late["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=connect_late)
    thread.start()
    wait_for_syn_sent(port)
    # The connection that completed its handshake before is still there to accept, request and all, and served.
    conn, _ = listener.accept()
    with conn, queued:
        assert conn.recv(100).startswith(b"GET /readyz")
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert queued.recv(100).startswith(b"HTTP/1.1 200 OK")
    listener.close()
    thread.join(timeout=10)
    # The late attempt's SYN was dropped, then its retransmission found the port closed: refused, never reset.
    assert late["outcome"] == "ECONNREFUSED"
    assert 0.5 < float(str(late["seconds"])) < 5
