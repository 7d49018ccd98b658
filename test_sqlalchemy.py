"""``Queue`` inside SQLAlchemy 2's transactions, on SQLite (pysqlite) and PostgreSQL (psycopg): the job commits
and rolls back with the app's own writes, whichever of SQLAlchemy's objects the app hands over.

The same scenarios on both stores: the app's ``orders`` table beside the
worker's, and ``counts`` read by another connection (what is committed).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import orm

import worker
from worker import Queue

pytestmark = pytest.mark.stores("sqlite", "postgres")

ORDERS = {
    "sqlite": "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)",
    "postgres": "CREATE TABLE orders (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, item TEXT NOT NULL)",
}
ORDER_INSERT = sqlalchemy.text("INSERT INTO orders (item) VALUES ('book')")
Counts = Callable[[], tuple[int, int]]


@pytest.fixture
def counts(db: str) -> Counts:
    """(orders, jobs) as another program sees them: what is committed."""
    sql = "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM worker_jobs)"

    def read() -> tuple[int, int]:
        if worker.is_postgres(db):
            with psycopg.connect(db, autocommit=True) as conn:
                row = conn.execute(sql).fetchone()
        else:
            with sqlite3.connect(db) as conn:
                row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0], row[1]

    return read


@pytest.fixture
def engine(db: str, store_kind: str) -> Iterator[sqlalchemy.Engine]:
    """The app's engine on the test's database, which holds the app's orders table and the worker's (empty)."""
    with Queue(db):
        pass
    url = db.replace("postgresql://", "postgresql+psycopg://", 1) if store_kind == "postgres" else f"sqlite:///{db}"
    made = sqlalchemy.create_engine(url)
    with made.begin() as connection:
        connection.execute(sqlalchemy.text("DROP TABLE IF EXISTS orders"))
        connection.execute(sqlalchemy.text(ORDERS[store_kind]))
    yield made
    made.dispose()


def test_a_session_before_its_first_flush_rolls_back_the_job(engine: sqlalchemy.Engine, counts: Counts) -> None:
    with orm.Session(engine) as session:
        Queue(session, check_types=False).enqueue("send_receipt", {"order": 1})
        session.execute(ORDER_INSERT)
        session.rollback()
    assert counts() == (0, 0)
    with orm.Session(engine) as session:
        Queue(session, check_types=False).enqueue("send_receipt", {"order": 1})
        session.execute(ORDER_INSERT)
        assert counts() == (0, 0)
        session.commit()
    assert counts() == (1, 1)


def test_a_session_that_raises_in_begin_leaves_no_job(engine: sqlalchemy.Engine, counts: Counts) -> None:
    with pytest.raises(RuntimeError), orm.Session(engine) as session, session.begin():
        session.execute(sqlalchemy.text("SELECT 1"))
        Queue(session, check_types=False).enqueue("send_receipt", {"order": 1})
        session.execute(ORDER_INSERT)
        raise RuntimeError("the order failed")
    assert counts() == (0, 0)


def test_a_nested_transaction_rolls_back_the_job_and_the_outer_one_commits(
    engine: sqlalchemy.Engine, counts: Counts
) -> None:
    with orm.Session(engine) as session, session.begin():
        session.execute(ORDER_INSERT)
        with pytest.raises(RuntimeError), session.begin_nested():
            Queue(session, check_types=False).enqueue("send_receipt", {"order": 1})
            raise RuntimeError("the receipt is not wanted after all")
        Queue(session, check_types=False).enqueue("audit", {})
    assert counts() == (1, 1)


def test_a_connection_commits_and_rolls_back_the_job_with_it(engine: sqlalchemy.Engine, counts: Counts) -> None:
    with engine.connect() as connection:
        Queue(connection, check_types=False).enqueue("send_receipt", {"order": 1})
        connection.rollback()
        assert counts() == (0, 0)
        Queue(connection, check_types=False).enqueue("send_receipt", {"order": 2})
        connection.execute(ORDER_INSERT)
        connection.commit()
    assert counts() == (1, 1)
    with engine.begin() as connection:
        Queue(connection, check_types=False).enqueue("audit", {})
    assert counts() == (1, 2)


def test_a_pooled_connection_is_a_dbapi_connection(engine: sqlalchemy.Engine, counts: Counts) -> None:
    raw = engine.raw_connection()
    Queue(raw, check_types=False).enqueue("send_receipt", {"order": 1})
    raw.rollback()
    assert counts() == (0, 0)
    Queue(raw, check_types=False).enqueue("send_receipt", {"order": 2})
    raw.commit()
    raw.close()
    assert counts() == (0, 1)
