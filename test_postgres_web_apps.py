"""Living inside a web app on PostgreSQL: Queue(conn) enqueues exactly as the app's own INSERT would.

On a psycopg 3 connection (autocommit off and on, in the app's own
transaction blocks and savepoints) and Django 5.2 on PostgreSQL (``atomic()``):
a job enqueued inside the app's transaction commits and rolls back with it,
wherever in the transaction it was enqueued, as test_web_apps.py holds for
SQLite (SQLAlchemy's objects, on both stores, are test_sqlalchemy.py's).  Each
test reads the tables back from a connection of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row, namedtuple_row

import worker
from conftest import HERE
from worker import Queue, Worker

ORDERS = "CREATE TABLE orders (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, item TEXT NOT NULL)"
ORDER = "INSERT INTO orders (item) VALUES ('book')"


@pytest.fixture
def app_db(postgres_db: str) -> str:
    """The test run's database with the app's orders table beside the worker's (both empty)."""
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS orders")
        conn.execute(ORDERS)
    return postgres_db


def counts(url: str) -> tuple[int, int]:
    """(orders, jobs) as another connection sees them: what is committed."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM worker_jobs)").fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.fixture
def connect(app_db: str) -> Iterator[Callable[..., psycopg.Connection[Any]]]:
    """The app's psycopg connections to the database, closed after the test."""
    made: list[psycopg.Connection[Any]] = []

    def make(**options: Any) -> psycopg.Connection[Any]:
        made.append(psycopg.connect(app_db, **options))
        return made[-1]

    yield make
    for conn in made:
        conn.close()


# Each way an app's transaction may reach the enqueue: the job is the first
# statement, after a read, after the app's INSERT, several at once, or tagged.
def enqueue_first(conn: Any) -> None:
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.execute(ORDER)


def select_then_enqueue(conn: Any) -> None:
    conn.execute("SELECT count(*) FROM orders").fetchall()
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.execute(ORDER)


def insert_then_enqueue(conn: Any) -> None:
    conn.execute(ORDER)
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})


def enqueue_many_first(conn: Any) -> None:
    Queue(conn, check_types=False).enqueue_many([("send_receipt", {"order": 1}), ("audit", {})])
    conn.execute(ORDER)


def tagged_enqueue_first(conn: Any) -> None:
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1}, tag="receipt-1")
    conn.execute(ORDER)


STEPS = [enqueue_first, select_then_enqueue, insert_then_enqueue, enqueue_many_first, tagged_enqueue_first]
Step = Callable[[Any], None]


# --- psycopg 3 ---------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_rollback_leaves_no_job_wherever_it_was_enqueued_and_commit_keeps_it(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]], step: Step
) -> None:
    conn = connect()  # psycopg's default: autocommit off, the first statement opens a transaction
    step(conn)
    assert counts(app_db) == (0, 0)  # another connection sees nothing before the commit
    conn.rollback()
    assert counts(app_db) == (0, 0)
    step(conn)
    conn.commit()
    orders, jobs = counts(app_db)
    assert orders == 1 and jobs >= 1


@pytest.mark.parametrize("autocommit", [False, True])
@pytest.mark.parametrize("step", STEPS)
def test_the_apps_transaction_block_is_joined(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]], step: Step, autocommit: bool
) -> None:
    conn = connect(autocommit=autocommit)
    with pytest.raises(RuntimeError), conn.transaction():
        step(conn)
        raise RuntimeError("the payment failed")
    assert counts(app_db) == (0, 0)
    with conn.transaction():
        step(conn)
    conn.commit()  # with autocommit off, conn.transaction() on an idle connection commits by itself; this is a no-op
    assert counts(app_db)[0] == 1


def test_rolling_back_to_the_apps_savepoint_takes_the_job_with_it(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    """Django's nested atomic(), by hand: the inner block's rollback takes the job, the outer commit keeps the order."""
    conn = connect()
    conn.execute(ORDER)
    conn.execute("SAVEPOINT inner_block")
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.execute("ROLLBACK TO inner_block")
    Queue(conn, check_types=False).enqueue("audit", {})
    conn.commit()
    assert counts(app_db) == (1, 1)


def test_an_autocommit_connection_commits_the_job_by_itself(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    conn = connect(autocommit=True)
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert counts(app_db) == (0, 1)


def test_a_failed_enqueue_leaves_the_apps_transaction_usable_and_as_it_was(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    """The server refused the enqueue (a lock wait ran out): the app's own writes go on and commit."""
    other = connect()  # another request, enqueueing the same tag in a transaction still open
    Queue(other, check_types=False).enqueue("send_receipt", {"order": 1}, tag="receipt-1")
    conn = connect()
    conn.execute("SET lock_timeout = '50ms'")
    conn.execute(ORDER)
    with pytest.raises(worker.DatabaseUnavailable):
        Queue(conn, check_types=False).enqueue("send_receipt", {"order": 2}, tag="receipt-1")
    with pytest.raises(worker.InvalidJobData):  # refused before any SQL
        Queue(conn, check_types=False).enqueue("send_receipt", {"not json": {1, 2}})
    conn.execute(ORDER)
    conn.commit()
    assert counts(app_db) == (2, 0)
    other.rollback()


def test_a_transaction_the_app_has_already_failed_is_the_engines_error_not_psycopgs(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    conn = connect()
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT * FROM no_such_table")
    with pytest.raises(worker.DatabaseError, match="current transaction is aborted"):
        Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.rollback()
    enqueue_first(conn)
    conn.commit()
    assert counts(app_db) == (1, 1)


@pytest.mark.parametrize("row_factory", [dict_row, namedtuple_row])
def test_the_apps_row_factory_is_the_apps_own(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]], row_factory: Any
) -> None:
    """Apps often read rows as dicts: the worker's statements on that connection read them as tuples, as ever."""
    conn = connect(row_factory=row_factory)
    queue = Queue(conn, check_types=False)
    first = queue.enqueue("send_receipt", {"order": 1}, tag="receipt-1")
    assert queue.enqueue("send_receipt", {"order": 1}, tag="receipt-1", on_conflict="ignore").id == first.id
    assert len(queue.enqueue_many([("audit", {}), ("audit", {})])) == 2
    assert queue.cancel(first.id)
    found = queue.get(first.id)
    assert found is not None and found.status == "cancelled"
    mine = conn.execute("SELECT count(*) AS jobs FROM worker_jobs").fetchone()  # still as the app reads rows
    assert (mine["jobs"] if row_factory is dict_row else mine.jobs) == 3
    conn.commit()
    assert counts(app_db) == (0, 3)


def test_the_tables_are_made_in_the_apps_transaction_and_go_with_its_rollback(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    """An app's test database before any worker ran there: the first Queue(conn) makes the tables."""
    with psycopg.connect(app_db, autocommit=True) as admin:
        admin.execute("DROP TABLE worker_jobs, worker_processes, worker_finished_per_minute, worker_schema")
    conn = connect()
    enqueue_first(conn)
    conn.rollback()
    with psycopg.connect(app_db) as other:
        assert other.execute("SELECT to_regclass('worker_jobs')").fetchone() == (None,)
    enqueue_first(conn)
    conn.commit()
    assert counts(app_db) == (1, 1)


def test_an_async_connection_is_refused_clearly(app_db: str) -> None:
    async def enqueue() -> None:
        conn = await psycopg.AsyncConnection.connect(app_db)
        try:
            Queue(conn, check_types=False)
        finally:
            await conn.close()

    with pytest.raises(TypeError, match="AsyncConnection"):
        asyncio.run(enqueue())


def test_a_job_the_app_committed_is_run_by_a_worker(
    app_db: str, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    @worker.job
    def send_receipt(ctx: worker.JobContext, order: int) -> dict[str, int]:
        return {"sent": order}

    conn = connect()
    insert_then_enqueue(conn)
    conn.commit()
    Worker(app_db, cron=False, burst=True).run()
    with Queue(app_db) as queue:
        done = queue.get(1)
    assert done is not None and (done.status, done.result) == ("succeeded", {"sent": 1})


# --- Django 5.2 on PostgreSQL -----------------------------------------------------------

# Django's settings are the process's own: so in a process of its own.
DJANGO_APP = """
import sys
import django
from django.conf import settings

settings.configure(DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql", "NAME": sys.argv[1], "USER": "postgres", "HOST": "127.0.0.1",
    "PORT": 5432, "OPTIONS": {"server_side_binding": sys.argv[2] == "server"}}})
django.setup()
from django.db import connection, transaction
from worker import Queue

def counts():
    with connection.cursor() as cursor:
        cursor.execute("SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM worker_jobs)")
        return cursor.fetchone()

def order():
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO orders (item) VALUES ('book')")

class Declined(Exception):
    pass

try:
    with transaction.atomic():  # the view of the README: the order and its job, or neither
        Queue(connection, check_types=False).enqueue("send_receipt", {"order": 1})
        order()
        raise Declined
except Declined:
    pass
print("rolled back", *counts())

with transaction.atomic():
    order()
    Queue(connection, check_types=False).enqueue_many([("send_receipt", {"order": 1}), ("audit", {})])
    try:
        with transaction.atomic():  # a savepoint: its rollback takes this job alone
            Queue(connection, check_types=False).enqueue("send_receipt", {"order": 1}, tag="receipt-1")
            raise Declined
    except Declined:
        pass
print("committed", *counts())

Queue(connection, check_types=False).enqueue("audit", {})  # outside atomic(): Django's autocommit
transaction.on_commit(lambda: None)
print("autocommit", *counts())
"""


@pytest.mark.parametrize("binding", ["client", "server"])
def test_django_atomic_commits_and_rolls_back_the_job_with_the_apps_writes(
    app_db: str, binding: str, tmp_path: Any
) -> None:
    name = app_db.rsplit("/", 1)[1]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(DJANGO_APP), name, binding], cwd=HERE,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["rolled back 0 0", "committed 1 2", "autocommit 1 3"]
    assert counts(app_db) == (1, 3)


def test_djangos_own_options_stay_out_of_the_workers_url() -> None:
    """server_side_binding (as the Django app above sets it), isolation_level, ...: Django's, not libpq's."""
    import worker_cli

    options = {"server_side_binding": True, "isolation_level": psycopg.IsolationLevel.SERIALIZABLE,
               "prepare_threshold": None, "sslmode": "require", "connect_timeout": 5}  # fmt: skip
    url = worker_cli._django_postgres_url({"NAME": "shop", "USER": "app", "HOST": "db.internal", "OPTIONS": options})
    assert url == "postgresql://app@db.internal/shop?sslmode=require&connect_timeout=5"
    assert psycopg.conninfo.conninfo_to_dict(url)["sslmode"] == "require"  # libpq takes it
