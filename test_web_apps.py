"""Living inside a web app: Queue(conn) enqueues exactly as the caller's own INSERT would.

On every connection state of the standard library's sqlite3 (its default
legacy mode with each isolation level, an explicit BEGIN, a savepoint,
autocommit) and on apsw: a job enqueued inside the app's transaction commits
and rolls back with it, wherever in the transaction it was enqueued.
SQLAlchemy's objects, on both stores, are test_sqlalchemy.py's.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest

import worker
import worker_dashboard
from conftest import HERE, Processes, WorkerProcess, create_database, wait_for
from worker import Queue

ORDERS = "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)"


@pytest.fixture
def app_db(tmp_path: Path) -> Path:
    """The app's own file, with its orders table and the worker's tables."""
    path = tmp_path / "app.db"
    with Queue(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(ORDERS)
    conn.commit()
    conn.close()
    return path


def counts(path: Path) -> tuple[int, int]:
    """(orders, jobs) as another program sees them."""
    conn = sqlite3.connect(path)
    try:
        orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        jobs = conn.execute("SELECT count(*) FROM worker_jobs").fetchone()[0]
        return orders, jobs
    finally:
        conn.close()


# Each way an app's transaction may reach the enqueue: the job is the first
# write, after a read, after the app's INSERT, or several at once.
def enqueue_first(conn: Any) -> None:
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.execute("INSERT INTO orders (item) VALUES ('book')")


def select_then_enqueue(conn: Any) -> None:
    conn.execute("SELECT count(*) FROM orders").fetchall()
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.execute("INSERT INTO orders (item) VALUES ('book')")


def insert_then_enqueue(conn: Any) -> None:
    conn.execute("INSERT INTO orders (item) VALUES ('book')")
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})


def enqueue_many_first(conn: Any) -> None:
    Queue(conn, check_types=False).enqueue_many([("send_receipt", {"order": 1}), ("audit", {})])
    conn.execute("INSERT INTO orders (item) VALUES ('book')")


def tagged_enqueue_first(conn: Any) -> None:
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1}, tag="receipt-1")
    conn.execute("INSERT INTO orders (item) VALUES ('book')")


STEPS = [enqueue_first, select_then_enqueue, insert_then_enqueue, enqueue_many_first, tagged_enqueue_first]
Step = Callable[[Any], None]


@pytest.mark.parametrize("isolation_level", ["", "DEFERRED", "IMMEDIATE", "EXCLUSIVE"])
@pytest.mark.parametrize("step", STEPS)
def test_default_mode_rollback_leaves_no_job_wherever_it_was_enqueued(
    app_db: Path, step: Step, isolation_level: str
) -> None:
    conn = sqlite3.connect(app_db, isolation_level=isolation_level)
    step(conn)
    conn.rollback()
    assert counts(app_db) == (0, 0)
    step(conn)
    conn.commit()
    orders, jobs = counts(app_db)
    assert orders == 1 and jobs >= 1
    conn.close()


@pytest.mark.parametrize("step", STEPS)
def test_default_mode_enqueue_is_not_committed_before_the_callers_commit(app_db: Path, step: Step) -> None:
    conn = sqlite3.connect(app_db)
    step(conn)
    assert conn.in_transaction
    assert counts(app_db) == (0, 0)  # another program sees nothing yet
    conn.commit()
    assert counts(app_db)[1] >= 1
    conn.close()


@pytest.mark.parametrize("begin", ["BEGIN", "BEGIN IMMEDIATE", "SAVEPOINT app"])
@pytest.mark.parametrize("step", STEPS)
def test_explicit_transaction_is_joined(app_db: Path, step: Step, begin: str) -> None:
    conn = sqlite3.connect(app_db, isolation_level=None)
    conn.execute(begin)
    step(conn)
    conn.execute("ROLLBACK")
    assert counts(app_db) == (0, 0)
    conn.close()


def test_savepoint_of_the_app_rolls_back_the_job_with_it(app_db: Path) -> None:
    """Django's nested atomic(): the inner block's rollback takes the job, the outer commit keeps the order."""
    conn = sqlite3.connect(app_db, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO orders (item) VALUES ('book')")
    conn.execute("SAVEPOINT inner_block")
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.execute("ROLLBACK TO inner_block")
    conn.execute("RELEASE inner_block")
    conn.execute("COMMIT")
    assert counts(app_db) == (1, 0)
    conn.close()


def test_autocommit_connection_commits_the_job_by_itself(app_db: Path) -> None:
    """isolation_level=None with no BEGIN: every statement commits, the enqueue too."""
    conn = sqlite3.connect(app_db, isolation_level=None)
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    assert not conn.in_transaction
    assert counts(app_db) == (0, 1)
    conn.close()


def test_a_failed_enqueue_leaves_the_callers_transaction_as_it_was(app_db: Path) -> None:
    conn = sqlite3.connect(app_db)
    conn.execute("INSERT INTO orders (item) VALUES ('book')")
    with pytest.raises(worker.InvalidJobData):
        Queue(conn, check_types=False).enqueue("send_receipt", {"not json": {1, 2}})
    conn.commit()
    assert counts(app_db) == (1, 0)
    conn.close()


# --- apsw ------------------------------------------------------------------------


def test_apsw_outside_a_transaction_commits_by_itself_and_inside_joins(app_db: Path) -> None:
    conn = apsw.Connection(str(app_db))
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    assert counts(app_db) == (0, 1)  # apsw has no implicit transaction: an INSERT commits at once
    conn.execute("BEGIN")
    enqueue_first(conn)
    conn.execute("ROLLBACK")
    assert counts(app_db) == (0, 1)
    conn.close()


# --- The worker is a guest in the app's file ---------------------------------------------


@pytest.mark.parametrize("app_version", [0, 2, 7])
def test_the_apps_user_version_is_never_read_or_written(tmp_path: Path, app_version: int) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute(ORDERS)
    conn.execute(f"PRAGMA user_version = {app_version}")
    conn.commit()
    with Queue(path, check_types=False) as queue:
        queue.enqueue("send_receipt", {"order": 1})
    assert conn.execute("PRAGMA user_version").fetchone()[0] == app_version
    assert conn.execute("SELECT version FROM worker_schema").fetchone()[0] == worker.schema_version()
    assert counts(path) == (0, 1)
    conn.close()


def test_queue_on_the_callers_connection_creates_the_tables_in_its_transaction(tmp_path: Path) -> None:
    """Before any worker ran (or in a test database), the first Queue(conn) brings the tables."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.rollback()  # the tables were made in this transaction, and go with it
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'worker_%'").fetchone()[0] == 0
    Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    conn.commit()
    assert conn.execute("SELECT type, status FROM worker_jobs").fetchall() == [("send_receipt", "pending")]
    conn.close()


def test_queue_works_on_an_in_memory_database() -> None:
    conn = sqlite3.connect(":memory:")
    job = Queue(conn, check_types=False).enqueue("send_receipt", {"order": 1})
    assert Queue(conn).get(job.id) == job
    conn.close()


def migrate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / "worker.py"), "migrate", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_migrate_prints_the_ddl_it_applies_and_then_says_current(tmp_path: Path) -> None:
    dry = migrate("--db", "app.db", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "from version 0 to" in dry.stdout and "CREATE TABLE IF NOT EXISTS worker_jobs" in dry.stdout
    conn = sqlite3.connect(tmp_path / "app.db")
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'worker_%'").fetchone()[0] == 0

    applied = migrate("--db", "app.db", cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == dry.stdout
    assert conn.execute("SELECT version FROM worker_schema").fetchone()[0] == worker.schema_version()
    again = migrate("--db", "app.db", cwd=tmp_path)
    assert again.stdout == f"-- app.db: the worker's schema is current (version {worker.schema_version()})\n"
    conn.close()


def test_migrate_output_applied_by_another_tool_gives_the_same_tables(tmp_path: Path) -> None:
    """Teams whose migration tool must own every table can run the printed DDL themselves."""
    printed = migrate("--db", "scratch.db", "--dry-run", cwd=tmp_path).stdout
    theirs = sqlite3.connect(tmp_path / "theirs.db")
    theirs.executescript(printed)
    theirs.execute("INSERT INTO worker_jobs (type) VALUES ('hello')")
    theirs.commit()
    assert worker.installed_schema_version(theirs) == worker.schema_version()
    with Queue(tmp_path / "theirs.db") as queue:
        assert queue.get(1) is not None
    theirs.close()


# --- Follow-up jobs commit with their job --------------------------------------------------


def test_a_follow_up_is_enqueued_once_however_often_its_job_is_retried(
    db: str, make_worker: Callable[..., worker.Worker], clock: Any
) -> None:
    attempts: list[int] = []

    @worker.job(max_attempts=3, retry_delay=1)
    def charge(ctx: worker.JobContext) -> str:
        attempts.append(ctx.attempt)
        ctx.enqueue("audit", {"charge": ctx.id})
        if ctx.attempt < 3:
            raise RuntimeError("card declined")
        return "charged"

    @worker.job
    def audit(ctx: worker.JobContext, charge: int) -> None:
        return None

    with Queue(db) as queue:
        first = queue.enqueue("charge")
        runner = make_worker()
        for _ in range(3):
            runner.work()
            clock.advance(10)
        assert attempts == [1, 2, 3]
        audits = [j for j in map(queue.get, range(1, 10)) if j is not None and j.type == "audit"]
    assert [(j.data, j.status) for j in audits] == [({"charge": first.id + 2}, "pending")]


def test_a_follow_up_of_a_job_that_fails_for_good_is_discarded_and_enqueue_now_is_not(
    db: str, make_worker: Callable[..., worker.Worker]
) -> None:
    @worker.job
    def charge(ctx: worker.JobContext) -> None:
        ctx.enqueue("audit", {"event": "charged"})
        ctx.enqueue_now("audit", {"event": "attempted"})
        raise RuntimeError("card declined")

    @worker.job
    def audit(ctx: worker.JobContext, event: str) -> None:
        return None

    with Queue(db) as queue:
        queue.enqueue("charge")
        make_worker().work()
        found = [queue.get(i) for i in (1, 2, 3)]
    assert [(j.type, j.status, j.data) for j in found if j is not None] == [
        ("charge", "failed", {}),
        ("audit", "pending", {"event": "attempted"}),
    ]


def test_a_follow_up_is_committed_in_the_transaction_that_records_the_success(
    db: str, make_worker: Callable[..., worker.Worker]
) -> None:
    """Nothing of it is visible while the job runs; its success and the follow-up appear together."""
    seen_while_running: list[int] = []

    @worker.job
    def parent(ctx: worker.JobContext) -> None:
        ctx.enqueue("child", {"n": 1}, tag="child-of-parent")
        seen_while_running.append(counts_of(db, "type = 'child'"))

    @worker.job
    def child(ctx: worker.JobContext, n: int) -> int:
        return n

    with Queue(db) as queue:
        queue.enqueue("parent")
    make_worker().work()
    assert seen_while_running == [0]
    assert counts_of(db, "type = 'parent' AND status = 'succeeded'") == 1
    assert counts_of(db, "type = 'child' AND status = 'pending' AND tag = 'child-of-parent'") == 1


def test_a_follow_up_needs_no_connection_of_its_own(
    db: str, make_worker: Callable[..., worker.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ctx.enqueue only builds the row, which the worker writes on its own connection: a job whose follow-up
    came while no new connection could be made (a server restarting, every connection just terminated) succeeds.
    """

    def refuse(*args: Any, **kwargs: Any) -> worker.Store:
        raise worker.DatabaseUnavailable("the server is restarting")

    @worker.job
    def parent(ctx: worker.JobContext) -> None:
        monkeypatch.setattr(worker, "open_store", refuse)
        ctx.enqueue("child", {"n": 1})

    @worker.job
    def child(ctx: worker.JobContext, n: int) -> int:
        return n

    with Queue(db) as queue:
        queue.enqueue("parent")
    make_worker().work()
    assert counts_of(db, "type = 'parent' AND status = 'succeeded'") == 1
    assert counts_of(db, "type = 'child' AND status = 'pending'") == 1


def test_follow_up_with_invalid_input_fails_its_job_at_once(db: str, make_worker: Callable[..., worker.Worker]) -> None:
    @worker.job
    def parent(ctx: worker.JobContext) -> None:
        ctx.enqueue("no_such_type")

    with Queue(db) as queue:
        queue.enqueue("parent")
        make_worker().work()
        failed = queue.get(1)
    assert failed is not None and failed.status == "failed"
    assert "unknown job type 'no_such_type'" in (failed.error or "")


def counts_of(db: str, where: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(f"SELECT count(*) FROM worker_jobs WHERE {where}").fetchone()[0])
    finally:
        conn.close()


# --- Rolling deploys -------------------------------------------------------------------------

OLD_JOBS = """
from worker import job

@job
def send_receipt(ctx, order):
    return {"receipt": order, "by": "old"}
"""
NEW_JOBS = (
    OLD_JOBS.replace('"old"', '"new"')
    + """
@job
def send_invoice(ctx, order):
    return {"invoice": order, "by": "new"}
"""
)


def status_report(db: Path) -> dict[str, Any]:
    conn = worker.connect_readonly(db)
    try:
        return worker.status(conn)
    finally:
        conn.close()


def test_rolling_deploy_old_worker_leaves_new_types_to_the_new_one(tmp_path: Path, processes: Processes) -> None:
    """Old and new workers side by side: neither fails a job for a type it does not know."""
    db = create_database(tmp_path / "app.db")
    (tmp_path / "old_jobs.py").write_text(OLD_JOBS)
    (tmp_path / "new_jobs.py").write_text(NEW_JOBS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}

    def start(name: str) -> WorkerProcess:
        jobs = str(tmp_path / f"{name}_jobs.py")
        return processes.start("run", "--db", str(db), "--jobs", jobs, "--no-cron", name=name, env=env, cwd=tmp_path)

    old = start("old")
    with Queue(db, check_types=False) as queue:  # the new web code, deployed first
        invoice = queue.enqueue("send_invoice", {"order": 7})
        receipt = queue.enqueue("send_receipt", {"order": 7})
        wait_for(lambda: queue.get(receipt.id).status == "succeeded", 30, "the old worker to send the receipt")  # type: ignore[union-attr]
        assert queue.get(invoice.id).status == "pending"  # type: ignore[union-attr]
        assert [(u["type"], u["pending"]) for u in status_report(db)["unrunnable"]] == [("send_invoice", 1)]

        new = start("new")
        done = wait_for(lambda: queue.get(invoice.id).status == "succeeded" and queue.get(invoice.id), 30,  # type: ignore[union-attr]
                        "the new worker to send the invoice")  # fmt: skip
        assert done.result == {"invoice": 7, "by": "new"} and done.attempt == 1
        assert status_report(db)["unrunnable"] == []
    assert old.stop() == 0 and new.stop() == 0


def test_status_names_pending_types_no_live_worker_runs(tmp_path: Path) -> None:
    db = create_database(tmp_path / "app.db")
    with Queue(db, check_types=False) as queue:
        queue.enqueue("send_receipt", {"order": 1})
        queue.enqueue("sned_receipt", {"order": 2})  # a typo, written by a client without the registry
    assert status_report(db)["unrunnable"] == []  # no worker alive: status says that already

    @worker.job
    def send_receipt(ctx: worker.JobContext, order: int) -> None:
        return None

    live = worker.Worker(db, cron=False)
    live.start_up()
    try:
        (typo,) = status_report(db)["unrunnable"]
        assert (typo["type"], typo["pending"]) == ("sned_receipt", 1)
        text = subprocess.run([sys.executable, "-m", "worker_cli", "status", "--db", str(db)], capture_output=True,
                              text=True, timeout=60, cwd=HERE).stdout  # fmt: skip
        assert "no live worker runs" in text and "sned_receipt" in text
        assert "sned_receipt" in dashboard_page(db)  # the dashboard's front page names it too
        cancelled = subprocess.run([sys.executable, "-m", "worker_cli", "cancel", "--type", "sned_receipt", "--db",
                                    str(db)], capture_output=True, text=True, timeout=60, cwd=HERE)  # fmt: skip
        assert (cancelled.returncode, cancelled.stdout) == (0, "1 pending sned_receipt jobs cancelled\n")
        assert status_report(db)["unrunnable"] == []
    finally:
        live.close()


def dashboard_page(db: Path) -> str:
    """The dashboard's front page, served in this process on a free loopback port."""
    server = worker_dashboard.DashboardServer(str(db), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url, timeout=10) as answer:
            page = answer.read().decode()
        assert "Pending jobs no live worker runs" in page
        return page
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
