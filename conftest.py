"""Fixtures shared by the test modules: a real database file, a fake clock, a clean registry."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
