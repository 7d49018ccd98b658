"""A job that misbehaves costs only itself; a long lock or a signal stops nothing it should not (issue 12).

Jobs that raise BaseException or return what JSON cannot hold, that leave
threads behind, close stderr or fork; a worker started under another
process's write lock; a supervisor killed -9 or sent SIGHUP.  In-process where
the table proves it, real processes (conftest's Processes) where the defect
lives in the process itself.  Every wait is bounded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import FakeClock, Processes, WorkerProcess, alive, at, child_pids, create_database, rows, wait_for
from worker import JobContext, Queue

pytestmark = pytest.mark.stores("sqlite", "postgres")  # the same meaning on every store

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, POSIX signals and prctl")

JOBS_MODULE = '''
"""Jobs for test_misbehaving_jobs.py."""

import os
import sys
import threading
import time

from worker import job


@job
def record(ctx, n):
    return n


@job
def nap(ctx, seconds):
    time.sleep(seconds)
    return seconds


@job
def leave_a_thread(ctx):
    """Starts a thread that is not a daemon and outlives the job, and the worker's shutdown."""
    threading.Thread(target=time.sleep, args=(3600,), daemon=False, name="left-by-a-job").start()
    return "left"


@job
def close_stderr(ctx):
    sys.stderr.close()
    return "closed"


@job
def fork_and_return(ctx, pid_file):
    """Forks; the child writes its pid and returns, as the parent does (with the child's pid)."""
    child = os.fork()
    if child == 0:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        return "the child's return"
    return child
'''


# --- Fixtures and helpers for real processes ---------------------------------------


@pytest.fixture
def process_db(tmp_path: Path) -> Path:
    return create_database(tmp_path / "jobs.db")


@pytest.fixture
def producer(process_db: Path) -> Iterator[Queue]:
    """The producer side in this test process; the job types live in the workers only."""
    with Queue(process_db, check_types=False) as q:
        yield q


@pytest.fixture
def run_worker(processes: Processes, process_db: Path, tmp_path: Path) -> Callable[..., WorkerProcess]:
    """Start ``worker run`` on the test's database and jobs module with extra flags."""
    jobs_file = tmp_path / "misbehaving_jobs.py"
    jobs_file.write_text(JOBS_MODULE)

    def start(*flags: str, name: str = "worker") -> WorkerProcess:
        return processes.run_jobs(process_db, jobs_file, *flags, name=name)

    return start


def status_of(db: Path, job_id: int) -> str | None:
    found = rows(str(db), f"id = {int(job_id)}")
    return found[0]["status"] if found else None


def registered_processes(db: Path) -> list[int]:
    with sqlite3.connect(db, timeout=5) as conn:
        return [pid for (pid,) in conn.execute("SELECT pid FROM worker_processes")]


def two_workers(supervisor: WorkerProcess) -> set[int]:
    """The supervisor's worker processes once there are two, else nothing."""
    found = child_pids(supervisor.pid)
    return found if len(found) == 2 else set()


def started(process: WorkerProcess) -> bool:
    return " started: " in process.log()


def run_to_the_end(w: worker.Worker, db: str) -> None:
    """Run a burst worker on a thread of its own; fail the test if it has not finished within 20 s."""
    loop = threading.Thread(target=w.run, daemon=True)
    loop.start()
    loop.join(20)
    if loop.is_alive():
        w.stop()
        loop.join(10)
        pytest.fail(f"the worker never finished: {[(r['type'], r['status']) for r in rows(db)]}")


# --- 8. BaseException and results that cannot be encoded -------------------------


def test_jobs_raising_base_exceptions_or_returning_results_nested_too_deep_fail_alone_and_others_run(
    make_worker: Callable[..., worker.Worker], queue: Queue, db: str, clock: FakeClock
) -> None:
    """Four such jobs at concurrency 3 (claimed first) each fail with a clear error; the threads run on."""

    @worker.job
    def interrupt(ctx: JobContext) -> None:
        raise KeyboardInterrupt

    @worker.job
    def generator_exit(ctx: JobContext) -> None:
        raise GeneratorExit("closed")

    @worker.job
    def bare(ctx: JobContext) -> None:
        raise BaseException("bare")

    @worker.job
    def too_deep(ctx: JobContext) -> list[Any]:
        value: list[Any] = []
        for _ in range(5000):
            value = [value]
        return value

    @worker.job
    def fine(ctx: JobContext, n: int) -> int:
        return n

    bad = {name: queue.enqueue(name, priority=1, now=at(clock)).id for name in ("interrupt", "generator_exit",
                                                                                 "bare", "too_deep")}  # fmt: skip
    good = [queue.enqueue("fine", {"n": n}, now=at(clock)).id for n in range(6)]
    w = make_worker(concurrency=3, burst=True, shutdown_timeout=1, prefetch=0)
    run_to_the_end(w, db)

    by_id = {r["id"]: r for r in rows(db)}
    assert {name: by_id[job_id]["status"] for name, job_id in bad.items()} == dict.fromkeys(bad, "failed")
    assert by_id[bad["interrupt"]]["error"].startswith("KeyboardInterrupt")
    assert by_id[bad["generator_exit"]]["error"].startswith("GeneratorExit: closed")
    assert by_id[bad["bare"]]["error"].startswith("BaseException: bare")
    assert by_id[bad["too_deep"]]["error"].startswith("result is not JSON-serialisable: nested too deep")
    assert [by_id[job_id]["status"] for job_id in good] == ["succeeded"] * 6
    assert all(r["lease_until"] is None for r in by_id.values())


def test_errors_and_results_holding_a_nul_or_a_lone_surrogate_are_stored_escaped_and_the_others_run(
    make_worker: Callable[..., worker.Worker], queue: Queue, db: str, clock: FakeClock, store_kind: str
) -> None:
    """A str may hold what no database text can (a surrogate from surrogateescape; a NUL on PostgreSQL).

    Such a message fails its own row, written with escapes; before, it raised
    out of the recording and stopped the worker with every claimed job
    left running.
    """

    @worker.job
    def raise_odd(ctx: JobContext) -> None:
        raise ValueError("name \udcff and \x00 here")

    @worker.job
    def return_odd(ctx: JobContext) -> dict[str, str]:
        return {"name": "\udcff and \x00"}

    @worker.job
    def fine(ctx: JobContext, n: int) -> int:
        return n

    raised = queue.enqueue("raise_odd", priority=1, now=at(clock)).id
    returned = queue.enqueue("return_odd", priority=1, now=at(clock)).id
    good = [queue.enqueue("fine", {"n": n}, now=at(clock)).id for n in range(3)]
    w = make_worker(concurrency=2, burst=True, shutdown_timeout=1)
    run_to_the_end(w, db)

    by_id = {r["id"]: r for r in rows(db)}
    assert by_id[raised]["status"] == "failed"
    first_line = by_id[raised]["error"].partition("\n")[0]
    nul = "\x00" if store_kind == "sqlite" else "\\x00"  # SQLite's TEXT holds a NUL; PostgreSQL's cannot
    assert first_line == f"ValueError: name \\udcff and {nul} here"
    assert by_id[returned]["status"] == "succeeded"
    assert json.loads(by_id[returned]["result"]) == {"name": "\udcff and \x00"}  # JSON escapes hold both
    assert [by_id[job_id]["status"] for job_id in good] == ["succeeded"] * 3


def test_keyboard_interrupt_in_a_job_run_by_work_on_the_main_thread_fails_its_row_then_goes_on_up(
    make_worker: Callable[..., worker.Worker], queue: Queue, db: str, clock: FakeClock
) -> None:
    """work() runs the job on the caller's thread, where KeyboardInterrupt may be Ctrl-C: the row first."""

    @worker.job
    def interrupt(ctx: JobContext) -> None:
        raise KeyboardInterrupt

    job = queue.enqueue("interrupt", now=at(clock))
    with pytest.raises(KeyboardInterrupt):
        make_worker().work()
    (row,) = rows(db, f"id = {job.id}")
    assert row["status"] == "failed"
    assert row["error"].startswith("KeyboardInterrupt")


# --- 10. A thread left behind by a job ----------------------------------------------


@linux_only
@pytest.mark.slow
def test_sigterm_exits_though_a_job_left_a_non_daemon_thread_running(
    run_worker: Callable[..., WorkerProcess], producer: Queue, process_db: Path
) -> None:
    job = producer.enqueue("leave_a_thread")
    process = run_worker()
    wait_for(lambda: status_of(process_db, job.id) == "succeeded", 15, "the job to succeed")
    assert process.stop(timeout=15) == 0
    assert registered_processes(process_db) == []


# --- 11. A job that closes sys.stderr -----------------------------------------------


def test_job_closing_stderr_under_a_plain_stream_handler_fails_nothing_and_the_worker_goes_on(
    make_worker: Callable[..., worker.Worker],
    queue: Queue,
    db: str,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An app's own StreamHandler on sys.stderr: once a job closed it, logging's error report raises ValueError."""
    caplog.set_level(logging.INFO, logger="worker")
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    handler = logging.StreamHandler(stderr)
    worker.logger.addHandler(handler)

    @worker.job
    def close_stderr(ctx: JobContext) -> str:
        sys.stderr.close()
        return "closed"

    @worker.job
    def fine(ctx: JobContext) -> int:
        return 1

    try:
        closer = queue.enqueue("close_stderr", now=at(clock))
        w = make_worker()
        assert w.work() == 1
        after = queue.enqueue("fine", now=at(clock))
        assert w.work() == 1
    finally:
        worker.logger.removeHandler(handler)
    assert [r["status"] for r in rows(db, f"id IN ({closer.id}, {after.id})")] == ["succeeded", "succeeded"]


@linux_only
@pytest.mark.slow
def test_job_closing_stderr_leaves_the_worker_running_jobs_and_logging(
    run_worker: Callable[..., WorkerProcess], producer: Queue, process_db: Path
) -> None:
    closer = producer.enqueue("close_stderr")
    process = run_worker("--concurrency", "1")
    wait_for(lambda: status_of(process_db, closer.id) == "succeeded", 15, "the job to close stderr")
    after = [producer.enqueue("record", {"n": n}).id for n in range(5)]
    wait_for(lambda: all(status_of(process_db, i) == "succeeded" for i in after), 15, "the jobs after it to run")
    assert process.popen.poll() is None
    assert process.stop() == 0
    assert f"job {after[-1]} record succeeded" in process.log()  # its log goes on, on file descriptor 2


# --- 12. A job that forks ---------------------------------------------------------


@linux_only
@pytest.mark.slow
def test_child_of_a_forking_job_exits_when_the_function_returns_and_the_parent_records_the_row(
    run_worker: Callable[..., WorkerProcess], producer: Queue, process_db: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    job = producer.enqueue("fork_and_return", {"pid_file": str(pid_file)})
    process = run_worker("--concurrency", "2")
    wait_for(lambda: status_of(process_db, job.id) == "succeeded", 15, "the job to succeed")
    child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 5, "the child's pid"))
    (row,) = rows(str(process_db), f"id = {job.id}")
    assert row["result"] == str(child)  # the parent's return, recorded once
    wait_for(lambda: not alive(child), 10, f"the forked child {child} to exit")
    later = producer.enqueue("record", {"n": 1})
    wait_for(lambda: status_of(process_db, later.id) == "succeeded", 15, "the next job to run")
    assert process.stop() == 0


# --- 13. Starting while another process holds the write lock --------------------


@linux_only
@pytest.mark.slow
def test_worker_started_during_a_long_write_lock_waits_for_it_and_sigterm_still_stops_it(
    run_worker: Callable[..., WorkerProcess], producer: Queue, process_db: Path
) -> None:
    """The lock outlasts the 5 s busy timeout: both workers wait (not exit 3); SIGTERM ends one; the other runs."""
    jobs = [producer.enqueue("record", {"n": n}).id for n in range(5)]
    holder = sqlite3.connect(process_db, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        locked_at = time.monotonic()
        patient, stopped = run_worker(name="patient"), run_worker(name="stopped")
        # Real time must pass here: the busy timeout is 5 s of it.
        time.sleep(max(0.0, locked_at + 7 - time.monotonic()))
        assert patient.popen.poll() is None, patient.log()
        assert stopped.popen.poll() is None, stopped.log()
        assert not started(patient)
        stopped.send(signal.SIGTERM)
        assert stopped.wait(15) == 0
        assert {status_of(process_db, i) for i in jobs} == {"pending"}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: all(status_of(process_db, i) == "succeeded" for i in jobs), 20, "the jobs to run after the lock")
    assert patient.stop() == 0
    assert registered_processes(process_db) == []


@linux_only
@pytest.mark.slow
def test_supervisor_restarting_a_worker_during_a_long_write_lock_keeps_every_worker_running(
    run_worker: Callable[..., WorkerProcess], processes: Processes, producer: Queue, process_db: Path
) -> None:
    """The fleet case: the replacement of a killed worker starts under the lock and waits, so nothing exits 3."""
    supervisor = run_worker("--processes", "2", "--concurrency", "1", name="supervisor")
    first = wait_for(lambda: two_workers(supervisor), 15, "the supervisor's 2 workers")
    processes.adopt(first)
    wait_for(lambda: supervisor.log().count(" started: ") == 2, 15, "both workers to start")
    victim = min(first)
    holder = sqlite3.connect(process_db, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        locked_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        children = wait_for(lambda: (found := two_workers(supervisor)) and victim not in found and found, 15,
                            "the supervisor to restart the killed worker")  # fmt: skip
        processes.adopt(children)
        time.sleep(max(0.0, locked_at + 8 - time.monotonic()))  # past the replacement's 5 s busy timeout
        assert supervisor.popen.poll() is None, supervisor.log()
        assert all(alive(pid) for pid in children)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    jobs = [producer.enqueue("record", {"n": n}).id for n in range(10)]
    wait_for(lambda: all(status_of(process_db, i) == "succeeded" for i in jobs), 20, "the jobs to run after the lock")
    wait_for(lambda: children <= set(registered_processes(process_db)), 10, "the replacement to register")
    assert supervisor.stop() == 0


# --- 15. The supervisor's death, and SIGHUP ----------------------------------------


@linux_only
@pytest.mark.slow
def test_workers_of_a_supervisor_killed_9_stop_and_give_their_jobs_back(
    run_worker: Callable[..., WorkerProcess], processes: Processes, producer: Queue, process_db: Path
) -> None:
    long_jobs = [producer.enqueue("nap", {"seconds": 60}).id for _ in range(2)]
    supervisor = run_worker("--processes", "2", "--concurrency", "1", "--shutdown-timeout", "1", name="supervisor")
    children = wait_for(lambda: two_workers(supervisor), 15, "the supervisor's 2 workers")
    processes.adopt(children)
    wait_for(lambda: all(status_of(process_db, i) == "running" for i in long_jobs), 15, "both long jobs to start")
    supervisor.kill()
    wait_for(lambda: not any(alive(pid) for pid in children), 15, "the workers to stop after their supervisor")
    assert {status_of(process_db, i) for i in long_jobs} == {"pending"}  # given back, not left to the lease
    assert registered_processes(process_db) == []


@linux_only
@pytest.mark.slow
def test_sighup_stops_a_worker_gracefully_giving_back_and_deregistering(
    run_worker: Callable[..., WorkerProcess], producer: Queue, process_db: Path
) -> None:
    long_job = producer.enqueue("nap", {"seconds": 60}).id
    process = run_worker("--shutdown-timeout", "1")
    wait_for(lambda: status_of(process_db, long_job) == "running", 15, "the long job to start")
    process.send(signal.SIGHUP)
    assert process.wait(15) == 0
    assert status_of(process_db, long_job) == "pending"
    assert registered_processes(process_db) == []


@linux_only
@pytest.mark.slow
def test_sighup_stops_a_supervisor_and_its_workers_gracefully(
    run_worker: Callable[..., WorkerProcess], processes: Processes, producer: Queue, process_db: Path
) -> None:
    long_job = producer.enqueue("nap", {"seconds": 60}).id
    supervisor = run_worker("--processes", "2", "--shutdown-timeout", "1", name="supervisor")
    children = wait_for(lambda: two_workers(supervisor), 15, "the supervisor's 2 workers")
    processes.adopt(children)
    wait_for(lambda: status_of(process_db, long_job) == "running", 15, "the long job to start")
    supervisor.send(signal.SIGHUP)
    assert supervisor.wait(20) == 0
    assert not any(alive(pid) for pid in children)
    assert status_of(process_db, long_job) == "pending"
    assert registered_processes(process_db) == []
