"""RQ's side of the benchmark: plain functions, imported by the worker by dotted name."""

from __future__ import annotations

import time


def noop() -> None:
    """Does nothing."""


def stamp() -> int:
    """Returns when it started (epoch ns)."""
    return time.time_ns()
