"""The ``worker`` command line: run, enqueue, status, jobs, show, retry, cancel, prune, check, copy.

Also the supervisor of ``worker run --processes P`` and the text formatting of
what the operating queries in worker.py (``status``, ``list_jobs``,
``job_chain``) read.  The engine is worker.py; this module only drives it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import quote, urlencode

from worker import (
    COLUMNS,
    EXIT_CODES_HELP,
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    REGISTRY,
    STATUSES,
    STOP_SIGNALS,
    ConfigError,
    DatabaseError,
    DatabaseUnusable,
    Job,
    Queue,
    SQLiteStore,
    StoredText,
    UnreadableRow,
    __version__,
    add_common_options,
    add_engine_commands,
    ago,
    check_cron,
    configure_logging,
    controls_text,
    database_target,
    exit_code_of,
    is_postgres,
    iso_time,
    job_as_dict,
    job_chain,
    list_jobs,
    load_jobs,
    logger,
    next_cron_slot,
    now_ms,
    open_reader,
    open_store,
    option_help,
    positive,
    printable,
    progress_text,
    resolve_db_path,
    run_engine_command,
    setting,
    status,
)

# --- Formatting for people ------------------------------------------------------


def _colour(text: str, state: str, enabled: bool) -> str:
    codes = {"succeeded": "32", "failed": "31", "running": "36", "cancelled": "90", "pending": "33",
             "stale": "31", "fresh": "32"}  # fmt: skip
    return f"\033[{codes[state]}m{text}\033[0m" if enabled and state in codes else text


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    # Cells were made printable by the caller where they come from the table;
    # colour codes are added after that, so they survive.
    cells = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [max([len(h)] + [len(_strip_ansi(row[i])) for row in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v + " " * (w - len(_strip_ansi(v))) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _strip_ansi(text: str) -> str:
    return re.sub(r"\033\[[0-9;]*m", "", text)


def _when(epoch_ms: int | None) -> str:
    return "-" if epoch_ms is None else iso_time(epoch_ms).replace("+00:00", "Z")


def format_status(report: dict[str, Any], colour: bool = False) -> str:
    """``worker status`` for people."""
    queues = [
        [printable(q["queue"]), q["pending_due"], q["pending_later"], q["running"], q["succeeded_last_hour"],
         q["failed_last_hour"], q["cancelled_last_hour"], ago(q["oldest_waiting_seconds"]), controls_text(q) or "-"]
        for q in report["queues"]
    ]  # fmt: skip
    workers = []
    for w in report["workers"]:
        state = "fresh" if w["fresh"] else "stale"
        heartbeat = f"{ago(w['heartbeat_age_seconds'])} ago"
        workers.append([printable(w["host"]), w["pid"], _when(w["started"]), heartbeat, _colour(state, state, colour),
                        w["running"], w["concurrency"], printable(w["queues"] or "all")])  # fmt: skip
    cron = [
        [printable(c["type"]), printable(c["schedule"]), printable(c["timezone"]), _when(c["next_due"]),
         _when(c["last_finished"]), _colour(c["last_status"] or "-", c["last_status"] or "", colour)]
        for c in report["cron"]
    ]  # fmt: skip
    lines = [
        f"database  {printable(report['database'])}  (schema {report['schema_version']}, {report['engine']})",
        "",
        _table(["queue", "due", "later", "running", "succeeded/1h", "failed/1h", "cancelled/1h", "oldest waiting",
                "controls"], queues or [["(no jobs)"] + [""] * 8]),
        "",
        _table(["worker", "pid", "started", "heartbeat", "state", "running", "concurrency", "queues"],
               workers or [["(no workers)"] + [""] * 7]),
    ]  # fmt: skip
    if cron:
        lines += ["", _table(["cron job", "schedule", "timezone", "next run", "last run", "last status"], cron)]
    if report["unrunnable"]:  # e.g. mid-deploy, or a type no worker will ever know: see the README
        unrunnable = [[printable(u["type"]), u["pending"], _when(u["oldest_due"])] for u in report["unrunnable"]]
        lines += ["", _table(["no live worker runs", "pending", "oldest due"], unrunnable)]
    return "\n".join(lines)


def format_jobs(jobs: list[Job], colour: bool = False, progress: dict[int, str] | None = None) -> str:
    """``worker jobs`` for people (with a progress column when a row has reported any)."""
    rows = [[j.id, printable(j.type), _colour(j.status, j.status, colour), printable(j.queue), j.attempt, _when(j.due),
             _when(j.finished), printable((j.error or "").split("\n", 1)[0][:60])] for j in jobs]  # fmt: skip
    headers = ["id", "type", "status", "queue", "attempt", "due", "finished", "error"]
    if progress:
        headers.insert(3, "progress")
        for row, j in zip(rows, jobs, strict=True):
            row.insert(3, printable(progress_text(progress.get(j.id))[:40]))
    return _table(headers, rows)


def format_job(job: Job, chain: list[Job], colour: bool = False, progress: str | None = None) -> str:
    """``worker show`` for people: the row, its data, result and error, and its chain."""
    cron = job.cron_schedule and f"{job.cron_schedule} ({job.cron_timezone or 'UTC'})"
    fields = [("id", job.id), ("type", printable(job.type)), ("status", _colour(job.status, job.status, colour)),
              ("queue", printable(job.queue)), ("priority", job.priority), ("attempt", job.attempt),
              ("due", _when(job.due)), ("started", _when(job.started)), ("finished", _when(job.finished)),
              ("worker", job.worker and printable(job.worker)), ("tag", job.tag and printable(job.tag)),
              ("cron", cron and printable(cron)), ("from job", job.rescheduled_from_job),
              ("remove at", _when(job.remove_at)),
              ("progress", progress and printable(progress_text(progress)))]  # fmt: skip
    lines = [f"{name:<10} {value}" for name, value in fields if value is not None]
    lines += ["", "data:", _json_block(job.data)]
    if job.result is not None or job.status == "succeeded":
        lines += ["", "result:", _json_block(job.result)]
    if job.error:  # a traceback keeps its lines, indented so that none can pass for a heading; the rest is escaped
        lines += ["", "error:", *(f"  {printable(line)}" for line in job.error.rstrip().split("\n"))]
    if len(chain) > 1:
        lines += ["", "chain:", format_jobs(chain, colour)]
    return "\n".join(lines)


def _json_block(value: Any) -> str:
    """Data or a result, indented (JSON escapes every control character); undecodable text escaped, cut short."""
    if isinstance(value, StoredText):
        return "\n".join(printable(line) for line in value.excerpt().split("\n", 1))
    return json.dumps(value, indent=2, sort_keys=True)


# --- Process supervision --------------------------------------------------------

PR_SET_PDEATHSIG = 1  # prctl(2), Linux


def _unusable_now(child_args: list[str]) -> bool:
    """Whether the database a worker process exited 3 on is one it cannot use, as the supervisor finds it now.

    A worker restarted while its server was out of reach (restarting, say)
    exits 3 too, as any worker that cannot reach its database at start does:
    that one is restarted like any other, with the same backoff, rather than
    stopping every worker (the supervisor checked the database as it started).
    """
    try:
        open_store(child_args[child_args.index("--db") + 1]).close()
    except DatabaseUnusable:
        return True
    except DatabaseError:
        pass  # out of reach now: it may not be by the next start
    return False


def supervise(child_args: list[str], processes: int, shutdown_timeout: float, *, burst: bool = False) -> int:
    """Run ``processes`` worker processes and restart any that dies; returns the exit code.

    With ``burst``, a child that exits 0 has finished, and the supervisor
    returns once all have.

    Each child is a fresh interpreter (fork + exec), so no connection or lock
    can cross into it.  Children get a session of their own: a Ctrl-C (or the
    SIGHUP of a closed terminal) reaches only the supervisor, which passes one
    SIGTERM on; and they get SIGTERM when the supervisor dies, however it dies.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "run", *child_args]
    stopping = threading.Event()
    signals_seen = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        stopping.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    supervisor = os.getpid()

    def die_with_the_supervisor() -> None:
        # In the child, before exec (the supervisor has no other thread): on
        # Linux, the kernel sends it SIGTERM when the supervisor dies, even by
        # kill -9, so no worker runs on unsupervised.  The child stops as on
        # any SIGTERM: jobs finished or given back, its row deregistered.
        with contextlib.suppress(Exception):  # not Linux: no prctl
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != supervisor:  # it died before prctl took effect
            os._exit(EXIT_FAILURE)

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_the_supervisor)

    children = [spawn() for _ in range(processes)]
    logger.info(
        "supervisor %d started %d worker processes: %s",
        os.getpid(),
        processes,
        " ".join(str(child.pid) for child in children),
    )
    restarts: list[float] = []
    exit_code = EXIT_OK
    finished: set[int] = set()
    while not stopping.is_set() and len(finished) < len(children):
        for index, child in enumerate(children):
            code = child.poll()
            if code is None or index in finished:
                continue
            if burst and code == EXIT_OK:
                finished.add(index)
                continue
            if code == EXIT_USAGE or (code == EXIT_DATABASE and _unusable_now(child_args)):
                logger.error("worker process %d exited with %d (configuration or database); stopping", child.pid, code)
                exit_code = code
                stopping.set()
                break
            # Restarting a process that dies at once in a tight loop would only burn CPU.
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 10] + [now]
            delay = min(0.1 * 2 ** max(0, len(restarts) - processes), 5.0)
            logger.warning("worker process %d exited with %d; restarting in %.1f s", child.pid, code, delay)
            stopping.wait(delay)
            children[index] = spawn()
        stopping.wait(0.1)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + shutdown_timeout + 5
    for child in children:
        while child.poll() is None:
            if signals_seen > 1 or time.monotonic() > deadline:
                child.kill()
                exit_code = exit_code or EXIT_FAILURE
            time.sleep(0.05)
    return exit_code


# --- Moving from SQLite to PostgreSQL (worker copy) ----------------------------------

COPY_BATCH = 5_000  # rows read from the file at a time: the copy's memory does not grow with the history
UNFINISHED = ["pending", "running"]
FINISHED = ["succeeded", "failed", "cancelled"]
_STATUS = COLUMNS.index("status")
_CRON = COLUMNS.index("cron_schedule")
# What a worker that stops gives back to pending (the claim's columns); the rest of the row stays.
_CLAIM = [COLUMNS.index(column) for column in ("started", "worker", "owner", "lease_until")]


class CopyTarget(Protocol):
    """What ``worker copy`` writes through: worker_postgres.PostgresStore's verbs for it."""

    def transaction(self) -> contextlib.AbstractContextManager[Any]: ...
    def lock_for_copy(self) -> int: ...
    def copy_rows(self, rows: Iterable[tuple[Any, ...]]) -> int: ...
    def add_finished_counts(self, counted: list[tuple[int, str, str, int]]) -> None: ...
    def move_ids_past(self, highest: int) -> int: ...
    def control_queue(self, queue: str, now: int, changes: dict[str, Any]) -> Any: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def copy_jobs(
    source: str, target: str, *, history: bool = False, running_as_pending: bool = False, append: bool = False
) -> dict[str, Any]:
    """Copy a SQLite file's jobs into a PostgreSQL database, so that workers there carry on where these stopped.

    Pending rows (cron schedules among them) keep their ids, data text, tags,
    attempts and chains (rescheduled_from_job); ``history`` copies the
    finished rows too, and their per-minute counts.  Paused queues and
    limits (worker_queues) come too.  The database's id
    sequence moves past the highest id the file ever gave, so no id is given
    twice.  All in one transaction: refused (ConfigError), or failed, nothing
    is written.  Refused while a worker is alive on the file, or a row is
    running (unless ``running_as_pending``: then it is copied as a stopping
    worker gives it back), or when the database holds rows (unless ``append``).
    The file is only read: it keeps its rows.  Returns what was copied.
    """
    if is_postgres(source):
        raise ConfigError("--from is the SQLite file to copy from, not a postgresql:// URL")
    if not is_postgres(target):
        raise ConfigError(f"--to must be a postgresql:// URL (the database to copy into), not {printable(target)!r}")
    try:
        reader = cast(SQLiteStore, open_reader(source))
    except DatabaseUnusable as e:
        if "schema version" not in str(e):
            raise
        # Not "run the worker": a worker started on it now would claim the jobs about to move.
        raise DatabaseUnusable(f"{e.args[0].split(': run the worker')[0]}: `worker migrate --db {source}` first") from e
    try:
        with reader.snapshot():
            _refuse_a_live_source(reader, source, running_as_pending)
            writer = cast(CopyTarget, open_store(target))
            try:
                return _copy(reader, writer, history=history, append=append)
            finally:
                writer.close()
    finally:
        reader.close()


def _refuse_a_live_source(reader: SQLiteStore, source: str, running_as_pending: bool) -> None:
    now = now_ms()
    alive = [f"{p['host']}:{p['pid']}" for p in reader.processes() if now - p["last_seen"] <= p["lease_ms"]]
    if alive:  # it would go on claiming the file's rows, which the database's workers then run again
        raise ConfigError(f"a worker is alive on {source} ({', '.join(alive)}): stop it before copying")
    running = sum(count for _, count in reader.running_by_queue())
    if running and not running_as_pending:
        raise ConfigError(
            f"{running} rows of {source} are running (their worker died, or stopped without giving them back): "
            "--running-as-pending copies them as pending, to run again"
        )


def _copy(reader: SQLiteStore, writer: CopyTarget, *, history: bool, append: bool) -> dict[str, Any]:
    copied = dict.fromkeys(STATUSES, 0)
    cron_schedules = 0

    def rows() -> Iterator[tuple[Any, ...]]:
        nonlocal cron_schedules
        after = 0
        while batch := reader.rows_to_copy(UNFINISHED + FINISHED if history else UNFINISHED, after=after,
                                           limit=COPY_BATCH):  # fmt: skip
            for row in batch:
                copied[row[_STATUS]] += 1
                if row[_STATUS] == "running":
                    row = _given_back(row)
                if row[_STATUS] == "pending" and row[_CRON] is not None:
                    cron_schedules += 1
                yield row
            after = batch[-1][0]

    with writer.transaction():
        held = writer.lock_for_copy()
        if held and not append:
            raise ConfigError(
                f"{writer.describe()['database']} already holds {held} jobs: nothing copied "
                "(--append copies into it all the same, and fails, writing nothing, on an id or a pending tag it holds)"
            )
        try:
            total = writer.copy_rows(rows())
        except UnreadableRow as e:
            raise DatabaseError(f"{e}: nothing copied") from e
        except DatabaseError as e:
            raise type(e)(f"{e}: nothing copied") from e
        if history:
            writer.add_finished_counts(reader.finished_counts())
        controls = reader.queue_controls()  # paused queues stay paused, limits stay set (a rate's next start does not)
        copied_at = now_ms()
        for control in controls:
            changes = {"paused": control.paused, "max_running": control.max_running, "per_second": control.per_second}
            writer.control_queue(control.queue, copied_at, changes)
        highest = reader.highest_id()
        last_id = writer.move_ids_past(highest) if highest else 0
    return {"rows": total, **copied, "cron_schedules": cron_schedules, "last_id": last_id,
            "queue_controls": len(controls), "database": writer.describe()["database"]}  # fmt: skip


def _given_back(row: tuple[Any, ...]) -> tuple[Any, ...]:
    values = list(row)
    values[_STATUS] = "pending"
    for index in _CLAIM:
        values[index] = None
    return tuple(values)


def _copy_command(args: argparse.Namespace) -> int:
    target = database_target(args.to) if args.to else resolve_db_path()
    copied = copy_jobs(args.source, target, history=args.history, running_as_pending=args.running_as_pending,
                       append=args.append)  # fmt: skip
    parts = [f"{copied['pending']} pending ({copied['cron_schedules']} of them cron schedules)"]
    if copied["running"]:
        parts.append(f"{copied['running']} running, as pending")
    if args.history:
        parts.append(", ".join(f"{copied[state]} {state}" for state in FINISHED))
    if copied["queue_controls"]:
        parts.append(f"the controls of {copied['queue_controls']} queue(s)")
    jobs = f"{copied['rows']} job{'' if copied['rows'] == 1 else 's'}"
    print(f"copied {jobs} from {printable(args.source)} to {printable(copied['database'])}: "
          f"{'; '.join(parts)}; new ids start after {copied['last_id']}")  # fmt: skip
    return EXIT_OK


# --- CLI ------------------------------------------------------------------------


DJANGO_HELP = (
    "a Django project's settings: django.setup() runs before the jobs are imported, and the database is "
    "Django's default (SQLite or PostgreSQL) unless --db or WORKER_DB is given [env DJANGO_SETTINGS_MODULE]"
)


def _limit(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A positive number, or ``off`` (None: the limit is cleared)."""

    def parse_limit(raw: str) -> Any:
        return None if raw == "off" else positive(parse)(raw)

    parse_limit.__name__ = parse.__name__  # argparse names the type in its error
    return parse_limit


def build_parser() -> argparse.ArgumentParser:
    """The ``worker`` command line."""
    parser = argparse.ArgumentParser(
        prog="worker", description="A SQLite-first background job worker.", epilog=EXIT_CODES_HELP
    )
    parser.add_argument("--version", action="version", version=f"worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_engine_commands(commands)

    prune = commands.add_parser("prune", help="delete finished rows past their retention; print how many")
    add_common_options(prune)
    prune.add_argument("--dry-run", action="store_true", help="only count them")

    state = commands.add_parser("status", help="queues, workers and cron jobs; exit 1 if no worker is alive")
    state.add_argument("--db", help=option_help("db"))
    state.add_argument("--json", action="store_true", help="machine-readable output")
    state.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")

    listing = commands.add_parser("jobs", help="a table of rows, newest first")
    listing.add_argument("--db", help=option_help("db"))
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--type")
    listing.add_argument("--queue")
    listing.add_argument("--limit", type=positive(int), default=50, help="default 50")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    show = commands.add_parser("show", help="one row with its data, result, error and chain")
    show.add_argument("id", type=int)
    show.add_argument("--db", help=option_help("db"))
    show.add_argument("--json", action="store_true", help="machine-readable output")

    retry = commands.add_parser("retry", help="run a failed job again as a new row of its chain")
    retry.add_argument("id", type=int, nargs="?")
    retry.add_argument("--failed", action="store_true", help="every failed job whose chain ended in failure")
    retry.add_argument("--type", help="with --failed: only this type")
    retry.add_argument("--db", help=option_help("db"))

    cancel = commands.add_parser(
        "cancel", help="cancel a pending job, or ask a running one's worker to stop it; or every pending job of a type"
    )
    cancel.add_argument("id", type=int, nargs="?")
    cancel.add_argument("--type", help="every pending job of this type instead (say, one no worker will ever know)")
    cancel.add_argument("--db", help=option_help("db"))

    pause = commands.add_parser("pause", help="stop every worker claiming from a queue (running jobs finish)")
    pause.add_argument("queue")
    pause.add_argument("--db", help=option_help("db"))
    resume = commands.add_parser("resume", help="let workers claim from a paused queue again")
    resume.add_argument("queue")
    resume.add_argument("--db", help=option_help("db"))
    limit = commands.add_parser(
        "limit", help="limit a queue across every worker: jobs running at once, starts per second"
    )
    limit.add_argument("queue")
    limit.add_argument(
        "--running",
        type=_limit(int),
        default=...,
        metavar="N|off",
        help="at most N of its jobs running at once, claimed-ahead ones included; off clears it",
    )
    limit.add_argument(
        "--per-second",
        type=_limit(float),
        default=...,
        metavar="R|off",
        help="at most R of its jobs started per second, spaced evenly (up to 1000); off clears it",
    )
    limit.add_argument("--db", help=option_help("db"))  # fmt: skip

    check = commands.add_parser("check", help="jobs module imports, cron expressions parse, schema is current")
    check.add_argument("--db", help=option_help("db"))
    check.add_argument("--jobs", help=option_help("jobs"))

    copy = commands.add_parser(
        "copy", help="move a SQLite file's jobs into PostgreSQL, ids, chains and cron schedules kept"
    )
    copy.add_argument("--from", dest="source", required=True, metavar="FILE", help="the SQLite file (only read)")
    copy.add_argument("--to", metavar="URL", help="the postgresql:// database [env WORKER_DB, DATABASE_URL]")
    copy.add_argument("--history", action="store_true", help="the finished rows too (default: pending ones only)")
    copy.add_argument("--running-as-pending", action="store_true",
                      help="copy running rows (of a worker that died) as pending, instead of refusing")  # fmt: skip
    copy.add_argument("--append", action="store_true", help="copy even though the database already holds jobs")

    for command in commands.choices.values():
        if any("--db" in action.option_strings for action in command._actions):
            command.add_argument("--django-settings", metavar="MODULE", help=DJANGO_HELP)
    # Parsed by worker_dashboard.py itself (see main): listed here for `worker --help`.
    commands.add_parser("dashboard", help="serve a read-only web page of queues, workers, cron jobs and failures")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``worker`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dashboard"]:
        return _dashboard_command(argv[1:])
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    _set_up_django(args)
    if args.command in ("run", "enqueue", "schema", "migrate"):
        return run_engine_command(args, supervise=supervise)
    configure_logging(setting(args, "log_level", str, "INFO"), setting(args, "log_format", str, "text"))
    if args.command == "copy":
        return _copy_command(args)
    db = database_target(args.db) if getattr(args, "db", None) else resolve_db_path()
    if args.command in OPERATING_COMMANDS:
        return OPERATING_COMMANDS[args.command](args, db)
    load_jobs(setting(args, "jobs", str, None))
    if args.command == "check":
        return _check_command(db)
    with Queue(db) as producer:  # prune
        count = producer.prune(dry_run=args.dry_run)
    print(f"{'would remove' if args.dry_run else 'removed'} {count} rows")
    return EXIT_OK


def _set_up_django(args: argparse.Namespace) -> None:
    """--django-settings (or DJANGO_SETTINGS_MODULE): django.setup() before the jobs module is imported,
    so that it may import models at module level; and Django's default database, unless --db or WORKER_DB
    says otherwise.  Django is imported only here, only then."""
    module = getattr(args, "django_settings", None) or os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module or args.command == "schema":
        return
    os.environ["DJANGO_SETTINGS_MODULE"] = module  # the supervisor's children set up Django as well
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # where manage.py would find the settings
    try:
        import django
        from django.conf import settings
    except ModuleNotFoundError as e:
        raise ConfigError(f"Django settings {module!r} given, but Django is not installed") from e
    given = getattr(args, "db", None) or os.environ.get("WORKER_DB")
    try:
        database = settings.DATABASES["default"]  # read before setup(), which loads the database's driver
    except Exception as e:
        raise ConfigError(f"Django settings {module!r}: {type(e).__name__}: {e}") from e
    engine = str(database.get("ENGINE", ""))
    if not given and not engine.endswith(("sqlite3", "postgresql")):
        raise ConfigError(f"Django's default database is {engine!r}: this worker serves SQLite and PostgreSQL (--db)")
    try:
        django.setup()
    except Exception as e:
        raise ConfigError(f"Django settings {module!r}: {type(e).__name__}: {e}") from e
    if not given:
        args.db = str(database["NAME"]) if engine.endswith("sqlite3") else _django_postgres_url(database)


# OPTIONS that Django's backend takes for itself, or passes to psycopg.connect()
# as arguments of psycopg's own: none is a libpq parameter, which would refuse the URL.
NOT_LIBPQ_OPTIONS = frozenset(
    ("isolation_level", "server_side_binding", "assume_role", "pool", "prepare_threshold", "cursor_factory", "context")
)


def _django_postgres_url(database: dict[str, Any]) -> str:
    """A postgresql:// URL for Django's PostgreSQL settings (NAME, USER, PASSWORD, HOST, PORT, OPTIONS)."""
    user = quote(str(database.get("USER") or ""), safe="")
    password = quote(str(database.get("PASSWORD") or ""), safe="")
    credentials = f"{user}:{password}@" if password else f"{user}@" if user else ""
    host, port = str(database.get("HOST") or ""), str(database.get("PORT") or "")
    host = f"[{host}]" if ":" in host else quote(host, safe="")  # an IPv6 address; a socket directory is escaped
    options = {key: value for key, value in (database.get("OPTIONS") or {}).items()
               if key not in NOT_LIBPQ_OPTIONS and type(value) in (str, int)}  # fmt: skip
    query = f"?{urlencode(options)}" if options else ""
    return (
        f"postgresql://{credentials}{host}{':' + port if port else ''}/{quote(str(database['NAME']), safe='')}{query}"
    )


def _dashboard_command(argv: list[str]) -> int:
    """`worker dashboard`: worker_dashboard.py parses its own options."""
    import worker_dashboard

    return int(worker_dashboard.main(argv))


def _colour_wanted() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _status_command(args: argparse.Namespace, db: str) -> int:
    while True:
        store = open_reader(db)
        try:
            report = status(store)
        finally:
            store.close()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(format_status(report, _colour_wanted()))
        if not args.watch:
            return EXIT_OK if report["healthy"] else EXIT_FAILURE
        sys.stdout.flush()
        time.sleep(args.watch)


def _jobs_command(args: argparse.Namespace, db: str) -> int:
    store = open_reader(db)
    try:
        found = list_jobs(store, status=args.status, type=args.type, queue=args.queue, limit=args.limit)
        progress = store.progress_of([j.id for j in found])
    finally:
        store.close()
    if args.json:
        print(json.dumps([_with_progress(job_as_dict(j), progress.get(j.id)) for j in found], indent=2))
    else:
        print(format_jobs(found, _colour_wanted(), progress))
    return EXIT_OK


def _show_command(args: argparse.Namespace, db: str) -> int:
    store = open_reader(db)
    try:
        chain = job_chain(store, args.id)
        progress = store.progress_of([args.id]).get(args.id)
    finally:
        store.close()
    found = next((j for j in chain if j.id == args.id), None)
    if found is None:
        print(f"worker: no job {args.id}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        shown = _with_progress(job_as_dict(found), progress)
        print(json.dumps({**shown, "chain": [job_as_dict(j) for j in chain]}, indent=2))
    else:
        print(format_job(found, chain, _colour_wanted(), progress))
    return EXIT_OK


def _with_progress(row: dict[str, Any], progress: str | None) -> dict[str, Any]:
    """A row's JSON with its latest progress, when it reported any (as stored, if it is not JSON)."""
    if progress is None:
        return row
    try:
        return {**row, "progress": json.loads(progress)}
    except ValueError:
        return {**row, "progress": progress}


def _retry_command(args: argparse.Namespace, db: str) -> int:
    if (args.id is None) == (not args.failed):
        raise ConfigError("give a job id or --failed")
    with Queue(db, check_types=False) as producer:
        if args.failed:
            retried = producer.retry_failed(type=args.type)
            for each in retried:
                print(f"job {each.rescheduled_from_job} retried as job {each.id}")
            print(f"{len(retried)} jobs retried")
            return EXIT_OK
        new = producer.retry(args.id)
        if new is None:
            found = producer.get(args.id)
            why = "no such job" if found is None else f"it is {found.status}"
            if found is not None and found.status in ("failed", "cancelled"):
                why = "it was already retried (retry the newest row of its chain)"
            print(f"worker: cannot retry job {args.id}: {why}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"job {args.id} retried as job {new.id}")
        return EXIT_OK


def _cancel_command(args: argparse.Namespace, db: str) -> int:
    if (args.id is None) == (args.type is None):
        raise ConfigError("give a job id or --type")
    with Queue(db, check_types=False) as producer:
        if args.type is not None:
            print(f"{producer.cancel_type(args.type)} pending {printable(args.type)} jobs cancelled")
            return EXIT_OK
        if producer.cancel(args.id):
            found = producer.get(args.id)
            if found is not None and found.status == "running":
                print(f"job {args.id} is running: its worker was asked to stop it (ctx.cancelled)")
            else:
                print(f"job {args.id} cancelled")
            return EXIT_OK
        found = producer.get(args.id)
        why = "no such job" if found is None else f"it is {found.status}; only pending and running jobs can be"
        if found is not None and found.status == "running":
            why = "its worker was asked to stop it already"
        print(f"worker: cannot cancel job {args.id}: {why}", file=sys.stderr)
        return EXIT_FAILURE


def _pause_command(args: argparse.Namespace, db: str) -> int:
    with Queue(db, check_types=False) as producer:
        control = producer.pause(args.queue) if args.command == "pause" else producer.resume(args.queue)
    print(f"queue {printable(args.queue)}: {controls_text(control) or 'no controls'}")
    return EXIT_OK


def _limit_command(args: argparse.Namespace, db: str) -> int:
    changes = {name: getattr(args, name) for name in ("running", "per_second") if getattr(args, name) is not ...}
    if not changes:
        raise ConfigError("give --running, --per-second, or both (off clears one)")
    with Queue(db, check_types=False) as producer:
        control = producer.limit(args.queue, **changes)
    print(f"queue {printable(args.queue)}: {controls_text(control) or 'no controls'}")
    return EXIT_OK


def _check_command(db: str) -> int:
    """The jobs module imported (else we exited 2 already); now cron rows and the schema."""
    store = open_reader(db)
    try:
        for pending, _ in store.cron_schedules():
            schedule = str(pending.cron_schedule)
            try:
                check_cron(schedule, pending.cron_timezone)
                # The run after this one: its slot may be past the year 9999.
                slot = pending.due if pending.cron_slot is None else pending.cron_slot
                next_cron_slot(schedule, pending.cron_timezone, slot)
            except ValueError as e:
                raise ConfigError(f"pending job {pending.id} {pending.type}: {e}") from e
        missing = store.missing_schema()
        version = store.describe()["schema_version"]
    finally:
        store.close()
    if missing:  # say so: the worker names some of them in its SQL
        raise DatabaseUnusable(f"schema objects missing: {', '.join(missing)} (the worker re-creates them at start)")
    declared = sorted(name for name, job_type in REGISTRY.items() if job_type.cron)
    print(f"ok: {len(REGISTRY)} job types, {len(declared)} cron jobs, schema version {version}")
    return EXIT_OK


OPERATING_COMMANDS: dict[str, Callable[[argparse.Namespace, str], int]] = {
    "status": _status_command,
    "jobs": _jobs_command,
    "show": _show_command,
    "retry": _retry_command,
    "cancel": _cancel_command,
    "pause": _pause_command,
    "resume": _pause_command,
    "limit": _limit_command,
}


if __name__ == "__main__":  # how the supervisor starts its children: `python worker_cli.py run ...`
    sys.exit(main())
