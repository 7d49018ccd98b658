"""The PostgreSQL store: worker.Store on psycopg 3, for workers on many hosts against one database.

    from worker_postgres import open_store
    store = open_store("postgresql://app@db.internal/app")
    with store.transaction():
        jobs, _ = store.claim(owner, "host:pid", store.now(), store.now() + 60_000, 100, '["send_mail"]', ())

The table is schema_postgres.sql's (beside schema.sql): the same contract as
the SQLite one.  Every verb means what SQLiteStore's means (worker.py); what
differs is how it stays safe with many writers at once:

- a claim locks the rows it takes (``FOR UPDATE SKIP LOCKED`` in a CTE), so
  two connections never take the same row and never wait for each other;
- every insert that a tag could refuse goes through the partial unique index
  on pending tags (``ON CONFLICT ... DO NOTHING``), never read-then-insert;
- leases are judged by the server's clock (``clock_timestamp()``), not the host's.

This is the only module that imports psycopg; worker.py imports without it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable, Container, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb
from psycopg.types.numeric import Int8Dumper

import worker
from worker import COPIED_COLUMNS, MAX_COUNT, MAX_DURATION_MS, SELECT_COLUMNS, Job

logger = logging.getLogger("worker")

# The table's definition, beside this file: schema_postgres.sql in a checkout,
# worker_schema_postgres.sql as installed (as worker.SCHEMA_FILES).
SCHEMA_FILES = (
    Path(__file__).with_name("schema_postgres.sql"),
    Path(__file__).with_name("worker_schema_postgres.sql"),
)
# pg_advisory_xact_lock's key while the schema is applied: "worker" in ASCII.
SCHEMA_LOCK = 0x776F726B6572
TAG_LOCK_SPACE = 0x776B7267  # pg_advisory_xact_lock's first key while a tag's pending row is replaced
CHANNEL = "worker_jobs"  # what schema_postgres.sql's trigger NOTIFYs on every INSERT
CONNECT_TIMEOUT = 10  # seconds; libpq's default is to wait for ever
# What the engine's connections ask of libpq and TCP unless the URL says otherwise
# (``?tcp_user_timeout=...``).  On a cut link, a statement sent and never
# acknowledged would block the worker for TCP's retransmissions (about 15
# minutes), and a reply that never comes for as long as the system's keepalive
# (2 hours): the worker would sit, its jobs rescued elsewhere, until the link
# returned.  With these it notices in about 30 s, and backs off and reconnects.
CONNECTION_DEFAULTS: dict[str, str | int] = {
    "application_name": "worker",  # in pg_stat_activity
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 15,  # seconds without traffic before the first probe
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms for sent data to be acknowledged
}
LISTEN_BACKOFF, MAX_LISTEN_BACKOFF = 0.05, 5.0  # seconds between attempts to LISTEN again
TAG_RACE_ATTEMPTS = 10  # see PostgresStore.insert: each retry means another writer won a race just now
Statement = tuple[str, Mapping[str, Any]]  # SQL and its parameters

# Every statement of this store touches a few rows through an index (a claim
# walks worker_jobs_claim for `limit` rows; a finish looks each id up by its
# key), and that plan is right whatever the table holds.  Without statistics
# (autovacuum is off on some servers, and a fresh table has none) or with stale
# ones, the planner chose otherwise, and the cost grew with the history: a
# claim sorted every due row (100 ms at 100,000, against 2.5 ms), a batch
# finish hashed the bitmap scan of every row ever leased (dead entries, until a
# vacuum).  Measured draining 20,000 rows: 6,300 jobs/s before, 9,800 after.
# A sort, hash or bitmap still runs where nothing else can, priced as "disabled"
# (10^10): so JIT is off too, or that price alone would compile the statement
# (150 ms for a one-row upsert that sorts its input).  Only the worker's own
# sessions are set so, never an app's connection.
#
SESSION_SETTINGS = (
    "SET enable_sort = off; SET enable_hashjoin = off; SET enable_mergejoin = off; SET enable_bitmapscan = off;"
    " SET jit = off"
)

# A worker stopped or cut off inside a transaction (SIGSTOP, a frozen VM, a link
# down) leaves it open on the server, its row locks held, for as long as the
# server's TCP takes to notice (hours) or until it comes back.  Those rows are
# its own running jobs (a heartbeat, a finish) and the per-minute counts every
# worker's finish adds to: the rescue of its jobs, and every other worker's
# recording, would wait for them (test_postgres_reliability, test_postgres_hosts).
# The server ends a session that has sat this long in a transaction without a
# statement; its writes roll back, and its jobs are rescued after their lease.
# The worker's own transactions are a few statements in a row, milliseconds.
# Set at each connect (a test shortens it), on the store's connections only.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 5000

# Behind a pooler in transaction mode (PgBouncer's pool_mode = transaction),
# each transaction may run on another server connection, shared with other
# clients.  So the engine keeps no state on a server session there: no
# prepared statements (psycopg prepares a statement run 5 times, and the next
# server connection has never heard of it), no session SETs (they would stay
# on the server connection, for whichever client gets it next: an app's), and
# no LISTEN (which needs a session of its own).  The settings are made with SET
# LOCAL at the start of each of the store's transactions instead.
POOLERS = ("none", "transaction")


def pooler() -> str:
    """WORKER_PG_POOLER: ``transaction`` behind PgBouncer in transaction mode (or another such pooler)."""
    value = os.environ.get("WORKER_PG_POOLER", "none").strip().lower() or "none"
    if value not in POOLERS:
        raise worker.ConfigError(f"invalid WORKER_PG_POOLER={value!r} (use none, or transaction)")
    return value


# FATAL errors at connect that pass: the server is starting, stopping or full.
_TRANSIENT_AT_CONNECT = ("starting up", "shutting down", "in recovery", "too many", "remaining connection slots")


# --- Connecting, and the errors the engine understands --------------------------


redacted = worker.redacted  # the URL without its password, for messages


def storable(text: str | None) -> str | None:
    """A job's error text as PostgreSQL's TEXT can hold it: a NUL (which SQLite keeps) written as ``\\x00``."""
    return text.replace("\x00", "\\x00") if text is not None and "\x00" in text else text


def _first_line(error: BaseException) -> str:
    text = str(error).strip().removeprefix("connection failed: ")
    return text.splitlines()[0] if text else type(error).__name__


def connect(url: str) -> psycopg.Connection[Any]:
    """An autocommit connection (each transaction is an explicit BEGIN); the engine's errors if there is none.

    DatabaseUnusable when the URL is malformed or the server refuses it for good
    (credentials, no such database or role), DatabaseUnavailable when it may work later (unreachable,
    starting up, full).
    """
    try:
        given = conninfo_to_dict(url)
        defaults = {name: value for name, value in CONNECTION_DEFAULTS.items() if name not in given}
        conn = psycopg.connect(make_conninfo(url, **defaults), autocommit=True)
    except psycopg.Error as e:
        line = _first_line(e)
        malformed = isinstance(e, psycopg.ProgrammingError)  # the URL itself: an unknown parameter, say
        refused = malformed or ("FATAL:" in line and not any(reason in line for reason in _TRANSIENT_AT_CONNECT))
        kind = worker.DatabaseUnusable if refused else worker.DatabaseUnavailable
        raise kind(f"cannot connect to {redacted(url)}: {line}") from e
    try:
        if pooler() == "transaction":
            conn.prepare_threshold = None
        else:
            conn.execute(session_settings())
    except psycopg.Error as e:
        conn.close()
        raise _engine_error(url, conn, e) from e
    # Every int as a BIGINT: psycopg would otherwise bind small ones as int2,
    # where a sum of two parameters can overflow, and one statement would be
    # prepared again for each width of its values.
    conn.adapters.register_dumper(int, Int8Dumper)
    return conn


def session_settings(scope: str = "") -> str:
    """The engine's settings for its own sessions (``scope`` LOCAL: for one transaction)."""
    settings = f"{SESSION_SETTINGS}; SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT_MS:d}"
    return settings.replace("SET ", f"SET {scope} ") if scope else settings


def _engine_error(url: str, conn: psycopg.Connection[Any] | None, error: psycopg.Error) -> worker.DatabaseError:
    """The engine's error for a psycopg one: retry later (DatabaseUnavailable), or DatabaseError."""
    # OperationalError covers a lost connection, an admin shutdown, serialization
    # failures, deadlocks, lock and statement timeouts, a full disk.  A write
    # refused as read-only is a standby's answer while a failover is under way
    # (the old primary demoted, a name not yet moved to the new one): retried
    # later too, it keeps the outcomes, where an error set them aside for good.
    transient = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)
    if isinstance(error, transient) or (conn is not None and conn.closed):
        return worker.DatabaseUnavailable(f"database {redacted(url)} unavailable: {_first_line(error)}")
    return worker.DatabaseError(f"database {redacted(url)}: {_first_line(error)}")


# --- The schema ---------------------------------------------------------------


@functools.cache
def schema_sections() -> list[tuple[int, str]]:
    """The ``-- version N`` sections of schema_postgres.sql, in order."""
    for path in SCHEMA_FILES:
        try:
            text = path.read_text(encoding="utf-8")
            break
        except FileNotFoundError:
            continue
    else:
        looked = " or ".join(str(path) for path in SCHEMA_FILES)
        raise worker.DatabaseUnusable(f"the table definition is missing: no {looked}")
    parts = re.split(r"^-- version (\d+)\s*$", text, flags=re.MULTILINE)
    return [(int(version), sql) for version, sql in zip(parts[1::2], parts[2::2], strict=True)]


def schema_version() -> int:
    """The schema version this code writes."""
    return schema_sections()[-1][0]


@functools.cache
def schema_objects() -> list[tuple[str, str]]:
    """(TABLE, INDEX or TRIGGER, name) of everything schema_postgres.sql creates."""
    text = "".join(sql for _, sql in schema_sections())
    pattern = r"^CREATE (?:UNIQUE |OR REPLACE )?(TABLE|INDEX|TRIGGER) (?:IF NOT EXISTS )?(\w+)"
    return [(kind, name) for kind, name in re.findall(pattern, text, flags=re.MULTILINE)]


def installed_schema_version(conn: psycopg.Connection[Any]) -> int:
    """The version recorded in worker_schema (0 for none); DatabaseUnusable when newer than this code."""
    cursor = conn.cursor(row_factory=tuple_row)  # an app's connection may read rows as dicts
    if cursor.execute("SELECT to_regclass('worker_schema')").fetchone() == (None,):
        return 0
    row = cursor.execute("SELECT version FROM worker_schema WHERE id = 1").fetchone()
    version = 0 if row is None else int(row[0])
    if version > schema_version():
        raise worker.DatabaseUnusable(
            f"database schema version {version} is newer than this worker's ({schema_version()}); upgrade the worker"
        )
    return version


def apply_schema(conn: psycopg.Connection[Any], *, again: bool = False) -> int:
    """Create or upgrade the tables to this code's version, once however many workers start at once; the version.

    The advisory lock is held to the end of the upgrading transaction: a second
    worker waits for it, then finds the schema current and applies nothing.
    ``again`` applies every section once more (each is idempotent), to
    re-create what was dropped by hand.
    """
    latest = schema_version()
    if installed_schema_version(conn) == latest and not again:
        return latest  # the common case takes no lock
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        installed = 0 if again else installed_schema_version(conn)  # the lock's last holder may have upgraded it
        for version, sql in schema_sections():
            if version > installed:
                conn.execute(sql.encode())  # a whole section at once: no parameters, so several statements may run
        conn.execute(
            "INSERT INTO worker_schema (id, version) VALUES (1, %s)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (latest,),
        )
    return latest


def open_store(url: str, queues: list[str] | None = None, clock: Callable[[], int] | None = None) -> PostgresStore:
    """Connect to ``url``, bring the schema to this code's version, and return the store on that connection.

    DatabaseUnusable or DatabaseUnavailable, each with a one-line message
    naming the URL without its password, when that cannot be done.
    """
    conn = connect(url)
    try:
        apply_schema(conn)
    except psycopg.Error as e:
        conn.close()
        error = _engine_error(url, conn, e)
        if type(error) is worker.DatabaseError:  # not transient: this database cannot hold the table
            raise worker.DatabaseUnusable(f"cannot create the schema in {redacted(url)}: {_first_line(e)}") from e
        raise error from e
    except BaseException:
        conn.close()
        raise
    return PostgresStore(conn, url, queues, clock=clock)


def _ended_by_the_server(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server has ended this idle session (a restart, pg_terminate_backend, a pooler's idle timeout).

    Its goodbye and the end of the stream wait unread on the socket, and
    psycopg learns of them only as the next statement's error: the first
    transaction after a restart failed, and so did a job's first
    ctx.enqueue_now, though the server was back.  Read here, they close the
    connection, to be made again before anything is sent on it.  One poll of
    the socket when nothing waits (an idle session is sent nothing else).
    """
    try:
        for _ in range(3):  # the goodbye, then the end of the stream
            if not _readable(conn.fileno()):
                break
            conn.pgconn.consume_input()
    except (OSError, ValueError, psycopg.Error):
        pass  # the stream ended, or cannot be looked at: conn.closed says which
    return conn.closed


def _readable(fd: int) -> bool:
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()  # not select(): a web app's process may hold descriptors past FD_SETSIZE
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


# --- The store ------------------------------------------------------------------

# The columns of a row as a claim returns them (the CTE's `picked` has an id too).
JOB_COLUMNS = ", ".join(f"job.{column}" for column in worker.COLUMNS)

# A new row copies its policy from the old one as it is: the table's CHECKs hold
# each within worker.py's bounds already (SQLite's older rows needed clamping).
# Never least(): PostgreSQL's ignores NULLs, and a NULL here means "the job type's".
COPIED_POLICY = "max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms"
REMOVE_AT = (
    f"CASE WHEN persistent <> 0 THEN NULL ELSE %(now)s + least(coalesce(keep_ms, %(keep_ms)s), {MAX_DURATION_MS}) END"
)
# The arbiter of every insert under the tag rule: the partial unique index worker_jobs_pending_tag.
UNLESS_TAG_IS_PENDING = "ON CONFLICT (tag) WHERE status = 'pending' AND tag IS NOT NULL DO NOTHING"
# The priority levels of the pending rows, highest first, one seek down
# worker_jobs_claim (priority DESC, due) each: a skip scan, which PostgreSQL 15
# does not do by itself.  Within one level `due` orders the index, so a range
# `due <= now` or a `LIMIT 1` there reads only what it returns.
PRIORITY_LEVELS = """WITH RECURSIVE level(priority) AS (
        (SELECT priority FROM worker_jobs WHERE status = 'pending' ORDER BY priority DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT priority FROM worker_jobs WHERE status = 'pending' AND priority < level.priority
                 ORDER BY priority DESC LIMIT 1)
          FROM level WHERE level.priority IS NOT NULL
    )"""


@functools.lru_cache(maxsize=64)
def _names(array: str) -> list[str]:
    """A JSON array of names (the worker's types) as a list to bind; the same few strings come every claim."""
    names = json.loads(array)
    assert isinstance(names, list)
    return [str(name) for name in names]


class OperatingReads:
    """What the operating tools read (status, jobs, show, check, the dashboard): SQLiteStore's reads, on PostgreSQL.

    Apart from the verbs the worker runs on, so that a reader of either finds
    the other whole; PostgresStore has both.
    """

    conn: psycopg.Connection[Any]
    url: str

    def _execute(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None) -> psycopg.Cursor[Any]:
        raise NotImplementedError  # PostgresStore's

    def replaced(self) -> str | None:
        return None  # a server's database is not a file that can be swapped under the worker

    def missing_schema(self) -> list[str]:
        tables = [name for kind, name in schema_objects() if kind in ("TABLE", "INDEX")]
        triggers = [name for kind, name in schema_objects() if kind == "TRIGGER"]
        there = {row[0] for row in self._execute("SELECT relname FROM pg_class WHERE relname = ANY(%s)", (tables,))}
        there |= {row[0] for row in self._execute("SELECT tgname FROM pg_trigger WHERE tgname = ANY(%s)", (triggers,))}
        return [name for _, name in schema_objects() if name not in there]

    def repair_schema(self) -> bool:
        if not self.missing_schema():
            return False
        try:
            apply_schema(self.conn, again=True)
        except psycopg.Error as e:
            raise _engine_error(self.url, self.conn, e) from e
        return True

    # Every claim, finish and renewal is an UPDATE, and leaves a dead row
    # version behind: with autovacuum off, the table and its indexes would grow
    # with every job ever run, and the claim slow with them (bench/README.md).
    VACUUMED = "worker_jobs, worker_finished_per_minute, worker_processes"

    def maintain(self) -> str | None:
        on = self._execute("SELECT current_setting('autovacuum')::bool").fetchone()
        if on and on[0]:
            return None  # the server's autovacuum keeps up, with schema_postgres.sql's settings for worker_jobs
        started = time.monotonic()
        self._execute(f"VACUUM (ANALYZE) {self.VACUUMED}")  # on an autocommit connection: no transaction
        return f"vacuumed {self.VACUUMED} in {time.monotonic() - started:.1f} s (autovacuum is off on this server)"

    def describe(self) -> dict[str, Any]:
        version = self._execute("SELECT version FROM worker_schema WHERE id = 1").fetchone()
        server = self._execute("SHOW server_version").fetchone()
        return {"database": redacted(self.url), "schema_version": int(version[0]) if version else 0,
                "engine": f"PostgreSQL {str(server[0]).split()[0] if server else '?'}"}  # fmt: skip

    PENDING_BY_QUEUE_SQL = """
    SELECT queue, count(*) FILTER (WHERE due <= %(now)s), count(*) FILTER (WHERE due > %(now)s),
           min(due) FILTER (WHERE due <= %(now)s)
      FROM worker_jobs WHERE status = 'pending' GROUP BY queue
    """

    def pending_by_queue(self, now: int) -> list[tuple[str, int, int, int | None]]:
        return self._execute(self.PENDING_BY_QUEUE_SQL, {"now": now}).fetchall()

    def running_by_queue(self) -> list[tuple[str, int]]:
        sql = "SELECT queue, count(*) FROM worker_jobs WHERE status = 'running' GROUP BY queue"
        return self._execute(sql).fetchall()

    FINISHED_PER_MINUTE_SQL = """
    SELECT queue, status, sum(count)::bigint FROM worker_finished_per_minute
     WHERE minute >= %(since)s GROUP BY queue, status
    """

    def finished_by_queue(self, since: int) -> list[tuple[str, str, int]]:
        return self._execute(self.FINISHED_PER_MINUTE_SQL, {"since": since - since % worker.MINUTE_MS}).fetchall()

    BY_MINUTE_SQL = """
    SELECT minute, status, sum(count)::bigint FROM worker_finished_per_minute
     WHERE minute >= %(since)s GROUP BY minute, status ORDER BY minute, status
    """

    def finished_by_minute(self, since: int) -> list[tuple[int, str, int]]:
        return self._execute(self.BY_MINUTE_SQL, {"since": since - since % worker.MINUTE_MS}).fetchall()

    def running_by_owner(self) -> dict[str, int]:
        sql = "SELECT owner, count(*) FROM worker_jobs WHERE status = 'running' GROUP BY owner"
        return dict(self._execute(sql).fetchall())

    def processes(self) -> list[dict[str, Any]]:
        names = (*worker.PROCESS_COLUMNS, "types")
        rows = self._execute(f"SELECT {', '.join(names)} FROM worker_processes ORDER BY started").fetchall()
        return [dict(zip(names, row, strict=True)) for row in rows]

    CRON_PENDING_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE status = 'pending' AND cron_schedule IS NOT NULL ORDER BY due
    """
    LAST_CRON_RUN_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE tag = %(tag)s AND cron_slot IS NOT NULL AND status IN ('running', 'succeeded', 'failed')
     ORDER BY cron_slot DESC, id DESC LIMIT 1
    """

    def cron_schedules(self) -> list[tuple[Job, Job | None]]:
        schedules = []
        for row in self._execute(self.CRON_PENDING_SQL).fetchall():
            pending = worker.read_job(row)
            last = self._execute(self.LAST_CRON_RUN_SQL, {"tag": pending.tag}).fetchone() if pending.tag else None
            schedules.append((pending, worker.read_job(last) if last else None))
        return schedules

    UNRUNNABLE_SQL = """
    SELECT type, count(*), min(due) FROM worker_jobs
     WHERE status = 'pending' AND NOT type = ANY(%(known)s) GROUP BY type ORDER BY type
    """

    def unrunnable(self, known: list[str]) -> list[tuple[str, int, int]]:
        return self._execute(self.UNRUNNABLE_SQL, {"known": known}).fetchall()

    def jobs(self, *, status: str | None, type: str | None, queue: str | None, limit: int) -> list[Job]:
        filters = {"status": status, "type": type, "queue": queue}
        # Only the filters given, so that each can use its index.
        where = " AND ".join(f"{column} = %({column})s" for column, value in filters.items() if value is not None)
        sql = f"SELECT {SELECT_COLUMNS} FROM worker_jobs WHERE {where or 'true'} ORDER BY id DESC LIMIT %(limit)s"
        return [worker.read_job(row) for row in self._execute(sql, {**filters, "limit": limit})]

    CHAIN_SQL = f"""
    WITH RECURSIVE
      back(id, parent, depth) AS (
        SELECT id, rescheduled_from_job, 0 FROM worker_jobs WHERE id = %(id)s
        UNION SELECT w.id, w.rescheduled_from_job, back.depth + 1
                FROM worker_jobs w JOIN back ON w.id = back.parent WHERE back.depth < %(reach)s),
      forward(id, depth) AS (
        SELECT %(id)s::bigint, 0
        UNION SELECT w.id, forward.depth + 1
                FROM worker_jobs w JOIN forward ON w.rescheduled_from_job = forward.id WHERE forward.depth < %(reach)s)
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE id IN (SELECT id FROM back UNION SELECT id FROM forward) ORDER BY id
    """

    def chain(self, id: int, *, reach: int) -> list[Job]:
        return [worker.read_job(row) for row in self._execute(self.CHAIN_SQL, {"id": id, "reach": reach}).fetchall()]

    RETRIED_AS_SQL = """
    SELECT old.id, new.id FROM worker_jobs AS old
      JOIN worker_jobs AS new ON new.rescheduled_from_job = old.id
                                   AND (new.attempt > old.attempt OR new.snoozes > old.snoozes)
     WHERE old.id = ANY(%(ids)s)
    """

    def retried_as(self, ids: list[int]) -> dict[int, int]:
        return dict(self._execute(self.RETRIED_AS_SQL, {"ids": ids}).fetchall())

    PROGRESS_OF_SQL = "SELECT id, progress FROM worker_jobs WHERE id = ANY(%(ids)s) AND progress IS NOT NULL"

    def progress_of(self, ids: list[int]) -> dict[int, str]:
        return dict(self._execute(self.PROGRESS_OF_SQL, {"ids": ids}).fetchall())


class PostgresStore(OperatingReads, worker.QueueControls):
    """worker.Store on one psycopg connection (one worker's, or one thread's): the SQL of each verb beside it.

    Unlike SQLite, other writers run at the same time as any transaction here:
    each verb is one statement that holds by itself (row locks, the unique
    index), read committed as PostgreSQL's default.  ``clock``: epoch ms to
    judge leases by instead of the server's clock (tests pass fake ones; a
    real worker must not, or a host whose clock is off would rescue live jobs).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        url: str,
        queues: list[str] | None = None,
        *,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.conn = conn
        self.url = url  # to connect again once the connection is lost
        self._in_transaction = False  # inside transaction(): a lost connection is not made again there
        self._pooled = pooler() == "transaction"  # then each transaction sets what a session would (SET LOCAL)
        self._pid = worker._process_id  # the process the connection belongs to
        self._clock = clock
        self._offset_ms = 0
        self._queues = queues
        queue_filter = "AND queue = ANY(%(queues)s)" if queues else ""
        # "<= 0", not "= 0", as SQLiteStore (the table refuses negative deaths here, but the claims stay alike).
        self._claim_sqls = {
            (kind, suspect): self.CLAIM_SQL.replace("{queue_filter}", queue_filter + control_filter)
            .replace("{columns}", JOB_COLUMNS)
            .replace("{deaths}", "deaths > 0" if suspect else "deaths <= 0")
            for kind, control_filter in self.CLAIM_CONTROL_FILTERS.items()
            for suspect in (False, True)
        }
        self._next_due_sql = self.NEXT_DUE_SQL.replace("{queue_filter}", queue_filter)
        self._next_due_except_sql = self.NEXT_DUE_SQL.replace(
            "{queue_filter}", queue_filter + self.CLAIM_CONTROL_FILTERS["rest"]
        )
        self._queues_param = queues
        self._controls_sql = self.CONTROLS_OF_SQL.format(where="WHERE queue = ANY(%(queues)s)" if queues else "")
        self._held_back = {}
        if clock is None:
            self.refresh_clock()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # -- the transaction, the statements, the clock --

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A write transaction, all or nothing (psycopg's: BEGIN ... COMMIT, or ROLLBACK on any error).

        A lost connection is made again here, at the start of the next
        transaction (never inside one, which would lose its writes).
        """
        if worker._process_id != self._pid:
            # The socket is the parent's: a statement here would interleave with
            # its own, and closing it would end the parent's session.
            raise worker.ForkedConnection(
                f"PostgreSQL connection opened in process {self._pid} used in process {worker._process_id}"
            )
        self._connected_again_if_lost()
        outer, self._in_transaction = self._in_transaction, True
        try:
            with self.conn.transaction():
                if self._pooled:
                    self.conn.execute(session_settings("LOCAL"))
                yield self.conn
        except psycopg.Error as e:  # BEGIN, COMMIT, or the caller's own statement on this connection
            raise _engine_error(self.url, self.conn, e) from e
        finally:
            self._in_transaction = outer

    def _connected_again_if_lost(self) -> None:
        # Never read a socket inherited across fork(): what waits on it is the parent's.
        if self.conn.closed or (worker._process_id == self._pid and _ended_by_the_server(self.conn)):
            self.conn = connect(self.url)
            if self._clock is None:
                self.refresh_clock()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[psycopg.Connection[Any]]:
        """Inside transaction(): psycopg's nested transaction() is a SAVEPOINT, rolled back alone on an error."""
        try:
            with self.conn.transaction():
                yield self.conn
        except psycopg.Error as e:
            raise _engine_error(self.url, self.conn, e) from e

    def _execute(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None) -> psycopg.Cursor[Any]:
        """Run one statement; the engine's errors for psycopg's.  Its rows are fetched already (a client cursor).

        Outside a transaction a lost connection is made again first, as
        transaction() does: a Queue's untagged enqueue is one INSERT of its own,
        and failed at every call, for good, once its connection had been lost.
        """
        if not self._in_transaction:
            self._connected_again_if_lost()
        try:
            return self.conn.execute(sql, params)
        except psycopg.Error as e:
            raise _engine_error(self.url, self.conn, e) from e

    def _scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the one row a statement returns."""
        row = self._execute(sql, params).fetchone()
        assert row is not None, "the statement returns one row"
        return row[0]

    SERVER_TIME_SQL = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

    def refresh_clock(self) -> None:
        """Measure again how far the server's clock is from this host's monotonic one (the worker's heartbeat does).

        Between measurements ``now()`` runs on time.monotonic(), which a step of
        the host's wall clock does not move, so a host whose clock is hours off
        still judges leases as the server does, within half a round trip.
        """
        before = time.monotonic_ns()
        server_ms = self._scalar(self.SERVER_TIME_SQL)
        after = time.monotonic_ns()
        self._offset_ms = int(server_ms) - (before + after) // 2_000_000

    def now(self) -> int:
        """The server's time in epoch ms (or the ``clock`` given): what leases, rescues and claims are judged by."""
        if self._clock is not None:
            return self._clock()
        return time.monotonic_ns() // 1_000_000 + self._offset_ms

    # -- what the producer writes and reads (Queue) --

    INSERT_SQL = """
    INSERT INTO worker_jobs (type, data, queue, priority, due, tag, cron_schedule, cron_timezone, cron_slot,
                             created_at, max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    VALUES (%(type)s, %(data)s, %(queue)s, %(priority)s, %(due)s, %(tag)s, %(cron_schedule)s, %(cron_timezone)s,
            %(cron_slot)s, %(created_at)s, %(max_attempts)s, %(retry_delay_ms)s, %(backoff)s, %(timeout_ms)s,
            %(keep_ms)s, %(persistent)s)
    """
    INSERT_RETURNING_SQL = INSERT_SQL + "RETURNING id"
    INSERT_UNLESS_TAGGED_SQL = INSERT_SQL + UNLESS_TAG_IS_PENDING + " RETURNING id"
    # Held to the end of the transaction, in a statement of its own: the cancel
    # that follows takes its snapshot after the last holder committed.  The
    # two-key form, whose keys never meet an app's one-key advisory locks.
    LOCK_TAG_SQL = f"SELECT pg_advisory_xact_lock({TAG_LOCK_SPACE}, hashtext(%(tag)s))"
    PENDING_WITH_TAG_SQL = f"SELECT {SELECT_COLUMNS} FROM worker_jobs WHERE tag = %(tag)s AND status = 'pending'"

    def insert(self, row: dict[str, Any], on_conflict: str = "replace") -> Job:
        """One row (Queue._new_row's), under the tag rule: at most one pending row per tag.

        ``replace`` cancels the tag's pending row and inserts; ``ignore``
        inserts nothing then, and returns the pending row.  Another writer
        can make or end the tag's pending row between two statements; the
        unique index then refuses the insert (DO NOTHING), and the step is
        taken again: each later statement sees what that writer committed.
        Replacing writers of one tag take turns (LOCK_TAG_SQL), or two of
        them could keep cancelling each other's row and neither get in.
        """
        steps = self.insert_steps(row, on_conflict)
        try:
            statement = next(steps)
            while True:
                cursor = self._execute(*statement)
                statement = steps.send(cursor.fetchall() if cursor.description else [])
        except StopIteration as done:
            inserted: Job = done.value
            return inserted

    @classmethod
    def insert_steps(cls, row: dict[str, Any], on_conflict: str) -> Generator[Statement, list[tuple[Any, ...]], Job]:
        """The statements of ``insert``, each sent the rows it returned; the Job is the generator's value.

        Apart from their execution, so that AsyncStoreInCallersTransaction awaits the same statements on an
        app's psycopg AsyncConnection.
        """
        if row["tag"] is None:
            ((id,),) = yield cls.INSERT_RETURNING_SQL, row
            return worker._new_job(id, row)
        if on_conflict not in ("replace", "ignore"):
            raise ValueError(f"on_conflict must be 'replace' or 'ignore', not {on_conflict!r}")
        if on_conflict == "replace":
            yield cls.LOCK_TAG_SQL, {"tag": row["tag"]}
        for _ in range(TAG_RACE_ATTEMPTS):
            if on_conflict == "replace":
                reason = f"replaced by a newer job with tag {row['tag']!r}"
                params = {"id": None, "tag": row["tag"], "type": None, "now": row["created_at"], "reason": reason,
                          "keep_ms": worker.default_keep_ms(succeeded=False)}  # fmt: skip
                cancelled = yield cls.CANCEL_BY["tag"], params
                counted = worker.finished_per_minute(cancelled)
                if counted:
                    yield cls.COUNT_FINISHED_SQL, _finished_counts(counted)
            inserted = yield cls.INSERT_UNLESS_TAGGED_SQL, row
            if inserted:
                return worker._new_job(inserted[0][0], row)
            if on_conflict == "ignore":
                pending = yield cls.PENDING_WITH_TAG_SQL, {"tag": row["tag"]}
                if pending:
                    return Job.from_row(pending[0])
        raise worker.DatabaseUnavailable(f"tag {row['tag']!r}: other writers kept taking it; try again")

    # enqueue_many's rows in one statement: %(rows)s is a JSON array of [type, data,
    # queue] arrays.  Cast, since a NULL in a SELECT list would otherwise be text.
    UNIFORM_INSERT_SQL = """
    INSERT INTO worker_jobs (type, data, queue, priority, due, tag, cron_schedule, cron_timezone, cron_slot,
                             created_at, max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    SELECT given.value ->> 0, (given.value -> 1)::text, given.value ->> 2,
           %(priority)s::bigint, %(due)s::bigint, %(tag)s::text, %(cron_schedule)s::text, %(cron_timezone)s::text,
           %(cron_slot)s::bigint, %(created_at)s::bigint, %(max_attempts)s::bigint, %(retry_delay_ms)s::bigint,
           %(backoff)s::double precision, %(timeout_ms)s::bigint, %(keep_ms)s::bigint, %(persistent)s::bigint
      FROM json_array_elements(%(rows)s::json) WITH ORDINALITY AS given (value, position)
     ORDER BY given.position
    RETURNING id
    """

    def insert_uniform(self, shared: Mapping[str, Any], rows: str) -> list[int]:
        """Untagged rows alike but for type, data and queue (``rows``: a JSON array of those); their ids, in order.

        The ids come from RETURNING: other writers take ids from the same
        sequence meanwhile, so they need not be consecutive.  The rows are
        inserted, and take their ids from the sequence, in the array's order
        (ORDER BY position), so the ids in ascending order are the array's.
        """
        params = {column: shared[column] for column in worker.INSERT_COLUMNS[3:]} | {"rows": rows}
        return sorted(id for (id,) in self._execute(self.UNIFORM_INSERT_SQL, params).fetchall())

    CANCEL_SQL = f"""
    UPDATE worker_jobs
       SET status = 'cancelled', finished = %(now)s, error = %(reason)s, remove_at = {REMOVE_AT}
     WHERE {{where}} AND status = 'pending'
    RETURNING finished, queue, status
    """
    CANCEL_BY: ClassVar[dict[str, str]] = {  # by worker.cancel_key()
        "id": CANCEL_SQL.format(where="id = %(id)s"),
        "tag": CANCEL_SQL.format(where="tag = %(tag)s"),
        "type": CANCEL_SQL.format(where="type = %(type)s"),
    }

    def cancel_pending(
        self, now: int, reason: str, keep_ms: int, *, id: int | None = None, tag: str | None = None,
        type: str | None = None,
    ) -> int:  # fmt: skip
        """Cancel the pending row with this id, or every pending row with this tag or type; how many."""
        params = {"id": id, "tag": tag, "type": type, "now": now, "reason": storable(reason), "keep_ms": keep_ms}
        cancelled = self._execute(self.CANCEL_BY[worker.cancel_key(id=id, tag=tag, type=type)], params).fetchall()
        self.count_finished(cancelled)
        return len(cancelled)

    # A manual retry, as SQLiteStore's.  The row is locked first, in a statement
    # of its own: two operators retrying it at once would otherwise each see, in
    # their snapshot, that no retry follows it yet.  The INSERT after the lock
    # takes a new snapshot (read committed), which sees the other's retry.
    LOCK_ROW_SQL = "SELECT 1 FROM worker_jobs WHERE id = %(id)s FOR UPDATE"
    MANUAL_RETRY_SQL = f"""
    INSERT INTO worker_jobs
           (type, data, queue, priority, due, tag, attempt, rescheduled_from_job, created_at, max_attempts,
            retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    SELECT type, data, queue, priority, %(now)s, CASE WHEN cron_schedule IS NULL THEN tag END, attempt + 1, id,
           %(now)s, {COPIED_POLICY}, persistent
      FROM worker_jobs AS old
     WHERE id = %(id)s AND status IN ('failed', 'cancelled') AND attempt < {MAX_COUNT}
       AND NOT EXISTS (SELECT 1 FROM worker_jobs WHERE rescheduled_from_job = old.id
                                   AND (attempt > old.attempt OR snoozes > old.snoozes))
    {UNLESS_TAG_IS_PENDING}
    RETURNING {SELECT_COLUMNS}
    """

    REQUEST_CANCEL_SQL = """
    UPDATE worker_jobs SET cancel_requested = %(now)s, cancel_requested_by = %(by)s
     WHERE id = %(id)s AND status = 'running' AND cancel_requested IS NULL
    """
    CANCEL_REQUESTS_SQL = """
    SELECT id, cancel_requested, cancel_requested_by FROM worker_jobs
     WHERE status = 'running' AND owner = %(owner)s AND cancel_requested IS NOT NULL
    """

    # One statement for the batch, as FINISH_MANY_SQL; fenced on the owner.
    WRITE_PROGRESS_SQL = """
    UPDATE worker_jobs AS job SET progress = given.progress
      FROM unnest(%(ids)s::bigint[], %(progress)s::text[]) AS given (id, progress)
     WHERE job.id = given.id AND job.status || '' = 'running' AND job.owner = %(owner)s
    """

    def write_progress_if_owned(self, owner: str, progress: Iterable[tuple[int, str]]) -> None:
        """Store each (id, progress JSON) in its row while ``owner`` runs it."""
        reports = list(progress)
        params = {"owner": owner, "ids": [id for id, _ in reports], "progress": [text for _, text in reports]}
        self._execute(self.WRITE_PROGRESS_SQL, params)

    def request_cancel(self, id: int, now: int, by: str) -> bool:
        """Ask the worker running row ``id`` to cancel it; False if it is not running, or was asked already."""
        return self._execute(self.REQUEST_CANCEL_SQL, {"id": id, "now": now, "by": by}).rowcount == 1

    def cancel_requests(self, owner: str) -> list[tuple[int, int, str | None]]:
        """(id, when, by whom) of the rows running under ``owner`` that someone asked to cancel."""
        return self._execute(self.CANCEL_REQUESTS_SQL, {"owner": owner}).fetchall()

    def manual_retry(self, id: int, now: int) -> Job | None:
        """Insert the next attempt, due now, of a failed or cancelled row that ends its chain; None if it is not one."""
        if not self._execute(self.LOCK_ROW_SQL, {"id": id}).fetchall():
            return None
        inserted = self._execute(self.MANUAL_RETRY_SQL, {"id": id, "now": now}).fetchall()
        return Job.from_row(inserted[0]) if inserted else None

    RETRYABLE_FAILED_SQL = """
    SELECT id FROM worker_jobs AS old
     WHERE status = 'failed' AND (%(type)s::text IS NULL OR type = %(type)s::text)
       AND NOT EXISTS (SELECT 1 FROM worker_jobs WHERE rescheduled_from_job = old.id
                                   AND (attempt > old.attempt OR snoozes > old.snoozes))
     ORDER BY id
    """

    def retryable_failed(self, type: str | None) -> list[int]:
        """The failed rows (of one type) that end their chain, oldest first."""
        return [row[0] for row in self._execute(self.RETRYABLE_FAILED_SQL, {"type": type})]

    GET_SQL = f"SELECT {SELECT_COLUMNS} FROM worker_jobs WHERE id = %(id)s"

    def get(self, id: int) -> Job | None:
        """The row with this id, or None."""
        row = self._execute(self.GET_SQL, {"id": id}).fetchone()
        return Job.from_row(row) if row else None

    # Batches keep each transaction short; SKIP LOCKED: two workers pruning at
    # once take different rows instead of waiting for each other.
    PRUNE_SQL = """
    DELETE FROM worker_jobs
     WHERE id IN (SELECT id FROM worker_jobs
                   WHERE remove_at <= %(now)s AND status IN ('succeeded', 'failed', 'cancelled') AND persistent = 0
                   LIMIT %(batch_size)s
                     FOR UPDATE SKIP LOCKED)
    """
    PRUNABLE_SQL = """
    SELECT count(*) FROM worker_jobs
     WHERE remove_at <= %(now)s AND status IN ('succeeded', 'failed', 'cancelled') AND persistent = 0
    """
    FORGET_OLD_COUNTS_SQL = "DELETE FROM worker_finished_per_minute WHERE minute < %(before)s"

    def prune(self, now: int, batch_size: int) -> int:
        """Delete up to ``batch_size`` finished rows whose remove_at has passed (never a persistent one); how many."""
        return self._execute(self.PRUNE_SQL, {"now": now, "batch_size": batch_size}).rowcount

    def prunable(self, now: int) -> int:
        """How many rows ``prune`` would delete."""
        return int(self._scalar(self.PRUNABLE_SQL, {"now": now}))

    def forget_counts_before(self, before: int) -> None:
        """Drop the per-minute counts of finished rows older than ``before``."""
        self._execute(self.FORGET_OLD_COUNTS_SQL, {"before": before})

    # -- a recurring job's rows --

    RUNNING_CRON_RUN_SQL = """
    SELECT id FROM worker_jobs
     WHERE tag = %(tag)s AND status = 'running' AND cron_schedule = %(cron)s
       AND cron_timezone IS NOT DISTINCT FROM %(timezone)s::text
     LIMIT 1
    """
    LAST_CRON_SLOT_SQL = """
    SELECT cron_slot FROM worker_jobs
     WHERE tag = %(tag)s AND cron_slot IS NOT NULL AND status IN ('running', 'succeeded', 'failed')
     ORDER BY cron_slot DESC LIMIT 1
    """

    def pending_with_tag(self, tag: str) -> Job | None:
        """The pending row of this tag (there is at most one), or None."""
        row = self._execute(self.PENDING_WITH_TAG_SQL, {"tag": tag}).fetchone()
        return Job.from_row(row) if row else None

    def cron_run_running(self, tag: str, cron: str, timezone: str | None) -> bool:
        """Whether a run of this very schedule (tag, expression and zone) is running now."""
        params = {"tag": tag, "cron": cron, "timezone": timezone}
        return self._execute(self.RUNNING_CRON_RUN_SQL, params).fetchone() is not None

    def last_cron_slot(self, tag: str) -> int | None:
        """The newest slot that a run of this schedule has had (running or ended), or None."""
        row = self._execute(self.LAST_CRON_SLOT_SQL, {"tag": tag}).fetchone()
        return None if row is None else int(row[0])

    # -- what the worker writes and reads --

    REGISTER_PROCESS_SQL = """
    INSERT INTO worker_processes (id, host, pid, started, last_seen, lease_ms, concurrency, running, queues, version,
                                  types)
    VALUES (%(id)s, %(host)s, %(pid)s, %(now)s, %(now)s, %(lease_ms)s, %(concurrency)s, 0, %(queues)s, %(version)s,
            %(types)s)
    ON CONFLICT (id) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, started = excluded.started, last_seen = excluded.last_seen,
           lease_ms = excluded.lease_ms, concurrency = excluded.concurrency, running = 0, queues = excluded.queues,
           version = excluded.version, types = excluded.types
    """
    # Rows of processes gone for a day are of no more use to anyone reading status.
    FORGET_PROCESSES_SQL = "DELETE FROM worker_processes WHERE id = %(id)s OR last_seen < %(long_ago)s"
    PROCESS_ALIVE_SQL = "UPDATE worker_processes SET last_seen = %(now)s, running = %(running)s WHERE id = %(id)s"

    def register_process(self, process: Mapping[str, Any], now: int) -> None:
        """Record a worker process as started and alive now; forget the processes gone for a day."""
        self._execute(self.FORGET_PROCESSES_SQL, {"id": process["id"], "long_ago": now - worker.DAY_MS})
        self._execute(self.REGISTER_PROCESS_SQL, {**process, "now": now})

    def process_alive(self, owner: str, running: int, now: int) -> None:
        """Record that the process ``owner`` is alive now and runs ``running`` jobs; the server's clock measured again.

        The heartbeat is the one verb a live worker runs every lease/3, idle or
        not: so ``now()`` never drifts from the server's for long.
        """
        self._execute(self.PROCESS_ALIVE_SQL, {"id": owner, "now": now, "running": running})
        if self._clock is None:
            self.refresh_clock()

    def forget_process(self, owner: str) -> None:
        """Remove the process's row (it stopped)."""
        self._execute(self.FORGET_PROCESSES_SQL, {"id": owner, "long_ago": 0})

    RENEW_LEASES_SQL = """
    UPDATE worker_jobs SET lease_until = %(lease_until)s
     WHERE status = 'running' AND owner = %(owner)s
    """

    def renew_leases(self, owner: str, lease_until: int) -> None:
        """Extend to ``lease_until`` the lease of every row running under ``owner``."""
        self._execute(self.RENEW_LEASES_SQL, {"lease_until": lease_until, "owner": owner})

    GIVE_BACK_SQL = """
    UPDATE worker_jobs
       SET status = 'pending', started = NULL, worker = NULL, owner = NULL, lease_until = NULL
     WHERE id = %(id)s AND status = 'running' AND owner = %(owner)s
    """

    GIVE_BACK_TAKEN_TAG_SQL = f"""
    UPDATE worker_jobs
       SET status = 'cancelled', lease_until = NULL, finished = %(now)s, remove_at = {REMOVE_AT},
           error = 'not run to its end: a newer pending job holds its tag ' || quote_literal(tag)
                   || ' and runs in its place'
     WHERE id = %(id)s AND status = 'running' AND owner = %(owner)s
       AND EXISTS (SELECT 1 FROM worker_jobs AS newer WHERE newer.tag = worker_jobs.tag AND newer.status = 'pending')
    RETURNING finished, queue, status
    """
    RUNNING_TAG_SQL = "SELECT tag FROM worker_jobs WHERE id = %(id)s AND status = 'running' AND owner = %(owner)s"

    def give_back_if_owned(self, id: int, owner: str, now: int) -> str | None:
        """As SQLiteStore's; a tagged row's tag is locked first, as an insert with that tag locks it, so that a
        pending row of the tag that commits meanwhile cannot make this one a second.

        The table's trigger NOTIFYs on INSERT only (an UPDATE trigger would fire
        on every claim and finish), so a row given back wakes idle workers here.
        """
        params = {"id": id, "owner": owner, "now": now, "keep_ms": worker.default_keep_ms(succeeded=False)}
        running = self._execute(self.RUNNING_TAG_SQL, params).fetchone()
        if running is None:
            return None
        if running[0] is not None:
            self._execute(self.LOCK_TAG_SQL, {"tag": running[0]})
            cancelled = self._execute(self.GIVE_BACK_TAKEN_TAG_SQL, params).fetchall()
            if cancelled:
                self.count_finished(cancelled)
                return worker.Status.CANCELLED.value
        if self._execute(self.GIVE_BACK_SQL, params).rowcount != 1:
            return None
        self._execute(f"NOTIFY {CHANNEL}")
        return worker.Status.PENDING.value

    # `started` becomes the moment the function was called (a job claimed ahead
    # waited after its claim); `finished` is the step's time, never before that.
    FINISH_SQL = f"""
    UPDATE worker_jobs
       SET status = %(status)s, result = %(result)s, error = %(error)s, lease_until = NULL,
           started = coalesce(%(started)s, started), finished = greatest(%(now)s, coalesce(%(started)s, 0)),
           remove_at = {REMOVE_AT}
     WHERE id = %(id)s AND status = 'running' AND owner = %(owner)s
    """

    def finish_if_owned(
        self, id: int, owner: str, status: str, now: int, result: str | None, error: str | None,
        started: int | None, keep_ms: int,
    ) -> bool:  # fmt: skip
        """End the row (``succeeded`` or ``failed``) if it is running under ``owner``; whether it was."""
        params = {"id": id, "owner": owner, "status": status, "now": now, "result": result, "error": storable(error),
                  "started": started, "keep_ms": keep_ms}  # fmt: skip
        return self._execute(self.FINISH_SQL, params).rowcount == 1

    # finish_if_owned for a batch, in one statement (one round trip, not one per
    # row).  The outcomes come as one JSON object, {"id": [status, result,
    # error, started, keep_ms]}: each row found by the primary key among the
    # object's keys, and its values looked up by its id.  There is no join for
    # the planner to turn around: with a join against the array's rows, a table
    # without statistics (autovacuum off) let it scan the whole table and, for
    # each running row, parse the array again (400-1,000 us a row at 250 rows a
    # batch, against 20 us).  JSON, not array parameters: psycopg writes an
    # array's text in Python, a fifth of the worker's own time on a no-op drain
    # (bench/README.md).  The object is a parameter of type jsonb (psycopg.Jsonb),
    # parsed once as the statement is bound, and each lookup reads it where it
    # lies; taken from a CTE instead, the whole object was copied out of the
    # CTE's store for every row.  `status || ''`: the same fence, in a form that
    # does not match worker_jobs_lease's predicate, so the planner cannot walk
    # that index instead (without a vacuum it still holds every row ever leased).
    FINISH_MANY_SQL = f"""
    UPDATE worker_jobs AS job
       SET status = %(outcomes)s -> job.id::text ->> 0, result = %(outcomes)s -> job.id::text ->> 1,
           error = %(outcomes)s -> job.id::text ->> 2, lease_until = NULL,
           started = coalesce((%(outcomes)s -> job.id::text ->> 3)::bigint, job.started),
           finished = greatest(%(now)s, coalesce((%(outcomes)s -> job.id::text ->> 3)::bigint, 0)),
           remove_at = CASE WHEN job.persistent <> 0 THEN NULL
                            ELSE %(now)s + least(coalesce(job.keep_ms, (%(outcomes)s -> job.id::text ->> 4)::bigint),
                                                 {MAX_DURATION_MS}) END
     WHERE job.id = ANY (ARRAY(SELECT jsonb_object_keys(%(outcomes)s)::bigint))
       AND job.status || '' = 'running' AND job.owner = %(owner)s
    RETURNING job.id
    """

    def finish_many_if_owned(
        self, owner: str, now: int, outcomes: Iterable[tuple[int, str, str | None, str | None, int | None, int]]
    ) -> set[int]:
        """``finish_if_owned`` for each (id, status, result, error, started, keep_ms); the ids that were owned.

        Not (yet) a verb of worker.Store: one statement for a batch is what
        makes PostgreSQL fast here, where each statement is a round trip.
        """
        given = {str(id): (status, result, storable(error), started, keep_ms)
                 for id, status, result, error, started, keep_ms in outcomes}  # fmt: skip
        if not given:
            return set()
        params = {"owner": owner, "now": now, "outcomes": Jsonb(given, dumps=worker.JSON.encode)}
        return {id for (id,) in self._execute(self.FINISH_MANY_SQL, params).fetchall()}

    # DO NOTHING on the pending tag: a newer pending job with the same tag
    # supersedes the retry.  A retry keeps the cron slot of the run it repeats.
    RETRY_SQL = f"""
    INSERT INTO worker_jobs
           (type, data, queue, priority, due, tag, attempt, cron_schedule, cron_timezone, cron_slot,
            rescheduled_from_job, created_at, deaths, snoozes, max_attempts, retry_delay_ms, backoff, timeout_ms,
            keep_ms, persistent)
    SELECT type, data, queue, priority, %(due)s, tag, attempt + {{next_attempt}}, cron_schedule, cron_timezone,
           cron_slot, id, %(now)s, {{deaths}}, snoozes + {{snoozed}}, {COPIED_POLICY}, persistent
      FROM worker_jobs WHERE id = %(id)s {{fence}}
    {UNLESS_TAG_IS_PENDING}
    RETURNING id
    """
    # A snooze's next row: the same attempt, one more snooze; only while the row is still this worker's.
    SNOOZE_SQL = RETRY_SQL.format(
        next_attempt=0, deaths="deaths", snoozed=1, fence="AND status = 'running' AND owner = %(owner)s"
    )
    RETRY_SQL = RETRY_SQL.format(next_attempt=1, deaths="%(deaths)s", snoozed=0, fence="")

    def schedule_next_attempt(self, id: int, *, due: int, deaths: int, now: int) -> int | None:
        """Insert the next attempt of row ``id``, unless a pending row holds its tag; the new id, or None."""
        inserted = self._execute(self.RETRY_SQL, {"id": id, "due": due, "now": now, "deaths": deaths}).fetchone()
        return None if inserted is None else int(inserted[0])

    # The next run of a recurring job: a fresh chain (attempt 1, no deaths) for the
    # next slot; a pending row of the tag made by another writer stands.
    NEXT_CRON_RUN_SQL = f"""
    INSERT INTO worker_jobs
           (type, data, queue, priority, due, tag, cron_schedule, cron_timezone, cron_slot,
            rescheduled_from_job, created_at, max_attempts, retry_delay_ms, backoff, timeout_ms, keep_ms, persistent)
    SELECT type, data, queue, priority, %(due)s, tag, cron_schedule, cron_timezone, %(due)s,
           id, %(now)s, {COPIED_POLICY}, persistent
      FROM worker_jobs WHERE id = %(id)s
    {UNLESS_TAG_IS_PENDING}
    RETURNING id
    """

    def schedule_snooze_if_owned(self, id: int, owner: str, *, due: int, now: int) -> int | None:
        """The row a snooze of ``id`` asks for, if ``owner`` still runs it and no pending row holds its tag."""
        inserted = self._execute(self.SNOOZE_SQL, {"id": id, "owner": owner, "due": due, "now": now}).fetchone()
        return None if inserted is None else int(inserted[0])

    def snoozes(self, id: int) -> int:
        """How often the chain of row ``id`` has snoozed so far."""
        return int(self._scalar("SELECT coalesce(max(snoozes), 0) FROM worker_jobs WHERE id = %(id)s", {"id": id}))

    def schedule_next_cron_run(self, id: int, *, due: int, now: int) -> int | None:
        """Insert the run of ``id``'s schedule at slot ``due`` unless a pending row holds its tag; its id, or None."""
        inserted = self._execute(self.NEXT_CRON_RUN_SQL, {"id": id, "due": due, "now": now}).fetchone()
        return None if inserted is None else int(inserted[0])

    # One statement for all the minutes, queues and statuses of a batch (each key
    # once: finished_per_minute sums them), in key order: two workers that lock
    # the same counters in different orders could deadlock.
    COUNT_FINISHED_SQL = """
    INSERT INTO worker_finished_per_minute AS counted (minute, queue, status, count)
    SELECT * FROM unnest(%(minutes)s::bigint[], %(queues)s::text[], %(statuses)s::text[], %(counts)s::bigint[])
     ORDER BY 1, 2, 3
        ON CONFLICT (minute, queue, status) DO UPDATE SET count = counted.count + excluded.count
    """

    def count_finished(self, finished: Iterable[tuple[int, str, str]]) -> None:
        """Add rows just finished, as (finished ms, queue, status), to the per-minute counts."""
        self.add_finished_counts(worker.finished_per_minute(finished))

    def add_finished_counts(self, counted: list[tuple[int, str, str, int]]) -> None:
        """Add (minute, queue, status, count) to the per-minute counts of finished rows."""
        if counted:
            self._execute(self.COUNT_FINISHED_SQL, _finished_counts(counted))

    # The SELECT in a CTE, so the planner can never lock or update more rows than
    # the LIMIT (Oban's engines/basic.ex); SKIP LOCKED: rows another claim holds
    # are passed over, not waited for, and never taken twice.  A row that another
    # transaction claimed and committed since this statement began is re-checked
    # once locked, and is no longer pending.  The order is worker_jobs_claim's
    # own (priority DESC, due), read one priority level at a time
    # (PRIORITY_LEVELS, as NEXT_DUE_SQL does): within a level `due <= now` bounds the index range,
    # so rows due later are never read.  Read whole, the index range was bounded
    # by the LIMIT only, and a claim that found fewer due rows than its limit
    # walked every pending row due later (40 ms at 1,000,000 due tomorrow, for
    # each claim of an idle or nearly idle worker).  The levels come in order and
    # the nested loop keeps it, so the LIMIT takes the highest priorities first.
    # SQLite's third key, id, made PostgreSQL sort the whole backlog (100 ms at
    # 100,000 due rows, against 2.5 ms).  Equal (priority, due) rows come in the
    # index's order, which is mostly the order they were inserted.
    CLAIM_SQL = f"""
    {PRIORITY_LEVELS},
    picked AS (
        SELECT due_now.id FROM level, LATERAL (
            SELECT id FROM worker_jobs
             WHERE status = 'pending' AND priority = level.priority AND due <= %(now)s AND {{deaths}}
               AND type = ANY(%(types)s) {{queue_filter}}
             ORDER BY due
             LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED
        ) AS due_now
         WHERE level.priority IS NOT NULL
         LIMIT %(limit)s
    )
    UPDATE worker_jobs AS job
       SET status = 'running', started = %(now)s, worker = %(worker)s, owner = %(owner)s,
           lease_until = %(lease_until)s
      FROM picked
     WHERE job.id = picked.id
    RETURNING {{columns}}
    """

    # The claim's variants (worker.QueueControls.claim), as SQLiteStore's.  The
    # controls of limited queues are locked for the rest of the claim's
    # transaction (in queue order: two claims never wait for each other in a
    # circle), so that a claim counts the running rows of any claim before it.
    CLAIM_CONTROL_FILTERS: ClassVar[dict[str, str]] = {
        "fast": " AND NOT EXISTS (SELECT 1 FROM worker_queues)",
        "queue": " AND queue = %(queue)s",
        "rest": " AND queue <> ALL(%(controlled)s)",
    }
    CONTROL_COLUMNS = "queue, paused, max_running, per_second, next_start, changed"
    CONTROLS_OF_SQL = f"SELECT {CONTROL_COLUMNS} FROM worker_queues {{where}} ORDER BY queue FOR UPDATE"
    ALL_CONTROLS_SQL = f"SELECT {CONTROL_COLUMNS} FROM worker_queues ORDER BY queue"
    RUNNING_IN_SQL = """
    SELECT queue, count(*) FROM worker_jobs WHERE status = 'running' AND queue = ANY(%(queues)s) GROUP BY queue
    """
    SET_NEXT_START_SQL = "UPDATE worker_queues SET next_start = %(next_start)s WHERE queue = %(queue)s"
    ENSURE_CONTROL_SQL = (
        "INSERT INTO worker_queues (queue, changed) VALUES (%(queue)s, %(now)s) ON CONFLICT (queue) DO NOTHING"
    )
    LOCK_CONTROL_SQL = f"SELECT {CONTROL_COLUMNS} FROM worker_queues WHERE queue = %(queue)s FOR UPDATE"
    UPDATE_CONTROL_SQL = """
    UPDATE worker_queues
       SET paused = %(paused)s, max_running = %(max_running)s, per_second = %(per_second)s,
           next_start = %(next_start)s, changed = %(changed)s
     WHERE queue = %(queue)s
    """
    DELETE_CONTROL_SQL = "DELETE FROM worker_queues WHERE queue = %(queue)s"
    NOTIFY_SQL = f"NOTIFY {CHANNEL}"  # a resumed queue's rows are claimed at once, not at the next poll

    # The partial index of suspect rows answers this at once (nearly always empty).
    ANY_SUSPECT_SQL = "SELECT EXISTS (SELECT 1 FROM worker_jobs WHERE status = 'pending' AND deaths > 0)"

    # The earliest due time of a pending row, with the skip-scan of SQLiteStore's
    # NEXT_DUE_SQL down worker_jobs_claim (priority DESC, due): one seek per
    # priority level in use, so a million rows due later cost no more than one.
    # ORDER BY due LIMIT 1, not min(due): on a table without statistics the
    # planner aggregated every row of the level instead (590 ms at 1,000,000).
    NEXT_DUE_SQL = f"""
    {PRIORITY_LEVELS}
    SELECT min((SELECT due FROM worker_jobs
                 WHERE status = 'pending' AND priority = level.priority AND type = ANY(%(types)s) {{queue_filter}}
                 ORDER BY due LIMIT 1))
      FROM level WHERE level.priority IS NOT NULL
    """

    # A worker never rescues its own jobs: it is alive, so they are not lost.  The
    # table refuses a running row without a lease, so none is left unleased.
    EXPIRED_LEASES_SQL = f"""
    SELECT {SELECT_COLUMNS} FROM worker_jobs
     WHERE status = 'running' AND lease_until < %(now)s AND owner IS DISTINCT FROM %(owner)s::text
    """
    # SKIP LOCKED: a row another transaction holds is not taken now, nor waited
    # for (the holder may be a worker cut off mid-transaction: the sweep would
    # hang until the server ends that transaction); the next sweep sees it again.
    RESCUE_SQL = f"""
    UPDATE worker_jobs
       SET status = 'failed', finished = %(now)s, error = %(error)s, lease_until = NULL, remove_at = {REMOVE_AT}
     WHERE id = (SELECT id FROM worker_jobs WHERE id = %(id)s FOR UPDATE SKIP LOCKED)
       AND status = 'running' AND lease_until < %(now)s
    """

    def any_suspect(self) -> bool:
        """Whether a pending row's chain has already killed a worker (deaths > 0)."""
        return bool(self._scalar(self.ANY_SUSPECT_SQL))

    def _claim_params(
        self, owner: str, worker: str, now: int, lease_until: int, limit: int, types: str
    ) -> dict[str, Any]:
        return {"now": now, "worker": worker, "owner": owner, "lease_until": lease_until, "limit": limit,
                "queues": self._queues, "types": _names(types)}  # fmt: skip

    def _claim_rows(
        self, kind: str, suspect: bool, params: dict[str, Any], held: Container[int]
    ) -> tuple[list[Job], list[tuple[Job, str]]]:
        """Take up to ``limit`` due pending rows for ``owner``; no row twice, ever (see CLAIM_SQL).

        ``held`` is not needed here: the rows to read are exactly those the
        UPDATE returned, already fetched, so none is read again.
        """
        rows = self._execute(self._claim_sqls[kind, suspect], params).fetchall()
        # Highest priority first, then oldest due, as they were picked (RETURNING keeps no order).
        rows.sort(key=_claim_order)
        try:
            return [Job.from_row(row) for row in rows], []  # the fast path decodes every row at once
        except (RecursionError, ValueError, TypeError):
            return _read_each(rows)

    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor[Any]:
        return self._execute(sql, params)

    def _names(self, names: list[str]) -> list[str]:
        return names

    def _types_param(self, types: str) -> list[str]:
        return _names(types)

    def expired_leases(self, owner: str, now: int) -> tuple[list[Job], list[tuple[Job, str]]]:
        """Running rows whose lease ended before ``now``, not ``owner``'s; unreadable ones apart."""
        return _read_each(self._execute(self.EXPIRED_LEASES_SQL, {"now": now, "owner": owner}).fetchall())

    def rescue_if_expired(self, id: int, now: int, error: str, keep_ms: int) -> bool:
        """Fail the row (its worker was lost) if it is still running with its lease ended; whether it was."""
        params = {"id": id, "now": now, "error": error, "keep_ms": keep_ms}
        return self._execute(self.RESCUE_SQL, params).rowcount == 1

    # -- what `worker copy` writes: another store's rows, with their own ids --

    # Held to the end of the copy's transaction: no writer can add a row between
    # the look at the table and the copy's commit (readers go on meanwhile).
    LOCK_FOR_COPY_SQL = "LOCK TABLE worker_jobs IN SHARE ROW EXCLUSIVE MODE"
    COPY_SQL = f"COPY worker_jobs ({COPIED_COLUMNS}) FROM STDIN"

    def lock_for_copy(self) -> int:
        """Keep every other writer out of worker_jobs until this transaction ends; how many rows it holds now."""
        self._execute(self.LOCK_FOR_COPY_SQL)
        return int(self._scalar("SELECT count(*) FROM worker_jobs"))

    def copy_rows(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """Write rows given as COPIED_COLUMNS, ids and all, as they are (one COPY); how many.

        The table checks each row as it would an INSERT's (and the insert
        trigger wakes the workers at commit).  DatabaseError naming the row it refused.
        """
        ids: list[int] = []
        try:
            with self.conn.cursor() as cursor, cursor.copy(self.COPY_SQL) as copy:
                for row in rows:
                    ids.append(row[0])
                    copy.write_row(row)
        except psycopg.Error as e:
            line = re.search(r"COPY worker_jobs, line (\d+)", e.diag.context or "")
            if line is None or not 0 < int(line.group(1)) <= len(ids):
                raise _engine_error(self.url, self.conn, e) from e
            refused = ids[int(line.group(1)) - 1]
            raise worker.DatabaseError(f"job {refused} cannot be copied: {_first_line(e)}") from e
        return len(ids)

    # setval is not undone by a rollback: so the copy's last step, and never down
    # (an id once given is never given again).
    MOVE_IDS_PAST_SQL = """
    SELECT setval(seq, greatest(%(highest)s, coalesce(pg_sequence_last_value(seq), 0),
                                (SELECT coalesce(max(id), 0) FROM worker_jobs)))
      FROM (SELECT pg_get_serial_sequence('worker_jobs', 'id')::regclass AS seq) AS identity
    """

    def move_ids_past(self, highest: int) -> int:
        """Make the next id given above ``highest`` (and above every id in the table); the last id taken."""
        return int(self._scalar(self.MOVE_IDS_PAST_SQL, {"highest": max(highest, 1)}))


_PRIORITY, _DUE = worker.COLUMNS.index("priority"), worker.COLUMNS.index("due")


def _finished_counts(counted: list[tuple[int, str, str, int]]) -> dict[str, list[Any]]:
    """COUNT_FINISHED_SQL's parameters: a column array each."""
    minutes, queues, statuses, counts = (list(column) for column in zip(*counted, strict=True))
    return {"minutes": minutes, "queues": queues, "statuses": statuses, "counts": counts}


def _claim_order(row: tuple[Any, ...]) -> tuple[int, int, int]:
    return -row[_PRIORITY], row[_DUE], row[0]


def _read_each(rows: Iterable[tuple[Any, ...]]) -> tuple[list[Job], list[tuple[Job, str]]]:
    """Each row as a Job, or apart with why it cannot be one (data Python's json cannot decode)."""
    jobs, unreadable = [], []
    for raw in rows:
        try:
            jobs.append(worker.read_row(raw))
        except worker.UnreadableRow as e:
            unreadable.append((worker.unreadable_job(raw), str(e)))
    return jobs, unreadable


def schema_script() -> str:
    """``worker schema --postgres``: the whole DDL, for another tool (or psql) to run."""
    return "".join(sql for _, sql in schema_sections()) + (
        f"INSERT INTO worker_schema (id, version) VALUES (1, {schema_version()})"
        " ON CONFLICT (id) DO UPDATE SET version = excluded.version;\n"
    )


def migrate(url: str, *, dry_run: bool) -> int:
    """``worker migrate`` on PostgreSQL: print the sections the database lacks, and apply them; the exit code."""
    conn = connect(url)
    try:
        current = installed_schema_version(conn)
        if current == schema_version():
            print(f"-- {redacted(url)}: the worker's schema is current (version {current})")
            return worker.EXIT_OK
        print(f"-- {redacted(url)}: the worker's schema from version {current} to {schema_version()}")
        print("".join(sql for version, sql in schema_sections() if version > current), end="")
        if not dry_run:
            apply_schema(conn)
    except psycopg.Error as e:
        raise _engine_error(url, conn, e) from e
    finally:
        conn.close()
    return worker.EXIT_OK


# --- In the app's own transaction (Queue(conn)) ------------------------------------


class StoreInCallersTransaction(PostgresStore):
    """The store on an app's psycopg connection: each transaction a savepoint in the app's own, so that a job
    commits or rolls back with the app's writes.

    The app's connection keeps its own settings, adapters and row factory: this
    store binds ints as BIGINT, and reads rows as tuples, on cursors of its
    own, and never connects again.
    """

    def _cursor(self) -> psycopg.Cursor[Any]:
        cursor = self.conn.cursor(row_factory=tuple_row)
        cursor.adapters.register_dumper(int, Int8Dumper)
        return cursor

    def _execute(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None) -> psycopg.Cursor[Any]:
        try:
            return self._cursor().execute(sql, params)
        except psycopg.Error as e:
            raise _engine_error(self.url, self.conn, e) from e

    def _executemany(self, sql: str, params: Iterable[Any]) -> None:
        try:
            self._cursor().executemany(sql, params)
        except psycopg.Error as e:
            raise _engine_error(self.url, self.conn, e) from e

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A savepoint in the app's transaction (or, on an autocommit connection, a transaction of its own)."""
        try:
            if not self.conn.autocommit and self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                # Open the transaction the app's own first statement would, for
                # its commit() or rollback() to end; a transaction() block on an
                # idle connection would commit at its end instead.
                self._execute("SELECT 1")
            with self.conn.transaction():
                yield self.conn
        except psycopg.Error as e:
            raise _engine_error(self.url, self.conn, e) from e


def store_in_callers_transaction(conn: psycopg.Connection[Any]) -> StoreInCallersTransaction:
    """worker.Queue(conn) on a psycopg 3 connection: the schema made if needed, in the app's transaction."""
    if not isinstance(conn, psycopg.Connection):  # its statements would be coroutines, never run
        raise TypeError(f"Queue takes a psycopg Connection, not {type(conn).__name__}: enqueue through a sync one")
    url = "postgresql://" + (conn.info.host or "") + "/" + (conn.info.dbname or "")  # for messages only
    store = StoreInCallersTransaction(conn, url, clock=worker.now_ms)
    with store.transaction():  # a savepoint: an error here leaves the app's transaction as it was
        if installed_schema_version(conn) != schema_version():
            apply_schema(conn)
    return store


class AsyncStoreInCallersTransaction:
    """What ``worker.AsyncQueue(conn)`` writes through on an app's psycopg AsyncConnection: PostgresStore's
    insert statements, awaited, in a savepoint of the app's own transaction (a job commits or rolls back with
    the app's writes).  Its tables must exist already (a worker, ``worker schema`` or a sync Queue makes them).
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.url = "postgresql://" + (conn.info.host or "") + "/" + (conn.info.dbname or "")  # for messages only
        self.schema_checked = False

    def _cursor(self) -> psycopg.AsyncCursor[Any]:
        cursor = self.conn.cursor(row_factory=tuple_row)
        cursor.adapters.register_dumper(int, Int8Dumper)
        return cursor

    async def now(self) -> int:
        """Rows are due by the server's clock, as a sync Queue's."""
        cursor = await self._cursor().execute(PostgresStore.SERVER_TIME_SQL)
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def insert(self, row: dict[str, Any], on_conflict: str) -> Job:
        """PostgresStore.insert on the app's connection, in a savepoint (its own transaction on an autocommit one)."""
        try:
            if not self.conn.autocommit and self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                await self._cursor().execute("SELECT 1")  # open the app's transaction, for its commit() to end
            if not self.schema_checked:
                await self._check_schema()
            async with self.conn.transaction():
                steps = PostgresStore.insert_steps(row, on_conflict)
                try:
                    statement = next(steps)
                    while True:
                        cursor = await self._cursor().execute(*statement)
                        statement = steps.send(await cursor.fetchall() if cursor.description else [])
                except StopIteration as done:
                    inserted: Job = done.value
                    return inserted
        except psycopg.Error as e:
            raise _engine_error(self.url, None, e) from e

    async def _check_schema(self) -> None:
        cursor = await self._cursor().execute(
            "SELECT (SELECT version FROM worker_schema WHERE id = 1) FROM (SELECT to_regclass('worker_schema') AS t) s"
            " WHERE t IS NOT NULL"
        )
        found = await cursor.fetchone()
        version = None if found is None else found[0]
        if version != schema_version():
            raise worker.DatabaseUnusable(
                f"database {self.url}: schema version {version or 'none'}, this code's is {schema_version()}:"
                " start a worker (or run `worker schema`) once before enqueueing on an AsyncConnection"
            )
        self.schema_checked = True


def async_store_in_callers_transaction(conn: psycopg.AsyncConnection[Any]) -> AsyncStoreInCallersTransaction:
    """worker.AsyncQueue(conn) on a psycopg 3 AsyncConnection."""
    if not isinstance(conn, psycopg.AsyncConnection):
        raise TypeError(f"AsyncQueue takes a psycopg AsyncConnection, not {type(conn).__name__}")
    return AsyncStoreInCallersTransaction(conn)


def open_reader(url: str) -> PostgresStore:
    """A store for the operating tools (status, jobs, show, the dashboard): it only reads."""
    conn = connect(url)
    if installed_schema_version(conn) != schema_version():
        conn.close()
        raise worker.DatabaseUnusable(
            f"database {redacted(url)} has no worker schema of version {schema_version()}: run the worker"
        )
    return PostgresStore(conn, url)


# --- Wake-up --------------------------------------------------------------------


class PostgresWakeUp:
    """worker.WakeUp on PostgreSQL: LISTEN on a connection of its own, in a thread of its own.

    The table NOTIFYs once per INSERT statement, from any writer.  If the
    LISTEN connection is lost, the thread connects again with backoff, and
    meanwhile ``pushes`` is False and ``changed()`` always True: the worker
    polls.  ``listen=False`` is poll-only, for PgBouncer in transaction mode,
    where a LISTEN would hold a server connection that others then share.
    """

    def __init__(self, url: str, *, listen: bool = True) -> None:
        self.url, self.listen = url, listen
        self.pushes = False  # whether a LISTEN is in place now; the worker polls while it is not
        self._armed = threading.Event()
        self._notified = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def start(self, wake: Callable[[], None]) -> None:
        """LISTEN in a thread that calls ``wake`` on each notification while armed (not in poll-only mode)."""
        if not self.listen:
            return
        self._stopping.clear()
        listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, args=(wake, listening), name="worker-listen", daemon=True)
        self._thread.start()
        listening.wait(CONNECT_TIMEOUT)  # so that a worker starting now is pushed to from its first idle moment

    def _listen(self, wake: Callable[[], None], listening: threading.Event) -> None:
        backoff = LISTEN_BACKOFF
        while not self._stopping.is_set():
            try:
                self._conn = connect(self.url)
                self._conn.execute(f"LISTEN {CHANNEL}")
                self.pushes, backoff = True, LISTEN_BACKOFF
                self._notified.set()  # rows inserted while no one listened: look once
                listening.set()
                while not self._stopping.is_set():
                    for _ in self._conn.notifies(timeout=0.25):  # returns every 0.25 s to see stop()
                        self._notified.set()
                        if self._armed.is_set():
                            self._armed.clear()  # once: the worker, woken, arms it again while it stays idle
                            wake()
            except (psycopg.Error, worker.DatabaseError) as e:
                if self.pushes or backoff == LISTEN_BACKOFF:
                    logger.warning("LISTEN %s lost (%s); polling until it is back", CHANNEL, _first_line(e))
                self.pushes = False
                listening.set()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_LISTEN_BACKOFF)
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
        self.pushes = False

    def arm(self, armed: bool) -> None:
        """Call ``wake`` only while armed."""
        (self._armed.set if armed else self._armed.clear)()

    def changed(self) -> bool:
        """Whether a notification came since the last call; always True while nothing listens (poll)."""
        if not self.pushes:
            return True
        if not self._notified.is_set():
            return False
        self._notified.clear()
        return True

    def forget_connection(self) -> None:
        """Nothing to do: the LISTEN connection is this object's own, not the worker's."""

    def stop(self) -> None:
        """End the watch and close its connection."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.pushes = False


if TYPE_CHECKING:  # mypy holds both classes to the engine's protocols

    def _is_a_store(store: PostgresStore) -> worker.Store:
        return store

    def _is_a_wake_up(wake_up: PostgresWakeUp) -> worker.WakeUp:
        return wake_up
