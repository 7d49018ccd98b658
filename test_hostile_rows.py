"""Rows that other programs write cost only themselves (issue 12: defects 1-4, 6, 7, 9 and 23's enqueue ranges).

Every hostile row here is inserted by another program (the stdlib sqlite3,
standing for the sqlite3 shell or a C or Node client).  The worker either
fails it alone, with an error that says why, or the table refuses it at
INSERT; either way the other jobs run.  "An older row" is one written before
schema version 4, whose trigger refuses such values: the test drops the
trigger to write it, and the worker (which re-creates the trigger at start)
must cope with what the row holds.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import HERE, FakeClock, NoJitter, Processes, at, create_database
from worker import JobContext, Queue, Worker

BIG = 2**63 - 1  # the largest integer SQLite holds
NINE = 9 * 10**18
SMALLEST = -(2**63)
DEEP = '{"a": ' + "[" * 1500 + "]" * 1500 + "}"  # json_valid: yes; Python's json: RecursionError
HUGE_NUMBER = '{"n": ' + "1" * 5000 + "}"  # json_valid: yes; Python's json: more digits than int() takes
TRIGGER = "worker_jobs_refuse_invalid"
OTHERS = 3  # innocent jobs beside each hostile row

JOBS_MODULE = """
from worker import job


@job
def ok(ctx, **data):
    return "ok"


@job
def boom(ctx, **data):
    raise RuntimeError("boom")
"""


@pytest.fixture
def jobs(registry: dict[str, worker.JobType]) -> None:
    """The two job types of JOBS_MODULE, registered in this process."""

    @worker.job
    def ok(ctx: JobContext, **data: Any) -> str:
        return "ok"

    @worker.job
    def boom(ctx: JobContext, **data: Any) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def table(db: str) -> str:
    """The database, its schema made, as the web app's Queue would leave it."""
    create_database(Path(db))
    return db


# A second ago: a row due "now" by SQLite's clock may be a millisecond ahead of the worker's, and a burst
# worker leaves a row that is not yet due.
A_SECOND_AGO = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - 1000"


def insert(db: str, columns: dict[str, str], *, older: bool = False) -> int:
    """INSERT one row as another program would; values are SQL expressions.  ``older``: before schema version 4."""
    columns = {"due": A_SECOND_AGO, **columns}
    with contextlib.closing(sqlite3.connect(db, timeout=5, isolation_level=None)) as conn:
        if older:
            conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}")
        names, values = ", ".join(columns), ", ".join(columns.values())
        return int(conn.execute(f"INSERT INTO worker_jobs ({names}) VALUES ({values}) RETURNING id").fetchone()[0])


def insert_others(db: str) -> list[int]:
    return [insert(db, {"type": "'ok'"}) for _ in range(OTHERS)]


def run_burst(db: str, timeout: float = 60, **options: Any) -> Worker:
    """The worker's real loop, in this process, until nothing is due; fails the test if it raises or never ends."""
    running = Worker(db, burst=True, cron=False, concurrency=2, **options)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            running.run()
        except BaseException as e:  # handed to the test below
            failure.append(e)

    thread = threading.Thread(target=run, name="test-burst-worker", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        running.stop()
        thread.join(30)
        raise AssertionError(f"the worker was still running after {timeout:g} s with nothing left it could run")
    if failure:
        raise AssertionError(f"the worker's loop raised {failure[0]!r}") from failure[0]
    return running


def rows(db: str, where: str = "1") -> list[sqlite3.Row]:
    """The table's rows, read by another program; text that is not UTF-8 shown with U+FFFD."""
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        conn.text_factory = lambda raw: raw.decode(errors="replace")
        return conn.execute(f"SELECT * FROM worker_jobs WHERE {where} ORDER BY id").fetchall()


def row(db: str, id: int) -> sqlite3.Row:
    (found,) = rows(db, f"id = {int(id)}")
    return found


def assert_succeeded(db: str, ids: list[int]) -> None:
    assert [(r["id"], r["status"], r["result"]) for r in rows(db, f"id IN ({','.join(map(str, ids))})")] == [
        (id, "succeeded", '"ok"') for id in ids
    ]


def retries_of(db: str, id: int) -> list[sqlite3.Row]:
    return rows(db, f"rescheduled_from_job = {int(id)}")


# --- The matrix: one hostile row beside innocent jobs --------------------------------

# (name, the hostile row's columns as SQL, what becomes of it, what becomes of an older row);
# outcomes: "refused: <message>", "failed: <error>", "failed+retry: <error>" (a retry waits, due
# within the table's range), "failed+retried: <error>" (its retry ran and succeeded), "succeeded",
# "pending" (never due: a due beyond any calendar is a wait, not an error), None (as the first).
FAIL3 = {"type": "'boom'", "max_attempts": "3"}
CASES: list[tuple[str, dict[str, str], str, str | None]] = [
    *[(f"due {v}", {"type": "'ok'", "due": str(v)}, "pending", None) for v in (BIG, NINE)],
    *[(f"due {v}", {"type": "'ok'", "due": str(v)}, "succeeded", None) for v in (-1, SMALLEST)],
    *[(f"priority {v}", {"type": "'ok'", "priority": str(v)}, "succeeded", None) for v in (BIG, NINE, -1, SMALLEST)],
    *[
        (f"keep_ms {v}", {"type": "'ok'", "keep_ms": str(v)}, "refused: keep_ms must be at most", "succeeded")
        for v in (BIG, NINE)
    ],
    *[
        (f"timeout_ms {v}", {"type": "'ok'", "timeout_ms": str(v)}, "refused: timeout_ms and keep_ms", "succeeded")
        for v in (BIG, NINE)
    ],
    *[
        (f"retry_delay_ms {v}", {**FAIL3, "retry_delay_ms": str(v)}, "refused: retry_delay_ms", "failed+retry: boom")
        for v in (BIG, NINE)
    ],
    *[
        (
            f"max_attempts {v}",
            {"type": "'boom'", "max_attempts": str(v)},
            "refused: max_attempts must be at most",
            "failed+retry: boom",
        )
        for v in (BIG, NINE)
    ],
    *[
        (f"deaths {v}", {**FAIL3, "deaths": str(v)}, "refused: deaths must be between", "failed+retry: boom")
        for v in (BIG, NINE, -1, SMALLEST)
    ],
    *[
        (f"attempt {v}", {**FAIL3, "attempt": str(v)}, "refused: attempt and max_attempts", "failed: boom")
        for v in (BIG, NINE)
    ],
    (
        "attempt, max_attempts 2^63-1, deaths 1",
        {"type": "'boom'", "attempt": str(BIG), "max_attempts": str(BIG), "deaths": "1"},
        "refused: attempt and max_attempts",
        "failed: boom",
    ),
    *[
        (f"{column} {v}", {"type": "'ok'", column: str(v)}, "refused: CHECK constraint failed", None)
        for column in ("keep_ms", "timeout_ms", "retry_delay_ms", "max_attempts", "attempt")
        for v in (-1, SMALLEST)
    ],
    *[
        (
            f"backoff {v}",
            {"type": "'boom'", "max_attempts": "5", "attempt": "3", "backoff": v},
            "failed+retry: boom",
            None,
        )
        for v in ("1e308", "9e999")
    ],
    ("backoff -1", {"type": "'boom'", "backoff": "-1"}, "refused: CHECK constraint failed", None),
    ("backoff 'nan'", {"type": "'boom'", "backoff": "CAST('nan' AS REAL)"}, "refused: CHECK constraint failed", None),
    ("data nested 1,500 deep", {"type": "'ok'", "data": f"'{DEEP}'"}, "failed: data is JSON nested too deep", None),
    (
        "data with a 5,000-digit number",
        {"type": "'ok'", "data": f"'{HUGE_NUMBER}'"},
        "failed: data cannot be decoded",
        None,
    ),
    # No worker registered that type (none can: registered names are text), so it waits, as a type only new
    # workers know would during a rolling deploy, and `worker status` lists it under "no live worker runs".
    ("type not UTF-8", {"type": "CAST(x'6f6bff' AS TEXT)"}, "pending", None),
    ("queue not UTF-8", {"type": "'ok'", "queue": "CAST(x'71ff' AS TEXT)"}, "failed: queue is not valid UTF-8", None),
    (
        "data not UTF-8",
        {"type": "'ok'", "data": "CAST(x'7b2261223a2261ff227d' AS TEXT)"},
        "failed: data is not valid UTF-8",
        None,
    ),
    ("tag not UTF-8", {"type": "'ok'", "tag": "CAST(x'74ff' AS TEXT)"}, "failed: tag is not valid UTF-8", None),
    (
        "running, lease lapsed, data nested 1,500 deep",
        {"type": "'ok'", "status": "'running'", "lease_until": "1", "data": f"'{DEEP}'"},
        "failed: data is JSON nested too deep for the worker to decode (and its worker was lost",
        None,
    ),
    (
        "running, lease lapsed, queue not UTF-8",
        {"type": "'ok'", "status": "'running'", "lease_until": "1", "queue": "CAST(x'71ff' AS TEXT)"},
        "failed: queue is not valid UTF-8",
        None,
    ),
    (
        "running with no lease",
        {"type": "'ok'", "status": "'running'"},
        "refused: a running row needs a lease_until",
        "failed+retried: worker lost: lease expired",
    ),
]
MATRIX = [
    pytest.param(columns, expected if not older else (older_expected or expected), older, id=f"{name}{older_id}")
    for name, columns, expected, older_expected in CASES
    for older, older_id in ((False, ""), (True, ", older row"))
    if not older or older_expected is not None
]


@pytest.mark.parametrize(("columns", "expected", "older"), MATRIX)
def test_a_hostile_row_is_refused_or_fails_alone_and_the_other_jobs_run(
    table: str, jobs: None, columns: dict[str, str], expected: str, older: bool
) -> None:
    db = table
    others = insert_others(db)
    outcome, _, message = expected.partition(": ")
    if outcome == "refused":
        with pytest.raises(sqlite3.IntegrityError, match=message):
            insert(db, columns, older=older)
        run_burst(db)
        assert_succeeded(db, others)
        assert len(rows(db)) == OTHERS
        return
    hostile = insert(db, columns, older=older)
    run_burst(db)
    assert_succeeded(db, others)
    ended = row(db, hostile)
    if outcome == "succeeded":
        assert (ended["status"], ended["result"]) == ("succeeded", '"ok"')
    elif outcome == "pending":
        assert ended["status"] == "pending"
    else:
        assert ended["status"] == "failed"
        assert message in ended["error"], ended["error"]
        assert ended["remove_at"] is not None and ended["remove_at"] <= ended["finished"] + worker.MAX_DURATION_MS
        assert_retries_follow(outcome, ended, retries_of(db, hostile))
    if older:  # the worker put the trigger back when it started
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (TRIGGER,)).fetchone()[0] == 1


def assert_retries_follow(outcome: str, ended: Any, retries: list[Any]) -> None:
    """What follows a failed hostile row: nothing ("failed"), a retry due within the table's range
    ("failed+retry"), or a retry that ran ("failed+retried")."""
    if outcome == "failed":
        assert retries == []
    elif outcome == "failed+retry":
        assert [r["status"] for r in retries] == ["pending"]
        assert ended["finished"] < retries[0]["due"] <= worker.MAX_TIME_MS
    else:
        assert [(r["status"], r["result"]) for r in retries] == [("succeeded", '"ok"')]


# --- One test per defect -------------------------------------------------------------


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "hostile_jobs.py"
    path.write_text(JOBS_MODULE)
    return path


def burst_process(processes: Processes, db: str, jobs_file: Path, name: str) -> Any:
    """``worker run --burst`` as its own process: it exits once nothing it can run is due."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    args = ("run", "--burst", "--db", db, "--jobs", str(jobs_file), "--concurrency", "2", "--no-cron")
    return processes.start(*args, name=name, env=env)


def test_row_nested_too_deep_fails_alone_and_a_real_worker_runs_the_others(
    table: str, jobs_file: Path, processes: Processes
) -> None:
    """Defect 1: json.loads raised RecursionError in the claim; the worker exited 1 at every start."""
    others = insert_others(table)
    deep = insert(table, {"type": "'ok'", "data": f"'{DEEP}'"})
    started = burst_process(processes, table, jobs_file, "deep")
    assert started.wait(60) == 0, started.log()[-3000:]
    assert_succeeded(table, others)
    ended = row(table, deep)
    assert ended["status"] == "failed"
    assert ended["error"] == "cannot run this row: its data is JSON nested too deep for the worker to decode"
    assert retries_of(table, deep) == []


@pytest.mark.parametrize("column", ["type", "queue", "data"])
def test_row_whose_text_is_not_utf8_fails_alone_and_a_real_worker_runs_the_others(
    table: str, jobs_file: Path, processes: Processes, column: str
) -> None:
    """Defect 2: the claim's RETURNING failed to decode at every tick (about 1,280 errors in 7 s) and nothing ran."""
    bad = {"type": "CAST(x'6f6bff' AS TEXT)", "queue": "CAST(x'71ff' AS TEXT)",
           "data": "CAST(x'7b2261223a2261ff227d' AS TEXT)"}[column]  # fmt: skip
    others = insert_others(table)
    hostile = insert(table, {"type": "'ok'", column: bad})
    started = burst_process(processes, table, jobs_file, f"utf8-{column}")
    assert started.wait(60) == 0, started.log()[-3000:]
    assert_succeeded(table, others)
    ended = row(table, hostile)
    if column == "type":  # a type no worker registered (none can): it waits, listed by status as no one's
        assert ended["status"] == "pending"
        assert "Could not decode" not in started.log()
        return
    assert ended["status"] == "failed"
    assert ended["error"].startswith(f"cannot run this row: its {column} is not valid UTF-8 ("), ended["error"]
    assert started.log().count("cannot run this row") == 1, "logged once, not at every tick"


def test_keep_ms_beyond_100_years_is_refused_and_an_older_such_row_still_ends_and_claiming_goes_on(
    table: str, jobs: None
) -> None:
    """Defect 3: finished + keep_ms became a REAL the STRICT column refused, in the claim's transaction."""
    with pytest.raises(sqlite3.IntegrityError, match="keep_ms must be at most 3155760000000"):
        insert(table, {"type": "'ok'", "keep_ms": str(BIG)})
    older = insert(table, {"type": "'ok'", "keep_ms": str(BIG)}, older=True)
    others = insert_others(table)
    run_burst(table)
    assert_succeeded(table, [older, *others])
    ended = row(table, older)
    assert ended["remove_at"] == ended["finished"] + worker.MAX_DURATION_MS
    with Queue(table) as queue:  # cancel writes remove_at the same way
        pending = insert(table, {"type": "'ok'", "keep_ms": str(BIG), "due": str(BIG)}, older=True)
        assert queue.cancel(pending)


def test_retry_delay_of_2_63_ms_is_refused_and_an_older_such_row_retries_within_100_years(
    table: str, jobs: None
) -> None:
    """Defect 4: binding now + delay raised OverflowError, and the worker exited 1."""
    with pytest.raises(sqlite3.IntegrityError, match="retry_delay_ms, timeout_ms and keep_ms must be at most"):
        insert(table, {**FAIL3, "retry_delay_ms": str(BIG)})
    older = insert(table, {**FAIL3, "retry_delay_ms": str(BIG)}, older=True)
    others = insert_others(table)
    run_burst(table)
    assert_succeeded(table, others)
    failed = row(table, older)
    assert failed["status"] == "failed"
    (retry,) = retries_of(table, older)
    delay = retry["due"] - failed["finished"]
    assert (1 - worker.RETRY_JITTER) * worker.MAX_DURATION_MS <= delay <= worker.MAX_DURATION_MS
    assert retry["retry_delay_ms"] == worker.MAX_DURATION_MS  # the copy is clamped, so the table takes it


def test_running_row_without_a_lease_is_refused_and_an_older_one_is_rescued(table: str, jobs: None) -> None:
    """Defect 6: a row inserted as running with no lease_until was never rescued."""
    with pytest.raises(sqlite3.IntegrityError, match="a running row needs a lease_until"):
        insert(table, {"type": "'ok'", "status": "'running'"})
    older = insert(table, {"type": "'ok'", "status": "'running'"}, older=True)
    run_burst(table)
    ended = row(table, older)
    assert (ended["status"], ended["error"]) == ("failed", "worker lost: lease expired (worker None)")
    assert [(r["status"], r["deaths"]) for r in retries_of(table, older)] == [("succeeded", 1)]


def test_pending_row_with_negative_deaths_is_refused_and_an_older_one_is_claimed(table: str, jobs: None) -> None:
    """Defect 6: a pending row with deaths < 0 matched neither claim (deaths = 0, deaths > 0)."""
    with pytest.raises(sqlite3.IntegrityError, match="deaths must be between 0 and 2147483647"):
        insert(table, {"type": "'ok'", "deaths": "-1"})
    older = insert(table, {"type": "'ok'", "deaths": "-1"}, older=True)
    run_burst(table)
    assert_succeeded(table, [older])


def test_index_dropped_by_hand_is_reported_by_check_and_recreated_by_the_worker(
    table: str, jobs: None, jobs_file: Path
) -> None:
    """Defect 7: the claim names worker_jobs_suspect in INDEXED BY; without it the worker claimed nothing."""
    others = insert_others(table)
    with contextlib.closing(sqlite3.connect(table, isolation_level=None)) as conn:
        conn.execute("DROP INDEX worker_jobs_suspect")
    check = subprocess.run(
        [sys.executable, "-m", "worker_cli", "check", "--db", table, "--jobs", str(jobs_file)],
        cwd=HERE, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 3, check
    assert "index worker_jobs_suspect" in check.stderr
    run_burst(table)
    assert_succeeded(table, others)
    assert worker.missing_schema_objects(worker.connect(table)) == []


def test_index_dropped_while_the_worker_runs_is_recreated_and_claiming_goes_on(table: str, jobs: None) -> None:
    """Defect 7, mid-run: the worker's schema was made before the index went."""
    running = Worker(table, burst=True, cron=False)
    running.start_up()
    with contextlib.closing(sqlite3.connect(table, isolation_level=None)) as conn:
        conn.execute("DROP INDEX worker_jobs_suspect")
    others = insert_others(table)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the worker never got through its jobs"
    assert_succeeded(table, others)
    with contextlib.closing(worker.connect(table)) as conn:
        assert worker.missing_schema_objects(conn) == []


def test_backoff_of_1e308_reaches_the_hour_cap_without_overflow(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, jobs: None
) -> None:
    """Defect 9: enqueue(backoff=1e308, max_attempts=5) crashed the worker at attempt 3 (float pow overflowed)."""
    first = queue.enqueue("boom", backoff=1e308, max_attempts=5, now=at(clock))
    w = make_worker()
    for _ in range(5):
        assert w.work() == 1
        clock.advance(3600 * 1.2)
    chain = rows(db)
    assert [r["status"] for r in chain] == ["failed"] * 5 and chain[0]["id"] == first.id
    delays = [later["due"] - earlier["finished"] for earlier, later in itertools.pairwise(chain)]
    assert delays == [10_000, 3_600_000, 3_600_000, 3_600_000]


@pytest.mark.parametrize(
    ("base_ms", "backoff", "failures_before", "expected"),
    [
        (10_000, 2.0, 1_025, 3_600_000),  # the default backoff, 1,025 failures into a chain
        (10_000, 2, 10**6, 3_600_000),  # an int backoff: no million-digit power either
        (10_000, 1e308, 2, 3_600_000),
        (10_000, math.inf, 1, 3_600_000),
        (10_000, math.inf, 0, 10_000),  # the first retry is the base, whatever the backoff
        (10_000, 1.0, 10**9, 10_000),
        (BIG, 2.0, 3, worker.MAX_DURATION_MS),  # a base beyond the cap stands, up to 100 years
        (0, 1e308, 5, 0),
        (-5, 2.0, 1, 0),
    ],
)
def test_retry_delay_is_a_pure_function_that_clamps_before_arithmetic(
    base_ms: int, backoff: float, failures_before: int, expected: int
) -> None:
    assert worker.retry_delay_ms(base_ms, backoff, failures_before=failures_before) == expected


@pytest.mark.parametrize(
    "options",
    [
        {"delay": 1e20},
        {"delay": math.inf},
        {"at": 1e20},
        {"at": math.nan},
        {"priority": 2**70},
        {"max_attempts": 2**70},
        {"max_attempts": worker.MAX_COUNT + 1},
        {"retry_delay": 1e20},
        {"timeout": 1e20},
        {"keep": 1e20},
        {"keep": 101 * 365.25 * 86400},
        {"backoff": math.nan},
        {"backoff": math.inf},
    ],
    ids=repr,
)
def test_out_of_range_enqueue_values_raise_value_error_and_write_nothing(
    queue: Queue, db: str, jobs: None, options: dict[str, Any]
) -> None:
    """Defect 23: these raised OverflowError (or wrote a row the worker could not use)."""
    with pytest.raises(ValueError, match=r"must be|would be due"):
        queue.enqueue("ok", **options)
    assert rows(db) == []


def test_enqueue_accepts_the_limits_themselves(queue: Queue, db: str, jobs: None) -> None:
    limit = worker.MAX_DURATION_MS / 1000
    queue.enqueue("ok", priority=2**63 - 1, max_attempts=worker.MAX_COUNT, retry_delay=limit, keep=limit, timeout=limit)
    queue.enqueue("ok", priority=-(2**63), at=worker.MAX_TIME_MS / 1000, backoff=1e308)
    assert len(rows(db)) == 2


def test_worker_enqueue_with_a_delay_of_1e20_exits_2_with_one_line(table: str) -> None:
    """Defect 23: `worker enqueue --delay 1e20` exited 1 (an OverflowError) instead of 2 (usage)."""
    result = subprocess.run(
        [sys.executable, "-m", "worker", "enqueue", "hello", "--delay", "1e20", "--db", table],
        cwd=HERE, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.startswith("worker: delay must be at most 100 years"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert rows(table) == []


def test_outcome_the_table_refuses_fails_its_row_without_retry_and_claiming_goes_on(table: str, jobs: None) -> None:
    """An app's own trigger refuses the retry: the row fails saying why, once, and the others still run."""
    with contextlib.closing(sqlite3.connect(table, isolation_level=None)) as conn:
        conn.execute("CREATE TRIGGER app_no_retries BEFORE INSERT ON worker_jobs WHEN NEW.attempt > 1"
                     " BEGIN SELECT RAISE(ABORT, 'this app allows no retries'); END")  # fmt: skip
    refused = insert(table, FAIL3)
    others = insert_others(table)
    run_burst(table)
    assert_succeeded(table, others)
    ended = row(table, refused)
    assert ended["status"] == "failed"
    assert ended["error"] == (
        "could not record the outcome (this app allows no retries); the job failed: RuntimeError: boom"
    )
    assert retries_of(table, refused) == []


def test_policy_counts_no_more_deaths_than_attempts(make_worker: Any) -> None:
    """A row claiming 9e18 deaths would otherwise retry 9e18 times."""
    w = make_worker(rng=NoJitter())
    job = worker.Job(id=1, type="boom", data={}, attempt=2, deaths=NINE, max_attempts=2)
    assert worker._deaths(job) == 1
    assert w.retry_delay_ms(job) == 10_000


def schema_of(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    return conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite%' ORDER BY name"
    ).fetchall()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_database_of_an_earlier_version_upgrades_to_the_fresh_schema_trigger_included(
    tmp_path: Path, version: int
) -> None:
    fresh = create_database(tmp_path / "fresh.db")
    sections = worker.schema_sections()
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db", isolation_level=None)) as old:
        old.executescript("".join(sql for _, sql in sections[:version]) + f"\nPRAGMA user_version = {version};")
    with contextlib.closing(worker.connect(tmp_path / "old.db")) as upgraded:
        assert worker.apply_schema(upgraded) == worker.schema_version() >= 6
        with contextlib.closing(sqlite3.connect(fresh)) as made:
            assert schema_of(upgraded) == schema_of(made)
        assert TRIGGER in {name for _, name, _ in schema_of(upgraded)}
