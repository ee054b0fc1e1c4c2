"""Why transforms run in processes: the built-in ``prime_count`` (pure Python) on one core, in two threads, and in
two processes.

    .venv/bin/python bench/transform_gil.py [N]

Two threads take about twice as long as one job, because only one of them can hold the GIL; two processes take
about as long as one, given two free cores.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from app.worker import NoParams
from app.worker.transforms import prime_count


def job(n: int) -> int:
    return int(prime_count(np.array([n]), NoParams())[0])


def timed(label: str, run: object) -> float:
    started = time.perf_counter()
    run()  # type: ignore[operator]
    elapsed = time.perf_counter() - started
    print(f"{label:<22} {elapsed:6.2f} s")
    return elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15_000_000
    print(f"prime_count({n}) -> {job(n)}")
    one = timed("one job", lambda: job(n))

    def two_threads() -> None:
        threads = [threading.Thread(target=job, args=(n,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    threads = timed("two jobs, two threads", two_threads)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(job, [1000, 1000]))  # start and warm both workers first
        processes = timed("two jobs, two processes", lambda: list(pool.map(job, [n, n])))
    print(f"threads: {threads / one:.2f}x one job; processes: {processes / one:.2f}x one job")


if __name__ == "__main__":
    main()
