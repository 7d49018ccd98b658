"""The job registry's examples: the demo and README jobs.

Your app's own jobs live in your own module, loaded with ``worker run --jobs
myapp.jobs`` (or WORKER_JOBS).  A job is a function registered with ``@job``;
the worker calls it as ``fn(ctx, **data)`` and stores its return value as JSON.
"""

from __future__ import annotations

import time
from typing import Any

from worker import JobContext, job


@job
def hello(ctx: JobContext, name: str = "world") -> dict[str, Any]:
    """The demo job: greets, and returns what it said."""
    greeting = f"hello, {name}!"
    ctx.logger.info("%s (attempt %d)", greeting, ctx.attempt)
    return {"greeting": greeting}


@job(max_attempts=3, retry_delay=1, backoff=2)
def flaky(ctx: JobContext, fail_times: int = 1) -> str:
    """Fails its first ``fail_times`` attempts, to show retries as a chain of rows."""
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"failing on purpose (attempt {ctx.attempt} of {fail_times} planned failures)")
    return f"succeeded on attempt {ctx.attempt}"


@job(timeout=30)
def sleep(ctx: JobContext, seconds: float = 1.0) -> float:
    """Sleeps, then returns how long it slept: a stand-in for slow work."""
    time.sleep(seconds)
    return seconds


@job
def noop(ctx: JobContext, **data: Any) -> None:
    """Does nothing: for benchmarks and smoke tests."""
