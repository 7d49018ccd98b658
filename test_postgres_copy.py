"""`worker copy`: a SQLite file's jobs moved into PostgreSQL, so that workers there carry on where these stopped.

Each test builds the SQLite file with the engine itself (Queue, a Worker on a
fake clock), copies it into the test run's PostgreSQL database, and reads
both tables back as other programs would (sqlite3, psycopg).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

import worker
import worker_cli
from conftest import HERE, FakeClock, NoJitter, Processes, at, wait_for
from worker import JobContext, Queue, Worker

# Every column a copy moves.
COMPARED = worker.COPIED_COLUMNS


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The SQLite file to copy from, with the worker's tables."""
    path = tmp_path / "app.db"
    with Queue(path):
        pass
    return path


@pytest.fixture
def target(postgres_db: str) -> str:
    return postgres_db


@pytest.fixture
def failing() -> None:
    @worker.job(max_attempts=3, retry_delay=10)
    def flaky(ctx: JobContext) -> None:
        raise RuntimeError(f"boom on attempt {ctx.attempt}")


def sqlite_rows(path: Path, where: str = "true") -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT {COMPARED} FROM worker_jobs WHERE {where} ORDER BY id").fetchall()


def postgres_rows(url: str, where: str = "true") -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT {COMPARED} FROM worker_jobs WHERE {where} ORDER BY id").fetchall()


def copy(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`worker copy ARGS` in this process: (exit code, stdout, stderr)."""
    code = worker_cli.main(["copy", *args])
    out, err = capsys.readouterr()
    return code, out, err


def failed_attempts(db: Path, clock: FakeClock, attempts: int) -> int:
    """A ``flaky`` job that failed ``attempts`` times, each run by a worker that is gone since; its first id."""
    with Queue(db) as queue:
        first = queue.enqueue("flaky", now=at(clock)).id
    for _ in range(attempts):
        made = Worker(str(db), clock=clock, rng=NoJitter(), cron=False)
        try:
            made.work()
        finally:
            made.close()
        clock.advance(10)  # the retry delay
    return first


@pytest.fixture
def clock() -> FakeClock:
    """The fake clock, a minute ago: the copied rows are due for a real worker on PostgreSQL."""
    return FakeClock(worker.now_ms() / 1000 - 60)


# --- What is copied ------------------------------------------------------------------


def test_pending_rows_keep_their_ids_columns_and_the_exact_text_of_their_data(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Queue(source, check_types=False) as queue:
        queue.enqueue("mail", {"to": "ada@example.com"}, priority=5, tag="mail-ada", max_attempts=4, keep=3600)
        queue.enqueue("mail", {"to": "bob"}, delay=3600, queue="slow", persistent=True)
        cancelled = queue.enqueue("mail", {"to": "gone"})
        queue.cancel(cancelled.id)
    with sqlite3.connect(source) as conn:  # another program's spacing, key order and escapes, kept byte for byte
        conn.execute("""INSERT INTO worker_jobs (type, data) VALUES ('mail', '{"z": 1,  "a": "\\u00e9é", "z": 2}')""")

    code, out, err = copy("--from", str(source), "--to", target, capsys=capsys)

    assert (code, err) == (0, "")
    assert postgres_rows(target) == sqlite_rows(source, "status = 'pending'")
    assert postgres_rows(target, "id = 4")[0][2] == '{"z": 1,  "a": "\\u00e9é", "z": 2}'
    assert "copied 3 jobs" in out and "3 pending" in out


def test_paused_queues_and_limits_come_with_the_jobs(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Queue(source, check_types=False) as queue:
        queue.enqueue("mail", queue="mail")
        queue.pause("mail")
        queue.limit("api", running=2, per_second=5)
    code, out, err = copy("--from", str(source), "--to", target, capsys=capsys)
    assert (code, err) == (0, "")
    assert "the controls of 2 queue(s)" in out
    with Queue(target, check_types=False) as there:
        controls = {c.queue: (c.paused, c.max_running, c.per_second) for c in there.controls()}
    assert controls == {"mail": (True, None, None), "api": (False, 2, 5.0)}


def test_a_chain_keeps_its_links_and_with_history_every_row_of_it(
    source: Path, target: str, clock: FakeClock, failing: None, capsys: pytest.CaptureFixture[str]
) -> None:
    first = failed_attempts(source, clock, 2)  # attempt 3 pending, pointing back at attempt 2
    chain = sqlite_rows(source)
    assert [row[3] for row in chain] == ["failed", "failed", "pending"]

    assert copy("--from", str(source), "--to", target, "--history", capsys=capsys)[0] == 0

    assert postgres_rows(target) == chain
    store = worker.open_reader(target)
    try:
        assert [job.id for job in worker.job_chain(store, first)] == [row[0] for row in chain]
        # The finished rows' per-minute counts came too: `worker status` counts them in the last hour.
        assert sorted(store.finished_by_queue(since=at(clock, -3600))) == [("default", "failed", 2)]
    finally:
        store.close()


def test_a_chains_snooze_count_and_a_finished_rows_progress_and_cancel_request_come_too(
    source: Path, target: str, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    @worker.job
    def nap(ctx: JobContext) -> None:
        raise worker.Snooze(60)

    @worker.job
    def report(ctx: JobContext) -> None:
        ctx.progress(1, 2, "half way")
        Queue(source).cancel(ctx.id, by="ops")  # asked while it runs: the row ends cancelled, the request kept

    with Queue(source) as queue:
        queue.enqueue("nap", now=at(clock))
        queue.enqueue("report", now=at(clock))
    made = Worker(str(source), clock=clock, rng=NoJitter(), cron=False)
    try:
        made.work()
    finally:
        made.close()
    snoozed, asked = sqlite_rows(source, "snoozes > 0")[0], sqlite_rows(source, "cancel_requested IS NOT NULL")[0]
    assert snoozed[-4] == 1 and asked[-2] == "ops" and '"message":"half way"' in asked[-1]

    assert copy("--from", str(source), "--to", target, "--history", capsys=capsys)[0] == 0

    assert postgres_rows(target) == sqlite_rows(source)


def test_without_history_only_pending_rows_come_and_their_links_still_point_at_the_old_ids(
    source: Path, target: str, clock: FakeClock, failing: None, capsys: pytest.CaptureFixture[str]
) -> None:
    first = failed_attempts(source, clock, 1)

    assert copy("--from", str(source), "--to", target, capsys=capsys)[0] == 0

    (retry,) = postgres_rows(target)
    assert retry[0] == first + 1 and retry[8] == 2  # id, attempt
    assert retry[10] == first  # rescheduled_from_job: the failed row, which stayed in the file


def test_cron_schedules_come_as_they_are_and_a_worker_there_makes_no_second_row(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    @worker.job(cron="*/5 * * * *")
    def report(ctx: JobContext) -> None:
        pass

    with Queue(source) as queue:
        queue.schedule_cron("report", "*/5 * * * *")  # what a worker's cron sync writes
        queue.schedule_cron("report", "0 9 * * 1", tag="weekly", timezone="Europe/Paris")
    schedules = sqlite_rows(source)

    code, out, _ = copy("--from", str(source), "--to", target, capsys=capsys)

    assert code == 0 and "2 pending (2 of them cron schedules)" in out
    assert postgres_rows(target) == schedules
    there = Worker(target, cron=True)
    try:
        there.sync_cron()
    finally:
        there.close()
    # The declared schedule's row is the copied one (the worker adds only its own built-in pruning job).
    assert postgres_rows(target, "type <> 'remove_old_jobs'") == schedules


def test_new_ids_continue_after_the_highest_the_file_ever_gave_even_a_pruned_one(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Queue(source, check_types=False) as queue:
        kept = queue.enqueue("mail")
        for _ in range(4):
            queue.cancel(queue.enqueue("mail").id)
    with sqlite3.connect(source) as conn:
        conn.execute("DELETE FROM worker_jobs WHERE id > 1")  # pruned: ids 2 to 5 are given, never again

    code, out, _ = copy("--from", str(source), "--to", target, capsys=capsys)

    assert code == 0 and "new ids start after 5" in out
    with Queue(target, check_types=False) as queue:
        assert queue.enqueue("mail").id == 6
    assert [row[0] for row in postgres_rows(target)] == [kept.id, 6]


def test_running_rows_are_refused_unless_asked_to_copy_them_as_pending(
    source: Path, target: str, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    worker.job(name="mail")(lambda ctx: None)
    with Queue(source) as queue:
        job = queue.enqueue("mail", now=at(clock))
    died = Worker(str(source), clock=clock, cron=False)  # claims, then its process is gone (no clean stop)
    died.start_up()
    assert [claimed.id for claimed in died.claim(1)] == [job.id]
    with sqlite3.connect(source) as conn:
        conn.execute("DELETE FROM worker_processes")  # as long after its last heartbeat: no live worker

    code, _, err = copy("--from", str(source), "--to", target, capsys=capsys)
    assert code == worker.EXIT_USAGE
    assert "1 rows of" in err and "--running-as-pending" in err
    assert postgres_rows(target) == []

    code, out, _ = copy("--from", str(source), "--to", target, "--running-as-pending", capsys=capsys)
    assert code == 0 and "1 running, as pending" in out
    (row,) = postgres_rows(target)
    columns = dict(zip(worker.COPIED_COLUMNS.split(", "), row, strict=True))
    assert (columns["id"], columns["status"], columns["attempt"]) == (job.id, "pending", 1)
    assert [columns[name] for name in ("started", "worker", "owner", "lease_until")] == [None] * 4
    died.close()


def test_a_worker_alive_on_the_file_is_refused(source: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Queue(source, check_types=False) as queue:
        queue.enqueue("mail")
    alive = Worker(str(source), cron=False)
    alive.start_up()  # registered, its heartbeat fresh
    try:
        code, _, err = copy("--from", str(source), "--to", target, capsys=capsys)
    finally:
        alive.close()
    assert code == worker.EXIT_USAGE and "a worker is alive on" in err and "stop it before copying" in err
    assert postgres_rows(target) == []


# --- Refusals: nothing written ------------------------------------------------------------


def test_a_database_that_holds_jobs_is_refused_unless_appending(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Queue(source, check_types=False) as queue:
        queue.enqueue("mail", {"n": 1})
        queue.enqueue("mail", {"n": 2})
    with Queue(target, check_types=False) as queue:
        queue.cancel(queue.enqueue("other").id)
        queue.cancel(queue.enqueue("other").id)
        queue.enqueue("other")  # id 3: after the file's two
    before = postgres_rows(target)

    code, _, err = copy("--from", str(source), "--to", target, capsys=capsys)
    assert code == worker.EXIT_USAGE and "already holds 3 jobs: nothing copied" in err
    assert postgres_rows(target) == before

    code, _, err = copy("--from", str(source), "--to", target, "--append", capsys=capsys)
    assert code == worker.EXIT_DATABASE and "job 1 cannot be copied" in err and "duplicate key" in err
    assert postgres_rows(target) == before


def test_appending_into_a_database_whose_ids_are_apart_keeps_both_and_never_moves_ids_back(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Queue(source, check_types=False) as queue:
        queue.enqueue("mail")
    with psycopg.connect(target) as conn:
        conn.execute("SELECT setval(pg_get_serial_sequence('worker_jobs', 'id'), 1000)")
    with Queue(target, check_types=False) as queue:
        queue.enqueue("other")  # id 1001

    code, out, _ = copy("--from", str(source), "--to", target, "--append", capsys=capsys)

    assert code == 0 and "new ids start after 1001" in out
    assert [row[0] for row in postgres_rows(target)] == [1, 1001]


def test_a_row_postgresql_cannot_hold_fails_the_copy_naming_it_and_nothing_is_written(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Queue(source, check_types=False) as queue:
        for _ in range(3):
            queue.enqueue("mail")
    with sqlite3.connect(source) as conn:  # another program's bytes that are not UTF-8
        conn.execute("UPDATE worker_jobs SET error = CAST(x'ff00' AS TEXT) WHERE id = 2")
        conn.execute("UPDATE worker_jobs SET deaths = -1 WHERE id = 3")  # the table here allows it; PostgreSQL's not

    code, _, err = copy("--from", str(source), "--to", target, capsys=capsys)
    assert code == worker.EXIT_DATABASE and "job 2: its error is not valid UTF-8" in err
    assert postgres_rows(target) == []

    with sqlite3.connect(source) as conn:
        conn.execute("UPDATE worker_jobs SET error = NULL WHERE id = 2")
    code, _, err = copy("--from", str(source), "--to", target, capsys=capsys)
    assert code == worker.EXIT_DATABASE and "job 3 cannot be copied" in err and "worker_jobs_deaths_check" in err
    assert postgres_rows(target) == []
    with psycopg.connect(target) as conn:  # the ids were not moved either
        assert conn.execute("SELECT pg_sequence_last_value('worker_jobs_id_seq')").fetchone() == (None,)


def test_a_file_of_an_older_schema_is_upgraded_by_migrate_not_by_a_worker(
    source: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(source) as conn:
        conn.execute("UPDATE worker_schema SET version = version - 1")
    code, _, err = copy("--from", str(source), "--to", target, capsys=capsys)
    assert code == worker.EXIT_DATABASE and f"`worker migrate --db {source}` first" in err
    assert "run the worker" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "postgresql://x/y", "--to", "postgresql://x/z"], "--from is the SQLite file"),
        (["--from", "app.db", "--to", "other.db"], "--to must be a postgresql:// URL"),
    ],
)
def test_copy_goes_from_a_sqlite_file_to_postgresql_only(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = copy(*args, capsys=capsys)
    assert code == worker.EXIT_USAGE and message in err


# --- And then a worker on PostgreSQL carries on ----------------------------------------------

JOBS = """
import worker

@worker.job(max_attempts=3, retry_delay=3600)
def flaky(ctx, fail_until):
    if ctx.attempt < fail_until:
        raise RuntimeError(f"attempt {ctx.attempt}")
    return {"attempt": ctx.attempt, "id": ctx.job.id}
"""


@pytest.mark.slow
def test_a_worker_on_postgresql_runs_the_copied_jobs_and_continues_their_chains(
    source: Path, target: str, tmp_path: Path
) -> None:
    (tmp_path / "copy_jobs.py").write_text(JOBS)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{HERE}", "WORKER_JOBS": "copy_jobs"}

    def command(*args: str, db: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "worker_cli", *args], cwd=HERE, env={**env, "WORKER_DB": db},
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result

    with Queue(source, check_types=False) as queue:
        queue.enqueue("flaky", {"fail_until": 2})
    command("run", "--burst", "--no-cron", db=str(source))  # attempt 1 failed; attempt 2 pending, due in an hour
    with Queue(source, check_types=False) as queue:
        queue.enqueue("flaky", {"fail_until": 1})
    with sqlite3.connect(source) as conn:
        conn.execute("UPDATE worker_jobs SET due = 0 WHERE status = 'pending'")  # as if that hour had passed
    copied = command("copy", "--from", str(source), "--to", target, "--history", db="")
    assert "copied 3 jobs" in copied.stdout

    command("run", "--burst", "--no-cron", db=target)

    statuses = [(row[0], row[3], row[8], row[10]) for row in postgres_rows(target)]  # id, status, attempt, from
    assert statuses == [(1, "failed", 1, None), (2, "succeeded", 2, 1), (3, "succeeded", 1, None)]
    assert [row[13] for row in postgres_rows(target, "status = 'succeeded'")] == [
        '{"attempt":2,"id":2}',
        '{"attempt":1,"id":3}',
    ]
    with Queue(target, check_types=False) as queue:
        assert queue.enqueue("flaky", {"fail_until": 1}).id == 4


@pytest.mark.slow
def test_a_worker_process_holds_two_connections_its_store_and_its_listen(
    target: str, tmp_path: Path, processes: Processes
) -> None:
    """What the README's sizing rests on: cron on (the default), idle, a worker holds no connection beyond those."""
    (tmp_path / "copy_jobs.py").write_text(JOBS)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{HERE}", "WORKER_JOBS": "copy_jobs", "WORKER_DB": target}
    started = processes.start("run", "--concurrency", "4", name="worker", env=env)
    wait_for(lambda: " started: " in started.log(), 30, "the worker to start")
    with psycopg.connect(target, autocommit=True) as conn:
        name = target.rsplit("/", 1)[1]
        sql = "SELECT query FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY query"
        wait_for(lambda: ("LISTEN worker_jobs",) in conn.execute(sql, (name,)).fetchall(), 10, "the LISTEN")
        assert len(conn.execute(sql, (name,)).fetchall()) == 2
    assert started.stop() == 0
