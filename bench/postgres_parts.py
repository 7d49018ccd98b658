"""Parts of the PostgreSQL store measured alone, with the server's CPU time beside the wall clock.

    .venv/bin/python bench/postgres_parts.py steps cca7326 HEAD [--rounds 4] [--n 40000] [--batch 512]
    .venv/bin/python bench/postgres_parts.py bulk cca7326 WORKTREE [--rounds 4] [--calls 50]
    .venv/bin/python bench/postgres_parts.py single [--rounds 6] [--n 400]

``steps``: the statements of a worker's loop step, as Worker._tick makes them,
without the worker around them: one transaction that finishes the batch claimed
by the one before (finish_many_if_owned), adds it to the per-minute counts and
claims the next batch, until N jobs are done.  ``bulk``: Queue(url).enqueue_many
of 1,000 rows per call.  Two revisions (or WORKTREE) take turns, each in a
process and on a database of its own (exported and made as in ab_postgres.py).
Each prints jobs (rows) per second, and the client's and the server's CPU time
per job: the server's is read from /proc for the backend serving the store, so
the server must run on this machine.  On a shared machine the wall clock moves
by half between turns; the CPU time per job moves less, and is what to compare.

``single``: Queue(url).enqueue, one per call, against a bare psycopg INSERT ...
RETURNING id on an autocommit connection (one round trip, as ours) and in
BEGIN ... COMMIT (three), turn by turn; and the protocol messages of one enqueue.
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
sys.path.insert(0, str(BENCH_DIR))

from ab_postgres import SERVER, export  # noqa: E402

# Each child: argv = url, N (jobs or calls), batch; prints "rate client_us server_us".
COMMON = """
import os, sys, time
import psycopg, worker
url = sys.argv[1]

def server_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
"""
STEPS = (
    COMMON
    + """
import worker_postgres
n, batch = int(sys.argv[2]), int(sys.argv[3])
with worker.Queue(url, check_types=False) as queue:
    for done in range(0, n, 1000):
        queue.enqueue_many([("noop", {})] * min(1000, n - done))
store = worker_postgres.open_store(url)
pid, jobs, types = store.conn.info.backend_pid, [], '["noop"]'
server, client, wall = server_cpu(pid), time.process_time(), time.perf_counter()
while True:
    now = store.now()
    with store.transaction():
        ended = [(job.id, "succeeded", None, None, now, 3_600_000) for job in jobs]
        owned = store.finish_many_if_owned("bench", now, ended) if ended else set()
        store.count_finished([(now, job.queue, "succeeded") for job in jobs if job.id in owned])
        jobs, _ = store.claim("bench", "bench:1", now, now + 60_000, batch, types, ())
    if not jobs:
        break
wall, client, server = time.perf_counter() - wall, time.process_time() - client, server_cpu(pid) - server
print(n / wall, client / n * 1e6, server / n * 1e6)
"""
)
BULK = (
    COMMON
    + """
calls = int(sys.argv[2])
items = [("noop", {"n": i}) for i in range(1000)]
with worker.Queue(url, check_types=False) as queue:
    queue.enqueue_many(items[:1])  # connects and makes the schema
    pid = queue._store().conn.info.backend_pid
    server, client, wall = server_cpu(pid), time.process_time(), time.perf_counter()
    for _ in range(calls):
        queue.enqueue_many(items)
    wall, client, server = time.perf_counter() - wall, time.process_time() - client, server_cpu(pid) - server
rows = calls * len(items)
print(rows / wall, client / rows * 1e6, server / rows * 1e6)
"""
)


def fresh_database(name: str) -> str:
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    return f"{SERVER}/{name}"


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def one_run(code: Path, script: str, *args: str) -> tuple[float, float, float]:
    name = f"worker_parts_{os.getpid()}"
    url = fresh_database(name)
    try:
        env = {**os.environ, "PYTHONPATH": str(code), "WORKER_LOG_LEVEL": "WARNING"}
        out = subprocess.run([sys.executable, "-c", script, url, *args], env=env, cwd=code, capture_output=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.decode())
        rate, client, server = (float(value) for value in out.stdout.split())
        return rate, client, server
    finally:
        drop_database(name)


def compare(args: argparse.Namespace, script: str, unit: str, *child_args: str) -> None:
    with tempfile.TemporaryDirectory(prefix="worker-parts-") as scratch:
        code = {rev: export(rev, Path(scratch) / f"rev{i}") for i, rev in enumerate((args.a, args.b))}
        runs: dict[str, list[tuple[float, float, float]]] = {rev: [] for rev in code}
        for number in range(args.rounds):
            for rev, path in code.items() if number % 2 == 0 else reversed(code.items()):
                runs[rev].append(one_run(path, script, *child_args))
                rate, client, server = runs[rev][-1]
                print(
                    f"  round {number + 1} {rev}: {rate:,.0f} {unit}/s, client {client:.1f} us, server {server:.1f} us"
                )
    medians = {rev: [statistics.median(run[i] for run in runs[rev]) for i in range(3)] for rev in runs}
    (rate_a, client_a, server_a), (rate_b, client_b, server_b) = medians[args.a], medians[args.b]
    print(f"medians of {args.rounds} rounds, CPU time per {unit[:-1]} (load average now {os.getloadavg()[0]:.2f}):")
    for rev, (rate, client, server) in medians.items():
        print(f"  {rev:>10}  {rate:9,.0f} {unit}/s  client {client:5.1f} us  server {server:5.1f} us")
    ratios = (
        f"rate {rate_b / rate_a:.2f}x, client CPU {client_b / client_a:.2f}x, server CPU {server_b / server_a:.2f}x"
    )
    print(f"  b / a: {ratios}")


def single(args: argparse.Namespace) -> None:
    import psycopg

    import worker

    name = f"worker_parts_{os.getpid()}"
    url = fresh_database(name)
    try:
        queue = worker.Queue(url, check_types=False)
        queue.enqueue("noop")
        conn = queue._store().conn
        with tempfile.NamedTemporaryFile("w+") as trace:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            queue.enqueue("noop", {"a": 1})
            conn.pgconn.untrace()
            trace.seek(0)
            lines = [line.split() for line in trace]
        sent = [line[2] for line in lines if line[:1] == ["F"]]
        replies = sum(1 for line in lines if line[:1] == ["B"] and line[2] == "ReadyForQuery")
        print(f"one Queue(url).enqueue sends {' '.join(sent)}: {replies} round trip(s)")
        bare = psycopg.connect(url, autocommit=True)
        in_transaction = psycopg.connect(url)
        insert = "INSERT INTO worker_jobs (type, data) VALUES (%s, %s) RETURNING id"

        def ours() -> None:
            queue.enqueue("noop", {"a": 1})

        def bare_insert() -> None:
            bare.execute(insert, ("noop", '{"a":1}')).fetchone()

        def bare_begin_insert_commit() -> None:
            with in_transaction.transaction():
                in_transaction.execute(insert, ("noop", '{"a":1}')).fetchone()

        ways = (ours, bare_insert, bare_begin_insert_commit)
        rates: dict[str, list[float]] = {way.__name__: [] for way in ways}
        import time

        for number in range(args.rounds):
            for way in ways if number % 2 == 0 else reversed(ways):
                started = time.perf_counter()
                for _ in range(args.n):
                    way()
                rates[way.__name__].append(args.n / (time.perf_counter() - started))
        queue.close()
        bare.close()
        in_transaction.close()
    finally:
        drop_database(name)
    medians = {way: statistics.median(values) for way, values in rates.items()}
    print(f"{args.n} enqueues a turn, medians of {args.rounds} turns (load average now {os.getloadavg()[0]:.2f}):")
    for way, rate in medians.items():
        print(f"  {way:25} {rate:7,.0f}/s   turns {' '.join(f'{value:,.0f}' for value in rates[way])}")
    print(f"  ours / bare INSERT {medians['ours'] / medians['bare_insert']:.2f}x, ours / bare BEGIN-INSERT-COMMIT"
          f" {medians['ours'] / medians['bare_begin_insert_commit']:.2f}x")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    steps = parts.add_parser("steps")
    bulk = parts.add_parser("bulk")
    for part in (steps, bulk):
        part.add_argument("a", help="a git revision, or WORKTREE")
        part.add_argument("b", help="a git revision, or WORKTREE")
        part.add_argument("--rounds", type=int, default=4)
    steps.add_argument("--n", type=int, default=40_000)
    steps.add_argument("--batch", type=int, default=512, help="jobs claimed and finished a step (the prefetch)")
    bulk.add_argument("--calls", type=int, default=50, help="enqueue_many calls of 1,000 rows")
    one = parts.add_parser("single")
    one.add_argument("--rounds", type=int, default=6)
    one.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    if args.part == "steps":
        compare(args, STEPS, "jobs", str(args.n), str(args.batch))
    elif args.part == "bulk":
        compare(args, BULK, "rows", str(args.calls))
    else:
        sys.path.insert(0, str(BENCH_DIR.parent))
        single(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
