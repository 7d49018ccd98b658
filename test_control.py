"""Controlling the work while it runs: pause and resume a queue, limit how many of its jobs run at once and how
many start per second, on every store.

The rules live in the claim's transaction (worker.QueueControls), so they are
tested first through workers on the fake clock, then with real worker
processes that keep a ledger of each job's start and end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
import worker_cli
from conftest import FakeClock, Processes, WorkerProcess, at, rows, wait_for
from worker import Queue, QueueControl, job

pytestmark = pytest.mark.stores("sqlite", "postgres")


def run_in(queue: str) -> str:
    return f"in_{queue}"


@pytest.fixture
def noop() -> None:
    @job
    def noop(ctx: worker.JobContext) -> None:
        return None


def statuses(db: str) -> dict[int, str]:
    return {row["id"]: row["status"] for row in rows(db)}


# --- Pause and resume ---------------------------------------------------------------


def test_a_paused_queue_is_not_claimed_and_the_other_queues_are(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    held = queue.enqueue("noop", queue="mail")
    other = queue.enqueue("noop", queue="default")
    queue.pause("mail")
    assert make_worker().work() == 1
    assert statuses(db) == {held.id: "pending", other.id: "succeeded"}


def test_a_resumed_queue_is_claimed_again(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    held = queue.enqueue("noop", queue="mail")
    queue.pause("mail")
    runner = make_worker()
    assert runner.work() == 0
    queue.resume("mail")
    assert runner.work() == 1
    assert statuses(db) == {held.id: "succeeded"}


def test_a_job_running_when_its_queue_is_paused_finishes_and_is_recorded(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    running = queue.enqueue("noop", queue="mail")
    runner = make_worker()
    (claimed,) = runner.claim(1)
    queue.pause("mail")
    runner.record([runner.execute(claimed)])
    assert statuses(db) == {running.id: "succeeded"}


def test_a_worker_of_listed_queues_still_obeys_their_pause(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    held, other = queue.enqueue("noop", queue="mail"), queue.enqueue("noop", queue="sms")
    queue.pause("mail")
    assert make_worker(queues=["mail", "sms"]).work() == 1
    assert statuses(db) == {held.id: "pending", other.id: "succeeded"}


def test_an_idle_worker_with_only_paused_rows_due_waits_for_the_resume_not_for_a_poll(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock
) -> None:
    queue.enqueue("noop", queue="mail")
    queue.enqueue("noop", queue="later", delay=30, now=at(clock))
    queue.pause("mail")
    runner = make_worker()
    assert runner.work() == 0
    store = runner.store
    with store.transaction():
        store.claim(runner.owner, runner.name, at(clock), at(clock, 60), 4, runner._known_types(), ())
        # The paused row does not make the worker claim at every step: the next due row is the later one.
        assert store.next_due(runner._known_types()) == at(clock, 30)


def test_status_shows_a_paused_queue_even_with_no_rows(queue: Queue, db: str) -> None:
    queue.pause("mail")
    store = worker.open_reader(db)
    try:
        report = worker.status(store)
    finally:
        store.close()
    (mail,) = report["queues"]
    assert (mail["queue"], mail["paused"], mail["max_running"], mail["per_second"]) == ("mail", True, None, None)
    assert "paused" in worker_cli.format_status(report).splitlines()[4]


def test_the_dashboard_shows_a_queue_paused_and_limited(queue: Queue, serve: Callable[..., Any]) -> None:
    queue.pause("mail")
    queue.limit("mail", running=2, per_second=5)
    with urllib.request.urlopen(serve().url, timeout=10) as answer:
        page = answer.read().decode()
    (row,) = re.findall(r"<tr><td>mail</td>.*?</tr>", page)
    assert "<td>paused, 2 running, 5/s</td>" in row


def test_resuming_the_last_control_of_a_queue_removes_its_row(queue: Queue) -> None:
    queue.pause("mail")
    assert [control.queue for control in queue.controls()] == ["mail"]
    assert queue.resume("mail").empty
    assert queue.controls() == []


def test_pause_resume_and_limit_from_the_command_line(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_cli.main(["pause", "mail", "--db", db]) == 0
    assert worker_cli.main(["limit", "mail", "--running", "2", "--per-second", "2.5", "--db", db]) == 0
    assert worker_cli.main(["resume", "mail", "--db", db]) == 0
    assert worker_cli.main(["limit", "mail", "--per-second", "off", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "queue mail: paused",
        "queue mail: paused, 2 running, 2.5/s",
        "queue mail: 2 running, 2.5/s",
        "queue mail: 2 running",
    ]
    with Queue(db) as producer:
        assert producer.controls() == [QueueControl("mail", max_running=2, changed=producer.controls()[0].changed)]


def test_the_readme_documents_each_new_command() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    for command in ("worker pause Q", "worker resume Q", "worker limit Q [--running N", "worker cancel ID"):
        assert f"`{command}" in readme, command


@pytest.mark.parametrize(
    "arguments",
    [["limit", "mail"], ["limit", "mail", "--running", "0"], ["limit", "mail", "--per-second", "-1"],
     ["limit", "mail", "--per-second", "1001"], ["limit", "mail", "--running", "two"]],
)  # fmt: skip
def test_a_limit_that_cannot_be_is_a_usage_error_and_changes_nothing(db: str, arguments: list[str]) -> None:
    try:
        code = worker_cli.main([*arguments, "--db", db])
    except SystemExit as exited:  # argparse's own
        code = int(exited.code or 0)
    assert code == worker.EXIT_USAGE
    with Queue(db) as producer:
        assert producer.controls() == []


def test_queue_refuses_a_nonsense_limit(queue: Queue) -> None:
    for bad in ({"running": 0}, {"running": True}, {"per_second": float("nan")}, {"per_second": 0}, {}):
        with pytest.raises(ValueError):
            queue.limit("mail", **bad)
    assert queue.controls() == []


# --- The running limit ----------------------------------------------------------------


def test_a_running_limit_holds_across_workers_and_counts_jobs_claimed_ahead(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    queue.enqueue_many([("noop", None)] * 6, queue="api")
    queue.limit("api", running=2)
    first, second = make_worker(concurrency=4), make_worker(concurrency=4)
    assert len(first.claim(4)) == 2  # the claim takes two, the limit, though it has room for four
    assert second.claim(4) == []  # another worker sees them running
    assert len(rows(db, "status = 'running'")) == 2


def test_a_running_limit_frees_a_slot_when_a_job_ends(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    queue.enqueue_many([("noop", None)] * 3, queue="api")
    queue.limit("api", running=2)
    first, second = make_worker(), make_worker()
    claimed = first.claim(4)
    first.record([first.execute(claimed[0])])
    assert len(second.claim(4)) == 1
    assert len(rows(db, "status = 'running'")) == 2


def test_other_queues_fill_the_claim_beside_a_limited_one(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker]
) -> None:
    queue.enqueue_many([("noop", None)] * 4, queue="api")
    queue.enqueue_many([("noop", None)] * 4, queue="default")
    queue.limit("api", running=1)
    claimed = make_worker().claim(4)
    assert sorted(job.queue for job in claimed) == ["api", "default", "default", "default"]


def test_a_full_queue_is_looked_at_again_soon_not_at_every_step(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock
) -> None:
    queue.enqueue_many([("noop", None)] * 3, queue="api")
    queue.limit("api", running=1)
    runner = make_worker()
    store = runner.store
    with store.transaction():
        store.claim(runner.owner, runner.name, at(clock), at(clock, 60), 4, runner._known_types(), ())
        assert store.next_due(runner._known_types()) == at(clock) + worker.CONTROL_RECHECK_MS


def test_clearing_a_running_limit_lets_the_claim_take_every_due_job(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker]
) -> None:
    queue.enqueue_many([("noop", None)] * 4, queue="api")
    queue.limit("api", running=1)
    queue.limit("api", running=None)
    assert queue.controls() == []
    assert len(make_worker().claim(4)) == 4


def test_a_burst_worker_drains_a_queue_at_its_running_limit(noop: None, queue: Queue, db: str) -> None:
    """Its own finishes free the places: it claims again then, rather than taking the queue for not due."""
    queue.enqueue_many([("noop", None)] * 20, queue="api")
    queue.limit("api", running=2)
    runner = worker.Worker(db, concurrency=4, burst=True, cron=False)
    done = threading.Thread(target=runner.run, daemon=True)
    done.start()
    done.join(timeout=30)
    assert not done.is_alive()
    assert list(statuses(db).values()) == ["succeeded"] * 20


# --- The rate limit -------------------------------------------------------------------


def test_a_rate_limit_spaces_the_starts_evenly(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock
) -> None:
    queue.enqueue_many([("noop", None)] * 10, queue="api")
    queue.limit("api", per_second=4)  # one start every 250 ms
    runner = make_worker()
    started = []
    for _ in range(16):  # two seconds in steps of 125 ms
        started += [at(clock)] * len(runner.claim(4))
        clock.advance(0.125)
    assert [ms - started[0] for ms in started] == [0, 250, 500, 750, 1000, 1250, 1500, 1750]


def test_a_rate_limited_queue_is_looked_at_again_at_its_next_start(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock
) -> None:
    queue.enqueue_many([("noop", None)] * 3, queue="api")
    queue.limit("api", per_second=2)
    runner = make_worker()
    store = runner.store
    with store.transaction():
        claimed, _ = store.claim(runner.owner, runner.name, at(clock), at(clock, 60), 4, runner._known_types(), ())
        assert len(claimed) == 1
        assert store.next_due(runner._known_types()) == at(clock, 0.5)


def test_both_limits_at_once_take_the_smaller(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock
) -> None:
    queue.enqueue_many([("noop", None)] * 5, queue="api")
    queue.limit("api", running=1, per_second=1000)
    runner = make_worker()
    assert len(runner.claim(4)) == 1
    clock.advance(1)
    assert runner.claim(4) == []  # the rate allows one, the running limit none


# --- Snooze -------------------------------------------------------------------------------


@pytest.fixture
def snoozing(registry: dict[str, worker.JobType]) -> list[int]:
    """A job that snoozes 30 s on its first run of each attempt and fails on its second; the attempts it saw."""
    seen: list[int] = []

    @job(max_attempts=2, retry_delay=0)
    def waits(ctx: worker.JobContext) -> None:
        seen.append(ctx.attempt)
        ctx.enqueue("noop")  # a follow-up goes with a success only
        if len(seen) % 2:
            raise worker.Snooze(30)
        raise RuntimeError("boom")

    return seen


def test_a_snooze_ends_the_row_and_makes_the_next_of_its_chain_due_later_using_no_attempt(
    noop: None, snoozing: list[int], queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock,
    db: str,
) -> None:  # fmt: skip
    first = queue.enqueue("waits", tag="once", now=at(clock))
    runner = make_worker()
    assert runner.work() == 1
    ended, later = rows(db)
    assert (ended["status"], ended["error"]) == ("cancelled", f"snoozed for 30 s: job {later['id']} runs it then")
    assert (later["status"], later["due"], later["attempt"], later["snoozes"]) == ("pending", at(clock, 30), 1, 1)
    assert (later["rescheduled_from_job"], later["tag"]) == (first.id, "once")
    assert runner.work() == 0  # not before it is due
    clock.advance(30)
    while runner.work():
        clock.advance(30)
    # attempt 1 snoozed, then failed; attempt 2 snoozed, then failed: two attempts, as max_attempts says.
    assert snoozing == [1, 1, 2, 2]
    assert [(row["status"], row["attempt"]) for row in rows(db)] == [
        ("cancelled", 1), ("failed", 1), ("cancelled", 2), ("failed", 2)]  # fmt: skip
    assert [job.id for job in worker.job_chain(worker.open_reader(db), first.id)] == [r["id"] for r in rows(db)]


def test_a_snoozed_row_cannot_be_retried_by_hand(
    noop: None, snoozing: list[int], queue: Queue, make_worker: Callable[..., worker.Worker]
) -> None:
    snoozed = queue.enqueue("waits")
    make_worker().work()
    assert queue.retry(snoozed.id) is None  # its chain goes on in the snooze's row


def test_the_dashboard_offers_no_retry_of_a_snoozed_row(
    noop: None, snoozing: list[int], queue: Queue, make_worker: Callable[..., worker.Worker],
    serve: Callable[..., Any],
) -> None:  # fmt: skip
    snoozed = queue.enqueue("waits")
    make_worker().work()
    server = serve(allow_actions=True)
    with urllib.request.urlopen(f"{server.url}jobs/{snoozed.id}", timeout=10) as answer:
        page = answer.read().decode()
    assert f'retried as <a href="/jobs/{snoozed.id + 1}"' in page


def test_a_chain_that_snoozes_past_the_cap_fails(
    queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(worker, "MAX_SNOOZES", 2)

    @job
    def never(ctx: worker.JobContext) -> None:
        raise worker.Snooze(1)

    queue.enqueue("never", now=at(clock))
    runner = make_worker()
    while runner.work():
        clock.advance(1)
    assert [row["status"] for row in rows(db)] == ["cancelled", "cancelled", "failed"]
    assert rows(db)[-1]["error"] == "snoozed 2 times (the most a chain may): given up"


def test_a_snooze_of_nonsense_length_fails_the_job(
    queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    @job
    def bad(ctx: worker.JobContext) -> None:
        raise worker.Snooze(-1)

    queue.enqueue("bad")
    make_worker().work()
    (row,) = rows(db)
    assert row["status"] == "failed" and "a snooze must not be negative" in row["error"]


# --- Cancelling a running job ---------------------------------------------------------------


@pytest.fixture
def patient(registry: dict[str, worker.JobType]) -> None:
    @job
    def patient(ctx: worker.JobContext, then: str = "return") -> str:
        """Waits for a cancel request (bounded), then returns or raises."""
        if not ctx.cancelled.wait(10):
            return "never asked"
        if then == "raise":
            raise RuntimeError("stopped half-way")
        return "stopped early"


def run_in_thread(runner: worker.Worker, claimed: worker.Job) -> tuple[threading.Thread, list[worker.Outcome]]:
    ended: list[worker.Outcome] = []
    thread = threading.Thread(target=lambda: ended.append(runner.execute(claimed)), daemon=True)
    thread.start()
    return thread, ended


def look_for_requests(runner: worker.Worker, claimed: worker.Job, clock: FakeClock) -> None:
    """What the worker's housekeeping does twice a second."""
    worker._emit(runner._recording.cancels.look(runner.store, runner.owner, {claimed.id}, at(clock)))


@pytest.mark.parametrize(("then", "kept"), [("return", "stopped early"), ("raise", None)])
def test_a_running_job_asked_to_cancel_sees_ctx_cancelled_and_its_row_ends_cancelled(
    patient: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    then: str, kept: str | None,
) -> None:  # fmt: skip
    queue.enqueue("patient", {"then": then})
    runner = make_worker()
    (claimed,) = runner.claim(1)
    thread, ended = run_in_thread(runner, claimed)
    assert queue.cancel(claimed.id, by="ops@desk", now=at(clock))
    assert not queue.cancel(claimed.id, now=at(clock))  # asked once
    assert rows(db)[0]["status"] == "running"  # until its worker passes the request on
    look_for_requests(runner, claimed, clock)
    thread.join(timeout=10)
    runner.record(ended)
    (row,) = rows(db)
    assert (row["status"], row["cancel_requested"], row["cancel_requested_by"]) == ("cancelled", at(clock), "ops@desk")
    assert row["error"].startswith("cancelled while running (asked by ops@desk at ")
    if kept is None:
        assert "it then raised:\nRuntimeError: stopped half-way" in row["error"] and row["result"] is None
    else:
        assert row["error"].endswith("it then returned (its result is kept)") and json.loads(row["result"]) == kept


def test_a_job_that_ended_before_the_request_reached_its_worker_keeps_its_own_outcome(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str
) -> None:
    queue.enqueue("noop")
    runner = make_worker()
    (claimed,) = runner.claim(1)
    outcome = runner.execute(claimed)
    assert queue.cancel(claimed.id)  # the row still runs: asked
    runner.record([outcome])  # its outcome was in before the worker looked
    assert rows(db)[0]["status"] == "succeeded"
    assert not queue.cancel(claimed.id)  # ended: nothing to cancel


def test_a_job_claimed_ahead_and_asked_to_cancel_before_it_started_never_runs(
    queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str
) -> None:
    ran = []

    @job
    def counted(ctx: worker.JobContext) -> None:
        ran.append(ctx.id)

    queue.enqueue("counted")
    runner = make_worker()
    (claimed,) = runner.claim(1)
    queue.cancel(claimed.id, by="ops")
    look_for_requests(runner, claimed, clock)
    runner.record([runner.execute(claimed)])
    assert ran == []
    assert rows(db)[0]["error"].startswith("cancelled before it started (asked by ops at ")


def test_cancel_of_a_running_job_from_the_command_line(
    patient: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    queue.enqueue("patient")
    (claimed,) = make_worker().claim(1)
    assert worker_cli.main(["cancel", str(claimed.id), "--db", db]) == 0
    assert worker_cli.main(["cancel", str(claimed.id), "--db", db]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"job {claimed.id} is running: its worker was asked to stop it (ctx.cancelled)\n"
    assert captured.err == f"worker: cannot cancel job {claimed.id}: its worker was asked to stop it already\n"
    assert rows(db)[0]["cancel_requested_by"].endswith(f"@{os.uname().nodename}")


# --- Progress -------------------------------------------------------------------------------


@pytest.fixture
def counting_writes(db: str) -> Iterator[Callable[[], int]]:
    """How many times a row's progress was written, counted by a trigger another program could have made."""
    if worker.is_postgres(db):
        import psycopg

        conn: Any = psycopg.connect(db, autocommit=True)
        conn.execute("CREATE TABLE progress_writes (n BIGINT)")
        conn.execute("CREATE FUNCTION count_progress() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN INSERT INTO progress_writes VALUES (1); RETURN NULL; END $$")  # fmt: skip
        conn.execute("CREATE TRIGGER count_progress AFTER UPDATE OF progress ON worker_jobs FOR EACH ROW "
                     "EXECUTE FUNCTION count_progress()")  # fmt: skip
    else:
        Queue(db).close()  # the table
        conn = sqlite3.connect(db, isolation_level=None, timeout=10)
        conn.execute("CREATE TABLE progress_writes (n INTEGER)")
        conn.execute("CREATE TRIGGER count_progress AFTER UPDATE OF progress ON worker_jobs "
                     "BEGIN INSERT INTO progress_writes VALUES (1); END")  # fmt: skip
    try:
        yield lambda: int(conn.execute("SELECT count(*) FROM progress_writes").fetchone()[0])
    finally:
        if worker.is_postgres(db):
            conn.execute("DROP TRIGGER count_progress ON worker_jobs")
            conn.execute("DROP FUNCTION count_progress")
            conn.execute("DROP TABLE progress_writes")
        conn.close()


@pytest.fixture
def reporting(registry: dict[str, worker.JobType]) -> None:
    @job
    def reporting(ctx: worker.JobContext, times: int) -> int:
        for done in range(1, times + 1):
            ctx.progress(done, times, f"row {done}")
        return times


def test_progress_reported_in_a_tight_loop_is_written_once_with_the_last_report(
    reporting: None, queue: Queue, make_worker: Callable[..., worker.Worker], db: str,
    counting_writes: Callable[[], int],
) -> None:  # fmt: skip
    queue.enqueue("reporting", {"times": 10_000})
    assert make_worker().work() == 1
    (row,) = rows(db)
    assert counting_writes() == 1
    assert json.loads(row["progress"]) | {"at": 0} == {"done": 10_000, "total": 10_000, "message": "row 10000",
                                                       "at": 0}  # fmt: skip


def test_progress_is_written_at_most_once_a_second_while_the_job_runs(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    counting_writes: Callable[[], int],
) -> None:  # fmt: skip
    queue.enqueue("noop")
    runner = make_worker()
    (claimed,) = runner.claim(1)
    reports = runner._recording.progress
    for step in range(10):  # 10 reports over 2.5 s of the fake clock, the worker writing whenever it may
        reports.report(claimed.id, step, 10, None, at(clock))
        with runner.store.transaction():
            reports.write(runner.store, runner.owner, at(clock))
        clock.advance(0.25)
    assert counting_writes() == 3  # at 0, 1 and 2 s
    assert json.loads(rows(db)[0]["progress"])["done"] == 8


def running_with_progress(
    queue: Queue, runner: worker.Worker, clock: FakeClock, done: float, total: float, message: str
) -> worker.Job:
    """A job claimed by ``runner``, whose report its worker has written into the row."""
    queue.enqueue("noop")
    (claimed,) = runner.claim(1)
    runner._recording.progress.report(claimed.id, done, total, message, at(clock))
    with runner.store.transaction():
        runner._recording.progress.write(runner.store, runner.owner, at(clock))
    return claimed


def test_worker_jobs_and_show_print_the_progress(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    claimed = running_with_progress(queue, make_worker(), clock, 40, 100, "copying rows")
    assert worker_cli.main(["jobs", "--db", db]) == 0
    header, _, line = capsys.readouterr().out.splitlines()
    assert header.split()[3] == "progress" and "40/100 (40 %) copying rows" in line
    assert worker_cli.main(["show", str(claimed.id), "--db", db]) == 0
    assert "progress   40/100 (40 %) copying rows" in capsys.readouterr().out.splitlines()
    assert worker_cli.main(["show", str(claimed.id), "--json", "--db", db]) == 0
    progress = json.loads(capsys.readouterr().out)["progress"]
    assert progress == {"done": 40, "total": 100, "message": "copying rows", "at": at(clock)}


def test_the_dashboard_draws_a_running_jobs_progress_bar_and_offers_to_cancel_it(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock,
    serve: Callable[..., Any],
) -> None:  # fmt: skip
    claimed = running_with_progress(queue, make_worker(), clock, 1, 4, "a <b>quarter</b>")
    server = serve(allow_actions=True)
    page = request_page(server.url, server.token)
    (running,) = re.findall(r'<table id="running">.*?</table>', page, re.DOTALL)
    assert '<progress max="1" value="0.250">25%</progress> 1/4 (25 %) a &lt;b&gt;quarter&lt;/b&gt;' in running
    assert f'action="/jobs/{claimed.id}/cancel"' in running
    with urllib.request.urlopen(f"{server.url}jobs/{claimed.id}", timeout=10) as answer:
        assert '<progress max="1" value="0.250">' in answer.read().decode()


def request_page(url: str, token: str | None) -> str:
    """The front page as the browser that opened the start-up URL sees it (with its token cookie)."""
    opener = urllib.request.build_opener(NoRedirect)
    with contextlib.suppress(urllib.error.HTTPError):
        opener.open(f"{url}?token={token}", timeout=10)
    cookie = NoRedirect.cookie
    request = urllib.request.Request(url, headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(answer.read().decode())


class NoRedirect(urllib.request.HTTPRedirectHandler):
    cookie = ""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        NoRedirect.cookie = headers["Set-Cookie"].split(";")[0]
        return None


def test_a_nonsense_progress_report_fails_the_job_with_a_clear_error(
    queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    @job
    def confused(ctx: worker.JobContext) -> None:
        ctx.progress(float("nan"))

    queue.enqueue("confused")
    make_worker().work()
    (row,) = rows(db)
    assert row["status"] == "failed" and "progress: done must be a finite number, 0 or more, not nan" in row["error"]
    assert row["progress"] is None


# --- Real worker processes, with a ledger of each job's start and end ---------------------

LEDGER_JOBS = """
import itertools
import os
import time

from worker import job


def _append(path, line):
    # One write() on an O_APPEND descriptor: lines from many processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


@job
def ledger(ctx, path, seconds=0.0):
    _append(path, f"claimed {ctx.job.started / 1000} {ctx.job.id}")  # the claim's own time, by the store's clock
    _append(path, f"start {time.time()} {ctx.job.id}")
    time.sleep(seconds)
    _append(path, f"end {time.time()} {ctx.job.id}")
    return "done"


@job
def cooperative(ctx, path):
    _append(path, f"start {time.time()} {ctx.job.id}")
    ctx.cancelled.wait(60)
    _append(path, f"end {time.time()} {ctx.job.id}")
    return "stopped when asked"


@job
def counting(ctx, seconds):
    deadline, done = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        done += 1
        ctx.progress(done, message="counting")
    return done
"""


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def start_worker(processes: Processes, db: str, tmp_path: Path) -> Callable[..., WorkerProcess]:
    """``worker run`` on the test's database (either store) with the ledger job."""
    jobs_file = tmp_path / "ledger_jobs.py"
    jobs_file.write_text(LEDGER_JOBS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    env["WORKER_LOG_LEVEL"] = "INFO"  # stop() waits for the line that says it started

    def start(*flags: str, name: str) -> WorkerProcess:
        args = ["run", "--db", db, "--jobs", str(jobs_file), "--no-cron", *flags]
        started = processes.start(*args, name=name, env=env, cwd=tmp_path)
        return started

    return start


def entries(path: Path) -> list[tuple[str, float, int]]:
    """The ledger's lines as (start | end, epoch seconds, job id)."""
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        kind, seconds, job_id = line.split()
        found.append((kind, float(seconds), int(job_id)))
    return found


def most_at_once(ledger: list[tuple[str, float, int]]) -> int:
    """The largest number of jobs between their start and end at any moment (an end before a start at a tie)."""
    running = most = 0
    ends = [entry for entry in ledger if entry[0] in ("start", "end")]
    for kind, _, _ in sorted(ends, key=lambda entry: (entry[1], entry[0] == "start")):
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def worker_processes(db: str) -> list[dict[str, Any]]:
    store = worker.open_reader(db)
    try:
        return store.processes()
    finally:
        store.close()


def started_after(ledger: list[tuple[str, float, int]], moment: float, kind: str = "start") -> list[int]:
    return [job_id for found, seconds, job_id in ledger if found == kind and seconds > moment]


@pytest.mark.slow
def test_pause_stops_busy_and_idle_worker_processes_within_a_second_and_resume_starts_them(
    start_worker: Callable[..., WorkerProcess], db: str, ledger: Path
) -> None:
    with Queue(db, check_types=False) as producer:
        producer.enqueue_many([("ledger", {"path": str(ledger), "seconds": 0.05})] * 400, queue="work")
        busy = [start_worker("--concurrency", "2", name=f"busy{i}") for i in range(2)]
        wait_for(lambda: len(entries(ledger)) > 20, 30, "the workers to be busy")
        paused_at = time.time()
        producer.pause("work")
        time.sleep(1.5)  # a pause must hold: wait past the second it may take
        seen = entries(ledger)
        assert started_after(seen, paused_at + 0.5, kind="claimed") == []  # by the claims' own clock
        assert started_after(seen, paused_at + 1.0) == []
        started = {job_id for kind, _, job_id in seen if kind == "start"}
        wait_for(lambda: {i for kind, _, i in entries(ledger) if kind == "end"} >= started, 10, "running jobs to end")
        assert len(rows(db, "status = 'running'")) == 0 and len(rows(db, "status = 'pending'")) > 0

        idle = start_worker("--concurrency", "2", name="idle")
        wait_for(lambda: len(worker_processes(db)) == 3, 10, "the idle worker to start")
        producer.pause("idle")
        producer.enqueue("ledger", {"path": str(ledger)}, queue="idle")  # wakes the idle worker, which takes nothing
        time.sleep(1.0)
        before_resume = len(entries(ledger))
        assert started_after(entries(ledger), paused_at + 1.0) == []
        resumed_at = time.time()
        producer.resume("work")
        producer.resume("idle")
        wait_for(lambda: started_after(entries(ledger), resumed_at), 5, "a start after the resume")
        assert len(entries(ledger)) > before_resume
    for process in [*busy, idle]:
        process.stop()


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [4, 1])
def test_a_running_limit_holds_across_three_worker_processes(
    start_worker: Callable[..., WorkerProcess], db: str, ledger: Path, concurrency: int
) -> None:
    """At concurrency 4 one worker could run both at once (and it mostly does: its own finish frees the place it
    claims again in the same transaction); at 1, the two jobs running at once are two processes'."""
    with Queue(db, check_types=False) as producer:
        producer.limit("api", running=2)
        producer.enqueue_many([("ledger", {"path": str(ledger), "seconds": 0.1})] * 24, queue="api")
    workers = [start_worker("--concurrency", str(concurrency), name=f"worker{i}") for i in range(3)]
    wait_for(lambda: len(rows(db, "status = 'succeeded'")) == 24, 60, "every job to succeed")
    for process in workers:
        process.stop()
    seen = entries(ledger)
    assert len(seen) == 72
    assert most_at_once(seen) == 2  # the limit, and used in full
    if concurrency == 1:
        assert len({row["worker"] for row in rows(db)}) > 1


@pytest.mark.slow
def test_a_rate_limit_holds_across_three_worker_processes(
    start_worker: Callable[..., WorkerProcess], db: str, ledger: Path
) -> None:
    with Queue(db, check_types=False) as producer:
        producer.limit("api", per_second=5)
        producer.enqueue_many([("ledger", {"path": str(ledger)})] * 15, queue="api")
    workers = [start_worker("--concurrency", "4", name=f"worker{i}") for i in range(3)]
    wait_for(lambda: len(rows(db, "status = 'succeeded'")) == 15, 60, "every job to succeed")
    for process in workers:
        process.stop()
    # What the claim guarantees, by the store's clock (a job then starts after its thread is free, under load
    # tens of ms later): claims at least 200 ms apart, so no second holds more than 5.
    claimed = sorted(round(seconds * 1000) for kind, seconds, _ in entries(ledger) if kind == "claimed")
    assert len(claimed) == 15
    assert min(b - a for a, b in itertools.pairwise(claimed)) >= 200, claimed
    assert max(sum(1 for ms in claimed if first <= ms < first + 1000) for first in claimed) == 5, claimed


@pytest.mark.slow
def test_cancel_of_a_cooperative_and_an_uncooperative_job_in_a_worker_process(
    start_worker: Callable[..., WorkerProcess], db: str, ledger: Path
) -> None:
    with Queue(db, check_types=False) as producer:
        polite = producer.enqueue("cooperative", {"path": str(ledger)})
        stubborn = producer.enqueue("ledger", {"path": str(ledger), "seconds": 3})  # never looks at ctx.cancelled
        process = start_worker("--concurrency", "2", name="worker")
        wait_for(lambda: len([e for e in entries(ledger) if e[0] == "start"]) == 2, 30, "both jobs to start")
        asked_at = time.time()
        assert producer.cancel(polite.id, by="ops") and producer.cancel(stubborn.id, by="ops")
        wait_for(lambda: len(rows(db, "status = 'cancelled'")) == 2, 30, "both rows to end cancelled")
    process.stop()
    ends = {job_id: seconds for kind, seconds, job_id in entries(ledger) if kind == "end"}
    assert ends[polite.id] - asked_at < 1.5  # noticed within about a second (a look every 0.5 s)
    by_id = {row["id"]: row for row in rows(db)}
    assert json.loads(by_id[polite.id]["result"]) == "stopped when asked"
    assert json.loads(by_id[stubborn.id]["result"]) == "done"  # it ran to its end; the row says it was asked
    assert by_id[stubborn.id]["error"].startswith("cancelled while running (asked by ops at ")


@pytest.mark.slow
def test_a_job_reporting_progress_in_a_tight_loop_is_seen_while_it_runs_and_written_once_a_second(
    start_worker: Callable[..., WorkerProcess], db: str, counting_writes: Callable[[], int]
) -> None:
    with Queue(db, check_types=False) as producer:
        counted = producer.enqueue("counting", {"seconds": 3})
    process = start_worker("--concurrency", "1", name="worker")
    seen = wait_for(lambda: rows(db, "progress IS NOT NULL AND status = 'running'"), 30, "progress while it runs")
    assert json.loads(seen[0]["progress"])["message"] == "counting"
    wait_for(lambda: rows(db, "status = 'succeeded'"), 30, "the job to end")
    process.stop()
    (row,) = rows(db)
    reports = json.loads(row["result"])
    assert json.loads(row["progress"])["done"] == reports > 10_000  # the last report, of many thousands
    assert counting_writes() <= 5  # 3 s at one a second, and the last before the outcome
    assert counted.id == row["id"]


# --- The dashboard's controls in a real browser ---------------------------------------------


def test_browser_pauses_and_resumes_a_queue_sees_a_progress_bar_and_cancels_a_running_job(
    noop: None, queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str,
    serve: Callable[..., Any], tmp_path: Path,
) -> None:  # fmt: skip
    from test_operations import CHROMIUM, CHROMIUM_ARGS, _browser_missing

    if not Path(CHROMIUM).exists():
        _browser_missing("Debian's chromium is not installed: run .ci/system-packages.sh")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _browser_missing("the Python package playwright is not installed: pip install -e '.[dev]'")
    claimed = running_with_progress(queue, make_worker(), clock, 1, 4, "a quarter")
    queue.enqueue("noop", queue="mail")
    server = serve(allow_actions=True, refresh_seconds=3600)  # no reload in the middle of a click
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}?token={server.token}")  # sets the cookie, lands on /
            mail = page.locator("#queues tr:has(td:first-child:text-is('mail'))")
            mail.get_by_role("button", name="pause").click()
            page.wait_for_url(server.url)
            expect(mail).to_contain_text("paused")
            assert [control.queue for control in queue.controls()] == ["mail"]
            mail.get_by_role("button", name="resume").click()
            page.wait_for_url(server.url)
            expect(mail.get_by_role("button", name="pause")).to_be_visible()
            assert queue.controls() == []

            running = page.locator(f'#running tr:has(td:first-child a[href="/jobs/{claimed.id}"])')
            bar = running.locator("progress")
            expect(bar).to_be_visible()
            assert bar.evaluate("element => element.position") == 0.25
            expect(running).to_contain_text("1/4 (25 %) a quarter")
            running.get_by_role("button", name="cancel").click()
            page.wait_for_url(f"{server.url}jobs/{claimed.id}")
            (row,) = rows(db, f"id = {claimed.id}")
            assert (row["status"], row["cancel_requested_by"]) == ("running", "dashboard, from 127.0.0.1")
            assert page.evaluate("() => document.querySelectorAll('script[src]').length") == 0
        finally:
            browser.close()
