"""Issue 18's controls on issue 17's async jobs: a snooze from a coroutine, and an operator's cancel that
cancels the coroutine itself (a thread can only be told; a task can be stopped).  Both stores."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

import worker
from conftest import FakeClock, at, rows, wait_for
from worker import JobContext, Queue

pytestmark = pytest.mark.stores("sqlite", "postgres")


def test_an_async_job_that_snoozes_ends_its_row_and_its_chain_goes_on_later_using_no_attempt(
    queue: Queue, make_worker: Callable[..., worker.Worker], clock: FakeClock, db: str
) -> None:
    @worker.job
    async def later(ctx: JobContext) -> str:
        if ctx.attempt == 1 and not ctx.job.rescheduled_from_job:
            raise worker.Snooze(30)
        return "done"

    first = queue.enqueue("later", now=at(clock))
    runner = make_worker()
    assert runner.work() == 1
    ended, next_row = rows(db)
    assert (ended["status"], ended["error"]) == ("cancelled", f"snoozed for 30 s: job {next_row['id']} runs it then")
    assert (next_row["due"], next_row["attempt"], next_row["rescheduled_from_job"]) == (at(clock, 30), 1, first.id)
    clock.advance(30)
    assert runner.work() == 1
    assert rows(db)[-1]["status"] == "succeeded"


def test_an_operators_cancel_cancels_a_running_async_job_whose_finally_runs_and_the_row_ends_cancelled(
    queue: Queue, make_worker: Callable[..., worker.Worker], db: str
) -> None:
    started, cleaned_up = threading.Event(), threading.Event()

    @worker.job
    async def waits_for_ever(ctx: JobContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # nothing sets it, and the job never looks at ctx.cancelled
        finally:
            cleaned_up.set()

    @worker.job
    async def after(ctx: JobContext) -> str:
        return "ran"

    job = queue.enqueue("waits_for_ever")
    runner = make_worker(clock=time.time)  # the real clock: the worker looks for requests every 0.5 s
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    try:
        assert started.wait(10), "the job never started"
        assert queue.cancel(job.id, by="ops@desk")
        assert cleaned_up.wait(10), "the coroutine was not cancelled"
        wait_for(lambda: rows(db, f"id = {job.id}")[0]["status"] == "cancelled", 10, "the row to end cancelled")
        (row,) = rows(db, f"id = {job.id}")
        assert row["error"].startswith("cancelled while running (asked by ops@desk at ")
        assert "it then raised:\nCancelledError" in row["error"], row["error"]
        following = queue.enqueue("after")  # the job loop goes on
        wait_for(lambda: rows(db, f"id = {following.id}")[0]["status"] == "succeeded", 10, "the next async job")
    finally:
        runner.stop()
        loop.join(15)
    assert not loop.is_alive()
