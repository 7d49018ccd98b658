"""What the queue controls (pause, running limit, rate) cost the worker: jobs/s of a drain, turn by turn.

    .venv/bin/python bench/controls.py [--db sqlite|postgresql://...] [--concurrency 1] [--n 10000] [--rounds 5]

Every round drains N no-op jobs of the queue ``default`` with ``worker run
--burst`` of this checkout, once under each setting, in turns (so all see the
same noise on a shared machine):

- ``none``: no queue has a control (the claim's fast statement is all there is);
- ``other paused``: a queue nobody uses is paused, so every claim reads the
  controls and claims the rest outside the controlled queues;
- ``limit not reached``: ``default`` itself has a running limit far above what
  runs, so every claim also counts its running rows and claims from it alone;
- ``limit 2 (c=4)``: a running limit that binds, at concurrency 4: the jobs/s
  it leaves, against ``none`` at concurrency 4.

jobs/s from the first start to the last finish (as bench/run.py); the ratio
to ``none`` of the same round's medians is the figure to trust.  What it costs
when no queue has a control, against the code before the controls existed,
is `bench/ab.py` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import worker

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
JOBS = BENCH_DIR / "bench_jobs.py"

SETTINGS: dict[str, tuple[dict[str, Any], int | None]] = {  # name -> (Queue.limit/pause calls, concurrency)
    "none": ({}, None),
    "other paused": ({"pause": "elsewhere"}, None),
    "limit not reached": ({"limit": {"running": 1_000_000}}, None),
    "none (c=4)": ({}, 4),
    "limit 2 (c=4)": ({"limit": {"running": 2}}, 4),
}


def fresh_target(db: str, scratch: Path, round_number: int, name: str) -> str:
    if not worker.is_postgres(db):
        return str(scratch / f"{round_number}-{name.replace(' ', '_')}.db")
    import psycopg

    with worker.Queue(db, check_types=False) as producer:  # the schema, if the database is new
        producer.now()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("TRUNCATE worker_jobs, worker_processes, worker_finished_per_minute, worker_queues")
        conn.execute("VACUUM worker_jobs")  # autovacuum is off here: each round starts from the same table
    return db


def drain_rate(target: str, n: int, setting: dict[str, Any], concurrency: int) -> float:
    with worker.Queue(target, check_types=False) as producer:
        producer.enqueue_many([("noop", None)] * n)
        if "pause" in setting:
            producer.pause(setting["pause"])
        if "limit" in setting:
            producer.limit("default", **setting["limit"])
    env = {**os.environ, "WORKER_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "worker_cli", "run", "--burst", "--no-cron", "--db", target, "--jobs", str(JOBS)]
    subprocess.run([*command, "--concurrency", str(concurrency)], check=True, env=env, cwd=REPO_DIR)
    store = worker.open_reader(target)
    try:
        done = store.jobs(status="succeeded", type="noop", queue=None, limit=n + 1)
    finally:
        store.close()
    if len(done) != n:
        raise SystemExit(f"{target}: {len(done)} of {n} jobs succeeded")
    window_ms = max(job.finished or 0 for job in done) - min(job.started or 0 for job in done)
    return n / (window_ms / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite", help="sqlite (a fresh file per run) or a postgresql:// URL")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="worker-controls-") as scratch_dir:
        for number in range(args.rounds):
            order = list(SETTINGS) if number % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                setting, concurrency = SETTINGS[name]
                target = fresh_target(args.db, Path(scratch_dir), number, name)
                rates[name].append(drain_rate(target, args.n, setting, concurrency or args.concurrency))
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    where = "PostgreSQL" if worker.is_postgres(args.db) else "SQLite"
    print(f"{where}, {args.n:,} no-op jobs, concurrency {args.concurrency} unless named, "
          f"medians of {args.rounds} rounds")  # fmt: skip
    for name in SETTINGS:
        peer = "none (c=4)" if "c=4" in name else "none"
        rate, base = statistics.median(rates[name]), statistics.median(rates[peer])
        print(f"  {name:20}{rate:>10,.0f} jobs/s{rate / base:>8.2f}x  ({peer})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
