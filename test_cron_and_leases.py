"""Issue 12, hardening: cron rows another program wrote, the autumn hour, restarts, long locks, a replaced file.

Each test names the defect of issue 12 it covers.  In-process with the fake
clock where a step function proves it; real ``python -m worker`` processes
where the defect lives in the loop, in a lock or in the file itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zoneinfo
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import FakeClock, Processes, WorkerProcess, at, create_database, rows, wait_for
from worker import JobContext, Queue

# On every store; a test that reaches into SQLite itself (its file, its locks) is SQLite's alone.
pytestmark = pytest.mark.stores("sqlite", "postgres")
SQLITE_ONLY = pytest.mark.stores("sqlite")

HOSTILE_CRON_ROWS = {
    # defect 5: a directory of zones, a path, a name too long for the filesystem
    "zone is a directory": {"cron_timezone": "Europe"},
    "zone is a path": {"cron_timezone": "../../../etc/passwd"},
    "zone name too long": {"cron_timezone": "x" * 300},
    # defect 5: slots croniter and datetime cannot count from
    "slot in the year 9999": {"cron_slot": 253_402_300_740_000},
    "slot past any year": {"cron_slot": 2**62},
    # defect 18: an expression that never fires
    "expression never fires": {"cron_schedule": "0 0 30 2 *"},
}


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def insert_cron_row(db: str | Path, tag: str, **columns: Any) -> int:
    """A due cron row of `tick`, as another program would insert it (the stdlib sqlite3 module)."""
    values = {"type": "tick", "tag": tag, "cron_schedule": "* * * * *", **columns}
    names = ", ".join(values)
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn, conn:
        cursor = conn.execute(f"INSERT INTO worker_jobs ({names}) VALUES ({', '.join('?' * len(values))})",
                              list(values.values()))  # fmt: skip
        return int(cursor.lastrowid or 0)


@contextlib.contextmanager
def write_lock_held(db: str | Path, seconds: float) -> Iterator[threading.Thread]:
    """Another connection takes the write lock (BEGIN IMMEDIATE) and holds it ``seconds``, in a thread."""
    taken = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, timeout=10, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            taken.set()
            time.sleep(seconds)  # the lock is the point: held for real time, as a long write would
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10), "could not take the write lock"
    try:
        yield holder
    finally:
        holder.join(seconds + 10)


@pytest.fixture
def tick() -> None:
    @worker.job
    def tick(ctx: JobContext) -> int:
        return ctx.job.id


# --- 5 and 18: a bad timezone, slot or expression --------------------------------------


@pytest.mark.parametrize("zone", ["Europe", "Europe/", "../../etc/passwd", "x" * 300, "UTC\x00", "a\udcff"])
def test_any_bad_timezone_is_a_value_error_when_scheduled_and_a_config_error_when_declared(
    queue: Queue, db: str, tick: None, zone: str
) -> None:
    with pytest.raises(ValueError, match="invalid cron timezone"):
        queue.schedule_cron("tick", "* * * * *", timezone=zone)
    with pytest.raises(worker.ConfigError, match="invalid cron timezone"):
        worker.job(name="declared", cron="* * * * *", timezone=zone)(lambda ctx: None)
    assert rows(db) == []


def test_expression_that_never_fires_is_refused_when_declared_or_scheduled(queue: Queue, db: str, tick: None) -> None:
    with pytest.raises(worker.ConfigError, match=r"job 'leap'.*'0 0 30 2 \*'.*never fires"):
        worker.job(name="leap", cron="0 0 30 2 *")(lambda ctx: None)
    with pytest.raises(ValueError, match=r"cannot schedule 'tick'.*'0 0 31 4 \*'.*never fires"):
        queue.schedule_cron("tick", "0 0 31 4 *")
    assert "leap" not in worker.REGISTRY
    assert rows(db) == []


@SQLITE_ONLY
@pytest.mark.parametrize("hostile", HOSTILE_CRON_ROWS.values(), ids=HOSTILE_CRON_ROWS.keys())
def test_cron_row_with_a_bad_zone_slot_or_expression_ends_its_own_schedule_and_the_worker_goes_on(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, tick: None, hostile: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    hostile_id = insert_cron_row(db, "cron:hostile", due=at(clock), **hostile)
    others = [queue.enqueue("tick", now=at(clock)).id for _ in range(3)]
    w = make_worker()
    w.work()  # raised IsADirectoryError, OverflowError or CroniterBadDateError: the worker crashed
    w.work()
    assert {r["id"]: r["status"] for r in rows(db)} == {hostile_id: "succeeded"} | dict.fromkeys(others, "succeeded")
    assert "no next run" in caplog.text
    later = queue.enqueue("tick", now=at(clock)).id
    assert w.work() == 1
    assert rows(db, f"id = {later}")[0]["status"] == "succeeded"


@SQLITE_ONLY
def test_worker_start_survives_a_declared_cron_job_whose_last_slot_is_in_the_year_9999(
    make_worker: Any, db: str, tick: None
) -> None:
    @worker.job(cron="* * * * *")
    def minutely(ctx: JobContext) -> None:
        pass

    create_database(Path(db))
    insert_cron_row(db, "cron:minutely", type="minutely", status="succeeded", cron_slot=253_402_300_740_000)
    w = make_worker(cron=True)
    w.start_up()  # raised OverflowError: the worker exited 2 at every start
    assert rows(db, "tag = 'cron:minutely' AND status = 'pending'") == []
    assert rows(db, "tag = 'cron:remove_old_jobs' AND status = 'pending'") != []  # the other cron jobs were synced


@SQLITE_ONLY
def test_check_reports_a_pending_row_whose_expression_never_fires(db: str, tmp_path: Path) -> None:
    create_database(Path(db))
    insert_cron_row(db, "cron:leap", cron_schedule="0 0 30 2 *")
    jobs_file = tmp_path / "cron_lease_jobs.py"
    jobs_file.write_text(JOBS_MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "worker_cli", "check", "--db", db, "--jobs", str(jobs_file)],
        capture_output=True, text=True, cwd=Path(__file__).parent, env=clean_env(), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout  # it said "ok" and exited 0
    assert "0 0 30 2 *" in result.stderr and "never fires" in result.stderr


# --- 16: a cron run killed mid-run, then its worker restarted -----------------------------


def test_cron_run_killed_mid_run_is_retried_after_a_restart_and_its_schedule_goes_on(
    make_worker: Any, clock: FakeClock, db: str, registry: dict[str, worker.JobType]
) -> None:
    registry.pop("remove_old_jobs")  # only this test's schedule

    @worker.job(cron="30 * * * *")
    def half_past(ctx: JobContext) -> int:
        return ctx.job.attempt

    killed = make_worker(cron=True, lease=10)
    killed.start_up()
    (run,) = rows(db, "status = 'pending'")
    clock.now = run["due"] / 1000
    assert [job.id for job in killed.claim(1)] == [run["id"]]  # ... and its worker is killed mid-run

    restarted = make_worker(cron=True, lease=10)
    restarted.start_up()  # inserted the next slot, and so took the tag the rescue's retry needs
    assert rows(db, "status = 'pending'") == []
    clock.advance(11)
    assert restarted.rescue() == 1
    (retry,) = rows(db, "status = 'pending'")
    assert (retry["rescheduled_from_job"], retry["attempt"], retry["cron_slot"]) == (run["id"], 2, run["cron_slot"])

    assert restarted.work() == 1
    assert rows(db, f"id = {retry['id']}")[0]["status"] == "succeeded"
    (following,) = rows(db, "status = 'pending'")  # the retry chain ended: now the next slot
    assert following["cron_slot"] == run["cron_slot"] + 3_600_000


def test_restart_while_a_cron_run_is_running_adds_no_pending_row_and_the_run_schedules_the_next(
    make_worker: Any, clock: FakeClock, db: str, registry: dict[str, worker.JobType]
) -> None:
    registry.pop("remove_old_jobs")

    @worker.job(cron="30 * * * *")
    def half_past(ctx: JobContext) -> int:
        return ctx.job.attempt

    running = make_worker(cron=True)
    running.start_up()
    (run,) = rows(db, "status = 'pending'")
    clock.now = run["due"] / 1000
    (claimed,) = running.claim(1)
    make_worker(cron=True).start_up()  # another worker starts (or restarts) meanwhile
    assert rows(db, "status = 'pending'") == []
    running.record([running.execute(claimed)])
    (following,) = rows(db, "status = 'pending'")
    assert following["cron_slot"] == run["cron_slot"] + 3_600_000


# --- 17: the autumn hour ------------------------------------------------------------------


def paris(slots: list[int]) -> list[str]:
    return [datetime.fromtimestamp(slot / 1000, zoneinfo.ZoneInfo("Europe/Paris")).isoformat() for slot in slots]


def slots_between(expression: str, start: str, end: str) -> list[str]:
    found, slot = [], ms(start)
    while (slot := worker.next_cron_slot(expression, "Europe/Paris", slot)) < ms(end):
        found.append(slot)
    return paris(found)


def test_autumn_change_runs_a_fixed_time_once_at_its_first_occurrence(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, tick: None
) -> None:
    clock.now = ms("2026-10-24T22:00:00+00:00") / 1000  # 00:00 summer time, Paris
    queue.schedule_cron("tick", "30 2 * * *", timezone="Europe/Paris", now=at(clock))
    w = make_worker()
    for _ in range(4 * 30):  # every 15 minutes until 05:00 UTC the next day
        clock.advance(900)
        w.work()
    ran = [r["cron_slot"] for r in rows(db, "status = 'succeeded'")]
    assert paris(ran) == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]  # 02:30+01:00 on the 25th too


def test_autumn_change_runs_elapsed_time_schedules_in_both_copies_of_the_hour() -> None:
    assert slots_between("0 * * * *", "2026-10-25T01:30:00+02:00", "2026-10-25T04:00:00+01:00") == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00",
    ]  # fmt: skip
    quarter_hours = slots_between("*/15 * * * *", "2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00")
    assert len(quarter_hours) == 7  # 02:15..02:45 summer time, 02:00..02:45 winter time
    # A range or list in the hour field names times on the clock: each runs once.
    assert slots_between("30 1-3 * * *", "2026-10-25T00:00:00+02:00", "2026-10-25T12:00:00+01:00") == [
        "2026-10-25T01:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-25T03:30:00+01:00",
    ]  # fmt: skip


def test_spring_change_runs_a_time_the_clock_skips_once_at_the_hour_after() -> None:
    assert slots_between("30 2 * * *", "2026-03-28T12:00:00+01:00", "2026-03-30T12:00:00+02:00") == [
        "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
    ]  # fmt: skip


# --- 14: a write lock held longer than the lease --------------------------------------------


@SQLITE_ONLY
def test_rescuer_that_waited_for_a_long_lock_takes_no_lease_for_lost_until_holders_could_renew(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, tick: None
) -> None:
    holder = make_worker(lease=0.6)  # a heartbeat interval (lease/3) of 0.2 s
    rescuer = make_worker(lease=0.6)
    holder.start_up()
    rescuer.start_up()
    job = queue.enqueue("tick", now=at(clock))
    holder.claim(1)
    clock.advance(1)  # the holder could not renew meanwhile: the lock was held
    with write_lock_held(db, 0.5):
        assert rescuer.rescue() == 0  # waited 0.5 s for the lock: took the live job for lost
    assert rows(db, f"id = {job.id}")[0]["status"] == "running"
    holder.heartbeat()  # the lock is free: the holder renews
    clock.advance(0.3)
    rescuer.work()
    assert rows(db, f"id = {job.id}")[0]["status"] == "running"


@SQLITE_ONLY
def test_dead_worker_whose_lease_ran_out_during_a_long_lock_is_rescued_a_lease_after_it(
    queue: Queue, make_worker: Any, clock: FakeClock, db: str, tick: None
) -> None:
    dead = make_worker(lease=0.6)
    rescuer = make_worker(lease=0.6)
    dead.start_up()
    rescuer.start_up()
    job = queue.enqueue("tick", now=at(clock))
    dead.claim(1)
    clock.advance(1)
    with write_lock_held(db, 0.5):
        rescuer.work()  # its heartbeat waited 0.5 s: no sweep for a lease
    assert rows(db, f"id = {job.id}")[0]["status"] == "running"
    clock.advance(0.7)
    rescuer.work()
    assert rows(db, f"id = {job.id}")[0]["error"].startswith("worker lost")
    (retry,) = rows(db, f"rescheduled_from_job = {job.id}")
    assert retry["status"] == "succeeded"


# --- Real processes -------------------------------------------------------------------------

JOBS_MODULE = '''
"""Jobs for test_cron_and_leases.py."""

import os
import time

from worker import job


@job
def tick(ctx):
    return ctx.job.id


@job
def note(ctx, ledger, seconds=0):
    """Writes "id attempt pid" to the ledger when it starts; sleeps ``seconds`` on its first attempt."""
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{ctx.job.id} {ctx.job.attempt} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
    if ctx.job.attempt == 1:
        time.sleep(seconds)
    return ctx.job.attempt
'''

real_processes = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")


def clean_env() -> dict[str, str]:
    """This environment without the worker's own settings, so flags and defaults decide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    return env | {"WORKER_LOG_LEVEL": "INFO"}


@pytest.fixture
def file_db(tmp_path: Path) -> Path:
    return create_database(tmp_path / "jobs.db")


@pytest.fixture
def start_worker(processes: Processes, file_db: Path, tmp_path: Path) -> Any:
    jobs_file = tmp_path / "cron_lease_jobs.py"
    jobs_file.write_text(JOBS_MODULE)

    def start(*flags: str, name: str) -> WorkerProcess:
        args = ["run", "--db", str(file_db), "--jobs", str(jobs_file), "--no-cron", *flags]
        return processes.start(*args, name=name, env=clean_env(), cwd=tmp_path)

    return start


def started(process: WorkerProcess) -> bool:
    return " started: " in process.log()


def status_of(db: Path, job_id: int) -> str:
    return str(rows(str(db), f"id = {job_id}")[0]["status"])


@real_processes
@pytest.mark.slow
def test_real_worker_runs_on_past_cron_rows_with_a_bad_zone_slot_or_expression(
    start_worker: Any, file_db: Path
) -> None:
    hostile = [insert_cron_row(file_db, f"cron:hostile{i}", **columns) for i, columns in
               enumerate(HOSTILE_CRON_ROWS.values())]  # fmt: skip
    with Queue(file_db, check_types=False) as producer:
        others = [job.id for job in producer.enqueue_many([("tick", None)] * 5)]
    process = start_worker("--concurrency", "2", name="worker")
    wait_for(lambda: all(status_of(file_db, i) == "succeeded" for i in hostile + others), 30, "every row to run")
    assert rows(str(file_db), "status = 'pending'") == []  # no next run for any of them
    assert process.popen.poll() is None, process.log()  # it exited 1 at the first of them
    assert process.stop() == 0


@real_processes
@pytest.mark.slow
def test_write_lock_held_for_three_leases_makes_no_worker_rescue_a_live_job(
    start_worker: Any, file_db: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    holder = start_worker("--lease", "2", "--concurrency", "1", name="holder")
    wait_for(lambda: started(holder), 20, "the holder to start")
    with Queue(file_db, check_types=False) as producer:
        long_job = producer.enqueue("note", {"ledger": str(ledger), "seconds": 12}).id
    wait_for(lambda: ledger.exists(), 20, "the long job to start")
    rescuers = [start_worker("--lease", "2", name=f"rescuer{i}") for i in range(2)]
    for rescuer in rescuers:
        wait_for(lambda: started(rescuer), 20, "the rescuers to start")  # noqa: B023
    with write_lock_held(file_db, 6):  # three leases: every lease runs out under it
        pass
    wait_for(lambda: status_of(file_db, long_job) != "running", 30, "the long job to end")
    (row,) = rows(str(file_db))
    assert (row["status"], row["attempt"], row["error"]) == ("succeeded", 1, None)
    assert len(ledger.read_text().splitlines()) == 1  # it ran once
    assert [process.stop() for process in [holder, *rescuers]] == [0, 0, 0]


@real_processes
@pytest.mark.slow
def test_worker_killed_before_a_long_lock_is_still_rescued_after_it(
    start_worker: Any, file_db: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    dead = start_worker("--lease", "2", "--concurrency", "1", name="dead")
    wait_for(lambda: started(dead), 20, "the worker to start")
    with Queue(file_db, check_types=False) as producer:
        lost = producer.enqueue("note", {"ledger": str(ledger), "seconds": 60}).id
    wait_for(lambda: ledger.exists(), 20, "the job to start")
    rescuer = start_worker("--lease", "2", name="rescuer")
    wait_for(lambda: started(rescuer), 20, "the rescuer to start")
    dead.kill()
    with write_lock_held(file_db, 6):
        pass
    released = time.monotonic()
    wait_for(lambda: status_of(file_db, lost) == "failed", 20, "the dead worker's job to be rescued")
    rescued_after = time.monotonic() - released
    (retry,) = wait_for(lambda: rows(str(file_db), f"rescheduled_from_job = {lost} AND status = 'succeeded'"), 20,
                        "its retry to succeed")  # fmt: skip
    assert retry["attempt"] == 2
    assert rescued_after < 12, f"rescued {rescued_after:.1f} s after the lock ended (a lease is 2 s)"
    assert rescuer.stop() == 0


# --- 19: the database file deleted or replaced under a running worker -------------------------


@real_processes
@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted and made anew", "replaced by another file"])
def test_job_enqueued_into_a_new_database_file_runs_after_the_old_one_is_deleted_or_replaced(
    start_worker: Any, file_db: Path, tmp_path: Path, how: str
) -> None:
    supervisor = start_worker("--processes", "2", "--lease", "1", name="supervisor")
    wait_for(lambda: supervisor.log().count(" started: ") == 2, 30, "both worker processes to open the file")
    with Queue(file_db, check_types=False) as producer:
        before = producer.enqueue("tick").id
    wait_for(lambda: status_of(file_db, before) == "succeeded", 30, "a job in the first file to run")

    if how == "replaced by another file":
        os.replace(create_database(tmp_path / "restored.db"), file_db)
    else:
        file_db.unlink()
    for leftover in ("-wal", "-shm"):  # the old file's: they would be read as the new one's
        Path(f"{file_db}{leftover}").unlink(missing_ok=True)
    with Queue(file_db, check_types=False) as app:  # the app goes on writing, into the new file
        after = app.enqueue("tick").id
        wait_for(lambda: status_of(file_db, after) == "succeeded", 30, "the job in the new file to run")
    assert [r["id"] for r in rows(str(file_db))] == [after]
    assert supervisor.popen.poll() is None, supervisor.log()
    assert "was replaced under the worker; stopping" in supervisor.log()
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(30) == 0
