"""The worker as real processes: several on one file, kill -9, SIGSTOP, signals, the CLI.

Each test starts ``python -m worker`` subprocesses on a database under tmp_path,
with a jobs module written there that leaves evidence in files (a ledger the job
itself appends to), and asserts on the table.  Every wait polls with a deadline;
every process a test starts is killed at teardown, whatever happened.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import (
    HERE,
    Processes,
    WorkerProcess,
    alive,
    child_pids,
    create_database,
    wait_for,
    without_file_permission_override,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")

SQLITE3_SHELL = "/usr/bin/sqlite3"
DEMO_JOBS = str(HERE / "jobs.py")
POLL = 0.02  # seconds between looks at the table

JOBS_MODULE = '''
"""Jobs for test_processes.py: each leaves evidence in a file the test reads."""

import contextlib
import os
import signal
import sqlite3
import time

from worker import job


def _append(path, line):
    # One write() on an O_APPEND descriptor: lines from many processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


@job
def record(ctx, ledger):
    """Does nothing but write its id in the ledger."""
    _append(ledger, str(ctx.job.id))


@job
def stall(ctx, marker, seconds):
    """Stalls on its first attempt only, so that a retry succeeds at once."""
    _append(marker, f"{ctx.job.id} {ctx.job.attempt} start")
    if ctx.job.attempt == 1:
        time.sleep(seconds)
    _append(marker, f"{ctx.job.id} {ctx.job.attempt} end")
    return {"attempt": ctx.job.attempt}


@job
def nap(ctx, marker, seconds):
    """Sleeps, after saying it started."""
    _append(marker, f"{ctx.job.id} start")
    time.sleep(seconds)
    return seconds


@job
def die_holding_others(ctx, db):
    """First attempt: once its worker holds other jobs too (claimed ahead), kill -9 that worker."""
    if ctx.job.attempt > 1:
        return "survived"
    held = (
        "SELECT count(*) FROM worker_jobs"
        " WHERE status = 'running' AND owner = (SELECT owner FROM worker_jobs WHERE id = ?)"
    )
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        for _ in range(1000):  # a refill of the jobs claimed ahead comes within a few ms
            if conn.execute(held, (ctx.job.id,)).fetchone()[0] > 1:
                break
            time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)


@job
def peek(ctx, db):
    """Reads the app's database with the stdlib driver, as app code in a job would."""
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        return conn.execute("SELECT count(*) FROM worker_jobs").fetchone()[0]
'''


# --- Helpers ----------------------------------------------------------------------


def rows(db: Path, where: str = "1", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The test's rows of worker_jobs as dicts (rows of built-in cron jobs left out).

    Read with the stdlib sqlite3 module, the SQLite library worker.Queue uses in
    this process too: two SQLite libraries in one process release each other's
    POSIX locks, which loses commits.
    """
    conn = sqlite3.connect(db, timeout=5)
    try:
        cursor = conn.execute(
            f"SELECT {worker.SELECT_COLUMNS} FROM worker_jobs WHERE cron_schedule IS NULL AND ({where}) ORDER BY id",
            params,
        )
        return [dict(zip(worker.COLUMNS, values, strict=True)) for values in cursor]
    finally:
        conn.close()


def row(db: Path, job_id: int) -> dict[str, Any]:
    (found,) = rows(db, "id = ?", (job_id,))
    return found


def succeeded_retry(db: Path, job_id: int) -> dict[str, Any]:
    """The retry of ``job_id``, once it has succeeded (waits up to 10 s)."""
    return wait_for(
        lambda: rows(db, "rescheduled_from_job = ? AND status = 'succeeded'", (job_id,)), 10, "the retry to succeed"
    )[0]


def lines(path: Path) -> list[str]:
    """The lines a job appended to ``path`` so far."""
    return path.read_text().splitlines() if path.exists() else []


def clean_env(log_level: str = "INFO") -> dict[str, str]:
    """This environment without the worker's own settings, so flags and defaults decide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    env["WORKER_LOG_LEVEL"] = log_level
    return env


# --- Fixtures ---------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return create_database(tmp_path / "jobs.db")


@pytest.fixture
def queue(db: Path) -> Iterator[worker.Queue]:
    """The producer side in this test process; the job types live in the workers only."""
    with worker.Queue(db, check_types=False) as producer:
        yield producer


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "process_test_jobs.py"
    path.write_text(JOBS_MODULE)
    return path


@pytest.fixture
def run_worker(processes: Processes, db: Path, jobs_file: Path) -> Callable[..., WorkerProcess]:
    """Start ``worker run`` on the test's database and jobs module with extra flags."""

    def start(*flags: str, name: str = "worker", log_level: str = "INFO") -> WorkerProcess:
        args = ["run", "--db", str(db), "--jobs", str(jobs_file), *flags]
        return processes.start(*args, name=name, env=clean_env(log_level), cwd=processes.directory)

    return start


def run_cli(*args: str, cwd: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """One ``python -m worker`` command to completion (bounded), stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "worker_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(),
        timeout=30,
        preexec_fn=preexec_fn,
        check=False,
    )


def sqlite3_shell(db: Path, sql: str) -> subprocess.CompletedProcess[str]:
    """Run SQL in the sqlite3 shell, the way an outside program writes into the table."""
    return subprocess.run(
        [SQLITE3_SHELL, str(db), ".timeout 5000", sql], capture_output=True, text=True, timeout=30, check=False
    )


def assert_one_line_error(stderr: str) -> None:
    """A usage or database error is one line on stderr, never a traceback."""
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("worker: "), stderr


# --- Several processes on one file --------------------------------------------------


@pytest.mark.slow
def test_four_processes_run_every_job_exactly_once(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """The claim is one transaction, so 4 processes x 4 threads never run a job twice or lose one."""
    ledger = tmp_path / "ledger"
    enqueued = queue.enqueue_many([("record", {"ledger": str(ledger)})] * 20_000)
    started = time.monotonic()
    workers = [run_worker("--burst", "--concurrency", "4", name=f"worker{i}", log_level="WARNING") for i in range(4)]
    assert [w.wait(60) for w in workers] == [0, 0, 0, 0]
    print(f"\n20,000 jobs on 4 processes: {time.monotonic() - started:.1f} s")

    runs = collections.Counter(int(line) for line in lines(ledger))
    assert set(runs) == {job.id for job in enqueued}
    assert [job_id for job_id, count in runs.items() if count != 1] == []
    assert collections.Counter(r["status"] for r in rows(db)) == {"succeeded": 20_000}


# --- Crashes and stalls -------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_job_is_retried_after_lease(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """A worker killed mid-job leaves a running row; once its lease expires another worker retries it."""
    marker = tmp_path / "marker"
    first = queue.enqueue("stall", {"marker": str(marker), "seconds": 60})
    doomed = run_worker("--lease", "1", name="doomed")
    wait_for(lambda: f"{first.id} 1 start" in lines(marker), 10, "the job to start")
    doomed.send(signal.SIGKILL)
    assert doomed.wait(5) == -signal.SIGKILL
    assert row(db, first.id)["status"] == "running"

    rescuer = run_worker("--lease", "1", name="rescuer")
    retry = succeeded_retry(db, first.id)

    old = row(db, first.id)
    assert old["status"] == "failed"
    assert old["error"].startswith("worker lost")
    assert old["result"] is None
    assert retry["attempt"] == 2
    assert json.loads(retry["result"]) == {"attempt": 2}
    assert [r["id"] for r in rows(db)] == [first.id, retry["id"]]
    assert rows(db, "status IN ('running', 'pending')") == []
    assert lines(marker) == [f"{first.id} 1 start", f"{retry['id']} 2 start", f"{retry['id']} 2 end"]
    rescuer.send(signal.SIGTERM)
    assert rescuer.wait(10) == 0


@pytest.mark.slow
def test_jobs_claimed_ahead_by_a_killed_worker_are_retried_and_only_they_run_again(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """Short jobs are claimed ahead, and their outcomes recorded a batch at a time: a kill -9 leaves
    `running` both the jobs waiting their turn and those finished since the last commit.  After the
    lease another worker retries every one of them; no job is lost, and no other job runs twice."""
    ledger = tmp_path / "ledger"
    before = queue.enqueue_many([("record", {"ledger": str(ledger)})] * 100)
    killer = queue.enqueue("die_holding_others", {"db": str(db)})
    after = queue.enqueue_many([("record", {"ledger": str(ledger)})] * 100)
    doomed = run_worker("--concurrency", "1", "--lease", "1", name="doomed", log_level="WARNING")
    assert doomed.wait(20) == -signal.SIGKILL
    held = {r["id"] for r in rows(db, "status = 'running'")}
    assert killer.id in held and len(held) > 1, held

    rescuer = run_worker("--concurrency", "1", "--lease", "1", name="rescuer")
    wait_for(lambda: not rows(db, "status IN ('pending', 'running')"), 20, "every job to end")
    assert rescuer.stop() == 0

    chain_start = {r["id"]: r["rescheduled_from_job"] or r["id"] for r in rows(db)}
    assert {r["id"] for r in rows(db, "error LIKE 'worker lost%'")} == held
    succeeded = [chain_start[r["id"]] for r in rows(db, "status = 'succeeded'")]
    assert sorted(succeeded) == sorted(job.id for job in [*before, killer, *after]), "each job succeeded once"
    runs = collections.Counter(chain_start[int(line)] for line in lines(ledger))
    assert set(runs) == {job.id for job in [*before, *after]}, "every job ran"
    assert {job_id for job_id, count in runs.items() if count > 1} <= held, "only jobs it held ran again"
    assert max(runs.values()) <= 2


@pytest.mark.slow
def test_stalled_worker_late_result_is_discarded(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """A worker frozen past its lease may wake up and finish, but its write is fenced off."""
    marker = tmp_path / "marker"
    first = queue.enqueue("stall", {"marker": str(marker), "seconds": 1.5})
    stale = run_worker("--lease", "1", name="stale")
    wait_for(lambda: f"{first.id} 1 start" in lines(marker), 10, "the job to start")
    stale.stop_outside_write_lock(db)

    rescuer = run_worker("--lease", "1", name="rescuer")
    retry = succeeded_retry(db, first.id)
    rescued = row(db, first.id)
    assert rescued["status"] == "failed"
    assert rescued["error"].startswith("worker lost")

    stale.send(signal.SIGCONT)
    wait_for(lambda: f"{first.id} 1 end" in lines(marker), 10, "the stale worker's job to return")
    wait_for(lambda: "result discarded" in stale.log(), 10, "the stale worker to discard its result")

    assert row(db, first.id) == rescued  # not a byte of the late result was written
    assert rescued["result"] is None
    assert row(db, retry["id"]) == retry
    assert json.loads(retry["result"]) == {"attempt": 2}
    assert len(rows(db)) == 2
    for process in (stale, rescuer):
        process.send(signal.SIGTERM)
    assert [stale.wait(10), rescuer.wait(10)] == [0, 0]


# --- Signals ------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_lets_short_jobs_finish_and_gives_long_ones_back(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """Graceful shutdown: what ends within the timeout is recorded, the rest is pending again."""
    marker = tmp_path / "marker"
    short, long = queue.enqueue_many(
        [("nap", {"marker": str(marker), "seconds": 0.5}), ("nap", {"marker": str(marker), "seconds": 60})]
    )
    process = run_worker("--concurrency", "2", "--shutdown-timeout", "2")
    wait_for(lambda: len(lines(marker)) == 2, 10, "both jobs to start")
    signalled_ms = worker.now_ms()
    signalled = time.monotonic()
    process.send(signal.SIGTERM)
    assert process.wait(10) == 0
    elapsed = time.monotonic() - signalled
    assert elapsed < 2 + 1.5, f"took {elapsed:.1f} s to stop"

    finished = row(db, short.id)
    assert finished["status"] == "succeeded"
    assert finished["finished"] >= signalled_ms  # it was still running when the signal came
    given_back = row(db, long.id)
    assert given_back["status"] == "pending"
    assert given_back["owner"] is None
    assert given_back["lease_until"] is None
    assert given_back["attempt"] == 1
    assert len(rows(db)) == 2  # the same row, no retry row


@pytest.mark.slow
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_exits_at_once_with_code_1(
    run_worker: Callable[..., WorkerProcess],
    queue: worker.Queue,
    db: Path,
    tmp_path: Path,
    second: signal.Signals,
) -> None:
    """Impatience wins: the second signal does not wait for the shutdown timeout."""
    marker = tmp_path / "marker"
    job = queue.enqueue("nap", {"marker": str(marker), "seconds": 60})
    process = run_worker("--shutdown-timeout", "30")
    wait_for(lambda: lines(marker), 10, "the job to start")
    process.send(signal.SIGTERM)
    wait_for(lambda: "stopping" in process.log(), 5, "the worker to start stopping")
    signalled = time.monotonic()
    process.send(second)
    assert process.wait(5) == 1
    assert time.monotonic() - signalled < 2
    assert row(db, job.id)["status"] == "running"  # left to the lease, as documented


@pytest.mark.slow
def test_supervisor_restarts_a_killed_worker_process(
    run_worker: Callable[..., WorkerProcess], processes: Processes, queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """--processes 2 keeps two workers alive; SIGTERM to the supervisor stops them all."""
    ledger = tmp_path / "ledger"

    def run_batch() -> list[dict[str, Any]]:
        batch = queue.enqueue_many([("record", {"ledger": str(ledger)})] * 10)
        where = f"id BETWEEN {batch[0].id} AND {batch[-1].id} AND status = 'succeeded'"
        wait_for(lambda: len(rows(db, where)) == 10, 10, "a batch to run")
        return rows(db, where)

    def workers_are(check: Callable[[set[int]], bool]) -> Callable[[], set[int]]:
        def found() -> set[int]:
            children = child_pids(supervisor.pid)
            return children if check(children) else set()

        return found

    supervisor = run_worker("--processes", "2", "--concurrency", "2", name="supervisor")
    first = wait_for(workers_are(lambda found: len(found) == 2), 10, "2 worker processes")
    processes.adopt(first)
    run_batch()

    victim, survivor = sorted(first)
    os.kill(victim, signal.SIGKILL)
    children = wait_for(workers_are(lambda found: len(found) == 2 and victim not in found), 10, "a new worker process")
    processes.adopt(children)
    assert survivor in children
    (new_pid,) = children - {survivor}

    # Jobs keep running, and the new process takes its share of them.
    deadline = time.monotonic() + 10
    while not any(r["worker"].endswith(f":{new_pid}") for r in run_batch()):
        assert time.monotonic() < deadline, f"the new worker {new_pid} never ran a job"

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(15) == 0
    wait_for(lambda: not any(alive(pid) for pid in children), 5, "all workers to exit")
    assert {r["status"] for r in rows(db)} == {"succeeded"}
    assert sorted(int(line) for line in lines(ledger)) == [r["id"] for r in rows(db)]


@pytest.mark.slow
def test_supervisor_with_burst_exits_once_nothing_is_due(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """--burst means 'work off the backlog, then exit', with one process or several."""
    ledger = tmp_path / "ledger"
    queue.enqueue_many([("record", {"ledger": str(ledger)})] * 10)
    supervisor = run_worker("--processes", "2", "--burst", name="supervisor")
    assert supervisor.wait(5) == 0
    assert {r["status"] for r in rows(db)} == {"succeeded"}


@pytest.mark.slow
def test_supervisor_passes_log_format_on_to_its_workers(run_worker: Callable[..., WorkerProcess]) -> None:
    """--log-format json must make every line JSON, the workers' as well as the supervisor's."""
    supervisor = run_worker("--processes", "2", "--log-format", "json", name="supervisor")
    wait_for(lambda: supervisor.log().count(" started: ") >= 2, 10, "both workers to start")
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(15) == 0

    def is_json(line: str) -> bool:
        try:
            json.loads(line)
        except ValueError:
            return False
        return True

    assert [line for line in supervisor.log().splitlines() if not is_json(line)] == []


# --- Other writers -------------------------------------------------------------------


@pytest.mark.skipif(not Path(SQLITE3_SHELL).exists(), reason="no sqlite3 shell")
def test_row_inserted_by_sqlite3_shell_runs(db: Path, tmp_path: Path) -> None:
    """Outside writers insert just (type, data); the defaults must make the row runnable."""
    insert = """INSERT INTO worker_jobs(type, data) VALUES ('hello', '{"name":"shell"}')"""
    shell = sqlite3_shell(db, insert)
    assert shell.returncode == 0, shell.stderr
    (inserted,) = rows(db)
    assert abs(inserted["due"] - worker.now_ms()) < 60_000  # epoch milliseconds from SQL defaults

    shutil.copy(HERE / "jobs.py", tmp_path)
    result = run_cli("run", "--burst", "--db", str(db), cwd=tmp_path)  # the default: ./jobs.py
    assert result.returncode == 0, result.stderr
    done = row(db, inserted["id"])
    assert done["status"] == "succeeded"
    assert json.loads(done["result"]) == {"greeting": "hello, shell!"}


@pytest.mark.skipif(not Path(SQLITE3_SHELL).exists(), reason="no sqlite3 shell")
@pytest.mark.parametrize("data", ["{not json", "[1,2]"])
def test_sqlite3_shell_insert_of_invalid_data_is_refused(db: Path, data: str) -> None:
    """The CHECK constraint guards the table against every writer, not only this code."""
    insert = f"INSERT INTO worker_jobs(type, data) VALUES ('hello', '{data}')"
    shell = sqlite3_shell(db, insert)
    assert shell.returncode != 0
    assert "CHECK constraint failed" in shell.stderr
    assert rows(db) == []


@pytest.mark.slow
@pytest.mark.skipif(not Path(SQLITE3_SHELL).exists(), reason="no sqlite3 shell")
def test_job_reading_the_database_with_stdlib_sqlite3_loses_nothing(
    run_worker: Callable[..., WorkerProcess], db: Path, tmp_path: Path
) -> None:
    """Jobs of a SQLite-first app read the app's database, often with the stdlib driver."""
    process = run_worker()
    peek = json.dumps({"db": str(db)})
    record = json.dumps({"ledger": str(tmp_path / "ledger")})
    assert sqlite3_shell(db, f"INSERT INTO worker_jobs(type, data) VALUES ('peek', '{peek}')").returncode == 0
    wait_for(lambda: rows(db, "type = 'peek' AND status = 'succeeded'"), 5, "the stdlib job to succeed")
    assert sqlite3_shell(db, f"INSERT INTO worker_jobs(type, data) VALUES ('record', '{record}')").returncode == 0
    wait_for(lambda: rows(db, "type = 'record' AND status = 'succeeded'"), 5, "the next job to succeed")
    process.send(signal.SIGTERM)
    assert process.wait(10) == 0
    assert sqlite3_shell(db, "PRAGMA integrity_check").stdout.strip() == "ok"
    assert [r["status"] for r in rows(db)] == ["succeeded", "succeeded"]


# --- Bad input through the CLI ---------------------------------------------------------


def test_random_bytes_as_database_exits_3_and_leaves_the_file_untouched(tmp_path: Path) -> None:
    """A file that is not a database is refused, and never 'repaired' into one."""
    path = tmp_path / "not-a-database.db"
    content = random.Random(7).randbytes(8192)
    path.write_bytes(content)
    result = run_cli("run", "--burst", "--jobs", DEMO_JOBS, "--db", str(path), cwd=tmp_path)
    assert result.returncode == 3
    assert_one_line_error(result.stderr)
    assert path.read_bytes() == content
    assert list(tmp_path.iterdir()) == [path]  # no -wal or -shm beside it either


def test_database_in_missing_directory_exits_3(tmp_path: Path) -> None:
    """A typo in the path is an error, not a fresh empty database somewhere."""
    missing = tmp_path / "no-such-directory"
    result = run_cli("run", "--burst", "--jobs", DEMO_JOBS, "--db", str(missing / "jobs.db"), cwd=tmp_path)
    assert result.returncode == 3
    assert_one_line_error(result.stderr)
    assert not missing.exists()


def test_read_only_database_exits_3(db: Path, tmp_path: Path) -> None:
    """A worker that could not record outcomes must not start."""
    db.chmod(0o444)
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(db)!r}, 'r+b')"],
        preexec_fn=without_file_permission_override,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode == 0:
        pytest.skip("the database file stays writable (file modes are not enforced here)")
    result = run_cli(
        "run",
        "--burst",
        "--jobs",
        DEMO_JOBS,
        "--db",
        str(db),
        cwd=tmp_path,
        preexec_fn=without_file_permission_override,
    )
    assert result.returncode == 3
    assert_one_line_error(result.stderr)
    assert "read-only" in result.stderr


def test_schema_newer_than_the_code_exits_3(db: Path, tmp_path: Path) -> None:
    """An older worker must not write into a table a newer one has changed."""
    conn = worker.connect(db)
    conn.execute("UPDATE worker_schema SET version = 99")
    conn.close()
    result = run_cli("run", "--burst", "--jobs", DEMO_JOBS, "--db", str(db), cwd=tmp_path)
    assert result.returncode == 3
    assert_one_line_error(result.stderr)
    assert "newer" in result.stderr


@pytest.mark.parametrize(
    "flags", [["--jobs", "no_such_module"], ["--log-level", "LOUD"]], ids=["unknown-jobs-module", "bad-log-level"]
)
def test_bad_configuration_exits_2(db: Path, tmp_path: Path, flags: list[str]) -> None:
    """Configuration mistakes are usage errors (2), told in one line."""
    result = run_cli("run", "--burst", "--jobs", DEMO_JOBS, "--db", str(db), *flags, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr)


@pytest.mark.parametrize(
    "arguments", [["no_such_type"], ["hello", "--data", "[1,2]"]], ids=["unknown-type", "data-not-an-object"]
)
def test_invalid_enqueue_exits_2_and_writes_nothing(db: Path, tmp_path: Path, arguments: list[str]) -> None:
    """A job the worker could never run is refused at the door."""
    result = run_cli("enqueue", "--db", str(db), *arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert result.stdout == ""
    assert rows(db) == []


# --- Wake-up ---------------------------------------------------------------------------


@pytest.mark.slow
def test_idle_worker_wakes_on_a_commit_by_another_process(
    run_worker: Callable[..., WorkerProcess], queue: worker.Queue, db: Path, tmp_path: Path
) -> None:
    """An idle worker notices another process's commit at once, not after a fixed nap."""
    ledger = tmp_path / "ledger"
    process = run_worker()
    warm_up = queue.enqueue("record", {"ledger": str(ledger)})
    wait_for(lambda: row(db, warm_up.id)["status"] == "succeeded", 10, "the warm-up job")

    latencies = []
    for _ in range(5):
        time.sleep(0.1)  # let the worker go idle again
        before = worker.now_ms()
        job = queue.enqueue("record", {"ledger": str(ledger)})
        started = wait_for(lambda: row(db, job.id)["started"], 5, "the job to start")  # noqa: B023
        latencies.append(started - before)
    print(f"\nwake-up latency (ms from enqueue to started): {latencies}")
    assert max(latencies) < 1000
    process.send(signal.SIGTERM)
    assert process.wait(10) == 0
