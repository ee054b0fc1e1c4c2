"""POSIX shared-memory segments for large arrays: one lifecycle, and names that say who owns them.

Only the gateway creates segments (inputs it stages, and answer segments it hands to a worker to fill); workers only
map them by name. So the gateway can unlink a segment at any moment, on every path (success, error, timeout, crash,
disconnect, shutdown): a worker still mapping it keeps its own mapping, and one that tries to map it later finds
nothing and fails cleanly. Nothing can create a name after the gateway has cleaned up.

Names are ``<prefix><pid>.<start ticks>_<n>``: the owner's pid and its start time (from ``/proc``), so a start-up
sweep can tell segments of a dead instance (removed) from those of a live one (kept), even after pid reuse.

Segments are created with ``multiprocessing.shared_memory.SharedMemory``, which registers them with the resource
tracker: should the gateway die without cleaning up, the tracker unlinks them. Workers, which share that tracker,
map ``/dev/shm/<name>`` directly instead of attaching with ``SharedMemory``: in Python 3.11 an attach registers the
name again, and the usual remedy, ``resource_tracker.unregister`` in the worker, removes the *gateway's*
registration from the shared tracker, which then fails with a KeyError when the gateway unlinks.

Writing into a tmpfs page that cannot be backed raises SIGBUS, which kills the process. Every range is reserved
with ``posix_fallocate`` before anything writes into it; a full ``/dev/shm`` then raises SegmentSpaceError (an
``OSError``), and callers fall back to sending the bytes through the worker's pipe.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import re
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# posix_fallocate in slices: each call zero-fills its pages, and the event loop must not wait for 64 MiB at once.
RESERVE_SLICE = 4 * 1024 * 1024


class SegmentSpaceError(OSError):
    """The shared-memory file system cannot hold the segment (``/dev/shm`` is full)."""


def available() -> bool:
    """Whether POSIX shared memory is usable here (Linux with a ``/dev/shm``)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def free_bytes() -> int:
    """Bytes ``/dev/shm`` can still take (0 when it cannot be read)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its closing ')' do not.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


class SegmentNamer:
    """Makes segment names unique to this process: ``<prefix><pid>.<start ticks>_<n>``."""

    def __init__(self, prefix: str) -> None:
        pid = os.getpid()
        self.prefix = prefix
        self.owner = f"{pid}.{_start_ticks(pid) or 0}"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{self.owner}_{next(self._counter)}"

    def mine(self) -> list[str]:
        """Names of this process's segments currently in /dev/shm."""
        head = f"{self.prefix}{self.owner}_"
        try:
            return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(head))
        except OSError:
            return []


def sweep_stale(prefix: str) -> list[str]:
    """Unlink segments with this prefix whose owner process is gone; return their names.

    A segment whose owner still runs (same pid and start time) is kept: it may be another live instance's.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(\d+)_\d+$")
    removed = []
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return []
    for path in entries:
        match = pattern.match(path.name)
        if match is None:
            continue
        pid, ticks = int(match.group(1)), int(match.group(2))
        if _start_ticks(pid) == ticks:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale shared-memory segment %s: %s", path.name, exc)
            continue
        removed.append(path.name)
    return removed


class Segment:
    """A segment this process created: mapped read-write, unlinked and unmapped by ``close()``.

    Usable as a context manager. ``unlink()`` alone removes the name and keeps the mapping (an answer can still be
    streamed from it); ``close()`` also lets go of the mapping, and is safe to call again.
    """

    def __init__(self, name: str, size: int) -> None:
        if size <= 0:
            raise ValueError("a segment needs a positive size")
        self.name = name
        self.size = size
        self._unlinked = False
        self._shm: SharedMemory | None = SharedMemory(name=name, create=True, size=size)
        self._fd = -1
        self._mmap: mmap.mmap | None = None
        try:
            self._fd = os.open(SHM_DIR / name, os.O_RDWR)
            self._mmap = mmap.mmap(self._fd, size)
        except BaseException:
            self.close()
            raise
        # SharedMemory keeps a mapping of its own; closed now, while nothing uses it. Views live on self._mmap
        # only (SharedMemory.close() refuses while a memoryview of it is alive, and its __del__ then raises).
        self._shm.close()

    def reserve(self, start: int = 0, length: int | None = None) -> None:
        """Back ``[start, start + length)`` with real pages so writing there cannot raise SIGBUS.

        Raises SegmentSpaceError when /dev/shm is full.
        """
        length = self.size - start if length is None else length
        try:
            os.posix_fallocate(self._fd, start, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                raise SegmentSpaceError(exc.errno, f"/dev/shm cannot hold {length} more bytes") from exc
            raise

    def reserve_slices(self) -> list[tuple[int, int]]:
        return [(off, min(RESERVE_SLICE, self.size - off)) for off in range(0, self.size, RESERVE_SLICE)]

    def view(self) -> memoryview:
        if self._mmap is None:
            raise ValueError(f"segment {self.name} is closed")
        return memoryview(self._mmap)

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any], *, offset: int = 0) -> npt.NDArray[Any]:
        if self._mmap is None:
            raise ValueError(f"segment {self.name} is closed")
        return np.ndarray(shape, dtype=dtype, buffer=self._mmap, offset=offset)

    def unlink(self) -> None:
        """Remove the name from /dev/shm (idempotent); the mapping stays valid until close()."""
        if self._unlinked or self._shm is None:
            return
        self._unlinked = True
        try:
            self._shm.unlink()  # unlinks and unregisters from the resource tracker
        except FileNotFoundError:
            # Already gone (a sweep, or a racing cleanup): the tracker must still forget it, or it warns at exit.
            resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]

    def close(self) -> None:
        """Unlink, and drop this object's mapping. Idempotent.

        The mapping is never closed explicitly: an ndarray made on it keeps the mmap object as its ``base`` but no
        buffer export, so ``mmap.close()`` would succeed and leave the array pointing at unmapped memory (a
        segfault on the next access). Dropped instead, it is unmapped when its last user goes.
        """
        self.unlink()
        self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_segment(name: str, *, writable: bool) -> tuple[mmap.mmap, int]:
    """Map an existing segment by name (workers). Returns the mapping and its size.

    Raises FileNotFoundError when the gateway has already unlinked it.
    """
    fd = os.open(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, prot=prot), size
    finally:
        os.close(fd)


def reserve_by_name(name: str, length: int) -> None:
    """posix_fallocate on a segment by name (workers, before writing an answer). Raises SegmentSpaceError."""
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise SegmentSpaceError(exc.errno, f"/dev/shm cannot hold {length} bytes") from exc
        raise
    finally:
        os.close(fd)
