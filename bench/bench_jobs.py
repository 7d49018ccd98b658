"""The jobs our worker runs in the benchmark (loaded with ``--jobs bench/bench_jobs.py``)."""

from __future__ import annotations

import time
from typing import Any

from worker import JobContext, job


@job
def noop(ctx: JobContext, **data: Any) -> None:
    """Does nothing: what the processing rate measures is the worker itself."""


@job
def stamp(ctx: JobContext, **data: Any) -> int:
    """Returns when it started (epoch ns), for the enqueue-to-start latency."""
    return time.time_ns()


@job
def sleep_ms(ctx: JobContext, ms: float) -> None:
    """Waits ``ms`` milliseconds off the CPU: an HTTP call, a query, an email (bench/workloads.py)."""
    time.sleep(ms / 1000)


@job
def spin(ctx: JobContext, loops: int) -> int:
    """Pure-Python work holding the GIL throughout: ``loops`` calibrated to about 1 ms of CPU (bench/workloads.py)."""
    return busy(loops)


def busy(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total
