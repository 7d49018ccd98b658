"""The operator tools keep working whatever another program wrote into the table.

`worker jobs`, `worker show`, `worker status` (text and --json) and the
dashboard read rows that any client may have written: times at the ends of
the integer range, data nested deeper than Python decodes, text with control
characters or bytes that are not UTF-8, columns added by hand.  Each hostile
row is written here with the standard library's sqlite3, as another program
would; the CLI runs through ``worker_cli.main`` (and once as a real process),
the dashboard on a free loopback port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
import worker_cli
from conftest import HERE, create_database, wait_for
from worker_dashboard import DashboardServer

# --- Hostile rows ------------------------------------------------------------------


class Sql(str):
    """An SQL expression written into the INSERT rather than bound (to make text that is not UTF-8)."""


EXTREME_TIMES = {"9e18": 9 * 10**18, "2**63-1": 2**63 - 1, "-2**63": -(2**63), "0": 0}
# Line breaks, tab and CR (forge table rows), ESC and BEL (drive a terminal), NUL, C1 NEL and CSI.
FORGING = "a\nb\tc\rd\x1b[2Je\x07f\x00g\x85h\x9b31mi"
NOT_UTF8 = Sql("CAST(x'61ff0a62' AS TEXT)")  # "a", a byte 0xff, a line break, "b"
DEEP = '{"a": ' + "[" * 1500 + "]" * 1500 + "}"  # json_valid takes it; Python's json does not

HOSTILE = [
    *(
        pytest.param({column: value}, id=f"{column}={name}")
        for column in ("due", "started", "finished", "lease_until")
        for name, value in EXTREME_TIMES.items()
    ),
    *(pytest.param({column: FORGING}, id=f"{column}-control-characters") for column in ("type", "queue", "tag")),
    *(pytest.param({column: NOT_UTF8}, id=f"{column}-not-utf-8") for column in ("type", "queue", "tag")),
    pytest.param({"data": Sql("CAST(x'7b2261223a2261ff227d' AS TEXT)")}, id="data-not-utf-8"),
    pytest.param({"data": DEEP}, id="data-nested-1500-deep"),
    pytest.param({"result": DEEP}, id="result-nested-1500-deep"),
    pytest.param({"data": '{"a": "\\udcff"}'}, id="data-lone-surrogate"),
    pytest.param({"error": f"RuntimeError: {FORGING}\nTraceback (most recent call last):\n  x"}, id="error-controls"),
]


def insert(conn: sqlite3.Connection, **columns: Any) -> int:
    """One row of worker_jobs, as another program would insert it; returns its id."""
    marks = [value if isinstance(value, Sql) else "?" for value in columns.values()]
    params = [value for value in columns.values() if not isinstance(value, Sql)]
    sql = f"INSERT INTO worker_jobs ({', '.join(columns)}) VALUES ({', '.join(marks)})"
    id = conn.execute(sql, params).lastrowid
    assert id is not None
    return id


def register_live_worker(conn: sqlite3.Connection) -> None:
    """A worker_processes row with a fresh heartbeat, so that `worker status` is healthy (exit 0)."""
    now = worker.now_ms()
    conn.execute(
        "INSERT INTO worker_processes (id, host, pid, started, last_seen, lease_ms, concurrency, version)"
        " VALUES ('token', 'host', 1, ?, ?, 3600000, 1, 'test')",
        (now, now),
    )


@pytest.fixture
def database(db: str) -> str:
    """The table created and one live worker registered, nothing else."""
    create_database(Path(db))
    with sqlite3.connect(db) as conn:
        register_live_worker(conn)
    conn.close()
    return db


def hostile_chain(db: str, hostile: dict[str, Any]) -> tuple[int, int]:
    """A cron job's last run and its next pending row, both carrying the hostile values; returns their ids."""
    now = worker.now_ms()
    cron = {"type": "report", "queue": "default", "tag": "cron:report", "cron_schedule": "* * * * *"}
    with sqlite3.connect(db) as conn:
        last = insert(conn, **{**cron, "status": "succeeded", "cron_slot": 1, "started": now - 1000, "finished": now,
                               "result": "1", **hostile})  # fmt: skip
        following = {"status": "pending", "cron_slot": 2, "due": now + 60_000, "rescheduled_from_job": last}
        pending = insert(conn, **{**cron, **following, **hostile})
    conn.close()
    return pending, last


# --- Running the tools ---------------------------------------------------------------

# Anything that could drive a terminal or forge a line; a line break is what separates lines.
UNSAFE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``worker ARGS`` in this process: its exit code, stdout and stderr; the worker logger restored after."""
    saved = list(worker.logger.handlers), worker.logger.level, worker.logger.propagate

    def run(*args: str) -> tuple[int, str, str]:
        code = worker_cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    worker.logger.handlers[:], worker.logger.level, worker.logger.propagate = saved


def request(url: str) -> tuple[int, str]:
    """GET from the dashboard on loopback, never through a proxy: status and body."""
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def table_rows(text: str, header: str) -> list[str]:
    """The rows of the text table whose header line starts with ``header`` (up to a blank line)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines[:-1]) if line.startswith(header) and lines[i + 1][:1] == "-") + 2
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


# --- 20, 21: every hostile row, every tool ---------------------------------------------


@pytest.mark.parametrize("hostile", HOSTILE)
def test_every_tool_shows_a_hostile_row_safely(
    database: str, hostile: dict[str, Any], cli: Callable[..., tuple[int, str, str]], serve: Callable[..., Any]
) -> None:
    pending, last = hostile_chain(database, hostile)
    db = ["--db", database]
    texts = {}
    for command in (["jobs"], ["show", str(pending)], ["status"]):
        code, out, err = cli(*command, *db)
        assert code == 0, (command, err)
        assert not UNSAFE.search(out), (command, out)
        texts[command[0]] = out
    # No value forged a row: the jobs table has its two rows, the chain its two, the cron table its one.
    assert [int(line.split()[0]) for line in table_rows(texts["jobs"], "id ")] == [pending, last]
    assert [int(line.split()[0]) for line in table_rows(texts["show"], "id ")] == [last, pending]
    assert len(table_rows(texts["status"], "cron job")) == 1
    assert texts["show"].startswith(f"id         {pending}\n")
    for column, value in hostile.items():
        if value == FORGING:
            assert worker.printable(FORGING) in texts["show"]  # the value shown, escaped
        if column == "error":  # a traceback keeps its lines, each indented under its heading
            assert "\nerror:\n  RuntimeError: a\n  b\\x09c" in texts["show"]

    for command in (["jobs", "--json"], ["show", str(pending), "--json"], ["status", "--json"]):
        code, out, err = cli(*command, *db)
        assert code == 0, (command, err)
        assert not UNSAFE.search(out), (command, out)
        texts[command[0]] = json.loads(out)
    assert [job["id"] for job in texts["jobs"]] == [pending, last]
    assert [job["id"] for job in texts["show"]["chain"]] == [last, pending]
    assert [cron["next_job"] for cron in texts["status"]["cron"]] == [pending]

    url = serve().url
    for path in ("", f"jobs/{pending}", f"jobs/{last}", "status.json"):
        status, body = request(url + path)
        assert status == 200, (path, body[-2000:])
    assert f'href="/jobs/{pending}"' in request(url)[1]


def test_cron_row_due_in_the_year_285_million_leaves_worker_status_working(database: str) -> None:
    """`worker status` is everyone's: one row another program wrote must not make it exit 2."""
    with sqlite3.connect(database) as conn:
        insert(conn, type="report", tag="cron:report", cron_schedule="* * * * *", due=9 * 10**18)
    conn.close()
    command = [sys.executable, "-m", "worker_cli", "status", "--db", database]
    shown = subprocess.run(command, cwd=HERE, env={**os.environ, "NO_COLOR": "1"}, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "9000000000000000000 (epoch ms)" in table_rows(shown.stdout, "cron job")[0]


def test_data_nested_1500_deep_is_shown_as_its_stored_text(
    database: str, cli: Callable[..., tuple[int, str, str]]
) -> None:
    with sqlite3.connect(database) as conn:
        id = insert(conn, type="deep", data=DEEP)
    conn.close()
    code, out, err = cli("show", str(id), "--db", database)
    assert code == 0, err
    assert "not decoded" in out and DEEP[:500] in out
    assert DEEP not in out  # cut short: the text can be as long as the row
    code, out, err = cli("jobs", "--json", "--db", database)
    assert code == 0, err
    assert json.loads(out)[0]["data"] == DEEP  # all of it, as a JSON string, where a decoded row has an object


def test_data_nested_600_deep_decodes_but_is_shown_as_text_too(
    database: str, cli: Callable[..., tuple[int, str, str]]
) -> None:
    """Python decodes 600 levels, but printing them (or dataclasses.asdict) runs out of stack."""
    nested = '{"a": ' + "[" * 600 + "]" * 600 + "}"
    with sqlite3.connect(database) as conn:
        id = insert(conn, type="deep", data=nested)
    conn.close()
    for command in (["show", str(id)], ["show", str(id), "--json"], ["jobs", "--json"]):
        code, out, err = cli(*command, "--db", database)
        assert code == 0, (command, err)
        assert nested[:100] in out.replace('\\"', '"')


def test_a_worker_process_row_with_hostile_values_leaves_status_working(
    database: str, cli: Callable[..., tuple[int, str, str]], serve: Callable[..., Any]
) -> None:
    with sqlite3.connect(database) as conn:
        conn.execute(
            "INSERT INTO worker_processes (id, host, pid, started, last_seen, lease_ms, concurrency, queues, version)"
            f" VALUES ('other', ?, -1, ?, ?, ?, 1, {NOT_UTF8}, ?)",
            (FORGING, 9 * 10**18, -(2**63), 2**63 - 1, FORGING),
        )
    conn.close()
    code, out, err = cli("status", "--db", database)
    assert code == 0, err
    assert not UNSAFE.search(out) and len(table_rows(out, "worker ")) == 2
    assert worker.printable(FORGING) in out and "9000000000000000000 (epoch ms)" in out
    code, out, err = cli("status", "--json", "--db", database)
    assert code == 0 and len(json.loads(out)["workers"]) == 2, err
    assert request(serve().url)[0] == 200


def test_an_id_beyond_64_bits_is_no_such_job(
    database: str, cli: Callable[..., tuple[int, str, str]], serve: Callable[..., Any]
) -> None:
    code, _, err = cli("show", str(2**64), "--db", database)
    assert (code, err) == (1, f"worker: no job {2**64}\n")
    assert request(f"{serve().url}jobs/{2**64}")[0] == 404


# --- 21: tables and the log ----------------------------------------------------------


def test_line_breaks_and_tabs_in_values_cannot_forge_rows_of_a_table(
    database: str, cli: Callable[..., tuple[int, str, str]]
) -> None:
    forged = "x\n999  succeeded  default  1  -  -  fake row\tcell"
    with sqlite3.connect(database) as conn:
        id = insert(conn, type=forged, queue=forged)
    conn.close()
    code, out, err = cli("jobs", "--db", database)
    assert code == 0, err
    assert [line.split()[0] for line in table_rows(out, "id ")] == [str(id)]
    assert "x\\x0a999" in out and "\\x09cell" in out


def test_an_error_naming_a_value_from_the_table_is_printed_escaped(
    database: str, cli: Callable[..., tuple[int, str, str]]
) -> None:
    with sqlite3.connect(database) as conn:
        insert(conn, type=FORGING, tag="cron:x", cron_schedule="not a schedule")
    conn.close()
    code, _, err = cli("check", "--db", database, "--jobs", str(HERE / "jobs.py"))
    assert code != 0
    assert worker.printable(FORGING) in err and not UNSAFE.search(err.rstrip("\n")), err


def worker_log(db: str, log_format: str, tmp_path: Path) -> bytes:
    """Run a real worker once over the table (--burst) and return its stderr, as bytes.

    Its jobs module registers a failing job under the forging name, so that a
    type with every control character reaches the log with a traceback.
    """
    jobs = tmp_path / "forging_jobs.py"
    name = FORGING.replace("\x00", "")  # a NUL in a registered name cannot be matched by SQL's json_each
    jobs.write_text(f"from worker import job\n\n@job(name={name!r})\ndef forging(ctx):\n    raise ValueError('no')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    command = [sys.executable, "-m", "worker", "run", "--db", db, "--jobs", str(jobs), "--burst", "--no-cron",
               "--log-format", log_format]  # fmt: skip
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def test_text_log_escapes_control_characters_from_job_types(database: str, tmp_path: Path) -> None:
    """A job type from the table reaches the log (its failure, logged with its traceback)."""
    with sqlite3.connect(database) as conn:
        id = insert(conn, type=FORGING.replace("\x00", ""), queue=FORGING)
    conn.close()
    log = worker_log(database, "text", tmp_path)
    assert re.search(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", log) is None, log
    # A line break stays one, but every line is a record's first (it starts with its time) or a later,
    # indented line of one: the type can forge no record.  The rest is escaped.
    after_break = FORGING.replace("\x00", "").split(chr(10), 1)[1]
    assert f"job {id} a\n  {worker.printable(after_break)} failed".encode() in log
    assert all(re.match(rb"\d{4}-\d\d-\d\d |  ", line) for line in log.splitlines()), log
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT status FROM worker_jobs WHERE id = ?", (id,)).fetchone() == ("failed",)
    conn.close()


def test_json_log_keeps_control_characters_only_as_json_escapes(database: str, tmp_path: Path) -> None:
    with sqlite3.connect(database) as conn:
        insert(conn, type=FORGING.replace("\x00", ""))
    conn.close()
    log = worker_log(database, "json", tmp_path)
    assert re.search(rb"[\x00-\x09\x0b-\x1f\x7f\x80-\xff]", log) is None, log
    records = [json.loads(line) for line in log.splitlines()]
    assert any(FORGING.replace("\x00", "") in record["message"] for record in records)


def test_text_formatter_indents_the_lines_of_a_traceback_and_escapes_the_rest() -> None:
    formatter = worker.TextFormatter("%(levelname)s %(message)s")
    try:
        raise RuntimeError("bad\x1b[2J\nERROR forged record")
    except RuntimeError:
        record = logging.LogRecord("worker", logging.ERROR, __file__, 1, "job %s failed", (FORGING,), sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[:2] == ["ERROR job a", f"  {worker.printable(FORGING.split(chr(10), 1)[1])} failed"]
    assert all(line.startswith("  ") for line in lines[1:]) and "  Traceback (most recent call last):" in lines
    assert "  ERROR forged record" in lines and not any(UNSAFE.search(line) for line in lines)


# --- 22: columns added by hand ---------------------------------------------------------


def test_columns_added_by_hand_change_nothing_for_the_tools(
    database: str, cli: Callable[..., tuple[int, str, str]], serve: Callable[..., Any]
) -> None:
    pending, _ = hostile_chain(database, {})
    with sqlite3.connect(database) as conn:
        conn.execute("ALTER TABLE worker_processes ADD COLUMN note TEXT DEFAULT 'added by hand'")
        conn.execute("ALTER TABLE worker_jobs ADD COLUMN note TEXT DEFAULT 'added by hand'")
    conn.close()
    for command in (["status"], ["status", "--json"], ["jobs"], ["jobs", "--json"], ["show", str(pending)]):
        code, out, err = cli(*command, "--db", database)
        assert code == 0, (command, err)
    code, out, err = cli("status", "--json", "--db", database)
    assert [w["host"] for w in json.loads(out)["workers"]] == ["host"]
    url = serve().url
    for path in ("", f"jobs/{pending}", "status.json"):
        assert request(url + path)[0] == 200, path


# --- 23: the dashboard's connections ---------------------------------------------------


def connection_threads() -> int:
    """The dashboard's connection threads alive in this process (ThreadingMixIn names them)."""
    return sum(1 for thread in threading.enumerate() if "process_request_thread" in thread.name)


def closed_by_server(client: socket.socket) -> bool:
    """Whether the server closed this connection (a 503 answer, then end of file, counts)."""
    client.settimeout(0.05)
    try:
        while chunk := client.recv(4096):
            if not chunk.startswith(b"HTTP/1.0 503"):
                return False
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_trickling_connections_are_cut_off_and_their_threads_bounded(
    database: str, serve: Callable[..., DashboardServer]
) -> None:
    server = serve(max_connections=4, connection_seconds=1.0)
    host, port = server.server_address[:2]
    clients = [socket.create_connection((str(host), port), timeout=5) for _ in range(16)]  # never send a byte
    trickler = socket.create_connection((str(host), port), timeout=5)
    try:
        deadline = time.monotonic() + 20  # far more than the 1 s each may last, for a loaded machine
        most = 0
        while time.monotonic() < deadline:
            most = max(most, connection_threads())
            with_eof = sum(closed_by_server(client) for client in clients)
            with contextlib.suppress(OSError):
                trickler.send(b"G")  # one byte a look: each read waits less than the cut-off
            if with_eof == len(clients) and closed_by_server(trickler):
                break
        else:
            raise AssertionError(f"connections still open after 20 s ({with_eof} of {len(clients)} closed)")
        assert most <= 4
        wait_for(lambda: connection_threads() == 0, 10, "the connection threads to end")
        assert request(server.url)[0] == 200  # and it still answers
    finally:
        for client in [*clients, trickler]:
            client.close()


def test_closing_the_dashboard_ends_the_threads_of_its_idle_connections(
    database: str, serve: Callable[..., DashboardServer]
) -> None:
    """A browser keeps idle connections open; a closed server must not leave their threads behind for 20 s."""
    server = serve()
    host, port = server.server_address[:2]
    idle = socket.create_connection((str(host), port), timeout=5)
    try:
        wait_for(lambda: connection_threads() == 1, 10, "the idle connection's thread")
        server.shutdown()
        server.server_close()
        wait_for(lambda: connection_threads() == 0, 5, "the idle connection's thread to end")
    finally:
        idle.close()
