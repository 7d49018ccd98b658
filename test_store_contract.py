"""The store contract: what any store must do, and the fences it must keep (River's driver test suite is the model).

Every test of a verb takes the ``store`` fixture, which today yields the SQLite
store only; a later store joins by adding its case to the fixture.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import worker


def allowed_statuses(table: str) -> list[str]:
    """The values the CHECK on ``table``.status allows, read from the table schema.sql makes."""
    _, create = worker._schema_objects()[table]
    found = re.search(r"CHECK \(status IN \(([^)]*)\)\)", create)
    assert found, f"{table} has no CHECK on status"
    return [value.strip().strip("'") for value in found.group(1).split(",")]


def test_status_enum_names_exactly_the_states_the_schema_allows() -> None:
    assert allowed_statuses("worker_jobs") == [status.value for status in worker.Status]
    assert tuple(worker.Status) == worker.STATUSES
    finished = [worker.Status.SUCCEEDED, worker.Status.FAILED, worker.Status.CANCELLED]
    assert allowed_statuses("worker_finished_per_minute") == finished


def test_a_status_compares_equal_to_the_plain_string_a_row_holds() -> None:
    assert worker.Status.PENDING == "pending"
    assert f"{worker.Status.FAILED}" == "failed"


# --- The store under test, and what a test needs of its backend ---------------------

NOW = 1_800_000_000_000  # epoch ms
LEASE = 60_000


class Backend:
    """A store on an empty database, with raw access to its table for setting up and reading back rows."""

    name: str
    store: worker.Store
    refused: type[Exception]  # what the raw connection raises when the table refuses a row

    def insert(self, **columns: Any) -> int:
        """A row as another program would write it (type "noop", due NOW, unless given); its id."""
        raise NotImplementedError

    def running(self, owner: str, **columns: Any) -> int:
        """A row running under ``owner``, its lease until NOW + LEASE."""
        running = {"status": "running", "owner": owner, "worker": "host:1", "started": NOW, "lease_until": NOW + LEASE}
        return self.insert(**{**running, **columns})

    def row(self, id: int) -> dict[str, Any]:
        raise NotImplementedError

    def all_rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def processes(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def finished_counts(self) -> list[tuple[int, str, str, int]]:
        raise NotImplementedError

    def another_store(self) -> worker.Store:
        """A store on a connection of its own to the same database, as another worker process has."""
        raise NotImplementedError

    def wake_up(self) -> worker.WakeUp:
        """The store's wake-up, as a worker on this database makes it."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SQLiteBackend(Backend):
    """The SQLite store on a fresh file."""

    name = "sqlite"
    refused = sqlite3.IntegrityError

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = worker.connect(path)
        worker.apply_schema(self.conn)
        self.store = worker.SQLiteStore(self.conn)
        self.others: list[sqlite3.Connection] = []

    def insert(self, **columns: Any) -> int:
        columns = {"type": "noop", "due": NOW, "created_at": NOW, **columns}
        names = ", ".join(columns)
        values = ", ".join(f":{name}" for name in columns)
        cursor = self.conn.execute(f"INSERT INTO worker_jobs ({names}) VALUES ({values})", columns)  # autocommit
        return int(cursor.lastrowid or 0)

    def row(self, id: int) -> dict[str, Any]:
        self.conn.row_factory = sqlite3.Row
        try:
            found = self.conn.execute("SELECT * FROM worker_jobs WHERE id = ?", (id,)).fetchone()
        finally:
            self.conn.row_factory = None
        assert found is not None, f"no row {id}"
        return dict(found)

    def all_rows(self) -> list[dict[str, Any]]:
        return [self.row(id) for (id,) in self.conn.execute("SELECT id FROM worker_jobs ORDER BY id").fetchall()]

    def processes(self) -> dict[str, dict[str, Any]]:
        self.conn.row_factory = sqlite3.Row
        try:
            return {row["id"]: dict(row) for row in self.conn.execute("SELECT * FROM worker_processes")}
        finally:
            self.conn.row_factory = None

    def finished_counts(self) -> list[tuple[int, str, str, int]]:
        return self.conn.execute("SELECT minute, queue, status, count FROM worker_finished_per_minute").fetchall()

    def another_store(self) -> worker.Store:
        conn = worker.connect(self.path)
        self.others.append(conn)
        return worker.SQLiteStore(conn)

    def wake_up(self) -> worker.WakeUp:
        return worker.SQLiteWakeUp(str(self.path), lambda: self.conn)

    def close(self) -> None:
        for conn in (self.conn, *self.others):
            conn.close()


class PostgresBackend(Backend):
    """The PostgreSQL store on the test run's database, emptied; raw access on a connection of its own."""

    name = "postgres"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        import worker_postgres

        self.url = url
        self.refused = psycopg.errors.IntegrityError
        self.store = self.postgres_store = worker_postgres.open_store(url)
        self.raw = psycopg.connect(url, autocommit=True, row_factory=dict_row)  # another program's
        self.others: list[worker_postgres.PostgresStore] = []

    def insert(self, **columns: Any) -> int:
        columns = {"type": "noop", "due": NOW, "created_at": NOW, **columns}
        names = ", ".join(columns)
        values = ", ".join(f"%({name})s" for name in columns)
        inserted = self.raw.execute(f"INSERT INTO worker_jobs ({names}) VALUES ({values}) RETURNING id", columns)
        return int(inserted.fetchone()["id"])  # type: ignore[index]

    def row(self, id: int) -> dict[str, Any]:
        found = self.raw.execute("SELECT * FROM worker_jobs WHERE id = %s", (id,)).fetchone()
        assert found is not None, f"no row {id}"
        return dict(found)

    def all_rows(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.raw.execute("SELECT * FROM worker_jobs ORDER BY id")]

    def processes(self) -> dict[str, dict[str, Any]]:
        return {row["id"]: dict(row) for row in self.raw.execute("SELECT * FROM worker_processes")}

    def finished_counts(self) -> list[tuple[int, str, str, int]]:
        counts = self.raw.execute("SELECT minute, queue, status, count FROM worker_finished_per_minute")
        return [(row["minute"], row["queue"], row["status"], row["count"]) for row in counts]

    def another_store(self) -> worker.Store:
        import worker_postgres

        made = worker_postgres.open_store(self.url)
        self.others.append(made)
        return made

    def wake_up(self) -> worker.WakeUp:
        import worker_postgres

        return worker_postgres.PostgresWakeUp(self.url)

    def close(self) -> None:
        for made in (self.postgres_store, *self.others):
            made.close()
        self.raw.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store the engine has, on an empty database (PostgreSQL's skip, saying why, when it is unreachable)."""
    made: Backend
    if request.param == "sqlite":
        made = SQLiteBackend(tmp_path / "contract.db")
    else:
        made = PostgresBackend(request.getfixturevalue("postgres_db"))
    yield made
    made.close()


@pytest.fixture
def store(backend: Backend) -> worker.Store:
    return backend.store


# --- Transactions ------------------------------------------------------------------


def test_a_transaction_that_raises_writes_nothing(backend: Backend, store: worker.Store) -> None:
    id = backend.running("a")
    with pytest.raises(RuntimeError), store.transaction():
        assert store.give_back_if_owned(id, "a", NOW)
        raise RuntimeError("the step failed after its write")
    assert backend.row(id)["status"] == worker.Status.RUNNING


# --- Fenced on the owner ---------------------------------------------------------------


def test_give_back_changes_only_a_row_running_under_that_owner(backend: Backend, store: worker.Store) -> None:
    mine, theirs, pending = backend.running("a"), backend.running("b"), backend.insert()
    with store.transaction():
        assert store.give_back_if_owned(mine, "a", NOW)
        assert not store.give_back_if_owned(theirs, "a", NOW)
        assert not store.give_back_if_owned(pending, "a", NOW)
        assert not store.give_back_if_owned(mine, "a", NOW)  # given back already: no longer running
    given_back = backend.row(mine)
    assert given_back["status"] == worker.Status.PENDING
    assert (given_back["owner"], given_back["worker"], given_back["started"], given_back["lease_until"]) == (None,) * 4
    assert backend.row(theirs)["status"] == worker.Status.RUNNING and backend.row(theirs)["owner"] == "b"


def test_a_row_given_back_whose_tag_a_newer_pending_row_holds_ends_cancelled(
    backend: Backend, store: worker.Store
) -> None:
    """The tag rule: the newer row (enqueued, or scheduled, while this one ran) is the job, as an enqueue with
    the tag would have made it; the table never holds two pending rows of one tag."""
    ran, newer = backend.running("a", tag="nightly"), backend.insert(tag="nightly")
    untagged = backend.running("a")
    with store.transaction():
        assert store.give_back_if_owned(ran, "a", NOW + 5) == worker.Status.CANCELLED
        assert store.give_back_if_owned(untagged, "a", NOW + 5) == worker.Status.PENDING
        assert store.give_back_if_owned(ran, "a", NOW + 5) is None  # no longer running
    cancelled = backend.row(ran)
    assert (cancelled["status"], cancelled["finished"], cancelled["lease_until"]) == ("cancelled", NOW + 5, None)
    assert cancelled["error"] == "not run to its end: a newer pending job holds its tag 'nightly' and runs in its place"
    assert backend.row(newer)["status"] == worker.Status.PENDING


def test_finish_writes_the_outcome_only_while_that_owner_holds_the_row(backend: Backend, store: worker.Store) -> None:
    mine, theirs = backend.running("a"), backend.running("b")
    with store.transaction():
        assert store.finish_if_owned(mine, "a", worker.Status.SUCCEEDED.value, NOW + 5, '{"ok":1}', None, NOW + 1, 10)
        assert not store.finish_if_owned(theirs, "a", worker.Status.FAILED.value, NOW + 5, None, "boom", None, 10)
        assert not store.finish_if_owned(mine, "a", worker.Status.FAILED.value, NOW + 6, None, "again", None, 10)
    done = backend.row(mine)
    assert (done["status"], done["result"], done["error"]) == ("succeeded", '{"ok":1}', None)
    times = (done["started"], done["finished"], done["lease_until"], done["remove_at"])
    assert times == (NOW + 1, NOW + 5, None, NOW + 15)  # removable keep_ms after it finished
    assert backend.row(theirs)["status"] == worker.Status.RUNNING


def test_finish_keeps_the_claim_time_without_a_start_and_the_rows_own_retention(
    backend: Backend, store: worker.Store
) -> None:
    own_keep, persistent = backend.running("a", keep_ms=1_000), backend.running("a", persistent=1)
    with store.transaction():
        for id in (own_keep, persistent):
            assert store.finish_if_owned(id, "a", worker.Status.FAILED.value, NOW + 5, None, "boom", None, 10)
    assert (backend.row(own_keep)["started"], backend.row(own_keep)["remove_at"]) == (NOW, NOW + 5 + 1_000)
    assert backend.row(persistent)["remove_at"] is None


def test_renew_leases_extends_only_the_rows_running_under_that_owner(backend: Backend, store: worker.Store) -> None:
    mine, theirs = backend.running("a"), backend.running("b")
    with store.transaction():
        store.renew_leases("a", NOW + 2 * LEASE)
    assert backend.row(mine)["lease_until"] == NOW + 2 * LEASE
    assert backend.row(theirs)["lease_until"] == NOW + LEASE


# --- New rows of a chain: ids from the insert itself, the tag rule kept ------------------


def test_next_attempt_is_a_new_row_of_the_chain_with_the_id_the_insert_returned(
    backend: Backend, store: worker.Store
) -> None:
    failed = backend.insert(status="failed", tag="t", attempt=2, max_attempts=5, cron_schedule="* * * * *",
                            cron_slot=NOW - 60_000, data='{"x":1}', priority=3)  # fmt: skip
    backend.insert(type="other")  # a later row: the retry's id must not be guessed from counting
    with store.transaction():
        retry = store.schedule_next_attempt(failed, due=NOW + 10, deaths=1, now=NOW)
    assert retry is not None
    new = backend.row(retry)
    chained = (new["status"], new["attempt"], new["rescheduled_from_job"], new["due"], new["deaths"])
    assert chained == ("pending", 3, failed, NOW + 10, 1)
    copied = (new["type"], new["data"], new["tag"], new["priority"], new["max_attempts"])
    assert copied == ("noop", '{"x":1}', "t", 3, 5)
    assert (new["cron_schedule"], new["cron_slot"]) == ("* * * * *", NOW - 60_000)  # a retry repeats its slot


POLICY = ("max_attempts", "retry_delay_ms", "backoff", "timeout_ms", "keep_ms")


def test_next_attempt_and_next_cron_run_copy_a_policy_left_unset_as_unset(
    backend: Backend, store: worker.Store
) -> None:
    """NULL means "the job type's": a copy must not turn it into a bound (PostgreSQL's least() ignores NULLs)."""
    failed = backend.insert(status="failed", cron_schedule="* * * * *")
    with store.transaction():
        retry = store.schedule_next_attempt(failed, due=NOW + 10, deaths=0, now=NOW)
        run = store.schedule_next_cron_run(failed, due=NOW + 60_000, now=NOW)
    assert retry is not None and run is not None
    for new in (backend.row(retry), backend.row(run)):
        assert [new[column] for column in POLICY] == [None] * 5


def test_next_attempt_yields_to_a_pending_row_of_the_same_tag(backend: Backend, store: worker.Store) -> None:
    failed = backend.insert(status="failed", tag="t")
    newer = backend.insert(tag="t")
    with store.transaction():
        assert store.schedule_next_attempt(failed, due=NOW, deaths=0, now=NOW) is None
    assert [row["id"] for row in backend.all_rows()] == [failed, newer]


def test_next_cron_run_is_a_fresh_chain_at_its_slot(backend: Backend, store: worker.Store) -> None:
    ran = backend.insert(status="succeeded", tag="cron:noop", attempt=3, deaths=1, cron_schedule="*/5 * * * *",
                         cron_timezone="Europe/Paris", cron_slot=NOW)  # fmt: skip
    with store.transaction():
        following = store.schedule_next_cron_run(ran, due=NOW + 300_000, now=NOW)
    assert following is not None
    new = backend.row(following)
    assert (new["status"], new["attempt"], new["deaths"], new["rescheduled_from_job"]) == ("pending", 1, 0, ran)
    assert (new["due"], new["cron_slot"], new["tag"]) == (NOW + 300_000, NOW + 300_000, "cron:noop")
    assert (new["cron_schedule"], new["cron_timezone"]) == ("*/5 * * * *", "Europe/Paris")
    with store.transaction():  # the schedule has its pending row now: a second one is refused
        assert store.schedule_next_cron_run(ran, due=NOW + 600_000, now=NOW) is None


# --- Processes and counts ------------------------------------------------------------------


def test_a_process_is_registered_kept_alive_and_forgotten(backend: Backend, store: worker.Store) -> None:
    process = {"id": "a", "host": "h", "pid": 1, "lease_ms": LEASE, "concurrency": 4, "queues": None,
               "version": worker.__version__, "types": '["noop"]'}  # fmt: skip
    with store.transaction():
        store.register_process({**process, "id": "gone"}, NOW - worker.DAY_MS - 1)
        store.register_process(process, NOW)
    assert set(backend.processes()) == {"a"}  # one gone for a day is forgotten
    assert backend.processes()["a"]["started"] == backend.processes()["a"]["last_seen"] == NOW
    with store.transaction():
        store.process_alive("a", 3, NOW + 20)
    assert (backend.processes()["a"]["last_seen"], backend.processes()["a"]["running"]) == (NOW + 20, 3)
    with store.transaction():
        store.forget_process("a")
    assert backend.processes() == {}


def test_finished_rows_are_counted_per_minute_queue_and_status(backend: Backend, store: worker.Store) -> None:
    minute = NOW - NOW % 60_000
    with store.transaction():
        store.count_finished([(minute + 1, "q", "succeeded"), (minute + 2, "q", "succeeded"), (minute, "q", "failed")])
    with store.transaction():
        store.count_finished([(minute + 59_999, "q", "succeeded")])
    assert sorted(backend.finished_counts()) == [(minute, "q", "failed", 1), (minute, "q", "succeeded", 3)]


# --- Claim ------------------------------------------------------------------------------------

TYPES = '["noop"]'


def claim(store: worker.Store, owner: str, limit: int, *, now: int = NOW, suspect: bool = False) -> list[worker.Job]:
    with store.transaction():
        jobs, unreadable = store.claim(owner, "host:1", now, now + LEASE, limit, TYPES, (), suspect=suspect)
    assert unreadable == []
    return jobs


def test_claim_takes_due_rows_highest_priority_first_then_oldest_and_leases_them(
    backend: Backend, store: worker.Store
) -> None:
    late = backend.insert(due=NOW - 10)
    early = backend.insert(due=NOW - 20)
    urgent = backend.insert(due=NOW, priority=5)
    backend.insert(due=NOW + 1)  # not yet due
    backend.insert(type="unknown")  # a type this worker does not run
    backend.insert(deaths=1)  # a suspect: claimed only on its own
    taken = claim(store, "a", 2)
    assert sorted(job.id for job in taken) == sorted([urgent, early])
    for job in taken:
        row = backend.row(job.id)
        assert (row["status"], row["owner"], row["started"], row["lease_until"]) == ("running", "a", NOW, NOW + LEASE)
    assert [job.id for job in claim(store, "a", 10)] == [late]
    assert claim(store, "a", 10) == []


def test_a_suspect_row_is_claimed_only_when_asked_for(backend: Backend, store: worker.Store) -> None:
    backend.insert()
    suspect = backend.insert(deaths=2)
    with store.transaction():
        assert store.any_suspect()
    assert [job.id for job in claim(store, "a", 10, suspect=True)] == [suspect]
    with store.transaction():
        assert not store.any_suspect()


def test_next_due_is_the_earliest_pending_due_of_the_types_asked_for(backend: Backend, store: worker.Store) -> None:
    with store.transaction():
        assert store.next_due(TYPES) is None
    backend.insert(due=NOW + 50, priority=-1)
    backend.insert(due=NOW + 70, priority=3)
    backend.insert(due=NOW + 10, type="unknown")
    backend.insert(due=NOW + 5, status="cancelled")
    with store.transaction():
        assert store.next_due(TYPES) == NOW + 50


def test_two_connections_claiming_at_once_never_take_the_same_row(backend: Backend) -> None:
    ids = {backend.insert() for _ in range(300)}
    stores = [backend.another_store(), backend.another_store()]
    taken: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def claim_all(number: int) -> None:
        start.wait(timeout=30)
        while batch := claim(stores[number], f"owner{number}", 7):
            taken[number].extend(job.id for job in batch)

    threads = [threading.Thread(target=claim_all, args=(number,)) for number in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(taken[0] + taken[1]) == sorted(ids)  # every row once: none twice, none lost
    for number in (0, 1):
        assert {backend.row(id)["owner"] for id in taken[number]} <= {f"owner{number}"}


def in_threads(count: int, step: Callable[[int], None]) -> None:
    """Run ``step(number)`` on ``count`` threads that start together; re-raise the first error one of them met."""
    start, errors = threading.Barrier(count), []

    def run(number: int) -> None:
        try:
            start.wait(timeout=30)
            step(number)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


def test_many_connections_claiming_and_finishing_at_once_run_every_row_exactly_once(backend: Backend) -> None:
    ids = {backend.insert() for _ in range(600)}
    stores = [backend.another_store() for _ in range(6)]
    ledger: list[tuple[int, str]] = []  # (row, owner) for every claim and every finish that held its fence

    def work(number: int) -> None:
        owner = f"owner{number}"
        while batch := claim(stores[number], owner, 5):
            with stores[number].transaction():
                for job in batch:
                    status = worker.Status.SUCCEEDED.value
                    assert stores[number].finish_if_owned(job.id, owner, status, NOW + 1, "null", None, None, 10)
            ledger.extend((job.id, owner) for job in batch)

    in_threads(len(stores), work)
    assert sorted(id for id, _ in ledger) == sorted(ids)  # each row claimed and finished once: none twice, none lost
    for id, owner in ledger:
        assert (backend.row(id)["status"], backend.row(id)["owner"]) == ("succeeded", owner)


def test_tag_replace_racing_from_two_connections_leaves_one_pending_row(backend: Backend) -> None:
    stores = [backend.another_store(), backend.another_store()]

    def replace(number: int) -> None:
        for attempt in range(40):
            with stores[number].transaction():
                stores[number].insert(new_row("t", {"by": number, "attempt": attempt}), "replace")

    in_threads(2, replace)
    rows = backend.all_rows()
    assert len(rows) == 80  # every insert made its row
    assert [row["status"] for row in rows].count("pending") == 1
    assert {row["status"] for row in rows} == {"pending", "cancelled"}


def test_tag_ignore_racing_from_two_connections_makes_one_row(backend: Backend) -> None:
    stores = [backend.another_store(), backend.another_store()]
    found: list[int] = []

    def ignore(number: int) -> None:
        for _ in range(40):
            with stores[number].transaction():
                found.append(stores[number].insert(new_row("t"), "ignore").id)

    in_threads(2, ignore)
    (only,) = backend.all_rows()
    assert set(found) == {only["id"]} and only["status"] == "pending"


def test_manual_retry_racing_from_two_connections_makes_one_retry(backend: Backend) -> None:
    stores = [backend.another_store(), backend.another_store()]
    failed = [backend.insert(status="failed") for _ in range(20)]
    retried: list[int] = []

    def retry(number: int) -> None:
        for id in failed:
            with stores[number].transaction():
                if stores[number].manual_retry(id, NOW) is not None:
                    retried.append(id)

    in_threads(2, retry)
    assert sorted(retried) == failed  # each failed row retried once, by one of them
    assert len(backend.all_rows()) == 40


# --- Rescue -------------------------------------------------------------------------------------


def test_rescue_sees_and_takes_only_leases_that_have_ended(backend: Backend, store: worker.Store) -> None:
    expired = backend.running("dead", lease_until=NOW - 1)
    alive = backend.running("live", lease_until=NOW + 1)
    mine = backend.running("me", lease_until=NOW - 1)  # the asking worker is alive: its own are not lost
    with store.transaction():
        lost, unreadable = store.expired_leases("me", NOW)
    assert [job.id for job in lost] == [expired] and unreadable == []
    with store.transaction():
        assert store.rescue_if_expired(expired, NOW, "worker lost", 10)
        assert not store.rescue_if_expired(alive, NOW, "worker lost", 10)  # renewed meanwhile: the fence holds
        assert not store.rescue_if_expired(expired, NOW, "worker lost", 10)  # rescued already
    rescued = backend.row(expired)
    assert (rescued["status"], rescued["error"], rescued["finished"], rescued["lease_until"]) == (
        "failed", "worker lost", NOW, None)  # fmt: skip
    assert backend.row(alive)["status"] == backend.row(mine)["status"] == "running"


# --- Insert: the tag rule, ids from the insert itself ----------------------------------------


@functools.cache
def producer() -> worker.Queue:
    """A Queue only to build rows with (its own database is never written): rows are the same for every store."""
    return worker.Queue(sqlite3.connect(":memory:"), check_types=False)


def new_row(tag: str | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the store's insert takes: a row as Queue._new_row makes it."""
    return producer()._new_row("noop", {"n": 1} if data is None else data, tag=tag, now=NOW)


def test_insert_returns_the_row_with_the_id_it_was_given(backend: Backend, store: worker.Store) -> None:
    backend.insert()
    with store.transaction():
        job = store.insert(new_row())
    stored = backend.row(job.id)
    assert (stored["type"], stored["data"], stored["status"], stored["due"]) == ("noop", '{"n":1}', "pending", NOW)
    assert (job.type, job.data, job.status) == ("noop", {"n": 1}, "pending")


def test_insert_replacing_a_tag_cancels_its_pending_row_and_ignoring_keeps_it(
    backend: Backend, store: worker.Store
) -> None:
    with store.transaction():
        first = store.insert(new_row("t"))
        kept = store.insert(new_row("t"), "ignore")
    assert kept.id == first.id and len(backend.all_rows()) == 1
    with store.transaction():
        second = store.insert(new_row("t"), "replace")
    assert backend.row(first.id)["status"] == "cancelled" and "replaced" in backend.row(first.id)["error"]
    assert backend.row(second.id)["status"] == "pending"
    pending = [row["id"] for row in backend.all_rows() if row["status"] == "pending"]
    assert pending == [second.id]  # one pending row per tag, whichever way


def test_a_second_pending_row_of_a_tag_is_refused_by_the_table_itself(backend: Backend) -> None:
    backend.insert(tag="t")
    with pytest.raises(backend.refused):
        backend.insert(tag="t")
    backend.insert(tag="t", status="cancelled")  # only pending rows are held to one per tag


def test_uniform_insert_returns_each_rows_id_in_the_order_given(backend: Backend, store: worker.Store) -> None:
    backend.insert()
    rows = [["noop", {"n": n}, f"q{n % 3}"] for n in range(50)]
    with store.transaction():
        ids = store.insert_uniform(new_row(), worker.JSON.encode(rows))
    assert len(set(ids)) == 50
    for id, (_, data, queue) in zip(ids, rows, strict=True):
        stored = backend.row(id)
        assert (stored["data"], stored["queue"]) == (worker.JSON.encode(data), queue)


# --- Cancel and manual retry -----------------------------------------------------------------


def test_cancel_takes_only_pending_rows(backend: Backend, store: worker.Store) -> None:
    pending, running = backend.insert(type="a"), backend.running("w", type="a")
    other = backend.insert(type="b")
    with store.transaction():
        assert store.cancel_pending(NOW, "no", 10, id=running) == 0
        assert store.cancel_pending(NOW, "stop a", 10, type="a") == 1
    assert (backend.row(pending)["status"], backend.row(pending)["error"]) == ("cancelled", "stop a")
    assert backend.row(running)["status"] == "running" and backend.row(other)["status"] == "pending"
    assert backend.finished_counts() == [(NOW - NOW % 60_000, "default", "cancelled", 1)]


def test_manual_retry_continues_only_the_end_of_a_failed_chain(backend: Backend, store: worker.Store) -> None:
    failed = backend.insert(status="failed", attempt=2, data='{"x":1}')
    pending = backend.insert()
    with store.transaction():
        retried = store.manual_retry(failed, NOW + 5)
        assert retried is not None
        assert store.manual_retry(failed, NOW + 6) is None  # a retry follows it now: the chain goes on from there
        assert store.manual_retry(pending, NOW) is None  # pending: nothing to retry
    assert (retried.attempt, retried.rescheduled_from_job, retried.due, retried.data) == (3, failed, NOW + 5, {"x": 1})
    assert backend.row(retried.id)["status"] == "pending"
    with store.transaction():
        assert store.retryable_failed(None) == []


def test_the_store_judges_leases_by_its_clock(backend: Backend, store: worker.Store) -> None:
    assert abs(store.now() - worker.now_ms()) < 60_000  # the SQLite store's own: the system clock unless given
    held = backend.running("dead", lease_until=store.now() - 1)
    with store.transaction():
        lost, _ = store.expired_leases("me", store.now())
    assert [job.id for job in lost] == [held]


# --- Wake-up: a seam of its own ------------------------------------------------------------


def eventually(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Whether ``condition`` holds within ``timeout`` seconds (a wake-up may learn of a commit a moment after it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_wake_up_sees_a_commit_by_another_connection_and_only_then(backend: Backend) -> None:
    wake_up = backend.wake_up()
    wake_up.start(lambda: None)
    try:
        wake_up.changed()  # the first look only learns where things stand
        assert not wake_up.changed()
        other = backend.another_store()
        with other.transaction():
            other.insert(new_row(), "replace")
        assert eventually(wake_up.changed)
        assert not wake_up.changed()
    finally:
        wake_up.stop()


def test_wake_up_calls_wake_on_a_commit_only_while_armed_and_once_per_arming(backend: Backend) -> None:
    woken = threading.Event()
    wake_up = backend.wake_up()
    wake_up.start(woken.set)
    try:
        assert wake_up.pushes  # inotify on Linux; LISTEN on PostgreSQL
        other = backend.another_store()
        with other.transaction():
            other.insert(new_row(), "replace")
        assert not woken.wait(0.2)  # disarmed: a busy worker is not woken per commit
        wake_up.arm(True)
        with other.transaction():
            other.insert(new_row(), "replace")
        assert woken.wait(10)
        woken.clear()
        with other.transaction():
            other.insert(new_row(), "replace")
        assert not woken.wait(0.2)  # once per arming: the worker, woken, looks anyway
        wake_up.arm(True)
        with other.transaction():
            other.insert(new_row(), "replace")
        assert woken.wait(10)
    finally:
        wake_up.stop()
    assert not wake_up.pushes


# --- PostgreSQL only: many writers, the server's clock, its errors as the engine's ---------


@pytest.fixture
def postgres(postgres_db: str) -> Iterator[PostgresBackend]:
    made = PostgresBackend(postgres_db)
    yield made
    made.close()


def backend_pid(store: Any) -> int:
    return int(store.conn.info.backend_pid)


def test_a_terminated_connection_is_unavailable_and_the_next_transaction_connects_again(
    postgres: PostgresBackend,
) -> None:
    id = postgres.insert()
    store = postgres.postgres_store
    postgres.raw.execute("SELECT pg_terminate_backend(%s)", (backend_pid(store),))
    with pytest.raises(worker.DatabaseUnavailable) as lost, store.transaction():
        store.get(id)
    assert lost.value.__cause__ is not None  # chained to psycopg's error, which never escapes
    with store.transaction():
        job = store.get(id)
    assert job is not None and job.id == id


def test_a_terminated_connection_at_commit_is_unavailable_and_writes_nothing(postgres: PostgresBackend) -> None:
    id = postgres.running("a")
    store = postgres.postgres_store
    with pytest.raises(worker.DatabaseUnavailable), store.transaction():
        assert store.give_back_if_owned(id, "a", NOW)
        postgres.raw.execute("SELECT pg_terminate_backend(%s)", (backend_pid(store),))
    assert postgres.row(id)["status"] == "running"


def test_a_statement_the_table_refuses_is_a_database_error_not_psycopgs(postgres: PostgresBackend) -> None:
    import psycopg

    failed = postgres.insert(status="failed", attempt=worker.MAX_COUNT)  # its next attempt cannot exist
    store = postgres.postgres_store
    with pytest.raises(worker.DatabaseError) as refused, store.transaction():
        store.schedule_next_attempt(failed, due=NOW, deaths=0, now=NOW)
    assert not isinstance(refused.value, worker.DatabaseUnavailable)  # retrying would not help
    assert isinstance(refused.value.__cause__, psycopg.errors.CheckViolation)
    with pytest.raises(worker.DatabaseError), store.transaction() as conn:
        conn.execute("SELECT no_such_column FROM worker_jobs")  # the caller's own statement, in the transaction


def test_a_missing_database_is_unusable_and_the_message_hides_the_password(postgres_db: str) -> None:
    import worker_postgres

    url = "postgresql://postgres:s3cret@127.0.0.1:5432/worker_no_such_database"
    with pytest.raises(worker.DatabaseUnusable) as unusable:
        worker_postgres.open_store(url)
    message = str(unusable.value)
    assert "postgresql://postgres@127.0.0.1:5432/worker_no_such_database" in message and "s3cret" not in message
    assert "does not exist" in message and "\n" not in message


def test_a_server_out_of_reach_is_unavailable_for_now(postgres_db: str) -> None:
    import worker_postgres

    with pytest.raises(worker.DatabaseUnavailable) as unavailable:
        worker_postgres.open_store("postgresql://postgres:s3cret@127.0.0.1:1/worker")  # nothing listens on port 1
    assert not isinstance(unavailable.value, worker.DatabaseUnusable)
    assert "s3cret" not in str(unavailable.value) and "\n" not in str(unavailable.value)


def test_leases_are_judged_by_the_servers_clock_not_the_hosts(
    postgres: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_postgres

    two_hours_ns = 2 * 3600 * 10**9
    real_time_ns, real_time = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + two_hours_ns)  # this host's wall clock is wrong
    monkeypatch.setattr(time, "time", lambda: real_time() + two_hours_ns / 1e9)
    store = worker_postgres.open_store(postgres.url)
    try:
        server_ms = postgres.raw.execute(worker_postgres.PostgresStore.SERVER_TIME_SQL).fetchone()
        assert server_ms is not None
        assert abs(store.now() - next(iter(server_ms.values()))) < 1_000
        store.refresh_clock()  # as the worker's heartbeat does
        assert abs(store.now() - worker.now_ms() + two_hours_ns // 10**6) < 1_000
    finally:
        store.close()


def test_a_given_clock_is_what_the_store_judges_leases_by(postgres: PostgresBackend) -> None:
    import worker_postgres

    store = worker_postgres.open_store(postgres.url, clock=lambda: NOW)
    try:
        assert store.now() == NOW
    finally:
        store.close()


def test_wake_up_listens_again_after_its_connection_is_terminated(postgres: PostgresBackend) -> None:
    import worker_postgres

    woken = threading.Event()
    wake_up = worker_postgres.PostgresWakeUp(postgres.url)
    wake_up.start(woken.set)
    try:
        wake_up.arm(True)
        postgres.raw.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'LISTEN worker_jobs'"
        )
        assert eventually(lambda: not wake_up.pushes)
        assert wake_up.changed()  # meanwhile the worker polls: every look may find something
        assert eventually(lambda: wake_up.pushes)  # listening again, after a backoff
        woken.clear()
        postgres.insert()
        assert woken.wait(10)
    finally:
        wake_up.stop()


def test_poll_only_wake_up_never_listens_and_always_says_look(postgres: PostgresBackend) -> None:
    import worker_postgres

    wake_up = worker_postgres.PostgresWakeUp(postgres.url, listen=False)  # PgBouncer in transaction mode
    wake_up.start(lambda: None)
    try:
        assert not wake_up.pushes
        assert wake_up.changed() and wake_up.changed()
        listening = postgres.raw.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
        )
        assert listening.fetchone() == {"n": 0}
    finally:
        wake_up.stop()


def test_one_insert_statement_of_many_rows_sends_one_notification(postgres: PostgresBackend) -> None:
    import psycopg

    listener = psycopg.connect(postgres.url, autocommit=True)
    try:
        listener.execute("LISTEN worker_jobs")
        postgres.raw.execute("INSERT INTO worker_jobs (type, data) SELECT 'noop', '{}' FROM generate_series(1, 50)")
        postgres.raw.execute("INSERT INTO worker_jobs (type, data) VALUES ('noop', '{}')")
        notified = list(listener.notifies(timeout=0.5))
    finally:
        listener.close()
    assert [notice.channel for notice in notified] == ["worker_jobs", "worker_jobs"]


def test_a_batch_finish_writes_each_outcome_only_where_that_owner_holds_the_row(postgres: PostgresBackend) -> None:
    mine, theirs, failing, persistent = (postgres.running("a"), postgres.running("b"), postgres.running("a"),
                                         postgres.running("a", persistent=1))  # fmt: skip
    store = postgres.postgres_store
    outcomes = [
        (mine, "succeeded", '{"ok":1}', None, NOW + 1, 10),
        (theirs, "succeeded", "null", None, None, 10),
        (failing, "failed", None, "boom", None, 20),
        (persistent, "succeeded", "null", None, None, 10),
    ]
    with store.transaction():
        assert store.finish_many_if_owned("a", NOW + 5, outcomes) == {mine, failing, persistent}
        assert store.finish_many_if_owned("a", NOW + 6, outcomes) == set()  # ended already
        assert store.finish_many_if_owned("a", NOW + 6, []) == set()
    done = postgres.row(mine)
    assert (done["status"], done["result"], done["started"], done["finished"], done["remove_at"]) == (
        "succeeded", '{"ok":1}', NOW + 1, NOW + 5, NOW + 15)  # fmt: skip
    assert (postgres.row(failing)["error"], postgres.row(failing)["started"]) == ("boom", NOW)
    assert postgres.row(failing)["remove_at"] == NOW + 25 and postgres.row(persistent)["remove_at"] is None
    assert postgres.row(theirs)["status"] == "running"


def test_a_claim_walks_the_claim_index_for_its_limit_whatever_the_backlog(postgres: PostgresBackend) -> None:
    store = postgres.postgres_store
    postgres.raw.execute(
        "INSERT INTO worker_jobs (type, due) SELECT 'noop', %s - n FROM generate_series(1, 20000) AS n", (NOW,)
    )
    params = {"now": NOW, "worker": "w", "owner": "a", "lease_until": NOW + LEASE, "limit": 10, "queues": None,
              "types": ["noop"]}  # fmt: skip
    with store.transaction() as conn:  # no statistics: autovacuum is off here, and ANALYZE never ran
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN ANALYZE " + store._claim_sqls["fast", False], params))
    assert "Index Scan using worker_jobs_claim" in plan and "Sort" not in plan, plan
    assert re.search(r"Index Scan using worker_jobs_claim .* rows=10 loops=1", plan), plan  # read 10 rows, not 20,000


def test_rows_due_later_are_never_read_by_a_claim_nor_by_the_next_due_time(postgres: PostgresBackend) -> None:
    """100,000 pending rows due tomorrow, at two priorities, and none due: a claim finds nothing and the next due
    time is found by reading a few index pages per priority.  (A claim read the whole due-later range, 40 ms at
    1,000,000 rows, and the next due time aggregated every row of a priority, 590 ms.)"""
    store = postgres.postgres_store
    postgres.raw.execute(
        "INSERT INTO worker_jobs (type, due, priority) SELECT 'noop', %s + 86400000 + n, n %% 2"
        " FROM generate_series(1, 100000) AS n",
        (NOW,),
    )  # fmt: skip
    params = {"now": NOW, "worker": "w", "owner": "a", "lease_until": NOW + LEASE, "limit": 10, "queues": None,
              "types": ["noop"]}  # fmt: skip
    pages = {}
    with store.transaction() as conn:  # no statistics: autovacuum is off here, and ANALYZE never ran
        for name, sql in (("claim", store._claim_sqls["fast", False]), ("next due", store._next_due_sql)):
            plan = [row[0] for row in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)]
            pages[name] = sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", plan[1]))  # the whole statement's
        assert store.next_due('["noop"]') == NOW + 86400000 + 1
    assert max(pages.values()) < 50, pages  # the 100,000 rows' index entries alone fill about 300 pages


def test_a_batch_finish_looks_its_rows_up_by_key_whatever_the_table_holds(postgres: PostgresBackend) -> None:
    """The plan that a prepared statement settles on (generic), on a table without statistics: a join of the
    outcomes to the table once scanned all of it and unpacked the outcomes for each running row."""
    store = postgres.postgres_store
    postgres.raw.execute(
        "INSERT INTO worker_jobs (type, due, status, owner, lease_until)"
        " SELECT 'noop', %s, 'running', 'a', %s FROM generate_series(1, 5000)",
        (NOW, NOW + LEASE),
    )  # fmt: skip
    ids = [row["id"] for row in postgres.raw.execute("SELECT id FROM worker_jobs ORDER BY id LIMIT 300")]
    outcomes = json.dumps({str(id): ["succeeded", "null", None, NOW, 10] for id in ids})
    with store.transaction() as conn:
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        sql = store.FINISH_MANY_SQL.replace("%(outcomes)s", "$1").replace("%(now)s", "$2").replace("%(owner)s", "$3")
        conn.execute(f"PREPARE finish_many (jsonb, bigint, text) AS {sql}")
        explained = conn.execute(f"EXPLAIN ANALYZE EXECUTE finish_many ('{outcomes}', {NOW}, 'a')")
        plan = "\n".join(row[0] for row in explained)
        conn.execute("DEALLOCATE finish_many")
    assert "Index Scan using worker_jobs_pkey" in plan and "Seq Scan on worker_jobs" not in plan, plan
    assert re.search(r"Update on worker_jobs .* rows=300 loops=1", plan), plan


def test_a_store_used_after_fork_refuses_and_leaves_the_parents_connection_working(postgres: PostgresBackend) -> None:
    import os

    store = postgres.postgres_store
    pid = os.fork()
    if pid == 0:  # the child: a transaction on the parent's connection is refused, and nothing is sent on it
        try:
            with store.transaction():
                pass
        except worker.ForkedConnection:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with store.transaction():
        assert store.get(postgres.insert()) is not None


def test_maintain_vacuums_only_where_nothing_else_would(backend: Backend, store: worker.Store) -> None:
    """SQLite needs no upkeep; PostgreSQL gets VACUUM from the worker only when the server's autovacuum is off."""
    for _ in range(20):
        backend.insert(status="succeeded", finished=NOW)
    done = store.maintain()
    if backend.name == "sqlite":
        assert done is None
        return
    autovacuum = backend.raw.execute("SELECT current_setting('autovacuum')::bool").fetchone()  # type: ignore[attr-defined]
    if autovacuum and next(iter(autovacuum.values())):
        assert done is None
    else:
        assert done is not None and done.startswith("vacuumed worker_jobs")
        vacuumed = backend.raw.execute(  # type: ignore[attr-defined]
            "SELECT last_vacuum IS NOT NULL AS done FROM pg_stat_user_tables WHERE relname = 'worker_jobs'"
        ).fetchone()
        assert vacuumed == {"done": True}


def test_a_savepoint_fails_alone_and_its_transaction_goes_on(backend: Backend, store: worker.Store) -> None:
    """What the worker needs to fail one unreadable row inside a claim (PostgreSQL aborts a whole transaction)."""
    first, second = backend.running("me"), backend.running("me")
    with store.transaction():
        with pytest.raises(worker.DatabaseError), store.savepoint():  # result must be JSON: the table refuses it
            store.finish_if_owned(first, "me", "succeeded", NOW, "{oops", None, None, 1000)
        assert store.finish_if_owned(second, "me", "succeeded", NOW, "1", None, None, 1000)
    assert (backend.row(first)["status"], backend.row(second)["status"]) == ("running", "succeeded")
