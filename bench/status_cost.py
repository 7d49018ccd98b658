"""What `worker status` costs when many jobs finished in the last hour.

    python bench/status_cost.py [--n 1000000] [--repeat 3]

Builds a scratch file whose N jobs all finished within the last hour (one
INSERT ... SELECT, then the per-minute counts as the version-3 upgrade makes
them), and times, on a read-only connection, the two ways of getting the
last hour's counts by queue and outcome: counting the rows (what schema 2
did, FINISHED_SINCE_SQL) and summing worker_finished_per_minute (what
``worker.status()`` does now), then the whole ``worker.status()``.  Medians
of --repeat runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import worker

FILL_SQL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n)
INSERT INTO worker_jobs (type, status, queue, due, created_at, started, finished, result)
SELECT 'noop', CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN i % 3 = 0 THEN 'mail' ELSE 'default' END,
       :now - i * 3600000 / :n, :now - i * 3600000 / :n, :now - i * 3600000 / :n, :now - i * 3600000 / :n, 'null'
  FROM n
"""
COUNT_SQL = """
INSERT INTO worker_finished_per_minute (minute, queue, status, count)
SELECT finished - finished % 60000, queue, status, count(*) FROM worker_jobs WHERE finished IS NOT NULL GROUP BY 1, 2, 3
"""


def median_ms(action: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="jobs finished in the last hour")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "status.db")
        conn = worker.connect(path)
        worker.apply_schema(conn)
        now = worker.now_ms()
        started = time.perf_counter()
        with worker.immediate(conn):
            conn.execute(FILL_SQL, {"n": args.n, "now": now})
            conn.execute(COUNT_SQL)
        print(f"{args.n:,} jobs finished in the last hour (built in {time.perf_counter() - started:.1f} s)")
        reader = worker.connect_readonly(path)
        hour_ago = now - 3_600_000
        by_rows = median_ms(
            lambda: reader.execute(worker.FINISHED_SINCE_SQL, {"since": hour_ago}).fetchall(), args.repeat
        )
        by_minute = median_ms(
            lambda: reader.execute(worker.FINISHED_PER_MINUTE_SQL, {"since": hour_ago - hour_ago % 60_000}).fetchall(),
            args.repeat,
        )
        whole = median_ms(lambda: worker.status(reader, now=now), args.repeat)
        print(f"  last hour by counting rows (schema 2):   {by_rows:9.1f} ms")
        print(f"  last hour from per-minute counts:        {by_minute:9.1f} ms")
        print(f"  worker.status() (per-minute counts):     {whole:9.1f} ms")
        reader.close()
        conn.close()


if __name__ == "__main__":
    main()
