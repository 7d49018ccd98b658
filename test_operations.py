"""Operating the worker: the CLI's status, jobs, show, retry, cancel, check and schema, and the dashboard.

These commands read the real clock, so the prepared database is written at the
real time; a heartbeat's age is faked by rewriting ``last_seen``, never by
waiting.  The CLI runs as real subprocesses (``python -m worker``); the
dashboard runs in-process on a free port, and once in a real headless Chromium.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import queue as queue_module
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

import worker
import worker_cli
import worker_dashboard
from conftest import rows
from worker import JobContext
from worker_dashboard import DashboardServer

HERE = Path(__file__).parent
ARTIFACTS = HERE / "test-artifacts"

# Untrusted text a job can carry into its row: in its data, its type name and its error.
XSS_DATA = "<script>alert('data')</script>"
XSS_ERROR = "<script>alert('error')</script>"
XSS_TYPE = "<img src=x onerror=alert('type')>"


@pytest.fixture
def prepared(db: str, make_worker: Any) -> dict[str, int]:
    """Jobs in every state, a failure retried once, a cron job and one live worker; returns the ids by role."""

    @worker.job
    def add(ctx: JobContext, a: int, b: int) -> int:
        return a + b

    @worker.job(max_attempts=2, retry_delay=0)
    def explode(ctx: JobContext, note: str = "") -> None:
        raise RuntimeError(f"boom {XSS_ERROR}")

    @worker.job(name=XSS_TYPE)
    def echo(ctx: JobContext) -> dict[str, str]:
        return {"echo": XSS_DATA}

    live = make_worker(clock=time.time)  # the real clock: status compares heartbeats and due times with it
    ids: dict[str, int] = {}
    with worker.Queue(db) as producer:
        ids["cron"] = producer.schedule_cron("remove_old_jobs", "0 * * * *").id
        ids["succeeded"] = producer.enqueue("add", {"a": 1, "b": 2}).id
        ids["failed_first"] = producer.enqueue("explode", {"note": XSS_DATA}).id
        ids["evil"] = producer.enqueue(XSS_TYPE).id
        for _ in range(10):  # bounded: a few steps run everything that is due
            if live.work() == 0:
                break
        ids["failed_last"] = rows(db, f"rescheduled_from_job = {ids['failed_first']}")[0]["id"]
        ids["later"] = producer.enqueue("add", {"a": 3, "b": 4}, delay=3600).id
        ids["cancelled"] = producer.enqueue("add", {"a": 5, "b": 6}).id
        producer.cancel(ids["cancelled"])
        ids["running"] = producer.enqueue("add", {"a": 7, "b": 8}, queue="mail").id
        assert [j.id for j in live.claim(1)] == [ids["running"]]
        ids["pending"] = producer.enqueue("add", {"a": 9, "b": 10}).id
    return ids


def cli(*args: str, db: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m worker_cli ARGS --db DB`` (the `worker` command), as another process would run it."""
    command = [sys.executable, "-m", "worker_cli", *args, *(["--db", db] if db else [])]
    return subprocess.run(
        command, cwd=HERE, env={**os.environ, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=60
    )


def age_heartbeats(db: str, seconds: float) -> None:
    """Make every worker's last heartbeat ``seconds`` older, as if it had stopped beating."""
    with sqlite3.connect(db, timeout=5) as conn:
        conn.execute("UPDATE worker_processes SET last_seen = last_seen - ?", (int(seconds * 1000),))
    conn.close()


# --- worker status ---------------------------------------------------------------


def test_status_json_counts_each_queue_and_names_the_worker_and_cron_job(db: str, prepared: dict[str, int]) -> None:
    result = cli("status", "--json", db=db)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    queues = {q["queue"]: q for q in report["queues"]}
    assert queues["default"] | {"oldest_waiting_seconds": None} == {
        "queue": "default",
        "pending_due": 1,
        "pending_later": 2,  # the delayed job and the cron job's next run
        "running": 0,
        "succeeded_last_hour": 2,
        "failed_last_hour": 2,
        "cancelled_last_hour": 1,
        "oldest_waiting_seconds": None,
        "paused": False,
        "max_running": None,
        "per_second": None,
    }
    assert queues["default"]["oldest_waiting_seconds"] >= 0
    assert (queues["mail"]["running"], queues["mail"]["pending_due"]) == (1, 0)
    [process] = report["workers"]
    # Its one claimed job, counted in the table now, not as of its last heartbeat (which said 0).
    assert (process["pid"], process["fresh"], process["running"]) == (os.getpid(), True, 1)
    [cron] = report["cron"]
    assert (cron["type"], cron["schedule"], cron["next_job"]) == ("remove_old_jobs", "0 * * * *", prepared["cron"])
    assert report["healthy"] is True
    assert report["schema_version"] == worker.schema_version()
    assert Path(report["database"]).resolve() == Path(db).resolve()


def test_status_for_people_is_a_set_of_plain_tables(db: str, prepared: dict[str, int]) -> None:
    result = cli("status", db=db)
    assert result.returncode == 0, result.stderr
    assert "\033[" not in result.stdout  # no colour when stdout is not a terminal
    for expected in (f"schema {worker.schema_version()}", "default", "mail", "fresh", "remove_old_jobs", "0 * * * *"):
        assert expected in result.stdout


def test_status_exits_1_once_the_only_heartbeat_is_older_than_the_lease(db: str, prepared: dict[str, int]) -> None:
    age_heartbeats(db, worker.DEFAULT_LEASE + 1)
    result = cli("status", "--json", db=db)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [w["fresh"] for w in report["workers"]] == [False]
    assert report["workers"][0]["heartbeat_age_seconds"] > worker.DEFAULT_LEASE
    assert "stale" in cli("status", db=db).stdout


def test_status_exits_0_while_one_of_two_heartbeats_is_fresh(
    db: str, prepared: dict[str, int], make_worker: Any
) -> None:
    age_heartbeats(db, worker.DEFAULT_LEASE + 1)
    make_worker(clock=time.time).start_up()
    assert cli("status", db=db).returncode == 0


def test_status_exits_1_with_no_worker_at_all(db: str, queue: worker.Queue) -> None:
    result = cli("status", "--json", db=db)
    assert result.returncode == 1
    assert json.loads(result.stdout)["workers"] == []


def test_status_of_a_missing_database_exits_3_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    result = cli("status", db=str(missing))
    assert result.returncode == 3
    assert "no such file" in result.stderr
    assert not missing.exists()


# --- worker jobs / show ------------------------------------------------------------


def test_jobs_lists_rows_newest_first(db: str, prepared: dict[str, int]) -> None:
    result = cli("jobs", db=db)
    assert result.returncode == 0, result.stderr
    listed = [int(line.split()[0]) for line in result.stdout.splitlines()[2:]]
    assert listed == sorted(prepared.values(), reverse=True)


def test_jobs_filters_by_status_type_and_queue_and_limits(db: str, prepared: dict[str, int]) -> None:
    def ids(*args: str) -> list[int]:
        result = cli("jobs", "--json", *args, db=db)
        assert result.returncode == 0, result.stderr
        return [row["id"] for row in json.loads(result.stdout)]

    assert ids("--status", "failed") == [prepared["failed_last"], prepared["failed_first"]]
    assert ids("--type", "explode", "--limit", "1") == [prepared["failed_last"]]
    assert ids("--queue", "mail") == [prepared["running"]]
    assert ids("--limit", "2") == [prepared["pending"], prepared["running"]]


def test_jobs_json_rows_carry_every_column_decoded(db: str, prepared: dict[str, int]) -> None:
    listed = json.loads(cli("jobs", "--json", "--status", "succeeded", db=db).stdout)
    by_id = {row["id"]: row for row in listed}
    assert set(by_id[prepared["succeeded"]]) == set(worker.COLUMNS)
    assert (by_id[prepared["succeeded"]]["data"], by_id[prepared["succeeded"]]["result"]) == ({"a": 1, "b": 2}, 3)
    assert by_id[prepared["evil"]]["result"] == {"echo": XSS_DATA}


def test_jobs_refuses_an_unknown_status(db: str, prepared: dict[str, int]) -> None:
    result = cli("jobs", "--status", "lost", db=db)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_show_prints_data_error_with_traceback_and_the_chain(db: str, prepared: dict[str, int]) -> None:
    result = cli("show", str(prepared["failed_last"]), db=db)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"from job   {prepared['failed_first']}" in out
    assert '"note": "<script>' in out
    assert "Traceback (most recent call last)" in out
    chain = out.split("chain:", 1)[1]
    assert str(prepared["failed_first"]) in chain and str(prepared["failed_last"]) in chain


def test_show_json_is_the_row_with_its_chain(db: str, prepared: dict[str, int]) -> None:
    for id in (prepared["failed_first"], prepared["failed_last"]):
        shown = json.loads(cli("show", str(id), "--json", db=db).stdout)
        assert shown["id"] == id
        assert [j["id"] for j in shown["chain"]] == [prepared["failed_first"], prepared["failed_last"]]
        assert [j["attempt"] for j in shown["chain"]] == [1, 2]


def test_show_of_an_unknown_id_exits_1(db: str, prepared: dict[str, int]) -> None:
    result = cli("show", "999999", db=db)
    assert result.returncode == 1
    assert "no job 999999" in result.stderr


# --- worker retry / cancel -------------------------------------------------------


def test_retry_of_the_newest_failure_adds_a_pending_row_to_its_chain(db: str, prepared: dict[str, int]) -> None:
    result = cli("retry", str(prepared["failed_last"]), db=db)
    assert result.returncode == 0, result.stderr
    new_id = int(re.fullmatch(rf"job {prepared['failed_last']} retried as job (\d+)\n", result.stdout)[1])  # type: ignore[index]
    [new] = rows(db, f"id = {new_id}")
    assert (new["status"], new["rescheduled_from_job"], new["attempt"], new["type"]) == (
        "pending",
        prepared["failed_last"],
        3,
        "explode",
    )
    assert json.loads(new["data"]) == {"note": XSS_DATA}


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        ("failed_first", "already retried"),
        ("succeeded", "it is succeeded"),
        ("pending", "it is pending"),
    ],
)
def test_retry_refuses_rows_that_cannot_be_retried(db: str, prepared: dict[str, int], role: str, reason: str) -> None:
    before = len(rows(db))
    result = cli("retry", str(prepared[role]), db=db)
    assert result.returncode == 1
    assert reason in result.stderr
    assert len(rows(db)) == before


def test_retry_failed_retries_each_chain_that_ended_in_failure_once(db: str, prepared: dict[str, int]) -> None:
    result = cli("retry", "--failed", db=db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "1 jobs retried"
    assert [r["rescheduled_from_job"] for r in rows(db, "status = 'pending' AND attempt > 1")] == [
        prepared["failed_last"]
    ]


def test_retry_needs_an_id_or_failed(db: str, prepared: dict[str, int]) -> None:
    assert cli("retry", db=db).returncode == 2


def test_cancel_a_pending_job_and_ask_the_worker_of_a_running_one(db: str, prepared: dict[str, int]) -> None:
    assert cli("cancel", str(prepared["pending"]), db=db).returncode == 0
    assert rows(db, f"id = {prepared['pending']}")[0]["status"] == "cancelled"
    asked = cli("cancel", str(prepared["running"]), db=db)
    assert asked.returncode == 0
    assert "its worker was asked to stop it" in asked.stdout
    assert rows(db, f"id = {prepared['running']}")[0]["status"] == "running"  # until its worker sees it
    again = cli("cancel", str(prepared["running"]), db=db)
    assert again.returncode == 1 and "asked to stop it already" in again.stderr


# --- worker check / schema ---------------------------------------------------------


def test_check_passes_on_a_sound_database(db: str, prepared: dict[str, int]) -> None:
    result = cli("check", db=db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")


def test_check_exits_2_for_a_pending_row_with_a_bad_cron_expression(db: str, prepared: dict[str, int]) -> None:
    with sqlite3.connect(db, timeout=5) as conn:
        conn.execute("INSERT INTO worker_jobs (type, cron_schedule, tag) VALUES ('add', 'every tuesday', 'mine')")
    conn.close()
    result = cli("check", db=db)
    assert result.returncode == 2
    assert "every tuesday" in result.stderr


def test_check_exits_2_when_the_jobs_module_does_not_import(db: str, prepared: dict[str, int]) -> None:
    result = cli("check", "--jobs", "no_such_module", db=db)
    assert result.returncode == 2


def test_check_exits_3_for_a_database_with_another_schema_version(db: str, prepared: dict[str, int]) -> None:
    with sqlite3.connect(db, timeout=5) as conn:
        conn.execute("UPDATE worker_schema SET version = ?", (worker.schema_version() + 1,))
    conn.close()
    assert cli("check", db=db).returncode == 3


def test_schema_prints_ddl_that_another_tool_can_apply(tmp_path: Path) -> None:
    result = cli("schema")
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE IF NOT EXISTS worker_jobs" in result.stdout
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.executescript(result.stdout)
        assert conn.execute("SELECT version FROM worker_schema").fetchone()[0] == worker.schema_version()
        conn.execute("INSERT INTO worker_jobs (type) VALUES ('hello')")
        assert conn.execute("SELECT status, attempt FROM worker_jobs").fetchone() == ("pending", 1)
    conn.close()


# --- The dashboard ---------------------------------------------------------------


class Response:
    """What the dashboard answered: status, headers and body text."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.text = status, headers, body.decode()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test looks at the 303 itself


# Loopback only, and never through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def request(
    url: str, *, form: dict[str, str] | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> Response:
    """One request to the dashboard; POST when a form is given."""
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
    data = None if form is None else urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _OPENER.open(req, timeout=10) as answer:
            return Response(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.headers, error.read())


def steady(report: dict[str, Any]) -> dict[str, Any]:
    """A status report less what changes from one moment to the next."""
    moving = {"now", "oldest_waiting_seconds", "heartbeat_age_seconds"}

    def keep(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items() if k not in moving}
        if isinstance(value, list):
            return [keep(v) for v in value]
        return value

    return keep(report)  # type: ignore[no-any-return]


def test_dashboard_status_json_equals_worker_status_json(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    server = serve()
    answer = request(server.url + "status.json")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    from_cli = json.loads(cli("status", "--json", db=db).stdout)
    from_page = json.loads(answer.text)
    assert from_page.keys() == from_cli.keys()
    assert steady(from_page) == steady(from_cli)


def test_front_page_shows_queues_workers_cron_and_failures_with_folded_tracebacks(
    prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    answer = request(serve().url)
    assert answer.status == 200
    page = answer.text
    for heading in ("Queues", "Workers", "Cron jobs", "Recent failures", "Latest jobs"):
        assert f"<h2>{heading}</h2>" in page
    assert "<td>mail</td>" in page and "remove_old_jobs" in page and "0 * * * *" in page
    assert '<span class="badge fresh">fresh</span>' in page
    failures = page.split('<table id="failures">', 1)[1].split("</table>", 1)[0]
    for id in (prepared["failed_first"], prepared["failed_last"]):
        assert f'<a href="/jobs/{id}">{id}</a>' in failures
    assert failures.count("<details><summary>RuntimeError: boom") == 2
    assert "Traceback (most recent call last)" in failures
    assert f'retried as <a href="/jobs/{prepared["failed_last"]}">' in failures
    assert "location.reload()" in page and 'http-equiv="refresh"' in page  # it refreshes itself
    assert "<form" not in page  # read-only


def test_job_page_shows_data_result_error_and_chain(
    prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    server = serve()
    failed = request(f"{server.url}jobs/{prepared['failed_last']}").text
    assert "<h2>Data</h2>" in failed and "<h2>Error</h2>" in failed and "<h2>Chain</h2>" in failed
    assert "Traceback (most recent call last)" in failed
    assert f'<a href="/jobs/{prepared["failed_first"]}">' in failed
    succeeded = request(f"{server.url}jobs/{prepared['succeeded']}").text
    assert "<h2>Result</h2><pre>3</pre>" in succeeded
    assert "<h2>Error</h2>" not in succeeded


def test_job_at_the_end_of_a_chain_longer_than_the_chain_reach_has_its_page(
    db: str, queue: worker.Queue, serve: Callable[..., DashboardServer]
) -> None:
    """A per-minute cron job keeps a week of runs, each pointing back to the one before."""
    runs = 2 * worker.CHAIN_REACH + 5
    with sqlite3.connect(db, timeout=5) as conn:
        conn.executemany(
            "INSERT INTO worker_jobs (id, type, status, tag, cron_schedule, cron_slot, due, rescheduled_from_job)"
            " VALUES (?, 'tick', 'succeeded', 'cron:tick', '* * * * *', ?, ?, ?)",
            [(id, id * 60_000, id * 60_000, id - 1 if id > 1 else None) for id in range(1, runs + 1)],
        )
    conn.close()
    answer = request(f"{serve().url}jobs/{runs}")
    assert answer.status == 200
    assert f"<h1>Job {runs} <code>tick</code>" in answer.text


class BusyStore:
    """A reader whose every query finds the database busy, as a long write lock or a server restart makes it."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise worker.DatabaseBusy("database is locked")

        return refuse

    def close(self) -> None:
        pass


def test_a_database_busy_for_now_is_a_503_to_try_again_not_a_500(
    prepared: dict[str, int], serve: Callable[..., DashboardServer], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The page says to try again, and the log has one line, not a traceback; then it serves again."""
    server = serve()
    with monkeypatch.context() as patched:
        patched.setattr(worker, "open_reader", lambda target: BusyStore())
        answer = request(server.url)
    assert (answer.status, answer.headers["Retry-After"]) == (503, "1")
    assert "database is locked; try again in a moment" in answer.text
    assert [r.getMessage() for r in caplog.records if "dashboard" in r.getMessage()] == [
        "dashboard request /: database is locked"
    ]
    assert not any(r.exc_info for r in caplog.records)
    assert request(server.url).status == 200


def test_unknown_job_and_unknown_page_are_404(prepared: dict[str, int], serve: Callable[..., DashboardServer]) -> None:
    server = serve()
    assert request(f"{server.url}jobs/999999").status == 404
    assert request(f"{server.url}admin").status == 404


@pytest.mark.parametrize("role", ["failed_first", "failed_last", "evil"])
def test_every_value_from_the_table_is_escaped(
    prepared: dict[str, int], serve: Callable[..., DashboardServer], role: str
) -> None:
    server = serve(allow_actions=True)
    for path in ("", f"jobs/{prepared[role]}"):
        page = request(server.url + path).text
        for hostile in (XSS_DATA, XSS_ERROR, XSS_TYPE):
            assert hostile not in page
        # The page's only script is its own, with this response's nonce.
        assert all("nonce=" in tag for tag in re.findall(r"<script[^>]*>", page))
        assert "<img" not in page
    shown = request(f"{server.url}jobs/{prepared[role]}").text
    expected = {"failed_first": XSS_ERROR, "failed_last": XSS_DATA, "evil": XSS_TYPE}[role]
    assert html.escape(expected) in shown


def test_pages_forbid_scripts_other_than_their_own(
    prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    answer = request(serve().url)
    policy = answer.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)[1]  # type: ignore[index]
    assert f'<script nonce="{nonce}">' in answer.text
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy


def test_reading_pages_never_writes_the_database(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    def fingerprint() -> list[str]:
        return [hashlib.sha256(Path(f"{db}{suffix}").read_bytes()).hexdigest() for suffix in ("", "-wal")]

    before = fingerprint()
    server = serve(allow_actions=True)
    for path in ("", "status.json", f"jobs/{prepared['failed_last']}", f"jobs/{prepared['running']}"):
        assert request(server.url + path).status == 200
    assert fingerprint() == before


def test_actions_are_refused_without_allow_actions(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    server = serve()
    assert server.token is None
    answer = request(f"{server.url}jobs/{prepared['failed_last']}/retry", form={"token": "anything"})
    assert answer.status in (403, 404)
    assert request(f"{server.url}?token=anything").status == 403
    assert rows(db, f"rescheduled_from_job = {prepared['failed_last']}") == []


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"form": {"token": "wrong"}},
        {"headers": {"X-Worker-Token": "wrong"}},
        {"cookie": True},  # the browser's cookie alone is not the token: it would let any site post
    ],
)
def test_actions_without_the_token_are_403_and_change_nothing(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer], credentials: dict[str, Any]
) -> None:
    server = serve(allow_actions=True)
    headers = dict(credentials.get("headers", {}))
    if credentials.get("cookie"):
        headers["Cookie"] = f"{worker_dashboard.TOKEN_COOKIE}={server.token}"
    before = [tuple(row) for row in rows(db)]
    for action, role in (("retry", "failed_last"), ("cancel", "pending")):
        answer = request(
            f"{server.url}jobs/{prepared[role]}/{action}",
            form=credentials.get("form", {}),
            headers=headers,
            method="POST",
        )
        assert answer.status == 403
    assert [tuple(row) for row in rows(db)] == before


def test_retry_posted_with_the_token_creates_the_new_row(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    server = serve(allow_actions=True)
    assert server.token is not None
    url = f"{server.url}jobs/{prepared['failed_last']}/retry"
    answer = request(url, form={"token": server.token})
    assert answer.status == 303
    [new] = rows(db, f"rescheduled_from_job = {prepared['failed_last']}")
    assert answer.headers["Location"] == f"/jobs/{new['id']}"
    assert (new["status"], new["attempt"], new["type"]) == ("pending", 3, "explode")
    again = request(url, form={"token": server.token})
    assert again.status == 409
    assert "already retried" in again.text


def test_cancel_posted_with_the_token_header(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    server = serve(allow_actions=True)
    assert server.token is not None
    token = {"X-Worker-Token": server.token}
    answer = request(f"{server.url}jobs/{prepared['pending']}/cancel", headers=token, method="POST")
    assert (answer.status, answer.headers["Location"]) == (303, f"/jobs/{prepared['pending']}")
    assert rows(db, f"id = {prepared['pending']}")[0]["status"] == "cancelled"
    running = request(f"{server.url}jobs/{prepared['running']}/cancel", headers=token, method="POST")
    assert running.status == 303  # its worker is asked to stop it
    asked = rows(db, f"id = {prepared['running']}")[0]
    assert (asked["status"], asked["cancel_requested_by"]) == ("running", "dashboard, from 127.0.0.1")
    again = request(f"{server.url}jobs/{prepared['running']}/cancel", headers=token, method="POST")
    assert again.status == 409


def test_start_up_url_with_the_token_shows_the_buttons_in_that_browser_only(
    prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    server = serve(allow_actions=True)
    assert server.token is not None
    assert "<form" not in request(server.url).text
    welcome = request(f"{server.url}?token={server.token}")
    assert (welcome.status, welcome.headers["Location"]) == (303, "/")
    cookie = welcome.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = request(server.url, headers={"Cookie": cookie.split(";", 1)[0]}).text
    assert f'action="/jobs/{prepared["failed_last"]}/retry"' in page
    assert f'action="/jobs/{prepared["pending"]}/cancel"' in page
    assert f'action="/jobs/{prepared["failed_first"]}/retry"' not in page  # already retried
    assert request(f"{server.url}?token=wrong").status == 403


def test_request_naming_another_host_is_refused(
    prepared: dict[str, int], serve: Callable[..., DashboardServer]
) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own host name: it must not read the jobs."""
    server = serve()
    assert request(server.url, headers={"Host": "attacker.example:8750"}).status == 403
    assert request(server.url, headers={"Host": f"localhost:{server.server_address[1]}"}).status == 200


def test_dashboard_command_prints_its_url_and_token_and_stops_on_sigterm(db: str, queue: worker.Queue) -> None:
    process = subprocess.Popen(
        [sys.executable, "worker_dashboard.py", "--db", db, "--port", "0", "--allow-actions"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue_module.Queue[str] = queue_module.Queue()

    def read_lines() -> None:  # so each wait for a line can be bounded
        for line in process.stdout or []:
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()
    try:
        first, second = lines.get(timeout=30), lines.get(timeout=10)
        url = re.search(r"http://127\.0\.0\.1:\d+/", first)[0]  # type: ignore[index]
        token = re.search(r"\?token=(\S+)", second)[1]  # type: ignore[index]
        assert request(url + "status.json").status == 200
        assert request(url + "jobs/1/retry", headers={"X-Worker-Token": token}, method="POST").status == 404
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    assert code == 0, process.stderr.read() if process.stderr else ""


def test_dashboard_command_exits_3_for_a_missing_database(tmp_path: Path) -> None:
    command = [sys.executable, "worker_dashboard.py", "--db", str(tmp_path / "missing.db"), "--port", "0"]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "no such file" in result.stderr
    assert not (tmp_path / "missing.db").exists()


def _worker_has_dashboard_command() -> bool:
    commands: Any = worker_cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    return "dashboard" in commands


@pytest.mark.skipif(not _worker_has_dashboard_command(), reason="worker.py does not wire `worker dashboard` yet")
def test_worker_dashboard_runs_dashboard_py_with_its_own_options(tmp_path: Path) -> None:
    assert "usage: worker dashboard" in cli("dashboard", "--help").stdout
    missing = cli("dashboard", "--port", "0", db=str(tmp_path / "missing.db"))
    assert missing.returncode == 3
    assert "no such file" in missing.stderr


# --- The dashboard in a real browser -------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]


def _browser_missing(reason: str) -> NoReturn:
    """Skip on a developer's machine without a browser; in CI (CI=true) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test: .ci/system-packages.sh installs chromium)")
    pytest.skip(reason)


def test_browser_shows_a_failed_job_and_opens_its_traceback(
    db: str, prepared: dict[str, int], serve: Callable[..., DashboardServer], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        _browser_missing("Debian's chromium is not installed: run .ci/system-packages.sh")
    try:
        from playwright.sync_api import Dialog, expect, sync_playwright
    except ImportError:
        _browser_missing("the Python package playwright is not installed: pip install -e '.[dev]'")
    server = serve(allow_actions=True, refresh_seconds=3600)  # no reload in the middle of a click
    failed = prepared["failed_last"]
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            timeout=30_000,
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)

            def on_dialog(dialog: Dialog) -> None:  # an alert() that got through the escaping
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.goto(f"{server.url}?token={server.token}")  # sets the cookie, lands on /
            assert page.url == server.url
            row = page.locator(f'#failures tr:has(td:first-child a[href="/jobs/{failed}"])')
            expect(row).to_contain_text("RuntimeError: boom")
            traceback = row.locator("details pre")
            expect(traceback).to_be_hidden()
            row.locator("details summary").click()
            expect(traceback).to_be_visible()
            expect(traceback).to_contain_text("Traceback (most recent call last)")
            expect(traceback).to_contain_text(XSS_ERROR)  # shown as text, not run
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            chart = page.locator("svg.chart")  # the last hour, drawn under the page's CSP
            expect(chart).to_be_visible()
            assert (chart.bounding_box() or {"width": 0})["width"] >= 500

            row.get_by_role("button", name="retry").click()
            page.wait_for_url(re.compile(r"/jobs/\d+$"))
            [new] = rows(db, f"rescheduled_from_job = {failed}")
            assert page.url == f"{server.url}jobs/{new['id']}"
            expect(page.locator("h1")).to_contain_text(f"Job {new['id']}")
            expect(page.locator("h1")).to_contain_text("cancel")  # it is pending now
            page.screenshot(path=str(ARTIFACTS / "dashboard-retried-job.png"), full_page=True)
            assert page.evaluate("() => document.querySelectorAll('img').length") == 0
        finally:
            browser.close()
    assert dialogs == []  # none of the hostile scripts ran


def test_cli_shows_control_characters_from_the_table_escaped(db: str, queue: worker.Queue) -> None:
    """A job's type or error must not drive the terminal (clear it, retitle it)."""
    evil = "evil\x1b[2J\x1b]0;pwned\x07"
    job = worker.Queue(db, check_types=False).enqueue(evil)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE worker_jobs SET status = 'failed', error = ? WHERE id = ?", (evil + "\nline 2", job.id))
    conn.close()
    for command in (["jobs"], ["show", str(job.id)]):
        shown = subprocess.run(
            [sys.executable, "-m", "worker_cli", *command, "--db", db], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
        assert "evil\\x1b[2J\\x1b]0;pwned\\x07" in shown.stdout
