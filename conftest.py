"""Shared by the test modules: a real database file, a fake clock, a clean registry, process helpers."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import worker
from worker import Queue, Worker
from worker_dashboard import DashboardServer

HERE = Path(__file__).parent
START = 1_800_000_000.0  # the fake clock's epoch seconds


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class NoJitter(random.Random):
    """Retry jitter pinned to its middle, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


@pytest.fixture(autouse=True)
def registry() -> Iterator[dict[str, worker.JobType]]:
    """Each test registers its own jobs; the global registry is restored after."""
    saved = dict(worker.REGISTRY), list(worker.STARTUP_HOOKS), list(worker.SHUTDOWN_HOOKS)
    yield worker.REGISTRY
    worker.REGISTRY.clear()
    worker.REGISTRY.update(saved[0])
    worker.STARTUP_HOOKS[:] = saved[1]
    worker.SHUTDOWN_HOOKS[:] = saved[2]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``stores("sqlite", "postgres")`` (or whose module is) run once on each store's ``db``."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", marker.args)


@pytest.fixture
def store_kind() -> str:
    """Which store the test's ``db`` is on: SQLite unless the test is marked to run on more."""
    return "sqlite"


@pytest.fixture
def db(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The test's database: a fresh SQLite file, or (marked for PostgreSQL) the test run's database, emptied."""
    if store_kind == "postgres":
        url: str = request.getfixturevalue("postgres_db")
        return url
    return str(tmp_path / "jobs.db")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(db: str) -> Iterator[Queue]:
    with Queue(db) as q:
        yield q


@pytest.fixture
def make_worker(db: str, clock: FakeClock) -> Iterator[Any]:
    """Workers on the test database and the fake clock, closed after the test."""
    made: list[Worker] = []

    def make(**options: Any) -> Worker:
        options.setdefault("clock", clock)
        options.setdefault("rng", NoJitter())
        options.setdefault("cron", False)  # no rows of the built-in hourly job
        made.append(Worker(db, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def at(clock: FakeClock, seconds: float = 0) -> int:
    """The fake clock's time, plus some seconds, in epoch ms."""
    return int((clock.now + seconds) * 1000)


def rows(db: str, where: str = "1") -> list[Any]:
    """The table's rows, read by another program (stdlib sqlite3, or psycopg for a PostgreSQL URL)."""
    if worker.is_postgres(db):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(db, autocommit=True, row_factory=dict_row) as conn:
            where = "true" if where == "1" else where
            return conn.execute(f"SELECT * FROM worker_jobs WHERE {where} ORDER BY id").fetchall()  # type: ignore[call-overload]
    with sqlite3.connect(db, timeout=5) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(f"SELECT * FROM worker_jobs WHERE {where} ORDER BY id").fetchall()


# --- Real processes: shared by test_processes.py and test_reliability.py -------------

T = TypeVar("T")
POLL = 0.02  # seconds between looks


def create_database(path: Path) -> Path:
    """A database file with the table created (as a web app's Queue would)."""
    conn = worker.connect(path)
    worker.apply_schema(conn)
    conn.close()
    return path


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, T, Z, ...), None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()[0]


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def child_pids(parent: int) -> set[int]:
    """The live (not zombie) children of a process, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if int(ppid) == parent and state != "Z":
            found.add(int(stat.parent.name))
    return found


def is_worker_process(pid: int) -> bool:
    """Guard against pid reuse before killing a pid we did not start directly."""
    try:
        return b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def without_file_permission_override() -> None:
    """In the child before exec: drop the capabilities that let root ignore file modes.

    The interpreter lives under /root (mode 700), so the child cannot simply
    become an unprivileged user; root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    and CAP_FOWNER is held to the owner bits of a file it owns, like anyone else.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        libc.prctl(pr_capbset_drop, capability, 0, 0, 0)  # fails harmlessly when not root


def write_lock_free(db: Path) -> bool:
    """Whether another connection could take the write lock now."""
    conn = sqlite3.connect(db, timeout=0.3, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


@dataclasses.dataclass
class WorkerProcess:
    """One ``python -m worker_cli`` (the `worker` command) process started by a test, its stderr in a file."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> int:
        """kill -9; returns the epoch ms of the kill."""
        killed = worker.now_ms()
        self.popen.kill()
        self.popen.wait(10)
        return killed

    def wait(self, timeout: float) -> int:
        """Its exit code; fails the test if it is still running after ``timeout`` s."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running after {timeout:g} s:\n{self.log()[-4000:]}"
            ) from None

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM once it has set up its signal handlers, and its exit code."""
        wait_for(lambda: " started: " in self.log() or self.popen.poll() is not None, 10, f"worker {self.pid} to start")
        self.send(signal.SIGTERM)
        return self.wait(timeout)

    def stop_outside_write_lock(self, db: Path) -> None:
        """SIGSTOP it, but never while it holds the write lock (which would block everyone)."""
        for _ in range(50):
            self.send(signal.SIGSTOP)
            wait_for(lambda: process_state(self.pid) == "T", 5, "the worker to stop")
            if write_lock_free(db):
                return
            self.send(signal.SIGCONT)
            time.sleep(0.01)
        raise AssertionError("could not stop the worker outside a write transaction")


class Processes:
    """Starts worker processes; at teardown kills every one still alive (and its children)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[WorkerProcess] = []
        self.adopted: set[int] = set()

    def start(self, *args: str, name: str, env: dict[str, str], cwd: Path = HERE) -> WorkerProcess:
        log_path = self.directory / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "worker_cli", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=cwd,
                env=env,
            )
        started = WorkerProcess(popen, log_path)
        self.started.append(started)
        return started

    def run_jobs(self, db: str | Path, jobs_file: Path, *flags: str, name: str) -> WorkerProcess:
        """``worker run --no-cron`` on ``db`` with the jobs of ``jobs_file`` and ``flags``, taking none of the
        worker's settings from this environment, in the test's directory."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
        args = ["run", "--db", str(db), "--jobs", str(jobs_file), "--no-cron", *flags]
        return self.start(*args, name=name, env=env, cwd=self.directory)

    def adopt(self, pids: set[int]) -> None:
        """Grandchildren (a supervisor's workers) to kill at teardown too."""
        self.adopted |= pids

    def kill_all(self) -> None:
        for started in self.started:
            if started.popen.poll() is None:
                # Frozen first, so that a supervisor cannot start a worker between the look and the kill.
                started.send(signal.SIGSTOP)
                with contextlib.suppress(AssertionError):
                    wait_for(lambda: process_state(started.pid) in ("T", "Z", None), 2, "the process to stop")  # noqa: B023
                self.adopted |= child_pids(started.pid)
                started.popen.kill()
                started.popen.wait(10)
        for pid in self.adopted:
            if alive(pid) and is_worker_process(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for started in self.started[-8:]:  # shown by pytest only when the test failed
            print(f"--- {started.log_path.name} (pid {started.pid}) ---\n{started.log()[-4000:]}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Worker processes for one test, all killed at its end."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def serve(db: str) -> Iterator[Callable[..., DashboardServer]]:
    """Dashboards on the test database, on free loopback ports in threads of this process; stopped after."""
    started: list[tuple[DashboardServer, threading.Thread]] = []

    def start(**options: Any) -> DashboardServer:
        server = DashboardServer(db, "127.0.0.1", 0, **options)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="dashboard", daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- PostgreSQL: a database of the test run's own ------------------------------------

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a database made for this test run (worker_test_<pid>_<random>), dropped at its end.

    When PostgreSQL is unreachable the PostgreSQL cases skip, saying so, except
    under CI=true, where that is a failure: CI must never pass by skipping them.
    """
    import psycopg  # the dev extra has it; only the PostgreSQL cases need it

    try:
        admin = psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        detail = str(e).strip().splitlines()[0].removeprefix("connection failed: ")
        why = f"PostgreSQL is unreachable at 127.0.0.1:5432: {detail}"
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    name = f"worker_test_{os.getpid()}_{random.randrange(16**8):08x}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"{POSTGRES_SERVER}/{name}"
        finally:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    """The test run's database with the worker's tables, and no rows in them (ids start at 1 again)."""
    import worker_postgres

    store = worker_postgres.open_store(postgres_url)
    try:
        with store.transaction() as conn:
            conn.execute(
                "TRUNCATE worker_jobs, worker_processes, worker_finished_per_minute, worker_queues RESTART IDENTITY"
            )
    finally:
        store.close()
    return postgres_url
