"""Keeping every job thread busy: how far a worker claims ahead, and what a crash can then repeat.

ClaimAhead is pure (no database, no clock): its tests give it measured times.
The worker's tests run on both stores; the kill -9 test uses real processes
and a ledger that every run of a job appends to.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import HERE, Processes, WorkerProcess, process_state, rows, wait_for
from worker import ClaimAhead, Job, JobContext, Queue, Worker

pytestmark = pytest.mark.stores("sqlite", "postgres")


def sized(*, concurrency: int, job_ms: float, round_trip_ms: float, limit: int = 512) -> int:
    ahead = ClaimAhead(concurrency, limit)
    ahead.stepped(round_trip_ms / 1000)
    ahead.finished([job_ms / 1000] * concurrency)
    return ahead.jobs


# --- How many jobs are claimed ahead ----------------------------------------------


@pytest.mark.stores("sqlite")
def test_nothing_is_claimed_ahead_before_a_job_has_finished() -> None:
    ahead = ClaimAhead(16, 512)
    ahead.stepped(0.001)
    assert ahead.jobs == 0


@pytest.mark.stores("sqlite")
def test_enough_jobs_are_claimed_ahead_to_last_every_thread_two_round_trips_of_the_loop() -> None:
    # 16 threads of 1 ms jobs start 16 jobs a millisecond: a round trip of 1 ms needs 16, twice over 32.
    assert sized(concurrency=16, job_ms=1, round_trip_ms=1) == 32
    assert sized(concurrency=8, job_ms=5, round_trip_ms=1) == 4
    assert sized(concurrency=32, job_ms=5, round_trip_ms=1) == 13


@pytest.mark.stores("sqlite")
def test_a_slower_commit_claims_more_ahead() -> None:
    assert sized(concurrency=16, job_ms=1, round_trip_ms=4) == 4 * sized(concurrency=16, job_ms=1, round_trip_ms=1)


@pytest.mark.stores("sqlite")
def test_no_op_jobs_claim_up_to_the_prefetch_and_never_more() -> None:
    assert sized(concurrency=1, job_ms=0.01, round_trip_ms=1, limit=32) == 32
    assert sized(concurrency=1, job_ms=0, round_trip_ms=1, limit=32) == 32
    assert sized(concurrency=4, job_ms=1, round_trip_ms=1, limit=0) == 0


def test_the_default_prefetch_grows_with_the_threads_on_sqlite_and_is_large_on_postgresql() -> None:
    """32 threads of 1 ms jobs start one every 30 us: 32 on hand lasted under a millisecond, less than a step."""
    assert [worker.default_prefetch("jobs.db", threads) for threads in (1, 4, 8, 16, 32)] == [32, 32, 32, 64, 128]
    assert worker.default_prefetch("postgresql://db.example/jobs", 32) == worker.POSTGRES_PREFETCH
    assert Worker("jobs.db", concurrency=16).prefetch == 64
    assert Worker("jobs.db", concurrency=16, prefetch=8).prefetch == 8


@pytest.mark.stores("sqlite")
def test_jobs_that_free_a_thread_less_often_than_half_the_patience_claim_nothing_ahead() -> None:
    patience_ms = worker.PREFETCH_PATIENCE * 1000
    assert sized(concurrency=1, job_ms=patience_ms / 2 + 1, round_trip_ms=1) == 0
    assert sized(concurrency=4, job_ms=4 * patience_ms, round_trip_ms=1) == 0
    assert sized(concurrency=4, job_ms=patience_ms, round_trip_ms=1) == 1, "4 threads free one up often enough"


@pytest.mark.stores("sqlite")
def test_a_long_job_stops_claiming_ahead_at_once_and_short_ones_bring_it_back() -> None:
    ahead = ClaimAhead(4, 512)
    ahead.stepped(0.001)
    ahead.finished([0.001] * 4)
    assert ahead.jobs == 8
    ahead.finished([2.0])
    assert ahead.jobs == 0
    for _ in range(40):
        ahead.finished([0.001] * 4)
    assert ahead.jobs == 8


@pytest.mark.stores("sqlite")
def test_a_timed_out_job_or_jobs_given_back_claim_nothing_ahead_until_the_next_outcomes() -> None:
    ahead = ClaimAhead(4, 512)
    ahead.stepped(0.001)
    ahead.finished([0.001])
    ahead.stop()
    assert ahead.jobs == 0
    ahead.finished([0.001])
    assert ahead.jobs == 8


# --- The worker, on each store ----------------------------------------------------


def held_after_claims(w: Worker) -> list[int]:
    """Spy on a worker's claims: how many jobs it held (running or waiting for a thread) after each one."""
    held: list[int] = []
    claim = w._claim

    def counted(limit: int, now: int) -> list[Job]:
        claimed = claim(limit, now)
        held.append(len(w._running) + len(claimed))
        return claimed

    w._claim = counted  # type: ignore[method-assign]
    return held


def test_jobs_of_milliseconds_are_claimed_ahead_of_the_free_threads(queue: Queue, db: str) -> None:
    @worker.job
    def wait_a_little(ctx: JobContext) -> int:
        time.sleep(0.002)
        return ctx.id

    made = queue.enqueue_many([("wait_a_little", None)] * 200)
    w = Worker(db, cron=False, concurrency=4, burst=True)
    held = held_after_claims(w)
    w.run()
    assert [queue.get(job.id).result for job in made] == [job.id for job in made]  # type: ignore[union-attr]
    assert held[0] == 4, "nothing is claimed ahead before a job has shown how long it takes"
    assert max(held) > 4, "then jobs wait claimed ahead of the threads"


def test_a_job_claimed_ahead_of_millisecond_jobs_times_out_from_its_own_start(queue: Queue, db: str) -> None:
    @worker.job
    def wait_a_little(ctx: JobContext) -> None:
        time.sleep(0.002)

    @worker.job(timeout=0.05)
    def timed(ctx: JobContext) -> str:
        return "in time"

    queue.enqueue_many([("wait_a_little", None)] * 100)
    late = queue.enqueue("timed", priority=-1)  # claimed last, ahead of the threads, behind every other job
    w = Worker(db, cron=False, concurrency=2, burst=True, prefetch=512)
    w.run()
    row = queue.get(late.id)
    assert row is not None
    assert row.status == "succeeded" and row.result == "in time"


def test_the_round_trip_that_jobs_are_claimed_ahead_for_counts_from_the_oldest_outcome_handed_over(
    queue: Queue, db: str
) -> None:
    """A job thread running pure Python keeps the GIL from the main thread for up to the switch interval after
    it hands an outcome over: the jobs claimed ahead must last through that wait as well as through the step."""

    @worker.job
    def quick(ctx: JobContext) -> None:
        pass

    queue.enqueue_many([("quick", None)] * 3)
    w = Worker(db, cron=False, concurrency=1)
    try:
        w.start_up()
        w._tick()
        first = w._todo.get_nowait()
        assert first is not None
        w._hand_over(w.execute(first))
        assert w._handed_over_at is not None
        w._handed_over_at -= 0.5  # as if the main thread had waited half a second to take it
        w._tick()
        assert w._ahead.round_trip_seconds >= ClaimAhead.SMOOTHING * 0.5, "half a second, in the moving average"
        assert w._handed_over_at is None, "the next step measures from the next outcome handed over"
        assert queue.get(first.id).status == "succeeded"  # type: ignore[union-attr]
    finally:
        w.close()


def test_a_job_of_higher_priority_starts_before_the_jobs_claimed_ahead_of_it(queue: Queue, db: str) -> None:
    @worker.job
    def quick(ctx: JobContext) -> None:
        pass

    backlog = queue.enqueue_many([("quick", None)] * 10)
    w = Worker(db, cron=False, concurrency=1)
    try:
        w.start_up()
        w._ahead.jobs = 4  # as measured for jobs of milliseconds: 1 for the thread, 4 claimed ahead
        w._tick()
        first = w._todo.get_nowait()
        assert first is not None and first.id == backlog[0].id
        urgent = queue.enqueue("quick", priority=100)
        w._progress_at = time.monotonic()  # as a job thread notes it starts a job (else those waiting go back)
        w._hand_over(w.execute(first))
        w._tick()  # records the first job, and claims the urgent one for the place it freed
        waiting = [job.id for job in w._take_waiting()]
        assert waiting[0] == urgent.id, "the urgent job first"
        assert waiting[1:] == sorted(waiting[1:]) and waiting[1:5] == [job.id for job in backlog[1:5]], "then the rest"
    finally:
        w.close()


def test_jobs_given_back_for_waiting_too_long_are_claimed_again_once_a_thread_is_free(queue: Queue, db: str) -> None:
    """A burst worker that gave back the jobs waiting behind a long one must not think nothing is due then:
    its own give-back is no commit by another process, which is all an idle worker's wake-up looks for."""

    @worker.job
    def quick(ctx: JobContext) -> None:
        pass

    made = queue.enqueue_many([("quick", None)] * 3)
    w = Worker(db, cron=False, concurrency=1, burst=True)
    try:
        w.start_up()
        w._ahead.jobs = 4  # room for 5: the claim takes all 3 and finds no more
        w._tick()
        assert len(w._running) == 3 and not w._last_claim_full
        w._wake_up.changed()  # whatever other connections committed before is seen
        w._progress_at = time.monotonic() - 1  # no thread has started a job for a second
        w._tick()  # gives the 3 back: none had started
        assert not w._nothing_due, "they are due"
        w.run()
        assert [queue.get(job.id).status for job in made] == ["succeeded"] * 3  # type: ignore[union-attr]
    finally:
        w.close()


def test_while_a_worker_holds_the_write_lock_the_gil_comes_back_to_it_after_a_short_switch_interval(
    db: str,
) -> None:
    """Each statement lets go of the GIL; a job thread running pure Python would keep it for the whole
    default switch interval (5 ms), holding up the transaction, and every other process waiting for the lock."""
    w = Worker(db, cron=False)
    before = sys.getswitchinterval()
    inside: list[float] = []
    try:
        with w._write():
            inside.append(sys.getswitchinterval())
        assert inside == [pytest.approx(worker.LOCK_HELD_SWITCH_INTERVAL)]
        assert sys.getswitchinterval() == before, "restored at the commit"
        with pytest.raises(RuntimeError), w._write():
            raise RuntimeError("a step that fails")
        assert sys.getswitchinterval() == before, "and after a rollback"
    finally:
        w.close()


def test_a_switch_interval_a_job_sets_during_a_workers_transaction_is_left_as_the_job_set_it(db: str) -> None:
    w = Worker(db, cron=False)
    before = sys.getswitchinterval()
    try:
        with w._write():
            sys.setswitchinterval(0.001)  # a job thread's own, say
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(before)
        w.close()


@pytest.mark.stores("sqlite")
def test_a_worker_that_cannot_take_the_write_lock_restores_the_switch_interval(
    db: str, write_lock: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "BUSY_TIMEOUT_MS", 50)
    w = Worker(db, cron=False)
    before = sys.getswitchinterval()
    try:
        with pytest.raises(worker.DatabaseBusy), w._write():
            pass
        assert sys.getswitchinterval() == before
    finally:
        w.close()


# --- What a kill -9 repeats -------------------------------------------------------

LEDGER_JOBS = '''
"""Jobs for test_throughput.py: each run appends its key to a ledger."""

import os
import time

from worker import job


@job
def counted(ctx, key, ledger, ms):
    # One write() on an O_APPEND descriptor: lines never interleave.
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{key}\\n".encode())
    finally:
        os.close(fd)
    time.sleep(ms / 1000)
'''


def start_worker(processes: Processes, db: str, jobs: Path, *flags: str, name: str) -> WorkerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    env["WORKER_LOG_LEVEL"] = "WARNING"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    args = ["run", "--db", db, "--jobs", str(jobs), "--lease", "1", *flags]
    return processes.start(*args, name=name, env=env, cwd=processes.directory)


def held_by(db: str, owner: str) -> dict[int, Any]:
    """Rows running under ``owner`` (committed), by the key of their job."""
    return {row["id"]: row for row in rows(db, "status = 'running'") if row["owner"] == owner}


def key(row: Any) -> int:
    data = row["data"]  # JSON text from SQLite, a dict from PostgreSQL's jsonb
    return int((json.loads(data) if isinstance(data, str) else data)["key"])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")
def test_a_kill_9_with_jobs_claimed_ahead_reruns_only_jobs_the_dead_worker_held(
    db: str, processes: Processes, tmp_path: Path
) -> None:
    """Jobs of 2 ms at concurrency 4: the worker holds jobs running, jobs finished whose outcome is not yet
    committed, and jobs claimed ahead.  A kill -9 then; another worker runs every job, and only jobs the dead
    worker held can have run twice (those it had started): none is lost, none it did not hold runs again."""
    jobs = tmp_path / "ledger_jobs.py"
    jobs.write_text(LEDGER_JOBS)
    ledger = tmp_path / "ledger"
    n = 1500
    with Queue(db, check_types=False) as queue:  # the job type is the worker processes' own
        queue.enqueue_many([("counted", {"key": i, "ledger": str(ledger), "ms": 2}) for i in range(n)])
    doomed = start_worker(processes, db, jobs, "--concurrency", "4", name="doomed")

    def frozen_holding_more_than_its_threads() -> dict[int, Any] | None:
        running = rows(db, "status = 'running'")
        if len(running) <= 4 or not ledger.exists():
            return None
        doomed.send(signal.SIGSTOP)  # the rows it holds now are the ones it dies holding
        wait_for(lambda: process_state(doomed.pid) == "T", 5, "the worker to stop")
        held = held_by(db, running[0]["owner"])
        if len(held) > 4:
            return held
        doomed.send(signal.SIGCONT)
        return None

    held = wait_for(frozen_holding_more_than_its_threads, 30, "the worker to hold jobs claimed ahead")
    doomed.kill()
    ran_before = collections.Counter(int(line) for line in ledger.read_text().split())

    rescuer = start_worker(processes, db, jobs, "--concurrency", "4", name="rescuer")
    wait_for(lambda: not rows(db, "type = 'counted' AND status IN ('pending', 'running')"), 60, "every job to end")
    rescuer.send(signal.SIGTERM)  # it has started: it ran the jobs
    assert rescuer.wait(15) == 0

    every_row = {row["id"]: row for row in rows(db, "type = 'counted'")}
    succeeded = collections.Counter(key(row) for row in every_row.values() if row["status"] == "succeeded")
    assert succeeded == collections.Counter(range(n)), "each job succeeded exactly once"
    runs = collections.Counter(int(line) for line in ledger.read_text().split())
    assert set(runs) == set(range(n)), "every job ran"
    held_keys = {key(row) for row in held.values()}
    ran_twice = {key for key, count in runs.items() if count > 1}
    assert ran_twice <= held_keys, "only jobs the dead worker held ran again"
    assert ran_twice <= set(ran_before), "and of those, only the ones it had started"
    assert max(runs.values()) == 2
    assert {row_id for row_id, row in every_row.items() if (row["error"] or "").startswith("worker lost")} == set(held)


# --- A producer beside a busy worker ------------------------------------------------


@pytest.fixture
def write_lock(db: str) -> Iterator[sqlite3.Connection]:
    """Another connection that holds the write lock until the test commits it."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    yield holder
    if holder.in_transaction:
        holder.execute("COMMIT")
    holder.close()


def write_attempts(queue: Queue) -> list[str]:
    """Every statement of the queue's own connection that takes the write lock first (a BEGIN IMMEDIATE, a lone
    INSERT), traced by SQLite: those refused as busy too."""
    attempts: list[str] = []
    store = queue._store()
    assert isinstance(store, worker.SQLiteStore)
    writes = ("BEGIN", "INSERT")
    store.conn.set_trace_callback(lambda sql: attempts.append(sql) if sql.lstrip().startswith(writes) else None)
    return attempts


def released_after(write_lock: sqlite3.Connection, attempts: list[str], looks: int) -> threading.Thread:
    """A thread that commits ``write_lock`` once ``looks`` attempts to take the lock are traced."""

    def release() -> None:
        wait_for(lambda: len(attempts) >= looks, 10, f"{looks} looks for the lock")
        write_lock.execute("COMMIT")

    releaser = threading.Thread(target=release)
    releaser.start()
    return releaser


@pytest.mark.stores("sqlite")
def test_once_an_enqueue_waited_for_the_write_lock_the_next_ones_look_for_it_often(
    db: str, queue: Queue, write_lock: sqlite3.Connection
) -> None:
    @worker.job
    def anything(ctx: JobContext) -> None:
        pass

    attempts = write_attempts(queue)
    releaser = released_after(write_lock, attempts, 1)
    first = queue.enqueue("anything")  # waits with SQLite's own busy wait: one statement, looked again inside
    releaser.join(10)
    write_lock.execute("BEGIN IMMEDIATE")
    attempts.clear()
    # SQLite's own wait would look 5 times in its first 33 ms, and then every 100 ms at most.
    releaser = released_after(write_lock, attempts, 10)
    second = queue.enqueue("anything")
    releaser.join(10)
    assert len(attempts) >= 10
    assert [row["id"] for row in rows(db)] == [first.id, second.id]
    conn = queue._store().conn  # type: ignore[attr-defined]
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == worker.BUSY_TIMEOUT_MS, "its busy timeout restored"


@pytest.mark.stores("sqlite")
def test_an_enqueue_still_fails_as_busy_once_the_lock_outlasts_the_busy_timeout(
    db: str, queue: Queue, write_lock: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    @worker.job
    def anything(ctx: JobContext) -> None:
        pass

    monkeypatch.setattr(worker, "BUSY_TIMEOUT_MS", 50)
    with pytest.raises(worker.DatabaseBusy):
        queue.enqueue("anything")
    write_lock.execute("COMMIT")
    assert queue.enqueue("anything").type == "anything", "and the queue works on once the lock is free"
    assert [row["type"] for row in rows(db)] == ["anything"]


@pytest.mark.stores("sqlite")
def test_once_a_workers_step_waited_for_the_write_lock_its_next_ones_look_for_it_often(db: str) -> None:
    """Beside another worker process: SQLite's own waits (5, 10, ... 100 ms) kept meeting the other's commits."""
    w = Worker(db, cron=False)
    write_lock = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        store = w.store  # the schema is there: now another connection takes the lock
        assert isinstance(store, worker.SQLiteStore)
        write_lock.execute("BEGIN IMMEDIATE")
        attempts: list[str] = []
        store.conn.set_trace_callback(lambda sql: attempts.append(sql) if sql.startswith("BEGIN") else None)
        releaser = released_after(write_lock, attempts, 1)
        with w._write():  # SQLite's own busy wait, the first time: one statement, looked again inside
            pass
        releaser.join(10)
        write_lock.execute("BEGIN IMMEDIATE")
        attempts.clear()
        releaser = released_after(write_lock, attempts, 10)
        with w._write():
            pass
        releaser.join(10)
        assert len(attempts) >= 10
        assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == worker.BUSY_TIMEOUT_MS
    finally:
        write_lock.close()
        w.close()
