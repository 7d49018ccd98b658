"""Rows that other programs write cost only themselves, on PostgreSQL too (test_hostile_rows.py's promise).

Every hostile row is inserted here with psycopg, standing for psql,
node-postgres or any other client.  PostgreSQL's table refuses more at INSERT
than SQLite's (its text is always valid UTF-8, and never holds a NUL), so the
matrix is its own; the meaning is the same: the table refuses the row, or the
worker fails it alone with an error that says why, or it runs; either way the
other jobs run, and the worker's loop never raises.
"""

from __future__ import annotations

from typing import Any

import pytest

import worker
from test_hostile_rows import BIG, DEEP, HUGE_NUMBER, NINE, OTHERS, SMALLEST, assert_retries_follow, run_burst

psycopg = pytest.importorskip("psycopg")

# A second ago by the server's clock, which is the one the worker claims by.
A_SECOND_AGO = "(floor(extract(epoch FROM clock_timestamp()) * 1000) - 1000)::bigint"


@pytest.fixture
def db(postgres_db: str, registry: dict[str, worker.JobType]) -> str:
    """The test run's database, emptied, and the two job types every case uses, registered in this process."""

    @worker.job
    def ok(ctx: worker.JobContext, **data: Any) -> str:
        return "ok"

    @worker.job
    def boom(ctx: worker.JobContext, **data: Any) -> None:
        raise RuntimeError("boom")

    return postgres_db


def insert(db: str, columns: dict[str, str]) -> int:
    """INSERT one row as another program would; values are SQL expressions."""
    columns = {"due": A_SECOND_AGO, **columns}
    with psycopg.connect(db, autocommit=True) as conn:
        names, values = ", ".join(columns), ", ".join(columns.values())
        return int(conn.execute(f"INSERT INTO worker_jobs ({names}) VALUES ({values}) RETURNING id").fetchone()[0])


def rows(db: str, where: str = "true") -> list[dict[str, Any]]:
    with psycopg.connect(db, autocommit=True) as conn:
        found = conn.execute(f"SELECT {worker.SELECT_COLUMNS} FROM worker_jobs WHERE {where} ORDER BY id").fetchall()
    return [dict(zip(worker.COLUMNS, values, strict=True)) for values in found]


FAIL3 = {"type": "'boom'", "max_attempts": "3"}
# (name, the hostile row's columns as SQL, what becomes of it), the outcomes as in test_hostile_rows.py.
CASES: list[tuple[str, dict[str, str], str]] = [
    *[(f"due {v}", {"type": "'ok'", "due": str(v)}, "pending") for v in (BIG, NINE)],
    *[(f"due {v}", {"type": "'ok'", "due": str(v)}, "succeeded") for v in (-1, SMALLEST)],
    *[(f"priority {v}", {"type": "'ok'", "priority": str(v)}, "succeeded") for v in (BIG, NINE, -1, SMALLEST)],
    *[
        (f"{column} {v}", {"type": "'ok'", column: str(v)}, f"refused: {column}_check")
        for column in ("keep_ms", "timeout_ms", "retry_delay_ms", "max_attempts", "attempt")
        for v in (BIG, NINE, -1, SMALLEST)
    ],
    *[(f"deaths {v}", {**FAIL3, "deaths": str(v)}, "refused: deaths_check") for v in (BIG, NINE, -1, SMALLEST)],
    ("attempt at its limit", {**FAIL3, "attempt": "2147483647", "max_attempts": "2147483647"}, "failed: boom"),
    ("retry delay of 100 years", {**FAIL3, "retry_delay_ms": "3155760000000"}, "failed+retry: boom"),
    *[
        (f"backoff {v}", {"type": "'boom'", "max_attempts": "5", "attempt": "3", "backoff": v}, "failed+retry: boom")
        for v in ("1e308", "'Infinity'", "'NaN'")
    ],
    ("backoff -1", {"type": "'boom'", "backoff": "-1"}, "refused: backoff_check"),
    ("data nested 1,500 deep", {"type": "'ok'", "data": f"'{DEEP}'"}, "failed: data is JSON nested too deep"),
    ("data with a 5,000-digit number", {"type": "'ok'", "data": f"'{HUGE_NUMBER}'"}, "failed: data cannot be decoded"),
    ("data an array", {"type": "'ok'", "data": "'[1]'"}, "refused: data_check"),
    ("data not JSON", {"type": "'ok'", "data": "'{'"}, "refused: invalid input syntax for type json"),
    ("data with an escaped NUL", {"type": "'ok'", "data": '\'{"a": "\\u0000"}\''}, "succeeded"),
    ("data with a lone surrogate", {"type": "'ok'", "data": '\'{"a": "\\udcff"}\''}, "succeeded"),
    ("status unknown", {"type": "'ok'", "status": "'done'"}, "refused: status_check"),
    ("running with no lease", {"type": "'ok'", "status": "'running'"}, "refused: running_has_lease"),
    ("running, lease lapsed", {"type": "'ok'", "status": "'running'", "lease_until": "1"}, "failed+retried: worker"),
    (
        "running, lease lapsed, data nested 1,500 deep",
        {"type": "'ok'", "status": "'running'", "lease_until": "1", "data": f"'{DEEP}'"},
        "failed: data is JSON nested too deep for the worker to decode (and its worker was lost",
    ),
    ("type of 10,000 characters", {"type": "repeat('t', 10000)"}, "pending"),
    ("queue of 10,000 characters", {"type": "'ok'", "queue": "repeat('q', 10000)"}, "succeeded"),
    # A cron row no schedule can follow runs, and ends its chain ("no next run: invalid cron timezone").
    *[
        (
            f"cron time zone {zone}",
            {"type": "'ok'", "cron_schedule": "'* * * * *'", "cron_timezone": f"'{zone}'"},
            "succeeded",
        )
        for zone in ("Europe", "../../etc/passwd", "Mars/Olympus", "UTC+99")
    ],
    (
        "cron slot in year 9999",
        {"type": "'ok'", "cron_schedule": "'* * * * *'", "cron_slot": "253402300799000"},
        "succeeded",
    ),
]


@pytest.mark.parametrize(("columns", "expected"), [pytest.param(c, e, id=n) for n, c, e in CASES])
def test_a_hostile_row_is_refused_or_fails_alone_and_the_other_jobs_run(
    db: str, columns: dict[str, str], expected: str
) -> None:
    others = [insert(db, {"type": "'ok'"}) for _ in range(OTHERS)]
    outcome, _, message = expected.partition(": ")
    if outcome == "refused":
        with pytest.raises(psycopg.DataError if "syntax" in message else psycopg.IntegrityError, match=message):
            insert(db, columns)
        run_burst(db)
        assert [(r["status"], r["result"]) for r in rows(db)] == [("succeeded", '"ok"')] * OTHERS
        return
    hostile = insert(db, columns)
    run_burst(db)
    assert [(r["status"], r["result"]) for r in rows(db, f"id IN ({','.join(map(str, others))})")] == [
        ("succeeded", '"ok"')
    ] * OTHERS
    (ended,) = rows(db, f"id = {hostile}")
    if outcome in ("succeeded", "pending"):
        assert ended["status"] == outcome, ended
        assert rows(db, f"rescheduled_from_job = {hostile}") == []
        return
    assert ended["status"] == "failed", ended
    assert message in ended["error"], ended["error"]
    assert ended["remove_at"] is not None and ended["remove_at"] <= ended["finished"] + worker.MAX_DURATION_MS
    assert_retries_follow(outcome, ended, rows(db, f"rescheduled_from_job = {hostile}"))
