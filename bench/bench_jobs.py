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
