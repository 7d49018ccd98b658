"""One table contract on two databases: schema_postgres.sql holds to schema.sql's columns, defaults, checks and indexes.

Type mapping: SQLite's INTEGER (64-bit) is BIGINT, REAL is DOUBLE PRECISION,
TEXT is TEXT; data and result stay JSON text on both.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import worker

psycopg = pytest.importorskip("psycopg")
worker_postgres = pytest.importorskip("worker_postgres")

TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text"}
TABLES = ("worker_jobs", "worker_processes", "worker_finished_per_minute", "worker_schema", "worker_queues")


@pytest.fixture
def sqlite() -> Iterator[sqlite3.Connection]:
    """A fresh SQLite database with schema.sql applied."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    worker.apply_schema(conn)
    yield conn
    conn.close()


@pytest.fixture
def postgres(postgres_db: str) -> Iterator[Any]:
    """A connection, as any other program's, to the test database with schema_postgres.sql applied."""
    conn = psycopg.connect(postgres_db, autocommit=True)
    yield conn
    conn.close()


def sqlite_columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(name, TYPES[kind]) for _, name, kind, *_ in conn.execute(f"PRAGMA table_info({table})")]


def postgres_columns(conn: Any, table: str) -> list[tuple[str, str]]:
    found = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    return [tuple(row) for row in found]


@pytest.mark.parametrize("table", TABLES)
def test_both_tables_have_the_same_columns_in_the_same_order_with_mapped_types(
    sqlite: sqlite3.Connection, postgres: Any, table: str
) -> None:
    assert postgres_columns(postgres, table) == sqlite_columns(sqlite, table)


def test_a_row_of_just_type_and_data_gets_the_same_defaults_on_both(sqlite: sqlite3.Connection, postgres: Any) -> None:
    insert = "INSERT INTO worker_jobs (type, data) VALUES ('x', '{}')"
    sqlite.execute(insert)
    postgres.execute(insert)
    names = [name for name, _ in sqlite_columns(sqlite, "worker_jobs")]
    on_sqlite = dict(zip(names, sqlite.execute("SELECT * FROM worker_jobs").fetchone(), strict=True))
    on_postgres = dict(zip(names, postgres.execute("SELECT * FROM worker_jobs").fetchone(), strict=True))
    for time_column in ("due", "created_at"):  # both the time of the insert, in epoch ms
        sqlite_ms, postgres_ms = on_sqlite.pop(time_column), on_postgres.pop(time_column)
        assert abs(sqlite_ms - postgres_ms) < 1_000 and abs(postgres_ms - worker.now_ms()) < 1_000
    assert on_postgres == on_sqlite


def sqlite_statuses(table: str) -> list[str]:
    _, create = worker._schema_objects()[table]
    found = re.search(r"CHECK \(status IN \(([^)]*)\)\)", create)
    assert found
    return [value.strip().strip("'") for value in found.group(1).split(",")]


def postgres_statuses(conn: Any, table: str) -> list[str]:
    (definition,) = [
        row[0]
        for row in conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
            (table,),
        )
        if "status = ANY" in row[0]
    ]
    return re.findall(r"'(\w+)'::text", definition)


@pytest.mark.parametrize("table", ["worker_jobs", "worker_finished_per_minute"])
def test_status_is_checked_for_the_same_states(postgres: Any, table: str) -> None:
    assert postgres_statuses(postgres, table) == sqlite_statuses(table)


def normalised(columns: str, where: str | None) -> tuple[str, str]:
    def plain(text: str) -> str:
        return " ".join(re.sub(r"::\w+|[()]", " ", text).lower().split())

    return plain(columns), plain(where or "")


def sqlite_indexes(conn: sqlite3.Connection) -> dict[str, tuple[bool, str, str]]:
    made = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    indexes = {}
    for name, sql in made:
        found = re.match(r"CREATE (UNIQUE )?INDEX \w+\s+ON (\w+) \((.*?)\)(?: WHERE (.*))?$", sql, re.DOTALL)
        assert found, sql
        indexes[name] = (bool(found.group(1)), found.group(2), *normalised(found.group(3), found.group(4)))
    return indexes


def postgres_indexes(conn: Any) -> dict[str, tuple[bool, str, str]]:
    made = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'worker\\_%%'")
    indexes = {}
    for name, sql in made:
        found = re.match(
            r"CREATE (UNIQUE )?INDEX \w+ ON (?:public\.)?(\w+) USING btree \((.*?)\)(?: WHERE (.*))?$", sql
        )
        assert found, sql
        if name.endswith("_pkey"):
            continue  # a PRIMARY KEY (SQLite's are not listed as indexes)
        indexes[name] = (bool(found.group(1)), found.group(2), *normalised(found.group(3), found.group(4)))
    return indexes


def test_the_same_indexes_by_name_cover_the_same_columns_and_rows(sqlite: sqlite3.Connection, postgres: Any) -> None:
    on_postgres = postgres_indexes(postgres)
    assert on_postgres == sqlite_indexes(sqlite)
    assert on_postgres["worker_jobs_pending_tag"] == (
        True,
        "worker_jobs",
        "tag",
        "status = 'pending' and tag is not null",
    )


def test_a_bare_insert_from_psql_runs(postgres_db: str) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("no psql on PATH")
    done = subprocess.run(
        [psql, postgres_db, "-v", "ON_ERROR_STOP=1", "-c", "INSERT INTO worker_jobs (type, data) VALUES ('x', '{}')"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "INSERT 0 1"


INVALID_ROWS = {
    "data not an object": {"data": "[1]"},
    "data not JSON": {"data": "nope"},
    "result not JSON": {"result": "nope"},
    "an unknown status": {"status": "done"},
    "running without a lease": {"status": "running", "owner": "a"},
    "negative deaths": {"deaths": -1},
    "attempt 0": {"attempt": 0},
    "attempts past 2^31-1": {"max_attempts": 2**31},
    "a retry delay over 100 years": {"retry_delay_ms": worker.MAX_DURATION_MS + 1},
    "persistent neither 0 nor 1": {"persistent": 2},
}


@pytest.mark.parametrize("columns", INVALID_ROWS.values(), ids=INVALID_ROWS.keys())
def test_both_tables_refuse_the_same_invalid_rows(
    sqlite: sqlite3.Connection, postgres: Any, columns: dict[str, Any]
) -> None:
    columns = {"type": "x", **columns}
    names = ", ".join(columns)
    with pytest.raises(sqlite3.IntegrityError):
        sqlite.execute(
            f"INSERT INTO worker_jobs ({names}) VALUES ({', '.join('?' * len(columns))})", list(columns.values())
        )
    with pytest.raises((psycopg.errors.IntegrityError, psycopg.errors.DataError)):
        postgres.execute(
            f"INSERT INTO worker_jobs ({names}) VALUES ({', '.join(['%s'] * len(columns))})", list(columns.values())
        )


def test_a_schema_newer_than_the_code_is_unusable(postgres: Any, postgres_db: str) -> None:
    postgres.execute("UPDATE worker_schema SET version = version + 1")
    try:
        with pytest.raises(worker.DatabaseUnusable, match="newer than this worker"):
            worker_postgres.open_store(postgres_db)
    finally:
        postgres.execute("UPDATE worker_schema SET version = version - 1")


def test_workers_starting_at_once_on_an_empty_database_create_the_schema_once(postgres: Any, postgres_db: str) -> None:
    postgres.execute(f"DROP TABLE {', '.join(TABLES)}")
    postgres.execute("DROP FUNCTION worker_jobs_notify")
    opened, errors = [], []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait(timeout=30)
            opened.append(worker_postgres.open_store(postgres_db))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for store in opened:
        store.close()
    assert errors == [] and len(opened) == 4
    assert postgres.execute("SELECT id, version FROM worker_schema").fetchall() == [
        (1, worker_postgres.schema_version())
    ]


def test_the_table_sets_autovacuum_for_a_queue(postgres: Any) -> None:
    (options,) = postgres.execute("SELECT reloptions FROM pg_class WHERE relname = 'worker_jobs'").fetchone()
    assert "autovacuum_vacuum_scale_factor=0.01" in options
