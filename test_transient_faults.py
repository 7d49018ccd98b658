"""A transient database error never costs a job: on every store, what a worker was writing when the database
failed it (a connection lost mid-transaction, a commit whose reply never came) is written in full by a later
transaction, never half, twice, or not at all.

The worker keeps what it could not write (outcomes, give-backs, claims in
doubt) and writes it once the database answers again.  These tests fail one
transaction of a worker on the fake clock, and hold the table to what the
same steps write when nothing fails.  The faults: on PostgreSQL the server
terminates the worker's session in the middle of a transaction (for real,
pg_terminate_backend); SQLite has no session to lose, so there the store's
verb raises what SQLite's I/O error becomes.  A commit whose reply was lost
is a transaction that commits and then raises, as test_reliability's
RELIABILITY_LOSE_CLAIM_REPLY does in real processes.

Then what each store counts as transient: on PostgreSQL a session the server
ended (idle, or inside a transaction) and a standby's refusal to write; on
SQLite a lost race for the WAL's locks.  A worker process restarted while its
server is down is test_postgres_reliability.py's (real processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

import worker
from conftest import FakeClock, at, rows, wait_for
from worker import Queue, job

pytestmark = pytest.mark.stores("sqlite", "postgres")


def lose_connection_at(monkeypatch: pytest.MonkeyPatch, runner: worker.Worker, verb: str) -> None:
    """The worker's connection is lost at its next call of the store's ``verb``, in the middle of the transaction
    it is part of (once)."""
    store = runner.store
    original = getattr(store, verb)

    def lost(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(store, verb, original)
        if not worker.is_postgres(runner.db):
            raise worker.DatabaseUnavailable("disk I/O error (the test's)")
        import psycopg

        with psycopg.connect(runner.db, autocommit=True) as other:  # waits until the session is gone
            other.execute("SELECT pg_terminate_backend(%s, 5000)", (store.conn.info.backend_pid,))  # type: ignore[attr-defined]
        return original(*args, **kwargs)  # fails for real: the server has closed the connection

    monkeypatch.setattr(store, verb, lost)


def recorded_after_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch, runner: worker.Worker, outcomes: list[worker.Outcome]
) -> None:
    """Record ``outcomes`` as the worker's loop does when the first transaction fails half-way: it keeps them,
    and records the same outcomes again at its next step."""
    lose_connection_at(monkeypatch, runner, "finish_many_if_owned")
    with pytest.raises(worker.DatabaseUnavailable):
        runner.record(outcomes)
    runner.record(outcomes)


# --- Recording outcomes -------------------------------------------------------------------------


def test_a_job_asked_to_cancel_ends_cancelled_though_the_first_record_of_its_outcome_failed(
    queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    @job(max_attempts=3)
    def patient(ctx: worker.JobContext) -> str:
        ctx.cancelled.wait(10)
        ctx.enqueue("patient")  # a follow-up goes with a success only
        return "stopped early"

    queue.enqueue("patient", now=at(clock))
    runner = make_worker()
    (claimed,) = runner.claim(1)
    ended: list[worker.Outcome] = []
    thread = threading.Thread(target=lambda: ended.append(runner.execute(claimed)), daemon=True)
    thread.start()
    assert queue.cancel(claimed.id, by="ops", now=at(clock))
    worker._emit(runner._recording.cancels.look(runner.store, runner.owner, {claimed.id}, at(clock)))
    thread.join(timeout=10)
    recorded_after_a_lost_connection(monkeypatch, runner, ended)
    (row,) = rows(db)  # no follow-up, no retry
    assert row["status"] == "cancelled"
    assert row["error"].startswith("cancelled while running (asked by ops at ")


def test_a_snooze_whose_first_record_failed_names_the_one_row_that_runs_it(
    queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    @job
    def later(ctx: worker.JobContext) -> None:
        raise worker.Snooze(30)

    queue.enqueue("later", now=at(clock))
    runner = make_worker()
    (claimed,) = runner.claim(1)
    recorded_after_a_lost_connection(monkeypatch, runner, [runner.execute(claimed)])
    ended, next_row = rows(db)
    assert (ended["status"], ended["error"]) == ("cancelled", f"snoozed for 30 s: job {next_row['id']} runs it then")
    assert (next_row["status"], next_row["due"]) == ("pending", at(clock, 30))


def test_the_last_progress_of_a_job_is_written_though_the_first_record_of_its_outcome_failed(
    queue: Queue, make_worker: Callable[..., worker.Worker], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    @job
    def reporting(ctx: worker.JobContext) -> None:
        ctx.progress(3, 3, "all rows")

    queue.enqueue("reporting")
    runner = make_worker()
    (claimed,) = runner.claim(1)
    recorded_after_a_lost_connection(monkeypatch, runner, [runner.execute(claimed)])
    (row,) = rows(db)
    assert row["status"] == "succeeded"
    assert json.loads(row["progress"] or "{}").get("message") == "all rows"


# --- Commits whose reply was lost: claims and give-backs in doubt ----------------------------------


def lose_the_reply_to_the_next_commit(monkeypatch: pytest.MonkeyPatch, runner: worker.Worker) -> None:
    """The worker's next transaction commits, and the worker is told it failed (the connection dropped before the
    reply to COMMIT came)."""
    store = runner.store
    original = store.transaction

    @contextlib.contextmanager
    def committed_then_lost() -> Iterator[Any]:
        monkeypatch.setattr(store, "transaction", original)
        with original() as conn:
            yield conn
        raise worker.DatabaseUnavailable("the reply to COMMIT was lost (the test's)")

    monkeypatch.setattr(store, "transaction", committed_then_lost)


@pytest.fixture
def noop(registry: dict[str, worker.JobType]) -> None:
    @job
    def noop(ctx: worker.JobContext) -> None:
        return None


def claimed_in_doubt(
    monkeypatch: pytest.MonkeyPatch, runner: worker.Worker, queue: Queue, clock: FakeClock
) -> worker.Job:
    """An idle worker, woken by another writer's commit, claims the one job it made due; the claim commits and the
    worker is told it failed.  Nothing else is due, and no other commit comes."""
    runner.start_up()
    runner._wake_up.start(lambda: None)  # PostgreSQL's LISTEN (SQLite's data_version is read in any case)
    runner._tick()  # nothing due: idle, it looks again when another writer commits
    runner._wake_up.changed()  # what other writers committed until now is seen
    enqueued = queue.enqueue("noop", now=at(clock))
    if worker.is_postgres(runner.db):
        wake_up = cast(Any, runner._wake_up)
        wait_for(wake_up._notified.is_set, 5, "the notification of that commit")
    lose_the_reply_to_the_next_commit(monkeypatch, runner)
    runner._tick()
    assert not runner._running and rows(runner.db)[0]["status"] == "running", "claimed, unknown to its worker"
    return enqueued


def test_a_claim_in_doubt_is_given_back_at_the_next_step_though_nothing_else_wakes_the_worker(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    runner = make_worker()
    try:
        enqueued = claimed_in_doubt(monkeypatch, runner, queue, clock)
        runner._tick()
        assert rows(db)[0]["status"] == "pending", "given back: else its heartbeat renews a lease no one runs"
        runner._tick()
        assert list(runner._running) == [enqueued.id], "claimed again, due at once"
    finally:
        runner._wake_up.stop()


def test_a_worker_stopping_with_a_claim_in_doubt_gives_its_rows_back(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    runner = make_worker()
    claimed_in_doubt(monkeypatch, runner, queue, clock)
    runner._wake_up.stop()  # run() starts it again
    runner.stop()
    runner.run()
    (row,) = rows(db)
    assert (row["status"], row["deaths"]) == ("pending", 0), "not left for a rescue, a lease later, as a death"


def test_jobs_claimed_ahead_whose_give_back_may_have_committed_are_not_run_by_their_old_worker(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Given back, their rows are pending, where any worker may claim and run them: the worker told the give-back
    failed runs none of them, unless a claim of its own takes them again."""
    queue.enqueue_many([("noop", None)] * 3, now=at(clock))
    runner = make_worker(concurrency=1)
    runner.start_up()
    runner._ahead.jobs = 4  # room for 5: the claim takes all 3
    runner._tick()
    runner._progress_at = time.monotonic() - 1  # no thread has started a job for a second
    lose_the_reply_to_the_next_commit(monkeypatch, runner)
    runner._tick()  # gives the 3 back (none had started), and claims what its free thread may take
    held = sorted(job.id for job in runner._take_waiting())
    assert held == sorted(runner._running)
    assert held == [row["id"] for row in rows(db) if (row["status"], row["owner"]) == ("running", runner.owner)]


def test_an_outcome_whose_commit_landed_though_its_reply_was_lost_is_not_called_discarded(
    registry: dict[str, worker.JobType], queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Recorded again, its row is no longer running under the worker: it was the worker's own commit, not a
    rescue, and the log says so (it said "rescued after its lease expired", a false alarm at every blip)."""

    @job
    def ok(ctx: worker.JobContext) -> str:
        return "done"

    @job
    def bad(ctx: worker.JobContext) -> None:
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO, logger="worker")
    queue.enqueue_many([("ok", None), ("bad", None)], now=at(clock))
    runner = make_worker()
    outcomes = [runner.execute(claimed) for claimed in runner.claim(2)]
    lose_the_reply_to_the_next_commit(monkeypatch, runner)
    with pytest.raises(worker.DatabaseUnavailable):
        runner.record(outcomes)
    runner.record(outcomes)
    said = [r.getMessage() for r in caplog.records if "already" in r.getMessage() or "discarded" in r.getMessage()]
    assert said == ["job 1 ok: recorded already, by the commit whose reply was lost",
                    "job 2 bad: recorded already, by the commit whose reply was lost"]  # fmt: skip
    assert [row["status"] for row in rows(runner.db)] == ["succeeded", "failed"]


def test_a_stopping_worker_isolates_an_outcome_the_database_refuses_and_records_the_rest(
    registry: dict[str, worker.JobType], queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A refusal that waiting will not end (not busy, not out of reach) is met as a step meets it, one outcome at
    a time, not retried unchanged until the shutdown timeout while the other jobs' outcomes wait with it."""

    @job
    def ok(ctx: worker.JobContext) -> str:
        return "done"

    queue.enqueue_many([("ok", None), ("ok", None)], now=at(clock))
    runner = make_worker()
    runner.shutdown_timeout = 30
    outcomes = [runner.execute(claimed) for claimed in runner.claim(2)]
    refused = outcomes[1].job.id
    finish_many = runner.store.finish_many_if_owned

    def refusing(owner: str, now: int, ended: Any) -> set[int]:
        ended = list(ended)
        if refused in [outcome[0] for outcome in ended]:
            raise worker.DatabaseError("CHECK constraint failed (the test's)")
        return finish_many(owner, now, ended)

    monkeypatch.setattr(runner.store, "finish_many_if_owned", refusing)
    runner._running.clear()
    runner._to_record = outcomes  # as the loop keeps them when its step could not write
    runner.stop()
    began = time.monotonic()
    runner.run()
    assert time.monotonic() - began < 10, "waited for the shutdown timeout"
    assert [row["status"] for row in rows(runner.db)] == ["succeeded", "running"]  # the refused one set aside


# --- PostgreSQL: a connection the server ended is made again ------------------------------------------


def terminate_the_session_of(conn: Any, db: str) -> None:
    """The server ends this connection's session, as a restart or a failover would (and waits until it has)."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s, 5000)", (conn.info.backend_pid,))


@pytest.mark.stores("postgres")
def test_a_queue_whose_idle_session_the_server_ended_connects_again_at_its_next_call(
    noop: None, queue: Queue, db: str
) -> None:
    """The server's goodbye waits on the socket of a session it ended while idle: the next call reads it and
    connects again before it sends anything, an INSERT outside a transaction as well as the rest."""
    queue.enqueue("noop")
    terminate_the_session_of(queue._store().conn, db)  # type: ignore[attr-defined]
    assert queue.enqueue("noop").id == 2
    terminate_the_session_of(queue._store().conn, db)  # type: ignore[attr-defined]
    assert queue.get(2) is not None


@pytest.mark.stores("postgres")
def test_a_connection_lost_inside_a_transaction_fails_it_and_the_next_call_outside_one_connects_again(
    noop: None, queue: Queue, db: str
) -> None:
    """Inside a transaction the connection is never made again (the rest would run outside it, its writes
    lost); once it has failed, every later call connects again, an INSERT of its own too (it failed at every
    call, for good)."""
    store = queue._store()
    with pytest.raises(worker.DatabaseUnavailable), store.transaction():
        queue.enqueue("noop")  # its own, a savepoint: part of this transaction
        terminate_the_session_of(store.conn, db)  # type: ignore[attr-defined]
        store.get(1)
    assert queue.enqueue("noop").id == 2, "the first insert went with its transaction"
    assert [row["id"] for row in rows(db)] == [2]


@pytest.mark.stores("postgres")
def test_a_jobs_enqueue_now_after_the_server_ended_its_threads_session_succeeds(
    queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    """ctx.enqueue_now writes on its job thread's own connection: a session the server ended since (a restart,
    a failover) fails no job once the server is back."""

    @job
    def spawner(ctx: worker.JobContext) -> None:
        ctx.enqueue_now("child")

    @job
    def child(ctx: worker.JobContext) -> None:
        return None

    runner = make_worker(concurrency=1)
    for _ in range(2):
        queue.enqueue("spawner")
    assert runner.work() == 1
    terminate_the_session_of(runner.producer._store().conn, db)  # type: ignore[attr-defined]
    terminate_the_session_of(runner.store.conn, db)  # type: ignore[attr-defined]  # and the worker's own
    assert runner.work() == 1
    assert [row["status"] for row in rows(db, "type = 'spawner'")] == ["succeeded", "succeeded"]
    assert len(rows(db, "type = 'child'")) == 2


def one_job_run_and_handed_over(
    queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock
) -> tuple[worker.Worker, worker.Job]:
    """A worker whose step claimed the one job enqueued, whose thread ran it and handed its outcome over."""
    queue.enqueue("noop", now=at(clock))
    runner = make_worker()
    runner.start_up()
    runner._tick()  # claims it
    claimed = runner._todo.get_nowait()
    assert claimed is not None
    runner._hand_over(runner.execute(claimed))
    return runner, claimed


@pytest.mark.stores("postgres")
def test_outcomes_are_kept_while_the_server_refuses_writes_as_in_a_failover_and_recorded_once_it_takes_them(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str
) -> None:
    """A session that reaches a standby (a failover under way: the old primary, read-only now, or a replica the
    name still points to) is refused every write for a while: as for a server out of reach, the worker keeps
    its outcomes and backs off; it records none as unrecordable, and sets none aside."""
    runner, claimed = one_job_run_and_handed_over(queue, make_worker, clock)
    session = runner.store.conn  # type: ignore[attr-defined]
    session.execute("SET default_transaction_read_only = on")  # every transaction of this session refused writes
    runner._tick()
    assert [outcome.job.id for outcome in runner._to_record] == [claimed.id], "kept"
    assert rows(db)[0]["status"] == "running"
    session.execute("SET default_transaction_read_only = off")
    runner._tick()
    assert rows(db)[0]["status"] == "succeeded"


# --- SQLite: a lost race for the WAL's locks ----------------------------------------------------------


@pytest.mark.stores("sqlite")
def test_a_write_that_lost_the_wal_lock_race_is_waited_out_as_busy_and_fails_no_job(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """SQLITE_PROTOCOL: a transaction that lost the race for the WAL's locks dozens of times over seconds, among
    many writers, gives up as it begins, having written nothing.  It passes, as busy does."""
    runner, _ = one_job_run_and_handed_over(queue, make_worker, clock)
    begin, lost = worker.immediate, [2]  # the next two transactions lose the race

    def losing(conn: Any) -> Any:
        if lost[0]:
            lost[0] -= 1
            error = sqlite3.OperationalError("locking protocol")
            error.sqlite_errorcode = 15  # type: ignore[attr-defined]  # SQLITE_PROTOCOL
            raise error
        return begin(conn)

    monkeypatch.setattr(worker, "immediate", losing)
    for _ in range(3):
        runner._tick()
    (row,) = rows(db)
    assert (row["status"], row["error"]) == ("succeeded", None)
