"""Recurring (cron) jobs, tags that replace or deduplicate, and retention of old rows."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import FakeClock, at, rows, wait_for
from worker import JobContext, Queue, Worker

# On every store; a test that reaches into SQLite itself (its file, its locks) is SQLite's alone.
pytestmark = pytest.mark.stores("sqlite", "postgres")
SQLITE_ONLY = pytest.mark.stores("sqlite")

DAY = 86_400_000
# 2027-01-15 12:00:00 UTC: a round minute, in winter (Paris is UTC+1).
NOON = datetime(2027, 1, 15, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOON)


@pytest.fixture
def ran() -> list[int]:
    """The cron slots the `tick` job ran for, in order."""
    return []


@pytest.fixture
def tick(ran: list[int]) -> None:
    @worker.job
    def tick(ctx: JobContext) -> int:
        ran.append(ctx.job.cron_slot or 0)
        return len(ran)


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


# --- Choosing the next slot ----------------------------------------------------------


def test_five_field_expression_slots() -> None:
    assert worker.next_cron_slot("*/5 * * * *", None, ms("2027-01-15T12:03:00+00:00")) == ms(
        "2027-01-15T12:05:00+00:00"
    )
    assert worker.next_cron_slot("*/5 * * * *", None, ms("2027-01-15T12:05:00+00:00")) == ms(
        "2027-01-15T12:10:00+00:00"
    )
    assert worker.next_cron_slot("0 9 * * 1", None, ms("2027-01-15T12:00:00+00:00")) == ms("2027-01-18T09:00:00+00:00")


def test_six_fields_read_seconds_first() -> None:
    start = ms("2027-01-15T12:00:00+00:00")
    assert worker.next_cron_slot("*/3 * * * * *", None, start) == start + 3_000
    assert worker.next_cron_slot("30 0 12 * * *", None, start) == start + 30_000


def test_timezone_follows_daylight_saving() -> None:
    winter = worker.next_cron_slot("0 9 * * *", "Europe/Paris", ms("2027-01-15T00:00:00+00:00"))
    summer = worker.next_cron_slot("0 9 * * *", "Europe/Paris", ms("2027-07-15T00:00:00+00:00"))
    assert winter == ms("2027-01-15T08:00:00+00:00")
    assert summer == ms("2027-07-15T07:00:00+00:00")


def test_next_due_counts_from_the_previous_slot_not_the_end_of_the_run() -> None:
    slot = ms("2027-01-15T12:00:00+00:00")
    finished_late_in_the_minute = slot + 50_000
    assert worker.next_cron_due("* * * * *", None, slot, finished_late_in_the_minute) == (slot + 60_000, False)


def test_next_due_skips_slots_already_past() -> None:
    slot = ms("2027-01-15T12:00:00+00:00")
    an_hour_later = slot + 3_600_000 + 10_000
    assert worker.next_cron_due("* * * * *", None, slot, an_hour_later) == (slot + 3_660_000, True)


@pytest.mark.parametrize(
    ("expression", "zone"),
    [("61 * * * *", None), ("every minute", None), ("* * *", None), ("* * * * * * *", None), ("* * * * *", "Mars")],
)
def test_invalid_expression_is_refused_naming_it(expression: str, zone: str | None) -> None:
    with pytest.raises(ValueError, match="invalid cron"):
        worker.check_cron(expression, zone)


def test_invalid_declared_cron_names_the_job_and_expression() -> None:
    with pytest.raises(worker.ConfigError, match=r"job 'report'.*'61 \* \* \* \*'"):

        @worker.job(cron="61 * * * *")
        def report(ctx: JobContext) -> None:
            pass


def test_invalid_scheduled_cron_names_the_job_and_expression(queue: Queue, db: str, tick: None) -> None:
    with pytest.raises(ValueError, match=r"cannot schedule 'tick'.*'\* \* \*'"):
        queue.schedule_cron("tick", "* * *")
    assert rows(db) == []


# --- Recurring runs -------------------------------------------------------------------


def test_scheduled_cron_job_runs_each_slot_as_its_own_row(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ran: list[int], tick: None
) -> None:
    first = queue.schedule_cron("tick", "* * * * *", now=at(clock, 1))
    assert (first.tag, first.cron_schedule, first.due) == ("cron:tick", "* * * * *", at(clock, 60))
    w = make_worker()
    for _ in range(3):
        clock.advance(60)
        assert w.work() == 1
    assert ran == [at(clock, -120), at(clock, -60), at(clock, 0)]
    chain = rows(db)
    assert [r["status"] for r in chain] == ["succeeded"] * 3 + ["pending"]
    assert [r["rescheduled_from_job"] for r in chain] == [None, chain[0]["id"], chain[1]["id"], chain[2]["id"]]
    assert chain[-1]["due"] == at(clock, 60)


def test_missed_slots_are_skipped_not_run_in_a_burst(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ran: list[int], tick: None
) -> None:
    queue.schedule_cron("tick", "* * * * *", now=at(clock, 1))
    clock.advance(60 + 3600 + 30)  # the worker was down for an hour
    w = make_worker()
    assert w.work() == 1, "the overdue run runs once"
    assert w.work() == 0, "and the missed slots do not follow"
    assert rows(db)[-1]["due"] == at(clock, 30), "the next run is the next slot from now"


def test_failed_run_still_schedules_the_next_one(queue: Queue, make_worker: Any, clock: FakeClock, db: str) -> None:
    @worker.job
    def broken(ctx: JobContext) -> None:
        raise RuntimeError("always")

    queue.schedule_cron("broken", "* * * * *", now=at(clock, 1))
    clock.advance(60)
    make_worker().work()
    failed, following = rows(db)
    assert failed["status"] == "failed"
    assert (following["status"], following["due"]) == ("pending", at(clock, 60))


def test_cron_job_with_retries_schedules_the_next_slot_after_the_chain_ends(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str
) -> None:
    @worker.job(max_attempts=3, retry_delay=10, backoff=1)
    def shaky(ctx: JobContext) -> None:
        raise RuntimeError(f"attempt {ctx.attempt}")

    queue.schedule_cron("shaky", "* * * * *", now=at(clock, 1))
    slot = at(clock, 60)
    w = make_worker()
    clock.advance(60)
    w.work()
    assert [r["status"] for r in rows(db)] == ["failed", "pending"], "a retry, not the next slot"
    clock.advance(10)
    w.work()
    clock.advance(10)
    w.work()
    chain = rows(db)
    assert [r["attempt"] for r in chain] == [1, 2, 3, 1]
    assert [r["cron_slot"] for r in chain] == [slot, slot, slot, slot + 60_000]
    assert chain[-1]["rescheduled_from_job"] == chain[2]["id"]


def test_clock_stepped_back_never_runs_a_slot_twice(
    queue: Queue, make_worker: Any, clock: FakeClock, ran: list[int], tick: None
) -> None:
    queue.schedule_cron("tick", "* * * * *", now=at(clock, 1))
    w = make_worker()
    for _ in range(3):
        clock.advance(60)
        w.work()
    clock.advance(-3600)
    for _ in range(70):
        clock.advance(60)
        w.work()
    assert len(ran) == len(set(ran)), "no slot ran twice"
    assert ran == sorted(ran)


def test_declared_cron_job_gets_exactly_one_pending_row(make_worker: Any, clock: FakeClock, db: str) -> None:
    @worker.job(cron="*/5 * * * *")
    def report(ctx: JobContext) -> None:
        pass

    for _ in range(3):
        make_worker(cron=True).start_up()
    cron_rows = rows(db, "type = 'report'")
    assert len(cron_rows) == 1
    assert (cron_rows[0]["tag"], cron_rows[0]["due"]) == ("cron:report", at(clock)), "noon is a slot: due now"


def test_changed_declared_expression_replaces_the_pending_row(make_worker: Any, db: str) -> None:
    @worker.job(cron="0 * * * *")
    def report(ctx: JobContext) -> None:
        pass

    make_worker(cron=True).start_up()
    worker.REGISTRY["report"] = worker.dataclasses.replace(worker.REGISTRY["report"], cron="*/5 * * * *")
    make_worker(cron=True).start_up()
    old, new = rows(db, "type = 'report'")
    assert (old["status"], old["cron_schedule"]) == ("cancelled", "0 * * * *")
    assert (new["status"], new["cron_schedule"]) == ("pending", "*/5 * * * *")


def test_worker_without_cron_creates_no_rows(make_worker: Any, db: str) -> None:
    @worker.job(cron="* * * * *")
    def report(ctx: JobContext) -> None:
        pass

    make_worker(cron=False).start_up()
    assert rows(db) == []


def test_built_in_pruning_job_is_hourly() -> None:
    assert worker.REGISTRY["remove_old_jobs"].cron == "0 * * * *"


def test_unschedule_cancels_the_pending_run(queue: Queue, db: str, tick: None) -> None:
    queue.schedule_cron("tick", "* * * * *")
    assert queue.unschedule_cron("tick")
    assert not queue.unschedule_cron("tick")
    assert [r["status"] for r in rows(db)] == ["cancelled"]


JOBS_WITH_CRON = """
    from worker import job

    @job(cron="* * * * * *")  # every second
    def every_second(ctx):
        return ctx.job.cron_slot
"""


@pytest.mark.slow
def test_three_workers_run_each_one_second_slot_exactly_once(tmp_path: Path, db: str) -> None:
    jobs_file = tmp_path / "cron_jobs.py"
    jobs_file.write_text(textwrap.dedent(JOBS_WITH_CRON))
    command = [sys.executable, "-m", "worker_cli", "run", "--db", db, "--jobs", str(jobs_file)]
    Queue(db)  # the schema, before three workers race to create it
    env = {**os.environ, "WORKER_LOG_LEVEL": "WARNING"}
    workers = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE) for _ in range(3)]
    try:
        # Real time must pass: four one-second slots run, however long the three took to start.
        ran = "type = 'every_second' AND status = 'succeeded'"
        wait_for(lambda: len(rows(db, ran)) >= 4, 30, "four one-second slots to run")
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else ""
    runs = rows(db, "type = 'every_second' AND status != 'pending'")
    slots = [r["cron_slot"] for r in runs]
    assert len(slots) >= 3
    assert len(slots) == len(set(slots)), "no slot ran twice"
    assert all(r["status"] == "succeeded" for r in runs)
    assert sorted(slots) == list(range(min(slots), max(slots) + 1, 1000)), "no slot missing after the first"
    assert len(rows(db, "type = 'every_second' AND status = 'pending'")) == 1


# --- Tags --------------------------------------------------------------------------------


def test_tag_replace_cancels_the_pending_row_and_keeps_it(queue: Queue, db: str, tick: None) -> None:
    old = queue.enqueue("tick", tag="nightly")
    new = queue.enqueue("tick", tag="nightly", delay=5)
    cancelled, pending = rows(db)
    assert cancelled["id"] == old.id and cancelled["status"] == "cancelled"
    assert cancelled["error"] == "replaced by a newer job with tag 'nightly'"
    assert pending["id"] == new.id and pending["status"] == "pending"


def test_tag_ignore_returns_the_existing_pending_row(queue: Queue, db: str, tick: None) -> None:
    first = queue.enqueue("tick", tag="once")
    again = queue.enqueue("tick", tag="once", on_conflict="ignore", priority=9)
    assert again == first
    assert len(rows(db)) == 1


def test_tag_never_cancels_a_running_row(queue: Queue, make_worker: Any, db: str, tick: None) -> None:
    running = queue.enqueue("tick", tag="t", now=0)
    make_worker().claim(1)
    queue.enqueue("tick", tag="t")
    assert [r["status"] for r in rows(db)] == ["running", "pending"]
    assert rows(db)[0]["id"] == running.id


@SQLITE_ONLY
def test_table_refuses_a_second_pending_row_with_a_tag_from_any_writer(queue: Queue, db: str, tick: None) -> None:
    queue.enqueue("tick", tag="unique")
    with sqlite3.connect(db) as conn, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute("INSERT INTO worker_jobs (type, tag) VALUES ('tick', 'unique')")
    assert len(rows(db)) == 1


# --- Retention ------------------------------------------------------------------------------


def test_finished_rows_get_remove_at_from_their_keep(queue: Queue, make_worker: Any, clock: FakeClock, db: str) -> None:
    @worker.job
    def fine(ctx: JobContext) -> None:
        pass

    @worker.job(keep=60)
    def brief(ctx: JobContext) -> None:
        pass

    @worker.job
    def bad(ctx: JobContext) -> None:
        raise ValueError

    for kind in ("fine", "brief", "bad"):
        queue.enqueue(kind, now=at(clock))
    queue.enqueue("fine", keep=5, now=at(clock))
    queue.enqueue("fine", persistent=True, now=at(clock))
    make_worker(concurrency=10).work()
    kept = {r["id"]: r["remove_at"] - r["finished"] if r["remove_at"] else None for r in rows(db)}
    assert list(kept.values()) == [7 * DAY, 60_000, 30 * DAY, 5_000, None]


def test_keep_defaults_can_be_set_per_worker(queue: Queue, make_worker: Any, clock: FakeClock, db: str) -> None:
    @worker.job
    def fine(ctx: JobContext) -> None:
        pass

    queue.enqueue("fine", now=at(clock))
    make_worker(keep_succeeded=3600).work()
    assert rows(db)[0]["remove_at"] == at(clock) + 3_600_000


def test_keep_from_the_environment(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    monkeypatch.setenv("WORKER_KEEP_SUCCEEDED", "60")
    monkeypatch.setenv("WORKER_KEEP_FAILED", "120")
    w = Worker(db)
    assert (w.keep_succeeded_ms, w.keep_failed_ms) == (60_000, 120_000)
    monkeypatch.setenv("WORKER_KEEP_FAILED", "soon")
    with pytest.raises(worker.ConfigError, match="WORKER_KEEP_FAILED"):
        Worker(db)


def test_prune_removes_expired_finished_rows_only(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, tick: None
) -> None:
    @worker.job
    def bad(ctx: JobContext) -> None:
        raise ValueError

    queue.enqueue("tick", keep=10, now=at(clock))
    queue.enqueue("bad", keep=10, now=at(clock))
    queue.enqueue("tick", keep=10, persistent=True, now=at(clock))
    make_worker(concurrency=3).work()
    queue.enqueue("tick", keep=10, now=at(clock))  # stays pending
    running = queue.enqueue("tick", keep=10, now=at(clock))
    make_worker(concurrency=1).claim(1, now=at(clock))  # claims the oldest pending
    clock.advance(11)

    assert queue.prune(dry_run=True, now=at(clock)) == 2
    assert queue.prune(now=at(clock)) == 2
    assert [(r["status"], r["persistent"]) for r in rows(db)] == [("succeeded", 1), ("running", 0), ("pending", 0)]
    assert queue.enqueue("tick").id == running.id + 1, "ids are never reused after pruning"


@SQLITE_ONLY
@pytest.mark.slow
def test_big_prune_holds_the_write_lock_briefly_while_a_worker_keeps_claiming(
    queue: Queue, db: str, tick: None
) -> None:
    long_ago = 1_000_000
    with sqlite3.connect(db) as conn:
        conn.execute(
            """
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)
            INSERT INTO worker_jobs (type, status, due, finished, result, remove_at)
            SELECT 'tick', 'succeeded', :t, :t, 'null', :t FROM n
            """,
            {"t": long_ago},
        )
    pruned: list[int] = []
    pruner = threading.Thread(target=lambda: pruned.append(Queue(db).prune()))

    # A prober takes the write lock over and over and records how long it waited,
    # polling every 0.2 ms rather than with SQLite's coarse busy-handler sleeps.
    probe = sqlite3.connect(db, timeout=0, isolation_level=None)
    waits: list[float] = []

    def take_write_lock() -> None:
        while True:
            try:
                probe.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError:
                time.sleep(0.0002)

    w = Worker(db, cron=False, concurrency=1)
    claimed_during_prune = 0
    pruner.start()
    while pruner.is_alive():
        queue.enqueue("tick")
        claimed_during_prune += w.work()
        started = time.perf_counter()
        take_write_lock()
        waits.append(time.perf_counter() - started)
        probe.execute("COMMIT")
    pruner.join()
    w.close()
    assert pruned == [200_000]
    assert max(waits) < 0.1, f"the longest wait for the write lock was {max(waits) * 1000:.0f} ms"
    assert claimed_during_prune > 0
    print(f"\nprune of 200,000 rows: {len(waits)} probes, longest lock wait {max(waits) * 1000:.1f} ms")


@SQLITE_ONLY
def test_prune_command_prints_how_many(queue: Queue, db: str, tick: None) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO worker_jobs (type, status, finished, remove_at) VALUES ('tick', 'failed', 1, 1)")
    dry = subprocess.run(
        [sys.executable, "-m", "worker_cli", "prune", "--db", db, "--dry-run"], capture_output=True, text=True
    )
    assert dry.stdout == "would remove 1 rows\n"
    done = subprocess.run([sys.executable, "-m", "worker_cli", "prune", "--db", db], capture_output=True, text=True)
    assert done.stdout == "removed 1 rows\n"
    assert rows(db) == []


def test_cron_through_the_cli(db: str) -> None:
    scheduled = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "enqueue",
            "hello",
            "--db",
            db,
            "--cron",
            "0 9 * * *",
            "--timezone",
            "Europe/Paris",
        ],
        capture_output=True,
        text=True,
    )
    assert scheduled.returncode == 0, scheduled.stderr
    (row,) = rows(db)
    assert (row["tag"], row["cron_schedule"], row["cron_timezone"]) == ("cron:hello", "0 9 * * *", "Europe/Paris")
    bad = subprocess.run(
        [sys.executable, "-m", "worker_cli", "enqueue", "hello", "--db", db, "--cron", "99 * * * *"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "invalid cron expression '99 * * * *'" in bad.stderr
