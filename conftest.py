"""Shared by the test modules: a real database file, a fake clock, a clean registry, process helpers."""

from __future__ import annotations

import ctypes
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import worker
from worker import Queue, Worker

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


@pytest.fixture
def db(tmp_path: Path) -> str:
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


def rows(db: str, where: str = "1") -> list[sqlite3.Row]:
    """The table's rows, read by another program (stdlib sqlite3)."""
    with sqlite3.connect(db, timeout=5) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(f"SELECT * FROM worker_jobs WHERE {where} ORDER BY id").fetchall()


# --- Real processes: shared by test_processes.py and test_reliability.py -------------

T = TypeVar("T")
POLL = 0.02  # seconds between looks


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
