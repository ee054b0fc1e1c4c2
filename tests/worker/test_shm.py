"""Shared-memory segments: lifecycle, the resource tracker staying quiet, and a full /dev/shm."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from app.worker import shm
from tests.compute.helpers import SHM_PREFIX, segments, shm_guard

pytestmark = pytest.mark.usefixtures("shm_guard")
__all__ = ["shm_guard"]

REPO = Path(__file__).parents[2]


def test_a_segment_is_unlinked_on_close_even_with_views_alive() -> None:
    namer = shm.SegmentNamer(SHM_PREFIX)
    segment = shm.Segment(namer.next(), 1 << 20)
    assert segments() == [segment.name]
    view = segment.array((1 << 17,), np.dtype(np.float64))
    view[:] = 7.0
    segment.unlink()
    assert segments() == []
    assert view[-1] == 7.0  # the mapping outlives the name
    segment.close()  # a view is still alive: no error, the memory goes with the view
    assert float(view.sum()) == 7.0 * (1 << 17)
    segment.close()


def test_names_carry_the_owner_and_are_unique() -> None:
    namer = shm.SegmentNamer(SHM_PREFIX)
    first, second = namer.next(), namer.next()
    assert first != second
    owner = first.removeprefix(SHM_PREFIX).split("_")[0]
    pid, ticks = owner.split(".")
    assert int(pid) > 0
    assert int(ticks) > 0


def run_python(code: str, tmp_path: Path, *, small_shm: bool = False) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"  # a file, not -c: spawned children import __main__ from it
    script.write_text(textwrap.dedent(code))
    command = [sys.executable, str(script)]
    if small_shm:
        mount = 'mount -t tmpfs -o size=1M tmpfs /dev/shm && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", mount, "sh", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_workers_mapping_by_name_leave_the_resource_tracker_quiet(tmp_path: Path) -> None:
    result = run_python(
        f"""
        import multiprocessing as mp
        from app.worker import shm

        def worker(name):
            mapping, size = shm.map_segment(name, writable=False)
            assert mapping[:4] == b"abcd"
            mapping.close()

        if __name__ == "__main__":
            segment = shm.Segment(shm.SegmentNamer("{SHM_PREFIX}").next(), 4096)
            segment.view()[:4] = b"abcd"
            for method in ("forkserver", "spawn"):
                p = mp.get_context(method).Process(target=worker, args=(segment.name,))
                p.start()
                p.join()
                assert p.exitcode == 0
            segment.close()
            print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "leaked" not in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_gateway_that_dies_without_cleaning_up_has_its_segments_removed_by_the_tracker(tmp_path: Path) -> None:
    result = run_python(
        f"""
        import os
        from app.worker import shm
        segment = shm.Segment(shm.SegmentNamer("{SHM_PREFIX}").next(), 4096)
        print(segment.name, flush=True)
        os._exit(1)  # no close(), no atexit
        """,
        tmp_path,
    )
    name = result.stdout.strip()
    assert name.startswith(SHM_PREFIX)
    from tests.compute.helpers import wait_until

    wait_until(lambda: name not in segments(), timeout=10, what="the resource tracker to unlink the segment")


def test_reserving_more_than_dev_shm_holds_raises_instead_of_sigbus(tmp_path: Path) -> None:
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /dev/shm"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()}")
    result = run_python(
        """
        from app.worker import shm
        print(shm.free_bytes())
        segment = shm.Segment(shm.SegmentNamer("probe").next(), 8 << 20)  # sparse: creating costs nothing
        try:
            segment.reserve()
        except shm.SegmentSpaceError as exc:
            print("refused", exc.strerror)
        else:
            print("reserved")
        segment.close()
        import os
        print(sorted(os.listdir("/dev/shm")))
        """,
        tmp_path,
        small_shm=True,
    )
    assert result.returncode == 0, result.stderr
    free, outcome, left = result.stdout.strip().splitlines()
    assert int(free) <= 1 << 20
    assert outcome.startswith("refused")
    assert left == "[]"
