"""The PostgreSQL benchmark: our worker's PostgreSQL store beside PgQueuer, procrastinate and bare SQL.

    python bench/postgres.py            # the whole run, about 8 minutes on 2 cores
    python bench/postgres.py --quick    # one round, 200,000 rows for the scale parts: about 3 minutes

Like run.py it re-runs itself in bench/.venv (the peers are installed only there).
Everything runs against the PostgreSQL at 127.0.0.1:5432 (BENCH_POSTGRES to use
another server): each measurement gets a database of its own, created for it
(bench_<pid>_<n>) and dropped right after, so no measurement sees another's
dead rows.  The server's settings are used as they are (synchronous_commit on,
autovacuum off on this machine); both are printed and kept in the JSON.

How each figure is measured:

- Drain: N no-op jobs are enqueued first (enqueue_many, 1,000 per call), then
  the real ``python -m worker_cli run --burst --db postgresql://... --jobs
  bench/bench_jobs.py`` runs; the rate is N over min(started) to max(finished)
  read from the table, so interpreter start-up is not counted.  ``--processes
  4`` against one process, the runs taking turns.
- PgQueuer: its QueueManager (asyncpg driver) in drain mode on a fresh schema
  of its own, filled with one batch enqueue; procrastinate: its worker
  (psycopg connector, wait=False) after batch_defer.  Both with the no-op job
  recording its first start and last end: the same window as ours.
- Ceiling: one psycopg connection on our schema, each transaction completing
  the previous 100 claimed rows and claiming the next 100 (FOR UPDATE SKIP
  LOCKED in a CTE, as our store claims).
- Enqueue: a fresh process; Queue(url).enqueue one per transaction, and
  enqueue_many in calls of 1,000; the connection is opened before the clock starts.
- Latency: an idle ``worker run`` (default concurrency) woken by LISTEN/NOTIFY;
  another process enqueues a ``stamp`` job every 20-30 ms; latency is from just
  before the enqueue call to the job function's start (agents.py latency).
- Pending rows due later: the drain at concurrency 1 on a table that also holds
  1,000,000 pending rows due tomorrow (one INSERT ... SELECT), against an empty
  table drained just before it.
- Churn: 1,000,000 jobs enqueued, run by the real worker (``--processes 4
  --keep-succeeded 0``) and deleted by Queue.prune(), on one database; then the
  drain of N fresh jobs on it, against a fresh database; then the same after a
  plain VACUUM of worker_jobs.  Dead rows and sizes come from pg_stat_user_tables;
  the index pages one claim reads, from EXPLAIN (ANALYZE, BUFFERS) of the
  store's own claim on N new jobs (fresh, churned, vacuumed; those N are then
  cancelled, so the drain after it runs its own N).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, REPO_DIR, RESULTS_DIR, median, percentile
from run import ensure_venv, kill_leftovers, last_json, reap, spawn

SERVER = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
JOBS = BENCH_DIR / "bench_jobs.py"
AGENTS = BENCH_DIR / "agents.py"
THIS = Path(__file__).resolve()
RUN_TIMEOUT = 600.0
BULK = 1_000

SIZES = {
    "full": {"n": 20_000, "reps": 3, "single": 5_000, "bulk": 100_000, "latency": 300, "rows": 1_000_000},
    "quick": {"n": 20_000, "reps": 1, "single": 2_000, "bulk": 50_000, "latency": 150, "rows": 200_000},
}
PGQUEUER_BATCHES = (10, 100, 500)  # 10 is its default
BIG_PREFETCH = 512  # our worker's knob most like PgQueuer's batch: jobs claimed ahead (default 32)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


# --- Databases: one per measurement, made here and dropped here -------------------------

MADE: list[str] = []


def admin() -> Any:
    import psycopg

    return psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5)


def fresh_database() -> str:
    name = f"bench_{os.getpid()}_{len(MADE) + 1:03d}"
    with admin() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    MADE.append(name)
    return f"{SERVER}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    if name in MADE:
        MADE.remove(name)


def drop_all() -> None:
    for name in list(MADE):
        with contextlib.suppress(Exception):
            drop_database(f"{SERVER}/{name}")


def server_settings() -> dict[str, str]:
    with admin() as conn:
        return {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("server_version", "synchronous_commit", "autovacuum", "fsync", "shared_buffers")
        }


def sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


# --- Our worker -------------------------------------------------------------------------


def fill_ours(url: str, n: int) -> None:
    import bench_jobs  # noqa: F401 -- registers the job types, as an app would

    from worker import Queue

    with Queue(url) as queue:
        queue.enqueue_many([])  # connects and applies the schema
        for done in range(0, n, BULK):
            queue.enqueue_many([("noop", {})] * min(BULK, n - done))


def drain_ours(
    url: str, n: int, *, concurrency: int = 1, processes: int = 1, prefetch: int | None = None, analyze: bool = False
) -> dict[str, Any]:
    """Fill N no-op jobs, run ``worker run --burst`` on them, read the window from the table."""
    low = sql(url, "SELECT coalesce(max(id), 0) FROM worker_jobs")[0][0] if has_table(url) else 0
    fill_ours(url, n)
    if analyze:  # what autovacuum would do soon after the fill; it is off on this machine
        sql(url, "ANALYZE worker_jobs")
    command = [sys.executable, "-m", "worker_cli", "run", "--burst", "--db", url, "--jobs", str(JOBS)]
    command += ["--concurrency", str(concurrency), *(["--processes", str(processes)] if processes > 1 else [])]
    command += ["--prefetch", str(prefetch)] if prefetch is not None else []
    started = time.perf_counter()
    proc = spawn(command, LOG, {"WORKER_LOG_LEVEL": "WARNING"})
    code, usage, end, _ = reap(proc, RUN_TIMEOUT)
    count, first, last = sql(
        url,
        "SELECT count(*), min(started), max(finished) FROM worker_jobs"
        " WHERE id > %s AND type = 'noop' AND status = 'succeeded'",
        (low,),
    )[0]
    window = (last - first) / 1000 if count else float("nan")
    ok = code == 0 and count == n
    if not ok:
        NOTES.append(f"ours c={concurrency} p={processes}: exit {code}, {count} of {n} succeeded; see {LOG}")
    return {
        "n": n,
        "ok": ok,
        "rate": rate(count, window),
        "window_s": window,
        "wall_s": end - started,
        "cpu_s": usage.ru_utime + usage.ru_stime if processes == 1 else None,
    }


def has_table(url: str) -> bool:
    return bool(sql(url, "SELECT to_regclass('worker_jobs') IS NOT NULL")[0][0])


def agent(*args: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    proc = spawn([sys.executable, str(THIS), *args], LOG)
    code, *_ = reap(proc, timeout)
    result = last_json(proc)
    if code != 0:
        raise RuntimeError(f"postgres.py {' '.join(args)} exited {code}; see {LOG}")
    return result


def enqueue_agent(args: argparse.Namespace) -> dict[str, Any]:
    """Child: time N single enqueues or N rows of enqueue_many on a fresh Queue(url), or N bare inserts."""
    import bench_jobs  # noqa: F401
    import psycopg

    from worker import Queue

    with Queue(args.url) as queue:
        queue.enqueue("noop")  # connects and applies the schema, untimed
        started = time.perf_counter()
        if args.mode == "single":
            for _ in range(args.n):
                queue.enqueue("noop")
        elif args.mode == "bare":  # the floor: psycopg alone, BEGIN / INSERT ... RETURNING id / COMMIT
            conn = psycopg.connect(args.url)
            for _ in range(args.n):
                with conn.transaction():
                    conn.execute("INSERT INTO worker_jobs (type) VALUES ('noop') RETURNING id").fetchone()
            conn.close()
        else:
            for done in range(0, args.n, BULK):
                queue.enqueue_many([("noop", {})] * min(BULK, args.n - done))
        seconds = time.perf_counter() - started
    return {"n": args.n, "seconds": seconds, "rate": rate(args.n, seconds)}


# --- Peers ------------------------------------------------------------------------------


class Window:
    """First start and last end of the no-op jobs a peer ran, and how many."""

    def __init__(self) -> None:
        self.first = 0.0
        self.last = 0.0
        self.count = 0

    def start(self) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def end(self) -> None:
        self.count += 1
        self.last = time.perf_counter()

    def result(self, n: int) -> dict[str, Any]:
        window = self.last - self.first
        return {"n": n, "completed": self.count, "ok": self.count == n, "rate": rate(self.count, window)}


def pgqueuer_agent(args: argparse.Namespace) -> dict[str, Any]:
    """Child: PgQueuer's QueueManager draining N no-op jobs at ``--batch``."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    async def main() -> dict[str, Any]:
        conn = await asyncpg.connect(args.url)
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        for done in range(0, args.n, BULK):
            size = min(BULK, args.n - done)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        window = Window()
        qm = QueueManager(queries)

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            window.start()
            window.end()

        await qm.run(batch_size=args.batch, mode=QueueExecutionMode.drain)
        await conn.close()
        return window.result(args.n)

    return asyncio.run(main())


def procrastinate_agent(args: argparse.Namespace) -> dict[str, Any]:
    """Child: procrastinate's worker (default concurrency 1) draining N no-op jobs."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=args.url))
    window = Window()

    @app.task(name="noop")
    async def noop() -> None:
        window.start()
        window.end()

    async def main() -> dict[str, Any]:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            for done in range(0, args.n, BULK):
                await noop.batch_defer_async(*[{}] * min(BULK, args.n - done))
            await app.run_worker_async(wait=False, concurrency=args.concurrency)
        return window.result(args.n)

    return asyncio.run(main())


# --- Bare SQL on our schema --------------------------------------------------------------

CEILING_CLAIM = """
WITH picked AS (
    SELECT id FROM worker_jobs WHERE status = 'pending' AND due <= %(now)s
     ORDER BY priority DESC, due LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
UPDATE worker_jobs AS j
   SET status = 'running', started = %(now)s, worker = 'ceiling', owner = 'ceiling', lease_until = %(now)s + 60000
  FROM picked WHERE j.id = picked.id
RETURNING j.id, j.type, j.data
"""
CEILING_FINISH = """
UPDATE worker_jobs
   SET status = 'succeeded', finished = %(now)s, result = 'null', error = NULL, lease_until = NULL,
       remove_at = CASE WHEN persistent = 1 THEN NULL ELSE %(now)s + coalesce(keep_ms, 604800000) END
 WHERE id = ANY(%(ids)s) AND status = 'running' AND owner = 'ceiling'
"""


def ceiling_agent(args: argparse.Namespace) -> dict[str, Any]:
    """Child: claim and complete N rows of our table with no job machinery, ``--batch`` per transaction."""
    import psycopg

    fill_ours(args.url, args.n)  # our schema and rows, through our store
    # With statistics the claim reads worker_jobs_claim in order; without them (a
    # table never analyzed) the planner expects 7 rows and sorts the whole backlog.
    sql(args.url, "ANALYZE worker_jobs")
    with psycopg.connect(args.url) as conn:
        done, previous = 0, []
        started = time.perf_counter()
        while True:
            now = time.time_ns() // 1_000_000
            with conn.transaction():
                if previous:
                    conn.execute(CEILING_FINISH, {"now": now, "ids": previous})
                rows = conn.execute(CEILING_CLAIM, {"now": now, "limit": args.batch}).fetchall()
            done += len(previous)
            if not rows:
                break
            previous = [row[0] for row in rows]
        seconds = time.perf_counter() - started
        left = conn.execute("SELECT count(*) FROM worker_jobs WHERE status <> 'succeeded'").fetchone()[0]
    return {"n": done, "left": left, "seconds": seconds, "rate": rate(done, seconds)}


# --- The parts ---------------------------------------------------------------------------


def on_fresh(measure: Any) -> Any:
    url = fresh_database()
    try:
        return measure(url)
    finally:
        drop_database(url)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"median": median([r["rate"] for r in runs]), "runs": runs}


def part_drain(sizes: dict[str, Any]) -> None:
    """Ours, PgQueuer and the bare-SQL ceiling take turns in each round, so a slow spell hits them alike."""
    n, count = sizes["n"], str(sizes["n"])
    plan: dict[str, Any] = {
        "ours-c1": lambda url: drain_ours(url, n),
        "ours-c4": lambda url: drain_ours(url, n, concurrency=4),
        "ours-p4": lambda url: drain_ours(url, n, processes=4),
        f"ours-c1-prefetch{BIG_PREFETCH}": lambda url: drain_ours(url, n, prefetch=BIG_PREFETCH),
        "ours-c1-analyzed": lambda url: drain_ours(url, n, analyze=True),
        **{
            f"pgqueuer-{batch}": lambda url, b=batch: agent("pgqueuer", "--url", url, "--n", count, "--batch", str(b))
            for batch in PGQUEUER_BATCHES
        },
        "ceiling-100": lambda url: agent("ceiling", "--url", url, "--n", count, "--batch", "100"),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    for round in range(sizes["reps"]):
        for name, measure in plan.items():
            runs[name].append(on_fresh(measure))
        say(f"drain round {round + 1}: " + ", ".join(f"{name} {r[-1]['rate']:,.0f}/s" for name, r in runs.items()))
    entry = RESULTS["drain"] = {name: summary(done) for name, done in runs.items()}
    entry["ours-p4"]["ratio_to_c1"] = paired(runs["ours-p4"], runs["ours-c1"])
    best = max(PGQUEUER_BATCHES, key=lambda batch: entry[f"pgqueuer-{batch}"]["median"])
    entry["pgqueuer_best_batch"] = best
    for name in ("ours-c1", "ours-c4", f"ours-c1-prefetch{BIG_PREFETCH}", "ours-c1-analyzed"):
        entry[name]["ratio_to_best_pgqueuer"] = paired(runs[name], runs[f"pgqueuer-{best}"])
    runs_p = [on_fresh(lambda url: agent("procrastinate", "--url", url, "--n", count))]
    entry["procrastinate"] = summary(runs_p)
    say(f"procrastinate: {entry['procrastinate']['median']:,.0f}/s")


def paired(runs: list[dict[str, Any]], others: list[dict[str, Any]]) -> float:
    """The median of the ratios of runs made in the same round."""
    return median([a["rate"] / b["rate"] for a, b in zip(runs, others, strict=True)])


def part_enqueue(sizes: dict[str, Any]) -> None:
    # Every commit waits for the WAL flush, which other clients of the server share:
    # the bare insert runs beside each single-enqueue run, as its floor at that moment.
    modes = (("single", sizes["single"]), ("bare", sizes["single"]), ("bulk", sizes["bulk"]))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in modes}
    for _ in range(sizes["reps"]):
        for mode, n in modes:
            runs[mode].append(
                on_fresh(lambda url, m=mode, k=n: agent("enqueue", "--url", url, "--n", str(k), "--mode", m))
            )
    entry = RESULTS["enqueue"] = {mode: summary(done) for mode, done in runs.items()}
    entry["single"]["ratio_to_bare"] = paired(runs["single"], runs["bare"])
    say(
        f"enqueue: {entry['single']['median']:,.0f}/s single ({entry['single']['ratio_to_bare']:.2f}x bare psycopg "
        f"{entry['bare']['median']:,.0f}/s), {entry['bulk']['median']:,.0f}/s enqueue_many"
    )


def part_latency(sizes: dict[str, Any]) -> None:
    def measure(url: str) -> dict[str, Any]:
        fill_ours(url, 0)  # the schema, so the idle worker and the producer start on it alike
        command = [sys.executable, "-m", "worker_cli", "run", "--db", url, "--jobs", str(JOBS)]
        proc = spawn(command, LOG, {"WORKER_LOG_LEVEL": "WARNING"})
        try:
            time.sleep(1.5)  # let it start, LISTEN and settle into idle
            if proc.poll() is not None:
                raise RuntimeError(f"idle worker exited {proc.returncode}; see {LOG}")
            return agent("latency-ours", "--url", url, "--n", str(sizes["latency"]))
        finally:
            proc.send_signal(signal.SIGTERM)
            reap(proc, 30)

    result = on_fresh(measure)
    values, after_commit = result["latencies_ms"], result["after_commit_ms"]
    RESULTS["latency"] = lat = {
        "n": len(values),
        "missing": result["missing"],
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values, default=float("nan")),
        "after_commit_p50": percentile(after_commit, 50),
        "after_commit_p99": percentile(after_commit, 99),
        "latencies_ms": values,
        "after_commit_ms": after_commit,
    }
    say(
        f"latency (LISTEN/NOTIFY, idle worker): from the enqueue call p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} "
        f"ms; from its commit p50 {lat['after_commit_p50']:.2f} ms, p99 {lat['after_commit_p99']:.2f} ms"
    )


def latency_agent(args: argparse.Namespace) -> dict[str, Any]:
    """Child: agents.py's latency loop (the same code as the SQLite figures) on a PostgreSQL URL."""
    import agents

    return agents.latency(argparse.Namespace(system="ours", db=args.url, n=args.n, gap_ms=20.0))


def part_future(sizes: dict[str, Any]) -> None:
    n = sizes["n"]

    def with_future(url: str) -> dict[str, Any]:
        fill_ours(url, 0)
        started = time.perf_counter()
        sql(
            url,
            """
            INSERT INTO worker_jobs (type, data, due, created_at)
            SELECT 'noop', '{}', %(now)s + 86400000 + i, %(now)s FROM generate_series(1, %(count)s) AS i
            """,
            {"now": time.time_ns() // 1_000_000, "count": sizes["rows"]},
        )
        built = time.perf_counter() - started
        return {**drain_ours(url, n), "build_s": built}

    empty, big = [], []
    for _ in range(sizes["reps"] - 1 or 1):
        empty.append(on_fresh(lambda url: drain_ours(url, n)))
        big.append(on_fresh(with_future))
    entry = RESULTS["future"] = {"rows": sizes["rows"], "empty": summary(empty), "future": summary(big)}
    entry["ratio"] = median([b["rate"] / e["rate"] for b, e in zip(big, empty, strict=True)])
    say(
        f"with {sizes['rows']:,} pending rows due tomorrow: {entry['future']['median']:,.0f}/s, "
        f"{entry['ratio']:.2f}x the empty table beside it"
    )


def table_stats(url: str) -> dict[str, Any]:
    (row,) = sql(
        url,
        """
        SELECT n_live_tup, n_dead_tup, pg_relation_size('worker_jobs'), pg_indexes_size('worker_jobs'),
               pg_relation_size('worker_jobs_claim'), n_tup_hot_upd, n_tup_upd, n_tup_del
          FROM pg_stat_user_tables WHERE relname = 'worker_jobs'
        """,
    )
    keys = ("live", "dead", "table_bytes", "indexes_bytes", "claim_index_bytes", "hot_updates", "updates", "deletes")
    return dict(zip(keys, row, strict=True))


def claim_buffers(url: str) -> int:
    """Pages one claim of 32 rows reads in worker_jobs_claim, in the worker's session settings (EXPLAIN BUFFERS)."""
    import psycopg

    import worker_postgres

    claim = worker_postgres.PostgresStore.CLAIM_SQL.format(deaths="deaths = 0", queue_filter="", columns="job.id")
    now = time.time_ns() // 1_000_000
    params = {"now": now, "limit": 32, "worker": "w", "owner": "o", "lease_until": now + 60_000, "types": ["noop"]}
    with psycopg.connect(url) as conn:
        conn.execute(worker_postgres.SESSION_SETTINGS)
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claim, params).fetchone()[0][0]["Plan"]
        conn.rollback()  # EXPLAIN ANALYZE ran the claim: nothing of it stays

    def scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if node.get("Index Name") == "worker_jobs_claim":
            yield node
        for child in node.get("Plans", []):
            yield from scans(child)

    return sum(node["Shared Hit Blocks"] + node["Shared Read Blocks"] for node in scans(plan))


def with_claim_buffers(url: str, n: int) -> int:
    """Fill N jobs and read what one claim costs on them."""
    fill_ours(url, n)
    return claim_buffers(url)


def claim_buffers_after_fill(url: str, n: int) -> int:
    """What one claim costs on N new jobs in this table; the drain that follows runs them."""
    fill_ours(url, n)
    pages = claim_buffers(url)
    sql(url, "UPDATE worker_jobs SET status = 'cancelled', finished = 0 WHERE status = 'pending'")
    return pages


def part_churn(sizes: dict[str, Any]) -> None:
    import bench_jobs  # noqa: F401

    from worker import Queue

    n = sizes["n"]
    entry: dict[str, Any] = RESULTS.setdefault("churn", {"rows": sizes["rows"]})
    url = fresh_database()
    try:
        started = time.perf_counter()
        fill_ours(url, sizes["rows"])
        entry["enqueue_s"] = time.perf_counter() - started
        started = time.perf_counter()
        command = [sys.executable, "-m", "worker_cli", "run", "--burst", "--db", url, "--jobs", str(JOBS)]
        # --prefetch only makes the history quicker to write: it is the same rows either way.
        command += ["--processes", "4", "--keep-succeeded", "0", "--prefetch", str(BIG_PREFETCH)]
        proc = spawn(command, LOG, {"WORKER_LOG_LEVEL": "WARNING"})
        code, *_ = reap(proc, RUN_TIMEOUT)
        entry["process_s"] = time.perf_counter() - started
        entry["processed"] = sql(url, "SELECT count(*) FROM worker_jobs WHERE status = 'succeeded'")[0][0]
        started = time.perf_counter()
        with Queue(url) as queue:
            entry["pruned"] = queue.prune()
        entry["prune_s"] = time.perf_counter() - started
        entry["after_prune"] = table_stats(url)
        say(
            f"churn: {sizes['rows']:,} enqueued in {entry['enqueue_s']:.0f} s, run in {entry['process_s']:.0f} s "
            f"(exit {code}), {entry['pruned']:,} pruned in {entry['prune_s']:.0f} s; "
            f"{entry['after_prune']['dead']:,} dead rows, table {entry['after_prune']['table_bytes'] / 2**20:.0f} MiB, "
            f"claim index {entry['after_prune']['claim_index_bytes'] / 2**20:.1f} MiB"
        )
        entry["claim_pages"] = {
            "fresh": on_fresh(lambda u: with_claim_buffers(u, n)),
            "churned": claim_buffers_after_fill(url, n),
        }
        fresh, churned, vacuumed = [], [], []
        for _ in range(sizes["reps"] - 1 or 1):
            fresh.append(on_fresh(lambda u: drain_ours(u, n)))
            churned.append(drain_ours(url, n))
        entry["before_vacuum"] = table_stats(url)
        started = time.perf_counter()
        sql(url, "VACUUM worker_jobs")
        entry["vacuum_s"] = time.perf_counter() - started
        entry["after_vacuum"] = table_stats(url)
        entry["claim_pages"]["vacuumed"] = claim_buffers_after_fill(url, n)
        pages = entry["claim_pages"]
        say(
            f"pages one claim reads in worker_jobs_claim: {pages['fresh']} fresh, {pages['churned']} after the "
            f"churn, {pages['vacuumed']} after the VACUUM"
        )
        for _ in range(sizes["reps"] - 1 or 1):
            vacuumed.append(drain_ours(url, n))
        entry["fresh"], entry["churned"], entry["vacuumed"] = summary(fresh), summary(churned), summary(vacuumed)
        entry["ratio"] = median([c["rate"] / f["rate"] for c, f in zip(churned, fresh, strict=True)])
        entry["ratio_after_vacuum"] = entry["vacuumed"]["median"] / entry["fresh"]["median"]
        say(
            f"after churn: {entry['churned']['median']:,.0f}/s ({entry['ratio']:.2f}x a fresh table), "
            f"after VACUUM ({entry['vacuum_s']:.1f} s): {entry['vacuumed']['median']:,.0f}/s "
            f"({entry['ratio_after_vacuum']:.2f}x)"
        )
    finally:
        drop_database(url)


# --- The table ---------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None or value != value else f"{value:,.{digits}f}"


def report() -> list[str]:
    r = RESULTS
    lines = []

    def row(label: str, value: float | None, note: str = "", digits: int = 0) -> None:
        lines.append(f"  {label:<68} {fmt(value, digits):>9}  {note}")

    drain = r.get("drain", {})
    if drain:
        best = drain["pgqueuer_best_batch"]
        versus = f"x PgQueuer at batch {best}, paired by round"
        lines.append(f"No-op drain, {SIZES_USED['n']:,} jobs, jobs/s (first start -> last finish)")
        row("ours, 1 process, concurrency 1", drain["ours-c1"]["median"],
            f"{fmt(drain['ours-c1']['ratio_to_best_pgqueuer'], 2)}{versus}; goal >= 20,000 and >= 1.0x")  # fmt: skip
        row("ours, 1 process, concurrency 4", drain["ours-c4"]["median"],
            f"{fmt(drain['ours-c4']['ratio_to_best_pgqueuer'], 2)}{versus}")  # fmt: skip
        name = f"ours-c1-prefetch{BIG_PREFETCH}"
        row(f"ours, 1 process, concurrency 1, --prefetch {BIG_PREFETCH}", drain[name]["median"],
            f"{fmt(drain[name]['ratio_to_best_pgqueuer'], 2)}{versus}")  # fmt: skip
        row("ours, 1 process, concurrency 1, ANALYZE after the fill", drain["ours-c1-analyzed"]["median"],
            f"{fmt(drain['ours-c1-analyzed']['ratio_to_best_pgqueuer'], 2)}{versus}")  # fmt: skip
        row("ours, --processes 4 (concurrency 1 each)", drain["ours-p4"]["median"],
            f"{fmt(drain['ours-p4']['ratio_to_c1'], 2)}x 1 process, paired; goal >= 1.3x")  # fmt: skip
        for batch in PGQUEUER_BATCHES:
            row(f"PgQueuer, batch {batch}" + (" (its default)" if batch == 10 else ""),
                drain[f"pgqueuer-{batch}"]["median"])  # fmt: skip
        if "procrastinate" in drain:
            row("procrastinate, concurrency 1 (its default), one run", drain["procrastinate"]["median"])
        row("bare SQL on our table (analyzed), 100 per transaction, 1 connection", drain["ceiling-100"]["median"])
    if "enqueue" in r:
        lines.append("Enqueue, jobs/s")
        row("Queue(url).enqueue, one per transaction", r["enqueue"]["single"]["median"],
            f"goal >= 3,000; {fmt(r['enqueue']['single']['ratio_to_bare'], 2)}x bare SQL, paired")  # fmt: skip
        row("bare SQL: psycopg BEGIN / INSERT ... RETURNING id / COMMIT", r["enqueue"]["bare"]["median"])
        row("Queue(url).enqueue_many, 1,000 per call", r["enqueue"]["bulk"]["median"], "goal >= 100,000")
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"Latency, idle worker woken by LISTEN/NOTIFY, ms ({lat['n']} jobs, {lat['missing']} missing)")
        row("p50 from the enqueue's commit to the job's start", lat["after_commit_p50"], "goal <= 3 ms", 2)
        row("p99 from the enqueue's commit to the job's start", lat["after_commit_p99"], "goal <= 10 ms", 2)
        row("p50 from the enqueue call (its commit included)", lat["p50"], "", 2)
        row("p99 from the enqueue call (its commit included)", lat["p99"], "", 2)
    if "future" in r:
        f = r["future"]
        lines.append("Scale, ours at concurrency 1, jobs/s")
        row(f"with {f['rows']:,} pending rows due tomorrow", f["future"]["median"],
            f"{fmt(f['ratio'], 2)}x the empty table beside it ({fmt(f['empty']['median'])}/s)")  # fmt: skip
    if "churn" in r and "ratio" in r["churn"]:
        ch = r["churn"]
        row(f"after {ch['rows']:,} jobs run and pruned, no vacuum", ch["churned"]["median"],
            f"{fmt(ch['ratio'], 2)}x a fresh table ({fmt(ch['fresh']['median'])}/s); "
            f"{ch['before_vacuum']['dead']:,} dead rows")  # fmt: skip
        row("  the same table after VACUUM worker_jobs", ch["vacuumed"]["median"],
            f"{fmt(ch['ratio_after_vacuum'], 2)}x fresh; the VACUUM took {ch['vacuum_s']:.1f} s")  # fmt: skip
    return lines


# --- Main --------------------------------------------------------------------------------

RESULTS: dict[str, Any] = {}
SIZES_USED: dict[str, Any] = {}
NOTES: list[str] = []
LOG = Path(os.environ.get("BENCH_LOG", "/tmp/worker-bench-postgres.log"))
PARTS = ("drain", "enqueue", "latency", "future", "churn")


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the PostgreSQL store against PgQueuer and procrastinate.")
    parser.add_argument("--quick", action="store_true", help="one round, 200,000 rows for the scale parts")
    parser.add_argument("--n", type=int, help="jobs per drain (default 20,000)")
    parser.add_argument("--rows", type=int, help="rows of the scale parts (default 1,000,000)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip ({','.join(PARTS)})")
    sub = parser.add_subparsers(dest="agent")
    for name in ("enqueue", "pgqueuer", "procrastinate", "ceiling", "latency-ours"):
        child = sub.add_parser(name)
        child.add_argument("--url", required=True)
        child.add_argument("--n", type=int, required=True)
        child.add_argument("--mode", choices=["single", "bulk", "bare"], default="single")
        child.add_argument("--batch", type=int, default=10)
        child.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    if args.agent:
        agents = {
            "enqueue": enqueue_agent,
            "pgqueuer": pgqueuer_agent,
            "procrastinate": procrastinate_agent,
            "ceiling": ceiling_agent,
            "latency-ours": latency_agent,
        }
        print(json.dumps(agents[args.agent](args)), flush=True)
        return 0
    ensure_venv(THIS)
    atexit.register(drop_all)
    atexit.register(kill_leftovers)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    mode = "quick" if args.quick else "full"
    sizes = {**SIZES[mode], **({"n": args.n} if args.n else {}), **({"rows": args.rows} if args.rows else {})}
    SIZES_USED.update(sizes)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    settings = server_settings()
    load = os.getloadavg()
    say(
        f"PostgreSQL {settings['server_version']} at {SERVER}: synchronous_commit {settings['synchronous_commit']}, "
        f"autovacuum {settings['autovacuum']}, fsync {settings['fsync']}; load average {load[0]:.2f}"
    )
    if settings["synchronous_commit"] != "on":
        NOTES.append(f"synchronous_commit is {settings['synchronous_commit']}, not on: figures are not comparable")
    began = time.perf_counter()
    parts = {
        "drain": part_drain,
        "enqueue": part_enqueue,
        "latency": part_latency,
        "future": part_future,
        "churn": part_churn,
    }
    for name, part in parts.items():
        if name in skip:
            continue
        try:
            part(sizes)
        except Exception as e:  # one broken part must not lose the others
            NOTES.append(f"{name} failed: {type(e).__name__}: {e}")
            say(f"{name} FAILED: {type(e).__name__}: {e}")
    elapsed = time.perf_counter() - began
    print()
    print("\n".join(report()))
    for note in NOTES:
        print(f"note: {note}")
    print(f"\n{mode} run took {elapsed:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"postgres-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}.json"
    document = {
        "mode": mode,
        "seconds": elapsed,
        "server": settings,
        "load_average": {"start": load, "end": os.getloadavg()},
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=False
        ).stdout.strip(),
        "sizes": sizes,
        "results": RESULTS,
        "notes": NOTES,
    }
    out.write_text(json.dumps(document, indent=1, default=str))
    print(f"results written to {out.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
