"""Huey's side of the benchmark: a SqliteHuey on the file named by BENCH_HUEY_DB."""

from __future__ import annotations

import os
import time

from huey import SqliteHuey

# Huey's own defaults (WAL, its default synchronous setting), as a user gets them.
huey = SqliteHuey("bench", filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.db"))


@huey.task()
def noop() -> None:
    """Does nothing."""


@huey.task()
def stamp() -> int:
    """Returns when it started (epoch ns)."""
    return time.time_ns()


@huey.task()
def sleep_ms(ms: float) -> None:
    """Waits ``ms`` milliseconds off the CPU."""
    time.sleep(ms / 1000)
