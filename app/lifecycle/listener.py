"""Stop accepting connections without resetting the ones the kernel has already accepted.

Closing a listening socket resets every connection still in its accept queue: those clients completed the TCP
handshake, sent their request, and get a reset instead of an answer. So the gateway first makes the kernel drop
new SYNs (a classic BPF socket filter on the listening socket, Linux only, no privilege needed) while the event
loop keeps accepting what already completed its handshake; a moment later the listener is closed with an empty
queue. A client whose SYN was dropped retransmits it (after 1 s) and then finds the port closed: its connection is
refused, never half-served.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any, Protocol

log = logging.getLogger("app.lifecycle")

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)

# For a TCP socket the filter sees the packet from its TCP header on; byte 13 holds the flags.
#   ldb [13]; and #(SYN|ACK); jeq #SYN, drop, keep; drop: ret #0; keep: ret #-1
# Pure SYNs (new connection attempts) are dropped; the ACK that completes a handshake already under way passes.
_DROP_NEW_SYNS = (
    (0x30, 0, 0, 13),
    (0x54, 0, 0, 0x12),
    (0x15, 0, 1, 0x02),
    (0x06, 0, 0, 0),
    (0x06, 0, 0, 0xFFFFFFFF),
)


class ListeningSocket(Protocol):
    family: int

    def setsockopt(self, level: int, optname: int, value: bytes, /) -> None: ...
    def getsockname(self) -> Any: ...


def refuse_new_connections(sockets: Iterable[ListeningSocket]) -> bool:
    """Make the kernel drop new connection attempts on these listening sockets; True if every one took the filter.

    Where the filter is unavailable (not Linux, or a sandbox that refuses it) nothing changes, and closing the
    listener stays the only step: a connection caught in the accept queue at that moment is reset.
    """
    if not sys.platform.startswith("linux"):
        return False
    code = b"".join(struct.pack("HBBI", *insn) for insn in _DROP_NEW_SYNS)
    program = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}: the kernel copies the program.
    fprog = struct.pack("HL", len(_DROP_NEW_SYNS), ctypes.addressof(program))
    applied = True
    for sock in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        except OSError as exc:
            applied = False
            log.info("cannot filter new connections (%s); the listener will simply close", exc)
    return applied
