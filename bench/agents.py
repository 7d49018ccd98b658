"""The benchmark's child processes: producers, peer consumers, the bare-SQL ceiling.

run.py starts each as ``python bench/agents.py COMMAND ...`` in the bench
virtualenv; each prints one JSON object on its last line of stdout.  Our own
worker is never driven from here: run.py starts the real ``python -m worker
run`` for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REDIS_DB, REDIS_HOST, REDIS_PORT, REPO_DIR, RQ_QUEUE

# How often litequeue's loop looks again at an empty queue: the same as our
# worker's POLL_INTERVAL, so their latencies and idle costs compare like for like.
LITEQUEUE_POLL = 0.005
BULK_BATCH = 1_000


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


# --- Enqueue --------------------------------------------------------------------


def timed_batches(n: int, batch: int, enqueue_batch: Callable[[int], None]) -> float:
    started = time.perf_counter()
    done = 0
    while done < n:
        size = min(batch, n - done)
        enqueue_batch(size)
        done += size
    return time.perf_counter() - started


def enqueue_ours(args: argparse.Namespace) -> dict[str, Any]:
    import bench_jobs  # noqa: F401 -- registers the job types, as an app would

    from worker import Queue

    queue = Queue(args.db)
    queue.enqueue("noop")  # opens the connection and applies the schema, untimed
    if args.mode == "single":
        seconds = timed_batches(args.n, 1, lambda _: queue.enqueue("noop"))
    else:
        seconds = timed_batches(args.n, args.batch, lambda size: queue.enqueue_many([("noop", {})] * size))
    queue.close()
    return {"n": args.n, "seconds": seconds, "rate": rate(args.n, seconds)}


def enqueue_huey(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["BENCH_HUEY_DB"] = args.db
    import huey_tasks

    huey_tasks.noop()
    if args.mode != "single":
        return {"skipped": "Huey has no bulk enqueue (map() enqueues one task per transaction)"}
    seconds = timed_batches(args.n, 1, lambda _: huey_tasks.noop())
    return {"n": args.n, "seconds": seconds, "rate": rate(args.n, seconds)}


LITEQUEUE_NOOP = json.dumps({"type": "noop", "data": {}})


def enqueue_litequeue(args: argparse.Namespace) -> dict[str, Any]:
    from litequeue import LiteQueue

    queue = LiteQueue(args.db)
    queue.put(LITEQUEUE_NOOP)
    if args.mode == "single":
        seconds = timed_batches(args.n, 1, lambda _: queue.put(LITEQUEUE_NOOP))
    else:
        # litequeue has no bulk call: its public transaction() around the puts.
        def put_many(size: int) -> None:
            with queue.transaction():
                for _ in range(size):
                    queue.put(LITEQUEUE_NOOP)

        seconds = timed_batches(args.n, args.batch, put_many)
    return {"n": args.n, "seconds": seconds, "rate": rate(args.n, seconds)}


def rq_queue() -> Any:
    from redis import Redis
    from rq import Queue

    return Queue(RQ_QUEUE, connection=Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB))


def enqueue_rq(args: argparse.Namespace) -> dict[str, Any]:
    import rq_tasks
    from rq import Queue

    queue = rq_queue()
    queue.enqueue(rq_tasks.noop)
    if args.mode == "single":
        seconds = timed_batches(args.n, 1, lambda _: queue.enqueue(rq_tasks.noop))
    else:
        seconds = timed_batches(
            args.n,
            args.batch,
            lambda size: queue.enqueue_many([Queue.prepare_data(rq_tasks.noop) for _ in range(size)]),
        )
    return {"n": args.n, "seconds": seconds, "rate": rate(args.n, seconds)}


ENQUEUERS = {"ours": enqueue_ours, "huey": enqueue_huey, "litequeue": enqueue_litequeue, "rq": enqueue_rq}


def fill(args: argparse.Namespace) -> dict[str, Any]:
    """Enqueue N no-op jobs the fastest way each system offers (not timed by run.py)."""
    if args.system == "huey":
        os.environ["BENCH_HUEY_DB"] = args.db
        import huey_tasks

        for _ in range(args.n):
            huey_tasks.noop()
        return {"n": args.n}
    args.mode, args.batch = "bulk", BULK_BATCH
    ENQUEUERS[args.system](args)
    return {"n": args.n + 1}  # the enqueuers add one untimed warm-up job


# --- Peer consumers ---------------------------------------------------------------


def huey_consumer(args: argparse.Namespace) -> dict[str, Any]:
    """SqliteHuey's consumer with ``--workers`` threads or processes.

    With ``--expect N`` it stops itself once N tasks completed and reports the
    time from the first task started to the last one completed (Huey's own
    signals, counted in shared memory so process workers count too).
    """
    os.environ["BENCH_HUEY_DB"] = args.db
    import huey_tasks
    from huey.signals import SIGNAL_COMPLETE, SIGNAL_EXECUTING

    huey = huey_tasks.huey
    completed = multiprocessing.Value("q", 0)
    first = multiprocessing.Value("d", 0.0)
    last = multiprocessing.Value("d", 0.0)
    if args.expect:

        @huey.signal(SIGNAL_EXECUTING)
        def on_executing(signal_name: str, task: Any, *rest: Any, **extra: Any) -> None:
            if first.value == 0.0:
                with first.get_lock():
                    if first.value == 0.0:
                        first.value = time.time()

        @huey.signal(SIGNAL_COMPLETE)
        def on_complete(signal_name: str, task: Any, *rest: Any, **extra: Any) -> None:
            with completed.get_lock():
                completed.value += 1
                last.value = time.time()

        def stop_when_done() -> None:
            while completed.value < args.expect:
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGTERM)  # Huey's immediate stop

        threading.Thread(target=stop_when_done, daemon=True).start()

    consumer = huey.create_consumer(workers=args.workers, worker_type=args.worker_type)
    consumer.run()
    return {"completed": completed.value, "first": first.value, "last": last.value}


def litequeue_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The obvious litequeue worker: pop, run the registered function, done; ``--threads`` loops."""
    from litequeue import LiteQueue

    registry: dict[str, Callable[..., Any]] = {"noop": lambda: None, "stamp": time.time_ns}
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    windows: list[tuple[float, float, int]] = []

    def loop() -> None:
        queue = LiteQueue(args.db)
        first = last = 0.0
        count = 0
        while not stopping.is_set():
            message = queue.pop()
            if message is None:
                if args.burst:
                    break
                time.sleep(LITEQUEUE_POLL)
                continue
            if not first:
                first = time.time()
            task = json.loads(message.data)
            try:
                registry[task["type"]](**task["data"])
                queue.done(message.message_id)
            except Exception:
                queue.mark_failed(message.message_id)
            count += 1
            last = time.time()
        windows.append((first, last, count))
        queue.close()

    threads = [threading.Thread(target=loop) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(0.1)
    firsts = [w[0] for w in windows if w[2]]
    return {
        "completed": sum(w[2] for w in windows),
        "first": min(firsts) if firsts else 0.0,
        "last": max((w[1] for w in windows), default=0.0),
    }


def rq_worker(args: argparse.Namespace) -> dict[str, Any]:
    """RQ's SimpleWorker (jobs run in the worker process, no fork per job)."""
    from rq import SimpleWorker

    queue = rq_queue()
    worker = SimpleWorker([queue], connection=queue.connection)
    first = time.time()
    worker.work(burst=args.burst, logging_level="WARNING")
    last = time.time()
    return {"first": first, "last": last, "completed": queue.finished_job_registry.count}


# --- Latency: enqueue from another process, one at a time, spaced out ---------------


def latency(args: argparse.Namespace) -> dict[str, Any]:
    """Enqueue ``--n`` jobs spaced ``--gap-ms`` (+ up to 50 % jitter); time to their start.

    The clock starts just before the enqueue call (so it includes the commit) and
    stops when the job function starts (ours, Huey, RQ: the ``stamp`` job returns
    time.time_ns()), or for litequeue, which stores no results, when the worker
    popped it (its ``lock_time``, also time.time_ns()).
    """
    rng = random.Random(5)
    gap = args.gap_ms / 1000
    sent: list[tuple[int, int, Any]] = []
    if args.system == "ours":
        import bench_jobs  # noqa: F401

        from worker import Queue

        queue = Queue(args.db)
        queue.enqueue("noop")  # connect and apply the schema before the clock matters

        def send() -> Any:
            return queue.enqueue("stamp").id

        def started_ns(handle: Any) -> int | None:
            row = queue.get(handle)
            return row.result if row is not None and row.status == "succeeded" else None

    elif args.system == "huey":
        os.environ["BENCH_HUEY_DB"] = args.db
        import huey_tasks

        def send() -> Any:
            return huey_tasks.stamp()

        def started_ns(handle: Any) -> int | None:
            return handle.get(blocking=True, timeout=1)

    elif args.system == "litequeue":
        from litequeue import LiteQueue

        lq = LiteQueue(args.db)
        payload = json.dumps({"type": "stamp", "data": {}})

        def send() -> Any:
            return lq.put(payload).message_id

        def started_ns(handle: Any) -> int | None:
            message = lq.get(handle)
            return message.lock_time if message is not None else None

    else:
        import rq_tasks

        rq = rq_queue()

        def send() -> Any:
            return rq.enqueue(rq_tasks.stamp)

        def started_ns(handle: Any) -> int | None:
            return handle.return_value(refresh=True)

    for _ in range(args.n):
        time.sleep(gap * (1 + 0.5 * rng.random()))
        t0 = time.time_ns()
        handle = send()
        sent.append((t0, time.time_ns(), handle))
    deadline = time.monotonic() + 30
    latencies: list[float] = []
    after_commit: list[float] = []  # from the enqueue call's return: the commit is done then
    missing = 0
    for t0, committed, handle in sent:
        while True:
            try:
                started = started_ns(handle)
            except Exception:  # e.g. Huey's result timeout
                started = None
            if started is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if started is None:
            missing += 1
        else:
            latencies.append((started - t0) / 1e6)
            after_commit.append((started - committed) / 1e6)
    return {"latencies_ms": latencies, "after_commit_ms": after_commit, "missing": missing}


# --- The bare-SQL ceiling -------------------------------------------------------------

# The same writes as our worker's claim and finish (same columns, same indexes touched).
CEILING_CLAIM_ONE = """
UPDATE worker_jobs
   SET status = 'running', started = :now, worker = 'ceiling', owner = 'ceiling', lease_until = :now + 60000
 WHERE id = (SELECT id FROM worker_jobs WHERE status = 'pending' AND due <= :now
              ORDER BY priority DESC, due, id LIMIT 1)
RETURNING id, type, data
"""
CEILING_CLAIM_MANY = """
UPDATE worker_jobs
   SET status = 'running', started = :now, worker = 'ceiling', owner = 'ceiling', lease_until = :now + 60000
 WHERE id IN (SELECT id FROM worker_jobs WHERE status = 'pending' AND due <= :now
               ORDER BY priority DESC, due, id LIMIT {limit})
RETURNING id, type, data
"""
CEILING_FINISH = """
UPDATE worker_jobs
   SET status = 'succeeded', finished = :now, result = 'null', error = NULL, lease_until = NULL,
       remove_at = CASE WHEN persistent THEN NULL ELSE :now + coalesce(keep_ms, 604800000) END
 WHERE id = :id AND status = 'running' AND owner = 'ceiling'
"""


def ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """Claim and complete N rows of our schema with no job machinery at all.

    Each transaction records the previous batch and claims the next one (the
    shape our worker's loop has), so one job per transaction is one commit per
    job.  ``--driver`` picks apsw or the standard library's sqlite3 (the library
    our worker uses), each with its own bundled or linked SQLite.
    """
    now = time.time_ns() // 1_000_000
    if args.driver == "apsw":
        import apsw

        conn: Any = apsw.Connection(args.db)
        conn.set_busy_timeout(5000)
        conn.execute((REPO_DIR / "schema.sql").read_text())
        version = apsw.sqlite_lib_version()
    else:
        import sqlite3

        conn = sqlite3.connect(args.db, isolation_level=None, timeout=5)
        conn.executescript((REPO_DIR / "schema.sql").read_text())
        version = sqlite3.sqlite_version
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(
        """
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
        INSERT INTO worker_jobs (type, data, due, created_at) SELECT 'noop', '{}', :now, :now FROM n
        """,
        {"count": args.n, "now": now},
    )
    claim = CEILING_CLAIM_ONE if args.batch == 1 else CEILING_CLAIM_MANY.format(limit=int(args.batch))
    done = 0
    previous: list[int] = []
    started = time.perf_counter()
    while True:
        now = time.time_ns() // 1_000_000
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(CEILING_FINISH, [{"now": now, "id": job_id} for job_id in previous])
        rows = conn.execute(claim, {"now": now}).fetchall()
        conn.execute("COMMIT")
        done += len(previous)
        if not rows:
            break
        previous = [row[0] for row in rows]
    seconds = time.perf_counter() - started
    left = conn.execute("SELECT count(*) FROM worker_jobs WHERE status != 'succeeded'").fetchone()[0]
    conn.close()
    return {"n": done, "seconds": seconds, "rate": rate(done, seconds), "left": left, "sqlite": version}


# --- Scale: big tables, built in one statement each -------------------------------------


def build_scale(args: argparse.Namespace) -> dict[str, Any]:
    """Our table with ``--finished`` succeeded rows and ``--future`` pending rows due tomorrow.

    The worker's own code makes the schema; the rows come from one INSERT ... SELECT
    over a recursive CTE each, through the same SQLite library (one per process).
    """
    import sqlite3

    from worker import Queue

    with Queue(args.db) as queue:
        queue.enqueue_many([])  # connects and applies the schema
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=5)
    now = time.time_ns() // 1_000_000
    started = time.perf_counter()
    with contextlib.closing(conn):
        conn.execute("BEGIN IMMEDIATE")
        if args.finished:
            conn.execute(
                """
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
                INSERT INTO worker_jobs (type, data, status, due, created_at, started, finished, result,
                                         worker, owner, remove_at)
                SELECT 'noop', '{}', 'succeeded', :now - :count + i, :now - :count + i, :now - :count + i,
                       :now - :count + i, 'null', 'bench:0', 'old', :now + 604800000
                  FROM n
                """,
                {"count": args.finished, "now": now},
            )
        if args.future:
            conn.execute(
                """
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
                INSERT INTO worker_jobs (type, data, due, created_at)
                SELECT 'noop', '{}', :now + 86400000 + i, :now FROM n
                """,
                {"count": args.future, "now": now},
            )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"seconds": time.perf_counter() - started}


# --- CLI --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    systems = ["ours", "huey", "litequeue", "rq"]

    enqueue = commands.add_parser("enqueue")
    enqueue.add_argument("system", choices=systems)
    enqueue.add_argument("--db", default="")
    enqueue.add_argument("--n", type=int, required=True)
    enqueue.add_argument("--mode", choices=["single", "bulk"], required=True)
    enqueue.add_argument("--batch", type=int, default=BULK_BATCH)

    fill_cmd = commands.add_parser("fill")
    fill_cmd.add_argument("system", choices=systems)
    fill_cmd.add_argument("--db", default="")
    fill_cmd.add_argument("--n", type=int, required=True)

    huey = commands.add_parser("huey-consumer")
    huey.add_argument("--db", required=True)
    huey.add_argument("--workers", type=int, default=1)
    huey.add_argument("--worker-type", choices=["thread", "process"], default="thread")
    huey.add_argument("--expect", type=int, default=0)

    lq = commands.add_parser("litequeue-worker")
    lq.add_argument("--db", required=True)
    lq.add_argument("--threads", type=int, default=1)
    lq.add_argument("--burst", action="store_true")

    rq = commands.add_parser("rq-worker")
    rq.add_argument("--burst", action="store_true")

    lat = commands.add_parser("latency")
    lat.add_argument("system", choices=systems)
    lat.add_argument("--db", default="")
    lat.add_argument("--n", type=int, required=True)
    lat.add_argument("--gap-ms", type=float, default=20.0)

    ceil = commands.add_parser("ceiling")
    ceil.add_argument("--db", required=True)
    ceil.add_argument("--n", type=int, required=True)
    ceil.add_argument("--batch", type=int, default=1)
    ceil.add_argument("--driver", choices=["apsw", "sqlite3"], default="apsw")

    scale = commands.add_parser("build-scale")
    scale.add_argument("--db", required=True)
    scale.add_argument("--finished", type=int, default=0)
    scale.add_argument("--future", type=int, default=0)

    args = parser.parse_args()
    if args.command == "enqueue":
        emit(ENQUEUERS[args.system](args))
    else:
        handlers: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
            "fill": fill,
            "huey-consumer": huey_consumer,
            "litequeue-worker": litequeue_worker,
            "rq-worker": rq_worker,
            "latency": latency,
            "ceiling": ceiling,
            "build-scale": build_scale,
        }
        emit(handlers[args.command](args))


if __name__ == "__main__":
    main()
