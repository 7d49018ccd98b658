"""Small helpers shared by the benchmark driver and its child processes."""

from __future__ import annotations

import math
import os
import sqlite3
import statistics
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv"
RESULTS_DIR = BENCH_DIR / "results"

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
# RQ gets a Redis database of its own; only that one is ever flushed.
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "13"))
RQ_QUEUE = "bench"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status (VmHWM is peak RSS, VmRSS the current one)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def cpu_seconds_precise(pid: int) -> float | None:
    """On-CPU time of all of a process's threads, from /proc/PID/task/*/schedstat (ns resolution)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def noop_rate(db: Path) -> tuple[int, float]:
    """Succeeded no-op jobs in our table, and their jobs/s from the first start to the last finish."""
    with sqlite3.connect(db) as conn:
        count, window_ms = conn.execute(
            "SELECT count(*), max(finished) - min(started) FROM worker_jobs"
            " WHERE type = 'noop' AND status = 'succeeded'"
        ).fetchone()
    return count, count / (window_ms / 1000) if window_ms else math.nan
