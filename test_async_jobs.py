"""Async jobs, as tests: ``async def`` job functions on the worker's job loop, beside its job threads.

In-process workers first (``work()`` steps, and ``run()`` in burst mode with
bounded waits), then real processes: SIGTERM and kill -9 with async jobs
running.  Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import HERE, Processes, WorkerProcess, rows, wait_for
from test_examples import environment, example, run, succeeded
from worker import ConfigError, JobContext, Queue, Worker

pytestmark = pytest.mark.stores("sqlite", "postgres")


def run_burst(db: str, **options: Any) -> Worker:
    """A worker that runs until nothing is due (run() stops then), in this process."""
    options.setdefault("cron", False)
    ran = Worker(db, burst=True, **options)
    ran.run()
    return ran


def row(db: str, job_id: int) -> Any:
    (found,) = rows(db, f"id = {int(job_id)}")
    return found


# --- Running async def jobs ---------------------------------------------------------


def test_async_job_runs_on_the_job_loop_and_stores_its_result(db: str, queue: Queue) -> None:
    @worker.job
    async def greet(ctx: JobContext, name: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"hello": name, "thread": threading.current_thread().name}

    enqueued = queue.enqueue("greet", {"name": "ada"})
    run_burst(db)
    done = row(db, enqueued.id)
    assert done["status"] == "succeeded"
    assert json.loads(done["result"]) == {"hello": "ada", "thread": "worker-async"}


def test_work_step_runs_an_async_job_too(db: str, queue: Queue, make_worker: Callable[..., Worker]) -> None:
    @worker.job
    async def double(ctx: JobContext, n: int) -> int:
        await asyncio.sleep(0)
        return 2 * n

    enqueued = queue.enqueue("double", {"n": 21})
    assert make_worker().work() == 1
    assert json.loads(row(db, enqueued.id)["result"]) == 42


def test_sync_and_async_jobs_run_side_by_side_in_one_worker(db: str, queue: Queue) -> None:
    """Four async jobs that wait for each other can only finish together: they run at once, while the
    sync jobs run on the job threads."""
    arrived = 0
    all_here = asyncio.Event()

    @worker.job
    async def gather(ctx: JobContext) -> str:
        nonlocal arrived
        arrived += 1
        if arrived == 4:
            all_here.set()
        await asyncio.wait_for(all_here.wait(), 10)
        return threading.current_thread().name

    @worker.job
    def plain(ctx: JobContext) -> str:
        return threading.current_thread().name

    jobs = queue.enqueue_many([("gather", {})] * 4 + [("plain", {})] * 4)
    run_burst(db, concurrency=2, async_concurrency=4)
    results = {(r["type"], r["status"], json.loads(r["result"])) for r in rows(db)}
    assert results == {("gather", "succeeded", "worker-async"), ("plain", "succeeded", "worker-job")}
    assert len(rows(db, "status = 'succeeded'")) == len(jobs)


def test_async_jobs_are_claimed_while_every_job_thread_is_busy(db: str, queue: Queue) -> None:
    """The one job thread waits for what the async job does: it could not end if the claim took only
    jobs for threads (none free) or waited for a thread to free up."""
    released = threading.Event()

    @worker.job
    def hold(ctx: JobContext) -> bool:
        return released.wait(10)

    @worker.job
    async def release(ctx: JobContext) -> None:
        released.set()

    queue.enqueue("hold")
    queue.enqueue("release", delay=0.05)  # due once the thread is busy
    run_burst(db, concurrency=1)
    assert [(r["type"], r["status"], r["result"]) for r in rows(db)] == [
        ("hold", "succeeded", "true"),
        ("release", "succeeded", "null"),
    ]


def test_sync_jobs_are_claimed_while_every_async_slot_is_busy(db: str, queue: Queue) -> None:
    released = threading.Event()

    @worker.job
    async def hold(ctx: JobContext) -> bool:
        for _ in range(1000):
            if released.is_set():
                return True
            await asyncio.sleep(0.01)
        return False

    @worker.job
    def release(ctx: JobContext) -> None:
        released.set()

    queue.enqueue("hold")
    queue.enqueue("release", delay=0.05)
    run_burst(db, async_concurrency=1)
    assert [(r["type"], r["result"]) for r in rows(db)] == [("hold", "true"), ("release", "null")]


@pytest.mark.parametrize(
    ("due", "thread_slots", "async_slots", "claimed"),
    [
        ({"plain": 5, "awaited": 5}, 2, 3, {"plain": 2, "awaited": 3}),
        ({"plain": 5, "awaited": 5}, 3, 2, {"plain": 3, "awaited": 2}),
        ({"awaited": 5}, 2, 3, {"awaited": 3}),
        ({"plain": 5}, 2, 3, {"plain": 2}),
        ({"plain": 1, "awaited": 1}, 4, 100, {"plain": 2, "awaited": 2}),
        ({"plain": 1, "awaited": 3}, 1, 100, {"plain": 1, "awaited": 6}),
    ],
)
def test_a_claim_takes_each_kind_up_to_its_own_free_slots(
    queue: Queue, make_worker: Callable[..., Worker], due: dict[str, int], thread_slots: int, async_slots: int,
    claimed: dict[str, int],
) -> None:  # fmt: skip
    """Whatever mix is due, no kind gets more jobs than it has slots free, and neither kind waits while the
    other has jobs due; within a kind, the highest priority goes first."""

    @worker.job
    def plain(ctx: JobContext) -> None: ...

    @worker.job
    async def awaited(ctx: JobContext) -> None: ...

    for type, count in due.items():
        queue.enqueue_many([(type, {})] * count, priority=0)
        queue.enqueue_many([(type, {})] * count, priority=5)
    claimer = make_worker()
    claimer.start_up()
    with claimer._write():
        jobs = claimer._claim(thread_slots, claimer.now(), async_slots)
    by_type: dict[str, list[int]] = {}
    for job in jobs:
        by_type.setdefault(job.type, []).append(job.priority)
    assert {type: len(priorities) for type, priorities in by_type.items()} == claimed
    for type, priorities in by_type.items():  # the highest first: those of 5, then those of 0
        assert sorted(priorities, reverse=True) == ([5] * due[type] + [0] * due[type])[: len(priorities)]


def test_the_job_loop_claims_ahead_while_async_jobs_are_short_and_stops_after_a_long_one() -> None:
    ended: list[worker.Outcome] = []

    async def execute(job: worker.Job) -> worker.Outcome:
        return worker.Outcome(job, True, result="null", seconds=job.data["seconds"])

    runner = worker.AsyncRunner(2, execute, ended.append)
    try:
        assert runner.free == 2  # nothing ahead before a job has shown how long jobs take

        def run_one(seconds: float, job_id: int) -> None:
            runner.start([worker.Job(job_id, "t", {"seconds": seconds}, "running", "default")])
            wait_for(lambda: len(ended) == job_id, 5, "the job to end")

        run_one(0.001, 1)
        assert runner.free == 4  # its concurrency again, claimed ahead
        run_one(worker.ASYNC_PREFETCH_JOB_SECONDS, 2)
        assert runner.free == 2
    finally:
        runner.close()


def test_async_concurrency_bounds_the_async_jobs_at_once(db: str, queue: Queue) -> None:
    running = most = 0

    @worker.job
    async def count(ctx: JobContext) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1

    queue.enqueue_many([("count", {})] * 12)
    run_burst(db, async_concurrency=3)
    assert len(rows(db, "status = 'succeeded'")) == 12
    assert most == 3


def test_async_jobs_claimed_ahead_behind_a_long_one_are_given_back_for_other_workers(db: str, queue: Queue) -> None:
    release = threading.Event()
    started = threading.Event()

    @worker.job
    async def quick(ctx: JobContext) -> None:
        pass

    @worker.job
    async def long(ctx: JobContext) -> None:
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.005)

    first = queue.enqueue("quick")  # a short job first: the job loop then claims ahead
    queue.enqueue("long")
    behind = [queue.enqueue("quick") for _ in range(3)]
    busy = Worker(db, cron=False, async_concurrency=1)
    loop = threading.Thread(target=busy.run)
    loop.start()
    try:
        assert started.wait(10)
        # The job claimed ahead waits for the one slot, which the long job holds:
        # within PREFETCH_PATIENCE it is pending again, for another worker.
        wait_for(lambda: len(rows(db, "status = 'pending'")) == 3, 5, "the job claimed ahead to be given back")
        other = Worker(db, cron=False)
        while other.work():
            pass
        assert {queue.get(job.id).worker for job in behind} == {other.name}  # type: ignore[union-attr]
        assert queue.get(first.id).worker == busy.name  # type: ignore[union-attr]
    finally:
        release.set()
        busy.stop()
        loop.join(10)
    assert not loop.is_alive()
    assert [r["status"] for r in rows(db)] == ["succeeded"] * 5


def test_async_job_failure_is_recorded_and_retried_like_a_sync_one(db: str, queue: Queue) -> None:
    @worker.job(max_attempts=2, retry_delay=0)
    async def flaky(ctx: JobContext) -> int:
        await asyncio.sleep(0)
        if ctx.attempt == 1:
            raise RuntimeError("not yet")
        return ctx.attempt

    first = queue.enqueue("flaky")
    run_burst(db)
    failed, retried = rows(db)
    assert (failed["id"], failed["status"]) == (first.id, "failed")
    assert failed["error"].startswith("RuntimeError: not yet")
    assert "Traceback" in failed["error"]
    assert (retried["status"], retried["attempt"], json.loads(retried["result"])) == ("succeeded", 2, 2)


def test_timeout_cancels_the_coroutine_and_its_finally_runs(db: str, queue: Queue) -> None:
    ledger: list[str] = []

    @worker.job(timeout=0.2)
    async def hang(ctx: JobContext) -> None:
        try:
            ledger.append("started")
            await asyncio.Event().wait()  # never set
            ledger.append("woke")
        finally:
            await asyncio.sleep(0)  # a finally block may still await: the loop runs it to its end
            ledger.append("finally")

    enqueued = queue.enqueue("hang")
    run_burst(db)
    timed_out = row(db, enqueued.id)
    assert timed_out["status"] == "failed"
    assert timed_out["error"] == "timed out after 0.2 s"
    assert ledger == ["started", "finally"]


def test_a_running_async_job_asked_to_cancel_is_cancelled_and_its_finally_runs(db: str, queue: Queue) -> None:
    """Unlike a sync job, which can only look at ctx.cancelled, the coroutine is cancelled where it awaits."""
    ledger: list[str] = []
    started = threading.Event()

    @worker.job
    async def hang(ctx: JobContext) -> None:
        try:
            started.set()
            await asyncio.Event().wait()  # never set, and the job never looks at ctx.cancelled
        finally:
            ledger.append(f"finally, ctx.cancelled {ctx.cancelled.is_set()}")

    enqueued = queue.enqueue("hang")
    running = Worker(db, cron=False)
    thread = threading.Thread(target=running.run)
    thread.start()
    try:
        assert started.wait(10)
        assert queue.cancel(enqueued.id, by="ops")
        ended = wait_for(lambda: rows(db, f"id = {enqueued.id} AND status = 'cancelled'"), 10, "the row to end")[0]
    finally:
        running.stop()
        thread.join(15)
    assert ended["error"].startswith("cancelled while running (asked by ops at ")
    assert "CancelledError" in ended["error"]
    assert ledger == ["finally, ctx.cancelled True"]


def test_a_timeout_error_of_the_job_itself_is_an_ordinary_failure(db: str, queue: Queue) -> None:
    @worker.job(timeout=30)
    async def impatient(ctx: JobContext) -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)

    enqueued = queue.enqueue("impatient")
    run_burst(db)
    assert row(db, enqueued.id)["error"].startswith("TimeoutError")


def test_follow_ups_and_enqueue_async_from_an_async_job(db: str, queue: Queue) -> None:
    @worker.job
    async def parent(ctx: JobContext) -> int:
        ctx.enqueue("child", {"via": "follow-up"})
        now = await ctx.enqueue_async("child", {"via": "enqueue_async"})
        return now.id

    @worker.job
    async def child(ctx: JobContext, via: str) -> str:
        return via

    first = queue.enqueue("parent")
    run_burst(db)
    children = {json.loads(r["result"]) for r in rows(db, "type = 'child' AND status = 'succeeded'")}
    assert children == {"follow-up", "enqueue_async"}
    assert json.loads(row(db, first.id)["result"]) in {r["id"] for r in rows(db, "type = 'child'")}


def newer_pythons() -> list[str]:
    """Python 3.12+ interpreters on this machine (pyenv's, or on PATH): the job loop starts tasks eagerly there."""
    on_path = (shutil.which(f"python3.{minor}") for minor in range(12, 20))
    found = {os.path.realpath(path) for path in on_path if path and "/shims/" not in path}
    found |= {os.path.realpath(path) for path in Path("/root/.pyenv/versions").glob("3.1[2-9]*/bin/python3")}
    return sorted(found)


EAGER_SCRIPT = """
import asyncio, json, sys
import worker

@worker.job
async def at_once(ctx):  # never waits: it ends inside its first step
    return "ended in its first step"

@worker.job
async def waits(ctx):
    await asyncio.sleep(0.01)
    return asyncio.current_task().get_name()

@worker.job(timeout=0.1)
async def too_long(ctx):
    try:
        await asyncio.sleep(30)
    finally:
        print("finally ran", flush=True)

@worker.job
async def eager(ctx):
    return asyncio.get_running_loop().get_task_factory() is asyncio.eager_task_factory

with worker.Queue(sys.argv[1]) as queue:
    ids = [queue.enqueue(name).id for name in ("at_once", "waits", "too_long", "eager")]
    worker.Worker(sys.argv[1], burst=True, cron=False, async_concurrency=2).run()
    print(json.dumps([(queue.get(i).status, queue.get(i).result, (queue.get(i).error or "")[:30]) for i in ids]))
"""


@pytest.mark.stores("sqlite")
@pytest.mark.parametrize("python", newer_pythons() or [None])
def test_on_python_3_12_and_later_jobs_start_eagerly_and_end_as_they_do_on_3_11(
    python: str | None, tmp_path: Path
) -> None:
    """There a job's first step runs as the loop begins it (an idle async job waited a loop turn more than a
    sync one): a job that never waits, one that waits, and one that times out (its finally runs) all end as
    anywhere else."""
    if python is None:
        pytest.skip("no Python 3.12 or later on this machine")
    script = tmp_path / "eager.py"
    script.write_text(EAGER_SCRIPT)
    # The repository's worker.py first; croniter (pure Python) from this interpreter's own packages.
    path = os.pathsep.join([str(HERE), *(p for p in sys.path if p.endswith("site-packages"))])
    done = subprocess.run([python, str(script), str(tmp_path / "jobs.db")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": path})  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert printed[0] == "finally ran"
    assert json.loads(printed[-1]) == [
        ["succeeded", "ended in its first step", ""],
        ["succeeded", "job 2", ""],
        ["failed", None, "timed out after 0.1 s"],
        ["succeeded", True, ""],
    ]


# --- Hooks ----------------------------------------------------------------------------


def test_async_startup_resources_are_usable_by_async_jobs(db: str, queue: Queue) -> None:
    """What an async startup hook makes is bound to the job loop (as an aiohttp session would be)."""
    closed: list[bool] = []

    @worker.on_startup
    async def open_session(app: Any) -> None:
        app.loop = asyncio.get_running_loop()
        app.session = asyncio.Queue()  # bound to the loop it is first used on
        await app.session.put("token")

    @worker.on_shutdown
    async def close_session(app: Any) -> None:
        closed.append(asyncio.get_running_loop() is app.loop)

    @worker.job
    async def use(ctx: JobContext) -> dict[str, Any]:
        token = await ctx.app.session.get()
        await ctx.app.session.put(token)
        return {"token": token, "same_loop": asyncio.get_running_loop() is ctx.app.loop}

    jobs = queue.enqueue_many([("use", {})] * 3)
    run_burst(db)
    assert [json.loads(row(db, j.id)["result"]) for j in jobs] == [{"token": "token", "same_loop": True}] * 3
    assert closed == [True]


# --- Misuse ---------------------------------------------------------------------------


def test_async_generator_function_is_refused_at_declaration() -> None:
    with pytest.raises(ConfigError, match=r"'stream'.*async generator"):

        @worker.job
        async def stream(ctx: JobContext) -> Any:
            yield 1

    assert "stream" not in worker.REGISTRY


def test_sync_function_returning_a_coroutine_fails_with_a_clear_message(db: str, queue: Queue) -> None:
    async def fetch(ctx: JobContext) -> int:
        return 1

    @worker.job
    def wrapped(ctx: JobContext) -> Any:  # a sync decorator's wrapper around an async def
        return fetch(ctx)

    enqueued = queue.enqueue("wrapped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be a RuntimeWarning
        run_burst(db)
    error = row(db, enqueued.id)["error"]
    assert error.startswith("job 'wrapped' returned a coroutine object instead of a result")
    assert "not itself async def" in error
    assert "JSON" not in error


def test_async_concurrency_must_be_positive(db: str) -> None:
    with pytest.raises(ConfigError, match="async concurrency"):
        Worker(db, async_concurrency=0)


# --- Real processes: SIGTERM and kill -9 with async jobs running -------------------------

ASYNC_JOBS_MODULE = '''
"""Async jobs for test_async_jobs.py: each leaves evidence in a file the test reads."""

import asyncio
import contextlib
import http.server
from pathlib import Path

from worker import job


def _append(path, line):
    with Path(path).open("a") as ledger:  # one worker at a time writes a ledger here
        ledger.write(line + "\\n")


@job
async def nap(ctx, marker, seconds):
    _append(marker, f"{ctx.job.id} start")
    try:
        await asyncio.sleep(seconds)
    finally:
        _append(marker, f"{ctx.job.id} finally")
    return seconds


@job
async def stall(ctx, marker, seconds):
    """Stalls on its first attempt only, so that a retry succeeds at once."""
    _append(marker, f"{ctx.job.id} {ctx.job.attempt} start")
    if ctx.job.attempt == 1:
        await asyncio.sleep(seconds)
    return {"attempt": ctx.job.attempt}
'''


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def producer(db: str) -> Iterator[Queue]:
    """The test's Queue: the job types live in the worker processes only."""
    with Queue(db, check_types=False) as q:
        yield q


@pytest.fixture
def run_worker(processes: Processes, db: str, tmp_path: Path) -> Callable[..., WorkerProcess]:
    """Start ``worker run`` on the test's database with the async jobs above and extra flags."""
    jobs_file = tmp_path / "async_jobs.py"
    jobs_file.write_text(ASYNC_JOBS_MODULE)

    def start(*flags: str, name: str = "worker") -> WorkerProcess:
        return processes.run_jobs(db, jobs_file, *flags, name=name)

    return start


@pytest.mark.slow
def test_sigterm_lets_short_async_jobs_finish_and_cancels_and_gives_back_long_ones(
    run_worker: Callable[..., WorkerProcess], producer: Queue, db: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    short, long = producer.enqueue_many(
        [("nap", {"marker": str(marker), "seconds": 0.5}), ("nap", {"marker": str(marker), "seconds": 60})]
    )
    process = run_worker("--shutdown-timeout", "2")
    wait_for(lambda: len([line for line in lines(marker) if line.endswith("start")]) == 2, 10, "both jobs to start")
    signalled_ms = worker.now_ms()
    process.send(signal.SIGTERM)
    assert process.wait(15) == 0

    finished = row(db, short.id)
    assert finished["status"] == "succeeded"
    assert finished["finished"] >= signalled_ms  # it was still running when the signal came
    given_back = row(db, long.id)
    assert (given_back["status"], given_back["owner"], given_back["attempt"]) == ("pending", None, 1)
    assert len(rows(db)) == 2  # the same row, no retry row
    # The long one was cancelled, not abandoned: its finally block ran before the worker exited.
    assert f"{long.id} finally" in lines(marker)


@pytest.mark.slow
def test_async_jobs_of_a_killed_worker_are_rescued_after_the_lease(
    run_worker: Callable[..., WorkerProcess], producer: Queue, db: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    first, second = producer.enqueue_many([("stall", {"marker": str(marker), "seconds": 60})] * 2)
    doomed = run_worker("--lease", "1", name="doomed")
    wait_for(lambda: len([line for line in lines(marker) if line.endswith("start")]) == 2, 10, "both jobs to start")
    doomed.kill()
    assert {r["status"] for r in rows(db)} == {"running"}

    rescuer = run_worker("--lease", "1", name="rescuer")
    for job in (first, second):
        retry = wait_for(
            lambda: rows(db, f"rescheduled_from_job = {job.id} AND status = 'succeeded'"),  # noqa: B023
            15,
            "the retry to succeed",
        )[0]
        assert retry["attempt"] == 2
        assert json.loads(retry["result"]) == {"attempt": 2}
        old = row(db, job.id)
        assert (old["status"], old["error"].startswith("worker lost")) == ("failed", True)
    assert rows(db, "status IN ('running', 'pending')") == []
    assert rescuer.stop() == 0


# --- Enqueueing from async web apps -----------------------------------------------------


def hold_write_lock(db: str) -> Any:
    """Another program's open write transaction on the table: enqueues wait until it ends (commit())."""
    if worker.is_postgres(db):
        import psycopg

        conn: Any = psycopg.connect(db)
        conn.execute("LOCK TABLE worker_jobs IN EXCLUSIVE MODE")
        return conn
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_async_enqueue_waits_for_the_database_without_blocking_the_event_loop(db: str, queue: Queue) -> None:
    @worker.job
    def noop(ctx: JobContext) -> None: ...

    async def scenario() -> tuple[int, worker.Job]:
        async with worker.AsyncQueue(db) as async_queue:
            await async_queue.enqueue("noop")  # connected before the lock is taken
            blocker = hold_write_lock(db)
            enqueue = asyncio.ensure_future(async_queue.enqueue("noop", {"n": 2}))
            ticks = 0
            while ticks < 20:  # the loop runs on while the enqueue waits for the lock
                await asyncio.sleep(0.005)
                ticks += 1
            assert not enqueue.done()
            blocker.commit()
            blocker.close()
            job = await asyncio.wait_for(enqueue, 10)
            assert await async_queue.get(job.id) == job
            assert await async_queue.cancel(job.id)
            return ticks, job

    ticks, job = asyncio.run(scenario())
    assert ticks == 20
    assert row(db, job.id)["status"] == "cancelled"
    assert json.loads(row(db, job.id)["data"]) == {"n": 2}


@pytest.mark.stores("postgres")
def test_async_enqueue_in_the_apps_transaction_commits_and_rolls_back_with_it(db: str, queue: Queue) -> None:
    import psycopg

    @worker.job
    def ship(ctx: JobContext, order: int) -> None: ...

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(db) as conn:
            await conn.execute("DROP TABLE IF EXISTS async_orders")
            await conn.execute("CREATE TABLE async_orders (id int PRIMARY KEY)")
            await conn.commit()
            jobs = worker.AsyncQueue(conn)
            await conn.execute("INSERT INTO async_orders VALUES (1)")
            await jobs.enqueue("ship", {"order": 1})
            await conn.rollback()  # the app's rollback: neither the order nor its job
            await conn.execute("INSERT INTO async_orders VALUES (2)")
            await jobs.enqueue("ship", {"order": 2}, tag="ship:2")
            await jobs.enqueue_many([("ship", {"order": 2}), ("ship", {"order": 2})], delay=60)
            await conn.commit()
            with contextlib.suppress(RuntimeError):
                async with conn.transaction():  # a transaction block that raises rolls back too
                    await jobs.enqueue("ship", {"order": 3})
                    raise RuntimeError("the request failed")

    asyncio.run(scenario())
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT id FROM async_orders").fetchall() == [(2,)]
    assert [json.loads(r["data"]) for r in rows(db)] == [{"order": 2}] * 3
    assert [r["tag"] for r in rows(db)] == ["ship:2", None, None]


@pytest.mark.stores("postgres")
def test_async_enqueue_on_an_app_connection_keeps_the_tag_rule(db: str, queue: Queue) -> None:
    import psycopg

    @worker.job
    def sync_account(ctx: JobContext, version: int) -> None: ...

    async def scenario() -> list[int]:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            jobs = worker.AsyncQueue(conn)
            first = await jobs.enqueue("sync_account", {"version": 1}, tag="account:7")
            kept = await jobs.enqueue("sync_account", {"version": 2}, tag="account:7", on_conflict="ignore")
            replaced = await jobs.enqueue("sync_account", {"version": 3}, tag="account:7")
            return [first.id, kept.id, replaced.id]

    first, kept, replaced = asyncio.run(scenario())
    assert kept == first
    assert [(r["id"], r["status"]) for r in rows(db)] == [(first, "cancelled"), (replaced, "pending")]


@pytest.mark.stores("sqlite")
def test_async_queue_on_a_sync_connection_says_to_use_queue(db: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, pytest.raises(TypeError, match=r"Queue\(conn\)"):
        worker.AsyncQueue(conn)


# --- The FastAPI example ------------------------------------------------------------------

FASTAPI_REQUESTS = """
import json
from fastapi.testclient import TestClient
from app import app

with TestClient(app) as client:
    answers = [
        client.post("/orders", json={"item": "book"}),
        client.post("/orders", json={"item": "lamp", "card": "declined"}),
    ]
print(json.dumps([[answer.status_code, answer.json()] for answer in answers]))
"""


class PriceHandler(http.server.BaseHTTPRequestHandler):
    """The shop's price service, on loopback: GET /prices/<item>."""

    def do_GET(self) -> None:
        body = json.dumps({"price": {"/prices/book": 12.5}.get(self.path, 1)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def price_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PriceHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.stores("postgres")
def test_fastapi_request_enqueues_in_its_transaction_and_the_async_job_stores_the_fetched_price(
    db: str, tmp_path: Path, price_service: str
) -> None:
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS orders")
    shop = example("fastapi_async", tmp_path)
    env = environment(DATABASE_URL=db, PRICES_URL=price_service)
    answers = json.loads(succeeded(run(shop, "-c", FASTAPI_REQUESTS, env=env)).stdout)
    assert answers == [[201, {"order": 1, "job": 1}], [402, {"detail": "order 2: card declined"}]]
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT id, item, price FROM orders").fetchall() == [(1, "book", None)]
    assert [(r["type"], r["status"]) for r in rows(db)] == [("fetch_price", "pending")]

    # The async job reads the order, asks the price service over HTTP and stores the price, on the
    # HTTP client and the pool its async @on_startup made on the job loop.
    succeeded(run(shop, "-m", "worker_cli", "run", "--burst", env=env))
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT id, price::float FROM orders").fetchall() == [(1, 12.5)]
        conn.execute("DROP TABLE orders")
    (done,) = rows(db, "type = 'fetch_price'")
    assert (done["status"], json.loads(done["result"])) == ("succeeded", {"item": "book", "price": 12.5})
