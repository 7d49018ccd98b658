"""The async jobs benchmark: our worker's job loop beside arq, in one run.

    python bench/async_jobs.py            # 10,000 jobs, 3 rounds each: about 2 minutes
    python bench/async_jobs.py --quick    # 1 round
    python bench/async_jobs.py --skip drain --latency 300   # only the idle latency, 300 jobs of each kind
    python bench/async_jobs.py --python /tmp/py312/bin/python   # our worker on another Python (3.12+: eager tasks)

Like run.py it re-runs itself in bench/.venv (arq is installed only there).

How each figure is measured:

- Drain: N jobs that each ``await asyncio.sleep(0.01)`` are enqueued first,
  then the real ``python -m worker_cli run --burst --async-concurrency 100
  --jobs bench/bench_async_jobs.py`` runs on a fresh SQLite file (and on a
  fresh PostgreSQL database when 127.0.0.1:5432 answers); the rate is N over
  min(started) to max(finished), read from the table.  At concurrency 100
  and 10 ms a job the ideal is 10,000 jobs/s.
- arq: the same job on the local Redis (database BENCH_REDIS_DB, default 13,
  the only one it flushes), enqueued first with enqueue_job, then an arq
  Worker (max_jobs=100, burst) in a process of its own; the window is from the
  first job's start to the last job's end, taken inside the job function.
  Rounds of ours and arq's alternate.
- CPU: the worker process's (and the arq worker's) user + system time from wait4,
  per job, its start-up included: a figure that a busy machine moves less.
- Latency: one idle worker (default settings) with both an async job and a
  sync one registered; another process enqueues them in turn, 20-30 ms apart
  (``--latency`` of each kind, 100 by default); latency is from just before the
  enqueue call, and from its return (the commit), to the job function's start
  (``astamp`` / ``stamp`` return time.time_ns()).  On SQLite, and on
  PostgreSQL when it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, REDIS_DB, REDIS_HOST, REDIS_PORT, REPO_DIR, median, percentile
from run import ensure_venv, kill_leftovers, last_json, reap, spawn

THIS = Path(__file__).resolve()
JOBS = BENCH_DIR / "bench_async_jobs.py"
POSTGRES = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
ARQ_QUEUE = "bench:async"


# --- Ours ---------------------------------------------------------------------------


WORKER_PYTHON = sys.executable  # --python: the interpreter that runs our worker (croniter, psycopg installed)


def worker_command(db: str, *flags: str) -> list[str]:
    return [WORKER_PYTHON, "-m", "worker_cli", "run", "--db", db, "--jobs", str(JOBS), "--no-cron", *flags]


def fill(db: str, n: int, job_type: str = "nap") -> None:
    import worker

    with worker.Queue(db, check_types=False) as queue:
        for start in range(0, n, 1000):
            queue.enqueue_many([(job_type, None)] * min(1000, n - start))


def window_rate(db: str, job_type: str) -> tuple[int, float]:
    """Succeeded jobs of ``job_type`` and their jobs/s from the first start to the last finish."""
    sql = "SELECT count(*), max(finished) - min(started) FROM worker_jobs WHERE type = %s AND status = 'succeeded'"
    if db.startswith("postgresql"):
        import psycopg

        with psycopg.connect(db) as conn:
            count, window_ms = conn.execute(sql, (job_type,)).fetchone()  # type: ignore[misc]
    else:
        with sqlite3.connect(db) as conn:
            count, window_ms = conn.execute(sql.replace("%s", "?"), (job_type,)).fetchone()
    return count, count / (window_ms / 1000) if window_ms else float("nan")


def drain_ours(db: str, n: int, log: Path) -> dict[str, Any]:
    fill(db, n)
    proc = spawn(worker_command(db, "--burst", "--async-concurrency", "100"), log, {"WORKER_LOG_LEVEL": "WARNING"})
    code, usage, _, _ = reap(proc)
    if code != 0:
        raise RuntimeError(f"worker exited {code}; see {log}")
    count, rate = window_rate(db, "nap")
    if count != n:
        raise RuntimeError(f"only {count} of {n} jobs succeeded; see {log}")
    return {"n": n, "jobs_per_s": rate, "cpu_us_per_job": cpu_us(usage, n)}


def cpu_us(usage: Any, n: int) -> float:
    """A finished process's user + system CPU time per job, in microseconds (its start-up included)."""
    return (usage.ru_utime + usage.ru_stime) / n * 1e6


class PostgresDatabase:
    """A database of its own for one measurement, dropped after it."""

    def __init__(self, number: int) -> None:
        import psycopg

        self.name = f"bench_async_{os.getpid()}_{number}"
        self.url = f"{POSTGRES}/{self.name}"
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.name}")

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def postgres_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=2).close()
    except Exception:
        return False
    return True


# --- arq -------------------------------------------------------------------------------


def arq_settings() -> Any:
    from arq.connections import RedisSettings

    return RedisSettings(host=REDIS_HOST, port=REDIS_PORT, database=REDIS_DB)


async def arq_fill(n: int) -> None:
    from arq import create_pool

    redis = await create_pool(arq_settings(), default_queue_name=ARQ_QUEUE)
    await redis.flushdb()
    for _ in range(n):
        await redis.enqueue_job("nap")
    await redis.aclose()


def arq_worker() -> dict[str, Any]:
    """In a process of its own: an arq Worker drains the queue (burst) and says when its first job started and
    its last ended."""
    from arq.worker import Worker as ArqWorker
    from arq.worker import func

    first: list[float] = []
    last = [0.0]

    async def nap(ctx: dict[str, Any]) -> None:
        if not first:
            first.append(time.time())
        await asyncio.sleep(0.01)
        last[0] = time.time()

    arq = ArqWorker(
        functions=[func(nap, name="nap")],
        redis_settings=arq_settings(),
        queue_name=ARQ_QUEUE,
        max_jobs=100,
        burst=True,
        poll_delay=0.01,
        handle_signals=False,
    )
    arq.run()
    return {"completed": arq.jobs_complete, "failed": arq.jobs_failed, "first": first[0], "last": last[0]}


def drain_arq(n: int, log: Path) -> dict[str, Any]:
    asyncio.run(arq_fill(n))
    proc = spawn([sys.executable, str(THIS), "arq-worker"], log)
    code, usage, _, _ = reap(proc)
    if code != 0:
        raise RuntimeError(f"arq worker exited {code}; see {log}")
    result = last_json(proc)
    if result["completed"] != n:
        raise RuntimeError(f"arq completed {result['completed']} of {n}")
    return {"n": n, "jobs_per_s": n / (result["last"] - result["first"]), "cpu_us_per_job": cpu_us(usage, n)}


# --- Latency ---------------------------------------------------------------------------


def latency(db: str, n: int, log: Path) -> dict[str, Any]:
    """An idle worker; async and sync jobs enqueued in turn, spaced out; enqueue to start, by kind."""
    import worker

    queue = worker.Queue(db, check_types=False)
    queue.enqueue("stamp")  # the schema made, the connection open, before the worker starts
    proc = spawn(worker_command(db), log, {"WORKER_LOG_LEVEL": "WARNING"})
    try:
        wait_until(lambda: queue.get(1) is not None and queue.get(1).status == "succeeded", 30)  # type: ignore[union-attr]
        time.sleep(1.0)  # settled: idle
        rng = random.Random(5)
        sent: list[tuple[str, int, int, int]] = []
        for number in range(n):
            time.sleep(0.02 * (1 + 0.5 * rng.random()))
            kind = "astamp" if number % 2 else "stamp"
            t0 = time.time_ns()
            job_id = queue.enqueue(kind).id
            sent.append((kind, t0, time.time_ns(), job_id))
        from_call: dict[str, list[float]] = {"astamp": [], "stamp": []}
        from_commit: dict[str, list[float]] = {"astamp": [], "stamp": []}
        for kind, t0, committed, job_id in sent:
            done = wait_until(lambda: _succeeded(queue, job_id), 30)  # noqa: B023
            from_call[kind].append((done.result - t0) / 1e6)
            from_commit[kind].append((done.result - committed) / 1e6)
    finally:
        proc.terminate()
        reap(proc)
        queue.close()
    figures = {}
    for kind in from_call:
        call, commit = from_call[kind], from_commit[kind]
        figures[kind] = {"p50_ms": percentile(call, 50), "p99_ms": percentile(call, 99), "n": len(call),
                         "commit_p50_ms": percentile(commit, 50), "commit_p99_ms": percentile(commit, 99)}  # fmt: skip
    return figures


def _succeeded(queue: Any, job_id: int) -> Any:
    job = queue.get(job_id)
    return job if job is not None and job.status == "succeeded" else None


def wait_until(condition: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.005)
    return value


# --- The run ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "arq-worker"])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, help="rounds of each system (default 3, 1 with --quick)")
    parser.add_argument("--latency", type=int, default=100, help="jobs of each kind for the idle latency")
    parser.add_argument("--skip", default="", help="parts to leave out: drain, latency")
    parser.add_argument("--python", help="the interpreter that runs our worker, e.g. a Python 3.12 venv's (default: "
                        "bench/.venv's); it needs croniter, and psycopg for the PostgreSQL rows")  # fmt: skip
    args = parser.parse_args()
    if args.mode == "arq-worker":
        print(json.dumps(arq_worker()))
        return
    ensure_venv(THIS)
    global WORKER_PYTHON
    WORKER_PYTHON = args.python or WORKER_PYTHON
    rounds = args.rounds or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="bench_async_"))
    log = work / "log.txt"
    os.environ["PYTHONPATH"] = str(REPO_DIR)
    with_postgres = postgres_reachable()
    results: dict[str, list[float]] = {"sqlite": [], "postgres": [], "arq": []}
    cpu: dict[str, list[float]] = {"sqlite": [], "postgres": [], "arq": []}

    def note(name: str, run: dict[str, Any]) -> None:
        results[name].append(run["jobs_per_s"])
        cpu[name].append(run["cpu_us_per_job"])

    skip = set(args.skip.split(",")) - {""}
    for number in range(0 if "drain" in skip else rounds):
        note("sqlite", drain_ours(str(work / f"drain{number}.db"), args.n, log))
        note("arq", drain_arq(args.n, log))
        if with_postgres:
            database = PostgresDatabase(number)
            try:
                note("postgres", drain_ours(database.url, args.n, log))
            finally:
                database.drop()
    idle: dict[str, Any] = {}
    if "latency" not in skip:
        idle["sqlite"] = latency(str(work / "latency.db"), 2 * args.latency, log)
        if with_postgres:
            database = PostgresDatabase(rounds)
            try:
                idle["postgres"] = latency(database.url, 2 * args.latency, log)
            finally:
                database.drop()
    if results["arq"]:
        arq_rate = median(results["arq"])
        print(f"\n{args.n:,} jobs of `await asyncio.sleep(0.01)` at async concurrency 100 (median of {rounds})")
        print(f"{'':24} {'jobs/s':>10} {'x arq':>7} {'CPU us/job':>11}   rounds")
        for name in ("sqlite", "postgres", "arq"):
            if results[name]:
                rate = median(results[name])
                each = ", ".join(f"{r:,.0f}" for r in results[name])
                label = "arq (Redis)" if name == "arq" else f"ours, {name}"
                print(f"{label:24} {rate:10,.0f} {rate / arq_rate:7.2f} {median(cpu[name]):11.0f}   {each}")
    for store, figures_by_kind in idle.items():
        print(f"\nidle latency on {store}, {args.latency} of each kind in turn: from the enqueue call / its commit")
        for kind, label in (("astamp", "async def job"), ("stamp", "sync job")):
            f = figures_by_kind[kind]
            print(f"{label:24} p50 {f['p50_ms']:6.2f} / {f['commit_p50_ms']:5.2f} ms   "
                  f"p99 {f['p99_ms']:6.2f} / {f['commit_p99_ms']:5.2f} ms")  # fmt: skip
    print(f"\nlog: {log}")


if __name__ == "__main__":
    import atexit

    atexit.register(kill_leftovers)
    main()
