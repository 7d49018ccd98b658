"""Jobs that take real time: the worker beside a bare thread pool and Huey (issue 16).

    python bench/workloads.py                    # every part, 3 rounds: about 10 minutes on 2 cores
    python bench/workloads.py --quick            # 1 round, smaller N: about 3 minutes
    python bench/workloads.py --parts sleep,cpu,priority,postgres --rounds 3

It runs in bench/.venv like run.py (made on first use).  Each figure:

- sleep: N jobs that each ``time.sleep(ms)`` (1 ms or 5 ms) at concurrency 8, 16
  and 32.  Ours: ``python -m worker_cli run --burst --concurrency C`` on a fresh
  file holding the N jobs, jobs/s from the first ``started`` to the last
  ``finished`` in the table.  Bare: a child process whose C threads take the same
  sleeps from a ``queue.SimpleQueue`` (no database), timed from the first start to
  the last finish.  Huey: agents.py's SqliteHuey consumer with C threads, timed by
  its own signals as in run.py.  The three run turn by turn in each round, and
  each ratio is the median over rounds of the ratios within a round.
- cpu: N jobs of pure-Python work (about 1 ms of CPU each, calibrated at the
  start) with ``--processes 1`` and ``--processes 2``, and the same loop run bare
  in 1 and 2 processes; the ratio is 2 processes over 1, paired by round.
- priority: 30,000 jobs of 1 ms pending; a worker at concurrency 16 drains them
  while this process enqueues a job of priority 100 every 10 ms; latency is from
  just before the enqueue call to the moment that job's function starts.
- postgres: the sleep rows at concurrency 16 on a fresh PostgreSQL database
  (BENCH_POSTGRES, as in postgres.py), beside the bare
  pool of the same round.

Everything, raw runs included, goes to bench/results/workloads-<timestamp>.json;
children's stderr to /tmp/worker-bench-workloads.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, RESULTS_DIR, median, percentile
from postgres import drop_database, fresh_database  # one database per run, made and dropped there
from run import AGENTS, JOBS, ensure_venv, last_json, reap, spawn

LOG = Path("/tmp/worker-bench-workloads.log")
RUN_TIMEOUT = 300.0
BULK = 1_000
SIZES = {
    "quick": {"rounds": 1, "n_1ms": 10_000, "n_5ms": 5_000, "n_cpu": 3_000, "backlog": 30_000},
    "full": {"rounds": 3, "n_1ms": 10_000, "n_5ms": 5_000, "n_cpu": 5_000, "backlog": 30_000},
}
CONCURRENCIES = (8, 16, 32)
PRIORITY_GAP = 0.010


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# --- Ours ----------------------------------------------------------------------------


def fill_ours(db: str, items: list[tuple[str, dict[str, Any]]], **options: Any) -> list[int]:
    import bench_jobs  # noqa: F401 -- registers the job types, as an app would

    from worker import Queue

    ids = []
    with Queue(db) as q:
        for done in range(0, len(items), BULK):
            ids += [j.id for j in q.enqueue_many(items[done : done + BULK], **options)]
    return ids


def read(db: str, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
    if db.startswith("postgresql"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            return conn.execute(statement.replace("?", "%s"), params).fetchall()
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(statement, params).fetchall()


def ours_command(db: str, concurrency: int, processes: int) -> list[str]:
    command = [sys.executable, "-m", "worker_cli", "run", "--burst", "--db", db, "--jobs", str(JOBS)]
    command += ["--concurrency", str(concurrency)]
    return command + (["--processes", str(processes)] if processes > 1 else [])


def ours(db: str, type: str, data: dict[str, Any], n: int, concurrency: int, processes: int = 1) -> dict[str, Any]:
    """Fill N jobs, drain them with a burst worker, read the window from the table."""
    ids = fill_ours(db, [(type, data)] * n)
    proc = spawn(ours_command(db, concurrency, processes), LOG, {"WORKER_LOG_LEVEL": "WARNING"})
    code, *_ = reap(proc, RUN_TIMEOUT)
    count, first, last = read(
        db,
        "SELECT count(*), min(started), max(finished) FROM worker_jobs"
        " WHERE id BETWEEN ? AND ? AND status = 'succeeded'",
        (min(ids), max(ids)),
    )[0]
    window = (last - first) / 1000 if count else float("nan")
    return {"n": n, "ok": code == 0 and count == n, "exit": code, "rate": count / window if window else None}


# --- Peers ---------------------------------------------------------------------------


def bare(ms: float, n: int, concurrency: int) -> dict[str, Any]:
    """The same sleeps on a plain thread pool fed by a SimpleQueue, in a process of its own."""
    proc = spawn([sys.executable, __file__, "bare-child", "--ms", str(ms), "--n", str(n), "-c", str(concurrency)], LOG)
    code, *_ = reap(proc, RUN_TIMEOUT)
    return {**last_json(proc), "ok": code == 0}


def bare_child(args: argparse.Namespace) -> dict[str, Any]:
    todo: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    for _ in range(args.n):
        todo.put(args.ms / 1000)
    for _ in range(args.concurrency):
        todo.put(None)
    first: list[float] = []
    last = [0.0] * args.concurrency

    def loop(slot: int) -> None:
        seconds = todo.get()
        if seconds is not None and not first:
            first.append(time.perf_counter())
        while seconds is not None:
            time.sleep(seconds)
            last[slot] = time.perf_counter()
            seconds = todo.get()

    threads = [threading.Thread(target=loop, args=(slot,)) for slot in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"n": args.n, "rate": args.n / (max(last) - first[0])}


def huey(ms: float, n: int, concurrency: int, scratch: Path) -> dict[str, Any]:
    db = str(scratch / f"huey-{time.monotonic_ns()}.db")
    proc = spawn([sys.executable, __file__, "huey-fill", "--db", db, "--ms", str(ms), "--n", str(n)], LOG)
    reap(proc, RUN_TIMEOUT)
    command = [sys.executable, str(AGENTS), "huey-consumer", "--db", db, "--workers", str(concurrency)]
    proc = spawn([*command, "--expect", str(n)], LOG)
    reap(proc, RUN_TIMEOUT)
    out = last_json(proc)
    window = out["last"] - out["first"]
    return {"n": n, "ok": out["completed"] == n, "rate": out["completed"] / window if window > 0 else None}


def huey_fill(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["BENCH_HUEY_DB"] = args.db
    import huey_tasks

    for _ in range(args.n):
        huey_tasks.sleep_ms(args.ms)
    return {"n": args.n}


def cpu_bare(loops: int, n: int, processes: int) -> dict[str, Any]:
    """N calls of the CPU job's loop, split over ``processes`` processes started together."""
    command = [sys.executable, __file__, "cpu-child", "--loops", str(loops), "--n", str(n // processes)]
    procs = [spawn(command, LOG) for _ in range(processes)]
    outs = []
    for proc in procs:
        reap(proc, RUN_TIMEOUT)
        outs.append(last_json(proc))
    window = max(o["last"] for o in outs) - min(o["first"] for o in outs)
    return {"n": n, "rate": n // processes * processes / window}


def cpu_child(args: argparse.Namespace) -> dict[str, Any]:
    from bench_jobs import busy

    first = time.time()
    for _ in range(args.n):
        busy(args.loops)
    return {"first": first, "last": time.time()}


def calibrate() -> int:
    """Loops of bench_jobs.busy that take about 1 ms of CPU here (the best of a few tries)."""
    from bench_jobs import busy

    loops = 20_000
    best = min(timed(lambda: busy(loops)) for _ in range(20))
    return max(1, round(loops * 0.001 / best))


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# --- Parts ---------------------------------------------------------------------------


def paired(runs: list[dict[str, Any]], peers: list[dict[str, Any]]) -> float | None:
    ratios = [a["rate"] / b["rate"] for a, b in zip(runs, peers, strict=True) if a.get("rate") and b.get("rate")]
    return median(ratios) if ratios else None


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"median": median([r["rate"] for r in runs if r.get("rate")]), "runs": runs}


def part_sleep(sizes: dict[str, Any], scratch: Path, results: dict[str, Any], *, postgres: bool) -> None:
    concurrencies = (16,) if postgres else CONCURRENCIES
    for ms, n in ((1, sizes["n_1ms"]), (5, sizes["n_5ms"])):
        for concurrency in concurrencies:
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": [], "huey": []}
            for _ in range(sizes["rounds"]):
                if postgres:
                    url = fresh_database()
                    try:
                        runs["ours"].append(ours(url, "sleep_ms", {"ms": ms}, n, concurrency))
                    finally:
                        drop_database(url)
                else:
                    db = str(scratch / f"ours-{time.monotonic_ns()}.db")
                    runs["ours"].append(ours(db, "sleep_ms", {"ms": ms}, n, concurrency))
                runs["bare"].append(bare(ms, n, concurrency))
                if not postgres:
                    runs["huey"].append(huey(ms, n, concurrency, scratch))
            row = {name: summary(done) for name, done in runs.items() if done}
            row["ours/bare"] = paired(runs["ours"], runs["bare"])
            row["ours/huey"] = paired(runs["ours"], runs["huey"]) if runs["huey"] else None
            row["load"] = load()
            key = f"{'postgres' if postgres else 'sqlite'} {ms}ms c={concurrency}"
            results[key] = row
            say(
                f"{key}: ours {row['ours']['median']:,.0f}/s, bare {row['bare']['median']:,.0f}/s "
                f"({fmt(row['ours/bare'])}x)"
                + (f", Huey {row['huey']['median']:,.0f}/s ({fmt(row['ours/huey'])}x)" if "huey" in row else "")
                + f"; load {row['load']}"
            )


def part_cpu(sizes: dict[str, Any], scratch: Path, results: dict[str, Any]) -> None:
    loops = calibrate()
    n = sizes["n_cpu"]
    runs: dict[str, list[dict[str, Any]]] = {"ours p1": [], "ours p2": [], "bare p1": [], "bare p2": []}
    for _ in range(sizes["rounds"]):
        for processes in (1, 2):
            db = str(scratch / f"cpu-{time.monotonic_ns()}.db")
            runs[f"ours p{processes}"].append(ours(db, "spin", {"loops": loops}, n, 1, processes))
            runs[f"bare p{processes}"].append(cpu_bare(loops, n, processes))
    row: dict[str, Any] = {name: summary(done) for name, done in runs.items()}
    row["loops"] = loops
    row["ours p2/p1"] = paired(runs["ours p2"], runs["ours p1"])
    row["bare p2/p1"] = paired(runs["bare p2"], runs["bare p1"])
    row["ours p1/bare p1"] = paired(runs["ours p1"], runs["bare p1"])
    row["load"] = load()
    results["cpu"] = row
    say(
        f"cpu ({loops} loops): ours p1 {row['ours p1']['median']:,.0f}/s, p2 {row['ours p2']['median']:,.0f}/s "
        f"({fmt(row['ours p2/p1'])}x); bare p1 {row['bare p1']['median']:,.0f}/s, p2 "
        f"{row['bare p2']['median']:,.0f}/s ({fmt(row['bare p2/p1'])}x); load {row['load']}"
    )


def part_priority(sizes: dict[str, Any], scratch: Path, results: dict[str, Any]) -> None:
    import bench_jobs  # noqa: F401

    from worker import Queue

    db = str(scratch / "priority.db")
    fill_ours(db, [("sleep_ms", {"ms": 1})] * sizes["backlog"])
    proc = spawn(ours_command(db, 16, 1), LOG, {"WORKER_LOG_LEVEL": "WARNING"})
    sent: dict[int, int] = {}
    committed: dict[int, int] = {}  # when the enqueue call returned
    with Queue(db) as q:
        deadline = time.monotonic() + 30
        while not read(db, "SELECT 1 FROM worker_jobs WHERE status != 'pending' LIMIT 1"):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker started no job in 30 s")
            time.sleep(0.005)
        while proc.poll() is None:
            pending = read(db, "SELECT count(*) FROM worker_jobs WHERE status = 'pending' AND type = 'sleep_ms'")
            if pending[0][0] < 500:  # the backlog is nearly drained: what follows measures an idle worker
                break
            before = time.time_ns()
            id = q.enqueue("stamp", priority=100).id
            sent[id], committed[id] = before, time.time_ns()
            time.sleep(PRIORITY_GAP)
    code = proc.returncode if proc.returncode is not None else reap(proc, RUN_TIMEOUT)[0]
    latencies, from_commit = [], []
    for id, result in read(db, "SELECT id, result FROM worker_jobs WHERE type = 'stamp' AND status = 'succeeded'"):
        latencies.append((json.loads(result) - sent[id]) / 1e6)
        from_commit.append((json.loads(result) - committed[id]) / 1e6)
    row = {
        "n": len(latencies),
        "sent": len(sent),
        "exit": code,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "from_commit_p50": percentile(from_commit, 50),
        "from_commit_p99": percentile(from_commit, 99),
        "load": load(),
        "latencies_ms": latencies,
    }
    results["priority"] = row
    say(
        f"priority under a backlog of {sizes['backlog']:,}: {len(latencies)} of {len(sent)} jobs, "
        f"p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms, max {row['max']:.2f} ms from the enqueue call; "
        f"p50 {row['from_commit_p50']:.2f} ms, p99 {row['from_commit_p99']:.2f} ms from its commit; load {row['load']}"
    )


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# --- Entry ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    child = commands.add_parser("bare-child")
    child.add_argument("--ms", type=float, required=True)
    child.add_argument("--n", type=int, required=True)
    child.add_argument("-c", "--concurrency", type=int, required=True)
    fill = commands.add_parser("huey-fill")
    fill.add_argument("--db", required=True)
    fill.add_argument("--ms", type=float, required=True)
    fill.add_argument("--n", type=int, required=True)
    cpu = commands.add_parser("cpu-child")
    cpu.add_argument("--loops", type=int, required=True)
    cpu.add_argument("--n", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="sleep,cpu,priority,postgres")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    children = {"bare-child": bare_child, "huey-fill": huey_fill, "cpu-child": cpu_child}
    if args.command in children:
        print(json.dumps(children[args.command](args)))
        return 0
    ensure_venv(Path(__file__).resolve())
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.rounds:
        sizes["rounds"] = args.rounds
    parts = args.parts.split(",")
    results: dict[str, Any] = {"started": datetime.now(UTC).isoformat(), "load_at_start": load(), "sizes": sizes}
    revision = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"], capture_output=True)
    results["revision"] = revision.stdout.decode().strip()
    say(f"revision {results['revision']}, load {results['load_at_start']}, parts {','.join(parts)}")
    with tempfile.TemporaryDirectory(prefix="worker-workloads-") as where:
        scratch = Path(where)
        if "sleep" in parts:
            part_sleep(sizes, scratch, results, postgres=False)
        if "cpu" in parts:
            part_cpu(sizes, scratch, results)
        if "priority" in parts:
            part_priority(sizes, scratch, results)
        if "postgres" in parts:
            part_sleep(sizes, scratch, results, postgres=True)
    results["load_at_end"] = load()
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"workloads-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=1))
    say(f"load at the end {results['load_at_end']}; raw figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
