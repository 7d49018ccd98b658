"""Reliability under faults: nothing lost, nothing run twice without a reason.

Each scenario runs real ``python -m worker run`` processes on a database under
tmp_path, with a jobs module written there (JOBS_MODULE) whose every run appends
``(job id, attempt, pid, start|end, epoch ms)`` to a ledger file, fsynced.  After
every scenario one ``check()`` holds the table and the ledger to what README's
guarantees promise:

- every enqueued id exists; every row is finished or waiting for a future due,
  and none is running past its lease plus the rescue interval;
- each row ran at most once; a chain has no more attempts than max_attempts
  plus its worker deaths; a job re-ran only if the worker running it died or
  stalled (the scenario says which pids did);
- exactly one succeeded row per logical job (a chain of rows linked by
  rescheduled_from_job; for a cron job, one slot), whose JSON result is the
  proof the run wrote into the ledger;
- ``PRAGMA integrity_check`` is ``ok``.

Faults are injected from outside (kill -9, SIGSTOP, another writer holding the
lock, a full filesystem, a clock step) or, for the crash points, by the jobs
module wrapping engine methods in the worker process it is imported into.

The database is only ever read here with the standard library's sqlite3, the
SQLite library the engine uses: a second SQLite library in one process (apsw)
drops the other's POSIX locks and can lose commits.

Scaled down where the issue allows: see each scenario's docstring for its figures.
Scenario 9 installs Node's better-sqlite3 (12.x, clients/node) with npm once per
session; it compiles from source here, about a minute the first time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import (
    FakeClock,
    Processes,
    WorkerProcess,
    child_pids,
    create_database,
    wait_for,
    without_file_permission_override,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, POSIX signals and mounts")

HERE = Path(__file__).resolve().parent
NODE_CLIENT = HERE / "clients" / "node"
SQLITE3_SHELL = shutil.which("sqlite3") or "/usr/bin/sqlite3"
POLL = 0.02  # seconds between looks at the table
CRASH_CODE = 86  # exit code of a worker the jobs module crashed on purpose
TEST_TYPES = {"work", "poison", "tick"}  # the job types that write the ledger
FINISHED = ("succeeded", "failed", "cancelled")
RESCUED = ("worker lost", "worker died")  # how a row rescued after its worker's lease expired begins
WAL_BOUND = getattr(worker, "WAL_SIZE_LIMIT", 16 * 1024 * 1024)  # the -wal size README promises after a checkpoint

JOBS_MODULE = r'''
"""Jobs for test_reliability.py, and the faults it injects (each off unless its variable is set)."""

import contextlib
import json
import os
import signal
import threading
import time

import worker
from worker import job

LEDGER = os.environ.get("RELIABILITY_LEDGER", os.devnull)
CRASH_CODE = 86


def note(ctx, event):
    """Append (id, attempt, pid, event, epoch ms) to the ledger: one write(), then fsync."""
    line = f"{ctx.job.id} {ctx.job.attempt} {os.getpid()} {event} {time.time_ns() // 1_000_000}\n"
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def proof(ctx):
    return {"id": ctx.job.id, "attempt": ctx.job.attempt, "pid": os.getpid()}


@job
def work(ctx, ms=0, follow=False, **labels):
    """Sleeps ``ms``; with ``follow`` it enqueues a follow-up job: job code writing to the database."""
    note(ctx, "start")
    time.sleep(ms / 1000)
    if follow:
        ctx.enqueue("work", {"ms": ms, "parent": ctx.job.id})
    note(ctx, "end")
    return proof(ctx)


@job
def poison(ctx):
    """Kills its own worker process, every time."""
    note(ctx, "start")
    os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("RELIABILITY_CRON"):

    @job(cron=os.environ["RELIABILITY_CRON"])
    def tick(ctx):
        """A recurring job that takes long enough (0.3 s) to be running when the clock steps."""
        note(ctx, "start")
        time.sleep(0.3)
        note(ctx, "end")
        return proof(ctx)


# --- Crash points: os._exit at one fixed point of the worker's main loop ---------

CRASH_AT = os.environ.get("RELIABILITY_CRASH_AT")
_armed = threading.Event()  # set inside a transaction that must crash right after its COMMIT


def crash():
    os._exit(CRASH_CODE)


if CRASH_AT in ("claim", "claim_committed"):
    _claim = worker.Worker._claim

    def claim_and_crash(self, limit, now):
        claimed = _claim(self, limit, now)
        if claimed and CRASH_AT == "claim":
            crash()  # the UPDATE ran; its transaction never commits
        if claimed:
            _armed.set()
        return claimed

    worker.Worker._claim = claim_and_crash

if CRASH_AT == "after_return":
    _record = worker.Recording.record

    def crash_before_recording(self, outcomes, now):
        if outcomes:
            crash()  # the job returned; nothing of its outcome is written yet
        return _record(self, outcomes, now)

    worker.Recording.record = crash_before_recording

if CRASH_AT in ("in_finish", "finish_committed"):
    _finish = worker.Recording.finish

    def finish_and_crash(self, outcome, now, *counts):
        notes = _finish(self, outcome, now, *counts)
        if CRASH_AT == "in_finish":
            crash()  # the completion's UPDATE ran; its transaction never commits
        _armed.set()
        return notes

    worker.Recording.finish = finish_and_crash

if CRASH_AT in ("claim_committed", "finish_committed"):
    _immediate = worker.immediate

    @contextlib.contextmanager
    def immediate_then_crash(conn):
        with _immediate(conn):
            yield conn
        if _armed.is_set():
            crash()  # the transaction that claimed / recorded has just committed

    worker.immediate = immediate_then_crash


# --- A claim that commits, but whose reply is lost (the connection dropped at that moment) -----

if os.environ.get("RELIABILITY_LOSE_CLAIM_REPLY"):
    _lose_reply = threading.Event()
    _claim_to_lose = worker.Worker._claim

    def claim_once_to_lose(self, limit, now):
        claimed = _claim_to_lose(self, limit, now)
        if claimed and not hasattr(worker, "_claim_reply_lost"):
            worker._claim_reply_lost = True
            _lose_reply.set()
        return claimed

    _write_exit = worker._Write.__exit__

    def exit_and_lose_the_reply(self, kind, error, trace):
        _write_exit(self, kind, error, trace)
        if kind is None and _lose_reply.is_set():
            _lose_reply.clear()
            raise worker.DatabaseUnavailable("the reply to COMMIT was lost (test_reliability's fault)")

    worker.Worker._claim = claim_once_to_lose
    worker._Write.__exit__ = exit_and_lose_the_reply


# --- A worker stopped (SIGSTOP) inside the transaction that records outcomes, its row locks held ---

if os.environ.get("RELIABILITY_STOP_IN_RECORD"):
    _record_before_stop = worker.Recording.record

    def record_and_stop(self, outcomes, now):
        notes = _record_before_stop(self, outcomes, now)
        if outcomes and not hasattr(worker, "_stopped_in_record"):
            worker._stopped_in_record = True
            os.kill(os.getpid(), signal.SIGSTOP)  # the transaction is open: no COMMIT until SIGCONT
        return notes

    worker.Recording.record = record_and_stop

if os.environ.get("RELIABILITY_PG_IDLE_TIMEOUT_MS"):
    import worker_postgres

    worker_postgres.IDLE_IN_TRANSACTION_TIMEOUT_MS = int(os.environ["RELIABILITY_PG_IDLE_TIMEOUT_MS"])


# --- A clock the test steps for every worker at once (a system clock step) -------

CLOCK_FILE = os.environ.get("RELIABILITY_CLOCK_FILE")
if CLOCK_FILE:
    _offset = {"stamp": None, "seconds": 0.0}

    def stepped_clock():
        """time.time() plus the offset (seconds) the test wrote into CLOCK_FILE."""
        try:
            stat = os.stat(CLOCK_FILE)
            stamp = (stat.st_ino, stat.st_mtime_ns)
            if stamp != _offset["stamp"]:
                with open(CLOCK_FILE) as f:
                    _offset["seconds"] = float(f.read().strip() or 0)
                _offset["stamp"] = stamp
        except FileNotFoundError:
            _offset.update(stamp=None, seconds=0.0)
        return time.time() + _offset["seconds"]

    _init = worker.Worker.__init__

    def init_with_stepped_clock(self, *args, **kwargs):
        kwargs["clock"] = stepped_clock
        _init(self, *args, **kwargs)

    worker.Worker.__init__ = init_with_stepped_clock


# --- Fork safety: which database files did this process inherit? -----------------

FD_REPORT = os.environ.get("RELIABILITY_FD_REPORT")
if FD_REPORT:
    # Imported before this process opens the database itself: anything open now came from its parent.
    inherited = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(os.environ["RELIABILITY_DB"]):
                inherited.append(target)
    with open(os.path.join(FD_REPORT, f"{os.getpid()}.json"), "w") as f:
        json.dump({"ppid": os.getppid(), "inherited": inherited}, f)
'''

# Another program holding the write lock: BEGIN IMMEDIATE for HOLD s, every PERIOD s.
BLOCKER = r"""
import sqlite3, sys, time
db, holds, hold, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
start = time.monotonic()
for i in range(holds):
    time.sleep(max(0.0, start + 0.5 + i * period - time.monotonic()))
    conn.execute("BEGIN IMMEDIATE")
    taken = time.time()
    time.sleep(hold)
    conn.execute("COMMIT")
    print(f"{taken:.3f} {time.time():.3f}", flush=True)
"""


# --- Reading the table and the ledger -----------------------------------------------


def read(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def rows(db: Path, where: str = "1", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of worker_jobs as dicts, cron rows included, read with the stdlib sqlite3 module."""
    found = read(db, f"SELECT {worker.SELECT_COLUMNS} FROM worker_jobs WHERE {where} ORDER BY id", params)
    return [dict(zip(worker.COLUMNS, values, strict=True)) for values in found]


def row(db: Path, job_id: int) -> dict[str, Any]:
    (found,) = rows(db, "id = ?", (job_id,))
    return found


def chain_of(db: Path, first: int) -> list[dict[str, Any]]:
    """A row and every row rescheduled from it, in order."""
    chain = [row(db, first)]
    while following := rows(db, "rescheduled_from_job = ?", (chain[-1]["id"],)):
        chain.append(following[0])
    return chain


def unfinished(db: Path) -> int:
    """Test jobs not finished yet: pending ones due now, and running ones."""
    (count,) = read(
        db,
        "SELECT count(*) FROM worker_jobs WHERE type IN ('work', 'poison') AND "
        "(status = 'running' OR (status = 'pending' AND due <= ?))",
        (worker.now_ms(),),
    )[0]
    return int(count)


def integrity(db: Path) -> str:
    return str(read(db, "PRAGMA integrity_check")[0][0])


def pid_of(row: dict[str, Any]) -> int | None:
    """The pid in a row's ``worker`` column ("host:pid")."""
    return int(row["worker"].rsplit(":", 1)[1]) if row["worker"] else None


def wal_size(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One ledger line: a job run that started or ended."""

    id: int
    attempt: int
    pid: int
    event: str
    ms: int


def read_ledger(path: Path) -> list[Entry]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        job_id, attempt, pid, event, ms = line.split()
        entries.append(Entry(int(job_id), int(attempt), int(pid), event, int(ms)))
    return entries


# --- The one check after every scenario -------------------------------------------------


@dataclasses.dataclass
class Report:
    """What check() counted: the figures each scenario prints."""

    logical_jobs: int
    rows: int
    runs: int  # ledger starts
    reruns: int  # starts beyond one per logical job
    rescued: int  # rows failed because their worker died or stalled
    poisoned: int

    def __str__(self) -> str:
        return (
            f"{self.logical_jobs} logical jobs in {self.rows} rows, {self.runs} runs "
            f"({self.reruns} re-runs), {self.rescued} rows rescued, {self.poisoned} poisoned"
        )


def logical_key(row: dict[str, Any], by_id: dict[int, dict[str, Any]]) -> tuple[Any, ...]:
    """The logical job a row belongs to: a cron slot of a schedule, else the first row of its chain."""
    if row["cron_slot"] is not None:
        return ("cron", row["tag"], row["cron_slot"])
    first = row
    while first["rescheduled_from_job"] is not None and first["rescheduled_from_job"] in by_id:
        first = by_id[first["rescheduled_from_job"]]
    return ("job", first["id"])


def check(db: Path, ledger: Path, enqueued: Iterable[int], **options: Any) -> Report:
    """check_table() on the whole table of a SQLite database, and its integrity_check."""
    assert integrity(db) == "ok"
    return check_table(rows(db), ledger, enqueued, **options)


def check_table(
    table: list[dict[str, Any]],
    ledger: Path,
    enqueued: Iterable[int],
    *,
    lease: float,
    died: Collection[int] = (),
    stalled: Collection[int] = (),
    poison: Collection[int] = (),
    max_attempts: int = 1,
    max_deaths: int = worker.DEFAULT_MAX_DEATHS,
    now: int | None = None,
) -> Report:
    """Assert the guarantees on the table's rows (dicts of worker.COLUMNS, from any store) and the ledger.

    ``died`` and ``stalled`` are the pids of worker processes that died or
    stalled (or saw their leases expire by a clock step): only their jobs may
    have run again.  ``poison`` lists first rows of chains that must end failed.
    ``now`` (epoch ms; this host's clock by default) judges leases and due times.
    """
    now = worker.now_ms() if now is None else now
    by_id = {r["id"]: r for r in table}
    entries = read_ledger(ledger)
    excused = set(died) | set(stalled)

    missing = sorted(set(enqueued) - set(by_id))
    assert not missing, f"enqueued jobs missing from the table: {missing[:20]}"

    rescue_interval_ms = worker.to_ms(lease) // 2
    for r in table:
        if r["status"] == "pending":
            assert r["due"] > now, f"job {r['id']} is still pending, due {now - r['due']} ms ago"
        elif r["status"] == "running":
            overdue = now - r["lease_until"]
            assert overdue <= rescue_interval_ms, f"job {r['id']} is running {overdue} ms past its lease"
        else:
            assert r["status"] in FINISHED, r

    starts = collections.Counter(e.id for e in entries if e.event == "start")
    ends = collections.Counter(e.id for e in entries if e.event == "end")
    for e in entries:
        assert e.id in by_id, f"the ledger names job {e.id}, which is not in the table"
        ran = by_id[e.id]
        assert (e.attempt, e.pid) == (ran["attempt"], pid_of(ran)), f"ledger {e} disagrees with row {ran}"
    twice = {job_id: count for job_id, count in starts.items() if count > 1}
    assert not twice, f"rows run more than once: {twice}"

    for r in table:
        if r["type"] not in TEST_TYPES:
            continue
        if r["status"] == "succeeded":
            assert (starts[r["id"]], ends[r["id"]]) == (1, 1), f"succeeded job {r['id']} has no single run: {r}"
            result = json.loads(r["result"])
            assert result == {"id": r["id"], "attempt": r["attempt"], "pid": pid_of(r)}, r
        if r["status"] == "failed" and (r["error"] or "").startswith(RESCUED):
            assert pid_of(r) in excused, (
                f"job {r['id']} was rescued and run again, but its worker {pid_of(r)} neither died nor stalled"
            )

    logical: dict[tuple[Any, ...], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in table:
        logical[logical_key(r, by_id)].append(r)
    poisoned = 0
    for key, chain in logical.items():
        if chain[0]["type"] not in TEST_TYPES and key[0] != "cron":
            continue
        succeeded = [r for r in chain if r["status"] == "succeeded"]
        rescued = [r for r in chain if r["status"] == "failed" and (r["error"] or "").startswith(RESCUED)]
        claimed = [r for r in chain if r["started"] is not None]
        last = chain[-1]
        assert len(rescued) <= max_deaths, f"{key}: {len(rescued)} worker deaths, more than {max_deaths}"
        assert len(claimed) <= max_attempts + len(rescued), f"{key}: {len(claimed)} attempts"
        assert sum(starts[r["id"]] for r in chain) <= len(claimed)
        if key[0] == "job" and key[1] in poison:
            assert not succeeded and last["status"] == "failed", chain
            assert last["error"].startswith(f"worker died {max_deaths} times"), last["error"]
            poisoned += 1
        elif last["status"] in FINISHED:
            assert len(succeeded) == 1, f"{key}: {len(succeeded)} succeeded rows, not one: {chain}"
        else:
            assert not succeeded, f"{key}: succeeded yet still has a {last['status']} row"

    runs = sum(starts.values())
    ran = {logical_key(by_id[job_id], by_id) for job_id in starts}
    return Report(
        logical_jobs=len(logical),
        rows=len(table),
        runs=runs,
        reruns=runs - len(ran),
        rescued=sum(1 for r in table if r["status"] == "failed" and (r["error"] or "").startswith(RESCUED)),
        poisoned=poisoned,
    )


class StuckWatch:
    """Samples the table in a thread: how long past its lease did any row stay running?"""

    def __init__(self, db: Path, period: float = 0.1) -> None:
        self.db = db
        self.period = period
        self.max_overdue_ms = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        conn = sqlite3.connect(self.db, timeout=10)
        try:
            while not self._stop.wait(self.period):
                now = worker.now_ms()
                (overdue,) = conn.execute(
                    "SELECT max(? - lease_until) FROM worker_jobs WHERE status = 'running' AND lease_until < ?",
                    (now, now),
                ).fetchone()
                self.max_overdue_ms = max(self.max_overdue_ms, overdue or 0)
        finally:
            conn.close()

    def __enter__(self) -> StuckWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- Processes -----------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the worker's own settings, plus the scenario's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "RELIABILITY_")) and k != "DATABASE_URL"}
    env["WORKER_LOG_LEVEL"] = "INFO"
    env.update(extra)
    return env


def open_database_files(pid: int, db: Path) -> list[str]:
    """The database's files (db, -wal, -shm) a process has open."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(db)):
                found.append(target)
    return found


# --- Fixtures ---------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return create_database(tmp_path / "jobs.db")


@pytest.fixture
def queue(db: Path) -> Iterator[worker.Queue]:
    """The producer side in this test process; the job types live in the workers only."""
    with worker.Queue(db, check_types=False) as producer:
        yield producer


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "reliability_jobs.py"
    path.write_text(JOBS_MODULE)
    return path


@pytest.fixture
def run_worker(processes: Processes, db: Path, jobs_file: Path, ledger: Path) -> Callable[..., WorkerProcess]:
    """Start ``worker run`` on the test's database, jobs module and ledger, with extra flags.

    ``--no-cron`` unless ``cron=True``: the built-in hourly job stays out of the scenarios.
    """

    def start(
        *flags: str, name: str = "worker", env: dict[str, str] | None = None, cron: bool = False, database: Path = db
    ) -> WorkerProcess:
        args = ["run", "--db", str(database), "--jobs", str(jobs_file), *flags, *([] if cron else ["--no-cron"])]
        environment = clean_env(RELIABILITY_LEDGER=str(ledger), RELIABILITY_DB=str(database), **(env or {}))
        return processes.start(*args, name=name, env=environment)

    return start


def work(count: int, rng: random.Random | None = None, low_ms: int = 5, high_ms: int = 5, **data: Any) -> list[Any]:
    """``count`` work jobs of ``low_ms``..``high_ms`` each, as enqueue_many items."""
    rng = rng or random.Random(0)
    return [("work", {"ms": rng.randint(low_ms, high_ms), **data}) for _ in range(count)]


def ids(jobs: Iterable[worker.Job]) -> list[int]:
    return [job.id for job in jobs]


def assert_clean_log(process: WorkerProcess) -> None:
    """No crash reached the log: no traceback, no ERROR line."""
    text = process.log()
    assert "Traceback" not in text, text[-3000:]
    assert not re.search(r"^\S+ \S+ ERROR ", text, re.MULTILINE), text[-3000:]


# --- 1. Chaos ----------------------------------------------------------------------------


@pytest.mark.slow
def test_chaos_kill_9_and_restarts_under_load_lose_and_duplicate_nothing(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path
) -> None:
    """4 workers x 8 threads, 5,000 jobs of 5-200 ms (half enqueued while the chaos runs), 30 kill -9s.

    Each killed worker is restarted at once; its running jobs stay `running`
    until their 2 s lease expires, then another worker fails them ("worker
    lost") and runs them again.  Only those jobs may run twice.
    """
    rng = random.Random(20261127)
    lease = 2.0
    # --max-deaths 10: random kills must not turn an ordinary job into a "poison" one by bad luck.
    flags = ("--concurrency", "8", "--lease", str(lease), "--max-deaths", "10")
    workers = [run_worker(*flags, name=f"worker{i}") for i in range(4)]
    enqueued = ids(queue.enqueue_many(work(2500, rng, 5, 200)))
    produced: list[int] = []
    producer_errors: list[BaseException] = []

    def produce() -> None:  # the web app, enqueuing while workers die around it
        try:
            with worker.Queue(db, check_types=False) as app:
                for _ in range(50):
                    produced.extend(ids(app.enqueue_many(work(50, random.Random(len(produced)), 5, 200))))
                    time.sleep(0.15)
        except BaseException as e:
            producer_errors.append(e)

    killed_at: dict[int, int] = {}
    started = time.monotonic()
    with StuckWatch(db) as watch:
        producer = threading.Thread(target=produce)
        producer.start()
        for n in range(30):
            time.sleep(rng.uniform(0.1, 0.4))
            index = rng.randrange(len(workers))
            victim = workers[index]
            killed_at[victim.pid] = victim.kill()
            workers[index] = run_worker(*flags, name=f"worker{index}-{n}")
        producer.join(60)
        assert not producer_errors, producer_errors
        wait_for(lambda: unfinished(db) == 0, 90, "every job to finish")
    elapsed = time.monotonic() - started
    assert [w.stop() for w in workers] == [0] * 4

    enqueued += produced
    assert len(enqueued) == 5000
    report = check(db, ledger, enqueued, lease=lease, died=killed_at, max_deaths=10)
    assert report.logical_jobs == 5000
    # From kill to rescue: how long did a dead worker's job stay `running`?
    rescued = rows(db, "status = 'failed' AND error LIKE 'worker lost%'")
    stuck = [r["finished"] - killed_at[pid_of(r)] for r in rescued]  # type: ignore[index]
    print(
        f"\nchaos: 5,000 jobs, 30 kills in {elapsed:.1f} s: {report}; "
        f"stuck after a kill: max {max(stuck, default=0)} ms; past the lease: max {watch.max_overdue_ms} ms"
    )
    assert report.rescued > 0, "no kill ever hit a running job: the chaos proved nothing"
    # Rescue within the lease plus the rescue interval (lease/2), with slack for a loaded 2-core machine.
    assert max(stuck) <= (lease * 1.5 + 1.5) * 1000
    assert watch.max_overdue_ms <= (lease / 2 + 1.5) * 1000


# --- 2. Crash at fixed points -------------------------------------------------------------

# point -> (status right after the crash, rows in the chain at the end, runs in the ledger)
CRASH_POINTS = {
    "claim": ("pending", 1, 1),  # inside the claim transaction: rolled back, the row is unchanged
    "claim_committed": ("running", 2, 1),  # claimed, never started: rescued, run once by the retry
    "after_return": ("running", 2, 2),  # returned, nothing written: rescued and re-run exactly once
    "in_finish": ("running", 2, 2),  # inside the completion transaction: rolled back, as above
    "finish_committed": ("succeeded", 1, 1),  # the completion committed: done, never re-run
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_crash_at_a_fixed_point_leaves_the_job_unchanged_rerun_once_or_done(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path, point: str
) -> None:
    """The worker os._exit()s at one point of claim -> run -> record; the job is never lost or duplicated."""
    job = queue.enqueue("work", {"ms": 20})
    before = row(db, job.id)
    doomed = run_worker("--concurrency", "1", "--lease", "1", name="doomed", env={"RELIABILITY_CRASH_AT": point})
    assert doomed.wait(15) == CRASH_CODE, doomed.log()

    status_after_crash, chain_length, runs = CRASH_POINTS[point]
    after = row(db, job.id)
    assert after["status"] == status_after_crash
    if point == "claim":
        assert after == before, "a claim that never committed must leave no trace"

    rescuer = run_worker("--lease", "1", name="rescuer")
    wait_for(lambda: chain_of(db, job.id)[-1]["status"] == "succeeded", 15, "the job to succeed")
    assert rescuer.stop() == 0

    chain = chain_of(db, job.id)
    report = check(db, ledger, [job.id], lease=1, died={doomed.pid})
    assert len(chain) == chain_length, chain
    assert report.runs == runs
    assert [r["attempt"] for r in chain] == list(range(1, chain_length + 1))
    if chain_length == 2:
        assert chain[0]["status"] == "failed" and chain[0]["error"].startswith("worker lost"), chain[0]
    print(f"\ncrash at {point}: after the crash {status_after_crash}; {report}")


@pytest.mark.slow
def test_jobs_of_a_claim_the_worker_was_told_had_failed_are_given_back_and_run_once(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path
) -> None:
    """The first claim commits, but the worker is told it failed (RELIABILITY_LOSE_CLAIM_REPLY): its next
    step gives back the rows running under it that it is not running, and they run once.

    On PostgreSQL a reply lost with the connection does this; here the fault
    stands in for it, and holds the engine to the same answer on both stores.
    """
    process = run_worker("--concurrency", "2", "--lease", "1", env={"RELIABILITY_LOSE_CLAIM_REPLY": "1"})
    enqueued = ids(queue.enqueue_many(work(4, low_ms=50, high_ms=50)))
    wait_for(lambda: unfinished(db) == 0, 10, "the jobs of the lost claim to run")
    assert process.stop() == 0
    assert "the reply to COMMIT was lost" in process.log(), "the fault never fired"
    report = check(db, ledger, enqueued, lease=1)
    assert report.reruns == 0 and report.rescued == 0
    assert rows(db, "status != 'succeeded'") == []


def test_a_job_runs_though_the_producer_cannot_connect_as_it_starts(
    make_worker: Any, queue: worker.Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """execute() never raises: a database out of reach when a job's enqueue_now first needs a connection of
    its own fails only that job, and as its error; it killed the thread before."""

    @worker.job
    def plain(ctx: worker.JobContext) -> int:
        return 1

    @worker.job
    def enqueuer(ctx: worker.JobContext) -> None:
        ctx.enqueue_now("plain")

    def unreachable(*args: Any, **kwargs: Any) -> worker.Store:
        raise worker.DatabaseUnavailable("out of reach")

    queue.enqueue("plain")
    queue.enqueue("enqueuer")
    runner = make_worker()
    claimed = runner.claim(2)
    monkeypatch.setattr(worker, "open_store", unreachable)  # the worker's own store is open already
    outcomes = [runner.execute(job) for job in claimed]
    assert [(o.job.type, o.succeeded) for o in outcomes] == [("plain", True), ("enqueuer", False)]
    assert "DatabaseUnavailable: out of reach" in (outcomes[1].error or "")


# --- 3. Poison job ------------------------------------------------------------------------


@pytest.mark.slow
def test_poison_job_fails_after_max_deaths_while_other_jobs_keep_flowing(
    run_worker: Callable[..., WorkerProcess], processes: Processes, queue: worker.Queue, db: Path, ledger: Path
) -> None:
    """A job that SIGKILLs its own worker every time ends `failed` ("worker died 3 times") after 3 deaths.

    Two supervised worker processes of one thread each (--processes 2
    --concurrency 1: restarted when they die); 300 ordinary jobs of 20 ms,
    enqueued before and during, all succeed.  (With more threads per process,
    see the next test.)
    """
    lease = 1.0
    supervisor = run_worker(
        "--processes", "2", "--concurrency", "1", "--lease", str(lease), "--max-deaths", "3", name="supervisor"
    )
    started = time.monotonic()
    poison = queue.enqueue("poison")
    enqueued = [poison.id, *ids(queue.enqueue_many(work(100, low_ms=20, high_ms=20)))]
    for _ in range(10):  # the app keeps enqueuing while workers die
        time.sleep(0.3)
        processes.adopt(child_pids(supervisor.pid))
        enqueued += ids(queue.enqueue_many(work(20, low_ms=20, high_ms=20)))
    wait_for(lambda: chain_of(db, poison.id)[-1]["status"] == "failed", 30, "the poison job to be given up")
    given_up = time.monotonic() - started
    wait_for(lambda: unfinished(db) == 0, 30, "the other jobs to finish")
    assert supervisor.stop() == 0

    chain = chain_of(db, poison.id)
    deaths = {e.pid for e in read_ledger(ledger) if e.id in {r["id"] for r in chain}}
    report = check(db, ledger, enqueued, lease=lease, died=deaths, poison={poison.id})
    assert [r["attempt"] for r in chain] == [1, 2, 3]
    assert [r["deaths"] for r in chain] == [0, 1, 2]
    assert [r["status"] for r in chain] == ["failed"] * 3
    assert [r["error"].split(":")[0] for r in chain[:2]] == ["worker lost"] * 2
    assert chain[2]["error"].startswith("worker died 3 times")
    assert len(deaths) == 3, "each attempt killed one worker process"
    assert len(rows(db, "type = 'work' AND status = 'succeeded'")) == 300
    print(f"\npoison: given up after {len(deaths)} deaths in {given_up:.1f} s; {report}")


@pytest.mark.slow
def test_job_sharing_a_worker_with_a_poison_job_is_not_failed_as_poison(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path
) -> None:
    """One worker process of two threads, restarted when it dies; an innocent 2 s job is claimed with a poison job."""
    innocent = queue.enqueue("work", {"ms": 2000})
    poison = queue.enqueue("poison")
    deaths: set[int] = set()
    current = run_worker("--concurrency", "2", "--lease", "1", name="worker")
    deadline = time.monotonic() + 30
    while unfinished(db):
        assert time.monotonic() < deadline, "timed out waiting for both jobs to end"
        if current.popen.poll() is not None:
            deaths.add(current.pid)
            current = run_worker("--concurrency", "2", "--lease", "1", name=f"worker-{len(deaths)}")
        time.sleep(POLL)
    assert current.stop() == 0

    innocent_chain = chain_of(db, innocent.id)
    print(f"\ninnocent job beside a poison job: {[(r['status'], (r['error'] or '')[:30]) for r in innocent_chain]}")
    assert innocent_chain[-1]["status"] == "succeeded", innocent_chain[-1]["error"]
    check(db, ledger, [innocent.id, poison.id], lease=1, died=deaths, poison={poison.id})


def test_a_worker_death_does_not_use_up_an_ordinary_attempt(
    make_worker: Any, clock: FakeClock, queue: worker.Queue, db: Path
) -> None:
    """Deaths and ordinary failures are counted apart: max_attempts=2 means two runs that raised.

    The first attempt's worker dies (claimed, then never heard of again); the
    rescue retries it at once.  The job then raises: it must still get its
    second ordinary attempt, as if the death had not happened.
    """

    @worker.job(max_attempts=2, retry_delay=1)
    def shaky(ctx: worker.JobContext) -> None:
        raise RuntimeError(f"failing on attempt {ctx.attempt}")

    first = queue.enqueue("shaky")
    assert [j.id for j in make_worker(lease=1).claim(1)] == [first.id]  # ... and its worker dies
    clock.advance(2)
    rescuer = make_worker(lease=1)
    rescuer.work()  # rescues the first attempt and runs the retry, which raises
    for _ in range(3):
        clock.advance(5)
        rescuer.work()

    chain = chain_of(db, first.id)
    kinds = [r["error"].split(":")[0] for r in chain]
    assert kinds == ["worker lost", "RuntimeError", "RuntimeError"], kinds
    assert chain[-1]["status"] == "failed"


# --- 4. Busy writer ---------------------------------------------------------------------


@pytest.mark.slow
def test_another_process_holding_the_write_lock_delays_but_never_breaks_anything(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path, tmp_path: Path
) -> None:
    """Another process holds BEGIN IMMEDIATE for 2 s every 5 s (3 times) while 2 workers run jobs.

    A fifth of the jobs write to the database themselves (a follow-up job).  No
    error may reach job code or the log; every completion commits.  The lease
    (10 s) is longer than the lock is held, as it must be for any lease.
    """
    blocker_file = tmp_path / "blocker.py"
    blocker_file.write_text(BLOCKER)
    lease = 10.0
    workers = [run_worker("--concurrency", "4", "--lease", str(lease), name=f"worker{i}") for i in range(2)]
    blocker = subprocess.Popen(
        [sys.executable, str(blocker_file), str(db), "3", "2", "5"], stdout=subprocess.PIPE, text=True
    )
    rng = random.Random(4)
    enqueued: list[int] = []
    enqueue_waits: list[float] = []
    try:
        while blocker.poll() is None:
            asked = time.monotonic()
            batch = [("work", {"ms": rng.randint(10, 50), "follow": rng.random() < 0.2}) for _ in range(20)]
            enqueued += ids(queue.enqueue_many(batch))  # the app is held up too, but never fails
            enqueue_waits.append(time.monotonic() - asked)
            time.sleep(0.1)
        holds = [tuple(map(float, line.split())) for line in blocker.communicate(timeout=30)[0].splitlines()]
    finally:
        if blocker.poll() is None:
            blocker.kill()
    assert blocker.returncode == 0 and len(holds) == 3
    wait_for(lambda: unfinished(db) == 0, 30, "every job to finish")
    assert [w.stop() for w in workers] == [0, 0]

    report = check(db, ledger, enqueued, lease=lease)
    assert rows(db, "status != 'succeeded'") == []
    followers = rows(db, "json_extract(data, '$.parent') IS NOT NULL")
    asked_to_follow = rows(db, "json_extract(data, '$.follow') = 1")
    assert len(followers) == len(asked_to_follow) > 0
    for process in workers:
        assert_clean_log(process)
    # How long did a job that had returned wait for its outcome to be recorded (`finished`)?
    ends = {e.id: e.ms for e in read_ledger(ledger) if e.event == "end"}
    commit_delays = [r["finished"] - ends[r["id"]] for r in rows(db)]
    busy_warnings = sum(w.log().count("database busy") for w in workers)
    held = [round(end - start, 2) for start, end in holds]
    print(
        f"\nbusy writer: lock held {held} s; {report}; longest wait for an outcome to be recorded "
        f"{max(commit_delays)} ms, for an enqueue {max(enqueue_waits):.2f} s; {busy_warnings} busy warnings"
    )
    assert max(commit_delays) <= 2000 + 1500
    assert max(commit_delays) >= 1000, "no completion ever waited for the lock: the blocker did not overlap the jobs"


# --- 5. Full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of our own, so that the disk can really fill up (needs root; skipped otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, timeout=30, check=False)


DISK_FULL = "database or disk is full"  # SQLITE_FULL's message


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; removing it gives the space back."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            chunk = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_full_disk_makes_the_worker_wait_and_resume_with_no_partial_rows(
    small_disk: Path, run_worker: Callable[..., WorkerProcess], ledger: Path
) -> None:
    """The database lives on a 16 MiB tmpfs that a file fills up for 3 s while jobs run and the app enqueues.

    The app's batches of 10 are all-or-nothing; the worker logs, backs off,
    keeps finished outcomes in memory and records them once space returns.
    """
    db = create_database(small_disk / "jobs.db")
    process = run_worker("--concurrency", "4", "--lease", "10", database=db)
    batches: dict[int, list[int] | None] = {}  # batch number -> its ids, or None if it was refused

    def enqueue_batch(app: worker.Queue) -> None:
        number = len(batches)
        try:
            batches[number] = ids(app.enqueue_many(work(10, random.Random(number), 5, 30, batch=number, pad="x" * 400)))
        except worker.DatabaseUnavailable as e:  # SQLITE_FULL: the Queue says try again later
            assert str(e) == DISK_FULL, e
            batches[number] = None

    def enqueue_for(app: worker.Queue, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            enqueue_batch(app)
            time.sleep(0.05)

    with worker.Queue(db, check_types=False) as app:
        enqueue_for(app, 1.0)
        filler = fill(small_disk)
        filled = time.monotonic()
        enqueue_for(app, 15.0, until=lambda: DISK_FULL in process.log())
        assert DISK_FULL in process.log(), "the worker never noticed the full disk"
        noticed = time.monotonic() - filled
        enqueue_for(app, 3.0)
        assert process.popen.poll() is None, "a full disk killed the worker"
        kept = [int(n) for n in re.findall(r"(\d+) outcome\(s\) kept", process.log())]
        filler.unlink()
        freed_ms = worker.now_ms()
        enqueue_for(app, 1.0)
    wait_for(lambda: unfinished(db) == 0, 30, "every job to finish once space returned")
    assert process.stop() == 0

    committed = [job_id for batch in batches.values() if batch for job_id in batch]
    refused = [number for number, batch in batches.items() if batch is None]
    assert refused, "no enqueue was refused: the disk was never full"
    for number, batch in batches.items():  # no partial rows: a batch is all there, or not at all
        found = rows(db, "json_extract(data, '$.batch') = ?", (number,))
        assert [r["id"] for r in found] == (batch or []), f"batch {number}"
    report = check(db, ledger, committed, lease=10)
    assert "Traceback" not in process.log()
    resumed = min(r["finished"] for r in rows(db, "finished >= ?", (freed_ms,))) - freed_ms
    print(
        f"\nfull disk: noticed {noticed:.2f} s after filling; {len(refused)} of {len(batches)} app batches refused "
        f"whole; up to {max(kept, default=0)} outcomes kept in memory; first commit {resumed} ms after space "
        f"returned; {report}"
    )


# --- 6. WAL growth --------------------------------------------------------------------------


@pytest.mark.slow
def test_wal_grows_under_a_long_reader_and_comes_back_down_after_it(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path
) -> None:
    """A reader holds one read transaction open while 20,000 jobs run, so no checkpoint can reset the WAL.

    Once it ends, the worker's own checkpoints must bring the -wal file back
    under README's bound (journal_size_limit) while the app goes on as usual.
    """
    lease = 3.0
    workers = [run_worker("--concurrency", "4", "--lease", str(lease), name=f"worker{i}") for i in range(2)]
    reader = sqlite3.connect(db, timeout=10, isolation_level=None)
    reader.execute("BEGIN")
    (before,) = reader.execute("SELECT count(*) FROM worker_jobs").fetchone()  # the snapshot is now held
    started = time.monotonic()
    enqueued: list[int] = []
    for _ in range(10):
        enqueued += ids(queue.enqueue_many(work(2000, low_ms=0, high_ms=0)))
    wait_for(lambda: unfinished(db) == 0, 120, "20,000 jobs to finish")
    elapsed = time.monotonic() - started
    peak = wal_size(db)
    (still,) = reader.execute("SELECT count(*) FROM worker_jobs").fetchone()
    assert still == before, "the reader's snapshot did not hold"
    reader.execute("COMMIT")
    reader.close()

    ended = time.monotonic()
    sizes = [peak]
    while sizes[-1] > WAL_BOUND and time.monotonic() - ended < 20:
        enqueued += ids(queue.enqueue_many(work(10)))  # the app goes on as usual
        time.sleep(0.5)
        sizes.append(wal_size(db))
    came_down = time.monotonic() - ended
    wait_for(lambda: unfinished(db) == 0, 30, "the last jobs to finish")
    assert [w.stop() for w in workers] == [0, 0]
    report = check(db, ledger, enqueued, lease=lease)
    print(
        f"\nWAL: 20,000 jobs in {elapsed:.1f} s under a reader; -wal peaked at {peak / 2**20:.1f} MiB, "
        f"{sizes[-1] / 2**20:.2f} MiB {came_down:.1f} s after the reader ended (bound {WAL_BOUND / 2**20:g} MiB); "
        f"{report}"
    )
    assert peak > WAL_BOUND, "the WAL never grew past the bound: the reader held nothing back"
    assert sizes[-1] <= WAL_BOUND


# --- 7. Fork safety ---------------------------------------------------------------------------


@pytest.mark.slow
def test_supervised_workers_inherit_no_connection_and_survive_repeated_restarts(
    run_worker: Callable[..., WorkerProcess],
    processes: Processes,
    queue: worker.Queue,
    db: Path,
    ledger: Path,
    tmp_path: Path,
) -> None:
    """--processes 3 after the supervisor opened the database; 6 of its workers killed -9 and restarted.

    Every worker process reports, as it imports the jobs module (before it
    opens the database itself), which of the database's files it inherited:
    none may.  The supervisor holds none open while it supervises.  A job may
    be in the batch of more than one victim, so poison is set out of reach:
    this test is about restarts, not about giving up.
    """
    reports = tmp_path / "fds"
    reports.mkdir()
    lease = 1.0
    kills = 6
    supervisor = run_worker(
        "--processes",
        "3",
        "--concurrency",
        "4",
        "--lease",
        str(lease),
        "--max-deaths",
        str(kills + 1),
        name="supervisor",
        env={"RELIABILITY_FD_REPORT": str(reports)},
    )
    rng = random.Random(7)
    enqueued = ids(queue.enqueue_many(work(300, rng, 10, 60)))

    def three_workers(without: int = 0) -> set[int]:
        """The supervisor's 3 workers once each has imported the jobs module (and reported)."""
        found = child_pids(supervisor.pid)
        ready = len(found) == 3 and without not in found and all((reports / f"{pid}.json").exists() for pid in found)
        return found if ready else set()

    children = wait_for(three_workers, 10, "3 workers")
    assert open_database_files(supervisor.pid, db) == [], "the supervisor kept the database open"
    died: set[int] = set()
    with StuckWatch(db) as watch:
        for _ in range(kills):
            time.sleep(0.7)
            enqueued += ids(queue.enqueue_many(work(100, rng, 10, 60)))
            processes.adopt(children)
            victim = rng.choice(sorted(children))
            os.kill(victim, signal.SIGKILL)
            died.add(victim)
            children = wait_for(lambda: three_workers(without=victim), 10, "the supervisor to restart a worker")  # noqa: B023
        processes.adopt(children)
        wait_for(lambda: unfinished(db) == 0, 30, "every job to finish")
    assert supervisor.stop() == 0

    report = check(db, ledger, enqueued, lease=lease, died=died, max_deaths=kills + 1)
    fd_reports = {int(path.stem): json.loads(path.read_text()) for path in reports.iterdir()}
    workers = {pid: found for pid, found in fd_reports.items() if found["ppid"] == supervisor.pid}
    assert len(workers) == 3 + kills, "every worker process, first and restarted, reported"
    assert {pid: found["inherited"] for pid, found in workers.items() if found["inherited"]} == {}
    print(
        f"\nfork safety: 9 worker processes (6 restarts), none inherited a database file; {report}; "
        f"past the lease: max {watch.max_overdue_ms} ms"
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_connection_used_across_fork_raises_and_a_queue_opens_its_own(db: Path, queue: worker.Queue) -> None:
    """The guard: a Worker's connection refuses to work in a forked child; a Queue opens a new one there."""

    @worker.job(name="work")
    def work_here(ctx: worker.JobContext, **data: Any) -> None:  # a worker claims only the types it knows
        return None

    parent = worker.Worker(db, cron=False)
    parent.start_up()
    queue.enqueue("work")  # the Queue's connection is open in this process too
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, leave without any cleanup
        code = 10
        try:
            parent.work()
        except worker.ForkedConnection:
            code = 0
        try:
            queue.enqueue("work", {"from": "child"})
        except Exception:
            code += 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r["data"] for r in rows(db)] == ["{}", '{"from":"child"}']
    assert parent.work() == 2, "the parent's connection still works"
    parent.close()
    assert integrity(db) == "ok"


# --- 8. Hostile files -----------------------------------------------------------------------------


def _modes_are_enforced(path: Path) -> bool:
    """Whether a process without the override capabilities is refused writing ``path`` (or into it)."""
    target = path / "probe" if path.is_dir() else path
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(target)!r}, 'ab')"],
        preexec_fn=without_file_permission_override,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode != 0


def _valid_database(path: Path) -> Path:
    """A real database with rows, checkpointed into the main file (no -wal beside it)."""
    create_database(path)
    with worker.Queue(path, check_types=False) as app:
        app.enqueue_many([("work", {"pad": "x" * 200})] * 300)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def hostile_read_only_file(tmp_path: Path) -> Path:
    path = _valid_database(tmp_path / "jobs.db")
    path.chmod(0o444)
    return path


def hostile_read_only_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "locked"
    directory.mkdir()
    path = _valid_database(directory / "jobs.db")
    directory.chmod(0o555)  # the file is writable, but no -wal or -shm can be created beside it
    return path


def hostile_random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.db"
    path.write_bytes(random.Random(8).randbytes(64 * 1024))
    return path


def hostile_truncated_database(tmp_path: Path) -> Path:
    path = _valid_database(tmp_path / "jobs.db")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def hostile_missing_directory(tmp_path: Path) -> Path:
    return tmp_path / "no-such-directory" / "jobs.db"


@pytest.mark.parametrize(
    "make",
    [
        hostile_read_only_file,
        hostile_read_only_directory,
        hostile_random_bytes,
        hostile_truncated_database,
        hostile_missing_directory,
    ],
    ids=lambda make: make.__name__.removeprefix("hostile_"),
)
def test_hostile_database_file_exits_3_in_one_line_and_is_left_untouched(
    tmp_path: Path, jobs_file: Path, make: Callable[[Path], Path]
) -> None:
    """Exit code 3 with a one-line message within 5 s; not a byte of the file changed, nothing created."""
    place = tmp_path / "place"
    place.mkdir()
    path = make(place)
    read_only = {hostile_read_only_file: path, hostile_read_only_directory: path.parent}.get(make)  # type: ignore[call-overload]
    if read_only is not None and not _modes_are_enforced(read_only):
        pytest.skip("file modes are not enforced here")
    before = {p: p.read_bytes() for p in place.rglob("*") if p.is_file()}
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker_cli",
            "run",
            "--burst",
            "--db",
            str(path),
            "--jobs",
            str(jobs_file),
            "--no-cron",
        ],
        capture_output=True,
        text=True,
        cwd=HERE,
        env=clean_env(),
        timeout=30,
        preexec_fn=without_file_permission_override,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert elapsed < 5
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("worker: "), result.stderr
    assert {p: p.read_bytes() for p in place.rglob("*") if p.is_file()} == before
    print(f"\n{make.__name__}: exit 3 in {elapsed:.2f} s: {result.stderr.strip()}")


# --- 9. Real clients no one here wrote: Node's better-sqlite3 and the sqlite3 shell ---------------


def _node_client_ready() -> str | None:
    """better-sqlite3's version if clients/node has it installed and loading, else None."""
    probe = subprocess.run(
        ["node", "-e", "require('better-sqlite3'); console.log(require('better-sqlite3/package.json').version)"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


@pytest.fixture(scope="session")
def node_client() -> Path:
    """clients/node with better-sqlite3 12.x installed from the npm registry (once per session).

    There is no prebuilt binary to download here, so npm compiles it (a minute
    or two): `make test` starts .ci/node-client.sh first, in the background;
    run again here, the script waits for that run under its lock, or installs.
    """
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js and npm are needed for the Node client scenario (apt-get install nodejs npm)")
    installed = subprocess.run(
        ["bash", str(HERE / ".ci" / "node-client.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    assert installed.returncode == 0, f"npm ci in {NODE_CLIENT} failed:\n{installed.stderr[-3000:]}"
    version = _node_client_ready()
    assert version and version.startswith("12."), (
        f"better-sqlite3 {version} in {NODE_CLIENT}: 12.x is needed on Node 20"
    )
    return NODE_CLIENT


@pytest.mark.slow
@pytest.mark.skipif(not Path(SQLITE3_SHELL).exists(), reason="no sqlite3 shell")
def test_jobs_inserted_by_node_and_the_sqlite3_shell_all_run_while_two_workers_claim(
    node_client: Path, run_worker: Callable[..., WorkerProcess], db: Path, ledger: Path
) -> None:
    """Node (better-sqlite3 12, default 5 s busy timeout) inserts 1,000 jobs one INSERT at a time while the
    sqlite3 shell (.timeout 5000) inserts 200 and two workers claim: all run once; bad data is refused."""
    workers = [run_worker("--concurrency", "4", "--lease", "5", name=f"worker{i}") for i in range(2)]
    for process in workers:
        wait_for(lambda: " started: " in process.log(), 10, "the workers to start")  # noqa: B023
    shell_sql = ".timeout 5000\n" + "".join(
        f"""INSERT INTO worker_jobs (type, data) VALUES ('work', '{{"ms": 5, "source": "shell", "n": {n}}}');\n"""
        for n in range(200)
    )
    data = json.dumps({"ms": 5, "source": "node"})
    node = subprocess.Popen(
        ["node", str(node_client / "enqueue.js"), str(db), "1000", "work", data, "1"],  # 1 ms between inserts
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shell = subprocess.run(
        [SQLITE3_SHELL, "-bail", str(db)], input=shell_sql, capture_output=True, text=True, timeout=60, check=False
    )
    out, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    assert shell.returncode == 0, shell.stderr
    from_node = json.loads(out)
    refused_by_shell = subprocess.run(
        [SQLITE3_SHELL, str(db), ".timeout 5000", "INSERT INTO worker_jobs (type, data) VALUES ('work', '{not json')"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    wait_for(lambda: unfinished(db) == 0, 30, "every inserted job to run")
    assert [w.stop() for w in workers] == [0, 0]

    assert from_node["betterSqlite3"].startswith("12.")
    assert from_node["busyTimeout"] == 5000
    assert from_node["refused"] == {"{not json": "SQLITE_CONSTRAINT_CHECK", "[1, 2]": "SQLITE_CONSTRAINT_CHECK"}
    assert refused_by_shell.returncode != 0 and "CHECK constraint failed" in refused_by_shell.stderr
    node_ids = from_node["ids"]
    from_shell = rows(db, "json_extract(data, '$.source') = 'shell'")
    shell_ids = [r["id"] for r in from_shell]
    assert len(node_ids) == 1000
    assert [json.loads(r["data"])["n"] for r in from_shell] == list(range(200))
    report = check(db, ledger, node_ids + shell_ids, lease=5)
    assert report.logical_jobs == 1200 and report.reruns == 0
    (last_insert,) = read(db, "SELECT max(created_at) FROM worker_jobs")[0]
    (overlap,) = read(db, "SELECT count(*) FROM worker_jobs WHERE finished < ?", (last_insert,))[0]
    assert overlap > 0, "no job finished while the clients were still inserting"
    assert rows(db, "status != 'succeeded'") == []
    print(
        f"\nNode better-sqlite3 {from_node['betterSqlite3']} (SQLite {from_node['sqlite']}, busy timeout "
        f"{from_node['busyTimeout']} ms): 1,000 INSERTs in {from_node['insertMs']} ms beside the sqlite3 shell's 200; "
        f"{overlap} jobs finished while the clients were still inserting; {report}"
    )


# --- 10. Clock steps ------------------------------------------------------------------------------


def step_clock(clock_file: Path, seconds: float) -> None:
    """Set every worker's clock to time.time() + seconds, at once (an atomic file replace)."""
    temporary = clock_file.with_suffix(".tmp")
    temporary.write_text(str(seconds))
    temporary.replace(clock_file)


@pytest.mark.slow
def test_clock_stepped_two_hours_forward_reruns_nothing(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path, tmp_path: Path
) -> None:
    """Every worker's clock jumps 2 h forward (a system clock step) while 8 jobs of 1.5 s run on 2 workers.

    Each worker now sees the other's leases as expired, though both are alive.
    Each notices the jump at its next tick (its wall clock moved more than its
    monotonic one), renews its leases at once and sweeps for lost jobs only a
    lease later: no job is rescued, none runs twice.
    """
    clock_file = tmp_path / "clock"
    step_clock(clock_file, 0)
    lease = 2.0
    env = {"RELIABILITY_CLOCK_FILE": str(clock_file)}
    workers = [run_worker("--concurrency", "4", "--lease", str(lease), name=f"worker{i}", env=env) for i in range(2)]
    in_flight = ids(queue.enqueue_many(work(8, low_ms=1500, high_ms=1500)))
    wait_for(lambda: len(rows(db, "status = 'running'")) == 8, 10, "8 jobs to be running")
    step_clock(clock_file, 7200)
    time.sleep(0.2)  # every worker has read the new time: a tick begun before the step is over
    after = ids(queue.enqueue_many(work(40, low_ms=50, high_ms=50)))  # due now by the app's clock
    wait_for(lambda: unfinished(db) == 0, 30, "every job to finish")
    assert [w.stop() for w in workers] == [0, 0]

    report = check(db, ledger, in_flight + after, lease=lease, stalled={w.pid for w in workers})
    assert rows(db, "status = 'failed' AND error LIKE 'worker lost%'") == []
    assert report.reruns == 0
    assert all(len(chain_of(db, job_id)) == 1 for job_id in in_flight + after)
    print(f"\nclock +2 h: {len(in_flight)} jobs in flight, none re-run; {report}")


@pytest.mark.slow
def test_clock_stepped_one_hour_back_runs_no_cron_slot_twice(
    run_worker: Callable[..., WorkerProcess], db: Path, ledger: Path, tmp_path: Path
) -> None:
    """A job declared cron="* * * * * *" (every second) on 2 workers; their clocks step 1 h back for 3 s.

    One worker is restarted meanwhile (its start syncs the schedule under the
    stepped clock).  Slots may be delayed or skipped, never run twice.
    """
    clock_file = tmp_path / "clock"
    step_clock(clock_file, 0)
    env = {"RELIABILITY_CLOCK_FILE": str(clock_file), "RELIABILITY_CRON": "* * * * * *"}
    start = [lambda i=i: run_worker("--lease", "2", name=f"worker{i}", env=env, cron=True) for i in range(2)]
    workers = [start[0](), start[1]()]

    def ran() -> int:
        return int(read(db, "SELECT count(*) FROM worker_jobs WHERE type = 'tick' AND status = 'succeeded'")[0][0])

    wait_for(lambda: ran() >= 3, 10, "3 cron runs")
    step_clock(clock_file, -3600)
    stepped = ran()
    time.sleep(1.5)
    assert workers[1].stop() == 0
    workers[1] = start[1]()
    time.sleep(1.5)
    during = ran() - stepped
    step_clock(clock_file, 0)
    wait_for(lambda: ran() >= stepped + during + 3, 10, "3 more cron runs after the clock came back")
    assert [w.stop() for w in workers] == [0, 0]

    runs = rows(db, "type = 'tick' AND started IS NOT NULL")
    slots = collections.Counter(r["cron_slot"] for r in runs)
    assert [slot for slot, count in slots.items() if count > 1] == [], "a cron slot ran twice"
    assert [r["cron_slot"] for r in runs] == sorted(slots), "slots ran out of order"
    report = check(db, ledger, [], lease=2, stalled={w.pid for w in workers})
    assert report.reruns == 0
    print(f"\nclock -1 h: {len(runs)} cron runs, each slot once ({during} while stepped back); {report}")


@pytest.mark.slow
def test_clock_stepped_back_keeps_heartbeats_going(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, ledger: Path, tmp_path: Path
) -> None:
    """After every clock steps 1 h back, a 4 s job (lease 1.5 s) must still be kept alive by its worker's heartbeat.

    A second worker started after the step sweeps for expired leases as usual.
    """
    clock_file = tmp_path / "clock"
    step_clock(clock_file, 0)
    env = {"RELIABILITY_CLOCK_FILE": str(clock_file)}
    first = run_worker("--lease", "1.5", name="first", env=env)
    wait_for(lambda: " started: " in first.log(), 10, "the first worker to start")
    step_clock(clock_file, -3600)
    time.sleep(0.2)
    long = queue.enqueue("work", {"ms": 4000}, now=worker.now_ms() - 3_600_000)  # the app's clock stepped too
    wait_for(lambda: row(db, long.id)["status"] == "running", 10, "the long job to start")
    second = run_worker("--lease", "1.5", name="second", env=env)
    wait_for(lambda: unfinished(db) == 0, 20, "the long job to finish")
    assert [first.stop(), second.stop()] == [0, 0]

    chain = chain_of(db, long.id)
    print(f"\nclock -1 h, lease 1.5 s, 4 s job: {[(r['status'], (r['error'] or '')[:40]) for r in chain]}")
    assert len(chain) == 1, "the job of a live worker was rescued and run again"
    check(db, ledger, [long.id], lease=1.5)
