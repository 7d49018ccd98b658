"""The jobs of bench/async_jobs.py (loaded with ``--jobs bench/bench_async_jobs.py``): async def ones, and a sync
one to hold their latency against."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from worker import JobContext, job


@job
async def nap(ctx: JobContext, **data: Any) -> None:
    """Awaits 10 ms: what a job waiting on an HTTP call or a database looks like to the loop."""
    await asyncio.sleep(0.01)


@job
async def astamp(ctx: JobContext, **data: Any) -> int:
    """Returns when it started (epoch ns), for the enqueue-to-start latency of an async job."""
    return time.time_ns()


@job
def stamp(ctx: JobContext, **data: Any) -> int:
    """The same on a job thread."""
    return time.time_ns()
