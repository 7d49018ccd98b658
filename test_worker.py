"""The worker's specification, as tests.

Real database files under tmp_path (WAL needs a file); time is a fake clock
wherever time has to pass.  Tests that need real processes (several workers,
kill -9, signals) live in test_processes.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apsw
import pytest

import worker
import worker_cli
from conftest import FakeClock, NoJitter, at, rows, wait_for
from worker import Job, JobContext, Queue, Worker

# The engine's tests run on every store; those that reach into SQLite itself (the
# file through sqlite3 or apsw, its query plans, its schema history, its locks)
# are SQLite's alone.  test_store_contract.py and test_postgres_*.py hold
# PostgreSQL to the same meanings.
pytestmark = pytest.mark.stores("sqlite", "postgres")
SQLITE_ONLY = pytest.mark.stores("sqlite")

HERE = Path(__file__).parent


@pytest.fixture
def ok_job() -> None:
    @worker.job
    def add(ctx: JobContext, a: int, b: int) -> int:
        return a + b


@pytest.fixture
def long_job() -> Iterator[tuple[threading.Event, threading.Event]]:
    """A job type ``long`` that sets ``started`` and runs until the test sets ``release``."""
    started, release = threading.Event(), threading.Event()

    @worker.job
    def long(ctx: JobContext) -> None:
        started.set()
        release.wait(10)

    yield started, release
    release.set()  # never leave a job thread waiting, whatever the test did


@pytest.fixture
def failing_job() -> None:
    @worker.job(max_attempts=3, retry_delay=10, backoff=3)
    def explode(ctx: JobContext) -> None:
        raise RuntimeError(f"boom on attempt {ctx.attempt}")


# --- Running jobs ------------------------------------------------------------


def test_enqueued_job_runs_and_stores_its_json_result(db: str, queue: Queue) -> None:
    @worker.job
    def describe(ctx: JobContext, name: str) -> dict[str, Any]:
        return {"hello": name, "id": ctx.job.id, "attempt": ctx.attempt}

    enqueued = queue.enqueue("describe", {"name": "ada"})
    Worker(db, cron=False, burst=True, concurrency=2).run()

    finished = queue.get(enqueued.id)
    assert finished is not None
    assert finished.status == "succeeded"
    assert finished.result == {"hello": "ada", "id": enqueued.id, "attempt": 1}
    assert finished.started is not None and finished.finished is not None
    assert finished.finished >= finished.started
    assert finished.error is None


def test_none_is_a_valid_result(queue: Queue, make_worker: Any, db: str) -> None:
    @worker.job
    def nothing(ctx: JobContext) -> None:
        return None

    enqueued = queue.enqueue("nothing")
    make_worker().work()
    assert rows(db)[0]["result"] == "null"
    assert queue.get(enqueued.id).status == "succeeded"  # type: ignore[union-attr]


def test_failing_job_stores_traceback_and_schedules_retry_that_points_back(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, failing_job: None
) -> None:
    first = queue.enqueue("explode", now=at(clock))
    make_worker().work()

    failed, retry = rows(db)
    assert failed["id"] == first.id
    assert failed["status"] == "failed"
    assert failed["error"].startswith("RuntimeError: boom on attempt 1")
    assert "Traceback (most recent call last)" in failed["error"]
    assert failed["result"] is None
    assert retry["status"] == "pending"
    assert retry["attempt"] == 2
    assert retry["rescheduled_from_job"] == first.id
    assert retry["due"] == at(clock, 10)


def test_retries_back_off_and_stop_at_max_attempts(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, failing_job: None
) -> None:
    queue.enqueue("explode", now=at(clock))
    w = make_worker()
    w.work()
    assert w.work() == 0, "the retry is not due yet"
    clock.advance(10)
    assert w.work() == 1  # attempt 2, 10 s after attempt 1
    clock.advance(29.9)
    assert w.work() == 0
    clock.advance(0.1)
    assert w.work() == 1  # attempt 3, 10 * 3 = 30 s after attempt 2
    clock.advance(3600)
    assert w.work() == 0

    chain = rows(db)
    assert [r["attempt"] for r in chain] == [1, 2, 3]
    assert [r["status"] for r in chain] == ["failed"] * 3
    assert [r["rescheduled_from_job"] for r in chain] == [None, chain[0]["id"], chain[1]["id"]]


def test_retry_delay_has_ten_percent_jitter_and_an_hour_cap(db: str) -> None:
    w = Worker(db, rng=random.Random(7))
    delays = {w.retry_delay_ms(Job(id=1, type="x", data={}, attempt=1)) for _ in range(200)}
    assert min(delays) >= 9_000 and max(delays) <= 11_000
    assert len(delays) > 50, "jitter spreads retries out"

    steady = Worker(db, rng=NoJitter())
    late = Job(id=1, type="x", data={}, attempt=30, retry_delay_ms=10_000, backoff=2.0)
    assert steady.retry_delay_ms(late) == 3_600_000


def test_bare_job_does_not_retry(queue: Queue, make_worker: Any, db: str) -> None:
    @worker.job
    def once(ctx: JobContext) -> None:
        raise ValueError("no")

    queue.enqueue("once")
    make_worker().work()
    assert [r["status"] for r in rows(db)] == ["failed"]


def test_row_policy_overrides_the_job_types(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, failing_job: None
) -> None:
    queue.enqueue("explode", max_attempts=2, retry_delay=timedelta(seconds=1), backoff=1, now=at(clock))
    w = make_worker()
    for _ in range(5):
        w.work()
        clock.advance(1)
    chain = rows(db)
    assert [r["attempt"] for r in chain] == [1, 2]
    assert chain[1]["due"] - chain[0]["finished"] == 1_000


@SQLITE_ONLY
def test_row_from_another_program_gets_the_job_types_policy(
    queue: Queue, make_worker: Any, db: str, failing_job: None
) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO worker_jobs (type) VALUES ('explode')")
    w = make_worker(clock=time.time)
    w.work()
    failed, retry = rows(db)
    assert failed["max_attempts"] is None, "the row keeps NULL: the job type decides"
    assert retry["attempt"] == 2


@SQLITE_ONLY
def test_a_row_of_a_type_this_worker_does_not_know_waits_and_the_others_run(
    queue: Queue, make_worker: Any, db: str, ok_job: None
) -> None:
    """A rolling deploy: the new web code enqueues a type only the new workers know."""
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO worker_jobs (type, data, priority) VALUES ('no_such_job', '{}', 10)")
    good = queue.enqueue("add", {"a": 1, "b": 2})
    runner = make_worker(clock=time.time)
    assert runner.work() == 1
    assert runner.work() == 0  # and it does not spin on the unknown row: nothing of its own is due
    unknown, done = rows(db)
    assert (unknown["status"], unknown["attempt"], unknown["error"]) == ("pending", 1, None)
    assert done["id"] == good.id and done["result"] == "3"


@pytest.mark.parametrize(
    ("returned", "complaint"),
    [({1, 2}, "not JSON serializable"), (float("nan"), "Out of range float"), ({"x": object()}, "not JSON")],
)
def test_result_that_is_not_json_fails_the_job_clearly(
    queue: Queue, make_worker: Any, db: str, returned: Any, complaint: str
) -> None:
    @worker.job
    def odd(ctx: JobContext) -> Any:
        return returned

    queue.enqueue("odd")
    make_worker().work()
    (row,) = rows(db)
    assert row["status"] == "failed"
    assert row["error"].startswith("result is not JSON-serialisable")
    assert complaint in row["error"]


def test_job_that_calls_sys_exit_fails_without_stopping_the_worker(queue: Queue, make_worker: Any, db: str) -> None:
    @worker.job
    def quitter(ctx: JobContext) -> None:
        sys.exit(3)

    queue.enqueue("quitter")
    make_worker().work()
    assert rows(db)[0]["error"].startswith("SystemExit: 3")


def test_due_jobs_run_by_priority_then_due_time_then_id(queue: Queue, make_worker: Any, clock: FakeClock) -> None:
    ran: list[str] = []

    @worker.job
    def note(ctx: JobContext, name: str) -> None:
        ran.append(name)

    queue.enqueue("note", {"name": "old"}, now=at(clock, -20))
    queue.enqueue("note", {"name": "later"}, now=at(clock, -10))
    queue.enqueue("note", {"name": "urgent"}, priority=5, now=at(clock, -5))
    queue.enqueue("note", {"name": "future"}, delay=60, now=at(clock))
    w = make_worker(concurrency=1)
    while w.work():
        pass
    assert ran == ["urgent", "old", "later"]
    clock.advance(60)
    w.work()
    assert ran[-1] == "future"


def test_worker_takes_only_its_queues(queue: Queue, make_worker: Any, db: str, ok_job: None) -> None:
    mail = queue.enqueue("add", {"a": 1, "b": 1}, queue="mail")
    other = queue.enqueue("add", {"a": 2, "b": 2})
    make_worker(queues=["mail"], clock=time.time).work()
    assert queue.get(mail.id).status == "succeeded"  # type: ignore[union-attr]
    assert queue.get(other.id).status == "pending"  # type: ignore[union-attr]


def test_job_types_queue_is_the_default_queue_for_its_rows(queue: Queue) -> None:
    @worker.job(queue="mail")
    def send(ctx: JobContext) -> None:
        pass

    assert queue.enqueue("send").queue == "mail"
    assert queue.enqueue("send", queue="bulk").queue == "bulk"


def test_burst_run_does_not_wait_for_retries_due_later(queue: Queue, db: str, failing_job: None) -> None:
    queue.enqueue("explode")
    started = time.monotonic()
    Worker(db, cron=False, burst=True).run()
    assert time.monotonic() - started < 5
    assert [r["status"] for r in rows(db)] == ["failed", "pending"]


def test_job_longer_than_its_timeout_fails_and_frees_its_slot(queue: Queue, db: str) -> None:
    release = threading.Event()

    @worker.job(timeout=0.2)
    def hang(ctx: JobContext) -> str:
        release.wait(10)
        return "too late"

    @worker.job
    def quick(ctx: JobContext) -> str:
        return "done"

    hung = queue.enqueue("hang")
    after = queue.enqueue("quick", delay=0.05)
    try:
        Worker(db, cron=False, concurrency=1, burst=True).run()
    finally:
        release.set()
    row = queue.get(hung.id)
    assert row is not None and row.status == "failed"
    assert row.error == "timed out after 0.2 s"
    assert queue.get(after.id).status == "succeeded"  # type: ignore[union-attr]


@SQLITE_ONLY
def test_without_prefetch_at_concurrency_1_each_job_is_recorded_before_the_next_starts(queue: Queue, db: str) -> None:
    @worker.job
    def look_back(ctx: JobContext) -> str | None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            before = conn.execute("SELECT status FROM worker_jobs WHERE id = ?", (ctx.id - 1,)).fetchone()
        return before and before[0]

    made = queue.enqueue_many([("look_back", None)] * 30)
    Worker(db, cron=False, concurrency=1, burst=True, prefetch=0).run()
    assert [queue.get(job.id).result for job in made] == [None] + ["succeeded"] * 29  # type: ignore[union-attr]


# --- Prefetch: claiming ahead of the free threads while jobs are short ----------


def claim_sizes(w: Worker) -> list[int]:
    """Spy on a worker's claims: how many jobs each one took (one claim per transaction)."""
    sizes: list[int] = []
    claim = w._claim

    def counted(limit: int, now: int) -> list[Job]:
        claimed = claim(limit, now)
        sizes.append(len(claimed))
        return claimed

    w._claim = counted  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("concurrency", [1, 4])
def test_while_jobs_are_short_a_claim_takes_up_to_prefetch_jobs_beyond_the_free_threads(
    queue: Queue, db: str, concurrency: int
) -> None:
    @worker.job
    def quick(ctx: JobContext) -> int:
        return ctx.id

    made = queue.enqueue_many([("quick", None)] * 200)
    w = Worker(db, cron=False, concurrency=concurrency, burst=True, prefetch=8)
    sizes = claim_sizes(w)
    w.run()
    assert [queue.get(job.id).result for job in made] == [job.id for job in made]  # type: ignore[union-attr]
    assert max(sizes) > concurrency, "claimed ahead of the free threads"
    assert max(sizes) <= concurrency + 8
    assert sizes[0] <= concurrency, "nothing is claimed ahead before jobs have shown they are short"
    assert len(sizes) < 200 / 4


def test_jobs_that_free_a_thread_less_often_than_half_the_patience_claim_nothing_ahead(queue: Queue, db: str) -> None:
    @worker.job
    def slow(ctx: JobContext) -> None:
        time.sleep(worker.PREFETCH_PATIENCE)  # the job's own work: one thread frees up this rarely

    queue.enqueue_many([("slow", None)] * 10)
    w = Worker(db, cron=False, concurrency=1, burst=True, prefetch=8)
    sizes = claim_sizes(w)
    w.run()
    assert sizes == [1] * 10 + [0]


def test_jobs_claimed_ahead_behind_a_long_job_are_given_back_for_other_workers(
    queue: Queue, db: str, long_job: tuple[threading.Event, threading.Event]
) -> None:
    started, release = long_job

    @worker.job
    def quick(ctx: JobContext) -> None:
        pass

    first, _, *behind = queue.enqueue_many([("quick", None), ("long", None)] + [("quick", None)] * 3)
    w = Worker(db, cron=False, concurrency=1, prefetch=8)
    loop = threading.Thread(target=w.run)
    loop.start()
    try:
        assert started.wait(10)
        # The claim that took the long job took the next one ahead, which waited
        # behind it; within PREFETCH_PATIENCE it is pending again, and another
        # worker runs all three while the long job still runs.
        wait_for(lambda: len(rows(db, "status = 'pending'")) == 3, 5, "the job claimed ahead to be given back")
        other = Worker(db, cron=False, concurrency=4)
        other.work()
        assert [queue.get(job.id).status for job in behind] == ["succeeded"] * 3  # type: ignore[union-attr]
        assert {queue.get(job.id).worker for job in behind} == {other.name}  # type: ignore[union-attr]
        assert queue.get(first.id).status == "succeeded"  # type: ignore[union-attr]
    finally:
        release.set()
        w.stop()
        loop.join(10)
    assert not loop.is_alive()
    assert [r["status"] for r in rows(db)] == ["succeeded"] * 5


def test_a_timeout_counts_from_the_jobs_start_not_from_its_claim_ahead(
    queue: Queue, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "PREFETCH_PATIENCE", 10.0)  # the timed job waits behind the slow one

    @worker.job
    def quick(ctx: JobContext) -> None:
        pass

    @worker.job
    def slow(ctx: JobContext) -> None:
        time.sleep(0.5)  # the job's own work: longer than the next job's timeout

    @worker.job(timeout=0.3)
    def timed(ctx: JobContext) -> str:
        return "in time"

    made = queue.enqueue_many([("quick", None), ("slow", None), ("timed", None)])
    w = Worker(db, cron=False, concurrency=1, burst=True, prefetch=8)
    sizes = claim_sizes(w)
    w.run()
    assert sizes[:2] == [1, 2], "the timed job was claimed ahead, with the slow one"
    assert [queue.get(job.id).status for job in made] == ["succeeded"] * 3  # type: ignore[union-attr]
    slow_row, timed_row = queue.get(made[1].id), queue.get(made[2].id)
    assert slow_row is not None and timed_row is not None
    assert timed_row.result == "in time"
    assert timed_row.started - slow_row.started >= 500, "its row's started is when it ran, not its claim"  # type: ignore[operator]
    assert timed_row.finished >= timed_row.started  # type: ignore[operator]


def test_stop_gives_back_jobs_claimed_ahead_at_once_without_running_them(
    queue: Queue, db: str, monkeypatch: pytest.MonkeyPatch, long_job: tuple[threading.Event, threading.Event]
) -> None:
    monkeypatch.setattr(worker, "PREFETCH_PATIENCE", 10.0)
    started, release = long_job
    ran: list[int] = []

    @worker.job
    def quick(ctx: JobContext) -> None:
        ran.append(ctx.id)

    first, held, ahead = queue.enqueue_many([("quick", None), ("long", None), ("quick", None)])
    w = Worker(db, cron=False, concurrency=1, prefetch=8)
    loop = threading.Thread(target=w.run)
    loop.start()
    try:
        assert started.wait(10)
        assert queue.get(ahead.id).status == "running", "claimed ahead, waiting behind the long job"  # type: ignore[union-attr]
        w.stop()
        wait_for(lambda: queue.get(ahead.id).status == "pending", 5, "the job claimed ahead to be given back")  # type: ignore[union-attr]
    finally:
        release.set()
        loop.join(10)
    assert not loop.is_alive()
    assert ran == [first.id], "the job given back never ran here"
    assert [queue.get(job.id).status for job in (first, held, ahead)] == ["succeeded", "succeeded", "pending"]  # type: ignore[union-attr]


def test_a_bug_met_in_a_job_threads_step_ends_run_as_it_would_in_the_main_thread(
    queue: Queue, db: str, ok_job: None
) -> None:
    made = queue.enqueue_many([("add", {"a": 1, "b": 1})] * 3)
    # prefetch=0: every job is then the thread's only one, and its end a step of the thread's own
    w = Worker(db, cron=False, concurrency=1, burst=True, prefetch=0)
    record = w._recording.record

    def record_but_not_in_a_job_thread(outcomes: list[worker.Outcome], now: int) -> Any:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a bug in the loop")
        return record(outcomes, now)

    w._recording.record = record_but_not_in_a_job_thread  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        w.run()
    statuses = [queue.get(job.id).status for job in made]  # type: ignore[union-attr]
    assert statuses[0] == "succeeded", "the outcome in hand was recorded at shutdown"
    assert "running" not in statuses and statuses[-1] == "pending", statuses


def test_at_concurrency_1_stop_gives_back_the_running_job_after_the_shutdown_timeout(
    queue: Queue, db: str, long_job: tuple[threading.Event, threading.Event]
) -> None:
    started, release = long_job

    @worker.job
    def quick(ctx: JobContext) -> None:
        pass

    first, long, never = queue.enqueue_many([("quick", None), ("long", None), ("quick", {"n": 2})])
    w = Worker(db, cron=False, concurrency=1, shutdown_timeout=0.3)
    loop = threading.Thread(target=w.run)
    loop.start()
    try:
        assert started.wait(10)
        w.stop()
        loop.join(10)
        assert not loop.is_alive()
    finally:
        release.set()
    statuses = {job.id: queue.get(job.id).status for job in (first, long, never)}  # type: ignore[union-attr]
    assert statuses == {first.id: "succeeded", long.id: "pending", never.id: "pending"}


def test_a_job_stopped_at_shutdown_whose_tag_a_newer_job_holds_is_cancelled_and_the_rest_are_given_back(
    queue: Queue, db: str, long_job: tuple[threading.Event, threading.Event]
) -> None:
    """One tagged row costs only itself: the others running beside it are given back in the same step."""
    started, release = long_job

    @worker.job
    def tagged(ctx: JobContext) -> None:
        release.wait(10)

    report = queue.enqueue("tagged", tag="report")
    long = queue.enqueue("long")
    w = Worker(db, cron=False, concurrency=2, shutdown_timeout=0.3)
    loop = threading.Thread(target=w.run)
    loop.start()
    try:
        assert started.wait(10)
        wait_for(lambda: queue.get(report.id).status == "running", 5, "the tagged job to run")  # type: ignore[union-attr]
        newer = queue.enqueue("tagged", tag="report")  # the app asks again meanwhile: the tag's newer job
        w.stop()
        loop.join(10)
        assert not loop.is_alive()
    finally:
        release.set()
    cancelled = queue.get(report.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.error == "not run to its end: a newer pending job holds its tag 'report' and runs in its place"
    assert [queue.get(job.id).status for job in (newer, long)] == ["pending", "pending"]  # type: ignore[union-attr]


# --- Leases: a worker that dies or stalls ---------------------------------------


def test_expired_lease_fails_the_row_and_retries_it_at_once(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ok_job: None
) -> None:
    lost = queue.enqueue("add", {"a": 1, "b": 1}, now=at(clock))
    dead = make_worker(lease=60)
    (claimed,) = dead.claim(1)
    clock.advance(59)
    rescuer = make_worker(lease=60)
    assert rescuer.rescue() == 0, "the lease has not expired yet"
    clock.advance(2)
    assert rescuer.rescue() == 1

    failed, retry = rows(db)
    assert failed["id"] == lost.id and failed["status"] == "failed"
    assert failed["error"].startswith("worker lost: lease expired")
    assert (retry["attempt"], retry["deaths"], retry["due"]) == (2, 1, at(clock))
    assert retry["rescheduled_from_job"] == lost.id

    # The presumed-dead worker finishes late: its result is discarded.
    dead.record([dead.execute(claimed)])
    assert rows(db, f"id = {lost.id}")[0]["status"] == "failed"
    assert rows(db, f"id = {lost.id}")[0]["result"] is None


def test_worker_death_retries_even_without_attempts_left_until_max_deaths(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ok_job: None
) -> None:
    queue.enqueue("add", {"a": 1, "b": 1}, max_attempts=1, now=at(clock))
    rescuer = make_worker(lease=1, max_deaths=3)
    for _ in range(3):
        make_worker(lease=1).claim(1)
        clock.advance(2)
        rescuer.rescue()
    chain = rows(db)
    assert [r["deaths"] for r in chain] == [0, 1, 2]
    assert [r["status"] for r in chain] == ["failed"] * 3
    assert chain[-1]["error"].startswith("worker died 3 times")


def test_worker_whose_clock_jumps_forward_does_not_rescue_its_own_jobs(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ok_job: None
) -> None:
    queue.enqueue("add", {"a": 1, "b": 1}, now=at(clock))
    alive = make_worker(lease=60)
    alive.claim(1)
    clock.advance(2 * 3600)
    assert alive.rescue() == 0, "its own jobs are running, not lost"
    assert make_worker(lease=60).rescue() == 1, "another worker sees an expired lease"


def test_job_whose_worker_died_runs_alone_on_an_idle_worker(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ok_job: None
) -> None:
    """A job that may kill its process must not take innocent jobs down with it."""
    suspect = queue.enqueue("add", {"a": 1, "b": 1}, now=at(clock))
    make_worker(lease=1).claim(1)
    clock.advance(2)
    make_worker(lease=1).rescue()
    for n in range(3):
        queue.enqueue("add", {"a": n, "b": n}, now=at(clock, -10))  # due long before the retry
    w = make_worker(concurrency=4)
    (alone,) = w.claim(4)
    assert (alone.rescheduled_from_job, alone.deaths) == (suspect.id, 1)
    busy = make_worker(concurrency=4)
    busy._running[0] = alone  # a worker with something running takes no suspect, only the others
    assert all(job.deaths == 0 for job in busy.claim(4))


def test_a_worker_death_uses_up_no_ordinary_attempt(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, failing_job: None
) -> None:
    queue.enqueue("explode", max_attempts=2, now=at(clock))
    make_worker(lease=1).claim(1)
    clock.advance(2)
    make_worker(lease=1).rescue()  # attempt 1 died with its worker
    w = make_worker()
    w.work()  # attempt 2 raises: its first ordinary failure, so a retry follows
    clock.advance(3600)
    w.work()  # attempt 3 raises: the second, and last
    assert [(r["attempt"], r["deaths"], r["status"]) for r in rows(db)] == [
        (1, 0, "failed"),
        (2, 1, "failed"),
        (3, 1, "failed"),
    ]


def test_heartbeat_keeps_a_long_job_from_being_rescued(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ok_job: None
) -> None:
    queue.enqueue("add", {"a": 1, "b": 1}, now=at(clock))
    busy = make_worker(lease=60)
    busy.claim(1)
    for _ in range(5):
        clock.advance(20)
        busy.heartbeat()
    assert make_worker(lease=60).rescue() == 0
    assert rows(db)[0]["status"] == "running"


def test_cancelled_or_given_back_job_is_not_finished_by_its_old_worker(
    queue: Queue, make_worker: Any, db: str, ok_job: None
) -> None:
    enqueued = queue.enqueue("add", {"a": 1, "b": 1})
    w = make_worker(clock=time.time)
    (claimed,) = w.claim(1)
    w.give_back([claimed])
    row = queue.get(enqueued.id)
    assert row is not None and (row.status, row.owner, row.started) == ("pending", None, None)
    w.record([w.execute(claimed)])
    assert queue.get(enqueued.id).status == "pending"  # type: ignore[union-attr]


def job_row(attempt: int, deaths: int) -> Job:
    return Job(id=1, type="t", data={}, status="failed", attempt=attempt, deaths=deaths)


def test_policy_a_workers_death_uses_up_no_attempt_and_a_nonsense_count_cannot_retry_forever() -> None:
    assert worker.attempts_left(job_row(attempt=2, deaths=0), max_attempts=3)
    assert not worker.attempts_left(job_row(attempt=3, deaths=0), max_attempts=3)
    assert worker.attempts_left(job_row(attempt=3, deaths=1), max_attempts=3)  # one of the three was a death
    assert not worker.attempts_left(job_row(attempt=3, deaths=-5), max_attempts=3)  # counted as none
    # Counted as at most attempt - 1: the attempt that failed now was a real one.
    assert not worker.attempts_left(job_row(attempt=3, deaths=99), max_attempts=1)
    assert worker.attempts_left(job_row(attempt=3, deaths=99), max_attempts=2)
    assert not worker.attempts_left(job_row(attempt=2**31 - 1, deaths=0), max_attempts=2**31 - 1)  # the range's end


def test_policy_a_chain_is_given_up_as_poison_at_max_deaths() -> None:
    assert [worker.poisoned(deaths, max_deaths=3) for deaths in (1, 2, 3, 4)] == [False, False, True, True]


def test_housekeeping_schedule_heartbeats_every_third_of_a_lease_and_sweeps_about_every_half() -> None:
    schedule = worker.HousekeepingSchedule(60_000, NoJitter())
    assert schedule.heartbeat_due(0) and schedule.rescue_due(0)  # at once, at start
    schedule.heartbeat_done(0)
    schedule.rescue_done(0)
    assert not schedule.heartbeat_due(19_999) and schedule.heartbeat_due(20_000)
    assert not schedule.rescue_due(26_999) and schedule.rescue_due(27_000)  # lease/2 x 0.9, the jitter's middle


def test_housekeeping_schedule_after_the_wall_clock_steps_back_heartbeats_and_sweeps_at_once() -> None:
    schedule = worker.HousekeepingSchedule(60_000, NoJitter())
    schedule.heartbeat_due(1_000_000)
    schedule.heartbeat_done(1_000_000)
    schedule.rescue_done(1_000_000)
    assert schedule.heartbeat_due(500_000) and schedule.rescue_due(500_000)


def test_housekeeping_schedule_after_a_forward_jump_heartbeats_now_and_sweeps_only_a_lease_later() -> None:
    schedule = worker.HousekeepingSchedule(60_000, NoJitter())
    assert schedule.clock_jump(0, monotonic=100.0) is None  # the first look only notes the time
    schedule.heartbeat_done(0)
    schedule.rescue_done(0)
    assert schedule.clock_jump(1_000, monotonic=101.0) is None  # wall and monotonic clocks agree
    assert schedule.clock_jump(3_601_000, monotonic=102.0) == 3_599_000  # an hour, in one second
    assert schedule.heartbeat_due(3_601_000)
    assert not schedule.rescue_due(3_660_999) and schedule.rescue_due(3_661_000)


def test_housekeeping_schedule_postponed_by_a_long_wait_for_the_lock_keeps_the_later_time() -> None:
    schedule = worker.HousekeepingSchedule(60_000, NoJitter())
    schedule.postpone_rescue(90_000)
    schedule.rescue_done(0)  # a sweep now would plan the next at 27 s: the postponement stands
    assert not schedule.rescue_due(89_999) and schedule.rescue_due(90_000)


# --- Enqueue --------------------------------------------------------------------


def test_enqueue_returns_the_row_as_written(queue: Queue, clock: FakeClock, ok_job: None) -> None:
    new = queue.enqueue("add", {"a": 1, "b": 2}, delay=30, priority=3, max_attempts=4, timeout=5, now=at(clock))
    assert new == queue.get(new.id)
    assert (new.status, new.attempt, new.due, new.priority) == ("pending", 1, at(clock, 30), 3)
    assert (new.max_attempts, new.timeout_ms, new.retry_delay_ms) == (4, 5_000, None)


def test_enqueue_at_a_datetime(queue: Queue, ok_job: None) -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert queue.enqueue("add", {"a": 1, "b": 2}, at=moment).due == int(moment.timestamp() * 1000)
    naive_is_utc = queue.enqueue("add", {"a": 1, "b": 2}, at=moment.replace(tzinfo=None))
    assert naive_is_utc.due == int(moment.timestamp() * 1000)


@pytest.mark.parametrize(
    ("type_", "data", "error"),
    [
        ("no_such_job", {}, worker.UnknownJobType),
        ("add", [1, 2], worker.InvalidJobData),
        ("add", "text", worker.InvalidJobData),
        ("add", {"a": {1, 2}}, worker.InvalidJobData),
        ("add", {"a": float("nan")}, worker.InvalidJobData),
        ("add", {1: 2}, worker.InvalidJobData),
    ],
)
def test_bad_enqueue_raises_and_writes_nothing(
    queue: Queue, db: str, ok_job: None, type_: str, data: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        queue.enqueue(type_, data)
    assert rows(db) == []


@pytest.mark.parametrize("policy", [{"max_attempts": 0}, {"backoff": 0.5}, {"timeout": 0}, {"timeout": -1}])
def test_job_and_enqueue_refuse_the_same_bad_policies(
    queue: Queue, db: str, ok_job: None, policy: dict[str, Any]
) -> None:
    with pytest.raises(worker.ConfigError):
        worker.job(name="bad_policy", **policy)(lambda ctx: None)
    with pytest.raises(ValueError):
        queue.enqueue("add", {"a": 1, "b": 2}, **policy)
    assert rows(db) == []


def test_unknown_type_can_be_allowed_for_producers_without_the_jobs_module(db: str) -> None:
    assert Queue(db, check_types=False).enqueue("defined_elsewhere").type == "defined_elsewhere"


def test_enqueue_many_is_all_or_nothing(queue: Queue, db: str, ok_job: None) -> None:
    with pytest.raises(worker.InvalidJobData):
        queue.enqueue_many([("add", {"a": 1, "b": 1}), ("add", [])])
    assert rows(db) == []
    made = queue.enqueue_many([("add", {"a": i, "b": i}) for i in range(3)] + [{"type": "add", "priority": 9}])
    assert [j.id for j in made] == [r["id"] for r in rows(db)]
    assert made[-1].priority == 9


def test_enqueue_many_returns_every_row_as_stored(queue: Queue, db: str, ok_job: None) -> None:
    @worker.job(queue="mail")
    def send(ctx: JobContext, **data: Any) -> None:
        pass

    data = [{"a": i, "b": -i} for i in range(5)] + [{"text": 'naïve ☃ "quoted"\n', "nested": {"x": [1.5, None, True]}}]
    items = [("add" if i % 2 else "send", d) for i, d in enumerate(data)] + [("send", None)]
    made = queue.enqueue_many(items, delay=30, priority=3, max_attempts=2, timeout=5, now=1_000_000)

    assert [(job.type, job.data) for job in made] == [(t, d or {}) for t, d in items]
    assert [job.queue for job in made] == ["mail", "default"] * 3 + ["mail"]
    assert {(job.due, job.priority, job.max_attempts, job.timeout_ms) for job in made} == {(1_030_000, 3, 2, 5000)}
    assert made == [queue.get(job.id) for job in made], "the returned jobs are the rows"


def test_enqueue_many_names_the_item_whose_data_is_not_json(queue: Queue, db: str, ok_job: None) -> None:
    with pytest.raises(worker.InvalidJobData, match=r"item 1: .*not JSON-serialisable"):
        queue.enqueue_many([("add", {"a": 1}), ("add", {"a": object()})])
    with pytest.raises(worker.InvalidJobData, match="keys must be strings"):
        queue.enqueue_many([("add", {1: 1})])
    with pytest.raises(worker.UnknownJobType):
        queue.enqueue_many([("add", {}), ("nope", {})])
    with pytest.raises(worker.UnknownJobType, match="non-empty string"):
        queue.enqueue_many([(["add"], {})])  # type: ignore[list-item]
    assert rows(db) == []


@SQLITE_ONLY
def test_enqueue_waits_for_another_writer_instead_of_failing(queue: Queue, db: str, ok_job: None) -> None:
    queue.enqueue("add", {"a": 0, "b": 0})  # the connection is open and the schema made
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("INSERT INTO worker_jobs (type) VALUES ('add')")
    threading.Timer(0.3, blocker.execute, ["COMMIT"]).start()
    started = time.monotonic()
    job = queue.enqueue("add", {"a": 1, "b": 1})
    assert time.monotonic() - started > 0.2, "it waited for the other writer's commit"
    assert [r["id"] for r in rows(db)][-1] == job.id
    blocker.close()


@SQLITE_ONLY
def test_enqueue_joins_the_callers_stdlib_sqlite3_transaction(db: str, queue: Queue, ok_job: None) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    app_queue = Queue(conn)

    conn.execute("INSERT INTO orders DEFAULT VALUES")
    app_queue.enqueue("add", {"a": 1, "b": 1})
    conn.rollback()
    assert rows(db) == []

    conn.execute("INSERT INTO orders DEFAULT VALUES")
    kept = app_queue.enqueue("add", {"a": 2, "b": 2})
    assert rows(db) == [], "not visible before the app commits"
    conn.commit()
    assert [r["id"] for r in rows(db)] == [kept.id]
    conn.close()


@SQLITE_ONLY
def test_enqueue_joins_the_callers_apsw_transaction(db: str, queue: Queue, ok_job: None) -> None:
    conn = apsw.Connection(db)
    app_queue = Queue(conn)
    with pytest.raises(ZeroDivisionError), conn:
        app_queue.enqueue("add", {"a": 1, "b": 1})
        1 / 0  # noqa: B018 -- the app's own work fails after the enqueue
    assert rows(db) == []
    with conn:
        app_queue.enqueue("add", {"a": 1, "b": 1})
    assert len(rows(db)) == 1


@SQLITE_ONLY
def test_enqueue_on_an_autocommit_connection_is_still_all_or_nothing(db: str, queue: Queue) -> None:
    @worker.job
    def tagged(ctx: JobContext) -> None:
        pass

    conn = sqlite3.connect(db, isolation_level=None)
    app_queue = Queue(conn)
    first = app_queue.enqueue("tagged", tag="t")
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON worker_jobs WHEN NEW.tag = 't' BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(worker.DatabaseError, match="no"):
        app_queue.enqueue("tagged", tag="t")  # cancels the pending row, then the insert fails
    assert [(r["id"], r["status"]) for r in rows(db)] == [(first.id, "pending")], "the cancel was rolled back too"
    conn.close()


def test_cancel_ends_a_pending_job_and_only_asks_about_a_running_one(
    queue: Queue, make_worker: Any, ok_job: None
) -> None:
    pending = queue.enqueue("add", {"a": 1, "b": 1})
    running = queue.enqueue("add", {"a": 1, "b": 1})
    assert queue.cancel(pending.id)
    assert queue.get(pending.id).status == "cancelled"  # type: ignore[union-attr]
    make_worker(clock=time.time).claim(1)
    assert queue.cancel(running.id)  # its worker is asked to stop it (test_control.py)
    assert not queue.cancel(pending.id), "already cancelled"
    assert queue.get(running.id).status == "running"  # type: ignore[union-attr]


# --- The table contract ---------------------------------------------------------


def test_job_fields_are_the_columns_in_order() -> None:
    """Job.from_row builds a Job positionally from SELECT_COLUMNS."""
    assert [field.name for field in worker.dataclasses.fields(Job)] == list(worker.COLUMNS)


@SQLITE_ONLY
def test_row_with_only_a_type_is_valid_and_due_now(queue: Queue, db: str) -> None:
    before = int(time.time() * 1000)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO worker_jobs (type) VALUES ('hello')")
    (row,) = rows(db)
    after = int(time.time() * 1000)
    assert (row["status"], row["queue"], row["priority"], row["attempt"], row["data"]) == (
        "pending",
        "default",
        0,
        1,
        "{}",
    )
    assert before - 5 <= row["due"] <= after + 5
    assert before - 5 <= row["created_at"] <= after + 5


@pytest.mark.parametrize(
    "bad",
    [
        "INSERT INTO worker_jobs (type, data) VALUES ('x', 'not json')",
        "INSERT INTO worker_jobs (type, data) VALUES ('x', '[1, 2]')",
        "INSERT INTO worker_jobs (type, status) VALUES ('x', 'done')",
        "INSERT INTO worker_jobs (type, result) VALUES ('x', '{oops')",
        "INSERT INTO worker_jobs (data) VALUES ('{}')",
    ],
)
@SQLITE_ONLY
def test_table_refuses_invalid_rows_from_any_writer(queue: Queue, db: str, bad: str) -> None:
    with sqlite3.connect(db) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(bad)
    assert rows(db) == []


@SQLITE_ONLY
def test_ids_are_never_reused(queue: Queue, db: str, ok_job: None) -> None:
    last = queue.enqueue("add", {"a": 1, "b": 1})
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM worker_jobs")
    assert queue.enqueue("add", {"a": 1, "b": 1}).id == last.id + 1


@SQLITE_ONLY
def test_schema_is_idempotent_and_versioned(db: str) -> None:
    conn = worker.connect(db)
    assert worker.apply_schema(conn) == worker.schema_version()
    assert worker.apply_schema(conn) == worker.schema_version()
    assert conn.execute("SELECT version FROM worker_schema").fetchone()[0] == worker.schema_version()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0  # the app's, never written
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@SQLITE_ONLY
def test_a_version_1_database_is_upgraded_in_place(db: str, ok_job: None) -> None:
    (version, first_section), *_ = worker.schema_sections()
    assert version == 1
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as old:
        old.executescript(first_section + "\nPRAGMA user_version = 1;")
        old.execute("INSERT INTO worker_jobs (type, data) VALUES ('add', '{\"a\": 1, \"b\": 2}')")

    w = Worker(db, cron=False)
    assert w.work() == 1
    indexes = {row[1] for row in w.store.conn.execute("PRAGMA index_list(worker_jobs)")}
    assert w.store.conn.execute("SELECT version FROM worker_schema").fetchone()[0] == worker.schema_version() >= 2
    assert "worker_jobs_next_due" not in indexes and "worker_jobs_claim" in indexes
    w.close()
    assert [(r["status"], r["result"]) for r in rows(db)] == [("succeeded", "3")]


@SQLITE_ONLY
def test_a_version_2_database_keeps_its_last_hour_counts_when_upgraded(db: str, clock: FakeClock) -> None:
    sections = worker.schema_sections()
    assert [version for version, _ in sections[:2]] == [1, 2]
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as old:
        old.executescript("".join(sql for _, sql in sections[:2]) + "\nPRAGMA user_version = 2;")
        for status, finished in [("succeeded", at(clock, -60)), ("succeeded", at(clock, -30)), ("failed", at(clock))]:
            old.execute("INSERT INTO worker_jobs (type, status, finished) VALUES ('add', ?, ?)", (status, finished))
        old.execute("INSERT INTO worker_jobs (type) VALUES ('add')")  # pending: not finished, not counted
        before = worker.status(old, now=at(clock))["queues"]  # a version-2 file: counted from the rows

    with contextlib.closing(worker.connect(db)) as conn:
        assert worker.apply_schema(conn) == worker.schema_version() >= 3
        after = worker.status(conn, now=at(clock))["queues"]
    assert before == after
    assert (after[0]["succeeded_last_hour"], after[0]["failed_last_hour"]) == (2, 1)


def finished_last_hour(conn: Any, now: int) -> dict[str, int]:
    """`worker status`'s last-hour counts of the default queue."""
    default = {q["queue"]: q for q in worker.status(conn, now=now)["queues"]}.get("default", {})
    return {state: default.get(f"{state}_last_hour", 0) for state in ("succeeded", "failed", "cancelled")}


@SQLITE_ONLY
def test_last_hour_counts_are_kept_per_minute_and_outlive_pruned_rows(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, ok_job: None
) -> None:
    @worker.job
    def fail(ctx: JobContext) -> None:
        raise RuntimeError("no")

    for type_ in ("add", "add", "add", "fail"):
        queue.enqueue(type_, {"a": 1, "b": 1} if type_ == "add" else None, keep=0, now=at(clock))
    queue.cancel(queue.enqueue("add", {"a": 1, "b": 1}, keep=0, now=at(clock)).id, now=at(clock))
    w = make_worker()
    assert w.work() == 4
    assert queue.prune(now=at(clock, 1)) == 5
    assert rows(db) == []
    assert finished_last_hour(w.store.conn, at(clock, 1)) == {"succeeded": 3, "failed": 1, "cancelled": 1}
    assert finished_last_hour(w.store.conn, at(clock, 3600 + 120)) == {"succeeded": 0, "failed": 0, "cancelled": 0}


@SQLITE_ONLY
def test_a_rescued_job_counts_as_failed(queue: Queue, make_worker: Any, clock: FakeClock, ok_job: None) -> None:
    queue.enqueue("add", {"a": 1, "b": 1}, now=at(clock))
    dead = make_worker(lease=1)
    assert len(dead.claim(1)) == 1
    clock.advance(2)
    rescuer = make_worker(lease=1)
    assert rescuer.rescue() == 1
    assert finished_last_hour(rescuer.store.conn, at(clock)) == {"succeeded": 0, "failed": 1, "cancelled": 0}


def test_per_minute_counts_are_pruned_after_a_day(
    queue: Queue, make_worker: Any, clock: FakeClock, ok_job: None
) -> None:
    queue.enqueue("add", {"a": 1, "b": 1}, now=at(clock))
    w = make_worker()
    w.work()
    count = "SELECT count(*) FROM worker_finished_per_minute"
    assert w.store.conn.execute(count).fetchone()[0] == 1
    queue.prune(now=at(clock, 86400 - 60))
    assert w.store.conn.execute(count).fetchone()[0] == 1
    queue.prune(now=at(clock, 86400 + 60))
    assert w.store.conn.execute(count).fetchone()[0] == 0


@SQLITE_ONLY
def test_schema_newer_than_the_code_is_refused(db: str) -> None:
    Queue(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE worker_schema SET version = 99")
    with pytest.raises(worker.DatabaseUnusable, match="newer than this worker"):
        Queue(db).enqueue("x")


@SQLITE_ONLY
def test_claim_uses_the_partial_index_not_a_table_scan(queue: Queue) -> None:
    conn = worker.connect(queue.path or "")
    sql = worker.SQLiteStore.CLAIM_SQL.format(queue_filter="", columns="id", deaths="deaths = 0")
    plan = " | ".join(
        row[3]
        for row in conn.execute(
            f"EXPLAIN QUERY PLAN {sql}", dict.fromkeys(("now", "worker", "owner", "lease_until", "limit"))
        )
    )
    assert "worker_jobs_claim" in plan
    assert "TEMP B-TREE" not in plan, plan
    conn.close()


@SQLITE_ONLY
def test_next_due_is_the_earliest_pending_due_across_priorities_and_queues(
    queue: Queue, make_worker: Any, clock: FakeClock, ok_job: None
) -> None:
    now = at(clock)
    for priority, seconds, queue_name in [(5, 300, "a"), (0, 200, "a"), (-3, 100, "b"), (0, 50, "b"), (9, 400, "b")]:
        queue.enqueue("add", {"a": 1, "b": 1}, priority=priority, delay=seconds, queue=queue_name, now=now)
    queue.cancel(queue.enqueue("add", {"a": 1, "b": 1}, delay=10, now=now).id)  # not pending: not counted

    def next_due(w: Worker) -> int:
        assert w.claim(1, now) == []  # a claim that finds nothing due looks up the next due time
        return w._next_due

    assert next_due(make_worker()) == now + 50_000
    assert next_due(make_worker(queues=["a"])) == now + 200_000
    assert next_due(make_worker(queues=["nothing-here"])) == 2**62

    conn = worker.connect(queue.path or "")
    plan = " | ".join(
        row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + worker.SQLiteStore.NEXT_DUE_SQL.format(queue_filter=""))
    )
    assert "worker_jobs_claim" in plan and "SCAN worker_jobs" not in plan, plan
    conn.close()


@SQLITE_ONLY
def test_claim_of_a_job_whose_worker_died_uses_its_own_small_index(queue: Queue) -> None:
    conn = worker.connect(queue.path or "")
    sql = worker.SQLiteStore.CLAIM_SQL.format(queue_filter="", columns="id", deaths="deaths > 0")
    params = dict.fromkeys(("now", "worker", "owner", "lease_until", "limit"))
    plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "worker_jobs_suspect" in plan, plan
    conn.close()


def test_missing_directory_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(worker.DatabaseUnusable, match="does not exist"):
        worker.connect(tmp_path / "nope" / "jobs.db")
    assert not (tmp_path / "nope").exists()


def test_file_that_is_not_a_database_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    before = junk.read_bytes()
    with pytest.raises(worker.DatabaseUnusable, match="not a database"):
        Queue(str(junk)).enqueue("x")
    assert junk.read_bytes() == before


# --- The job function's view ------------------------------------------------------


@SQLITE_ONLY
def test_context_carries_row_logger_app_and_follow_up_enqueue(queue: Queue, db: str) -> None:
    seen: dict[str, Any] = {}

    @worker.on_startup
    def connect_services(app: Any) -> None:
        app.greeting = "built once per process"

    @worker.job
    def parent(ctx: JobContext, n: int) -> int:
        seen.update(app=ctx.app.greeting, id=ctx.id, attempt=ctx.attempt, data=ctx.data, due=ctx.job.due)
        ctx.logger.info("spawning a child")
        return ctx.enqueue_now("child", {"n": n + 1}).id

    @worker.job
    def child(ctx: JobContext, n: int) -> int:
        return n

    first = queue.enqueue("parent", {"n": 1})
    Worker(db, cron=False, burst=True).run()
    assert seen == {"app": "built once per process", "id": first.id, "attempt": 1, "data": {"n": 1}, "due": first.due}
    child_id = queue.get(first.id).result  # type: ignore[union-attr]
    assert queue.get(child_id).result == 2  # type: ignore[union-attr]


def test_decorated_function_called_directly_just_runs() -> None:
    @worker.job(max_attempts=2)
    def double(ctx: Any, x: int) -> int:
        return 2 * x

    assert double(None, x=4) == 8
    assert worker.REGISTRY["double"].max_attempts == 2


def test_job_name_can_be_given_and_clashes_are_refused() -> None:
    @worker.job(name="emails.send")
    def send(ctx: JobContext) -> None:
        pass

    assert worker.REGISTRY["emails.send"].fn is send
    with pytest.raises(worker.ConfigError, match="already registered"):

        @worker.job(name="emails.send")
        def other(ctx: JobContext) -> None:
            pass


def test_job_logger_lines_name_the_job(
    queue: Queue, make_worker: Any, caplog: pytest.LogCaptureFixture, db: str
) -> None:
    @worker.job
    def chatty(ctx: JobContext) -> None:
        ctx.logger.warning("halfway")

    enqueued = queue.enqueue("chatty")
    with caplog.at_level(logging.INFO, logger="worker"):
        make_worker().work()
    line = next(r for r in caplog.records if r.name == "worker.job.chatty")
    assert line.getMessage() == f"job {enqueued.id} chatty: halfway"
    assert getattr(line, "job_id") == enqueued.id  # noqa: B009 -- set through `extra`
    assert any("succeeded" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_failure_is_logged_at_warning_with_id_type_and_attempt(
    queue: Queue, make_worker: Any, caplog: pytest.LogCaptureFixture, failing_job: None
) -> None:
    enqueued = queue.enqueue("explode")
    with caplog.at_level(logging.INFO, logger="worker"):
        make_worker().work()
    (failure,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert failure.getMessage().startswith(f"job {enqueued.id} explode failed (attempt 1): RuntimeError: boom")
    assert "Traceback" in failure.getMessage()


def test_commit_watcher_wakes_on_a_write_to_the_wal_file_only_when_armed(tmp_path: Path) -> None:
    wal = tmp_path / "jobs.db-wal"
    wal.write_bytes(b"")
    woken = threading.Event()
    watcher = worker.CommitWatcher.start(str(wal), woken.set)
    if watcher is None:
        pytest.skip("no inotify here: the worker polls instead")
    try:
        with wal.open("ab") as f:
            f.write(b"x")
        assert not woken.wait(0.2), "a disarmed watcher wakes no one"
        watcher.armed.set()
        woken.clear()
        with wal.open("ab") as f:
            f.write(b"y")
        assert woken.wait(5)
    finally:
        watcher.stop()


@SQLITE_ONLY
def test_idle_worker_is_woken_by_a_commit_not_by_its_safety_poll(
    db: str, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the -wal watched, an idle worker needs no fast polling to start a new job at once."""

    @worker.job
    def prompt(ctx: JobContext) -> None:
        pass

    monkeypatch.setattr(worker, "WATCHED_POLL_INTERVAL", 30.0)
    w = Worker(db, cron=False)
    runner = threading.Thread(target=w.run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not w._wake_up.armed:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the worker never went idle with its watcher armed"
            time.sleep(0.01)
        other = sqlite3.connect(db, isolation_level=None)
        enqueued = Queue(other).enqueue("prompt")
        other.close()
        while (found := queue.get(enqueued.id)) is None or found.status != "succeeded":
            assert time.monotonic() < deadline, "a commit by another connection did not wake the idle worker"
            time.sleep(0.01)
    finally:
        w.stop()
        runner.join(10)


# --- Processes and configuration ---------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_connection_refuses_use_after_fork(db: str) -> None:
    w = Worker(db)
    w.store.conn  # noqa: B018 -- open it in the parent
    pid = os.fork()
    if pid == 0:  # the child: must refuse, then leave without cleanup
        try:
            w.store.conn  # noqa: B018
        except worker.ForkedConnection:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    w.close()


@pytest.mark.parametrize(
    ("environ", "path"),
    [
        ({"WORKER_DB": "a.db", "DATABASE_URL": "sqlite:///b.db"}, "a.db"),
        ({"DATABASE_URL": "sqlite:///b.db"}, "b.db"),
        ({"DATABASE_URL": "sqlite:////var/b.db"}, "/var/b.db"),
        ({"WORKER_DB": "a.db", "DATABASE_URL": "postgres://x/y"}, "a.db"),  # the app's own database elsewhere
        ({}, "worker.db"),
    ],
)
def test_database_path_comes_from_the_environment(environ: dict[str, str], path: str) -> None:
    assert worker.resolve_db_path(environ) == path


def test_queue_from_env_opens_worker_db(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    monkeypatch.setenv("WORKER_DB", db)
    with Queue.from_env(check_types=False) as from_env:
        assert from_env.path == db
        assert from_env.enqueue("anything").id == 1
    assert len(rows(db)) == 1


def test_help_names_every_environment_variable() -> None:
    help_text = worker_cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    for variable, _ in worker.ENVIRONMENT.values():
        assert variable in help_text


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = HERE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "worker.py", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_worker_py_registers_jobs_in_the_same_registry(db: str) -> None:
    """`python worker.py` is __main__; jobs.py's `from worker import job` must reach it."""
    enqueued = run_cli("enqueue", "hello", "--db", db, "--data", '{"name": "cli"}')
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = int(enqueued.stdout)
    done = run_cli("run", "--db", db, "--burst")
    assert done.returncode == 0, done.stderr
    assert f"job {job_id} hello succeeded" in done.stderr
    assert rows(db)[0]["result"] == '{"greeting":"hello, cli!"}'


def test_json_log_format_writes_one_object_per_line(db: str) -> None:
    run_cli("enqueue", "hello", "--db", db)
    done = run_cli("run", "--db", db, "--burst", env={"WORKER_LOG_FORMAT": "json", "WORKER_LOG_LEVEL": "DEBUG"})
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    started = next(e for e in entries if e.get("action") == "start")
    assert (started["level"], started["job_type"]) == ("DEBUG", "hello")
    assert any(e.get("action") == "succeeded" and e["job_id"] == started["job_id"] for e in entries)


def test_log_level_from_the_environment_sets_the_threshold(db: str) -> None:
    run_cli("enqueue", "hello", "--db", db)
    quiet = run_cli("run", "--db", db, "--burst", env={"WORKER_LOG_LEVEL": "WARNING"})
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert rows(db)[0]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["run", "--log-level", "LOUD"], {}, 2, "invalid log level"),
        (["run", "--jobs", "no_such_module"], {}, 2, "cannot import jobs module"),
        (["run"], {"WORKER_CONCURRENCY": "many"}, 2, "invalid WORKER_CONCURRENCY"),
        (["run", "--prefetch", "-1"], {}, 2, "prefetch must be 0 or more"),
        (["enqueue", "no_such_type"], {}, 2, "unknown job type"),
        (["enqueue", "hello", "--data", "{oops"], {}, 2, "not valid JSON"),
        (["enqueue", "hello", "--data", "[1]"], {}, 2, "must be a JSON object"),
    ],
)
def test_cli_errors_are_one_line_with_the_right_exit_code(
    db: str, args: list[str], env: dict[str, str], code: int, message: str
) -> None:
    result = run_cli(*args, "--db", db, env=env)
    assert result.returncode == code
    assert message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not Path(db).exists() or rows(db) == []


def test_scripts_installed_as_worker_main_still_run_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        worker.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"worker {worker.__version__}\n"


def test_a_database_url_is_shown_without_its_password() -> None:
    """What the start line, the dashboard and every connection error print of a URL."""
    assert worker.redacted("postgresql://app:s3cret@db:5432/app") == "postgresql://app@db:5432/app"
    assert worker.redacted("postgresql://app@db/app?password=s3cret&sslmode=require") == (
        "postgresql://app@db/app?password=...&sslmode=require"
    )
    assert worker.redacted("/var/lib/app/jobs.db") == "/var/lib/app/jobs.db"
