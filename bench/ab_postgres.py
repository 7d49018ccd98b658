"""bench/ab.py's processing figure on PostgreSQL: two revisions' no-op drains, turn by turn, on fresh databases.

    .venv/bin/python bench/ab_postgres.py 311e91d 7b1b2a7 [--n 10000] [--rounds 6] [--concurrency 1]
    .venv/bin/python bench/ab_postgres.py HEAD WORKTREE     # uncommitted changes, as bench/ab.py

Each revision's worker.py, worker_cli.py, worker_postgres.py and both schema
files are exported to a scratch directory; every round and revision gets a
database of its own (created and dropped on the server at 127.0.0.1:5432, as
the tests' are), N no-op jobs enqueued with that revision's Queue, then
``worker run --burst`` of that revision.  jobs/s from the first start to the
last finish; the ratio of the medians is the figure to trust (single drains on
this shared machine vary by half).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SERVER = "postgresql://postgres@127.0.0.1:5432"
FILES = ("worker.py", "worker_cli.py", "worker_postgres.py", "schema.sql", "schema_postgres.sql")

DRAIN = """
import sys
import worker
n = int(sys.argv[2])
with worker.Queue(sys.argv[1], check_types=False) as producer:
    producer.enqueue_many([("noop", None)] * n)
"""
RATE = """
import sys
import psycopg
with psycopg.connect(sys.argv[1]) as conn:
    count, window = conn.execute(
        "SELECT count(*), max(finished) - min(started) FROM worker_jobs WHERE status = 'succeeded'").fetchone()
print(count / (window / 1000) if count == int(sys.argv[2]) else 0)
"""


def export(revision: str, into: Path) -> Path:
    into.mkdir()
    for name in FILES:
        if revision == "WORKTREE":
            (into / name).write_bytes((REPO_DIR / name).read_bytes())
            continue
        shown = subprocess.run(["git", "-C", str(REPO_DIR), "show", f"{revision}:{name}"], capture_output=True)
        shown.check_returncode()
        (into / name).write_bytes(shown.stdout)
    return into


def one_drain(code: Path, name: str, n: int, concurrency: int) -> float:
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    url = f"{SERVER}/{name}"
    env = {**os.environ, "PYTHONPATH": str(code), "WORKER_LOG_LEVEL": "WARNING"}
    try:
        subprocess.run([sys.executable, "-c", DRAIN, url, str(n)], check=True, env=env, cwd=code)
        jobs = str(BENCH_DIR / "bench_jobs.py")
        run = [sys.executable, "-m", "worker_cli", "run", "--burst", "--no-cron", "--db", url, "--jobs", jobs]
        subprocess.run([*run, "--concurrency", str(concurrency)], check=True, env=env, cwd=code)
        rate = subprocess.run([sys.executable, "-c", RATE, url, str(n)], check=True, env=env, capture_output=True)
        return float(rate.stdout)
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="worker-ab-postgres-") as scratch:
        code = {rev: export(rev, Path(scratch) / f"rev{i}") for i, rev in enumerate((args.a, args.b))}
        rates: dict[str, list[float]] = {rev: [] for rev in code}
        for number in range(args.rounds):
            for i, (rev, path) in enumerate(code.items() if number % 2 == 0 else reversed(code.items())):
                rates[rev].append(one_drain(path, f"worker_ab_{os.getpid()}_{i}", args.n, args.concurrency))
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    a, b = (statistics.median(rates[rev]) for rev in (args.a, args.b))
    print(f"PostgreSQL, {args.n:,} no-op jobs, concurrency {args.concurrency}, medians of {args.rounds} rounds")
    print(f"  processing (worker run --burst)  {args.a} {a:,.0f}  {args.b} {b:,.0f}  b / a {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
