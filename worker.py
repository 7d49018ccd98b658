"""A SQLite-first background job worker.

A web app schedules jobs by inserting rows into the table ``worker_jobs`` of a
local SQLite database (WAL mode); ``worker run`` claims due rows in a
transaction, runs the registered Python function and stores what it returned
(as JSON), or the error and its traceback, in that same row.  A retry or the
next run of a recurring job is a new row pointing back to the old one.  Given a
postgresql:// URL, the same API, CLI and table run on PostgreSQL, for workers on
many hosts (worker_postgres.py, the extra ``rowworker[postgres]``).

The engine reaches its database only through a store (``Store``: one verb per
transition of a row, each naming its fence) and learns of other writers'
commits through a wake-up (``WakeUp``).  This file holds the SQLite store, so
that worker.py and schema.sql alone are a working copy.

    # jobs.py -- what the worker runs
    from worker import job

    @job(max_attempts=3, retry_delay=30)
    def send_welcome(ctx, email):
        ctx.logger.info("mailing %s", email)
        return {"sent_to": email}

    # the web app -- how it asks for it
    from worker import Queue
    Queue("app.db").enqueue("send_welcome", {"email": "ada@example.com"})

    $ worker run --db app.db --jobs jobs

Delivery is at least once: a job runs again only when the worker running it
died or stalled past its lease.  The row id and attempt are in ``ctx.job`` so a
job can make its side effects idempotent.  See README.md for the table contract.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python worker.py` / `python -m worker` run this file as __main__.  Job
    # modules do `from worker import job`, which must reach the one registry
    # there is: import this file again as the module `worker` proper, and run
    # its command line.
    import worker

    sys.exit(worker.main())

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import enum
import functools
import getpass
import importlib
import inspect
import json
import logging
import math
import os
import queue as queue_module
import random
import re
import secrets
import signal
import socket
import sqlite3
import threading
import time
import traceback
import zoneinfo
from collections.abc import Awaitable, Callable, Container, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import EllipsisType, ModuleType, SimpleNamespace
from typing import Any, ClassVar, NoReturn, Protocol, TypeVar, cast, overload

from croniter import CroniterError, croniter

__version__ = "0.1.0"

logger = logging.getLogger("worker")

# --- Defaults (seconds at the Python surface, milliseconds in the table) ------

# The table's definition, beside this file: schema.sql in a checkout or a copy;
# worker_schema.sql as installed, where a name as generic as schema.sql would
# be a stranger in site-packages.
SCHEMA_FILES = (Path(__file__).with_name("schema.sql"), Path(__file__).with_name("worker_schema.sql"))
BUSY_TIMEOUT_MS = 5_000
# A Queue's writes on SQLite, and a worker's, once one of them waited for the write
# lock (ProducerLockWait): how often they look for it, and until how many in a row found it free.
LOCK_LOOK_EVERY, LOOK_OFTEN_UNTIL_FREE = 0.0005, 20
LOCK_WAITED = 0.001  # a write that took this long may have waited for the lock: SQLite's wait sleeps 1 ms first
DEFAULT_DB = "worker.db"
DEFAULT_JOBS_MODULE = "jobs"
DEFAULT_CONCURRENCY = 4
DEFAULT_ASYNC_CONCURRENCY = 100  # async def jobs at once on the job loop: an awaiting coroutine costs little
DEFAULT_LEASE = 60.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAX_DEATHS = 3
DEFAULT_RETRY_DELAY = 10.0
DEFAULT_BACKOFF = 2.0
RETRY_JITTER = 0.1  # +-10 %, so a burst of failures does not retry in lockstep
MAX_RETRY_DELAY = 3600.0  # backoff growth stops at an hour
DAY_MS = 86_400_000
MINUTE_MS = 60_000
PRUNE_BATCH_SIZE = 2_000  # rows a prune deletes per transaction, so a worker's claims wait little
KEEP_SUCCEEDED = 7 * 86400.0
KEEP_FAILED = 30 * 86400.0
WAL_SIZE_LIMIT = 16 * 1024 * 1024
WAL_CHECKPOINT_PAGES = 4000  # 4 KiB pages (4,120-byte WAL frames): just under WAL_SIZE_LIMIT
POLL_INTERVAL = 0.006  # how often an idle worker looks for commits by others, without inotify
WATCHED_POLL_INTERVAL = 0.025  # ... and with it: only a safety net for a missed event
COMMIT_SETTLE_SECONDS, COMMIT_SETTLE_POLL = 0.05, 0.002  # after a -wal event, look every 2 ms for 50 ms
MAX_BUSY_BACKOFF = 2.0
LOCK_HELD_SWITCH_INTERVAL = 0.0002  # seconds: how soon the GIL comes back to a thread holding the write lock
MAX_SNOOZES = 100  # per chain: a job that always says "not yet" ends failed, not pending for ever
# Claiming ahead: while jobs are short, a claim takes up to DEFAULT_PREFETCH
# jobs beyond the free slots (PREFETCH_PER_THREAD per thread with more threads),
# so that one commit records and claims a batch (at concurrency 1 every job
# would otherwise need a commit of its own).  Many threads of jobs of 1 ms
# need more than 32 on hand to last a step of the loop (bench/README.md).
DEFAULT_PREFETCH = 32
PREFETCH_PER_THREAD = 4
# On PostgreSQL every step of the loop is a few round trips to the server and a
# commit it waits for: claiming far more per step pays (bench/README.md).
POSTGRES_PREFETCH = 512
PREFETCH_PATIENCE = 0.02  # jobs waiting this long behind busy threads are given back
# How many loop round trips the jobs claimed ahead cover (see ClaimAhead): one
# would do on average; the second absorbs a slow commit or a late wake-up.
PREFETCH_ROUND_TRIPS = 2
ASYNC_PREFETCH_JOB_SECONDS = 0.1  # an async job that runs longer stops the job loop's claiming ahead
SHUTDOWN_WARN_EVERY = 5.0  # seconds between the warnings of a stopping worker that cannot write yet
CANCELLED_JOB_GRACE = 5.0  # how long a stopping worker waits for its cancelled async jobs' finally blocks


class Status(enum.StrEnum):
    """The states of a row, as schema.sql's CHECK on worker_jobs.status names them (a str: rows compare equal).

    The table binds plain strings (``.value``): sqlite3 adapts a str subclass
    through its adapter registry first, a microsecond per parameter.
    """

    PENDING = "pending"  # waiting until due; claim takes it
    RUNNING = "running"  # claimed, under a lease; finish, give back or rescue ends it
    SUCCEEDED = "succeeded"  # finished: its function returned
    FAILED = "failed"  # finished: it raised, timed out, or its worker was lost
    CANCELLED = "cancelled"  # finished: cancelled, replaced by a newer row of its tag, asked to while running, snoozed


STATUSES = tuple(status.value for status in Status)

# What a row may hold.  SQLite's integers are 64-bit, and a sum that leaves that
# range (now + keep_ms) becomes a REAL, which the STRICT table refuses; Python's
# datetime ends at year 9999.  So the API refuses values beyond these, the
# table refuses durations and counts beyond them (schema.sql, version 4), and
# the worker clamps what an older row may still hold before any arithmetic.
MAX_DURATION_MS = 100 * 31_557_600_000  # 100 years of 365.25 days: retry_delay_ms, timeout_ms, keep_ms
MAX_COUNT = 2**31 - 1  # attempt, max_attempts, deaths
MIN_TIME_MS, MAX_TIME_MS = -62_135_596_800_000, 253_402_300_799_999  # 0001-01-01 and 9999-12-31T23:59:59.999Z
MAX_INTEGER = 2**63 - 1  # priority: any value SQLite can hold

Seconds = float | int | timedelta


# --- Errors ---------------------------------------------------------------------


class WorkerError(Exception):
    """Something the worker cannot do."""


class UnknownJobType(WorkerError, LookupError):
    """No job of that type is registered."""


class InvalidJobData(WorkerError, ValueError):
    """Job data must be a JSON object with string keys."""


class ConfigError(WorkerError):
    """The worker's configuration is invalid."""


class DatabaseError(WorkerError):
    """The database refused a statement; a store turns its driver's errors into this or a subclass."""


class DatabaseUnavailable(DatabaseError):
    """For now only: busy, locked, full, or out of reach.  The worker backs off and tries again."""


class DatabaseBusy(DatabaseUnavailable):
    """Another connection holds the lock this one waits for (longer than the store waits by itself)."""


class DatabaseUnusable(DatabaseError):
    """The database cannot be opened, written, or has a schema newer than this code."""


class DatabaseReplaced(WorkerError):
    """The database file was deleted or replaced under the worker: it stopped, so that a restart opens the new one."""


class ForkedConnection(WorkerError):
    """A database connection opened in another process was used after fork()."""


class Snooze(Exception):
    """Raised by a job: not yet.  Its row ends `cancelled`, and the next row of its chain is due in ``seconds``,
    with the same attempt: a snooze uses up no attempt.  A chain snoozes at most MAX_SNOOZES times; the next
    snooze fails the job."""

    def __init__(self, seconds: Seconds) -> None:
        delay_ms = _optional_ms(seconds, "a snooze")
        assert delay_ms is not None
        super().__init__(self.message(delay_ms))
        self.delay_ms = delay_ms

    @staticmethod
    def message(delay_ms: int) -> str:
        return f"snoozed for {delay_ms / 1000:g} s"


# --- Time -------------------------------------------------------------------------


def to_ms(duration: Seconds) -> int:
    """Seconds (float or timedelta) as integer milliseconds."""
    if isinstance(duration, timedelta):
        duration = duration.total_seconds()
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise TypeError(f"a duration must be seconds or a timedelta, not {duration!r}")
    if not math.isfinite(duration):
        raise ValueError(f"a duration must be a finite number of seconds, not {duration!r}")
    return round(duration * 1000)


def epoch_ms(moment: datetime | float) -> int:
    """A datetime (naive means UTC) or epoch seconds as epoch milliseconds."""
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000)
    if isinstance(moment, bool) or not isinstance(moment, (int, float)) or not math.isfinite(moment):
        raise ValueError(f"a time must be a datetime or epoch seconds, not {moment!r}")
    return round(moment * 1000)


def _optional_ms(duration: Seconds | None, name: str) -> int | None:
    if duration is None:
        return None
    ms = to_ms(duration)
    if ms < 0:
        raise ValueError(f"{name} must not be negative, got {duration!r}")
    if ms > MAX_DURATION_MS:
        raise ValueError(f"{name} must be at most 100 years ({MAX_DURATION_MS // 1000} s), got {duration!r}")
    return ms


def _check_integer(value: Any, name: str, low: int, high: int) -> None:
    """ValueError unless ``value`` is an int in [low, high] (a bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")


# --- The row --------------------------------------------------------------------

COLUMNS = tuple(
    """
    id type data status queue priority due tag attempt cron_schedule rescheduled_from_job
    started finished result error created_at worker owner lease_until deaths cron_timezone
    cron_slot max_attempts retry_delay_ms backoff timeout_ms keep_ms remove_at persistent
    """.split()
)
SELECT_COLUMNS = ", ".join(COLUMNS)
# What `worker copy` moves: a Job's columns, then those a Job does not carry (a chain's snooze count, a cancel
# request and its asker, the last progress reported), named alike in both schemas.
COPIED_COLUMNS = ", ".join((*COLUMNS, "snoozes", "cancel_requested", "cancel_requested_by", "progress"))
_DATA, _RESULT, _PERSISTENT = COLUMNS.index("data"), COLUMNS.index("result"), COLUMNS.index("persistent")


# Not frozen: a frozen dataclass sets each of its 29 fields through
# object.__setattr__, which made building a Job cost more than inserting its row.
@dataclasses.dataclass(slots=True)
class Job:
    """A snapshot of one row of worker_jobs (one invocation of a job); times are epoch ms.

    Changing it changes nothing in the database.
    """

    id: int
    type: str
    data: dict[str, Any]
    status: str = Status.PENDING.value
    queue: str = "default"
    priority: int = 0
    due: int = 0
    tag: str | None = None
    attempt: int = 1
    cron_schedule: str | None = None
    rescheduled_from_job: int | None = None
    started: int | None = None
    finished: int | None = None
    result: Any = None
    error: str | None = None
    created_at: int = 0
    worker: str | None = None
    owner: str | None = None
    lease_until: int | None = None
    deaths: int = 0
    cron_timezone: str | None = None
    cron_slot: int | None = None
    max_attempts: int | None = None
    retry_delay_ms: int | None = None
    backoff: float | None = None
    timeout_ms: int | None = None
    keep_ms: int | None = None
    remove_at: int | None = None
    persistent: bool = False

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> Job:
        """Build a Job from a row selected as SELECT_COLUMNS (the fields' own order)."""
        values = list(row)
        values[_DATA] = {} if values[_DATA] == "{}" else json.loads(values[_DATA])
        if values[_RESULT] is not None:
            values[_RESULT] = json.loads(values[_RESULT])
        values[_PERSISTENT] = bool(values[_PERSISTENT])
        return cls(*values)


class UnreadableRow(WorkerError):
    """A row the worker cannot turn into a job (text that is not UTF-8, data Python's json cannot decode)."""


def read_row(raw: Iterable[Any]) -> Job:
    """A Job from a row selected as SELECT_COLUMNS with text as bytes; UnreadableRow says why it cannot be one."""
    values = list(raw)
    for index, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                values[index] = value.decode()
            except UnicodeDecodeError:
                raise UnreadableRow(f"its {COLUMNS[index]} is not valid UTF-8 ({_excerpt(value)})") from None
    for index in (_DATA, _RESULT):
        try:
            if values[index] is not None:
                json.loads(values[index])
        except RecursionError:
            raise UnreadableRow(f"its {COLUMNS[index]} is JSON nested too deep for the worker to decode") from None
        except ValueError as e:
            raise UnreadableRow(f"its {COLUMNS[index]} cannot be decoded: {e}") from None
    return Job.from_row(values)


def unreadable_job(raw: Iterable[Any]) -> Job:
    """What can be told of a row read_row refused: enough to fence, count and log it (bad text shown replaced)."""
    values = dict(zip(COLUMNS, raw, strict=True))

    def text(value: Any) -> Any:
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    return Job(id=values["id"], type=text(values["type"]), data={}, status=Status.RUNNING.value,
               queue=text(values["queue"]), attempt=values["attempt"], tag=text(values["tag"]))  # fmt: skip


def _excerpt(value: bytes) -> str:
    shown = value[:40].decode(errors="backslashreplace")
    return shown + ("..." if len(value) > 40 else "")


# --- The registry ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """The policy of a job: set by its type (``@job``), overridden per row (``enqueue``); None leaves it to the next.

    Held as the table holds it (durations in ms); ``of`` takes the options as
    the API's keywords name them (durations in seconds) and checks them.
    """

    queue: str | None = None
    max_attempts: int | None = None
    retry_delay_ms: int | None = None
    backoff: float | None = None
    timeout_ms: int | None = None
    keep_ms: int | None = None

    @classmethod
    def of(
        cls,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        retry_delay: Seconds | None = None,
        backoff: float | None = None,
        timeout: Seconds | None = None,
        keep: Seconds | None = None,
    ) -> JobOptions:
        """The options from the API's keywords; ValueError naming the first that is not usable."""
        # Most rows set none: skip making a frozen dataclass, a measurable part of an enqueue (bench/README.md).
        given = (queue, max_attempts, retry_delay, backoff, timeout, keep)
        if given == _NOTHING_GIVEN:
            return _NO_OPTIONS
        check_policy(max_attempts=max_attempts, backoff=backoff, timeout=timeout)
        return cls(
            queue,
            max_attempts,
            _optional_ms(retry_delay, "retry_delay"),
            None if backoff is None else float(backoff),
            _optional_ms(timeout, "timeout"),
            _optional_ms(keep, "keep"),
        )

    def columns(self) -> dict[str, Any]:
        """The row's policy columns (queue aside: a row always has one)."""
        if self is _NO_OPTIONS:
            return _NO_COLUMNS  # the callers unpack it: one dict for every row that sets nothing
        return {"max_attempts": self.max_attempts, "retry_delay_ms": self.retry_delay_ms, "backoff": self.backoff,
                "timeout_ms": self.timeout_ms, "keep_ms": self.keep_ms}  # fmt: skip


_NO_OPTIONS = JobOptions()
_NOTHING_GIVEN = (None,) * 6
_NO_COLUMNS = dict.fromkeys(("max_attempts", "retry_delay_ms", "backoff", "timeout_ms", "keep_ms"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobType(JobOptions):
    """A registered job function and its options, the defaults for rows that leave them NULL."""

    name: str
    fn: Callable[..., Any]
    cron: str | None = None  # a recurring job: every worker keeps one pending row for it
    timezone: str | None = None  # of `cron`; None means UTC
    is_async: bool = False  # an async def function: run on the worker's job loop, not on a job thread

    @property
    def cron_tag(self) -> str:
        """The tag of the declared recurring job's rows."""
        return f"cron:{self.name}"


REGISTRY: dict[str, JobType] = {}
STARTUP_HOOKS: list[Callable[[SimpleNamespace], Any]] = []
SHUTDOWN_HOOKS: list[Callable[[SimpleNamespace], Any]] = []


JobFunction = TypeVar("JobFunction", bound=Callable[..., Any])
_T = TypeVar("_T")


@overload
def job(fn: JobFunction) -> JobFunction: ...


@overload
def job(
    *,
    name: str | None = None,
    max_attempts: int | None = None,
    retry_delay: Seconds | None = None,
    backoff: float | None = None,
    timeout: Seconds | None = None,
    queue: str | None = None,
    keep: Seconds | None = None,
    cron: str | None = None,
    timezone: str | None = None,
) -> Callable[[JobFunction], JobFunction]: ...


def job(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    max_attempts: int | None = None,
    retry_delay: Seconds | None = None,
    backoff: float | None = None,
    timeout: Seconds | None = None,
    queue: str | None = None,
    keep: Seconds | None = None,
    cron: str | None = None,
    timezone: str | None = None,
) -> Any:
    """Register a function as a job type: ``@job`` or ``@job(max_attempts=5, ...)``.

    The worker calls it as ``fn(ctx, **data)``; called directly it just runs.
    ``cron`` makes it recurring ("*/5 * * * *", or six fields with seconds
    first, in ``timezone``, default UTC); ``keep`` is how long its finished rows
    stay before pruning.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        job_name = name or fn.__name__
        if _is_function_of_kind(fn, inspect.isasyncgenfunction):
            raise ConfigError(
                f"job {job_name!r}: {_qualname(fn)} is an async generator function (it uses yield): a job returns"
                " one result; write it as async def returning a value"
            )
        try:
            check_policy(max_attempts=max_attempts, backoff=backoff, timeout=timeout)
            if cron is not None:
                check_cron(cron, timezone)
        except ValueError as e:
            raise ConfigError(f"job {job_name!r}: {e}") from e
        existing = REGISTRY.get(job_name)
        if existing and _qualname(existing.fn) != _qualname(fn):
            raise ConfigError(f"job {job_name!r} is already registered by {_qualname(existing.fn)}")
        options = JobOptions.of(
            queue=queue, max_attempts=max_attempts, retry_delay=retry_delay, backoff=backoff, timeout=timeout, keep=keep
        )
        REGISTRY[job_name] = JobType(
            name=job_name, fn=fn, cron=cron, timezone=timezone, is_async=is_coroutine_function(fn),
            queue=options.queue, **options.columns()
        )  # fmt: skip
        return fn

    return register(fn) if fn is not None else register


def is_coroutine_function(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine: an async def function, a partial of one, or an object whose
    ``__call__`` is one."""
    return _is_function_of_kind(fn, inspect.iscoroutinefunction)


def _is_function_of_kind(fn: Any, kind: Callable[[Any], bool]) -> bool:
    return kind(fn) or (callable(fn) and not inspect.isroutine(fn) and kind(type(fn).__call__))


def check_policy(*, max_attempts: int | None, backoff: float | None, timeout: Seconds | None) -> None:
    """ValueError unless a retry policy is usable: the same rules for @job and enqueue."""
    if max_attempts is not None:
        _check_integer(max_attempts, "max_attempts", 1, MAX_COUNT)
    if backoff is not None:
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not math.isfinite(backoff):
            raise ValueError(f"backoff must be a finite number, not {backoff!r}")
        if backoff < 1:
            raise ValueError(f"backoff must be at least 1, not {backoff!r}")
    if timeout is not None and to_ms(timeout) <= 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    _optional_ms(timeout, "timeout")  # and at most 100 years


def check_cron(expression: str, timezone: str | None = None) -> None:
    """ValueError naming the expression unless it is a valid 5- or 6-field cron that fires at all."""
    try:
        next_cron_slot(expression, timezone, 0)
    except NoCronSlot as e:
        raise ValueError(f"invalid cron expression {expression!r}: it never fires ({e.__cause__})") from e


class NoCronSlot(ValueError):
    """The schedule has no slot after the given time (it never fires, or not before the year 9999)."""


# What zoneinfo raises for a name that is not a zone: ZoneInfoNotFoundError (a
# KeyError), IsADirectoryError for "Europe" (a directory of zones), ValueError
# for paths and odd characters (UnicodeEncodeError is one), OSError for a name
# too long for the filesystem, TypeError for a non-string.
_BAD_ZONE_ERRORS = (KeyError, OSError, ValueError, TypeError)
# What croniter (and datetime) raise for an expression they cannot parse, or a
# moment they cannot count from or to (a slot near the year 9999 overflows).
_BAD_CRON_ERRORS = (CroniterError, ValueError, KeyError, TypeError, IndexError, OverflowError, OSError)


def _cron_iterator(expression: str, timezone: str | None, after_ms: int) -> croniter:
    fields = expression.split() if isinstance(expression, str) else []
    if len(fields) not in (5, 6):
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields (minute hour day month weekday)"
            " or 6 with seconds first"
        )
    try:
        zone = zoneinfo.ZoneInfo(timezone or "UTC")
    except _BAD_ZONE_ERRORS as e:
        raise ValueError(f"invalid cron timezone {timezone!r}: {type(e).__name__}") from e
    try:
        start = datetime.fromtimestamp(after_ms / 1000, zone)
    except (OverflowError, ValueError, OSError) as e:
        raise NoCronSlot(f"cron expression {expression!r}: no slot after epoch ms {after_ms}: {e}") from e
    try:
        # Six fields read seconds FIRST ("*/3 * * * * *" = every 3 seconds), as the
        # cron library of the system we replace did.
        return croniter(expression, start, second_at_beginning=len(fields) == 6)
    except _BAD_CRON_ERRORS as e:
        raise ValueError(f"invalid cron expression {expression!r}: {e}") from e


def _fixed_time(expression: str) -> bool:
    """Whether a schedule fires at fixed wall-clock times: neither its minute nor its hour field starts with '*'.

    Vixie cron's rule (its MIN_STAR and HR_STAR flags): "*/15 * * * *",
    "0 * * * *" and "* 2 * * *" count elapsed time; "30 2 * * *" and
    "0 1-3 * * *" name times on the clock.
    """
    fields = expression.split()
    minute, hour = fields[-5:-3]  # six fields put seconds first
    return not minute.startswith("*") and not hour.startswith("*")


def _repeated_wall_time(slot: datetime) -> bool:
    """Whether ``slot`` is the second time its wall-clock time occurs (the hour repeated when DST ends)."""
    local = datetime.fromtimestamp(slot.timestamp(), slot.tzinfo)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def next_cron_slot(expression: str, timezone: str | None, after_ms: int) -> int:
    """The first slot of the schedule strictly after ``after_ms`` (epoch ms).

    When summer time ends, a schedule of fixed times runs a time of the
    repeated hour once, at its first occurrence; one whose minute or hour field
    starts with '*' runs in both copies of the hour, as Vixie cron does.  Where
    the clock skips an hour, croniter runs the missing times at the hour after.
    ValueError (NoCronSlot) when there is no next slot.
    """
    iterator = _cron_iterator(expression, timezone, after_ms)
    start = iterator.get_current(datetime)
    try:
        slot = iterator.get_next(datetime)
        if _fixed_time(expression):
            while _repeated_wall_time(slot):
                slot = iterator.get_next(datetime)
    except _BAD_CRON_ERRORS as e:
        raise NoCronSlot(f"cron expression {expression!r} has no slot after {start.isoformat()}: {e}") from e
    slot_ms: int = round(slot.timestamp() * 1000)
    return slot_ms


def first_free_cron_slot(store: Store, tag: str, expression: str, timezone: str | None, now: int) -> int:
    """The first slot from now on that no run of this schedule (tag) has had yet."""
    last_slot = store.last_cron_slot(tag)
    return next_cron_slot(expression, timezone, max(now - 1, -1 if last_slot is None else last_slot))


def next_cron_due(expression: str, timezone: str | None, previous_slot: int, now: int) -> tuple[int, bool]:
    """The next run's slot: the first after ``previous_slot`` that is not already past.

    Counting from the previous slot, not from when the run ended, keeps the
    schedule from drifting; slots missed while nothing ran are skipped, not
    run in a burst (the bool says whether any was).  A clock stepped back can
    only delay a slot, never repeat one: slots only move forward.
    """
    following = next_cron_slot(expression, timezone, previous_slot)
    if following >= now:
        return following, False
    return next_cron_slot(expression, timezone, now - 1), True


def retry_delay_ms(base_ms: int, backoff: float, *, failures_before: int, jitter: float = 1.0) -> int:
    """The delay before a retry: ``base_ms × backoff^failures_before``, growth capped at an hour, times ``jitter``.

    A base longer than the cap is the row's own choice and stands (up to
    MAX_DURATION_MS).  Whatever a row holds (a backoff of 1e308, infinity, the
    1,025th failure of a chain), the growth is compared with the cap in
    logarithms before any power is taken, so nothing can overflow.
    """
    base_ms = min(max(base_ms, 0), MAX_DURATION_MS)
    cap = max(to_ms(MAX_RETRY_DELAY), base_ms)
    if base_ms == 0 or failures_before <= 0 or not backoff > 1:  # "not >": NaN grows nothing either
        delay: float = base_ms
    elif failures_before * math.log(backoff) >= math.log(cap / base_ms):
        delay = cap
    else:
        delay = min(base_ms * backoff**failures_before, cap)
    return min(round(delay * jitter), MAX_DURATION_MS)


def attempts_left(job: Job, max_attempts: int) -> bool:
    """Whether a failure of this attempt leaves another to make: a worker's death used up no attempt."""
    if job.attempt >= MAX_COUNT:  # a row written by another program: attempt + 1 would leave the table's range
        return False
    return job.attempt - _deaths(job) < max_attempts


def poisoned(deaths: int, max_deaths: int) -> bool:
    """Whether a chain that has killed ``deaths`` workers is given up: its job may be what kills them."""
    return deaths >= max_deaths


@dataclasses.dataclass(slots=True)
class QueueControl:
    """A queue's row of worker_queues: what operators set on it (see schema.sql, version 7)."""

    queue: str
    paused: bool = False
    max_running: int | None = None  # at most this many running at once, claimed-ahead rows included
    per_second: float | None = None  # at most this many starts per second, spaced evenly
    next_start: int | None = None  # epoch ms: with per_second, no further start before this
    changed: int = 0  # epoch ms of the operator's last change

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> QueueControl:
        queue, paused, max_running, per_second, next_start, changed = row
        return cls(queue, bool(paused), max_running, per_second, next_start, changed)

    @property
    def empty(self) -> bool:
        """Nothing set: the row goes, and with it the cost of the claim's checks."""
        return not self.paused and self.max_running is None and self.per_second is None


CONTROL_RECHECK_MS = 100  # a queue at its running limit is looked at again this often (a finish elsewhere frees it)


def start_allowance(control: QueueControl, running: int, now: int) -> int | None:
    """How many more jobs of the queue may be claimed at ``now`` with ``running`` of them running; None: any number.

    A rate is met by spacing: one start per 1/per_second s, never a burst, so
    that no window of a second holds more than per_second starts.
    """
    if control.paused:
        return 0
    allowed = None if control.max_running is None else max(control.max_running - running, 0)
    if control.per_second is not None:
        allowed = 0 if (control.next_start or 0) > now else min(1, 1 if allowed is None else allowed)
    return allowed


def next_start_after(control: QueueControl, now: int, started: int) -> int:
    """The rate's next start time once ``started`` jobs started at ``now`` (the interval rounded up: never faster)."""
    assert control.per_second is not None
    return max(control.next_start or now, now) + math.ceil(1000 / control.per_second) * started


def released_at(control: QueueControl, running: int, now: int) -> int | None:
    """When a queue that ``start_allowance`` holds back may start a job again; None: not before an operator says so.

    Its worker looks again then: a paused queue only once resumed (the
    operator's write wakes every worker), a full one every CONTROL_RECHECK_MS.
    """
    if control.paused:
        return None
    at = now
    if control.max_running is not None and running >= control.max_running:
        at = now + CONTROL_RECHECK_MS
    if control.per_second is not None and control.next_start is not None:
        at = max(at, control.next_start)
    return at


def _deaths(job: Job) -> int:
    """The worker deaths of the job's chain, as policy counts them: each death was one of its attempts.

    A row of another program's may say otherwise (deaths < 0, or more deaths
    than attempts); counted as it stands, it would retry forever.
    """
    return min(max(job.deaths, 0), job.attempt - 1)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{getattr(fn, '__qualname__', repr(fn))}"


def on_startup(fn: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], Any]:
    """Run ``fn(app)`` once per worker process before it claims; jobs see ``ctx.app``.

    An ``async def`` hook runs on the worker's job loop, so what it makes there
    (an HTTP client session, an async database pool) is usable by async jobs.
    """
    STARTUP_HOOKS.append(fn)
    return fn


def on_shutdown(fn: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], Any]:
    """Run ``fn(app)`` once when a worker process stops (close what on_startup opened); async def on the job loop."""
    SHUTDOWN_HOOKS.append(fn)
    return fn


def load_jobs(spec: str | None = None) -> ModuleType:
    """Import the module (dotted name or path to a .py file) that registers the jobs.

    Without a spec, ``jobs`` from the current directory and nowhere else: a
    module of that name elsewhere on the path (another distribution's, say)
    is not this app's jobs.
    """
    if spec is None:
        here = Path.cwd()
        found = next((p for p in (here / "jobs.py", here / "jobs" / "__init__.py") if p.is_file()), None)
        if found is None:
            raise ConfigError(f"no jobs module: no jobs.py in {here} (give --jobs MODULE or set WORKER_JOBS)")
        sys.path.insert(0, str(here))
        module = load_jobs(DEFAULT_JOBS_MODULE)
        if Path(module.__file__ or "").resolve() != found.resolve():
            raise ConfigError(f"jobs module {DEFAULT_JOBS_MODULE!r} was already imported from {module.__file__}")
        return module
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise ConfigError(f"jobs module {spec!r} not found")
            sys.path.insert(0, str(path.parent))
            return importlib.import_module(path.stem)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # console scripts do not put cwd on the path
        return importlib.import_module(spec)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise ConfigError(f"cannot import jobs module {spec!r}: no module named {e.name!r}") from e
        raise ConfigError(f"jobs module {spec!r} failed to import: {e}") from e
    except Exception as e:
        raise ConfigError(f"jobs module {spec!r} failed to import: {type(e).__name__}: {e}") from e


# --- Which database -----------------------------------------------------------------


def resolve_db_path(environ: Mapping[str, str] | None = None) -> str:
    """WORKER_DB, else DATABASE_URL, else ./worker.db; ConfigError for a URL this worker does not serve."""
    environ = os.environ if environ is None else environ
    for variable in ("WORKER_DB", "DATABASE_URL"):
        if environ.get(variable):
            try:
                return database_target(environ[variable])
            except ConfigError as e:
                raise ConfigError(f"{variable}: {e}") from e
    return DEFAULT_DB


URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres(target: object) -> bool:
    """Whether ``target`` is a postgresql:// (or postgres://) URL: the PostgreSQL store's."""
    scheme = URL_SCHEME.match(target) if isinstance(target, str) else None
    return scheme is not None and scheme.group(1).lower() in POSTGRES_SCHEMES


def redacted(url: str) -> str:
    """The database target without its password (in a URL's userinfo, or a ``password=`` parameter): to show."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", r"\1@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1...", url)


def database_target(target: str) -> str:
    """What --db, WORKER_DB or DATABASE_URL names: a PostgreSQL URL as it is, else a SQLite path (sqlite_path)."""
    return target if is_postgres(target) else sqlite_path(target)


def sqlite_path(target: str) -> str:
    """A database path, from a path or a sqlite:// URL; ConfigError for any other URL.

    Never a fallback: a worker told to use postgresql://... that quietly served
    ./worker.db would leave every job pending.
    """
    scheme = URL_SCHEME.match(target)
    if scheme is None:
        return target
    if scheme.group(1).lower() != "sqlite":
        raise ConfigError(
            f"unsupported database URL {scheme.group(1)}://...: this worker serves SQLite files "
            "(a path, or sqlite:///relative.db, sqlite:////absolute.db) and PostgreSQL (postgresql://...)"
        )
    path = target[len(scheme.group(0)) :]
    # sqlite:///relative.db and sqlite:////absolute.db, as SQLAlchemy reads them
    return path[1:] if path.startswith("/") else path


# --- Enqueue --------------------------------------------------------------------


class Queue:
    """The producer side: enqueue, look up and cancel jobs.

    ``Queue(path)`` (or a postgresql:// URL) opens its own connection per
    thread (and per process: after fork the child opens a new one) and creates
    the schema if needed.  ``Queue(connection)`` writes on the caller's open
    connection (stdlib sqlite3, apsw, psycopg 3; or Django's, or SQLAlchemy's
    Session or Connection on one of those), inside the caller's transaction,
    so a job commits or rolls back together with the app's own writes.
    """

    path: str | None  # the database this Queue opens connections of its own to, or None (the caller's)
    _caller_store: Store | None
    _local: threading.local

    def __init__(self, db: str | os.PathLike[str] | Any, *, check_types: bool = True) -> None:
        self.check_types = check_types
        db = _dbapi_connection(db)
        if isinstance(db, str | os.PathLike):
            self._on_own_connections(database_target(os.fspath(db)))
            self._store()  # fail now, not at the first enqueue, if the database is unusable
        else:
            self.path = None
            self._caller_store = store_in_callers_transaction(db)

    @classmethod
    def from_env(cls, **options: Any) -> Queue:
        """A Queue on WORKER_DB (or DATABASE_URL, or ./worker.db)."""
        return cls(resolve_db_path(), **options)

    @classmethod
    def _unopened(cls, path: str) -> Queue:
        """A Queue on a database known to be usable (the worker's own), that connects at its first write, not now:
        a follow-up job only builds its row with it."""
        queue = cls.__new__(cls)
        queue.check_types = True
        queue._on_own_connections(path)
        return queue

    def _on_own_connections(self, path: str) -> None:
        """Write to ``path`` on connections of this Queue's own, one per thread (and process), opened when needed."""
        self.path, self._caller_store, self._local = path, None, threading.local()

    def _store(self) -> Store:
        """The store on this thread's own connection, or on the caller's (where its transaction is a savepoint)."""
        if self._caller_store is not None:
            return self._caller_store
        local = self._local
        if getattr(local, "pid", None) != _process_id:
            # A connection must never cross fork(): the child opens its own and
            # leaves the parent's untouched.
            assert self.path is not None
            local.store, local.pid = open_store(self.path), _process_id
            if isinstance(local.store, SQLiteStore):
                local.store.lock_wait = ProducerLockWait()
        store: Store = local.store
        return store

    def now(self) -> int:
        """The time rows are created and due by, in epoch ms: the store's clock (PostgreSQL's is the server's).

        Not this host's wall clock: a host whose clock is off would make jobs due
        hours late (ahead) or jump the queue (behind) on a database shared by many.
        """
        return self._store().now()

    def close(self) -> None:
        """Close this thread's own connection (a caller's connection is left open)."""
        if self._caller_store is None and getattr(self._local, "pid", None) == _process_id:
            self._local.store.close()
            del self._local.store, self._local.pid

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        delay: Seconds | None = None,
        at: datetime | float | None = None,
        priority: int = 0,
        queue: str | None = None,
        max_attempts: int | None = None,
        retry_delay: Seconds | None = None,
        backoff: float | None = None,
        timeout: Seconds | None = None,
        keep: Seconds | None = None,
        persistent: bool = False,
        tag: str | None = None,
        on_conflict: str = "replace",
        now: int | None = None,
    ) -> Job:
        """Schedule one job; returns its row.  Nothing is written if anything is invalid.

        ``delay`` (seconds) or ``at`` (a datetime; naive means UTC) sets when it
        is due; the policy options override the job type's for this row only.
        With a ``tag`` there is at most one pending job per tag: ``on_conflict=
        "replace"`` cancels the pending one and inserts this, ``"ignore"`` keeps
        it and returns it instead.
        """
        options = JobOptions.of(
            queue=queue, max_attempts=max_attempts, retry_delay=retry_delay, backoff=backoff, timeout=timeout, keep=keep
        )
        row = self._new_row(
            type, data, delay=delay, at=at, priority=priority, persistent=persistent, tag=tag, now=now, options=options
        )
        store = self._store()
        if row["tag"] is None and self._caller_store is None:
            # One INSERT is a transaction of its own, and (like BEGIN IMMEDIATE)
            # SQLite takes the write lock before it reads anything, waiting up to
            # busy_timeout: the same transaction without two more round trips.
            return store.insert(row, on_conflict)
        with store.transaction():
            return store.insert(row, on_conflict)

    def schedule_cron(
        self,
        type: str,
        cron: str,
        data: Mapping[str, Any] | None = None,
        *,
        tag: str | None = None,
        timezone: str | None = None,
        now: int | None = None,
        **options: Any,
    ) -> Job:
        """Make ``type`` recurring on ``cron`` (replacing its schedule); returns the next run.

        Five fields, or six with seconds first; ``timezone`` defaults to UTC.  The
        tag defaults to ``cron:<type>``: one pending row per schedule.
        """
        try:
            check_cron(cron, timezone)
        except ValueError as e:
            raise ValueError(f"cannot schedule {type!r}: {e}") from e
        now = self.now() if now is None else now
        tag = tag or f"cron:{type}"
        store = self._store()
        with store.transaction():
            due = first_free_cron_slot(store, tag, cron, timezone, now)
            row = self._new_row(type, data, at=due / 1000, tag=tag, cron=cron, timezone=timezone, now=now, **options)
            return store.insert(row, "replace")

    def unschedule_cron(self, type: str, *, tag: str | None = None, now: int | None = None) -> bool:
        """Stop a recurring job: cancel its pending row.  False if it had none."""
        now = self.now() if now is None else now
        store = self._store()
        with store.transaction():
            return (
                store.cancel_pending(now, "unscheduled", default_keep_ms(succeeded=False), tag=tag or f"cron:{type}")
                > 0
            )

    def enqueue_many(
        self, jobs: Iterable[tuple[str, Mapping[str, Any] | None] | Mapping[str, Any]], **options: Any
    ) -> list[Job]:
        """Schedule many jobs in one transaction: all or none.

        Each item is ``(type, data)`` or a mapping of ``enqueue`` arguments
        (``{"type": ..., "data": ..., "delay": ...}``); ``options`` apply to all.
        """
        items = list(jobs)
        if options.get("tag") is None and all(type(item) is tuple for item in items):
            return self._enqueue_uniform(cast(list[tuple[str, Any]], items), options)  # the common case, made fast
        rows = []
        for item in items:
            arguments = dict(options)
            if isinstance(item, Mapping):
                arguments.update(item)
            else:
                arguments["type"], arguments["data"] = item
            rows.append(self._new_row(arguments.pop("type"), arguments.pop("data", None), **arguments))
        store = self._store()
        with store.transaction():
            return [store.insert(row) for row in rows]

    def _enqueue_uniform(self, items: list[tuple[str, Any]], options: dict[str, Any]) -> list[Job]:
        """``(type, data)`` items sharing ``options``: one INSERT of a JSON array.

        Only type, data and queue differ from row to row; SQLite takes them from
        one JSON text and the shared columns as parameters, instead of binding
        16 parameters per row: several times the rate of executemany (bench/README.md).
        """
        now = self.now() if options.get("now") is None else options["now"]
        shared: dict[str, dict[str, Any]] = {}  # job type -> its row, validated once per type
        batch = []
        for job_type, data in items:
            row = shared.get(job_type) if isinstance(job_type, str) else None
            if row is None:  # _new_row checks the type (and the options) once per type
                row = shared[job_type] = self._new_row(job_type, None, **{**options, "now": now})
            batch.append((job_type, job_data(data), row["queue"]))
        if not batch:
            return []
        try:
            payload = JSON.encode(batch)
        except (TypeError, ValueError):
            for number, (_, data, _) in enumerate(batch):
                try:
                    encode_data(data)
                except InvalidJobData as e:
                    raise InvalidJobData(f"item {number}: {e}") from e
            raise
        any_row = next(iter(shared.values()))  # all columns after queue are the same in every row
        store = self._store()
        with store.transaction():
            ids = store.insert_uniform(any_row, payload)
        # Positional arguments: keywords would double the cost of each Job.
        shared_job = _new_job(0, any_row)
        rest = tuple(getattr(shared_job, field) for field in COLUMNS[5:])  # the fields after queue
        pending = Status.PENDING.value  # looked up once: an enum member's .value is a descriptor call per row
        return [
            Job(id, job_type, dict(data), pending, queue, *rest)
            for id, (job_type, data, queue) in zip(ids, batch, strict=True)
        ]

    def get(self, id: int) -> Job | None:
        """The row with this id, or None."""
        return self._store().get(id)

    def cancel(self, id: int, *, reason: str = "cancelled", by: str | None = None, now: int | None = None) -> bool:
        """Cancel a pending job, or ask the worker of a running one to stop it (within about a second it sets the
        job's ``ctx.cancelled``, and the row ends ``cancelled``); False when it has ended, or was asked already.

        ``by`` names who asked (default: this user at this host), kept in the row.
        """
        now = self.now() if now is None else now
        store = self._store()
        with store.transaction():
            if store.cancel_pending(now, reason, default_keep_ms(succeeded=False), id=id) == 1:
                return True
            return store.request_cancel(id, now, by or _who_asks())

    def cancel_type(self, type: str, *, reason: str | None = None, now: int | None = None) -> int:
        """Cancel every pending job of a type (one no worker will ever run: a typo, a removed job); how many."""
        now = self.now() if now is None else now
        reason = reason or f"cancelled: every pending {type!r} job"
        store = self._store()
        with store.transaction():
            return store.cancel_pending(now, reason, default_keep_ms(succeeded=False), type=type)

    def pause(self, queue: str, *, now: int | None = None) -> QueueControl:
        """Stop every worker claiming from ``queue`` (at its next claim); running jobs finish.  Kept in the database."""
        return self._control(queue, {"paused": True}, now)

    def resume(self, queue: str, *, now: int | None = None) -> QueueControl:
        """Let workers claim from a paused ``queue`` again (they are woken at once)."""
        return self._control(queue, {"paused": False}, now)

    def limit(
        self, queue: str, *, running: int | EllipsisType | None = ..., per_second: float | EllipsisType | None = ...,
        now: int | None = None,
    ) -> QueueControl:  # fmt: skip
        """Limit ``queue``, across every worker: at most ``running`` jobs at once (claimed ahead included), at most
        ``per_second`` starts a second; None clears a limit, and one not given stays as it is."""
        changes: dict[str, Any] = {}
        if running is not ...:
            if running is not None:
                _check_integer(running, "running", 1, MAX_COUNT)
            changes["max_running"] = running
        if per_second is not ...:
            if per_second is not None and (
                isinstance(per_second, bool) or not isinstance(per_second, int | float) or not 0 < per_second <= 1000
            ):
                raise ValueError(f"per_second must be a number above 0 and at most 1000, not {per_second!r}")
            changes["per_second"] = None if per_second is None else float(per_second)
        if not changes:
            raise ValueError("give running, per_second, or both (None clears one)")
        return self._control(queue, changes, now)

    def controls(self) -> list[QueueControl]:
        """Every queue that has a control (paused, or limited), by name."""
        return self._store().queue_controls()

    def _control(self, queue: str, changes: dict[str, Any], now: int | None) -> QueueControl:
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"a queue is a non-empty name, not {queue!r}")
        now = self.now() if now is None else now
        store = self._store()
        with store.transaction():
            return store.control_queue(queue, now, changes)

    def retry(self, id: int, *, now: int | None = None) -> Job | None:
        """Run a failed or cancelled job again now, as a new row in its chain; None if it can't be.

        Only the newest row of a chain is retried (one that nothing was
        rescheduled from).  A recurring run is retried once, outside its schedule.
        """
        now = self.now() if now is None else now
        store = self._store()
        with store.transaction():
            return store.manual_retry(id, now)

    def retry_failed(self, *, type: str | None = None, now: int | None = None) -> list[Job]:
        """Retry every failed job (of one type) whose chain ended in failure."""
        ids = self._store().retryable_failed(type)
        return [retried for id in ids if (retried := self.retry(id, now=now)) is not None]

    def prune(self, *, now: int | None = None, dry_run: bool = False, batch_size: int = PRUNE_BATCH_SIZE) -> int:
        """Delete finished rows whose ``remove_at`` has passed; returns how many (would) go.

        Pending, running and persistent rows are never removed.  Deletes run in
        short transactions of ``batch_size`` rows, pausing between them at least
        as long as each took, so workers keep claiming while a big prune runs.
        """
        now = self.now() if now is None else now
        store = self._store()
        if dry_run:
            return store.prunable(now)
        removed = 0
        while True:
            started = time.monotonic()
            with store.transaction():
                deleted = store.prune(now, batch_size)
                if removed == 0:  # the per-minute counts are kept for a day
                    store.forget_counts_before(now - DAY_MS)
            removed += deleted
            if deleted < batch_size:
                return removed
            time.sleep(max(0.001, time.monotonic() - started))

    def maintain(self) -> str | None:
        """The database's upkeep (PostgreSQL without autovacuum: VACUUM the worker's tables); what was done."""
        return self._store().maintain()

    def _new_row(
        self,
        type: str,
        data: Mapping[str, Any] | None,
        *,
        delay: Seconds | None = None,
        at: datetime | float | None = None,
        priority: int = 0,
        persistent: bool = False,
        tag: str | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        now: int | None = None,
        options: JobOptions | None = None,
        **policy: Any,
    ) -> dict[str, Any]:
        """The INSERT parameters of one row (and its data, for the Job returned).

        Its policy is ``options``, or else made from ``policy``, JobOptions.of's keywords.
        """
        if not isinstance(type, str) or not type:
            raise UnknownJobType(f"job type must be a non-empty string, not {type!r}")
        job_type = REGISTRY.get(type)
        if job_type is None and self.check_types:
            raise UnknownJobType(
                f"unknown job type {type!r} (registered: {', '.join(sorted(REGISTRY)) or 'none'};"
                " import the module that defines it, or pass check_types=False)"
            )
        if delay is not None and at is not None:
            raise ValueError("give delay or at, not both")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise ValueError(f"tag must be a non-empty string, not {tag!r}")
        _check_integer(priority, "priority", -MAX_INTEGER - 1, MAX_INTEGER)
        options = JobOptions.of(**policy) if options is None else options
        now = self.now() if now is None else now
        due = epoch_ms(at) if at is not None else now + (_optional_ms(delay, "delay") or 0)
        if not MIN_TIME_MS <= due <= MAX_TIME_MS:
            raise ValueError(f"the job would be due {'after 9999' if due > 0 else 'before year 1'} (due {due} ms)")
        return {
            "type": type,
            "data": encode_data(data),
            "data_object": dict(data or {}),  # for the returned Job; not a column
            "queue": options.queue or (job_type and job_type.queue) or "default",
            "priority": priority,
            "due": due,
            "tag": tag,
            "cron_schedule": cron,
            "cron_timezone": timezone,
            "cron_slot": due if cron else None,
            "created_at": now,
            **options.columns(),
            "persistent": int(bool(persistent)),
        }


class AsyncQueue:
    """The producer side for async web apps (FastAPI, Starlette, aiohttp): Queue's verbs, awaited, never blocking
    the event loop.

    ``AsyncQueue(path or URL)`` runs a Queue of its own on one thread of its
    own (one connection: enqueues from many requests take turns, as SQLite's
    writers do anyway).  ``AsyncQueue(conn)``, on a psycopg AsyncConnection,
    enqueues on the app's connection inside the app's own transaction, so a
    job commits or rolls back with the app's writes (only ``enqueue`` and
    ``enqueue_many`` there).  SQLite's drivers have no async connection of the
    standard library's: enqueue in an app's SQLite transaction with the sync
    ``Queue(conn)`` on the connection that transaction is on.
    """

    def __init__(self, db: str | os.PathLike[str] | Any, *, check_types: bool = True) -> None:
        self.check_types = check_types
        self._queue: Queue | None = None
        if isinstance(db, str | os.PathLike):
            self.path: str | None = database_target(os.fspath(db))
            self._thread: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="worker-enqueue"
            )
            self._caller_store: Any = None
        elif type(db).__module__.startswith("psycopg"):
            self.path, self._thread = None, None
            self._caller_store = postgres_module().async_store_in_callers_transaction(db)
            self._rows = _RowsOnly(check_types=check_types)
        else:
            raise TypeError(
                f"AsyncQueue takes a path, a URL or a psycopg AsyncConnection, not {type(db)!r}"
                " (in a transaction of a sync connection, enqueue with Queue(conn))"
            )

    async def __aenter__(self) -> AsyncQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_thread(self, call: Callable[[Queue], _T]) -> _T:
        """``call(queue)`` on this AsyncQueue's thread, where its Queue (and so its connection) lives."""
        if self._thread is None:
            raise TypeError("on an app's connection, AsyncQueue only enqueues (enqueue, enqueue_many)")

        def on_thread() -> _T:
            if self._queue is None:
                assert self.path is not None
                self._queue = Queue(self.path, check_types=self.check_types)
            return call(self._queue)

        return await asyncio.get_running_loop().run_in_executor(self._thread, on_thread)

    async def enqueue(self, type: str, data: Mapping[str, Any] | None = None, **options: Any) -> Job:
        """Queue.enqueue, awaited (the same options); on an app's AsyncConnection, in its transaction."""
        if self._caller_store is None:
            return await self._on_thread(lambda queue: queue.enqueue(type, data, **options))
        on_conflict = options.pop("on_conflict", "replace")
        if options.get("now") is None:
            options["now"] = await self._caller_store.now()
        row = self._rows._new_row(type, data, **options)
        job: Job = await self._caller_store.insert(row, on_conflict)
        return job

    async def enqueue_many(
        self, jobs: Iterable[tuple[str, Mapping[str, Any] | None] | Mapping[str, Any]], **options: Any
    ) -> list[Job]:
        """Queue.enqueue_many, awaited: all or none."""
        if self._caller_store is None:
            items = list(jobs)
            return await self._on_thread(lambda queue: queue.enqueue_many(items, **options))
        calls = []
        for item in jobs:
            arguments = (
                {**options, **item} if isinstance(item, Mapping) else {**options, "type": item[0], "data": item[1]}
            )
            calls.append(arguments)
        # One savepoint each, in the app's transaction: the app's rollback takes them all back.
        return [
            await self.enqueue(arguments.pop("type"), arguments.pop("data", None), **arguments) for arguments in calls
        ]

    async def get(self, id: int) -> Job | None:
        """Queue.get, awaited."""
        return await self._on_thread(lambda queue: queue.get(id))

    async def cancel(self, id: int, *, reason: str = "cancelled", by: str | None = None) -> bool:
        """Queue.cancel, awaited: a pending job is cancelled, a running one asked to stop."""
        return await self._on_thread(lambda queue: queue.cancel(id, reason=reason, by=by))

    async def close(self) -> None:
        """Close this AsyncQueue's connection and thread (an app's connection is left open)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._queue is not None:
            await asyncio.get_running_loop().run_in_executor(thread, self._queue.close)
        thread.shutdown(wait=False)


class _RowsOnly(Queue):
    """Queue's checks and rows without a connection of its own: AsyncQueue's on an app's AsyncConnection, which
    gives every row its ``now`` (the server's time)."""

    def __init__(self, *, check_types: bool) -> None:  # no super().__init__(): nothing to connect to
        self.check_types = check_types
        self.path, self._caller_store = None, None

    def now(self) -> int:
        raise AssertionError("AsyncQueue gives each row its time")


def _dbapi_connection(db: Any) -> Any:
    """The DB-API connection under Django's connection or SQLAlchemy's Session, Connection or pooled proxy.

    Duck-typed, so that neither is ever imported here; anything else is returned as it is.
    """
    # django.db.connection is a proxy (django.utils.connection) to this thread's wrapper (django.db.backends...).
    django_module = type(db).__module__.startswith(("django.db.backends.", "django.utils.connection"))
    if django_module and callable(getattr(db, "ensure_connection", None)):
        db.ensure_connection()  # Django's connection wrapper: the sqlite3 connection it wraps
        return db.connection
    if not type(db).__module__.startswith("sqlalchemy."):
        return db
    if callable(getattr(db, "get_bind", None)) and callable(getattr(db, "connection", None)):
        db = db.connection()  # a Session: its Connection, in the session's transaction
    if callable(getattr(db, "in_transaction", None)) and callable(getattr(db, "begin", None)):
        if not db.in_transaction():
            db.begin()  # a Connection begins as its own execute() would, for its commit() to end
        db = db.connection  # the pool's proxy of the DB-API connection
    return getattr(db, "dbapi_connection", db)


def _new_job(id: int, row: dict[str, Any]) -> Job:
    """The Job of a row just inserted (its data is the caller's, copied, not parsed back)."""
    return Job(
        id=id,
        type=row["type"],
        data=row["data_object"],
        queue=row["queue"],
        priority=row["priority"],
        due=row["due"],
        tag=row["tag"],
        cron_schedule=row["cron_schedule"],
        cron_timezone=row["cron_timezone"],
        cron_slot=row["cron_slot"],
        created_at=row["created_at"],
        max_attempts=row["max_attempts"],
        retry_delay_ms=row["retry_delay_ms"],
        backoff=row["backoff"],
        timeout_ms=row["timeout_ms"],
        keep_ms=row["keep_ms"],
        persistent=bool(row["persistent"]),
    )


def _who_asks() -> str:
    """The user and host of this process, as the one who asks to cancel a running job."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def default_keep_ms(*, succeeded: bool) -> int:
    """How long finished rows stay: WORKER_KEEP_SUCCEEDED / WORKER_KEEP_FAILED seconds, else 7 / 30 days."""
    variable, default = ("WORKER_KEEP_SUCCEEDED", KEEP_SUCCEEDED) if succeeded else ("WORKER_KEEP_FAILED", KEEP_FAILED)
    raw = os.environ.get(variable)
    if not raw:
        return to_ms(default)
    try:
        keep = float(raw)
    except ValueError:
        keep = -1
    if not 0 <= keep <= MAX_DURATION_MS / 1000:  # NaN too
        raise ConfigError(f"invalid {variable}={raw!r}: must be seconds, 0 to 100 years")
    return to_ms(keep)


def now_ms() -> int:
    """The current time as integer epoch milliseconds."""
    return time.time_ns() // 1_000_000


# One encoder for all: json.dumps() with options builds a new encoder per call.
# allow_nan=False: NaN and Infinity are not JSON, and SQLite would store null.
JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def job_data(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Job data as a dict with string keys (not yet checked to be JSON); else InvalidJobData."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidJobData(f"job data must be a JSON object (a dict), not {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise InvalidJobData(f"job data keys must be strings, got {key!r}")
    return data if type(data) is dict else dict(data)


def encode_data(data: Mapping[str, Any] | None) -> str:
    """Job data as JSON text; InvalidJobData unless it is a JSON object."""
    try:
        return JSON.encode(job_data(data))
    except (TypeError, ValueError) as e:
        raise InvalidJobData(f"job data is not JSON-serialisable: {e}") from e


def encode_result(value: Any) -> str:
    """A job's return value as JSON text (TypeError/ValueError if it has none)."""
    return "null" if value is None else JSON.encode(value)


# --- The store interface ----------------------------------------------------------


class Store(Protocol):
    """What Queue and Worker ask of their database: the transitions of a row, each with the fence that makes it safe.

    A verb runs inside the caller's write transaction (``transaction()``) and
    changes a row only while the fence it names holds: ``..._if_owned`` only
    while the row is running under that owner, so a worker that lost its lease
    (rescued, given back, timed out) changes nothing.  The SQLite store is
    below; a store for another database implements the same verbs, and
    test_store_contract.py holds each store to them.
    """

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A write transaction, all or nothing, with the write lock taken at its start."""
        ...

    def savepoint(self) -> contextlib.AbstractContextManager[Any]:
        """Inside ``transaction()``: a part that may fail alone, undone without undoing the rest.

        (PostgreSQL aborts a whole transaction at its first failed statement.)
        """
        ...

    def now(self) -> int:
        """The time that leases are judged by, in epoch ms (the SQLite store's is its worker's own clock)."""
        ...

    def close(self) -> None:
        """Close its connections."""
        ...

    def replaced(self) -> str | None:
        """Why the target now names another database than the one this store opened (a file replaced); or None."""
        ...

    def repair_schema(self) -> bool:
        """Re-create the worker's tables, indexes or triggers that were dropped by hand; whether any were."""
        ...

    def missing_schema(self) -> list[str]:
        """The names of the worker's tables, indexes and triggers that are not there (``worker check``)."""
        ...

    # Producing rows (Queue)

    def insert(self, row: dict[str, Any], on_conflict: str = "replace") -> Job:
        """Insert one row under the tag rule (one pending row per tag): ``replace`` or ``ignore`` the pending one."""
        ...

    def insert_uniform(self, shared: Mapping[str, Any], rows: str) -> list[int]:
        """Insert untagged rows alike but for type, data and queue (a JSON array of those); their ids, in order."""
        ...

    def cancel_pending(
        self, now: int, reason: str, keep_ms: int, *, id: int | None = None, tag: str | None = None,
        type: str | None = None,
    ) -> int:  # fmt: skip
        """Cancel the pending row of this id, or the pending rows of this tag or type; how many (pending only)."""
        ...

    def request_cancel(self, id: int, now: int, by: str) -> bool:
        """Ask the worker running row ``id`` to cancel it (it reads cancel_requests); False if it is not running,
        or was asked already."""
        ...

    def cancel_requests(self, owner: str) -> list[tuple[int, int, str | None]]:
        """(id, when, by whom) of the rows running under ``owner`` that someone asked to cancel."""
        ...

    def write_progress_if_owned(self, owner: str, progress: Iterable[tuple[int, str]]) -> None:
        """Store each (id, progress JSON) in its row while ``owner`` runs it."""
        ...

    def manual_retry(self, id: int, now: int) -> Job | None:
        """Insert the next attempt of a failed or cancelled row that ends its chain; None if it is not one."""
        ...

    def retryable_failed(self, type: str | None) -> list[int]:
        """The ids of the failed rows (of one type) that end their chain."""
        ...

    def get(self, id: int) -> Job | None:
        """The row with this id, or None."""
        ...

    def prune(self, now: int, batch_size: int) -> int:
        """Delete up to ``batch_size`` finished, non-persistent rows whose remove_at has passed; how many."""
        ...

    def prunable(self, now: int) -> int:
        """How many rows ``prune`` would delete."""
        ...

    def forget_counts_before(self, before: int) -> None:
        """Drop the per-minute counts of finished rows older than ``before``."""
        ...

    def maintain(self) -> str | None:
        """The upkeep the database needs and would not get otherwise (the hourly job runs it); what was done."""
        ...

    # Claiming, and ending what was claimed (fenced on the owner)

    def claim(
        self, owner: str, worker: str, now: int, lease_until: int, limit: int, types: str, held: Container[int],
        *, suspect: bool = False,
    ) -> tuple[list[Job], list[tuple[Job, str]]]:  # fmt: skip
        """Take up to ``limit`` due pending rows for ``owner``, leased until ``lease_until``; no row twice, ever.

        Only rows of ``types`` (a JSON array) in the store's queues, highest
        priority first, then oldest due; ``suspect`` takes only rows whose
        chain killed a worker, otherwise only the others.  Returns the jobs and
        the rows taken that cannot be read (each with why; ``held`` are rows the
        owner held before, not to be returned again), which the caller fails.
        """
        ...

    def queue_controls(self) -> list[QueueControl]:
        """Every queue's controls (worker_queues), by queue name."""
        ...

    def at_running_limit(self) -> bool:
        """Whether the last claim left a queue at its running limit (a job of it ending frees a place)."""
        ...

    def control_queue(self, queue: str, now: int, changes: Mapping[str, Any]) -> QueueControl:
        """Set paused / max_running / per_second on a queue (None clears a limit); its controls after."""
        ...

    def any_suspect(self) -> bool:
        """Whether a pending row's chain has already killed a worker (deaths > 0): such a row is claimed alone."""
        ...

    def next_due(self, types: str) -> int | None:
        """The earliest due time of a pending row of ``types`` in the store's queues (None: no such row)."""
        ...

    def finish_if_owned(
        self, id: int, owner: str, status: str, now: int, result: str | None, error: str | None,
        started: int | None, keep_ms: int,
    ) -> bool:  # fmt: skip
        """End the row (``succeeded`` or ``failed``) if it is running under ``owner``; whether it was.

        ``result`` is JSON text; ``started`` is when the function was called
        (None: the claim's time stands); the row is removable ``keep_ms``
        after, unless it says otherwise (its own keep_ms, persistent).
        """
        ...

    def finish_many_if_owned(
        self, owner: str, now: int, outcomes: Iterable[tuple[int, str, str | None, str | None, int | None, int]]
    ) -> set[int]:
        """``finish_if_owned`` for each (id, status, result, error, started, keep_ms); the ids that were owned."""
        ...

    def give_back_if_owned(self, id: int, owner: str, now: int) -> str | None:
        """Make the row pending again, unclaimed, if it is running under ``owner``; its status then, or None if
        it was not.

        Under the tag rule: when a newer pending row holds its tag (enqueued
        or scheduled while this one ran), that one is the job, as an enqueue
        with the tag would have made it, and this row ends ``cancelled``.
        """
        ...

    def schedule_next_attempt(self, id: int, *, due: int, deaths: int, now: int) -> int | None:
        """Insert the next attempt of row ``id`` (its policy and cron slot copied), unless a pending row holds its tag.

        The new row's id, or None when the tag was taken.
        """
        ...

    def schedule_snooze_if_owned(self, id: int, owner: str, *, due: int, now: int) -> int | None:
        """Insert the row that a snooze of row ``id`` asks for (same attempt, one more snooze), if ``owner`` still
        runs it and no pending row holds its tag; the new id, or None."""
        ...

    def snoozes(self, id: int) -> int:
        """How often the chain of row ``id`` has snoozed so far."""
        ...

    def schedule_next_cron_run(self, id: int, *, due: int, now: int) -> int | None:
        """Insert the run of row ``id``'s schedule at slot ``due`` (a new chain), unless a pending row holds its tag.

        The new row's id, or None when the tag was taken.
        """
        ...

    def count_finished(self, finished: Iterable[tuple[int, str, str]]) -> None:
        """Add rows just finished, as (finished ms, queue, status), to the per-minute counts ``status`` reads."""
        ...

    # Leases and processes

    def renew_leases(self, owner: str, lease_until: int) -> None:
        """Extend to ``lease_until`` the lease of every row running under ``owner``."""
        ...

    def expired_leases(self, owner: str, now: int) -> tuple[list[Job], list[tuple[Job, str]]]:
        """Running rows whose lease ended before ``now``, not ``owner``'s (it is alive); unreadable ones apart.

        A running row with no lease at all counts as expired long ago.
        """
        ...

    def rescue_if_expired(self, id: int, now: int, error: str, keep_ms: int) -> bool:
        """Fail the row (its worker was lost) if it is still running with its lease ended; whether it was."""
        ...

    def register_process(self, process: Mapping[str, Any], now: int) -> None:
        """Record a worker process as started and alive now; forget the processes gone for a day."""
        ...

    def process_alive(self, owner: str, running: int, now: int) -> None:
        """Record that the process ``owner`` is alive now and runs ``running`` jobs."""
        ...

    def forget_process(self, owner: str) -> None:
        """Remove the process's row (it stopped), and those of processes gone for a day."""
        ...

    # A recurring job's rows

    def pending_with_tag(self, tag: str) -> Job | None:
        """The pending row of this tag, or None."""
        ...

    def cron_run_running(self, tag: str, cron: str, timezone: str | None) -> bool:
        """Whether a run of this very schedule is running now."""
        ...

    def last_cron_slot(self, tag: str) -> int | None:
        """The newest slot a run of this schedule has had, or None."""
        ...

    # What the operating tools read (status, jobs, show, the dashboard)

    def describe(self) -> dict[str, Any]:
        """``database`` (never a password), ``schema_version``, and ``engine``: the database and its state, one line."""
        ...

    def pending_by_queue(self, now: int) -> list[tuple[str, int, int, int | None]]:
        """Per queue: pending rows due by ``now``, due later, and the oldest due time of the first kind."""
        ...

    def running_by_queue(self) -> list[tuple[str, int]]:
        """Per queue: running rows."""
        ...

    def finished_by_queue(self, since: int) -> list[tuple[str, str, int]]:
        """Per queue and status: rows finished since ``since`` (from the per-minute counts: the whole minute)."""
        ...

    def finished_by_minute(self, since: int) -> list[tuple[int, str, int]]:
        """Per minute (its first ms) and status, all queues together: rows finished since ``since``'s minute."""
        ...

    def running_by_owner(self) -> dict[str, int]:
        """Per claim token (a worker process's id): running rows, jobs claimed ahead included."""
        ...

    def processes(self) -> list[dict[str, Any]]:
        """The registered worker processes (PROCESS_COLUMNS and ``types``, as stored), oldest first."""
        ...

    def cron_schedules(self) -> list[tuple[Job, Job | None]]:
        """Each recurring job's pending row, with its last run that started (None if none), soonest first."""
        ...

    def unrunnable(self, known: list[str]) -> list[tuple[str, int, int]]:
        """Per type not in ``known``: pending rows and the oldest due time."""
        ...

    def jobs(self, *, status: str | None, type: str | None, queue: str | None, limit: int) -> list[Job]:
        """Up to ``limit`` rows, newest first, of this status, type and queue (None: any), read as read_job does."""
        ...

    def chain(self, id: int, *, reach: int) -> list[Job]:
        """The rows the job came from and led to (at most ``reach`` each way), oldest first, read as read_job does."""
        ...

    def retried_as(self, ids: list[int]) -> dict[int, int]:
        """For each of these rows that was retried (a later attempt points back to it), the id of that attempt."""
        ...

    def progress_of(self, ids: list[int]) -> dict[int, str]:
        """For each of these rows that reported progress, its latest (the JSON text ctx.progress wrote)."""
        ...


class WakeUp(Protocol):
    """How an idle worker learns that another process committed: a seam of its own, beside the store.

    SQLite's watches the ``-wal`` file and reads PRAGMA data_version; another
    database brings its own (PostgreSQL: LISTEN on a connection of its own).
    """

    pushes: bool  # whether start() got a watch that calls ``wake``; else the worker polls

    def start(self, wake: Callable[[], None]) -> None:
        """Begin calling ``wake`` (from a thread of its own) when another process commits, where it can."""

    def arm(self, armed: bool) -> None:
        """Call ``wake`` only while armed, and once: an idle worker wants it (and arms it again after each look
        that finds it still idle), a busy one would only pay for it."""

    def changed(self) -> bool:
        """Cheap, no disk read: did any other connection commit since the last call?"""

    def forget_connection(self) -> None:
        """The worker closed its connection; ``changed`` uses the next one."""

    def stop(self) -> None:
        """End the watch."""


# --- The SQLite store: connecting, the schema, transactions -------------------------


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open an existing database only to read it (status, jobs, show, the dashboard)."""
    path = sqlite_path(os.fspath(path))
    if not Path(path).is_file():
        raise DatabaseUnusable(f"cannot open database {path}: no such file")
    try:
        conn = _open(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        version = installed_schema_version(conn)
    except sqlite3.Error as e:
        raise DatabaseUnusable(f"cannot use database {path}: {e}") from e
    if version != schema_version():
        raise DatabaseUnusable(f"database {path} has schema version {version}, not {schema_version()}: run the worker")
    # Another program may have stored text that is not UTF-8: show its bytes escaped rather than fail to read it.
    conn.text_factory = _text_as_stored
    return conn


def _text_as_stored(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open the database for writing in WAL mode; DatabaseUnusable if it can't be.

    The engine uses the standard library's sqlite3, the same SQLite library the
    app and its jobs use: two copies of SQLite in one process (say apsw's and
    the stdlib's) each take POSIX locks on the file, and closing either one's
    file drops the other's locks, which can corrupt the database.
    """
    path = sqlite_path(os.fspath(path))
    schema_text()  # a worker without its table definition must not leave an empty file behind
    if path != ":memory:" and not path.startswith("file:"):
        directory = Path(path).resolve().parent
        if not directory.is_dir():
            raise DatabaseUnusable(f"cannot open database {path}: directory {directory} does not exist")
        # SQLite opens a file it may not write read-only and says so only at the
        # first write (mid-job), so ask first.  access(), not open(): closing any
        # descriptor of the file would drop the POSIX locks SQLite holds on it.
        if Path(path).exists() and not os.access(path, os.W_OK):
            raise DatabaseUnusable(f"cannot use database {path}: it is read-only")
    try:
        conn = _open(path, uri=path.startswith("file:"))
        mode = _scalar(conn, "PRAGMA journal_mode = WAL")
        if mode != "wal" and path != ":memory:":
            raise DatabaseUnusable(f"cannot use database {path}: WAL mode refused (journal mode {mode})")
        # NORMAL in WAL mode: a power cut may lose the last commits, never
        # corrupts; FULL (WORKER_SYNCHRONOUS=FULL) syncs every commit instead.
        conn.execute(f"PRAGMA synchronous = {synchronous_setting()}")
        # Once a checkpoint has caught up, cut the WAL file back to this size:
        # otherwise it keeps the size a long-lived reader once made it grow to.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        # Checkpoint when the WAL holds about that much, not SQLite's 4 MiB: a
        # quarter as many checkpoints (each one syncs), and the pages that every
        # job touches are copied once per checkpoint (bench/README.md has the gain).
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as e:
        kind = DatabaseBusy if isinstance(engine_error(e), DatabaseBusy) else DatabaseUnusable
        raise kind(f"cannot use database {path}: {e}") from e
    return conn


def synchronous_setting() -> str:
    """WORKER_SYNCHRONOUS: NORMAL (default) or FULL."""
    value = os.environ.get("WORKER_SYNCHRONOUS", "NORMAL").upper() or "NORMAL"
    if value not in ("NORMAL", "FULL"):
        raise ConfigError(f"invalid WORKER_SYNCHRONOUS={value!r} (use NORMAL or FULL)")
    return value


def _open(target: str, *, uri: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write transaction
    # here is an explicit BEGIN IMMEDIATE.  Each connection is used by one
    # thread at a time (the worker's main loop, or one Queue thread).
    return sqlite3.connect(
        target,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
        uri=uri,
        cached_statements=256,
    )


# SQLite's primary result codes that mean "try again later", not "this is wrong".
# PROTOCOL: a transaction that lost the race for the WAL's locks again and again, among many writers, gives up
# as it begins, having written nothing (SQLite's docs): busy, as far as the worker is concerned.
LOCKED_ERRORS = {5: "busy", 6: "locked", 15: "protocol"}
TRANSIENT_ERRORS = {**LOCKED_ERRORS, 10: "I/O error", 13: "disk full"}


def engine_error(error: sqlite3.Error) -> DatabaseError:
    """The engine's own error for a sqlite3 one, which stays its cause: busy, transient, or neither."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if code in LOCKED_ERRORS:
        kind: type[DatabaseError] = DatabaseBusy
    else:
        kind = DatabaseUnavailable if code in TRANSIENT_ERRORS else DatabaseError
    translated = kind(str(error))
    translated.__cause__ = error
    return translated


class _InEngineErrors:
    """A transaction of the SQLite store's, whose sqlite3 errors (in it, or beginning or ending it) leave as the
    engine's."""

    __slots__ = ("inner",)

    def __init__(self, inner: contextlib.AbstractContextManager[Any]) -> None:
        self.inner = inner

    def __enter__(self) -> Any:
        try:
            return self.inner.__enter__()
        except sqlite3.Error as e:
            raise engine_error(e) from e

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        try:
            self.inner.__exit__(kind, error, trace)
        except sqlite3.Error as e:  # COMMIT failed, or the block's own error raised again (a savepoint's)
            raise engine_error(e) from e
        if isinstance(error, sqlite3.Error):
            raise engine_error(error) from error


def _in_engine_errors(cls: type[_T]) -> type[_T]:
    """Wrap each public method of a SQLite store: a sqlite3 error leaves it as the engine's own (engine_error)."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(method) or name == "transaction":
            continue

        def translating(*args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            try:
                return __method(*args, **kwargs)
            except sqlite3.Error as e:
                raise engine_error(e) from e

        setattr(cls, name, functools.wraps(method)(translating))
    return cls


@functools.cache
def schema_text() -> str:
    """schema.sql, read once; DatabaseUnusable naming where it looked when it is not there."""
    for path in SCHEMA_FILES:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as e:
            raise DatabaseUnusable(f"cannot read the table definition {path}: {e.strerror or e}") from e
    looked = " or ".join(str(path) for path in SCHEMA_FILES)
    raise DatabaseUnusable(f"the table definition is missing: no {looked} (copy schema.sql beside worker.py)")


@functools.cache
def schema_sections() -> list[tuple[int, str]]:
    """The ``-- version N`` sections of schema.sql, in order."""
    text = schema_text()
    parts = re.split(r"^-- version (\d+)\s*$", text, flags=re.MULTILINE)
    return [(int(version), sql) for version, sql in zip(parts[1::2], parts[2::2], strict=True)]


def schema_version() -> int:
    """The schema version this code writes."""
    return schema_sections()[-1][0]


def apply_schema(conn: Any, *, transaction: Callable[[Any], Any] | None = None) -> int:
    """Create or upgrade the worker's tables to this code's version, and re-create any of its objects
    gone missing; idempotent.  Returns the version.

    ``transaction`` is how the DDL is wrapped: by default a write transaction of
    its own; Queue(conn) passes the savepoint that joins the caller's.
    """
    latest = schema_version()
    try:
        if installed_schema_version(conn) == latest and not missing_schema_objects(conn):
            return latest  # the common case needs no write lock
        with (transaction or immediate)(conn):
            for statement in schema_statements_after(installed_schema_version(conn)):
                conn.execute(statement)
            _restore_schema_objects(conn)
            conn.execute(RECORD_SCHEMA_VERSION_SQL, {"version": latest})
    except sqlite3.Error as e:
        translated = engine_error(e)
        if isinstance(translated, DatabaseUnavailable):
            raise translated from e
        raise DatabaseUnusable(f"cannot create the schema: {e}") from e
    return latest


RECORD_SCHEMA_VERSION_SQL = """
INSERT INTO worker_schema (id, version) VALUES (1, :version)
    ON CONFLICT (id) DO UPDATE SET version = excluded.version
"""


def schema_statements_after(version: int) -> list[str]:
    """The statements of the sections above ``version``, in order (what ``worker migrate`` applies)."""
    return [statement for number, sql in schema_sections() if number > version for statement in _statements(sql)]


def installed_schema_version(conn: Any) -> int:
    """The worker's schema version in this file: 0 for none; DatabaseUnusable when newer than this code.

    Kept in the table worker_schema, never in PRAGMA user_version: that one is
    the app's.  A file the worker set up before version 4 recorded its version
    in user_version; such a file is recognised by its tables instead, so the
    app's user_version is never read.
    """
    names = {row[0] for row in conn.execute(SCHEMA_OBJECTS_SQL)}
    recorded = _scalar(conn, "SELECT version FROM worker_schema WHERE id = 1") if "worker_schema" in names else None
    if recorded is not None:
        version = int(recorded)
    elif "worker_jobs" not in names:
        version = 0
    elif _scalar(conn, "SELECT count(*) FROM pragma_table_info('worker_jobs') WHERE name = 'progress'"):
        version = 9  # worker_schema, or its row, dropped by hand
    elif _scalar(conn, "SELECT count(*) FROM pragma_table_info('worker_jobs') WHERE name = 'snoozes'"):
        version = 8  # worker_schema, or its row, dropped by hand
    elif "worker_queues" in names:
        version = 7
    elif "worker_jobs_refuse_invalid" in names:
        version = 6
    elif _scalar(conn, "SELECT count(*) FROM pragma_table_info('worker_processes') WHERE name = 'types'"):
        version = 5
    elif "worker_finished_per_minute" in names:
        version = 3
    else:
        version = 1 if "worker_jobs_next_due" in names else 2  # version 2 dropped that index
    latest = schema_version()
    if version > latest:
        raise DatabaseUnusable(
            f"database schema version {version} is newer than this worker's ({latest}); upgrade the worker"
        )
    return version


SCHEMA_OBJECTS_SQL = """
SELECT name FROM sqlite_master
 WHERE name IN ('worker_schema', 'worker_jobs', 'worker_finished_per_minute', 'worker_jobs_next_due',
                'worker_jobs_refuse_invalid', 'worker_queues')
"""


@functools.cache
def _schema_objects() -> dict[str, tuple[str, str]]:
    """Name -> (type, CREATE statement) of every table, index and trigger that schema.sql makes, in order."""
    fresh = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for _, sql in schema_sections():
            for statement in _statements(sql):
                fresh.execute(statement)
        made = fresh.execute(
            "SELECT name, type, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite%'"
            " ORDER BY type <> 'table', rowid"
        )
        return {name: (kind, sql) for name, kind, sql in made}
    finally:
        fresh.close()


def missing_schema_objects(conn: sqlite3.Connection) -> list[str]:
    """The tables, indexes and triggers of schema.sql that the database lacks ("index worker_jobs_suspect")."""
    present = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    return [f"{kind} {name}" for name, (kind, _) in _schema_objects().items() if name not in present]


def _restore_schema_objects(conn: sqlite3.Connection) -> None:
    """Re-create, inside the caller's write transaction, what was dropped by hand (the code names some in SQL)."""
    present = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    for name, (kind, sql) in _schema_objects().items():
        if name not in present:
            conn.execute(sql)
            logger.warning("schema: %s %s was missing; re-created", kind, name)


def _statements(script: str) -> Iterator[str]:
    """The statements of a SQL script, one at a time (executescript would COMMIT first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip() and not all(line.strip().startswith("--") for line in pending.splitlines() if line.strip()):
        raise ValueError(f"incomplete SQL statement in schema.sql: {pending.strip()[:80]}")


# os.getpid() is a system call, and the worker checks its connection's process
# several times per job; the id only changes in a forked child.
_process_id = os.getpid()


def _forked() -> None:
    global _process_id  # one process-wide fact, reset only here
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_forked)


def immediate(conn: sqlite3.Connection) -> _Immediate:
    """A write transaction taken at once (BEGIN IMMEDIATE); rolled back on any error.

    Taking the write lock up front means a read-then-write can never fail with
    SQLITE_BUSY_SNAPSHOT halfway; waiting for the lock is bounded by busy_timeout.
    """
    return _Immediate(conn)


class _Immediate:
    # A class, not @contextlib.contextmanager: the worker takes one per job, and
    # the generator machinery cost a tenth of a job thread's time.
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        try:
            if kind is None:
                self.conn.execute("COMMIT")
        finally:
            if self.conn.in_transaction:  # an error in the block, or COMMIT failed
                self.conn.execute("ROLLBACK")


class ProducerLockWait:
    """How a Queue's writes wait for the SQLite write lock: as SQLite does, until one has had to wait.

    SQLite's own wait (busy_timeout) looks again after 1, 2, 5, 10, ... and
    then every 100 ms.  A worker busy with jobs of a few ms holds the lock most
    of the time, in spells of a fraction of a ms, so a web request's enqueue
    that looked that rarely waited hundreds of ms for a lock that was free
    every ms (bench/workloads.py, the priority job).  So once a write of this
    connection took long enough to have waited, its writes look every
    LOCK_LOOK_EVERY instead (for up to the busy timeout), until
    LOOK_OFTEN_UNTIL_FREE of them in a row found the lock free at once: an
    uncontended write costs nothing more, and a write slow for another reason
    (a checkpoint's sync) only a few looks.  Refused, such a statement (BEGIN
    IMMEDIATE, a lone INSERT) has written nothing, so it is simply run again.

    A worker's transactions (its store's BEGIN IMMEDIATE) wait the same way.
    Beside another worker process its steps come every few ms (a job thread
    running pure Python hands the GIL back every switch interval, 5 ms), and
    SQLite's waits of 5, 10, ... 100 ms, all multiples of that, kept meeting
    the other's commits: a worker's claim waited up to 1.6 s, its job thread
    idle, while the lock was free two thirds of the time (bench/README.md).
    """

    __slots__ = ("free_in_a_row",)

    def __init__(self) -> None:
        self.free_in_a_row = LOOK_OFTEN_UNTIL_FREE  # SQLite's own wait until a write takes long

    def execute(self, conn: sqlite3.Connection, sql: str, params: Any = ()) -> sqlite3.Cursor:
        """Run a statement that takes the write lock before anything else."""
        return self.attempt(conn, lambda: conn.execute(sql, params))

    def attempt(self, conn: sqlite3.Connection, write: Callable[[], _T]) -> _T:
        """Call ``write`` (which runs such a statement on ``conn``), again each time it is refused as busy."""
        if self.free_in_a_row < LOOK_OFTEN_UNTIL_FREE:
            return self._looking_often(conn, write)
        began = time.monotonic()
        try:
            return write()
        finally:
            if time.monotonic() - began > LOCK_WAITED:
                self.free_in_a_row = 0

    def _looking_often(self, conn: sqlite3.Connection, write: Callable[[], _T]) -> _T:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    written = write()
                    self.free_in_a_row += 1
                    return written
                except sqlite3.OperationalError as e:
                    if getattr(e, "sqlite_errorcode", 0) & 0xFF != 5 or time.monotonic() >= deadline:  # 5: BUSY
                        raise
                self.free_in_a_row = 0
                time.sleep(LOCK_LOOK_EVERY)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


class _ProducerImmediate:
    """A write transaction (``immediate()``) of a Queue or a worker, waiting for the lock as ProducerLockWait says.

    Each attempt is an ``immediate()`` of its own, looked up when made, so
    what wraps that (the crash points of test_reliability.py) wraps the one
    that takes the lock.
    """

    __slots__ = ("begun", "conn", "lock_wait")

    def __init__(self, conn: sqlite3.Connection, lock_wait: ProducerLockWait) -> None:
        self.conn, self.lock_wait = conn, lock_wait
        self.begun: contextlib.AbstractContextManager[sqlite3.Connection] | None = None

    def __enter__(self) -> sqlite3.Connection:
        return self.lock_wait.attempt(self.conn, self._begin)

    def _begin(self) -> sqlite3.Connection:
        begun = immediate(self.conn)
        conn = begun.__enter__()
        self.begun = begun
        return conn

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        assert self.begun is not None
        self.begun.__exit__(kind, error, trace)


def _file_identity(path: str | None) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at ``path`` (None for no path)."""
    if path is None:
        return None
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _scalar(conn: sqlite3.Connection, sql: str, params: Any = None) -> Any:
    """The first column of the first row (None when there is no row)."""
    row = conn.execute(sql, () if params is None else params).fetchone()
    return None if row is None else row[0]


def _is_apsw(conn: Any) -> bool:
    """A caller's apsw connection (accepted by Queue(conn); the engine itself uses sqlite3)."""
    return type(conn).__module__ == "apsw"


def _changes(conn: Any, cursor: Any) -> int:
    """Rows changed by the last statement, for stdlib sqlite3 and apsw alike."""
    return int(conn.changes() if _is_apsw(conn) else cursor.rowcount)


def _last_rowid(conn: Any, cursor: Any) -> int:
    return int(conn.last_insert_rowid() if _is_apsw(conn) else cursor.lastrowid)


# --- The SQLite store: its verbs ----------------------------------------------------


@contextlib.contextmanager
def _text_as_bytes(conn: sqlite3.Connection) -> Iterator[None]:
    """Read text columns as bytes: a text that is not UTF-8 can then be read, and named."""
    conn.text_factory = bytes
    try:
        yield
    finally:
        conn.text_factory = str


INSERT_COLUMNS = (
    "type data queue priority due tag cron_schedule cron_timezone cron_slot created_at max_attempts retry_delay_ms "
    "backoff timeout_ms keep_ms persistent"
).split()

# A new row copies its policy from the old one; clamped, so that a value written
# before the table refused it (schema version 4) is not refused in the copy.
COPIED_POLICY = (
    f"min(max_attempts, {MAX_COUNT}), min(retry_delay_ms, {MAX_DURATION_MS}), backoff,"
    f" min(timeout_ms, {MAX_DURATION_MS}), min(keep_ms, {MAX_DURATION_MS})"
)

# remove_at clamps keep_ms (see MAX_DURATION_MS): a row written before the
# table refused longer ones would otherwise overflow into a REAL.
REMOVE_AT = f"CASE WHEN persistent THEN NULL ELSE :now + min(coalesce(keep_ms, :keep_ms), {MAX_DURATION_MS}) END"

# Every write that finishes rows adds them here, in its own transaction (see
# schema.sql: `worker status` reads the last hour from these counts).
COUNT_FINISHED_SQL = """
INSERT INTO worker_finished_per_minute (minute, queue, status, count) VALUES (?, ?, ?, ?)
    ON CONFLICT DO UPDATE SET count = count + excluded.count
"""


def finished_per_minute(finished: Iterable[Iterable[Any]]) -> list[tuple[int, str, str, int]]:
    """Rows just finished, as (finished ms, queue, status), counted as (minute, queue, status, count)."""
    per_minute: dict[tuple[int, str, str], int] = {}
    for ms, queue, status in finished:
        key = (ms - ms % MINUTE_MS, queue, status)
        per_minute[key] = per_minute.get(key, 0) + 1
    return [(*key, count) for key, count in per_minute.items()]  # mostly one: a batch shares its minute


def cancel_key(*, id: int | None, tag: str | None, type: str | None) -> str:
    """Which of cancel_pending's keys chooses the rows: the id, else the tag, else the type."""
    for key, value in (("id", id), ("tag", tag), ("type", type)):
        if value is not None:
            return key
    raise TypeError("cancel_pending needs an id, a tag or a type")


def count_finished(conn: Any, finished: Iterable[Iterable[Any]]) -> None:
    """Add rows just finished, as (finished ms, queue, status), to worker_finished_per_minute."""
    for counted in finished_per_minute(finished):
        conn.execute(COUNT_FINISHED_SQL, counted)


@contextlib.contextmanager
def _savepoint(conn: Any) -> Iterator[Any]:
    # A savepoint nests inside the caller's transaction (and is one of its own
    # when there is none), so several statements are all or nothing.
    _begin_as_an_insert_would(conn)
    conn.execute("SAVEPOINT worker_enqueue")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK TO worker_enqueue")
        conn.execute("RELEASE worker_enqueue")
        raise
    conn.execute("RELEASE worker_enqueue")


def _begin_as_an_insert_would(conn: Any) -> None:
    """Open the transaction that the caller's own INSERT would open on this connection.

    The stdlib's sqlite3 in its default (legacy) mode opens a transaction only
    before INSERT, UPDATE or DELETE; a SAVEPOINT outside one would start a
    transaction of its own and commit at its RELEASE, so a job enqueued before
    the app's first write would outlive the app's rollback.  So open the
    implicit transaction here, as that INSERT would, for the caller's
    commit() or rollback() to end.  In autocommit mode (isolation_level=None
    with no BEGIN, or autocommit=True) and on apsw, an INSERT commits by
    itself, and so does the savepoint.
    """
    if not isinstance(conn, sqlite3.Connection) or conn.in_transaction or conn.isolation_level is None:
        return
    if getattr(conn, "autocommit", LEGACY_TRANSACTION_CONTROL) != LEGACY_TRANSACTION_CONTROL:
        return  # Python 3.12+: autocommit=True commits each statement; False is always in a transaction
    conn.execute(f"BEGIN {conn.isolation_level}")


LEGACY_TRANSACTION_CONTROL = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", -1)


class QueueControls:
    """Pause and limits of queues (worker_queues): the claim that honours them and the operators' writes, for
    every store.

    A store gives the SQL of its dialect (the ``*_SQL`` attributes, the claim
    variants in ``_claim_sqls``) and runs it with ``_run``.  The claim first
    runs its fast statement, which takes nothing while any queue has a control:
    with none (the common case) that is the whole cost.  Otherwise the
    controls are read (on PostgreSQL locked, so that concurrent claims count
    each other's rows), each controlled queue is claimed from up to what it
    allows, and the rest from every other queue.  The queues held back are
    kept for ``next_due``, which the worker calls next in the same transaction.
    """

    ALL_CONTROLS_SQL: ClassVar[str]
    RUNNING_IN_SQL: ClassVar[str]  # (queue, running rows) of the queues in :queues
    SET_NEXT_START_SQL: ClassVar[str]
    ENSURE_CONTROL_SQL: ClassVar[str]  # one queue's row, made if missing
    LOCK_CONTROL_SQL: ClassVar[str]
    UPDATE_CONTROL_SQL: ClassVar[str]
    DELETE_CONTROL_SQL: ClassVar[str]
    NOTIFY_SQL: ClassVar[str | None] = None  # wakes idle workers after a control changed, where commits do not
    _claim_sqls: dict[tuple[str, bool], str]  # (fast | queue | rest, suspect) -> the claim statement
    _controls_sql: str  # the controls of the store's queues, locked where concurrent claims need it
    _next_due_sql: str
    _next_due_except_sql: str  # next_due outside the queues in :controlled
    _queues_param: Any  # the store's queues (None: all), as it binds them
    _held_back: dict[str, int | None]  # queue -> released_at(), of the last claim
    _full = False  # whether the last claim left a queue at its running limit
    _had_controls = False  # whether the last claim found any

    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def _names(self, names: list[str]) -> Any:
        """A list of names as the store binds it."""
        raise NotImplementedError

    def _types_param(self, types: str) -> Any:
        """The worker's types (a JSON array) as the store binds them."""
        raise NotImplementedError

    def _claim_rows(
        self, kind: str, suspect: bool, params: dict[str, Any], held: Container[int]
    ) -> tuple[list[Job], list[tuple[Job, str]]]:
        raise NotImplementedError

    def _claim_params(
        self, owner: str, worker: str, now: int, lease_until: int, limit: int, types: str
    ) -> dict[str, Any]:
        raise NotImplementedError

    def claim(
        self, owner: str, worker: str, now: int, lease_until: int, limit: int, types: str, held: Container[int],
        *, suspect: bool = False,
    ) -> tuple[list[Job], list[tuple[Job, str]]]:  # fmt: skip
        self._held_back, self._full = {}, False
        params = self._claim_params(owner, worker, now, lease_until, limit, types)
        jobs: list[Job] = []
        unreadable: list[tuple[Job, str]] = []
        skipped_fast = self._had_controls  # then the fast statement would most likely take nothing again
        if not skipped_fast:
            jobs, unreadable = self._claim_rows("fast", suspect, params, held)
            if jobs or unreadable:
                return jobs, unreadable  # no queue had a control
        controls = [QueueControl.from_row(row) for row in self._run(self._controls_sql, params).fetchall()]
        self._had_controls = bool(controls)
        if not controls:
            return self._claim_rows("fast", suspect, params, held) if skipped_fast else (jobs, unreadable)
        claimed: set[int] = set()  # the SQLite store's re-read of unreadable rows sees every statement's rows
        limited = [control.queue for control in controls if control.max_running is not None]
        running = dict(self._run(self.RUNNING_IN_SQL, {"queues": self._names(limited)}).fetchall()) if limited else {}
        for control in controls:
            in_queue = running.get(control.queue, 0)
            allowed = start_allowance(control, in_queue, now)
            take = limit - len(jobs) if allowed is None else min(allowed, limit - len(jobs))
            if take > 0:
                got, bad = self._claim_rows("queue", suspect, {**params, "limit": take, "queue": control.queue}, held)
                jobs, unreadable, started = jobs + got, unreadable + bad, len(got) + len(bad)
                in_queue += started
                if control.per_second is not None and started:
                    control.next_start = next_start_after(control, now, started)
                    self._run(self.SET_NEXT_START_SQL, {"queue": control.queue, "next_start": control.next_start})
            if start_allowance(control, in_queue, now) == 0:
                self._held_back[control.queue] = released_at(control, in_queue, now)
                self._full = self._full or (control.max_running is not None and in_queue >= control.max_running)
        if len(jobs) < limit:
            rest = {**params, "limit": limit - len(jobs), "controlled": self._names([c.queue for c in controls])}
            got, bad = self._claim_rows("rest", suspect, rest, held)
            jobs, unreadable = jobs + got, unreadable + bad
        jobs = [job for job in jobs if not (job.id in claimed or claimed.add(job.id))]  # type: ignore[func-returns-value]
        return jobs, [(job, why) for job, why in unreadable if not (job.id in claimed or claimed.add(job.id))]  # type: ignore[func-returns-value]

    def next_due(self, types: str) -> int | None:
        """The earliest time a pending row of ``types`` may be claimed: its due time, or when the control of its
        queue releases it (as the last claim found them)."""
        params = {"types": self._types_param(types), "queues": self._queues_param}
        if not self._held_back:
            due = self._run(self._next_due_sql, params).fetchone()[0]
            return None if due is None else int(due)
        held_back = self._names(sorted(self._held_back))
        due = self._run(self._next_due_except_sql, {**params, "controlled": held_back}).fetchone()[0]
        times = [int(due)] if due is not None else []
        times += [at for at in self._held_back.values() if at is not None]
        return min(times, default=None)

    def at_running_limit(self) -> bool:
        """Whether the last claim left a queue at its running limit (a job of it ending frees a place)."""
        return self._full

    def queue_controls(self) -> list[QueueControl]:
        """Every queue's controls, by queue name."""
        return [QueueControl.from_row(row) for row in self._run(self.ALL_CONTROLS_SQL).fetchall()]

    def control_queue(self, queue: str, now: int, changes: Mapping[str, Any]) -> QueueControl:
        """Set ``changes`` (paused, max_running, per_second; None clears a limit) on the queue; its controls after.

        The row is locked while it is read and written (a row lock on
        PostgreSQL, the write lock on SQLite), so two operators' changes both
        land; it is deleted once nothing is set.  A changed rate starts afresh.
        """
        self._run(self.ENSURE_CONTROL_SQL, {"queue": queue, "now": now})
        control = QueueControl.from_row(self._run(self.LOCK_CONTROL_SQL, {"queue": queue}).fetchone())
        for name, value in changes.items():
            setattr(control, name, value)
        if "per_second" in changes:
            control.next_start = None
        control.changed = now
        if control.empty:
            self._run(self.DELETE_CONTROL_SQL, {"queue": queue})
        else:
            self._run(self.UPDATE_CONTROL_SQL, dataclasses.asdict(control) | {"paused": int(control.paused)})
        if self.NOTIFY_SQL:
            self._run(self.NOTIFY_SQL)
        return control


@_in_engine_errors
class SQLiteStore(QueueControls):
    """The Store on one SQLite connection (a worker's): the SQL of each verb beside it.

    SQLite has one writer at a time: a write transaction (BEGIN IMMEDIATE)
    holds the lock from its start, so a verb's read and write within it see
    no other writer in between.
    """

    def __init__(
        self,
        conn: Any,
        queues: list[str] | None = None,
        *,
        nested: bool = False,
        clock: Callable[[], int] | None = None,
        path: str | None = None,
    ) -> None:
        self.now = clock or now_ms  # each worker judges leases by its own clock: SQLite has no server to ask
        # The file to watch for replacement (absolute: a job may chdir), and which file it was when opened.
        self._path = None if path is None or path.startswith(("file:", ":memory:")) else os.path.abspath(path)
        self._file = _file_identity(self._path)
        # A stdlib sqlite3 connection; an app's own (Queue(conn)) may be apsw's, which
        # the producer's verbs allow for (_changes, _last_rowid); the worker's do not need to.
        self.conn: sqlite3.Connection = conn
        self.nested = nested  # in the caller's transaction: a savepoint, not a transaction of its own
        self.lock_wait: ProducerLockWait | None = None  # a Queue's or a Worker's (set by it): how writes wait
        queue_filter = "AND queue IN (SELECT value FROM json_each(:queues))" if queues else ""
        # Only the types the worker has registered: during a rolling deploy, a
        # row of a type that only newer workers know waits for one of them.
        queue_filter += " AND type IN (SELECT value FROM json_each(:types))"
        # "<= 0", not "= 0": a row another program wrote with negative deaths is still claimed.
        self._claim_sqls = {
            (kind, suspect): self.CLAIM_SQL.format(queue_filter=queue_filter + control_filter, columns=SELECT_COLUMNS,
                                                   deaths="deaths > 0" if suspect else "deaths <= 0")
            for kind, control_filter in self.CLAIM_CONTROL_FILTERS.items() for suspect in (False, True)
        }  # fmt: skip
        self._next_due_sql = self.NEXT_DUE_SQL.format(queue_filter=queue_filter)
        self._next_due_except_sql = self.NEXT_DUE_SQL.format(
            queue_filter=queue_filter + self.CLAIM_CONTROL_FILTERS["rest"]
        )
        self._queues_json = self._queues_param = json.dumps(queues)
        self._controls_sql = self.CONTROLS_OF_SQL.format(
            where="WHERE queue IN (SELECT value FROM json_each(:queues))" if queues else ""
        )
        self._held_back = {}

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        if self.nested:
            return _InEngineErrors(_savepoint(self.conn))
        if self.lock_wait is not None:
            return _InEngineErrors(_ProducerImmediate(self.conn, self.lock_wait))
        return _InEngineErrors(immediate(self.conn))

    def savepoint(self) -> contextlib.AbstractContextManager[Any]:
        return _InEngineErrors(_savepoint(self.conn))

    def close(self) -> None:
        self.conn.close()

    def replaced(self) -> str | None:
        """Deleted or replaced (a restored backup moved into place, the file
        removed and made anew), the old file lives on under this connection
        alone: it would claim nothing enqueued since.  Closing it is safe:
        SQLite neither checkpoints into nor deletes the -wal and -shm of a
        database file that has moved.
        """
        if self._file is None:
            return None
        try:
            now_there = _file_identity(self._path)
        except FileNotFoundError:
            now_there = None
        except OSError:
            return None  # cannot look (permissions): no evidence either way
        if now_there == self._file:
            return None
        return (f"database file {self._path} was {'deleted' if now_there is None else 'replaced'} under the worker; "
                "stopping, so that a restart opens the file now there")  # fmt: skip

    def missing_schema(self) -> list[str]:
        return missing_schema_objects(self.conn)

    def maintain(self) -> str | None:
        return None  # SQLite checkpoints the WAL itself (wal_autocheckpoint), and reuses the pages freed

    def repair_schema(self) -> bool:
        if not missing_schema_objects(self.conn):
            return False
        apply_schema(self.conn)
        return True

    # -- what the producer writes and reads (Queue) --

    INSERT_SQL = """
    INSERT INTO worker_jobs (type, data, queue, priority, due, tag, cron_schedule, cron_timezone, cron_slot,
                             created_at, max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    VALUES (:type, :data, :queue, :priority, :due, :tag, :cron_schedule, :cron_timezone, :cron_slot,
            :created_at, :max_attempts, :retry_delay_ms, :backoff, :timeout_ms, :keep_ms, :persistent)
    """
    # The partial unique index on pending tags is the arbiter, so a concurrent
    # writer cannot slip a second pending row in between a check and the insert.
    INSERT_UNLESS_TAGGED_SQL = (
        INSERT_SQL.rstrip() + "\n    ON CONFLICT (tag) WHERE status = 'pending' AND tag IS NOT NULL DO NOTHING\n"
    )
    PENDING_WITH_TAG_SQL = f"SELECT {SELECT_COLUMNS} FROM worker_jobs WHERE tag = :tag AND status = 'pending'"

    def insert(self, row: dict[str, Any], on_conflict: str = "replace") -> Job:
        """One row (Queue._new_row's), under the tag rule: at most one pending row per tag.

        ``replace`` cancels the tag's pending row and inserts; ``ignore``
        inserts nothing then, and returns the pending row.
        """
        conn = self.conn
        if row["tag"] is None and self.lock_wait is not None and not conn.in_transaction:  # a Queue's lone INSERT
            cursor = self.lock_wait.execute(conn, self.INSERT_SQL, row)
        elif row["tag"] is None:
            cursor = conn.execute(self.INSERT_SQL, row)
        elif on_conflict == "replace":
            reason = f"replaced by a newer job with tag {row['tag']!r}"
            self.cancel_pending(row["created_at"], reason, default_keep_ms(succeeded=False), tag=row["tag"])
            cursor = conn.execute(self.INSERT_SQL, row)
        elif on_conflict == "ignore":
            cursor = conn.execute(self.INSERT_UNLESS_TAGGED_SQL, row)
            if _changes(conn, cursor) == 0:
                return Job.from_row(conn.execute(self.PENDING_WITH_TAG_SQL, {"tag": row["tag"]}).fetchone())
        else:
            raise ValueError(f"on_conflict must be 'replace' or 'ignore', not {on_conflict!r}")
        return _new_job(_last_rowid(conn, cursor), row)  # one row: its own id, whatever else is written meanwhile

    # enqueue_many's rows in one statement: :rows is a JSON array of [type, data,
    # queue] arrays; every other column is the same for all of them.
    UNIFORM_INSERT_SQL = """
    INSERT INTO worker_jobs (type, data, queue, priority, due, tag, cron_schedule, cron_timezone, cron_slot,
                             created_at, max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
           :priority, :due, :tag, :cron_schedule, :cron_timezone, :cron_slot,
           :created_at, :max_attempts, :retry_delay_ms, :backoff, :timeout_ms, :keep_ms, :persistent
      FROM json_each(:rows)
    """

    def insert_uniform(self, shared: Mapping[str, Any], rows: str) -> list[int]:
        """Untagged rows alike but for type, data and queue (``rows``: a JSON array of those); their ids, in order.

        SQLite's single writer makes the ids of one statement's rows
        consecutive (AUTOINCREMENT, under the write lock), in the order of the
        array, ending at last_insert_rowid().  A store with concurrent writers
        takes them from RETURNING instead; here RETURNING would cost a tenth of
        the statement (bench/README.md), for ids already known.
        """
        params = {column: shared[column] for column in INSERT_COLUMNS[3:]} | {"rows": rows}
        count = _changes(self.conn, self.conn.execute(self.UNIFORM_INSERT_SQL, params))
        last = int(_scalar(self.conn, "SELECT last_insert_rowid()"))
        return list(range(last - count + 1, last + 1))

    CANCEL_SQL = f"""
    UPDATE worker_jobs
       SET status = 'cancelled', finished = :now, error = :reason, remove_at = {REMOVE_AT}
     WHERE {{where}} AND status = 'pending'
    RETURNING finished, queue, status
    """
    CANCEL_BY: ClassVar[dict[str, str]] = {  # by cancel_key()
        "id": CANCEL_SQL.format(where="id = :id"),
        "tag": CANCEL_SQL.format(where="tag = :tag"),
        "type": CANCEL_SQL.format(where="type = :type"),
    }

    def cancel_pending(
        self, now: int, reason: str, keep_ms: int, *, id: int | None = None, tag: str | None = None,
        type: str | None = None,
    ) -> int:  # fmt: skip
        """Cancel the pending row with this id, or every pending row with this tag or type; how many.

        Only pending rows: a running one is its worker's, a finished one stays as it ended.
        """
        params = {"id": id, "tag": tag, "type": type, "now": now, "reason": reason, "keep_ms": keep_ms}
        cancelled = self.conn.execute(self.CANCEL_BY[cancel_key(id=id, tag=tag, type=type)], params).fetchall()
        count_finished(self.conn, cancelled)
        return len(cancelled)

    # A manual retry: the next attempt of a failed or cancelled row that no retry
    # followed (a retry has a higher attempt; the next cron run starts at 1).  A cron
    # run is retried without its schedule, which has its own pending row; OR IGNORE:
    # a tag that already has a pending row wins.
    MANUAL_RETRY_SQL = f"""
    INSERT OR IGNORE INTO worker_jobs
           (type, data, queue, priority, due, tag, attempt, rescheduled_from_job, created_at, max_attempts,
            retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    SELECT type, data, queue, priority, :now, CASE WHEN cron_schedule IS NULL THEN tag END, attempt + 1, id, :now,
           {COPIED_POLICY}, persistent
      FROM worker_jobs AS old
     WHERE id = :id AND status IN ('failed', 'cancelled') AND attempt < {MAX_COUNT}
       AND NOT EXISTS (SELECT 1 FROM worker_jobs WHERE rescheduled_from_job = old.id
                                   AND (attempt > old.attempt OR snoozes > old.snoozes))
    RETURNING {SELECT_COLUMNS}
    """

    REQUEST_CANCEL_SQL = """
    UPDATE worker_jobs SET cancel_requested = :now, cancel_requested_by = :by
     WHERE id = :id AND status = 'running' AND cancel_requested IS NULL
    """
    # INDEXED BY: the running rows' own small index (a worker looks twice a second).
    CANCEL_REQUESTS_SQL = """
    SELECT id, cancel_requested, cancel_requested_by FROM worker_jobs INDEXED BY worker_jobs_lease
     WHERE status = 'running' AND owner = :owner AND cancel_requested IS NOT NULL
    """

    def request_cancel(self, id: int, now: int, by: str) -> bool:
        return self.conn.execute(self.REQUEST_CANCEL_SQL, {"id": id, "now": now, "by": by}).rowcount == 1

    WRITE_PROGRESS_SQL = "UPDATE worker_jobs SET progress = ? WHERE id = ? AND status = 'running' AND owner = ?"

    def write_progress_if_owned(self, owner: str, progress: Iterable[tuple[int, str]]) -> None:
        self.conn.executemany(self.WRITE_PROGRESS_SQL, [(text, id, owner) for id, text in progress])

    def cancel_requests(self, owner: str) -> list[tuple[int, int, str | None]]:
        return self.conn.execute(self.CANCEL_REQUESTS_SQL, {"owner": owner}).fetchall()

    def manual_retry(self, id: int, now: int) -> Job | None:
        """Insert the next attempt, due now, of a failed or cancelled row that ends its chain; None if it is not one."""
        inserted = self.conn.execute(self.MANUAL_RETRY_SQL, {"id": id, "now": now}).fetchall()
        return Job.from_row(inserted[0]) if inserted else None

    RETRYABLE_FAILED_SQL = """
    SELECT id FROM worker_jobs AS old
     WHERE status = 'failed' AND (:type IS NULL OR type = :type)
       AND NOT EXISTS (SELECT 1 FROM worker_jobs WHERE rescheduled_from_job = old.id
                                   AND (attempt > old.attempt OR snoozes > old.snoozes))
     ORDER BY id
    """

    def retryable_failed(self, type: str | None) -> list[int]:
        """The failed rows (of one type) that end their chain, oldest first."""
        return [row[0] for row in self.conn.execute(self.RETRYABLE_FAILED_SQL, {"type": type})]

    GET_SQL = f"SELECT {SELECT_COLUMNS} FROM worker_jobs WHERE id = ?"

    def get(self, id: int) -> Job | None:
        """The row with this id, or None."""
        row = self.conn.execute(self.GET_SQL, (id,)).fetchone()
        return Job.from_row(row) if row else None

    # Batches keep each write transaction short: others claim and finish in between.
    PRUNE_SQL = """
    DELETE FROM worker_jobs
     WHERE id IN (SELECT id FROM worker_jobs
                   WHERE remove_at <= :now AND status IN ('succeeded', 'failed', 'cancelled') AND NOT persistent
                   LIMIT :batch_size)
    """
    PRUNABLE_SQL = """
    SELECT count(*) FROM worker_jobs
     WHERE remove_at <= :now AND status IN ('succeeded', 'failed', 'cancelled') AND NOT persistent
    """
    FORGET_OLD_COUNTS_SQL = "DELETE FROM worker_finished_per_minute WHERE minute < :before"

    def prune(self, now: int, batch_size: int) -> int:
        """Delete up to ``batch_size`` finished rows whose remove_at has passed (never a persistent one); how many."""
        return _changes(self.conn, self.conn.execute(self.PRUNE_SQL, {"now": now, "batch_size": batch_size}))

    def prunable(self, now: int) -> int:
        """How many rows ``prune`` would delete."""
        return int(_scalar(self.conn, self.PRUNABLE_SQL, {"now": now}))

    def forget_counts_before(self, before: int) -> None:
        """Drop the per-minute counts of finished rows older than ``before``."""
        self.conn.execute(self.FORGET_OLD_COUNTS_SQL, {"before": before})

    # -- a recurring job's rows --

    # A run of this very schedule that is running now (walks the tag index).
    RUNNING_CRON_RUN_SQL = """
    SELECT id FROM worker_jobs
     WHERE tag = :tag AND status = 'running' AND cron_schedule = :cron AND cron_timezone IS :timezone LIMIT 1
    """
    # The newest slot of a schedule that was (or is being) run; walks the tag index
    # backwards, so it stops after a row or two however long the history.
    LAST_CRON_SLOT_SQL = """
    SELECT cron_slot FROM worker_jobs
     WHERE tag = :tag AND cron_slot IS NOT NULL AND status IN ('running', 'succeeded', 'failed')
     ORDER BY cron_slot DESC LIMIT 1
    """

    def pending_with_tag(self, tag: str) -> Job | None:
        """The pending row of this tag (there is at most one), or None."""
        row = self.conn.execute(self.PENDING_WITH_TAG_SQL, {"tag": tag}).fetchone()
        return Job.from_row(row) if row else None

    def cron_run_running(self, tag: str, cron: str, timezone: str | None) -> bool:
        """Whether a run of this very schedule (tag, expression and zone) is running now."""
        params = {"tag": tag, "cron": cron, "timezone": timezone}
        return self.conn.execute(self.RUNNING_CRON_RUN_SQL, params).fetchone() is not None

    def last_cron_slot(self, tag: str) -> int | None:
        """The newest slot that a run of this schedule has had (running or ended), or None."""
        slot = _scalar(self.conn, self.LAST_CRON_SLOT_SQL, {"tag": tag})
        return None if slot is None else int(slot)

    # -- what the worker writes and reads --

    REGISTER_PROCESS_SQL = """
    INSERT OR REPLACE INTO worker_processes (id, host, pid, started, last_seen, lease_ms, concurrency, running, queues,
                                             version, types)
    VALUES (:id, :host, :pid, :now, :now, :lease_ms, :concurrency, 0, :queues, :version, :types)
    """
    # Rows of processes gone for a day are of no more use to anyone reading status.
    FORGET_PROCESSES_SQL = "DELETE FROM worker_processes WHERE id = :id OR last_seen < :long_ago"

    def register_process(self, process: Mapping[str, Any], now: int) -> None:
        self.conn.execute(self.FORGET_PROCESSES_SQL, {"id": process["id"], "long_ago": now - DAY_MS})
        self.conn.execute(self.REGISTER_PROCESS_SQL, {**process, "now": now})

    PROCESS_ALIVE_SQL = "UPDATE worker_processes SET last_seen = :now, running = :running WHERE id = :id"

    def process_alive(self, owner: str, running: int, now: int) -> None:
        self.conn.execute(self.PROCESS_ALIVE_SQL, {"id": owner, "now": now, "running": running})

    def forget_process(self, owner: str) -> None:
        self.conn.execute(self.FORGET_PROCESSES_SQL, {"id": owner, "long_ago": 0})

    RENEW_LEASES_SQL = """
    UPDATE worker_jobs SET lease_until = :lease_until
     WHERE status = 'running' AND owner = :owner
    """

    def renew_leases(self, owner: str, lease_until: int) -> None:
        self.conn.execute(self.RENEW_LEASES_SQL, {"lease_until": lease_until, "owner": owner})

    GIVE_BACK_SQL = """
    UPDATE worker_jobs
       SET status = 'pending', started = NULL, worker = NULL, owner = NULL, lease_until = NULL
     WHERE id = :id AND status = 'running' AND owner = :owner
    """
    GIVE_BACK_TAKEN_TAG_SQL = f"""
    UPDATE worker_jobs
       SET status = 'cancelled', lease_until = NULL, finished = :now, remove_at = {REMOVE_AT},
           error = 'not run to its end: a newer pending job holds its tag ' || quote(tag) || ' and runs in its place'
     WHERE id = :id AND status = 'running' AND owner = :owner AND tag IS NOT NULL
       AND EXISTS (SELECT 1 FROM worker_jobs AS newer WHERE newer.tag = worker_jobs.tag AND newer.status = 'pending')
    RETURNING finished, queue, status
    """

    def give_back_if_owned(self, id: int, owner: str, now: int) -> str | None:
        params = {"id": id, "owner": owner, "now": now, "keep_ms": default_keep_ms(succeeded=False)}
        cancelled = self.conn.execute(self.GIVE_BACK_TAKEN_TAG_SQL, params).fetchall()
        if cancelled:
            count_finished(self.conn, cancelled)
            return Status.CANCELLED.value
        return Status.PENDING.value if self.conn.execute(self.GIVE_BACK_SQL, params).rowcount == 1 else None

    # `started` becomes the moment the function was called (a job claimed ahead
    # waited after its claim); `finished` is the step's time, never before that.
    FINISH_SQL = f"""
    UPDATE worker_jobs
       SET status = :status, result = :result, error = :error, lease_until = NULL,
           started = coalesce(:started, started), finished = max(:now, coalesce(:started, 0)), remove_at = {REMOVE_AT}
     WHERE id = :id AND status = 'running' AND owner = :owner
    """

    def finish_if_owned(
        self, id: int, owner: str, status: str, now: int, result: str | None, error: str | None,
        started: int | None, keep_ms: int,
    ) -> bool:  # fmt: skip
        return self._finish_one(id, owner, status, now, result, error, started, keep_ms)

    def finish_many_if_owned(
        self, owner: str, now: int, outcomes: Iterable[tuple[int, str, str | None, str | None, int | None, int]]
    ) -> set[int]:
        # One statement each: in-process SQLite has no round trip to save, and a
        # batch statement would only add the cost of building it.
        finish = self._finish_one
        return {outcome[0] for outcome in outcomes if finish(outcome[0], owner, outcome[1], now, *outcome[2:])}

    def _finish_one(
        self, id: int, owner: str, status: str, now: int, result: str | None, error: str | None,
        started: int | None, keep_ms: int,
    ) -> bool:  # fmt: skip
        params = {"id": id, "owner": owner, "status": status, "now": now, "result": result, "error": error,
                  "started": started, "keep_ms": keep_ms}  # fmt: skip
        return self.conn.execute(self.FINISH_SQL, params).rowcount == 1

    # OR IGNORE: a newer pending job with the same tag supersedes the retry.  A
    # retry keeps the cron slot of the run it repeats.
    RETRY_SQL = f"""
    INSERT OR IGNORE INTO worker_jobs
           (type, data, queue, priority, due, tag, attempt, cron_schedule, cron_timezone, cron_slot,
            rescheduled_from_job, created_at, deaths, snoozes, max_attempts, retry_delay_ms, backoff, timeout_ms,
            keep_ms, persistent)
    SELECT type, data, queue, priority, :due, tag, attempt + {{next_attempt}}, cron_schedule, cron_timezone, cron_slot,
           id, :now, {{deaths}}, snoozes + {{snoozed}}, {COPIED_POLICY}, persistent
      FROM worker_jobs WHERE id = :id {{fence}}
    RETURNING id
    """
    # A snooze's next row: the same attempt, one more snooze; only while the row is still this worker's.
    SNOOZE_SQL = RETRY_SQL.format(
        next_attempt=0, deaths="deaths", snoozed=1, fence="AND status = 'running' AND owner = :owner"
    )
    RETRY_SQL = RETRY_SQL.format(next_attempt=1, deaths=":deaths", snoozed=0, fence="")

    def schedule_next_attempt(self, id: int, *, due: int, deaths: int, now: int) -> int | None:
        inserted = self.conn.execute(self.RETRY_SQL, {"id": id, "due": due, "now": now, "deaths": deaths}).fetchall()
        return int(inserted[0][0]) if inserted else None

    # The next run of a recurring job: a fresh chain (attempt 1, no deaths) for the
    # next slot.  OR IGNORE: when another writer already made the pending row for
    # this tag (a worker syncing a changed schedule), that one stands.
    NEXT_CRON_RUN_SQL = f"""
    INSERT OR IGNORE INTO worker_jobs
           (type, data, queue, priority, due, tag, cron_schedule, cron_timezone, cron_slot,
            rescheduled_from_job, created_at, max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    SELECT type, data, queue, priority, :due, tag, cron_schedule, cron_timezone, :due,
           id, :now, {COPIED_POLICY}, persistent
      FROM worker_jobs WHERE id = :id
    RETURNING id
    """

    def schedule_snooze_if_owned(self, id: int, owner: str, *, due: int, now: int) -> int | None:
        params = {"id": id, "owner": owner, "due": due, "now": now}
        inserted = self.conn.execute(self.SNOOZE_SQL, params).fetchall()
        return int(inserted[0][0]) if inserted else None

    def snoozes(self, id: int) -> int:
        return int(_scalar(self.conn, "SELECT snoozes FROM worker_jobs WHERE id = ?", (id,)) or 0)

    def schedule_next_cron_run(self, id: int, *, due: int, now: int) -> int | None:
        inserted = self.conn.execute(self.NEXT_CRON_RUN_SQL, {"id": id, "due": due, "now": now}).fetchall()
        return int(inserted[0][0]) if inserted else None

    def count_finished(self, finished: Iterable[tuple[int, str, str]]) -> None:
        count_finished(self.conn, finished)

    CLAIM_SQL = """
    UPDATE worker_jobs
       SET status = 'running', started = :now, worker = :worker, owner = :owner,
           lease_until = :lease_until
     WHERE id IN (SELECT id FROM worker_jobs
                   WHERE status = 'pending' AND due <= :now AND {deaths} {queue_filter}
                   ORDER BY priority DESC, due, id
                   LIMIT :limit)
    RETURNING {columns}
    """

    # The claim's variants (QueueControls.claim): the fast one takes nothing while
    # any queue has a control (an empty table's one page: nothing measurable,
    # bench/README.md); then one per controlled queue, and one for the rest.
    CLAIM_CONTROL_FILTERS: ClassVar[dict[str, str]] = {
        "fast": " AND NOT EXISTS (SELECT 1 FROM worker_queues)",
        "queue": " AND queue = :queue",
        "rest": " AND queue NOT IN (SELECT value FROM json_each(:controlled))",
    }
    CONTROL_COLUMNS = "queue, paused, max_running, per_second, next_start, changed"
    CONTROLS_OF_SQL = f"SELECT {CONTROL_COLUMNS} FROM worker_queues {{where}} ORDER BY queue"
    ALL_CONTROLS_SQL = CONTROLS_OF_SQL.format(where="")
    # INDEXED BY: the running rows' own small index, never the whole table.
    RUNNING_IN_SQL = """
    SELECT queue, count(*) FROM worker_jobs INDEXED BY worker_jobs_lease
     WHERE status = 'running' AND queue IN (SELECT value FROM json_each(:queues)) GROUP BY queue
    """
    SET_NEXT_START_SQL = "UPDATE worker_queues SET next_start = :next_start WHERE queue = :queue"
    ENSURE_CONTROL_SQL = "INSERT INTO worker_queues (queue, changed) VALUES (:queue, :now) ON CONFLICT DO NOTHING"
    LOCK_CONTROL_SQL = f"SELECT {CONTROL_COLUMNS} FROM worker_queues WHERE queue = :queue"  # the write lock is held
    UPDATE_CONTROL_SQL = """
    UPDATE worker_queues
       SET paused = :paused, max_running = :max_running, per_second = :per_second, next_start = :next_start,
           changed = :changed
     WHERE queue = :queue
    """
    DELETE_CONTROL_SQL = "DELETE FROM worker_queues WHERE queue = :queue"

    # Looked up before each claim by an idle worker; the partial index of suspect
    # rows is nearly always empty, and this costs a fifth of the claim that would
    # find nothing.  INDEXED BY: the planner would rather walk all pending rows.
    ANY_SUSPECT_SQL = """
    SELECT EXISTS (SELECT 1 FROM worker_jobs INDEXED BY worker_jobs_suspect WHERE status = 'pending' AND deaths > 0)
    """

    # The earliest due time of a pending row, without an index on due alone: a
    # skip-scan of worker_jobs_claim (priority DESC, due), one seek per priority
    # level in use, highest first, taking each level's earliest due.
    NEXT_DUE_SQL = """
    WITH RECURSIVE level(priority) AS (
        SELECT max(priority) FROM worker_jobs WHERE status = 'pending'
        UNION ALL
        SELECT (SELECT max(priority) FROM worker_jobs WHERE status = 'pending' AND priority < level.priority)
          FROM level WHERE level.priority IS NOT NULL
    )
    SELECT min((SELECT min(due) FROM worker_jobs WHERE status = 'pending' AND priority = level.priority {queue_filter}))
      FROM level WHERE level.priority IS NOT NULL
    """

    # The rows a claim just took (only read again when one of them could not be read).
    CLAIMED_NOW_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE status = 'running' AND lease_until = :lease_until AND owner = :owner AND started = :now
    """

    # A worker never rescues its own jobs: it is alive, so they are not lost (this
    # matters when its clock jumps forward past their leases).
    EXPIRED_LEASES_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE status = 'running' AND lease_until < :now AND owner IS NOT :owner
    """

    # A running row with no lease (another program's INSERT or UPDATE; the table
    # refuses new ones since schema version 4) has no holder to renew it: its lease
    # is taken as lapsed long ago, so the sweep below rescues it like any other.
    LEASE_THE_UNLEASED_SQL = "UPDATE worker_jobs SET lease_until = 0 WHERE status = 'running' AND lease_until IS NULL"

    RESCUE_SQL = f"""
    UPDATE worker_jobs
       SET status = 'failed', finished = :now, error = :error, lease_until = NULL, remove_at = {REMOVE_AT}
     WHERE id = :id AND status = 'running' AND lease_until < :now
    """

    def any_suspect(self) -> bool:
        return bool(_scalar(self.conn, self.ANY_SUSPECT_SQL))

    def _claim_params(
        self, owner: str, worker: str, now: int, lease_until: int, limit: int, types: str
    ) -> dict[str, Any]:
        return {"now": now, "worker": worker, "owner": owner, "lease_until": lease_until, "limit": limit,
                "queues": self._queues_json, "types": types}  # fmt: skip

    def _claim_rows(
        self, kind: str, suspect: bool, params: dict[str, Any], held: Container[int]
    ) -> tuple[list[Job], list[tuple[Job, str]]]:
        # The fast path decodes every row at once.  Only when that fails (text
        # that is not UTF-8, data nested too deep for Python's json, ...) are the
        # rows just claimed read again, as bytes, one by one.
        try:
            rows = self.conn.execute(self._claim_sqls[kind, suspect], params).fetchall()
            return [Job.from_row(row) for row in rows], []
        except sqlite3.OperationalError as e:
            if not str(e).startswith("Could not decode"):  # the sqlite3 module's message for text that is not UTF-8
                raise
        except (RecursionError, ValueError, TypeError):
            pass
        # The UPDATE had claimed every row before RETURNING failed to hand one over.
        with _text_as_bytes(self.conn):
            claimed = self.conn.execute(self.CLAIMED_NOW_SQL, params).fetchall()
        jobs, unreadable = [], []
        for raw in claimed:
            if raw[0] in held:  # claimed in an earlier step of the same millisecond
                continue
            try:
                jobs.append(read_row(raw))
            except UnreadableRow as e:
                unreadable.append((unreadable_job(raw), str(e)))
        return jobs, unreadable

    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> sqlite3.Cursor:
        return self.conn.execute(sql, params or {})

    def _names(self, names: list[str]) -> str:
        return json.dumps(names)

    def _types_param(self, types: str) -> str:
        return types

    def expired_leases(self, owner: str, now: int) -> tuple[list[Job], list[tuple[Job, str]]]:
        self.conn.execute(self.LEASE_THE_UNLEASED_SQL)
        with _text_as_bytes(self.conn):  # few rows, rarely: each is decoded alone, so one bad row costs only itself
            expired = self.conn.execute(self.EXPIRED_LEASES_SQL, {"now": now, "owner": owner}).fetchall()
        jobs, unreadable = [], []
        for raw in expired:
            try:
                jobs.append(read_row(raw))
            except UnreadableRow as e:
                unreadable.append((unreadable_job(raw), str(e)))
        return jobs, unreadable

    def rescue_if_expired(self, id: int, now: int, error: str, keep_ms: int) -> bool:
        params = {"id": id, "now": now, "error": error, "keep_ms": keep_ms}
        return self.conn.execute(self.RESCUE_SQL, params).rowcount == 1

    # -- what the operating tools read (status, jobs, show, the dashboard): indexed queries only --

    @functools.cached_property
    def _installed_version(self) -> int:
        # Read once: the operating tools' stores are made for one look (status reads it thrice).
        return installed_schema_version(self.conn)

    def queue_controls(self) -> list[QueueControl]:
        if self._installed_version < 7:  # a reader never upgrades the schema: no table, no controls
            return []
        return super().queue_controls()

    def describe(self) -> dict[str, Any]:
        path = next(row[2] for row in self.conn.execute("PRAGMA database_list") if row[1] == "main")
        wal = Path(f"{path}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return {"database": path, "schema_version": self._installed_version,
                "engine": f"SQLite {sqlite3.sqlite_version}, WAL {wal_bytes / 1e6:.1f} MB",
                "sqlite_version": sqlite3.sqlite_version, "wal_bytes": wal_bytes}  # fmt: skip

    PENDING_BY_QUEUE_SQL = """
    SELECT queue, sum(due <= :now), sum(due > :now), min(CASE WHEN due <= :now THEN due END)
      FROM worker_jobs WHERE status = 'pending' GROUP BY queue
    """

    def pending_by_queue(self, now: int) -> list[tuple[str, int, int, int | None]]:
        return self.conn.execute(self.PENDING_BY_QUEUE_SQL, {"now": now}).fetchall()

    def running_by_queue(self) -> list[tuple[str, int]]:
        sql = "SELECT queue, count(*) FROM worker_jobs WHERE status = 'running' GROUP BY queue"
        return self.conn.execute(sql).fetchall()

    FINISHED_PER_MINUTE_SQL = """
    SELECT queue, status, sum(count) FROM worker_finished_per_minute WHERE minute >= :since GROUP BY queue, status
    """
    FINISHED_SINCE_SQL = """
    SELECT queue, status, count(*) FROM worker_jobs WHERE finished >= :since GROUP BY queue, status
    """

    def finished_by_queue(self, since: int) -> list[tuple[str, str, int]]:
        if self._installed_version >= 3:  # from the minute ``since`` falls in
            return self.conn.execute(self.FINISHED_PER_MINUTE_SQL, {"since": since - since % MINUTE_MS}).fetchall()
        return self.conn.execute(self.FINISHED_SINCE_SQL, {"since": since}).fetchall()  # not upgraded: the rows

    BY_MINUTE_SQL = """
    SELECT minute, status, sum(count) FROM worker_finished_per_minute WHERE minute >= :since
     GROUP BY minute, status ORDER BY minute, status
    """
    BY_MINUTE_FROM_ROWS_SQL = f"""
    SELECT finished - finished % {MINUTE_MS}, status, count(*) FROM worker_jobs WHERE finished >= :since
     GROUP BY 1, 2 ORDER BY 1, 2
    """

    def finished_by_minute(self, since: int) -> list[tuple[int, str, int]]:
        sql = self.BY_MINUTE_SQL if self._installed_version >= 3 else self.BY_MINUTE_FROM_ROWS_SQL
        return self.conn.execute(sql, {"since": since - since % MINUTE_MS}).fetchall()

    def running_by_owner(self) -> dict[str, int]:
        # Exact now, where worker_processes.running is as old as the process's
        # last heartbeat.  It walks the small index of running rows.
        sql = "SELECT owner, count(*) FROM worker_jobs WHERE status = 'running' GROUP BY owner"
        return dict(self.conn.execute(sql).fetchall())

    def processes(self) -> list[dict[str, Any]]:
        columns = (*PROCESS_COLUMNS, "types" if self._installed_version >= 5 else "NULL AS types")
        rows = self.conn.execute(f"SELECT {', '.join(columns)} FROM worker_processes ORDER BY started")
        return [dict(zip((*PROCESS_COLUMNS, "types"), row, strict=True)) for row in rows]

    CRON_PENDING_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE status = 'pending' AND cron_schedule IS NOT NULL ORDER BY due
    """
    LAST_CRON_RUN_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE tag = :tag AND cron_slot IS NOT NULL AND status IN ('running', 'succeeded', 'failed')
     ORDER BY cron_slot DESC, id DESC LIMIT 1
    """

    def cron_schedules(self) -> list[tuple[Job, Job | None]]:
        schedules = []
        for row in self.conn.execute(self.CRON_PENDING_SQL).fetchall():
            pending = read_job(row)
            last = self.conn.execute(self.LAST_CRON_RUN_SQL, {"tag": pending.tag}).fetchone() if pending.tag else None
            schedules.append((pending, read_job(last) if last else None))
        return schedules

    # It reads every pending row, as the claim's index holds them; a backlog of
    # 100,000 rows costs it tens of milliseconds.
    UNRUNNABLE_SQL = """
    SELECT type, count(*), min(due) FROM worker_jobs
     WHERE status = 'pending' AND type NOT IN (SELECT value FROM json_each(:known))
     GROUP BY type ORDER BY type
    """

    def unrunnable(self, known: list[str]) -> list[tuple[str, int, int]]:
        return self.conn.execute(self.UNRUNNABLE_SQL, {"known": json.dumps(known)}).fetchall()

    def jobs(self, *, status: str | None, type: str | None, queue: str | None, limit: int) -> list[Job]:
        filters = {"status": status, "type": type, "queue": queue}
        # Only the filters given, so SQLite can use an index for them (an
        # "(:x IS NULL OR x = :x)" form would force a scan of the whole table).
        where = " AND ".join(f"{column} = :{column}" for column, value in filters.items() if value is not None)
        sql = f"SELECT {SELECT_COLUMNS} FROM worker_jobs WHERE {where or '1'} ORDER BY id DESC LIMIT :limit"
        return [read_job(row) for row in self.conn.execute(sql, {**filters, "limit": limit})]

    CHAIN_SQL = f"""
    WITH RECURSIVE
      back(id, parent, depth) AS (
        SELECT id, rescheduled_from_job, 0 FROM worker_jobs WHERE id = :id
        UNION SELECT w.id, w.rescheduled_from_job, back.depth + 1
                FROM worker_jobs w JOIN back ON w.id = back.parent WHERE back.depth < :reach),
      forward(id, depth) AS (
        SELECT :id, 0
        UNION SELECT w.id, forward.depth + 1
                FROM worker_jobs w JOIN forward ON w.rescheduled_from_job = forward.id WHERE forward.depth < :reach)
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE id IN (SELECT id FROM back UNION SELECT id FROM forward) ORDER BY id
    """

    def chain(self, id: int, *, reach: int) -> list[Job]:
        return [read_job(row) for row in self.conn.execute(self.CHAIN_SQL, {"id": id, "reach": reach}).fetchall()]

    # As `worker retry` sees it; walks the chain index, one probe per row.
    RETRIED_AS_SQL = """
    SELECT old.id, new.id FROM worker_jobs AS old
      JOIN worker_jobs AS new ON new.rescheduled_from_job = old.id
                                   AND (new.attempt > old.attempt OR new.snoozes > old.snoozes)
     WHERE old.id IN (SELECT value FROM json_each(:ids))
    """

    def retried_as(self, ids: list[int]) -> dict[int, int]:
        return dict(self.conn.execute(self.RETRIED_AS_SQL, {"ids": json.dumps(ids)}).fetchall())

    PROGRESS_OF_SQL = """
    SELECT id, progress FROM worker_jobs WHERE id IN (SELECT value FROM json_each(:ids)) AND progress IS NOT NULL
    """

    def progress_of(self, ids: list[int]) -> dict[int, str]:
        if self._installed_version < 9:  # a reader never upgrades the schema: no column, no progress
            return {}
        with _text_as_bytes(self.conn):  # another program's text may not be UTF-8: shown escaped, never a failure
            found = self.conn.execute(self.PROGRESS_OF_SQL, {"ids": json.dumps(ids)}).fetchall()
        return {id: _text_as_stored(text) if isinstance(text, bytes) else str(text) for id, text in found}

    # -- what `worker copy` reads, to move the rows to PostgreSQL --

    def snapshot(self) -> contextlib.AbstractContextManager[Any]:
        """One read transaction: everything read inside it is the database at one moment, whatever others commit."""
        return _InEngineErrors(_read_transaction(self.conn))

    EXPORT_SQL = f"""
    SELECT {COPIED_COLUMNS} FROM worker_jobs
     WHERE id > :after AND status IN (SELECT value FROM json_each(:statuses)) ORDER BY id LIMIT :limit
    """

    def rows_to_copy(self, statuses: list[str], *, after: int, limit: int) -> list[tuple[Any, ...]]:
        """Up to ``limit`` rows in one of ``statuses`` with ids above ``after``, in id order, each column of
        COPIED_COLUMNS as stored.

        Text exactly as it is in the file (no JSON is parsed and written again);
        UnreadableRow, naming the row, for text that is not UTF-8, which no
        PostgreSQL text column can hold.
        """
        params = {"after": after, "statuses": json.dumps(statuses), "limit": limit}
        with _text_as_bytes(self.conn):
            raw = self.conn.execute(self.EXPORT_SQL, params).fetchall()
        rows = []
        for values in raw:
            try:
                rows.append(tuple(value.decode() if isinstance(value, bytes) else value for value in values))
            except UnicodeDecodeError:
                bad = next(i for i, value in enumerate(values) if isinstance(value, bytes) and not _is_utf8(value))
                raise UnreadableRow(
                    f"job {values[0]}: its {COLUMNS[bad]} is not valid UTF-8 ({_excerpt(values[bad])})"
                ) from None
        return rows

    # AUTOINCREMENT's record of the highest id ever given: rows pruned since
    # held ids above every row left, and a chain may still point at them.
    HIGHEST_ID_SQL = """
    SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'worker_jobs'), 0),
               coalesce((SELECT max(id) FROM worker_jobs), 0))
    """

    def highest_id(self) -> int:
        """The highest id this table ever gave a row (0 for none): ids a copy must never give again."""
        return int(_scalar(self.conn, self.HIGHEST_ID_SQL))

    def finished_counts(self) -> list[tuple[int, str, str, int]]:
        """The per-minute counts of finished rows, as (minute, queue, status, count)."""
        return self.conn.execute("SELECT minute, queue, status, count FROM worker_finished_per_minute").fetchall()


@contextlib.contextmanager
def _read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN")  # deferred: its snapshot is taken at the first read, and it never takes the write lock
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def as_store(source: Any) -> Store:
    """A store as it is; a SQLite connection (the operating tools' readers, a test's) as a store on it."""
    return SQLiteStore(source) if isinstance(source, sqlite3.Connection) else cast(Store, source)


def open_reader(target: str) -> Store:
    """A store that only reads ``target`` (status, jobs, show, the dashboard): looking never writes."""
    if is_postgres(target):
        return cast(Store, postgres_module().open_reader(target))
    return SQLiteStore(connect_readonly(target))


# --- The SQLite wake-up: inotify on the -wal, PRAGMA data_version -------------------


class CommitWatcher:
    """Wakes an idle worker when any process commits: inotify on the ``-wal`` file.

    In WAL mode every commit writes to the -wal file, so a modify event there
    means "look again" (the worker then reads PRAGMA data_version).  An idle
    worker can then sleep instead of polling every few milliseconds.  Linux
    only; ``start`` returns None elsewhere, and the worker polls.
    """

    IN_MODIFY, IN_CLOEXEC = 0x2, 0o2000000

    def __init__(self, libc: Any, fd: int, watch: int, wake: Callable[[], None]) -> None:
        self._libc, self._fd, self._watch, self._wake = libc, fd, watch, wake
        self._stopped = False
        # Disarmed (a busy worker), the thread reads nothing: the kernel merges the
        # queued events into one, and no thread wakes per commit.
        self.armed = threading.Event()
        self._thread = threading.Thread(target=self._watch_loop, name="worker-commit-watcher", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, wal_path: str, wake: Callable[[], None]) -> CommitWatcher | None:
        """Watch ``wal_path``; None if inotify is not available here."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(cls.IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        watch = libc.inotify_add_watch(fd, os.fsencode(wal_path), cls.IN_MODIFY)
        if watch < 0:
            os.close(fd)
            return None
        return cls(libc, fd, watch, wake)

    def _watch_loop(self) -> None:
        while not self._stopped:
            self.armed.wait()
            try:
                os.read(self._fd, 4096)  # one read takes every event queued so far
            except OSError:
                return
            if not self._stopped and self.armed.is_set():
                # Once: one commit writes the -wal several times, and the worker,
                # woken, looks anyway; it arms the watch again while it stays idle.
                self.armed.clear()
                self._wake()

    def stop(self) -> None:
        """End the watch; removing it queues an event that ends the blocked read."""
        self._stopped = True
        self.armed.set()
        self._libc.inotify_rm_watch(self._fd, self._watch)
        self._thread.join(timeout=1)
        os.close(self._fd)


class SQLiteWakeUp:
    """The SQLite wake-up: CommitWatcher on the ``-wal`` file, PRAGMA data_version on the worker's connection."""

    def __init__(self, db: str, connection: Callable[[], sqlite3.Connection]) -> None:
        self._db, self._connection = db, connection
        self._watcher: CommitWatcher | None = None
        self._cursor: sqlite3.Cursor | None = None
        self._data_version: int | None = None
        self.pushes = False

    def start(self, wake: Callable[[], None]) -> None:
        if not self._db.startswith(("file:", ":memory:")):
            self._watcher = CommitWatcher.start(self._db + "-wal", wake)
        self.pushes = self._watcher is not None

    def arm(self, armed: bool) -> None:
        if self._watcher is not None and self._watcher.armed.is_set() != armed:
            (self._watcher.armed.set if armed else self._watcher.armed.clear)()

    def changed(self) -> bool:
        if self._cursor is None:
            self._cursor = self._connection().cursor()
        version = int(self._cursor.execute("PRAGMA data_version").fetchone()[0])
        changed, self._data_version = version != self._data_version, version
        return changed

    @property
    def armed(self) -> bool:
        """Whether a commit would call ``wake`` now."""
        return self._watcher is not None and self._watcher.armed.is_set()

    def forget_connection(self) -> None:
        self._cursor = None

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self.pushes = False


# The status an outcome ends its row in, by whether it succeeded (a plain str: it is bound for every job).
# --- Opening a store ---------------------------------------------------------------


def open_store(target: str, *, queues: list[str] | None = None, clock: Callable[[], int] | None = None) -> Store:
    """The store of a worker or a Queue on ``target``, connected and its schema applied (or upgraded).

    A SQLite path (or sqlite:// URL), or a postgresql:// URL: then the
    PostgreSQL store, imported only now (worker_postgres.py, its extra).
    """
    if is_postgres(target):
        return cast(Store, postgres_module().open_store(target, queues=queues, clock=clock))
    conn = connect(target)
    try:
        apply_schema(conn)
    except BaseException:
        conn.close()  # not kept: the next use would take it for one with the schema applied
        raise
    return SQLiteStore(conn, queues, clock=clock, path=sqlite_path(target))


def store_in_callers_transaction(conn: Any) -> Store:
    """A store on the caller's own DB-API connection, whose verbs join the caller's transaction (savepoints).

    The tables come with the first use, in the caller's transaction as an
    enqueue would be (a test database, an app before any worker ran).
    """
    if type(conn).__module__.startswith("psycopg"):
        return cast(Store, postgres_module().store_in_callers_transaction(conn))
    if not isinstance(conn, sqlite3.Connection) and not _is_apsw(conn):
        raise TypeError(f"Queue takes a path, a URL or a connection (sqlite3, apsw, psycopg), not {type(conn)!r}")
    apply_schema(conn, transaction=_savepoint)
    return SQLiteStore(conn, nested=True)


def open_wake_up(target: str, store: Callable[[], Store]) -> WakeUp:
    """How a worker on ``target`` learns of commits by others (``store`` gives the worker's current store)."""
    if is_postgres(target):
        listen = os.environ.get("WORKER_PG_LISTEN", "1").strip()
        if listen not in ("0", "1"):
            raise ConfigError(f"invalid WORKER_PG_LISTEN={listen!r} (use 1, or 0 to poll)")
        postgres = postgres_module()
        pooled = postgres.pooler() == "transaction"  # a LISTEN needs a server session of its own
        return cast(WakeUp, postgres.PostgresWakeUp(target, listen=listen == "1" and not pooled))
    return SQLiteWakeUp(sqlite_path(target), lambda: cast(SQLiteStore, store()).conn)


def postgres_module() -> ModuleType:
    """worker_postgres, the PostgreSQL store; ConfigError naming the extra when psycopg is not installed."""
    try:
        import psycopg  # noqa: F401 -- only to say which extra is missing
    except ImportError as e:
        raise ConfigError(
            "a postgresql:// database needs psycopg: pip install 'rowworker[postgres]' "
            "(or 'rowworker[postgres-binary]' where libpq is not installed)"
        ) from e
    return importlib.import_module("worker_postgres")


# --- The worker -----------------------------------------------------------------


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The worker's log on stderr, written through a stream of its own on file descriptor 2.

    A job that closes or replaces ``sys.stderr`` leaves the worker's log as it
    was; and a line that cannot be written at all (fd 2 closed, a full disk, a
    broken pipe) is lost, never raised into the loop: the jobs go on regardless.
    """

    def __init__(self) -> None:
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        try:  # for the life of the process (closefd=False: never closes fd 2)
            stream: Any = open(2, "w", encoding=encoding, errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
        except OSError:  # started with no fd 2
            stream = sys.stderr
        super().__init__(stream)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 -- logging's name
        # logging's own report goes to sys.stderr, and fails there (ValueError)
        # if a job closed it: nothing is left to tell.
        with contextlib.suppress(Exception):
            super().handleError(record)


class JobLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A job's own logger: every line names the job and carries its fields."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return f"job {self.extra['job_id']} {self.extra['job_type']}: {msg}", kwargs


class JobContext:
    """What a job function receives first: its row, a logger, app resources, enqueue."""

    def __init__(
        self, job: Job, *, app: SimpleNamespace, producer: Callable[[], Queue], worker_name: str,
        clock: Callable[[], int] = now_ms, cancelled: Callable[[], threading.Event] = threading.Event,
        progress: ProgressReports | None = None,
    ) -> None:  # fmt: skip
        self.job = job
        self._cancelled = cancelled
        self._progress = progress or ProgressReports()
        self._clock = clock  # the worker's: the follow-ups' times are the server's, as their parent's
        self.app = app
        self.worker = worker_name
        self._producer = producer
        self.follow_ups: list[tuple[dict[str, Any], str]] = []  # (row, on_conflict), inserted with the success

    @functools.cached_property
    def producer(self) -> Queue:
        """The worker's Queue, got when a job first enqueues: getting it may connect, and fail if the database is
        out of reach, which is then the job's error (made before the job ran, it killed the job's thread)."""
        return self._producer()

    @functools.cached_property
    def cancelled(self) -> threading.Event:
        """Set once someone asked to cancel this running job (``worker cancel ID``); a long job may check it (or
        wait on it) and return early.  Its row ends ``cancelled`` however the job then ends."""
        return self._cancelled()

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the job has come (``worker show``, ``worker jobs`` and the dashboard show it): call it as
        often as you like; its worker writes the latest into the row once a second, and before the outcome."""
        self._progress.report(self.job.id, done, total, message, self._clock())

    @functools.cached_property
    def logger(self) -> JobLogger:
        """Made when first used: most jobs never log, and a logger per job is not free."""
        job = self.job
        return JobLogger(
            logging.getLogger(f"worker.job.{job.type}"),
            {"job_id": job.id, "job_type": job.type, "attempt": job.attempt},
        )

    @property
    def id(self) -> int:
        return self.job.id

    @property
    def attempt(self) -> int:
        return self.job.attempt

    @property
    def data(self) -> dict[str, Any]:
        return self.job.data

    def enqueue(self, type: str, data: Mapping[str, Any] | None = None, **options: Any) -> None:
        """Schedule a follow-up job: inserted in the transaction that records this job's success.

        If this attempt fails, times out or its worker dies, the follow-up is
        discarded with it, so a job retried three times enqueues it once.
        Invalid input raises here, as Queue.enqueue would.  It has no id until
        then: ``enqueue_now`` commits at once and returns the row.
        """
        on_conflict = options.pop("on_conflict", "replace")
        if on_conflict not in ("replace", "ignore"):
            raise ValueError(f"on_conflict must be 'replace' or 'ignore', not {on_conflict!r}")
        options.setdefault("now", self._clock())
        self.follow_ups.append((self.producer._new_row(type, data, **options), on_conflict))

    def enqueue_now(self, type: str, data: Mapping[str, Any] | None = None, **options: Any) -> Job:
        """Schedule a job at once, in a transaction of its own (it stays even if this job then fails)."""
        return self.producer.enqueue(type, data, **options)

    async def enqueue_async(self, type: str, data: Mapping[str, Any] | None = None, **options: Any) -> Job:
        """``enqueue_now`` for async jobs: its write runs on a thread, so the job loop goes on meanwhile."""
        return await asyncio.to_thread(self.enqueue_now, type, data, **options)


@dataclasses.dataclass
class Outcome:
    """How one run of a job ended, waiting to be recorded in its row."""

    job: Job
    succeeded: bool
    result: str | None = None  # JSON text
    error: str | None = None
    seconds: float = 0.0
    kind: str = "ok"  # ok | error | interrupted (KeyboardInterrupt) | timeout | unknown | unrecordable | snoozed
    started: int | None = None  # epoch ms the function was called (None: the claim's time stands)
    follow_ups: list[tuple[dict[str, Any], str]] = dataclasses.field(default_factory=list)  # ctx.enqueue's
    snooze_ms: int = 0  # kind snoozed: how long until the next row is due


def _snoozed(job: Job, snooze: Snooze, seconds: float, started_ms: int) -> Outcome:
    """The outcome of a job that raised Snooze: not a failure; its next row is due later (Recording)."""
    return Outcome(job, False, error=str(snooze), seconds=seconds, kind="snoozed", started=started_ms,
                   snooze_ms=snooze.delay_ms)  # fmt: skip


def _failed(job: Job, error: BaseException, seconds: float, started_ms: int) -> Outcome:
    """The outcome of a job function that raised ``error`` (anything: it is the job's own failure)."""
    kind = "interrupted" if isinstance(error, KeyboardInterrupt) else "error"
    return Outcome(job, False, error=_describe_exception(error), seconds=seconds, kind=kind, started=started_ms)


def _returned(job: Job, value: Any, seconds: float, started_ms: int, ctx: JobContext) -> Outcome:
    """The outcome of a job function that returned ``value``: success, if it can be stored as JSON."""
    try:
        result = encode_result(value)
    except BaseException as e:  # anything: a value's own __repr__ or __iter__ may raise what it likes
        why = "nested too deep: " if isinstance(e, RecursionError) else ""
        error = f"result is not JSON-serialisable: {why}{_exception_line(e)}"
        return Outcome(job, False, error=error, seconds=seconds, kind="error", started=started_ms)
    return Outcome(job, True, result=result, seconds=seconds, started=started_ms, follow_ups=ctx.follow_ups)


def _awaitable_returned(job: Job, value: Any, seconds: float, started_ms: int) -> Outcome:
    """A sync job function returned a coroutine (a sync wrapper around an async def?): nothing awaited it."""
    if inspect.iscoroutine(value):
        value.close()  # never to run: no "coroutine was never awaited" warning besides this error
    error = (
        f"job {job.type!r} returned a {type(value).__name__} object instead of a result: its function"
        f" {_qualname(_job_type(job).fn)} is not itself async def, so the worker ran it on a job thread and"
        " nothing awaited what it returned; register the async def function itself (a decorator around it"
        " must be async def too)"
    )
    return Outcome(job, False, error=error, seconds=seconds, kind="error", started=started_ms)


class AsyncRunner:
    """The event loop of a worker's ``async def`` jobs: one thread of its own, up to ``concurrency`` jobs at once.

    The worker hands it the async jobs it claims (``start``) and asks how many
    more it can take (``free``); each job runs as a task on the loop, and its
    Outcome goes to ``hand_over``, as a job thread's does, to be recorded the
    same way.  While jobs are short it takes up to ``concurrency`` more, which
    wait on the loop and start the moment a job ends, not a step of the worker
    later (ASYNC_PREFETCH_JOB_SECONDS); those that wait behind long jobs are
    taken back, for the worker to give back (take_waiting).  A job's timeout
    cancels its task (see Worker.execute_async); at shutdown ``cancel_all``
    cancels what still runs, and the worker gives those rows back.  Async
    hooks run on the same loop (``call``).
    """

    def __init__(
        self, concurrency: int, execute: Callable[[Job], Awaitable[Outcome]], hand_over: Callable[[Outcome], None]
    ) -> None:
        self.concurrency = concurrency
        self._execute, self._hand_over = execute, hand_over
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}  # by job id; touched on the loop's thread only
        # Claimed ahead, waiting for a task to end.  The loop's thread takes the next to begin it, the worker's
        # the lot to give them back (take_waiting); each popleft is atomic, so a job is begun or given back.
        self._waiting: collections.deque[Job] = collections.deque()
        self._began_at = time.monotonic()  # when a job last began on the loop
        self._ahead = 0  # how many jobs beyond ``concurrency`` it may hold
        # Counted apart, each by one thread (started: the worker's step; ended: the loop's), so no lock is needed.
        self._started = 0
        self._ended = 0

    @property
    def running(self) -> int:
        """The async jobs handed to the loop that have not ended yet (running, or waiting to start)."""
        return self._started - self._ended

    @property
    def free(self) -> int:
        return self.concurrency + self._ahead - self.running

    def _loop_running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            if sys.version_info >= (3, 12):
                # A job's first step runs as the loop begins it, not at the
                # loop's next turn: the second turn was most of what an idle
                # async job waited beyond a sync one.  (Python 3.11 has none.)
                loop.set_task_factory(asyncio.eager_task_factory)
            self._thread = threading.Thread(target=loop.run_forever, name="worker-async", daemon=True)
            self._thread.start()
            self._loop = loop
        return self._loop

    def call(self, awaitable: Awaitable[_T], timeout: float | None = None) -> _T:
        """Run ``awaitable`` on the job loop from another thread, and wait for its result (hooks; Worker.work).

        TimeoutError after ``timeout`` seconds (a job that blocks the loop keeps everything else off it).
        """

        async def awaited() -> _T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(awaited(), self._loop_running()).result(timeout)

    def start(self, jobs: list[Job]) -> None:
        """Run claimed async jobs on the loop (from the worker's step): one wake-up of the loop for them all."""
        self._started += len(jobs)
        self._loop_running().call_soon_threadsafe(self._begin_all, jobs)

    def take_waiting(self, patience: float) -> list[Job]:
        """Take back the jobs claimed ahead if none has begun for ``patience`` seconds (every task is a long job):
        the worker gives them back for other workers, and claims no more ahead until a short job ends."""
        if not self._waiting or time.monotonic() - self._began_at <= patience:
            return []
        self._ahead = 0
        taken = []
        with contextlib.suppress(IndexError):
            while True:
                taken.append(self._waiting.popleft())
        self._started -= len(taken)
        return taken

    def _begin_all(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._begin(job)

    def _begin(self, job: Job) -> None:
        if len(self._tasks) >= self.concurrency:
            self._waiting.append(job)
            return
        self._began_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job {job.id}")
        if not task.done():  # started eagerly, a job that never waits has ended already
            self._tasks[job.id] = task

    async def _run(self, job: Job) -> None:
        outcome = None
        try:
            outcome = await self._execute(job)
        except asyncio.CancelledError:
            pass  # cancelled by cancel_all: no outcome, the worker gives its row back
        except BaseException:  # execute_async captures the job's own; this would be the worker's fault
            logger.exception("job %d %s: the job loop failed running it", job.id, job.type)
        finally:
            self._tasks.pop(job.id, None)
            self._ended += 1  # before the hand-over: the worker never counts this slot as free too late
            with contextlib.suppress(IndexError):  # none waiting, or the worker just took them back
                self._begin(self._waiting.popleft())
        if outcome is not None:
            # Claim ahead only while jobs are short: one waiting behind long ones would wait as long.
            self._ahead = self.concurrency if outcome.seconds < ASYNC_PREFETCH_JOB_SECONDS else 0
            self._hand_over(outcome)

    def cancel(self, job_id: int) -> None:
        """Cancel the task of this job, if it is one of this loop's (from any thread)."""
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(lambda: (task := self._tasks.get(job_id)) and task.cancel())

    def cancel_all(self, grace: float) -> None:
        """Cancel the running async jobs and wait up to ``grace`` seconds for their ``finally`` blocks to run."""
        if self._loop is None or not self.running:
            return

        async def cancelled() -> None:
            self._waiting.clear()  # not started: given back as they are
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=grace)

        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(cancelled(), self._loop).result(grace + 1.0)

    def close(self) -> None:
        """Stop the loop and its thread (after the shutdown hooks)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)
        if not loop.is_running():
            loop.close()


class _Write:
    """A worker's write transaction (``immediate``) that tells the worker how long it waited for the lock.

    See Worker._waited.  It wraps the store's ``transaction()``, made at each
    call (the SQLite store's looks ``immediate()`` up each time, so what wraps
    that, as the crash points of test_reliability.py do, wraps this too).

    While it is open the interpreter's switch interval is LOCK_HELD_SWITCH_INTERVAL.
    Each statement lets go of the GIL while SQLite works, and a job thread
    running pure Python takes it and keeps it until the interval forces a
    switch (5 ms by default): a transaction of a few statements held the write
    lock for several intervals, and another worker process waited for it all
    that time (bench/README.md, "Jobs that take milliseconds").
    """

    __slots__ = ("held_up", "lowered_to", "switch_interval", "transaction", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transaction = worker.store.transaction()
        self.held_up = False  # whether this worker had to wait long for the lock, up to this transaction
        self.switch_interval = self.lowered_to = 0.0

    def __enter__(self) -> Any:
        began = time.monotonic()
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(LOCK_HELD_SWITCH_INTERVAL)
        self.lowered_to = sys.getswitchinterval()  # as the interpreter rounded it
        try:
            conn = self.transaction.__enter__()
        except BaseException as e:
            self._restore_switch_interval()
            if isinstance(e, DatabaseUnavailable) and self.worker._refused_since is None:
                self.worker._refused_since = began
            raise
        self.held_up = self.worker._waited(began)
        return conn

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        committed = False
        try:
            self.transaction.__exit__(kind, error, trace)
            committed = kind is None
        finally:
            self.worker._recording.progress.settled(committed)
            self._restore_switch_interval()

    def _restore_switch_interval(self) -> None:
        if sys.getswitchinterval() == self.lowered_to:  # unless a job set one of its own meanwhile
            sys.setswitchinterval(self.switch_interval)


class HousekeepingSchedule:
    """When a worker renews its leases (every lease/3) and sweeps for lost jobs (about every lease/2).

    Pure: no database, no clock of its own; the worker asks what is due and
    says what it did.  A wall clock that steps back, or jumps forward, and a
    long wait for the write lock move the times, as each method says.
    """

    def __init__(self, lease_ms: int, rng: random.Random) -> None:
        self.lease_ms, self.rng = lease_ms, rng
        self.next_heartbeat = self.next_rescue = 0
        self._last_now = 0
        self._last_tick: tuple[int, float] | None = None  # (now, time.monotonic()) when clock_jump last looked

    def heartbeat_due(self, now: int) -> bool:
        """Whether a heartbeat is due at ``now`` (asked first, each tick)."""
        if now < self._last_now:
            # The wall clock stepped back: the next heartbeat and sweep would
            # wait as long, and the leases of our jobs would lapse meanwhile.
            self.next_heartbeat = self.next_rescue = now
        self._last_now = now
        return now >= self.next_heartbeat

    def rescue_due(self, now: int) -> bool:
        """Whether a sweep is due (asked after the heartbeat, which may have postponed it)."""
        return now >= self.next_rescue

    def heartbeat_done(self, now: int) -> None:
        self.next_heartbeat = now + self.lease_ms // 3

    def rescue_done(self, now: int) -> None:
        # Jitter keeps several workers from sweeping in lockstep; max: a sweep
        # may have been postponed further meanwhile (postpone_rescue).
        self.next_rescue = max(self.next_rescue, now + round(self.lease_ms / 2 * self.rng.uniform(0.8, 1.0)))

    def postpone_rescue(self, until: int) -> None:
        """Take no lease for lost before ``until``."""
        self.next_rescue = max(self.next_rescue, until)

    def clock_jump(self, now: int, monotonic: float) -> float | None:
        """After the wall clock jumped forward (ms, returned; else None): heartbeat at once, sweep a lease later.

        A jump (an NTP step, a VM resumed from suspend) makes every lease on
        this host look expired, though their workers are alive: each of them
        notices it at its next tick and renews its leases, so a worker that
        waits a lease before its next sweep re-runs nothing.
        """
        jumped_ms = None
        if self._last_tick is not None:
            then, monotonic_then = self._last_tick
            jumped = (now - then) - (monotonic - monotonic_then) * 1000
            if jumped > self.lease_ms / 10:
                jumped_ms = jumped
                self.next_heartbeat = now
                self.postpone_rescue(now + self.lease_ms)
        self._last_tick = (now, monotonic)
        return jumped_ms


def default_prefetch(db: str, concurrency: int) -> int:
    """The most jobs a worker claims ahead unless told: PostgreSQL's steps are round trips, and pay for far more."""
    return POSTGRES_PREFETCH if is_postgres(db) else max(DEFAULT_PREFETCH, PREFETCH_PER_THREAD * concurrency)


class ClaimAhead:
    """How many jobs a claim takes beyond the free slots: enough to keep every thread busy through a round trip.

    A job thread that finishes hands its outcome to the loop, and takes its
    next job from those claimed ahead; the loop records the outcome and claims
    again in one commit.  Jobs claimed ahead must last the threads for that
    round trip (Little's law): with every thread busy a job starts every
    ``job_seconds / concurrency``, so ``round_trip / that`` jobs start during
    one, and PREFETCH_ROUND_TRIPS of that are claimed ahead, up to
    ``limit`` (the worker's prefetch).  Both times are measured, as moving
    averages, so this holds for no-op jobs and for jobs of milliseconds alike.
    No job is claimed ahead when a thread frees up less often than every
    PREFETCH_PATIENCE / 2: one claimed ahead would then often wait behind longer
    jobs, held from other workers, until it is given back.  Pure: the worker
    says what it measured, and asks ``jobs``.
    """

    SMOOTHING = 0.25  # weight of the newest measure in each moving average

    def __init__(self, concurrency: int, limit: int) -> None:
        self.concurrency, self.limit = concurrency, limit
        self.job_seconds: float | None = None  # a job's run, on average
        self.round_trip_seconds = 0.0  # a step of the loop: outcomes received, recorded and claimed again
        self.jobs = 0

    def finished(self, seconds: Iterable[float]) -> None:
        """Jobs finished in ``seconds`` each (one batch of outcomes)."""
        runs = list(seconds)
        if runs:
            self.job_seconds = self._averaged(self.job_seconds, sum(runs) / len(runs))
            self.jobs = self._sized()

    def stepped(self, seconds: float) -> None:
        """A step of the loop that recorded or claimed took ``seconds``."""
        self.round_trip_seconds = self._averaged(self.round_trip_seconds or None, seconds)

    def stop(self) -> None:
        """Claim none ahead until the next outcomes (a job timed out, or jobs waiting were given back)."""
        self.jobs = 0

    def _averaged(self, average: float | None, newest: float) -> float:
        return newest if average is None else average + self.SMOOTHING * (newest - average)

    def _sized(self) -> int:
        if self.job_seconds is None or self.limit == 0:
            return 0
        start_every = max(self.job_seconds, 1e-6) / self.concurrency
        if start_every > PREFETCH_PATIENCE / 2:
            return 0
        return min(self.limit, math.ceil(PREFETCH_ROUND_TRIPS * self.round_trip_seconds / start_every))


CANCEL_LOOK_MS = 500  # how often a worker with running jobs looks for requests to cancel one


class CancelRequests:
    """Requests to cancel this worker's running jobs: looked for in its housekeeping, passed to each job as
    ``ctx.cancelled``, and turned into the outcome the row ends with.

    The request reaches a job when the worker sets its event; a job whose
    outcome reached the worker's loop before that keeps its own outcome.
    """

    def __init__(self) -> None:
        self._events: dict[int, threading.Event] = {}  # made only for jobs that look, or that were asked
        self._asked: dict[int, tuple[int, str | None]] = {}  # job id -> (when, by whom)
        self._next_look = 0
        self.on_asked: Callable[[int], None] = lambda job_id: None  # the worker's: an async job is cancelled

    def event(self, job_id: int) -> threading.Event:
        return self._events.setdefault(job_id, threading.Event())

    def asked(self, job_id: int) -> bool:
        return job_id in self._asked

    def any(self) -> bool:
        """Whether any job has an event or a request (else nothing to do when outcomes are recorded)."""
        return bool(self._events or self._asked)

    def look(self, store: Store, owner: str, running: Container[int], now: int) -> list[_Note]:
        """Every CANCEL_LOOK_MS: set the event of each running job that someone asked to cancel."""
        if now < self._next_look:
            return []
        self._next_look = now + CANCEL_LOOK_MS
        notes = []
        for job_id, asked_at, by in store.cancel_requests(owner):
            if job_id in running and job_id not in self._asked:
                self._asked[job_id] = (asked_at, by)
                self.event(job_id).set()
                self.on_asked(job_id)
                notes.append(_Note(logging.INFO, "job %d: asked to cancel it (by %s); ctx.cancelled is set",
                                   (job_id, by), {"action": "cancel", "job_id": job_id}))  # fmt: skip
        return notes

    def outcome(self, outcome: Outcome) -> None:
        """Make ``outcome`` the one its job's row ends with: ``cancelled`` if the request reached it first, beside
        what it returned or raised; else left as it is.

        Changed in place: the request is used up here, before the transaction
        that records the outcome commits, and if that fails the worker records
        the same outcome again (a copy made it succeed then, with its follow-ups).
        """
        job_id = outcome.job.id
        self._events.pop(job_id, None)
        asked = self._asked.pop(job_id, None)
        if asked is None or outcome.kind in ("timeout", "unrecordable"):
            return
        request = f"cancelled while running (asked by {asked[1] or 'someone'} at {iso_time(asked[0])})"
        if outcome.kind == "not started":
            error = request.replace("while running", "before it started")
        elif outcome.succeeded:
            error = f"{request}; it then returned (its result is kept)"
        else:
            error = f"{request}; it then {'snoozed' if outcome.kind == 'snoozed' else 'raised'}:\n{outcome.error}"
        outcome.succeeded, outcome.error, outcome.kind, outcome.follow_ups = False, error, "cancelled", []


PROGRESS_INTERVAL_MS = 1000  # a job's progress is written at most this often, however often it reports
PROGRESS_MESSAGE_LIMIT = 200  # characters of a progress message kept


class ProgressReports:
    """The latest ``ctx.progress`` of each running job, written into its row by the worker: at most once per
    PROGRESS_INTERVAL_MS (in its housekeeping), and once more before the job's outcome, so a job reporting in a
    tight loop costs the database one write a second."""

    def __init__(self) -> None:
        self._latest: dict[int, str] = {}  # job id -> its progress as JSON, not written yet
        # Written by the worker's transaction under way: reported again should that fail (see settled).
        self._unsettled: dict[int, str] = {}
        self._next_write = 0

    def report(self, job_id: int, done: float, total: float | None, message: str | None, now: int) -> None:
        for name, value in (("done", done), ("total", total)):
            if value is None and name == "total":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"progress: {name} must be a finite number, 0 or more, not {value!r}")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"progress: message must be text, not {type(message).__name__}")
        message = message and encodable(message[:PROGRESS_MESSAGE_LIMIT])
        self._latest[job_id] = JSON.encode({"done": done, "total": total, "message": message, "at": now})

    def due(self, now: int) -> bool:
        """Whether a write of every job's report is due (something was reported, and the interval is up)."""
        return bool(self._latest) and now >= self._next_write

    def write(self, store: Store, owner: str, now: int, only: Iterable[int] | None = None) -> None:
        """Write what was reported since the last write: every job's once the interval is up, or ``only`` those."""
        if not self._latest:
            return
        if only is None:
            if now < self._next_write:
                return
            self._next_write = now + PROGRESS_INTERVAL_MS
            ids = list(self._latest)
        else:
            ids = [job_id for job_id in only if job_id in self._latest]
        reports = [(job_id, text) for job_id in ids if (text := self._latest.pop(job_id, None)) is not None]
        if reports:
            store.write_progress_if_owned(owner, reports)
            self._unsettled.update(reports)

    def settled(self, committed: bool) -> None:
        """The worker's transaction ended (its _Write): what it wrote is in the rows, or, if it failed, waits to be
        written again (a job's last report, written with its outcome, was lost with the transaction)."""
        if not committed:
            for job_id, text in self._unsettled.items():
                self._latest.setdefault(job_id, text)  # unless the job has reported since
        self._unsettled.clear()


def progress_text(text: str | None) -> str:
    """A row's progress for people: "40/100 (40 %) copying rows"; empty for none, the text for a stranger's."""
    if not text:
        return ""
    try:
        report = json.loads(text)
        done, total, message = report.get("done"), report.get("total"), report.get("message")
        shown = f"{done:g}"
        if total:
            shown += f"/{total:g} ({100 * done / total:.0f} %)"
        return f"{shown} {message}" if message else shown
    except (ValueError, TypeError, AttributeError):
        return text


def progress_fraction(text: str | None) -> float | None:
    """done / total of a row's progress, between 0 and 1; None without a total."""
    try:
        report = json.loads(text or "")
        return min(max(float(report["done"]) / float(report["total"]), 0.0), 1.0)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError):
        return None


class Recording:
    """How a worker ends what it claimed, by each job's policy: the part of the worker that writes outcomes.

    Each outcome's row is finished, fenced on the worker's ownership; then
    what follows it: its follow-up jobs, its next attempt, its next cron run.
    Rows whose worker was lost are rescued, and unreadable claimed rows failed.
    Every method runs inside the worker's write transaction and returns the
    log notes, emitted once that commits.  ``scheduled`` is told the due time
    of each row it makes, so the loop knows when to claim again.
    """

    def __init__(
        self, owner: str, *, keep_succeeded_ms: int, keep_failed_ms: int, max_deaths: int, rng: random.Random,
        scheduled: Callable[[int], None],
    ) -> None:  # fmt: skip
        self.store: Store = cast(Store, None)  # the worker's, set each time it opens one
        self.owner, self.max_deaths, self.rng, self.scheduled = owner, max_deaths, rng, scheduled
        self.cancels = CancelRequests()
        self.progress = ProgressReports()
        self.keep_succeeded_ms, self.keep_failed_ms = keep_succeeded_ms, keep_failed_ms

    def record(self, outcomes: list[Outcome], now: int) -> list[_Note]:
        """End the rows of ``outcomes`` (one batch, fenced on this worker's ownership), then what follows each."""
        if self.cancels.any():
            for outcome in outcomes:
                self.cancels.outcome(outcome)
        self.progress.write(self.store, self.owner, now, only=[outcome.job.id for outcome in outcomes])
        for outcome in outcomes:
            if outcome.kind == "snoozed":
                self.snooze(outcome, now)
        ended = [(o.job.id, _ended_as(o), o.result, o.error, o.started, self.keep_ms(o)) for o in outcomes]
        owned = self.store.finish_many_if_owned(self.owner, now, ended) if ended else set()
        notes: list[_Note] = []
        finished: list[tuple[int, str, str]] = []
        for outcome in outcomes:
            notes.extend(self.finish(outcome, now, finished, outcome.job.id in owned))
        self.store.count_finished(finished)
        return notes

    def snooze(self, outcome: Outcome, now: int) -> None:
        """Make the row a snoozed job asks for, before its own row ends: or, past MAX_SNOOZES, fail it instead."""
        job = outcome.job
        if self.store.snoozes(job.id) >= MAX_SNOOZES:
            outcome.kind, outcome.error = "error", f"snoozed {MAX_SNOOZES} times (the most a chain may): given up"
            return
        due = min(now + outcome.snooze_ms, MAX_TIME_MS)
        next_id = self.store.schedule_snooze_if_owned(job.id, self.owner, due=due, now=now)
        # From the Snooze's own message, not outcome.error: a transaction that failed after this (the outcome
        # kept, recorded again) added to that already.
        said = Snooze.message(outcome.snooze_ms)
        if next_id is None:
            outcome.error = f"{said}: not run again (a newer pending job holds its tag, or it was rescued)"
        else:
            self.scheduled(due)
            outcome.error = f"{said}: job {next_id} runs it then"

    def keep_ms(self, outcome: Outcome) -> int:
        keep_default = self.keep_succeeded_ms if outcome.succeeded else self.keep_failed_ms
        keep_ms: int = _first(_job_type(outcome.job).keep_ms, keep_default)
        return keep_ms

    def finish(self, outcome: Outcome, now: int, finished: list[tuple[int, str, str]], owned: bool) -> list[_Note]:
        """What follows a row ended (``owned``: it was still this worker's): follow-ups, retry, next cron run, notes."""
        job = outcome.job
        status = _ended_as(outcome)
        if not owned:
            return [self.not_owned(outcome, status)]
        finished.append((max(now, outcome.started or 0), job.queue, status))  # as finish_if_owned wrote them
        if outcome.kind == "snoozed":  # its next row is the rest of this run: no retry, no next cron run
            return [_Note.about(job, "snoozed", logging.INFO, "job %d %s %s", job.id, job.type, outcome.error)]
        if outcome.kind == "cancelled":  # no retry; a recurring job's schedule goes on
            note = _Note.about(job, "cancelled", logging.WARNING, "job %d %s %s", job.id, job.type, outcome.error)
            return [note, *self.schedule_next_cron_run(job, now)]
        if outcome.succeeded:
            for row, on_conflict in outcome.follow_ups:  # committed with the success, or not at all
                self.store.insert(row, on_conflict)
                self.scheduled(row["due"])
            notes = []
            if logger.isEnabledFor(logging.INFO):  # the one note of every job: skipped when it would not show
                message = "job %d %s succeeded in %.1f ms (attempt %d)"
                notes.append(_Note.about(job, "succeeded", logging.INFO, message, job.id, job.type,
                                         outcome.seconds * 1000, job.attempt))  # fmt: skip
            return notes + self.schedule_next_cron_run(job, now)
        # An outcome that could not be recorded ends its row with no retry and no next cron run:
        # inserting either copies the row, which is what may have failed (sync_cron restores a schedule).
        unrecordable = outcome.kind == "unrecordable"
        retry = None if unrecordable else self.schedule_retry(job, now, deaths=job.deaths)
        level = logging.ERROR if outcome.kind in ("timeout", "unknown", "unrecordable") else logging.WARNING
        summary = outcome.error.splitlines()[0] if outcome.error else "failed"
        then = f"retry {retry[0]} due in {retry[1] / 1000:.1f} s" if retry else "no retry left"
        message = "job %d %s failed (attempt %d): %s; %s\n%s"
        notes = [_Note.about(job, "failed", level, message, job.id, job.type, job.attempt, summary, then,
                             outcome.error)]  # fmt: skip
        return notes + ([] if retry or unrecordable else self.schedule_next_cron_run(job, now))

    def not_owned(self, outcome: Outcome, status: str) -> _Note:
        """The note of an outcome whose row this worker no longer held: ended already by its own commit whose
        reply was lost (the outcome was kept and recorded again), or rescued after its lease expired."""
        job = outcome.job
        try:
            row = self.store.get(job.id)
        except DatabaseUnavailable:
            raise
        except (DatabaseError, ValueError, RecursionError):  # a row another program made unreadable since
            row = None
        # A rescue leaves the owner too, but fails the row with an error of its own.
        if (
            row is not None
            and (row.owner, row.status) == (self.owner, status)
            and (status != Status.FAILED.value or row.error == outcome.error)
        ):
            message = "job %d %s: recorded already, by the commit whose reply was lost"
            return _Note.about(job, "recorded", logging.INFO, message, job.id, job.type)
        message = "job %d %s: result discarded: this worker no longer holds it (rescued after its lease expired)"
        return _Note.about(job, "discarded", logging.WARNING, message, job.id, job.type)

    def schedule_next_cron_run(self, job: Job, now: int) -> list[_Note]:
        """After the last attempt of a recurring job's run: insert the run for the next slot."""
        if not job.cron_schedule:
            return []
        try:
            due, skipped = next_cron_due(job.cron_schedule, job.cron_timezone, _first(job.cron_slot, job.due), now)
        except ValueError as e:
            return [_Note.about(job, "cron", logging.ERROR, "job %d %s: no next run: %s", job.id, job.type, e)]
        next_id = self.store.schedule_next_cron_run(job.id, due=due, now=now)
        if next_id is None:
            return []  # another writer already holds the pending row of this schedule
        self.scheduled(due)
        if skipped:
            message = "job %d %s: missed cron slots skipped (not run late); next run %d due %s"
            return [_Note.about(job, "cron", logging.WARNING, message, job.id, job.type, next_id, iso_time(due))]
        message = "job %d %s: next run %d due %s"
        return [_Note.about(job, "cron", logging.DEBUG, message, job.id, job.type, next_id, iso_time(due))]

    def schedule_retry(self, job: Job, now: int, *, deaths: int, at_once: bool = False) -> tuple[int, int] | None:
        """Insert the next attempt if the policy allows; returns (its id, delay ms)."""
        if job.attempt >= MAX_COUNT:  # a row written by another program: attempt + 1 would leave the table's range
            return None
        if not at_once and not attempts_left(job, _first(job.max_attempts, _job_type(job).max_attempts, 1)):
            return None
        delay = 0 if at_once else self.retry_delay_ms(job)
        due = min(now + delay, MAX_TIME_MS)
        # deaths clamped as _deaths() counts them (the retry is attempt + 1): a nonsense count is not copied on.
        deaths = min(max(deaths, 0), job.attempt)
        retry_id = self.store.schedule_next_attempt(job.id, due=due, deaths=deaths, now=now)
        if retry_id is None:
            return None
        self.scheduled(due)
        return retry_id, delay

    def retry_delay_ms(self, job: Job) -> int:
        """How long after a failure of ``job`` its next attempt is due."""
        job_type = _job_type(job)
        return retry_delay_ms(
            _first(job.retry_delay_ms, job_type.retry_delay_ms, to_ms(DEFAULT_RETRY_DELAY)),
            _first(job.backoff, job_type.backoff, DEFAULT_BACKOFF),
            failures_before=job.attempt - _deaths(job) - 1,
            jitter=self.rng.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER),
        )

    def rescue(self, now: int) -> list[_Note]:
        notes = []
        finished: list[tuple[int, str, str]] = []
        lost, unreadable = self.store.expired_leases(self.owner, now)
        for unreadable_row, why in unreadable:
            notes += self.rescue_unreadable(unreadable_row, why, now, finished)
        for job in lost:
            deaths = job.deaths + 1
            given_up = poisoned(deaths, self.max_deaths)
            if given_up:
                error = f"worker died {deaths} times running this job; giving up (last: worker {job.worker})"
            else:
                error = f"worker lost: lease expired (worker {job.worker})"
            keep_ms = _first(_job_type(job).keep_ms, self.keep_failed_ms)
            if not self.store.rescue_if_expired(job.id, now, error, keep_ms):
                continue
            finished.append((now, job.queue, Status.FAILED.value))
            # A worker's death is not the job's failure: retry at once, whatever
            # max_attempts says, until the chain has killed max_deaths workers.
            retry = None if given_up else self.schedule_retry(job, now, deaths=deaths, at_once=True)
            then = f"retry {retry[0]} due now" if retry else "no retry"
            message = "job %d %s failed (attempt %d): %s; %s"
            notes.append(
                _Note.about(job, "rescued", logging.ERROR, message, job.id, job.type, job.attempt, error, then)
            )
            if not retry:
                notes += self.schedule_next_cron_run(job, now)
        self.store.count_finished(finished)
        return notes

    def rescue_unreadable(self, job: Job, why: str, now: int, finished: list[tuple[int, str, str]]) -> list[_Note]:
        """An expired row that cannot be read: failed, with no retry (it would be as unreadable)."""
        error = f"cannot run this row: {why} (and its worker was lost: lease expired)"
        if not self.store.rescue_if_expired(job.id, now, error, self.keep_failed_ms):
            return []
        finished.append((now, job.queue, Status.FAILED.value))
        return [_Note.about(job, "rescued", logging.ERROR, "job %d %s failed: %s", job.id, job.type, error)]

    def fail_unreadable(self, job: Job, why: str, now: int) -> _Note:
        """End a claimed row that cannot be run: failed, no retry (it would be as unreadable), logged once."""
        error = f"cannot run this row: {why}"
        try:
            with self.store.savepoint():  # its failure must not fail the claim it is part of
                self.store.finish_if_owned(job.id, self.owner, Status.FAILED.value, now, None, error, None,
                                            self.keep_failed_ms)  # fmt: skip
        except DatabaseUnavailable:
            raise
        except DatabaseError as e:
            # Not even this write is possible (a trigger of the app's?): the row stays
            # `running` under this worker, set aside, and is rescued once it stops.
            error = f"{error}; and it could not be marked failed ({e}): set aside"
        else:
            self.store.count_finished([(now, job.queue, Status.FAILED.value)])
        return _Note.about(job, "unreadable", logging.ERROR, "job %d %s failed: %s", job.id, job.type, error)


_ENDED_AS = {True: Status.SUCCEEDED.value, False: Status.FAILED.value}


def claim_order(job: Job) -> tuple[int, int, int]:
    """The order a claim takes due jobs in, and the job threads start them: highest priority, earliest due, first id."""
    return -job.priority, job.due, job.id


def _given_back(job: Job, status: str | None, level: int, why: str) -> list[_Note]:
    """What to log of a job given back, by the status give_back_if_owned left it in (None: not this worker's)."""
    if status == Status.PENDING:
        return [_Note.about(job, "given_back", level, "job %d %s given back: %s", job.id, job.type, why)]
    if status == Status.CANCELLED:
        message = "job %d %s not given back (%s): a newer pending job holds its tag %r; cancelled"
        return [_Note.about(job, "cancelled", level, message, job.id, job.type, why, job.tag)]
    return []


def _ended_as(outcome: Outcome) -> str:
    """The status an outcome ends its row in."""
    return Status.CANCELLED.value if outcome.kind in ("snoozed", "cancelled") else _ENDED_AS[outcome.succeeded]


class Worker:
    """Claims due jobs, runs them on ``concurrency`` threads, records every outcome.

    ``run()`` is the long-running loop of ``worker run``; ``work()`` is one
    synchronous step (claim, run here, record) that tests drive with a fake
    ``clock`` (a callable returning epoch seconds).
    """

    def __init__(
        self,
        db: str | os.PathLike[str],
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queues: Iterable[str] | None = None,
        lease: Seconds = DEFAULT_LEASE,
        shutdown_timeout: Seconds = DEFAULT_SHUTDOWN_TIMEOUT,
        burst: bool = False,
        max_deaths: int = DEFAULT_MAX_DEATHS,
        poll_interval: float = POLL_INTERVAL,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        cron: bool = True,
        keep_succeeded: Seconds | None = None,
        keep_failed: Seconds | None = None,
        prefetch: int | None = None,
        async_concurrency: int = DEFAULT_ASYNC_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if async_concurrency < 1:
            raise ConfigError("async concurrency must be at least 1")
        if not 100 <= to_ms(lease) <= MAX_DURATION_MS:
            raise ConfigError("lease must be at least 0.1 s (and at most 100 years)")
        if max_deaths < 1:
            raise ConfigError("max_deaths must be at least 1")
        if prefetch is None:
            prefetch = default_prefetch(os.fspath(db), concurrency)
        if prefetch < 0:
            raise ConfigError("prefetch must be 0 or more")
        self.db = os.fspath(db)
        self.concurrency = concurrency
        self.queues = sorted(set(queues)) if queues else None
        self.lease_ms = to_ms(lease)
        self.shutdown_timeout = to_ms(shutdown_timeout) / 1000
        self.burst = burst
        self.max_deaths = max_deaths
        self.prefetch = prefetch
        self.poll_interval = poll_interval
        self.clock = clock
        self.rng = rng or random.Random()
        self.cron = cron
        try:
            keep_succeeded_ms, keep_failed_ms = _optional_ms(keep_succeeded, "keep"), _optional_ms(keep_failed, "keep")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.keep_succeeded_ms = default_keep_ms(succeeded=True) if keep_succeeded_ms is None else keep_succeeded_ms
        self.keep_failed_ms = default_keep_ms(succeeded=False) if keep_failed_ms is None else keep_failed_ms
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.owner = secrets.token_hex(8)
        self._recording = Recording(
            self.owner, keep_succeeded_ms=self.keep_succeeded_ms, keep_failed_ms=self.keep_failed_ms,
            max_deaths=max_deaths, rng=self.rng, scheduled=self._scheduled,
        )  # fmt: skip
        self.app = SimpleNamespace()
        self._producer: Queue | None = None

        self._registered: tuple[str, ...] = ()  # the job types when _types_json was made
        self._types_json = "[]"
        # The same, split: run on job threads, and async def ones, run on the job loop (None: there are none).
        self._thread_types_json: str | None = None
        self._async_types_json: str | None = None

        self._store: Store = cast(Store, None)  # opened on first use (see store): the hot path reads it directly
        self._pid = 0  # of the process that opened it
        self._replaced: str | None = None  # why the worker stopped: its database was replaced
        self._started_up = False
        # Claimed and not yet recorded: started, or waiting in _todo for a thread.
        self._running: dict[int, Job] = {}
        # job id -> (time.monotonic() deadline, timeout ms), for started jobs with a
        # timeout; monotonic, so a wall clock stepped forward does not time jobs
        # out.  Job threads add to it as they start a job, hence its own lock.
        self._deadlines: dict[int, tuple[float, int]] = {}
        self._deadlines_lock = threading.Lock()
        self._ahead = ClaimAhead(concurrency, prefetch)  # how many jobs a claim may take beyond the free slots
        self._progress_at = 0.0  # time.monotonic() when a claim last queued jobs or a thread started one
        self._alone: int | None = None  # a job run alone (see _claim)
        self._wake_up: WakeUp = open_wake_up(self.db, lambda: self.store)
        self._wants_commits = False  # idle: a commit by another process may bring work
        self._woken_at = 0.0  # time.monotonic() of the watcher's last wake-up
        self._todo: queue_module.SimpleQueue[Job | None] = queue_module.SimpleQueue()
        self._lowest_priority_queued = 0  # of the last job put in _todo (the lowest of those waiting, if any are)
        # An outcome goes through three hands, in this order.  1: job threads hand
        # it over here; the main loop sleeps on it, so a finished job wakes it at
        # once (None only wakes it: stop() was called).
        self._handed_over: queue_module.SimpleQueue[Outcome | None] = queue_module.SimpleQueue()
        self._async = AsyncRunner(async_concurrency, self.execute_async, self._handed_over.put)
        self._recording.cancels.on_asked = self._async.cancel  # an operator's cancel reaches a coroutine so
        # 2: taken off that queue by the loop (or given by a job thread's own step).
        self._received: list[Outcome] = []
        # 3: its job is no longer running here (timeouts noted): written by the next step's transaction.
        self._to_record: list[Outcome] = []
        # time.monotonic() of the oldest outcome handed over and not yet taken off
        # _handed_over (written by job threads), and of those the last step took.
        self._handed_over_at: float | None = None
        self._round_trip_from: float | None = None
        # A claim may have committed though this worker was told it failed (the
        # connection dropped before the reply): see _give_back_unknown.
        self._claim_in_doubt = False
        self._stopping = threading.Event()
        # Held for every step of the loop: by the main thread, or by a job thread
        # that has just finished a job (see _job_thread).  It guards the
        # store and the loop's state (_running, _to_record, ...).
        self._step_lock = threading.Lock()
        self._step_failure: BaseException | None = None  # raised by a job thread's step, for run() to raise
        self._threads_lock = threading.Lock()
        self._surplus_threads = 0  # replacements started for threads stuck in timed-out jobs
        self._next_due = 0
        self._last_claim_full = True
        self._nothing_due = False
        self._schedule = HousekeepingSchedule(self.lease_ms, self.rng)
        self._busy_backoff = 0.0
        # time.monotonic() since when this worker's writes have been refused as
        # busy (None while they go through): how long it has waited for the lock.
        self._refused_since: float | None = None
        self._claim_notes: list[_Note] = []  # of rows a claim failed as unreadable
        self._claim_skipped = (False, False)  # kinds (job threads, job loop) the last claim had no slot for

    # -- connection ---------------------------------------------------------------

    @property
    def store(self) -> Store:
        """This worker's own store (its connection), opened and the schema applied on first use; refused after fork."""
        if self._store is None:
            # A clock given to the worker (a test's) is the store's too; else the store's own judges leases.
            clock = None if self.clock is time.time else self.now
            self._store, self._pid = open_store(self.db, queues=self.queues, clock=clock), _process_id
            if isinstance(self._store, SQLiteStore):
                self._store.lock_wait = ProducerLockWait()  # beside other workers, look for the lock often
            self._recording.store = self._store
        elif self._pid != _process_id:
            raise ForkedConnection(f"worker connection opened in process {self._pid} used in process {_process_id}")
        return self._store

    @property
    def producer(self) -> Queue:
        """The Queue that jobs' ``ctx.enqueue_now`` writes through (a connection per job thread that does).

        The worker's own threads only build rows with it (cron sync, follow-ups)
        and write them through the store, so it connects only when a job calls
        enqueue_now: a follow-up never fails for a connection that a dropped
        server or a restart took away (it did when this Queue checked the
        database as it was made, in the job's ctx.enqueue).
        """
        if self._producer is None:
            self._producer = Queue._unopened(database_target(self.db))
        return self._producer

    def now(self) -> int:
        """The time leases are judged by, in epoch ms: the store's clock (PostgreSQL's is the server's), or the
        ``clock`` the worker was given."""
        if self.clock is time.time and self._store is not None:
            return self._store.now()
        return int(self.clock() * 1000)

    def start_up(self) -> None:
        """Open the database and run the @on_startup hooks (once)."""
        if self._started_up:
            return
        began = time.monotonic()
        self.store  # noqa: B018 -- fail early, before any hook runs, if the database is unusable
        if self.cron:
            self.sync_cron()
        if any(job_type.is_async for job_type in REGISTRY.values()):
            self.producer  # noqa: B018 -- made now: made by an async job's first ctx.enqueue, it connects on the loop
        now = self.now()
        store = self.store
        with store.transaction():
            store.register_process(
                {"id": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "lease_ms": self.lease_ms,
                 "concurrency": self.concurrency, "queues": ",".join(self.queues) if self.queues else None,
                 "version": __version__, "types": self._known_types()},
                now,
            )  # fmt: skip
        self._waited(began)  # a start that waited for another writer's lock judges no lease at once
        for hook in STARTUP_HOOKS:
            self._call_hook(hook)
        self._started_up = True

    def sync_cron(self, now: int | None = None) -> None:
        """Give every job declared with ``cron=`` exactly one pending row.

        In one write transaction per job, so workers starting together create
        one row between them; a row with another expression is replaced.
        """
        now = self.now() if now is None else now
        producer = self.producer  # opened before the transaction below, not inside it
        for job_type in list(REGISTRY.values()):
            if job_type.cron is None:
                continue
            tag = job_type.cron_tag
            store = self.store
            with store.transaction():
                pending = store.pending_with_tag(tag)
                if pending and (pending.cron_schedule, pending.cron_timezone) == (job_type.cron, job_type.timezone):
                    continue
                if pending is None and store.cron_run_running(tag, job_type.cron, job_type.timezone):
                    # A run is under way (or its worker died): when it ends, or its
                    # retry chain does, it schedules the next slot itself.  A pending
                    # row now would take the tag and drop the retry of a rescued run.
                    continue
                try:
                    due = first_free_cron_slot(store, tag, job_type.cron, job_type.timezone, now)
                except ValueError as e:  # a slot written by another program, say in the year 9999
                    logger.error("cron job %s: cannot schedule its next run: %s", job_type.name, e)
                    continue
                row = producer._new_row(
                    job_type.name, None, at=due / 1000, tag=tag, cron=job_type.cron, timezone=job_type.timezone, now=now
                )
                # "ignore" when no pending row was seen: on PostgreSQL another worker
                # starting now may have inserted this slot's row since (its read
                # committed snapshot), and replacing it made a second row for the slot.
                scheduled = store.insert(row, "replace" if pending else "ignore")
            logger.info(
                "cron job %s (%s%s): next run %d due %s",
                job_type.name,
                job_type.cron,
                f" {job_type.timezone}" if job_type.timezone else "",
                scheduled.id,
                iso_time(scheduled.due),
            )

    def close(self) -> None:
        """Run the @on_shutdown hooks and close the connections."""
        if self._started_up:
            for hook in SHUTDOWN_HOOKS:
                try:
                    self._call_hook(hook, timeout=max(self.shutdown_timeout, CANCELLED_JOB_GRACE))
                except Exception:
                    logger.exception("shutdown hook %s failed", _qualname(hook))
            self._started_up = False
        self._async.close()
        if self._producer is not None:
            self._producer.close()
        if self._store is not None and self._pid == _process_id:
            with contextlib.suppress(DatabaseError):  # a stale row is harmless; status shows it as such
                self._store.forget_process(self.owner)
            self._store.close()
        self._store = cast(Store, None)
        self._wake_up.forget_connection()

    def _call_hook(self, hook: Callable[[SimpleNamespace], Any], timeout: float | None = None) -> None:
        """Run a startup or shutdown hook: an async def one on the job loop (within ``timeout`` s), where async jobs
        will use what it made."""
        if is_coroutine_function(hook):
            self._async.call(hook(self.app), timeout)
        else:
            hook(self.app)

    # -- the steps ----------------------------------------------------------------

    def claim(self, limit: int, now: int | None = None) -> list[Job]:
        """Claim up to ``limit`` due jobs in one write transaction."""
        now = self.now() if now is None else now
        with self._write():
            claimed = self._claim(limit, now)
        _emit(self._claim_notes)
        return claimed

    def _claim(self, limit: int, now: int, async_limit: int | None = None) -> list[Job]:
        """Claim up to ``limit`` jobs of any type; or, given ``async_limit`` (the loop's step), up to ``limit`` of the
        types that run on job threads and up to ``async_limit`` of the async def ones."""
        self._claim_notes = []  # written once the claim commits
        store = self._store
        lease_until, types = now + self.lease_ms, self._known_types()
        if not self._running and store.any_suspect():
            # A job whose worker died may have killed it: an idle worker runs it
            # alone, so it takes no innocent job down with it (and the deaths it
            # adds up are its own).
            suspect = self._claim_of(types, 1, now, lease_until, [], suspect=True)
            if suspect:
                self._alone = suspect[0].id
                self._last_claim_full = True
                return suspect
        kinds = [(types, limit)] if async_limit is None else self._claim_kinds(limit, async_limit)
        jobs: list[Job] = []
        if len(kinds) == 2 and not self._running:
            # Jobs of either kind fit in the smaller kind's free slots: one
            # statement claims from both, so an idle worker's claim is one
            # statement whatever kind its job is.  Only a claim that fills
            # leaves more due, for the kinds' claims of what is left (a busy
            # worker claims per kind at once: two statements, not three).
            both = min(slots for _, slots in kinds)
            jobs = self._claim_of(types, both, now, lease_until, jobs)
            awaited = sum(1 for job in jobs if _job_type(job).is_async)
            taken = (len(jobs) - awaited, awaited)
            left = [(of, slots - got) for (of, slots), got in zip(kinds, taken, strict=True)]
            kinds = left if len(jobs) == both else []
        full = any(slots <= 0 for _, slots in kinds)  # a kind whose slots the first claim filled
        for kind_types, kind_limit in kinds:
            if kind_limit > 0:
                got = self._claim_of(kind_types, kind_limit, now, lease_until, jobs)
                full = full or len(got) == kind_limit
                jobs += got
        if len(jobs) > 1:  # RETURNING gives no order: start them in claim order
            jobs.sort(key=claim_order)
        self._last_claim_full = full
        if not full:
            due_types = kinds[0][0] if len(kinds) == 1 else self._types_json  # of the kinds with room
            next_due = store.next_due(due_types)
            self._next_due = next_due if next_due is not None else 2**62
        for claimed in jobs if logger.isEnabledFor(logging.DEBUG) else ():
            logger.debug(
                "job %d %s started (attempt %d)",
                claimed.id,
                claimed.type,
                claimed.attempt,
                extra={"action": "start", "job_id": claimed.id, "job_type": claimed.type},
            )
        return jobs

    def _claim_of(
        self, types: str, limit: int, now: int, lease_until: int, claimed: list[Job], *, suspect: bool = False
    ) -> list[Job]:
        """Claim up to ``limit`` jobs of ``types`` (a JSON array), beside ``claimed`` in this step; the unreadable
        rows it met are failed in the same transaction."""
        held = {*self._running, *(job.id for job in claimed)} if claimed else self._running
        got, unreadable = self._store.claim(self.owner, self.name, now, lease_until, limit, types, held,
                                            suspect=suspect)  # fmt: skip
        for job, why in unreadable:
            self._claim_notes.append(self._recording.fail_unreadable(job, why, now))
        return got

    def _known_types(self) -> str:
        """The registered job types as a JSON array, made again only when the registry changed."""
        if len(REGISTRY) != len(self._registered) or tuple(REGISTRY) != self._registered:
            self._registered = tuple(REGISTRY)
            self._types_json = json.dumps(sorted(self._registered))
            threaded = sorted(name for name, job_type in REGISTRY.items() if not job_type.is_async)
            awaited = sorted(name for name, job_type in REGISTRY.items() if job_type.is_async)
            self._thread_types_json = json.dumps(threaded) if threaded else None
            self._async_types_json = json.dumps(awaited) if awaited else None
        return self._types_json

    def _claim_kinds(self, thread_slots: int, async_slots: int) -> list[tuple[str, int]]:
        """(types, limit) of each kind of job that has free slots and registered types: one claim each.

        Notes the kinds left out for want of a free slot (``_claim_skipped``):
        their due rows are not looked at, and the first step that finds a slot
        free for one of them claims (see _room_again).
        """
        self._known_types()
        kinds = [(self._thread_types_json, thread_slots), (self._async_types_json, async_slots)]
        self._claim_skipped = (
            kinds[0][0] is not None and thread_slots <= 0,
            kinds[1][0] is not None and async_slots <= 0,
        )
        return [(types, slots) for types, slots in kinds if types is not None and slots > 0]

    def _free_slots(self) -> tuple[int, int]:
        """How many more jobs the claim may take for the job threads (prefetch included), and for the job loop."""
        self._known_types()
        if self._async_types_json is None:  # no async def job: all is as before there were any
            return self.concurrency + self._ahead.jobs - len(self._running), 0
        threads = 0 if self._thread_types_json is None else self.concurrency + self._ahead.jobs
        return threads - (len(self._running) - self._async.running), self._async.free

    def _room_again(self, thread_slots: int, async_slots: int) -> bool:
        """Whether a kind of job the last claim left out for want of a free slot has one now."""
        skipped_threads, skipped_async = self._claim_skipped
        return (skipped_threads and thread_slots > 0) or (skipped_async and async_slots > 0)

    def execute(self, job: Job) -> Outcome:
        """Run one claimed job's function and capture how it ended (never raises).

        Whatever the function raises is its failure, BaseException too: a
        KeyboardInterrupt, GeneratorExit or SystemExit raised by a job is the
        job's own (``worker run`` turns SIGINT into stop(), and signals never
        reach job threads), so it fails the row and the thread runs on.
        """
        job_type = REGISTRY.get(job.type)
        if job_type is None:
            return Outcome(job, False, error=f"unknown job type {job.type!r}", kind="unknown")
        if self._recording.cancels.asked(job.id):  # claimed ahead, and asked to cancel before a thread took it
            return Outcome(job, False, kind="not started")
        if job_type.is_async:  # here (work()), not handed to the loop by run(): this thread waits for it
            return self._async.call(self.execute_async(job))
        ctx = self._context(job)
        # The row's `started` becomes this moment: a job claimed ahead started later than its claim.
        started_ms = self.now()
        started = time.perf_counter()
        process = _process_id
        try:
            value = job_type.fn(ctx, **job.data)
        except Snooze as e:
            if _process_id != process:
                _end_forked_child(e)
            return _snoozed(job, e, time.perf_counter() - started, started_ms)
        except BaseException as e:
            if _process_id != process:
                _end_forked_child(e)
            return _failed(job, e, time.perf_counter() - started, started_ms)
        if _process_id != process:
            _end_forked_child(None)
        seconds = time.perf_counter() - started
        if inspect.isawaitable(value):
            return _awaitable_returned(job, value, seconds, started_ms)
        return _returned(job, value, seconds, started_ms, ctx)

    async def execute_async(self, job: Job) -> Outcome:
        """Await one claimed async def job on the job loop and capture how it ended, as ``execute`` does.

        Its timeout cancels the coroutine (its ``finally`` blocks run) and fails
        the row.  It raises only CancelledError, when the worker that is stopping
        cancels the job (AsyncRunner.cancel_all): that row is given back.
        """
        job_type = _job_type(job)
        cancels = self._recording.cancels
        if cancels.asked(job.id):  # claimed ahead, and asked to cancel before the loop began it
            return Outcome(job, False, kind="not started")
        ctx = self._context(job)
        timeout_ms = _first(job.timeout_ms, job_type.timeout_ms)
        deadline = asyncio.timeout(None if timeout_ms is None else timeout_ms / 1000)
        started_ms = self.now()
        started = time.perf_counter()
        try:
            async with deadline:
                value = await job_type.fn(ctx, **job.data)
        except asyncio.CancelledError as e:
            task = cast(asyncio.Task[Any], asyncio.current_task())
            if task.cancelling() and not cancels.asked(job.id):
                raise  # the worker is stopping: the row is given back
            if task.cancelling():  # an operator's cancel (worker cancel ID): the row ends cancelled
                task.uncancel()
            return _failed(job, e, time.perf_counter() - started, started_ms)  # the job's own, not the worker's
        except Snooze as e:
            return _snoozed(job, e, time.perf_counter() - started, started_ms)
        except TimeoutError as e:
            if not deadline.expired():
                return _failed(job, e, time.perf_counter() - started, started_ms)
            seconds = cast(int, timeout_ms) / 1000
            error = f"timed out after {seconds:g} s"
            return Outcome(job, False, error=error, seconds=seconds, kind="timeout", started=started_ms)
        except BaseException as e:
            return _failed(job, e, time.perf_counter() - started, started_ms)
        return _returned(job, value, time.perf_counter() - started, started_ms, ctx)

    def _context(self, job: Job) -> JobContext:
        cancelled = functools.partial(self._recording.cancels.event, job.id)
        return JobContext(job, app=self.app, producer=lambda: self.producer, worker_name=self.name, clock=self.now,
                          cancelled=cancelled, progress=self._recording.progress)  # fmt: skip

    def record(self, outcomes: list[Outcome], now: int | None = None) -> None:
        """Write outcomes (and any retries) in one write transaction."""
        now = self.now() if now is None else now
        with self._write():
            notes = self._recording.record(outcomes, now)
        _emit(notes)

    def retry_delay_ms(self, job: Job) -> int:
        """How long after a failure of ``job`` its next attempt is due."""
        return self._recording.retry_delay_ms(job)

    def _scheduled(self, due: int) -> None:
        """A row was made due at ``due`` (a retry, a follow-up, a cron run): claim again by then."""
        self._next_due = min(self._next_due, due)

    def _write(self) -> _Write:
        """A write transaction of the worker's own (BEGIN IMMEDIATE) that times its wait for the lock."""
        return _Write(self)

    def _waited(self, since: float) -> bool:
        """A write got the lock, after trying since ``since`` (monotonic); True if that took long.

        While another process (or a job) holds the write lock, no worker can
        renew its leases, so a lease can run out under a live worker.  A worker
        that itself waited for the lock longer than a heartbeat interval
        (lease/3) therefore judges no lease until the database has been
        writable for a lease: by then every live worker has renewed its own.
        """
        refused_since, self._refused_since = self._refused_since, None
        waited_ms = (time.monotonic() - (since if refused_since is None else refused_since)) * 1000
        if waited_ms <= self.lease_ms / 3:
            return False
        postponed_until = self.now() + self.lease_ms
        logger.warning("waited %.1f s to write (a lock, or the database out of reach): no job is taken for lost "
                       "before %s, a lease from now", waited_ms / 1000, iso_time(postponed_until))  # fmt: skip
        self._schedule.postpone_rescue(postponed_until)
        return True

    def heartbeat(self, now: int | None = None) -> None:
        """Extend the lease of every job this worker is running, and say it is alive."""
        now = self.now() if now is None else now
        with self._write():
            self._store.renew_leases(self.owner, now + self.lease_ms)
            running = len(self._running) - self._todo.qsize()  # not counting jobs claimed ahead
            self._store.process_alive(self.owner, running, now)

    def rescue(self, now: int | None = None) -> int:
        """Fail running rows whose lease expired (their worker died) and retry them."""
        now = self.store.now() if now is None else now
        write = self._write()
        with write:
            # A lease that ran out while this worker waited for the lock may have
            # run out because its holder waited too (_waited postponed the sweep).
            notes = [] if write.held_up else self._recording.rescue(now)
        _emit(notes)
        return len(notes)

    def give_back(
        self, jobs: Iterable[Job], why: str = "still running at shutdown", level: int = logging.WARNING
    ) -> None:
        """Return unfinished jobs to pending (at shutdown); fenced on our ownership."""
        store, now = self.store, self.now()
        notes: list[_Note] = []
        with store.transaction():
            for job in jobs:
                notes += _given_back(job, store.give_back_if_owned(job.id, self.owner, now), level, why)
        _emit(notes)  # once committed, like every other outcome

    def work(self) -> int:
        """One synchronous step: housekeeping if due, claim, run here, record.  Returns jobs run."""
        self.start_up()
        now = self.now()
        self._housekeeping(now)  # heartbeat and rescue sweep when due, as in run()
        jobs = self.claim(self.concurrency, now)
        outcomes = [self.execute(claimed) for claimed in jobs]
        if outcomes:
            self.record(outcomes)
        if any(o.kind == "interrupted" for o in outcomes) and threading.current_thread() is threading.main_thread():
            # Here the job ran on the caller's own thread, where a KeyboardInterrupt
            # may be the user's Ctrl-C: its row is failed (recorded above), and the
            # interrupt goes on up, as it would have without the worker.
            raise KeyboardInterrupt
        return len(jobs)

    # -- the loop -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; ``run()`` returns once running jobs finish or the timeout passes."""
        self._stopping.set()
        self._handed_over.put(None)

    def run(self) -> None:
        """Claim and run jobs until stop() (or, with burst, until nothing is due)."""
        if not self._start_up_when_unlocked():
            return
        for _ in range(self.concurrency):
            self._start_thread()
        self._wake_up.start(self._wake_for_commit)
        logger.info("jobs from %s: %d job types", ", ".join(_jobs_files()) or "this module only", len(REGISTRY))
        logger.info(
            "worker %s started: %s, concurrency %d, queues %s, lease %.1f s",
            self.name,
            redacted(self.db),
            self.concurrency,
            ",".join(self.queues or ["all"]),
            self.lease_ms / 1000,
        )
        shutdown_deadline: float | None = None
        woken_by: Outcome | None = None
        try:
            while True:
                with self._step_lock:
                    if woken_by is not None:
                        self._received.append(woken_by)
                    if self._step_failure is not None:
                        raise self._step_failure
                    if self._stopping.is_set():
                        if shutdown_deadline is None:
                            self._give_back_waiting("the worker is stopping")
                            shutdown_deadline = time.monotonic() + self.shutdown_timeout
                            logger.info(
                                "stopping: waiting up to %.1f s for %d running job(s)",
                                self.shutdown_timeout,
                                len(self._running),
                            )
                        if not self._running or time.monotonic() >= shutdown_deadline:
                            break
                    elif self.burst and self._nothing_due and not self._running and not self._to_record:
                        break
                    self._tick()
                    wait = self._busy_backoff or self._wait_seconds()
                woken_by = self._sleep(wait)
        finally:
            with self._step_lock:
                self._shut_down()
        if self._replaced is not None:
            raise DatabaseReplaced(self._replaced)

    def _start_up_when_unlocked(self) -> bool:
        """start_up(), waiting while another process holds the write lock; False if stop() came first.

        A long write (a migration, a bulk import, another program's long
        transaction) outlasts the busy timeout; a worker starting meanwhile (a
        supervisor's restart, say) waits for it like a running worker does,
        rather than exiting as if the database were unusable.
        """
        waited_since: float | None = None
        delay = 0.05
        while True:
            try:
                self.start_up()
            except DatabaseBusy as e:
                if waited_since is None:
                    waited_since = time.monotonic()
                    logger.warning("database %s is locked by another process (%s); starting once it is free",
                                   redacted(self.db), e)  # fmt: skip
                if self._stopping.wait(delay):
                    logger.info("worker %s stopped before it started (the database was still locked)", self.name)
                    if self._store is not None:  # not registered yet: no row to delete, and deleting would wait
                        self._store.close()
                        self._store = cast(Store, None)
                    self.close()
                    return False
                delay = min(delay * 2, MAX_BUSY_BACKOFF)
                continue
            if waited_since is not None:
                logger.info("database %s free again after %.1f s", redacted(self.db), time.monotonic() - waited_since)
            return True

    def _wake_for_commit(self) -> None:
        # Called by the watcher's thread.
        if self._wants_commits:
            self._woken_at = time.monotonic()
            self._handed_over.put(None)

    def _wait_seconds(self) -> float:
        """How long the loop may sleep before it looks again (a finished job wakes it sooner)."""
        if not self._wake_up.pushes or not self._wants_commits:
            return self.poll_interval
        if time.monotonic() - self._woken_at < COMMIT_SETTLE_SECONDS:
            # The -wal is written before the commit is published: a look right
            # after the event can miss it, so look again shortly.
            return COMMIT_SETTLE_POLL
        until_due = (self._next_due - self.now()) / 1000
        return min(WATCHED_POLL_INTERVAL, max(until_due, 0.001))

    def _sleep(self, seconds: float) -> Outcome | None:
        """Wait until an outcome arrives, stop() is called, or ``seconds`` pass."""
        try:
            return self._handed_over.get(timeout=seconds)
        except queue_module.Empty:
            return None

    def _start_thread(self) -> None:
        threading.Thread(target=self._job_thread, name="worker-job", daemon=True).start()

    def _job_thread(self) -> None:
        claimed = self._todo.get()
        while claimed is not None:
            self._progress_at = time.monotonic()
            timeout_ms = _first(claimed.timeout_ms, _job_type(claimed).timeout_ms)
            if timeout_ms is not None:  # from its start: a job may have waited, claimed ahead
                with self._deadlines_lock:
                    self._deadlines[claimed.id] = (self._progress_at + timeout_ms / 1000, timeout_ms)
            outcome = self.execute(claimed)
            if self._surplus_threads:  # a replacement took over while this thread was stuck
                with self._threads_lock:
                    if self._surplus_threads > 0:
                        self._surplus_threads -= 1
                        self._hand_over(outcome)
                        return
            claimed = self._step_after(outcome) or self._todo.get()

    def _hand_over(self, outcome: Outcome) -> None:
        """Give a job thread's outcome to the main loop, noting when the oldest one not yet taken arrived."""
        if self._handed_over_at is None:
            self._handed_over_at = time.monotonic()
        self._handed_over.put(outcome)

    def _step_after(self, outcome: Outcome) -> Job | None:
        """Record the outcome of the worker's only claimed job, and claim the thread's next job right here.

        This saves the hand-off to the main thread and back, a large part of
        the time per job at concurrency 1 without prefetch.  With
        other jobs claimed (running in other threads, or claimed ahead and
        waiting in _todo, where this thread takes its next one) the outcome
        goes to the main thread, which records the outcomes that finish close
        together in one transaction (one transaction per job here is slower at
        concurrency 4: bench/README.md); so it does when the main thread holds
        the loop, or the worker is stopping or backing off.
        """
        if self._stopping.is_set() or self._busy_backoff or not self._step_lock.acquire(blocking=False):
            self._hand_over(outcome)
            return None
        try:
            if len(self._running) > 1 or not self._handed_over.empty():
                self._hand_over(outcome)
                return None
            self._received.append(outcome)
            return self._tick(keep_one=True)
        except BaseException as e:
            # The main thread meeting this would have ended run(): so it still
            # does, rather than this thread dying and its slot with it.
            self._step_failure = e
            self._handed_over.put(None)
            return None
        finally:
            self._step_lock.release()

    def _tick(self, keep_one: bool = False) -> Job | None:
        """One step of the loop (holding self._step_lock): record outcomes, claim free slots, housekeeping.

        With ``keep_one`` (a job thread's step) the first job claimed is
        returned for the caller to run, not queued for the job threads.
        """
        now = self.now()
        began = time.monotonic()
        self._notice_clock_jump(now, began)
        self._round_trip_from = None  # set by _collect_outcomes when it takes handed-over outcomes
        self._collect_outcomes(now)
        if not keep_one and not self._todo.empty() and time.monotonic() - self._progress_at > PREFETCH_PATIENCE:
            self._give_back_waiting("its worker's threads are all busy with longer jobs")
        if self._async_types_json is not None and (waiting := self._async.take_waiting(PREFETCH_PATIENCE)):
            self._give_back_claimed_ahead(waiting, "its worker's async slots are all busy with longer jobs",
                                          self._async.start)  # fmt: skip
        busy = self._stopping.is_set() or self._alone in self._running  # nothing beside a job run alone
        free, async_free = (0, 0) if busy else self._free_slots()
        room = free > 0 or async_free > 0
        want_claim = room and (self._maybe_due(now) or self._room_again(free, async_free))
        claimed: list[Job] = []
        kept = None
        # A claim in doubt is settled at the next step that can write, whether or not it claims: its rows
        # would else wait, their leases renewed, for a commit by another writer or a row due.
        if self._to_record or want_claim or self._claim_in_doubt:
            try:
                with self._write():
                    notes = self._recording.record(self._to_record, now)
                    if self._claim_in_doubt:
                        notes += self._give_back_unknown()
                    if want_claim:
                        kinds = () if self._async_types_json is None else (async_free,)  # one claim, as before
                        claimed = self._claim(free, now, *kinds)
            except DatabaseUnavailable as e:
                self._claim_in_doubt = self._claim_in_doubt or want_claim
                self._back_off(e)
                return None
            except DatabaseError as e:
                self._after_error(e, now)
                return None
            self._busy_backoff = 0.0
            self._to_record = []
            self._claim_in_doubt = False
            _emit(notes + self._claim_notes if want_claim else notes)
            for job in claimed:
                self._running[job.id] = job
            if claimed:
                self._progress_at = time.monotonic()
            threaded = self._start_async(claimed) if self._async_types_json is not None else claimed
            kept = threaded[0] if keep_one and threaded else None
            self._queue_for_threads(threaded[1:] if kept else threaded)
            # From the oldest outcome's hand-over, not the step's start: the main
            # thread may first wait for the GIL, held by a job thread running
            # pure Python, for up to the switch interval, and the jobs claimed
            # ahead must last through that wait too.
            since = began if self._round_trip_from is None else min(began, self._round_trip_from)
            self._ahead.stepped(time.monotonic() - since)
        # Nothing is due when a claim with room to spare found nothing (or nothing
        # changed since one did) and the next pending row is due later.
        self._nothing_due = room and not claimed and not self._last_claim_full and now < self._next_due
        if self._nothing_due and self._store.at_running_limit():  # due rows wait for a place, not for a time
            self._nothing_due = False
        # Idle: nothing running and nothing claimed.  Only then do commits by
        # others wake it (under load, every commit would, and the wake-ups would
        # cost more than they save); a busy worker looks every poll_interval.
        self._wants_commits = room and not claimed and not self._running
        self._wake_up.arm(self._wants_commits)
        self._housekeeping(now)
        if self._next_due <= now:  # the sweep just rescued a job, due at once: something is due after all
            self._nothing_due = False
        return kept

    def _queue_for_threads(self, jobs: list[Job]) -> None:
        """Queue claimed jobs for the job threads, a job of higher priority before those claimed ahead of it.

        A job enqueued with a higher priority during a backlog is claimed first
        at the next step, but the jobs claimed ahead at earlier steps would
        still start before it (the threads take jobs in the order queued).
        """
        if not jobs:
            return
        if jobs[0].priority > self._lowest_priority_queued and not self._todo.empty():
            jobs = sorted(self._take_waiting() + jobs, key=claim_order)
        for job in jobs:
            self._todo.put(job)
        self._lowest_priority_queued = jobs[-1].priority

    def _start_async(self, claimed: list[Job]) -> list[Job]:
        """Hand the claimed async def jobs to the job loop; the others, returned, are the job threads'."""
        threaded: list[Job] = []
        awaited: list[Job] = []
        for job in claimed:
            (awaited if _job_type(job).is_async else threaded).append(job)
        if awaited:
            self._async.start(awaited)
        return threaded

    def _give_back_unknown(self) -> list[_Note]:
        """Give back the rows running under this worker that it is not running (in the step's transaction).

        After a step whose claim failed, the claim may have committed all the
        same (on PostgreSQL the reply can be lost with the connection): its rows
        run under this owner, unknown to the worker, and every heartbeat would
        renew their leases, so that no one ran them while this worker lives.
        """
        known = set(self._running) | {outcome.job.id for outcome in self._to_record}
        running = self._store.jobs(status=Status.RUNNING.value, type=None, queue=None, limit=MAX_COUNT)
        notes = []
        now = self.now()
        for job in running:
            if job.owner == self.owner and job.id not in known:
                status = self._store.give_back_if_owned(job.id, self.owner, now)
                why = "claimed by a claim this worker was told had failed"
                notes += _given_back(job, status, logging.WARNING, why)
                if status == Status.PENDING:
                    self._scheduled(job.due)  # due again, and no other process's commit will say so
        return notes

    def _notice_database_replaced(self) -> None:
        """Stop (run() then raises DatabaseReplaced) if the store says its target names another database now.

        A fresh process is the one state known to be right (the worker's own
        connection, and those of its jobs, all hold the old database), so the
        worker stops as on SIGTERM and exits 1, and its supervisor
        (`--processes`, systemd's Restart=) starts it on the new one.
        """
        if self._replaced is not None or self._store is None:
            return
        self._replaced = self._store.replaced()
        if self._replaced is not None:
            logger.error("%s", self._replaced)
            self.stop()

    def _notice_clock_jump(self, now: int, monotonic: float) -> None:
        """Only in the loop (not ``work()``): a test's fake clock moves without the monotonic one."""
        jumped_ms = self._schedule.clock_jump(now, monotonic)
        if jumped_ms is not None:
            logger.warning("the wall clock jumped %.1f s forward: leases renewed now, the next sweep for lost "
                           "jobs in %.1f s", jumped_ms / 1000, self.lease_ms / 1000)  # fmt: skip

    def _collect_outcomes(self, now: int) -> None:
        if not self._received and not self._deadlines and self._handed_over.empty():
            return  # the idle case, 200 times a second: keep it cheap
        self._round_trip_from, self._handed_over_at = self._handed_over_at, None
        arrived, self._received = self._received, []
        while True:
            try:
                outcome = self._handed_over.get_nowait()
            except queue_module.Empty:
                break
            if outcome is not None:
                arrived.append(outcome)
        for outcome in arrived:
            if self._running.pop(outcome.job.id, None) is None:
                message = "job %d %s: late result discarded (it had timed out)"
                _emit(
                    [_Note.about(outcome.job, "discarded", logging.WARNING, message, outcome.job.id, outcome.job.type)]
                )
                continue
            if self._deadlines:
                with self._deadlines_lock:
                    self._deadlines.pop(outcome.job.id, None)
            self._to_record.append(outcome)
        threaded = arrived if self._async_types_json is None else [o for o in arrived if not _job_type(o.job).is_async]
        self._ahead.finished(outcome.seconds for outcome in threaded)  # the job loop claims ahead by its own
        if not self._deadlines:
            return
        with self._deadlines_lock:
            timed_out = [
                (job_id, ms) for job_id, (deadline, ms) in self._deadlines.items() if time.monotonic() >= deadline
            ]
            for job_id, _ in timed_out:
                del self._deadlines[job_id]
        for job_id, timeout_ms in timed_out:
            running = self._running.pop(job_id, None)
            if running is None:
                continue
            seconds = timeout_ms / 1000
            self._to_record.append(
                Outcome(running, False, error=f"timed out after {seconds:g} s", seconds=seconds, kind="timeout")
            )
            self._ahead.stop()
            with self._threads_lock:  # its thread is stuck in the job: replace it
                self._surplus_threads += 1
            self._start_thread()

    def _take_waiting(self) -> list[Job]:
        """Take back from the job threads the claimed jobs none of them has started."""
        waiting: list[Job] = []
        while True:
            try:
                job = self._todo.get_nowait()
            except queue_module.Empty:
                return waiting
            if job is not None:
                waiting.append(job)

    def _give_back_waiting(self, why: str) -> None:
        """Return the jobs claimed ahead that no thread has started, so that other workers may take them."""
        self._ahead.stop()
        self._give_back_claimed_ahead(self._take_waiting(), why, self._queue_for_threads)

    def _give_back_claimed_ahead(self, waiting: list[Job], why: str, keep: Callable[[list[Job]], None]) -> None:
        """Give back jobs claimed ahead that were taken back unstarted (from the job threads or the job loop);
        if the database refuses, ``keep`` hands them back to where they waited."""
        if not waiting:
            return
        try:
            self.give_back(waiting, f"not started: {why}", logging.INFO)
        except DatabaseError as e:
            if isinstance(e, DatabaseBusy) or not isinstance(e, DatabaseUnavailable):  # surely not written
                logger.warning("could not give back %d job(s) claimed ahead (%s); they stay claimed", len(waiting), e)
                keep(waiting)
                return
            # The connection was lost: the give-back may have committed all the same, and a job run here
            # while its row is pending may run beside the worker that claims it next.  In doubt, as a claim
            # is: the next step gives back those still this worker's (_give_back_unknown).
            logger.warning("giving back %d job(s) claimed ahead failed (%s); given back at the next step, unless "
                           "they were already", len(waiting), e)  # fmt: skip
            self._claim_in_doubt = True
        for job in waiting:
            del self._running[job.id]
        # Pending and due again: no commit by another process says so (the
        # wake-up's only news), so a burst worker would else stop, and an idle
        # one wait for the next, with these rows left behind.
        self._scheduled(min(job.due for job in waiting))

    def _maybe_due(self, now: int) -> bool:
        if self._last_claim_full or now >= self._next_due:
            return True
        if self._to_record and self._store.at_running_limit():  # a job of that queue may have ended here
            return True
        return self._wake_up.changed()

    def _back_off(self, error: DatabaseError) -> None:
        self._busy_backoff = min(max(0.05, self._busy_backoff * 2), MAX_BUSY_BACKOFF)
        logger.warning(
            "cannot write now (%s); %d outcome(s) kept, retrying in %.2f s",
            error,
            len(self._to_record),
            self._busy_backoff,
        )

    def _after_error(self, error: DatabaseError, now: int) -> None:
        """A step (record and claim) failed for a reason other than busy/full."""
        try:
            if self.store.repair_schema():  # an index dropped by hand while we run: the claim names it
                return
        except DatabaseError as e:
            logger.error("could not re-create the schema: %s", e)
        self._record_one_by_one(error, now)
        # Should the error come back at every step, it is logged every 2 s at most, not every few ms.
        self._busy_backoff = min(max(0.05, self._busy_backoff * 2), MAX_BUSY_BACKOFF)

    def _record_one_by_one(self, error: DatabaseError, now: int) -> None:
        """A batch failed for a reason other than busy/full: isolate the bad outcome."""
        logger.error("recording a batch failed (%s); recording one by one", error)
        kept = []
        for outcome in self._to_record:
            try:
                self.record([outcome], now)
            except DatabaseUnavailable:
                kept.append(outcome)
                continue
            except DatabaseError as e:
                # Bookkeeping failure: the job fails with a clear error, never stays running.
                first_line = (outcome.error or "").partition("\n")[0]
                ended = Status.SUCCEEDED.value if outcome.succeeded else f"{Status.FAILED.value}: {first_line}"
                message = f"could not record the outcome ({e}); the job {ended}"
                failure = Outcome(outcome.job, False, error=message, kind="unrecordable")
                try:
                    self.record([failure], now)
                except DatabaseUnavailable:
                    kept.append(outcome)
                    continue
                except DatabaseError as again:
                    # Not even that: set aside (still `running` here, rescued once this worker is gone).
                    logger.error("job %d %s: %s; and not even its failure could be recorded (%s): set aside",
                                 outcome.job.id, outcome.job.type, message, again)  # fmt: skip
        self._to_record = kept

    def _housekeeping(self, now: int) -> None:
        schedule = self._schedule
        try:
            if schedule.heartbeat_due(now):
                self.heartbeat(now)
                self._busy_backoff = 0.0  # the database answers again (a failed step's write returns before this)
                schedule.heartbeat_done(now)
                self._notice_database_replaced()
            if schedule.rescue_due(now):
                self.rescue(now)
                schedule.rescue_done(now)
            if self._running:
                _emit(self._recording.cancels.look(self._store, self.owner, self._running, now))
                if self._recording.progress.due(now):
                    with self._write():
                        self._recording.progress.write(self._store, self.owner, now)
        except DatabaseError as e:
            # Postponed, not given up: tried again after a backoff, as a failed step is.  At the next tick it
            # was a connection attempt and a warning every few ms while the server was out of reach.
            self._busy_backoff = min(max(0.05, self._busy_backoff * 2), MAX_BUSY_BACKOFF)
            transient = isinstance(e, DatabaseUnavailable)
            logger.log(logging.WARNING if transient else logging.ERROR, "heartbeat or rescue failed: %s", e)

    def _shut_down(self) -> None:
        deadline = time.monotonic() + max(self.shutdown_timeout, 5.0)
        self._take_waiting()  # still in _running: given back below, and no thread may start them now
        self._async.cancel_all(grace=CANCELLED_JOB_GRACE)  # their rows too: given back below
        self._collect_outcomes(self.now())
        warned_at: float | None = None
        while time.monotonic() < deadline:
            try:
                if self._to_record:
                    self.record(self._to_record)
                    self._to_record = []
                if self._running:
                    self.give_back(list(self._running.values()))
                    self._running.clear()
                if self._claim_in_doubt:  # rows running under this worker, unknown to it: no one else renews them
                    with self._write():
                        notes = self._give_back_unknown()
                    self._claim_in_doubt = False
                    _emit(notes)
                break
            except DatabaseUnavailable as e:
                if warned_at is None or time.monotonic() - warned_at >= SHUTDOWN_WARN_EVERY:
                    warned_at = time.monotonic()
                    logger.warning("could not write at shutdown (%s); retrying until %.0f s from now", e,
                                   deadline - warned_at)  # fmt: skip
                time.sleep(0.2)
            except DatabaseError as e:  # not to be waited out
                if not self._to_record:  # the give-back failed: its rows are rescued once their lease expires
                    logger.error("could not give back the running jobs at shutdown: %s", e)
                    break
                self._record_one_by_one(e, self.now())  # the outcome that fails isolated, as a step does
        for _ in range(self.concurrency):
            self._todo.put(None)
        self._wake_up.stop()
        logger.info("worker %s stopped", self.name)
        self.close()


def exit_if_threads_are_left(code: int, error: BaseException | None = None) -> None:
    """After a worker's shutdown: exit the process with ``code`` now if jobs left threads running; else return.

    Interpreter exit waits for every thread that is not a daemon, so one that
    a job started and never ended (a ThreadPoolExecutor's, say) would keep a
    worker that has stopped, given its jobs back and deregistered, alive for
    good.  The log is flushed first (atexit handlers do not run: the jobs'
    @on_shutdown hooks already have); ``error`` is what ended run(), if anything.
    """
    current = threading.current_thread()
    left = [thread.name for thread in threading.enumerate() if thread is not current and not thread.daemon]
    if not left:
        return
    if error is not None:
        logger.error("worker %s stopped by %s", f"{socket.gethostname()}:{os.getpid()}", _exception_line(error))
    logger.warning("exiting without waiting for %d thread(s) that jobs left running: %s", len(left), ", ".join(left))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@dataclasses.dataclass
class _Note:
    """A log line decided inside a transaction, written once it committed."""

    level: int
    message: str
    args: tuple[Any, ...]
    extra: dict[str, Any]

    @classmethod
    def about(cls, job: Job, action: str, level: int, message: str, *args: Any) -> _Note:
        return cls(level, message, args, {"job_id": job.id, "job_type": job.type, "attempt": job.attempt,
                                          "action": action})  # fmt: skip


def iso_time(epoch_ms: int) -> str:
    """Epoch milliseconds as ISO 8601 in UTC, to the millisecond; beyond the years 1 to 9999, the number itself."""
    try:
        return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):  # any program may write any integer: show it, never fail on it
        return f"{epoch_ms} (epoch ms)"


def printable(text: str) -> str:
    """Text from the table made safe for a terminal or a log line: control characters shown as \\xNN.

    Tabs, line breaks and carriage returns too, so a value can neither forge a
    row of a table or a log line nor drive the terminal (ESC, C1).
    """
    return CONTROL_CHARACTERS.sub(_escaped, text)


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1 and lone surrogates


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _emit(notes: list[_Note]) -> None:
    for note in notes:
        try:  # noqa: SIM105 -- a try costs nothing; suppress() would be a context manager per job
            logger.log(note.level, note.message, *note.args, extra=note.extra)
        except Exception:
            # A handler that raises (logging's own error report fails once a
            # job has closed sys.stderr): the outcome is recorded, the loop goes on.
            pass


def _first(*values: Any) -> Any:
    """The first value that is not None: the row's setting, the job type's, the default."""
    for value in values:
        if value is not None:
            return value
    return None


def _jobs_files() -> list[str]:
    """The files that registered the jobs (the built-in ones of this module aside)."""
    modules = {job_type.fn.__module__ for job_type in REGISTRY.values()} - {__name__}
    return sorted(getattr(sys.modules.get(name), "__file__", None) or name for name in modules)


def _job_type(job: Job) -> JobType:
    """The job's registered type, or one with no defaults (for an unknown type)."""
    return REGISTRY.get(job.type) or JobType(name=job.type, fn=print)


def _exception_line(error: BaseException) -> str:
    """``Type: message``; an exception whose str() itself raises still gets a line."""
    try:
        return encodable(f"{type(error).__name__}: {error}")
    except Exception:
        return f"{type(error).__name__}: <str() of the exception failed>"


def _describe_exception(error: BaseException) -> str:
    try:
        trace = encodable("".join(traceback.format_exception(error)))
    except Exception:
        trace = "(no traceback: formatting it failed)\n"
    return f"{_exception_line(error)}\n\n{trace}"


def encodable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate written as its escape.

    A Python str may carry one (bytes decoded with surrogateescape, a file
    name), and a job may raise with it; neither database can store it.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _end_forked_child(error: BaseException | None) -> NoReturn:
    """A job forked, and its function returned (``error`` None) or raised in the child: end the child here.

    Otherwise the child would go on as a copy of the worker's job thread,
    claiming and running jobs beside its parent, which records the row as usual.
    Exit status 0 on return, 1 on an exception, sys.exit()'s code if it gave one.
    """
    code = 0 if error is None else 1
    if isinstance(error, SystemExit):
        code = 0 if error.code is None else error.code if isinstance(error.code, int) else 1
    for stream in (sys.stdout, sys.stderr):  # what the child wrote itself (as multiprocessing does)
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# --- Operating: what `worker status / jobs / show` and the dashboard read ---------

# Named, so that a column another program adds to worker_processes changes nothing here.
PROCESS_COLUMNS = ("id", "host", "pid", "started", "last_seen", "lease_ms", "concurrency", "running", "queues",
                   "version")  # fmt: skip
# What the operating tools decode of data and result: SQLite's json_valid takes
# some 2,000 levels, Python's json about 1,000, and printing a value takes a
# few stack frames per level.  Deeper (or undecodable) text is shown as stored.
SHOWN_DEPTH = 200


class StoredText(str):
    """A data or result column the operating tools could not decode: its text as stored."""

    def excerpt(self, limit: int = 1_000) -> str:
        """A line saying why the text is shown as stored, then its first ``limit`` characters."""
        cut = f" (the first {limit:,} of {len(self):,} characters)" if len(self) > limit else ""
        why = f"not decoded (invalid JSON text, or nested deeper than {SHOWN_DEPTH} levels); as stored{cut}:"
        return f"{why}\n{self[:limit]}"


def read_job(row: Iterable[Any]) -> Job:
    """A row (as SELECT_COLUMNS) for the operating tools, which must show any row another program wrote.

    Unlike Job.from_row, data or result that does not decode, or nests deeper
    than SHOWN_DEPTH, is kept as a StoredText rather than raising.
    """
    values = list(row)
    values[_DATA] = _decoded_or_stored(values[_DATA])
    if values[_RESULT] is not None:
        values[_RESULT] = _decoded_or_stored(values[_RESULT])
    values[_PERSISTENT] = bool(values[_PERSISTENT])
    return Job(*values)


def _decoded_or_stored(text: str) -> Any:
    if text == "{}":
        return {}
    try:
        value = json.loads(text)
    except (RecursionError, ValueError):  # nested too deep, or bytes that are not UTF-8 (shown escaped)
        return StoredText(text)
    # Each level takes two characters, so only long text can nest too deep.
    return value if len(text) < 2 * SHOWN_DEPTH or _nests_within(value, SHOWN_DEPTH) else StoredText(text)


def _nests_within(value: Any, depth: int) -> bool:
    """Whether a decoded JSON value nests at most ``depth`` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level > depth:
                return False
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def status(source: Any, *, now: int | None = None) -> dict[str, Any]:
    """The state of the worker: queues, worker processes and cron jobs, from indexed queries only.

    ``source`` is a store (open_reader's), or a SQLite connection.
    """
    store = as_store(source)
    now = now_ms() if now is None else now
    queues: dict[str, dict[str, Any]] = {}

    def of(name: str) -> dict[str, Any]:
        counts = {"pending_due": 0, "pending_later": 0, "running": 0, "succeeded_last_hour": 0,
                  "failed_last_hour": 0, "cancelled_last_hour": 0, "oldest_waiting_seconds": None,
                  "paused": False, "max_running": None, "per_second": None}  # fmt: skip
        return queues.setdefault(name, {"queue": name, **counts})

    for name, due, later, oldest in store.pending_by_queue(now):
        entry = of(name)
        entry.update(pending_due=due, pending_later=later)
        entry["oldest_waiting_seconds"] = None if oldest is None else (now - oldest) / 1000
    for name, count in store.running_by_queue():
        of(name)["running"] = count
    for name, state, count in store.finished_by_queue(since=now - 3_600_000):
        of(name)[f"{state}_last_hour"] = count
    for control in store.queue_controls():  # a paused queue is shown even with no rows
        of(control.queue).update(paused=control.paused, max_running=control.max_running,
                                 per_second=control.per_second)  # fmt: skip
    workers = []
    running_by_owner = store.running_by_owner()
    for process in store.processes():
        process["types"] = _type_list(process["types"])
        process["running"] = running_by_owner.get(process["id"], 0)  # jobs claimed ahead included
        process["heartbeat_age_seconds"] = (now - process["last_seen"]) / 1000
        process["fresh"] = now - process["last_seen"] <= process["lease_ms"]
        workers.append(process)
    cron = []
    for pending, last in store.cron_schedules():
        cron.append({"type": pending.type, "tag": pending.tag, "schedule": pending.cron_schedule,
                     "timezone": pending.cron_timezone or "UTC", "next_job": pending.id, "next_due": pending.due,
                     "last_job": last and last.id, "last_status": last and last.status,
                     "last_finished": last and last.finished})  # fmt: skip
    return {
        "unrunnable": _unrunnable(store, [process for process in workers if process["fresh"]], now),
        **store.describe(),
        "now": now,
        "queues": sorted(queues.values(), key=lambda q: q["queue"]),
        "workers": workers,
        "cron": cron,
        "healthy": any(process["fresh"] for process in workers),
    }


def controls_text(control: QueueControl | Mapping[str, Any]) -> str:
    """A queue's controls (a QueueControl, or a queue of ``status``) in a few words: "paused, 2 running, 5/s"."""
    given = dataclasses.asdict(control) if isinstance(control, QueueControl) else control
    words = ["paused"] if given["paused"] else []
    if given["max_running"] is not None:
        words.append(f"{given['max_running']} running")
    if given["per_second"] is not None:
        words.append(f"{given['per_second']:g}/s")
    return ", ".join(words)


def _unrunnable(store: Store, live: list[dict[str, Any]], now: int) -> list[dict[str, Any]]:
    """Pending rows by type that none of the live workers can run (none when a live worker's types are unknown).

    A rolling deploy's new types until a new worker starts, or a type no
    worker will ever know (a typo written by another program, a job removed
    from the code).
    """
    if not live or any(process["types"] is None for process in live):
        return []  # no worker alive says so already; one older than schema 5 did not say what it runs
    known = sorted({name for process in live for name in process["types"]})
    return [{"type": type, "pending": count, "oldest_due": oldest, "waiting_seconds": (now - oldest) / 1000}
            for type, count, oldest in store.unrunnable(known)]  # fmt: skip


def _type_list(text: str | None) -> list[str] | None:
    """worker_processes.types as a list; None when it is missing or not a JSON list of strings."""
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def list_jobs(
    source: Any,
    *,
    status: str | None = None,
    type: str | None = None,
    queue: str | None = None,
    limit: int = 50,
) -> list[Job]:
    """Rows, newest first, filtered by status, type and queue (``source``: a store, or a SQLite connection)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")
    return as_store(source).jobs(status=status, type=type, queue=queue, limit=limit)


def job_chain(source: Any, id: int) -> list[Job]:
    """The job's chain (the retries and cron runs it came from and led to), oldest first."""
    if not -(2**63) <= id < 2**63:  # no row has an id a database can hold
        return []
    return as_store(source).chain(id, reach=CHAIN_REACH)


CHAIN_REACH = 500  # rows each way: a minutely cron job's chain keeps some 10,000 within the default retention


def job_as_dict(job: Job) -> dict[str, Any]:
    """A row as plain JSON-ready data."""
    # Not dataclasses.asdict: it copies data and result recursively, a few frames a level.
    return {field.name: getattr(job, field.name) for field in dataclasses.fields(job)}


# --- Built-in jobs ----------------------------------------------------------------


@job(cron="0 * * * *")
def remove_old_jobs(ctx: JobContext) -> int:
    """Hourly: delete finished rows whose retention ran out (``worker prune`` on demand)."""
    removed = ctx.producer.prune()
    ctx.logger.info("removed %d finished rows past their retention", removed)
    done = ctx.producer.maintain()
    if done:
        ctx.logger.info("%s", done)
    return removed


# --- The command line of worker.py alone ----------------------------------------
#
# Enough to run and enqueue, so that worker.py + schema.sql copied into another
# project is a whole worker: `python worker.py run`.  The operator commands
# (status, jobs, show, ...) and the supervisor of --processes live in
# worker_cli.py, which builds on what is here; this module never imports it.

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3
EXIT_CODES_HELP = "Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 database unusable."
ENGINE_COMMANDS = ("run", "enqueue", "schema", "migrate")

ENVIRONMENT = {
    "db": ("WORKER_DB", "database file, sqlite:/// or postgresql:// URL (else DATABASE_URL, else ./worker.db)"),
    "jobs": ("WORKER_JOBS", f"module name or .py path that registers the jobs (default ./{DEFAULT_JOBS_MODULE}.py)"),
    "concurrency": ("WORKER_CONCURRENCY", f"job threads per process (default {DEFAULT_CONCURRENCY})"),
    "async_concurrency": (
        "WORKER_ASYNC_CONCURRENCY",
        f"async def jobs at once per process, on its job loop (default {DEFAULT_ASYNC_CONCURRENCY})",
    ),
    "processes": ("WORKER_PROCESSES", "worker processes run by a supervisor (default 1)"),
    "queues": ("WORKER_QUEUES", "comma-separated queues to take jobs from (default all)"),
    "lease": ("WORKER_LEASE", f"seconds a claim holds without a heartbeat (default {DEFAULT_LEASE:g})"),
    "shutdown_timeout": (
        "WORKER_SHUTDOWN_TIMEOUT",
        f"seconds to let running jobs finish on SIGTERM (default {DEFAULT_SHUTDOWN_TIMEOUT:g})",
    ),
    "max_deaths": (
        "WORKER_MAX_DEATHS",
        f"worker deaths before a job is failed as poison (default {DEFAULT_MAX_DEATHS})",
    ),
    "prefetch": (
        "WORKER_PREFETCH",
        "the most jobs claimed beyond the free threads, while jobs are short; 0: none (default "
        f"{DEFAULT_PREFETCH} or {PREFETCH_PER_THREAD} a thread, whichever is more; {POSTGRES_PREFETCH} on PostgreSQL)",
    ),
    "no_cron": ("WORKER_NO_CRON", "do not create the pending rows of jobs declared with cron= (default: do)"),
    "keep_succeeded": ("WORKER_KEEP_SUCCEEDED", "seconds a succeeded row is kept before pruning (default 7 days)"),
    "keep_failed": ("WORKER_KEEP_FAILED", "seconds a failed or cancelled row is kept (default 30 days)"),
    "synchronous": ("WORKER_SYNCHRONOUS", "NORMAL (a power cut may lose the last commits) or FULL (default NORMAL)"),
    "pg_listen": ("WORKER_PG_LISTEN", "PostgreSQL: 0 polls instead of LISTEN (default 1)"),
    "pg_pooler": (
        "WORKER_PG_POOLER",
        "PostgreSQL: transaction behind PgBouncer in transaction mode: no LISTEN, no prepared statements, "
        "no session settings (default none)",
    ),
    "log_level": ("WORKER_LOG_LEVEL", "the worker's own log threshold: DEBUG, INFO, WARNING, ERROR (default INFO)"),
    "log_format": ("WORKER_LOG_FORMAT", "text or json (default text)"),
}

# Each stops a worker or a supervisor gracefully.  SIGHUP too: it is what a
# closed terminal or a lost SSH session sends, and the worker has no
# configuration to reload.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# worker_cli.supervise(child_args, processes, shutdown_timeout, burst=...): the exit code
Supervise = Callable[..., int]


def option_help(dest: str) -> str:
    """An option's help text, naming its environment variable."""
    variable, text = ENVIRONMENT[dest]
    return f"{text} [env {variable}]"


def setting(args: argparse.Namespace, dest: str, parse: Callable[[str], Any], default: Any) -> Any:
    """Flag > environment > default, with a usage error naming the bad source."""
    value = getattr(args, dest, None)
    if value is not None:
        return value
    variable = ENVIRONMENT[dest][0]
    raw = os.environ.get(variable)
    if raw in (None, ""):
        return default
    try:
        return parse(raw)
    except ValueError as e:
        raise ConfigError(f"invalid {variable}={raw!r}: {e}") from e


def flag(raw: str) -> bool:
    """A yes/no environment value."""
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("use 1/true/yes or 0/false/no")


def positive(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, refusing zero and below."""

    def parse_positive(raw: str) -> Any:
        value = parse(raw)
        if value <= 0:
            raise ValueError("must be positive")
        return value

    return parse_positive


def add_common_options(command: argparse.ArgumentParser) -> None:
    """--db, --jobs and the logging options of a command that loads the jobs."""
    command.add_argument("--db", help=option_help("db"))
    command.add_argument("--jobs", help=option_help("jobs"))
    command.add_argument("--log-level", help=option_help("log_level"))
    command.add_argument("--log-format", help=option_help("log_format"))


def add_engine_commands(commands: Any) -> None:
    """The subcommands worker.py serves alone: run, enqueue, schema."""
    run = commands.add_parser(
        "run",
        help="claim and run jobs until stopped",
        epilog="Environment only: "
        + "; ".join(option_help(dest) for dest in ("synchronous", "pg_listen", "pg_pooler")),
    )
    add_common_options(run)
    run.add_argument("--concurrency", type=int, help=option_help("concurrency"))
    run.add_argument("--async-concurrency", type=int, help=option_help("async_concurrency"))
    run.add_argument("--processes", type=int, help=option_help("processes"))
    run.add_argument("--queues", help=option_help("queues"))
    run.add_argument("--lease", type=float, help=option_help("lease"))
    run.add_argument("--shutdown-timeout", type=float, help=option_help("shutdown_timeout"))
    run.add_argument("--max-deaths", type=int, help=option_help("max_deaths"))
    run.add_argument("--prefetch", type=int, help=option_help("prefetch"))
    run.add_argument("--no-cron", action="store_const", const=True, help=option_help("no_cron"))
    run.add_argument("--keep-succeeded", type=float, help=option_help("keep_succeeded"))
    run.add_argument("--keep-failed", type=float, help=option_help("keep_failed"))
    run.add_argument("--burst", action="store_true", help="exit 0 once no job is due and none is running")

    enqueue = commands.add_parser("enqueue", help="schedule a job and print its id")
    add_common_options(enqueue)
    enqueue.add_argument("type", help="registered job type")
    enqueue.add_argument("--data", default="{}", help="job data, a JSON object (default {})")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, help="seconds from now")
    when.add_argument("--at", help="ISO 8601 time (naive means UTC)")
    enqueue.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    enqueue.add_argument("--queue", help="queue name (default: the job type's, else 'default')")
    enqueue.add_argument("--tag", help="at most one pending job per tag")
    enqueue.add_argument(
        "--on-conflict", choices=("replace", "ignore"), default="replace", help="when the tag has a pending job"
    )
    enqueue.add_argument("--cron", help="make it recurring: 5 fields, or 6 with seconds first (tag: cron:TYPE)")
    enqueue.add_argument("--timezone", help="of --cron (default UTC)")

    schema = commands.add_parser("schema", help="print the table definition (DDL) for other tools")
    schema.add_argument("--postgres", action="store_true", help="PostgreSQL's (schema_postgres.sql), not SQLite's")

    migrate = commands.add_parser("migrate", help="print the DDL the database lacks, and apply it")
    migrate.add_argument("--db", help=option_help("db"))
    migrate.add_argument("--dry-run", action="store_true", help="only print it")


def engine_parser() -> argparse.ArgumentParser:
    """``python worker.py``: the engine's own commands."""
    parser = argparse.ArgumentParser(
        prog="worker.py",
        description="A SQLite-first background job worker (this file alone: run, enqueue, schema).",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"worker {__version__}")
    add_engine_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


class TextFormatter(logging.Formatter):
    """Records as text, safe whatever a job type, queue or error from the table holds.

    Control characters are escaped, all but the line breaks of a multi-line
    record (a failure's traceback), whose later lines are indented: a record
    starts at the only line that does not begin with a space, so no value can
    forge one, nor drive the terminal.
    """

    def format(self, record: logging.LogRecord) -> str:
        first, *more = super().format(record).split("\n")
        return "\n".join([printable(first), *(f"  {printable(line)}" for line in more)])


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the job fields a record carries."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in ("action", "job_id", "job_type", "attempt"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Send the ``worker`` logger (and the jobs' loggers under it) to stderr."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError(f"invalid log level {level!r} (use DEBUG, INFO, WARNING or ERROR)")
    if log_format not in ("text", "json"):
        raise ConfigError(f"invalid log format {log_format!r} (use text or json)")
    handler = StderrHandler()  # survives a job closing sys.stderr
    text = TextFormatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s")
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    logger.handlers[:] = [handler]
    logger.disabled = False  # a framework's logging set-up (Django's LOGGING) may have disabled it
    logger.setLevel(numeric)
    logger.propagate = False


def ago(seconds: float | None) -> str:
    """A duration as 4.2s, 3.5m or 2.0h."""
    if seconds is None:
        return "-"
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def exit_code_of(command: Callable[[], int]) -> int:
    """Run a command; an error becomes one line on stderr and its exit code."""
    try:
        return command()
    except ConfigError as e:
        print(f"worker: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseUnusable as e:
        print(f"worker: {printable(str(e))}", file=sys.stderr)
        return EXIT_DATABASE
    except DatabaseError as e:
        print(f"worker: database error: {printable(str(e))}", file=sys.stderr)
        return EXIT_DATABASE
    except (UnknownJobType, InvalidJobData, ValueError) as e:
        print(f"worker: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a runtime failure: one line, the traceback only at DEBUG
        logger.debug("unexpected failure", exc_info=True)
        print(f"worker: {type(e).__name__}: {printable(str(e))}", file=sys.stderr)
        return EXIT_FAILURE


def run_engine_command(args: argparse.Namespace, *, supervise: Supervise | None = None) -> int:
    """``run``, ``enqueue``, ``schema`` or ``migrate``; ``supervise`` runs --processes (worker_cli's)."""
    log_level, log_format = setting(args, "log_level", str, "INFO"), setting(args, "log_format", str, "text")
    configure_logging(log_level, log_format)
    if args.command == "schema" and args.postgres:
        print(postgres_module().schema_script(), end="")
        return EXIT_OK
    if args.command == "schema":
        print(schema_text().split("-- version 1", 1)[0] + ddl_script(schema_statements_after(0)), end="")
        return EXIT_OK
    db = database_target(args.db) if args.db else resolve_db_path()
    if not is_postgres(db):
        schema_text()  # each of them needs it: say so before anything else
    if args.command == "migrate":
        return postgres_module().migrate(db, dry_run=args.dry_run) if is_postgres(db) else _migrate_command(args, db)
    jobs_module = setting(args, "jobs", str, None)
    load_jobs(jobs_module)
    if args.command == "enqueue":
        return _enqueue_command(args, db)
    return _run_command(args, db, jobs_module, log_level, log_format, supervise)


def ddl_script(statements: list[str]) -> str:
    """Statements as a script another tool can run, ending with the version record the worker reads."""
    record = RECORD_SCHEMA_VERSION_SQL.replace(":version", str(schema_version()))
    return "\n".join(statement.strip() + "\n" for statement in [*statements, record.strip() + ";"])


def _migrate_command(args: argparse.Namespace, db: str) -> int:
    """``migrate``: for teams whose own migrations must own every table (the worker also does this at start)."""
    conn = connect(db)
    try:
        current = installed_schema_version(conn)
        statements = schema_statements_after(current)
        if not statements:
            print(f"-- {db}: the worker's schema is current (version {current})")
            return EXIT_OK
        print(f"-- {db}: the worker's schema from version {current} to {schema_version()}")
        print(ddl_script(statements), end="")
        if not args.dry_run:
            apply_schema(conn)
    finally:
        conn.close()
    return EXIT_OK


def _enqueue_command(args: argparse.Namespace, db: str) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as e:
        raise InvalidJobData(f"--data is not valid JSON: {e}") from e
    at = datetime.fromisoformat(args.at) if args.at else None
    options = {"priority": args.priority, "queue": args.queue, "tag": args.tag}
    with Queue(db) as producer:
        if args.cron:
            new = producer.schedule_cron(args.type, args.cron, data, timezone=args.timezone, **options)
        else:
            new = producer.enqueue(args.type, data, delay=args.delay, at=at, on_conflict=args.on_conflict, **options)
    print(new.id)
    return EXIT_OK


def _run_command(
    args: argparse.Namespace,
    db: str,
    jobs_module: str | None,
    log_level: str,
    log_format: str,
    supervise: Supervise | None,
) -> int:
    settings = {
        "concurrency": setting(args, "concurrency", positive(int), DEFAULT_CONCURRENCY),
        "async_concurrency": setting(args, "async_concurrency", positive(int), DEFAULT_ASYNC_CONCURRENCY),
        "queues": setting(args, "queues", str, ""),
        "lease": setting(args, "lease", positive(float), DEFAULT_LEASE),
        "shutdown_timeout": setting(args, "shutdown_timeout", float, DEFAULT_SHUTDOWN_TIMEOUT),
        "max_deaths": setting(args, "max_deaths", positive(int), DEFAULT_MAX_DEATHS),
        "prefetch": setting(args, "prefetch", int, None),
        "keep_succeeded": setting(args, "keep_succeeded", float, None),
        "keep_failed": setting(args, "keep_failed", float, None),
    }
    no_cron = setting(args, "no_cron", flag, False)
    processes = setting(args, "processes", positive(int), 1)
    if processes > 1 and supervise is None:
        raise ConfigError("--processes needs worker_cli.py, the supervisor (pip install rowworker)")
    worker = Worker(
        db,
        concurrency=settings["concurrency"],
        async_concurrency=settings["async_concurrency"],
        queues=[q.strip() for q in settings["queues"].split(",") if q.strip()] or None,
        lease=settings["lease"],
        shutdown_timeout=settings["shutdown_timeout"],
        max_deaths=settings["max_deaths"],
        prefetch=settings["prefetch"],
        keep_succeeded=settings["keep_succeeded"],
        keep_failed=settings["keep_failed"],
        cron=not no_cron,
        burst=args.burst,
    )
    if supervise is not None and processes > 1:
        # Check the database once here, so a bad path is one clear error rather
        # than P children dying; the connection is closed before any child starts.
        open_store(db).close()
        child_args = ["--db", db] + ["--jobs", jobs_module] * (jobs_module is not None)
        for dest, value in settings.items():
            if value is not None:
                child_args += [f"--{dest.replace('_', '-')}", str(value)]
        child_args += ["--burst"] * args.burst + ["--no-cron"] * no_cron
        child_args += ["--log-level", log_level, "--log-format", log_format]
        return supervise(child_args, processes, worker.shutdown_timeout, burst=args.burst)

    signals_seen = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os._exit(EXIT_FAILURE)  # a second signal means now; leases cover the jobs left running
        logger.info("received %s", signal.Signals(signum).name)
        worker.stop()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    try:
        worker.run()
    except BaseException as e:
        # exit_code_of turns it into an exit code, but the process would not exit while a job's thread runs.
        code = EXIT_DATABASE if isinstance(e, DatabaseError) else EXIT_FAILURE
        exit_if_threads_are_left(EXIT_USAGE if isinstance(e, ConfigError) else code, e)
        raise
    exit_if_threads_are_left(EXIT_OK)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python worker.py``: run, enqueue and schema; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    if command is not None and command not in ENGINE_COMMANDS:
        print(
            f"worker: {command!r} is not a command of worker.py alone (it has: {', '.join(ENGINE_COMMANDS)}); "
            f"the operator commands come with the package: pip install rowworker, then `worker {command}`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args = engine_parser().parse_args(argv)
    return exit_code_of(lambda: run_engine_command(args))
