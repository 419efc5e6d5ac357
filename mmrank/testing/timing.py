"""Timing helper for benchmarks: the same work split over several fresh processes running side by side."""
from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Callable


def _worker(setup: Callable[[Any], Callable[[], Any]], arg: Any, barrier, results) -> None:
    work = setup(arg)          # untimed: imports, models, data
    work()                     # warm-up
    barrier.wait()
    t0 = time.perf_counter()
    work()
    results.put(time.perf_counter() - t0)


def side_by_side(setup: Callable[[Any], Callable[[], Any]], args: list[Any], timeout: float = 3600.0) -> float:
    """Seconds until the slowest of len(args) spawned processes finished its share: each runs `setup(arg)` (an
    importable function returning the work as a zero-argument callable), runs the work once to warm up, waits
    for the others, then runs it timed. Spawned, not forked (torch's OpenMP pool is not fork-safe)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(setup, a, barrier, results)) for a in args]
    for p in procs:
        p.start()
    try:
        times = [results.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    return max(times)
