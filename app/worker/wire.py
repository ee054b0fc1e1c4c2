"""What travels between the gateway and a worker process, and how.

Each worker has one duplex pipe to the gateway. A message is pickled with protocol 5 and its large buffers (a
contiguous ndarray, an answer's bytes) are sent *out of band*: the pickle holds only metadata and the buffers follow
as raw frames, so nothing is copied into the pickle and the pipe writes release the GIL. Arrays above the
shared-memory threshold do not travel here at all: the job names a segment instead.

Messages, gateway to worker: ``("job", id, Job)``; closing the pipe asks the worker to exit.
Worker to gateway: ``("ready", pid)`` once warmed, ``("started", id)`` on taking a job, then ``("done", id,
Answer)`` or ``("error", id, kind, message)`` where kind is one of ``ErrorKind``.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

OutputFormat = Literal["json", "npy"]
# input: the transform refused the values (422); result: it returned something unusable (500); failed: it raised.
ErrorKind = Literal["input", "result", "failed"]

_COUNT = struct.Struct("!I")


@dataclass(frozen=True)
class ShmArray:
    """An array in a gateway-created segment; the worker maps it read-only."""

    segment: str
    shape: tuple[int, ...]
    dtype: str
    fortran_order: bool = False
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class InlineArray:
    """A small array sent through the pipe (out of band, not copied into the pickle)."""

    array: npt.NDArray[Any]

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass(frozen=True)
class Job:
    transform: str
    params: dict[str, Any]
    input: ShmArray | InlineArray
    output_format: OutputFormat
    # A segment the gateway created for the encoded answer (sparse: the worker reserves what it writes), or None
    # when the answer is expected to be small.
    output_segment: str | None = None
    output_capacity: int = 0


@dataclass(frozen=True)
class Answer:
    """The encoded answer: in the output segment (``inline is None``) or in ``inline``."""

    media_type: str
    length: int
    inline: bytes | pickle.PickleBuffer | None
    shm_fallback: bool = False  # the segment could not be backed (/dev/shm full); the bytes came inline
    run_s: float = 0.0
    cpu_s: float = 0.0


def send_message(conn: Connection, message: Any) -> int:
    """Send one message; returns the bytes written to the pipe."""
    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(_COUNT.pack(len(buffers)) + meta)
    sent = _COUNT.size + len(meta)
    for buf in buffers:
        raw = buf.raw()
        conn.send_bytes(raw)
        sent += raw.nbytes
    return sent


def recv_message(conn: Connection) -> tuple[Any, int]:
    """Receive one message; returns it and the bytes read. Raises EOFError when the other end closed."""
    head = conn.recv_bytes()
    (count,) = _COUNT.unpack_from(head)
    buffers = [conn.recv_bytes() for _ in range(count)]
    received = len(head) + sum(len(b) for b in buffers)
    return pickle.loads(head[_COUNT.size :], buffers=buffers), received
