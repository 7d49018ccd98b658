"""The apps of examples/ run as their users would run them: real sqlite3, Flask + SQLAlchemy 2, and Django.

Each example is copied into tmp_path first (the checkout stays clean) and run
there in subprocesses: the app places an order and enqueues its receipt job
in the same transaction; a payment declined after the enqueue rolls both
back; then `worker run --burst` runs the job, which marks the order's receipt
as sent through the app's own database layer.  The README's snippets of the
examples are held to the files verbatim.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import HERE

EXAMPLES = HERE / "examples"
TIMEOUT = 60  # seconds for one subprocess, on a loaded machine


def example(name: str, tmp_path: Path) -> Path:
    """A fresh copy of examples/<name>, without anything a run in the checkout may have left."""
    return Path(
        shutil.copytree(
            EXAMPLES / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.db*", "*.sqlite3*")
        )
    )


def environment(**variables: str) -> dict[str, str]:
    """This environment without any setting that would choose a database, a jobs module or Django's settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("WORKER_") and key not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")
    }
    return {**env, **variables}


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in ``cwd``, as a user would type it there."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=environment() if env is None else env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def jobs_in(db: Path) -> list[tuple[Any, ...]]:
    """The receipt jobs: (type, data, status, result)."""
    return query(db, "SELECT type, data, status, result FROM worker_jobs WHERE type = 'send_receipt' ORDER BY id")


# --- plain sqlite3 ----------------------------------------------------------------


def test_sqlite3_shop_commits_the_order_with_its_job_rolls_back_a_declined_one_and_the_worker_sends_the_receipt(
    tmp_path: Path,
) -> None:
    shop = example("sqlite3_app", tmp_path)
    env = environment(WORKER_DB="shop.db")
    assert succeeded(run(shop, "shop.py", "book", "ada@example.com", env=env)).stdout == "order 1 placed\n"
    declined = run(shop, "shop.py", "lamp", "bob@example.com", "declined", env=env)
    assert (declined.returncode, declined.stderr) == (1, "no order: order 2: card declined\n")
    db = shop / "shop.db"
    assert query(db, "SELECT id, item, receipt_sent FROM orders") == [(1, "book", 0)]
    assert jobs_in(db) == [("send_receipt", '{"order_id":1}', "pending", None)]

    succeeded(run(shop, "-m", "worker_cli", "run", "--burst", env=env))
    assert query(db, "SELECT id, receipt_sent FROM orders") == [(1, 1)]
    assert jobs_in(db) == [("send_receipt", '{"order_id":1}', "succeeded", '{"sent_to":"ada@example.com"}')]


def test_sqlite3_shop_waits_for_a_jobs_write_lock_up_to_its_busy_timeout_then_fails_with_database_is_locked(
    tmp_path: Path,
) -> None:
    """The shared-file rule of the README: a job's write transaction longer than the app's 5 s fails its writes."""
    shop = example("sqlite3_app", tmp_path)
    env = environment(WORKER_DB="shop.db")
    succeeded(run(shop, "shop.py", "book", "ada@example.com", env=env))
    long_job = sqlite3.connect(shop / "shop.db", isolation_level=None)
    long_job.execute("BEGIN IMMEDIATE")  # what a job holding its write transaction too long does
    started = time.monotonic()
    blocked = run(shop, "shop.py", "lamp", "bob@example.com", env=env)
    assert time.monotonic() - started >= 4.5  # Python's default busy timeout, 5 s
    assert blocked.returncode == 1 and "sqlite3.OperationalError: database is locked" in blocked.stderr

    waiting = subprocess.Popen(
        [sys.executable, "shop.py", "pen", "cy@example.com"], cwd=shop, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)  # the lock held for a while, less than the app's timeout
        long_job.execute("COMMIT")
        assert waiting.communicate(timeout=TIMEOUT)[0] == "order 2 placed\n"  # waited, then committed
    finally:
        waiting.kill()
        waiting.wait()
        long_job.close()
    assert query(shop / "shop.db", "SELECT item FROM orders ORDER BY id") == [("book",), ("pen",)]


# --- Flask + SQLAlchemy --------------------------------------------------------------

FLASK_REQUESTS = """
import json
from app import app

client = app.test_client()
answers = [client.post("/orders", json=body) for body in (
    {"item": "book", "email": "ada@example.com"},
    {"item": "lamp", "email": "bob@example.com", "card": "declined"},
)]
print(json.dumps([[answer.status_code, answer.get_json()] for answer in answers]))
"""


def test_flask_request_commits_the_order_with_its_job_and_a_request_failing_after_the_enqueue_leaves_neither(
    tmp_path: Path,
) -> None:
    shop = example("flask_sqlalchemy", tmp_path)
    env = environment(WORKER_DB="shop.db")
    answers = json.loads(succeeded(run(shop, "-c", FLASK_REQUESTS, env=env)).stdout)
    assert answers == [[201, {"order": 1, "job": 1}], [402, {"error": "order 2: card declined"}]]
    db = shop / "shop.db"
    assert query(db, "SELECT id, item, receipt_sent FROM orders") == [(1, "book", 0)]
    assert jobs_in(db) == [("send_receipt", '{"order_id":1}', "pending", None)]

    # The job marks the receipt as sent through SQLAlchemy, on the engine its @on_startup made.
    succeeded(run(shop, "-m", "worker_cli", "run", "--burst", env=env))
    assert query(db, "SELECT id, receipt_sent FROM orders") == [(1, 1)]
    assert jobs_in(db) == [("send_receipt", '{"order_id":1}', "succeeded", '{"sent_to":"ada@example.com"}')]
