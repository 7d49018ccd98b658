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
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

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


# --- Django ------------------------------------------------------------------------

DJANGO_SETTINGS = "django_shop.settings"
DJANGO_REQUESTS = """
import json
import django

django.setup()
from django.test import Client

client = Client()
answers = [
    client.post("/orders", {"item": "book", "email": "ada@example.com"}),
    client.post("/orders", {"item": "lamp", "email": "bob@example.com", "card": "declined"}),
    client.post("/orders/on-commit", {"item": "pen", "email": "cy@example.com"}),
]
print(json.dumps([[answer.status_code, answer.json()] for answer in answers]))
"""


@pytest.fixture
def django_shop(tmp_path: Path) -> Path:
    """The Django example, migrated: db.sqlite3 has the shop's table and not yet the worker's."""
    shop = example("django_shop", tmp_path)
    succeeded(run(shop, "manage.py", "migrate"))
    assert query(shop / "db.sqlite3", "SELECT name FROM sqlite_master WHERE name = 'worker_jobs'") == []
    return shop


def test_django_shops_own_tests_pass_with_the_worker_tables_created_in_the_test_database(django_shop: Path) -> None:
    result = succeeded(run(django_shop, "manage.py", "test", "shop"))
    assert "Ran 3 tests" in result.stderr and "OK" in result.stderr


def test_django_views_enqueue_in_atomic_and_on_commit_and_the_worker_finds_djangos_database_by_its_settings(
    django_shop: Path,
) -> None:
    answers = json.loads(
        succeeded(
            run(django_shop, "-c", DJANGO_REQUESTS, env=environment(DJANGO_SETTINGS_MODULE=DJANGO_SETTINGS))
        ).stdout
    )
    assert answers == [
        [201, {"order": 1, "job": 1}],
        [402, {"error": "order 2: card declined"}],  # rolled back after the enqueue: no order 2, no job
        [201, {"order": 2}],  # enqueued by on_commit
    ]
    db = django_shop / "db.sqlite3"
    assert query(db, "SELECT id, item, receipt_sent FROM shop_order") == [(1, "book", 0), (2, "pen", 0)]
    assert [row[:3] for row in jobs_in(db)] == [
        ("send_receipt", '{"order_id":1}', "pending"),
        ("send_receipt", '{"order_id":2}', "pending"),
    ]

    # No --db: the worker serves Django's default database; the jobs module imports models at module level.
    succeeded(
        run(
            django_shop,
            "-m",
            "worker_cli",
            "run",
            "--burst",
            "--django-settings",
            DJANGO_SETTINGS,
            "--jobs",
            "shop.jobs",
        )
    )
    assert query(db, "SELECT id, receipt_sent FROM shop_order") == [(1, 1), (2, 1)]
    assert [(row[2], json.loads(row[3])) for row in jobs_in(db)] == [
        ("succeeded", {"sent_to": "ada@example.com"}),
        ("succeeded", {"sent_to": "cy@example.com"}),
    ]
    assert not (django_shop / "worker.db").exists()

    # DJANGO_SETTINGS_MODULE in the environment does what the option does.
    listed = succeeded(
        run(
            django_shop,
            "-m",
            "worker_cli",
            "jobs",
            "--json",
            "--type",
            "send_receipt",
            env=environment(DJANGO_SETTINGS_MODULE=DJANGO_SETTINGS),
        )
    )
    assert sorted(job["status"] for job in json.loads(listed.stdout)) == ["succeeded", "succeeded"]


def test_worker_migrate_with_django_settings_creates_the_worker_tables_in_djangos_database(django_shop: Path) -> None:
    migrate = ("-m", "worker_cli", "migrate", "--django-settings", DJANGO_SETTINGS)
    first = succeeded(run(django_shop, *migrate))
    assert first.stdout.startswith(f"-- {django_shop / 'db.sqlite3'}: the worker's schema from version 0 to ")
    assert "CREATE TABLE" in first.stdout
    assert query(django_shop / "db.sqlite3", "SELECT count(*) FROM worker_jobs") == [(0,)]
    assert "is current" in succeeded(run(django_shop, *migrate)).stdout
    assert not (django_shop / "worker.db").exists()


@pytest.mark.parametrize("engine", ["django.db.backends.dummy", "django.db.backends.mysql"])
def test_a_django_database_other_than_sqlite_or_postgresql_is_a_configuration_error(
    django_shop: Path, engine: str
) -> None:
    # The engine is read before django.setup(), which would load the backend's driver: mysqlclient is not
    # installed here, and the error is still the worker's own, not "Error loading MySQLdb".
    (django_shop / "django_shop" / "settings_elsewhere.py").write_text(
        "from django_shop.settings import *  # noqa: F403\n"
        f"DATABASES = {{'default': {{'ENGINE': '{engine}', 'NAME': 'shop'}}}}\n"
    )
    result = run(
        django_shop,
        "-m",
        "worker_cli",
        "run",
        "--burst",
        "--django-settings",
        "django_shop.settings_elsewhere",
        "--jobs",
        "shop.jobs",
    )
    assert result.returncode == 2, result.stderr
    assert f"'{engine}': this worker serves SQLite and PostgreSQL" in result.stderr
    assert not (django_shop / "worker.db").exists()


def test_a_django_postgresql_database_is_the_workers_own_with_no_db_given(django_shop: Path, postgres_url: str) -> None:
    """Django's NAME, USER, HOST and PORT become the worker's postgresql:// URL: the worker's table is made there."""
    import psycopg

    server, name = postgres_url.rsplit("/", 1)
    host, port = server.rsplit("@", 1)[1].split(":")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS worker_jobs, worker_schema, worker_processes, worker_finished_per_minute")
    (django_shop / "django_shop" / "settings_postgres.py").write_text(
        "from django_shop.settings import *  # noqa: F403\n"
        f"DATABASES = {{'default': {{'ENGINE': 'django.db.backends.postgresql', 'NAME': {name!r},"
        f" 'USER': 'postgres', 'HOST': {host!r}, 'PORT': {port!r}}}}}\n"
    )
    result = run(django_shop, "-m", "worker_cli", "run", "--burst", "--no-cron",
                 "--django-settings", "django_shop.settings_postgres", "--jobs", "shop.jobs")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"postgresql://postgres@{host}:{port}/{name}" in result.stderr  # the "worker ... started" line
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM worker_schema").fetchone() == (1,)
    assert not (django_shop / "worker.db").exists()


def test_without_django_settings_or_db_the_worker_would_use_worker_db_in_the_project_folder(django_shop: Path) -> None:
    """Why the README tells Django users to pass --django-settings: otherwise nothing points at db.sqlite3."""
    status = run(django_shop, "-m", "worker_cli", "status")
    assert (status.returncode, status.stderr) == (3, "worker: cannot open database worker.db: no such file\n")
    # And the jobs module, which imports models, cannot even be imported without Django's settings.
    worker_run = run(django_shop, "-m", "worker_cli", "run", "--burst", "--jobs", "shop.jobs")
    assert worker_run.returncode == 2
    assert "settings are not configured" in worker_run.stderr


# --- The README ------------------------------------------------------------------------

# A snippet of an example in README.md is the fenced block right after a comment naming its file.
SNIPPET = re.compile(r"<!-- from (examples/\S+) -->\n```\w*\n(.*?)```", re.DOTALL)


def test_readme_snippets_of_the_examples_are_excerpts_of_the_tested_files() -> None:
    snippets = SNIPPET.findall((HERE / "README.md").read_text())
    examples = {Path(path).parts[1] for path, _ in snippets}
    assert examples == {"sqlite3_app", "flask_sqlalchemy", "django_shop", "fastapi_async"}
    for path, snippet in snippets:
        assert snippet in (HERE / path).read_text(), f"README's snippet of {path} is not in that file:\n{snippet}"
