"""The ``worker`` command line: run, enqueue, status, jobs, show, retry, cancel, prune, check.

Also the supervisor of ``worker run --processes P`` and the text formatting of
what the operating queries in worker.py (``status``, ``list_jobs``,
``job_chain``) read.  The engine is worker.py; this module only drives it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker import (
    DEFAULT_CONCURRENCY,
    DEFAULT_JOBS_MODULE,
    DEFAULT_LEASE,
    DEFAULT_MAX_DEATHS,
    DEFAULT_PREFETCH,
    DEFAULT_SHUTDOWN_TIMEOUT,
    REGISTRY,
    SCHEMA_PATH,
    STATUSES,
    ConfigError,
    DatabaseUnusable,
    InvalidJobData,
    Job,
    Queue,
    UnknownJobType,
    Worker,
    __version__,
    apply_schema,
    check_cron,
    connect,
    connect_readonly,
    iso_time,
    job_as_dict,
    job_chain,
    list_jobs,
    load_jobs,
    logger,
    missing_schema_objects,
    resolve_db_path,
    schema_version,
    status,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3

# --- Formatting for people ------------------------------------------------------


def _colour(text: str, state: str, enabled: bool) -> str:
    codes = {"succeeded": "32", "failed": "31", "running": "36", "cancelled": "90", "pending": "33",
             "stale": "31", "fresh": "32"}  # fmt: skip
    return f"\033[{codes[state]}m{text}\033[0m" if enabled and state in codes else text


def printable(text: str) -> str:
    """Text from the table made safe for a terminal: control characters shown as \\xNN."""
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


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


def ago(seconds: float | None) -> str:
    """A duration as 4.2s, 3.5m or 2.0h."""
    if seconds is None:
        return "-"
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _when(epoch_ms: int | None) -> str:
    return "-" if epoch_ms is None else iso_time(epoch_ms).replace("+00:00", "Z")


def format_status(report: dict[str, Any], colour: bool = False) -> str:
    """``worker status`` for people."""
    queues = [
        [printable(q["queue"]), q["pending_due"], q["pending_later"], q["running"], q["succeeded_last_hour"],
         q["failed_last_hour"], q["cancelled_last_hour"], ago(q["oldest_waiting_seconds"])]
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
        f"database  {printable(report['database'])}  (schema {report['schema_version']}, "
        f"SQLite {report['sqlite_version']}, WAL {report['wal_bytes'] / 1e6:.1f} MB)",
        "",
        _table(["queue", "due", "later", "running", "succeeded/1h", "failed/1h", "cancelled/1h", "oldest waiting"],
               queues or [["(no jobs)"] + [""] * 7]),
        "",
        _table(["worker", "pid", "started", "heartbeat", "state", "running", "concurrency", "queues"],
               workers or [["(no workers)"] + [""] * 7]),
    ]  # fmt: skip
    if cron:
        lines += ["", _table(["cron job", "schedule", "timezone", "next run", "last run", "last status"], cron)]
    return "\n".join(lines)


def format_jobs(jobs: list[Job], colour: bool = False) -> str:
    """``worker jobs`` for people."""
    rows = [[j.id, printable(j.type), _colour(j.status, j.status, colour), printable(j.queue), j.attempt, _when(j.due),
             _when(j.finished), printable((j.error or "").split("\n", 1)[0][:60])] for j in jobs]  # fmt: skip
    return _table(["id", "type", "status", "queue", "attempt", "due", "finished", "error"], rows)


def format_job(job: Job, chain: list[Job], colour: bool = False) -> str:
    """``worker show`` for people: the row, its data, result and error, and its chain."""
    cron = job.cron_schedule and f"{job.cron_schedule} ({job.cron_timezone or 'UTC'})"
    fields = [("id", job.id), ("type", printable(job.type)), ("status", _colour(job.status, job.status, colour)),
              ("queue", printable(job.queue)), ("priority", job.priority), ("attempt", job.attempt),
              ("due", _when(job.due)), ("started", _when(job.started)), ("finished", _when(job.finished)),
              ("worker", job.worker and printable(job.worker)), ("tag", job.tag and printable(job.tag)),
              ("cron", cron and printable(cron)), ("from job", job.rescheduled_from_job),
              ("remove at", _when(job.remove_at))]  # fmt: skip
    lines = [f"{name:<10} {value}" for name, value in fields if value is not None]
    lines += ["", "data:", json.dumps(job.data, indent=2, sort_keys=True)]
    if job.result is not None or job.status == "succeeded":
        lines += ["", "result:", json.dumps(job.result, indent=2, sort_keys=True)]
    if job.error:
        lines += ["", "error:", printable(job.error.rstrip())]
    if len(chain) > 1:
        lines += ["", "chain:", format_jobs(chain, colour)]
    return "\n".join(lines)


# --- Process supervision --------------------------------------------------------


def supervise(child_args: list[str], processes: int, shutdown_timeout: float, *, burst: bool = False) -> int:
    """Run ``processes`` worker processes and restart any that dies; returns the exit code.

    With ``burst``, a child that exits 0 has finished, and the supervisor
    returns once all have.

    Each child is a fresh interpreter (fork + exec), so no connection or lock
    can cross into it.  Children get a session of their own: a Ctrl-C reaches
    only the supervisor, which passes one SIGTERM on.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "run", *child_args]
    stopping = threading.Event()
    signals_seen = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, start_new_session=True)

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
            if code in (EXIT_USAGE, EXIT_DATABASE):
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


# --- CLI ------------------------------------------------------------------------

ENVIRONMENT = {
    "db": ("WORKER_DB", "database file (else DATABASE_URL if sqlite:///..., else ./worker.db)"),
    "jobs": ("WORKER_JOBS", f"module name or .py path that registers the jobs (default {DEFAULT_JOBS_MODULE})"),
    "concurrency": ("WORKER_CONCURRENCY", f"job threads per process (default {DEFAULT_CONCURRENCY})"),
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
        f"jobs claimed beyond the free threads while jobs run under 1 ms; 0: none (default {DEFAULT_PREFETCH})",
    ),
    "no_cron": ("WORKER_NO_CRON", "do not create the pending rows of jobs declared with cron= (default: do)"),
    "keep_succeeded": ("WORKER_KEEP_SUCCEEDED", "seconds a succeeded row is kept before pruning (default 7 days)"),
    "keep_failed": ("WORKER_KEEP_FAILED", "seconds a failed or cancelled row is kept (default 30 days)"),
    "synchronous": ("WORKER_SYNCHRONOUS", "NORMAL (a power cut may lose the last commits) or FULL (default NORMAL)"),
    "log_level": ("WORKER_LOG_LEVEL", "the worker's own log threshold: DEBUG, INFO, WARNING, ERROR (default INFO)"),
    "log_format": ("WORKER_LOG_FORMAT", "text or json (default text)"),
}


def _option_help(dest: str) -> str:
    variable, text = ENVIRONMENT[dest]
    return f"{text} [env {variable}]"


def build_parser() -> argparse.ArgumentParser:
    """The ``worker`` command line."""
    parser = argparse.ArgumentParser(
        prog="worker",
        description="A SQLite-first background job worker.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 database unusable.",
    )
    parser.add_argument("--version", action="version", version=f"worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--db", help=_option_help("db"))
        sub.add_argument("--jobs", help=_option_help("jobs"))
        sub.add_argument("--log-level", help=_option_help("log_level"))
        sub.add_argument("--log-format", help=_option_help("log_format"))

    run = commands.add_parser(
        "run", help="claim and run jobs until stopped", epilog=f"Environment only: {_option_help('synchronous')}"
    )
    common(run)
    run.add_argument("--concurrency", type=int, help=_option_help("concurrency"))
    run.add_argument("--processes", type=int, help=_option_help("processes"))
    run.add_argument("--queues", help=_option_help("queues"))
    run.add_argument("--lease", type=float, help=_option_help("lease"))
    run.add_argument("--shutdown-timeout", type=float, help=_option_help("shutdown_timeout"))
    run.add_argument("--max-deaths", type=int, help=_option_help("max_deaths"))
    run.add_argument("--prefetch", type=int, help=_option_help("prefetch"))
    run.add_argument("--no-cron", action="store_const", const=True, help=_option_help("no_cron"))
    run.add_argument("--keep-succeeded", type=float, help=_option_help("keep_succeeded"))
    run.add_argument("--keep-failed", type=float, help=_option_help("keep_failed"))
    run.add_argument("--burst", action="store_true", help="exit 0 once no job is due and none is running")

    enqueue = commands.add_parser("enqueue", help="schedule a job and print its id")
    common(enqueue)
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

    prune = commands.add_parser("prune", help="delete finished rows past their retention; print how many")
    common(prune)
    prune.add_argument("--dry-run", action="store_true", help="only count them")

    state = commands.add_parser("status", help="queues, workers and cron jobs; exit 1 if no worker is alive")
    state.add_argument("--db", help=_option_help("db"))
    state.add_argument("--json", action="store_true", help="machine-readable output")
    state.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")

    listing = commands.add_parser("jobs", help="a table of rows, newest first")
    listing.add_argument("--db", help=_option_help("db"))
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--type")
    listing.add_argument("--queue")
    listing.add_argument("--limit", type=_positive(int), default=50, help="default 50")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    show = commands.add_parser("show", help="one row with its data, result, error and chain")
    show.add_argument("id", type=int)
    show.add_argument("--db", help=_option_help("db"))
    show.add_argument("--json", action="store_true", help="machine-readable output")

    retry = commands.add_parser("retry", help="run a failed job again as a new row of its chain")
    retry.add_argument("id", type=int, nargs="?")
    retry.add_argument("--failed", action="store_true", help="every failed job whose chain ended in failure")
    retry.add_argument("--type", help="with --failed: only this type")
    retry.add_argument("--db", help=_option_help("db"))

    cancel = commands.add_parser("cancel", help="cancel a pending job")
    cancel.add_argument("id", type=int)
    cancel.add_argument("--db", help=_option_help("db"))

    check = commands.add_parser("check", help="jobs module imports, cron expressions parse, schema is current")
    check.add_argument("--db", help=_option_help("db"))
    check.add_argument("--jobs", help=_option_help("jobs"))

    commands.add_parser("schema", help="print the table definition (DDL) for other tools")
    # Parsed by dashboard.py itself (see main): listed here for `worker --help`.
    commands.add_parser("dashboard", help="serve a read-only web page of queues, workers, cron jobs and failures")
    return parser


def _setting(args: argparse.Namespace, dest: str, parse: Callable[[str], Any], default: Any) -> Any:
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
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s")
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    logger.handlers[:] = [handler]
    logger.setLevel(numeric)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """The ``worker`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dashboard"]:
        return _dashboard_command(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        log_level, log_format = _setting(args, "log_level", str, "INFO"), _setting(args, "log_format", str, "text")
        configure_logging(log_level, log_format)
        if args.command == "schema":
            print(SCHEMA_PATH.read_text().rstrip() + f"\n\nPRAGMA user_version = {schema_version()};")
            return EXIT_OK
        db = getattr(args, "db", None) or resolve_db_path()
        if args.command in OPERATING_COMMANDS:
            return OPERATING_COMMANDS[args.command](args, db)
        jobs_module = _setting(args, "jobs", str, DEFAULT_JOBS_MODULE)
        load_jobs(jobs_module)
        if args.command == "check":
            return _check_command(db)
        if args.command == "enqueue":
            return _enqueue_command(args, db)
        if args.command == "prune":
            with Queue(db) as producer:
                count = producer.prune(dry_run=args.dry_run)
            print(f"{'would remove' if args.dry_run else 'removed'} {count} rows")
            return EXIT_OK
        return _run_command(args, db, jobs_module, log_level, log_format)
    except ConfigError as e:
        print(f"worker: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseUnusable as e:
        print(f"worker: {e}", file=sys.stderr)
        return EXIT_DATABASE
    except sqlite3.DatabaseError as e:
        print(f"worker: database error: {e}", file=sys.stderr)
        return EXIT_DATABASE
    except (UnknownJobType, InvalidJobData, ValueError) as e:
        print(f"worker: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a runtime failure: one line, the traceback only at DEBUG
        logger.debug("unexpected failure", exc_info=True)
        print(f"worker: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


def _dashboard_command(argv: list[str]) -> int:
    """`worker dashboard`: dashboard.py imports worker, never the reverse; the engine does not need it."""
    try:
        import dashboard
    except ModuleNotFoundError as e:
        if e.name != "dashboard":
            raise
        print("worker: `worker dashboard` needs dashboard.py beside worker.py", file=sys.stderr)
        return EXIT_USAGE
    return int(dashboard.main(argv))


def _colour_wanted() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _status_command(args: argparse.Namespace, db: str) -> int:
    while True:
        conn = connect_readonly(db)
        try:
            report = status(conn)
        finally:
            conn.close()
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
    conn = connect_readonly(db)
    try:
        found = list_jobs(conn, status=args.status, type=args.type, queue=args.queue, limit=args.limit)
    finally:
        conn.close()
    if args.json:
        print(json.dumps([job_as_dict(j) for j in found], indent=2))
    else:
        print(format_jobs(found, _colour_wanted()))
    return EXIT_OK


def _show_command(args: argparse.Namespace, db: str) -> int:
    conn = connect_readonly(db)
    try:
        chain = job_chain(conn, args.id)
    finally:
        conn.close()
    found = next((j for j in chain if j.id == args.id), None)
    if found is None:
        print(f"worker: no job {args.id}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({**job_as_dict(found), "chain": [job_as_dict(j) for j in chain]}, indent=2))
    else:
        print(format_job(found, chain, _colour_wanted()))
    return EXIT_OK


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
    with Queue(db, check_types=False) as producer:
        if producer.cancel(args.id):
            print(f"job {args.id} cancelled")
            return EXIT_OK
        found = producer.get(args.id)
        why = "no such job" if found is None else f"it is {found.status}; only pending jobs can be cancelled"
        print(f"worker: cannot cancel job {args.id}: {why}", file=sys.stderr)
        return EXIT_FAILURE


def _check_command(db: str) -> int:
    """The jobs module imported (else we exited 2 already); now cron rows and the schema."""
    conn = connect_readonly(db)
    try:
        for row in conn.execute("SELECT id, type, cron_schedule, cron_timezone FROM worker_jobs "
                                "WHERE status = 'pending' AND cron_schedule IS NOT NULL"):  # fmt: skip
            try:
                check_cron(row[2], row[3])
            except ValueError as e:
                raise ConfigError(f"pending job {row[0]} {row[1]}: {e}") from e
        missing = missing_schema_objects(conn)
    finally:
        conn.close()
    if missing:  # say so: the worker names some of them in its SQL
        raise DatabaseUnusable(f"schema objects missing: {', '.join(missing)} (the worker re-creates them at start)")
    declared = sorted(name for name, job_type in REGISTRY.items() if job_type.cron)
    print(f"ok: {len(REGISTRY)} job types, {len(declared)} cron jobs, schema version {schema_version()}")
    return EXIT_OK


OPERATING_COMMANDS: dict[str, Callable[[argparse.Namespace, str], int]] = {
    "status": _status_command,
    "jobs": _jobs_command,
    "show": _show_command,
    "retry": _retry_command,
    "cancel": _cancel_command,
}


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


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("use 1/true/yes or 0/false/no")


def _positive(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_positive(raw: str) -> Any:
        value = parse(raw)
        if value <= 0:
            raise ValueError("must be positive")
        return value

    return parse_positive


def _run_command(args: argparse.Namespace, db: str, jobs_module: str, log_level: str, log_format: str) -> int:
    settings = {
        "concurrency": _setting(args, "concurrency", _positive(int), DEFAULT_CONCURRENCY),
        "queues": _setting(args, "queues", str, ""),
        "lease": _setting(args, "lease", _positive(float), DEFAULT_LEASE),
        "shutdown_timeout": _setting(args, "shutdown_timeout", float, DEFAULT_SHUTDOWN_TIMEOUT),
        "max_deaths": _setting(args, "max_deaths", _positive(int), DEFAULT_MAX_DEATHS),
        "prefetch": _setting(args, "prefetch", int, DEFAULT_PREFETCH),
        "keep_succeeded": _setting(args, "keep_succeeded", float, None),
        "keep_failed": _setting(args, "keep_failed", float, None),
    }
    no_cron = _setting(args, "no_cron", _flag, False)
    worker = Worker(
        db,
        concurrency=settings["concurrency"],
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
    processes = _setting(args, "processes", _positive(int), 1)
    if processes > 1:
        # Check the database once here, so a bad path is one clear error rather
        # than P children dying; the connection is closed before any child starts.
        check = connect(db)
        apply_schema(check)
        check.close()
        child_args = ["--db", db, "--jobs", jobs_module]
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

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return EXIT_OK


if __name__ == "__main__":  # how the supervisor starts its children: `python worker_cli.py run ...`
    sys.exit(main())
