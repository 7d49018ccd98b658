"""The store contract: what any store must do, and the fences it must keep (River's driver test suite is the model).

Every test of a verb takes the ``store`` fixture, which today yields the SQLite
store only; a later store joins by adding its case to the fixture.
"""

from __future__ import annotations

import re

import worker


def allowed_statuses(table: str) -> list[str]:
    """The values the CHECK on ``table``.status allows, read from the table schema.sql makes."""
    _, create = worker._schema_objects()[table]
    found = re.search(r"CHECK \(status IN \(([^)]*)\)\)", create)
    assert found, f"{table} has no CHECK on status"
    return [value.strip().strip("'") for value in found.group(1).split(",")]


def test_status_enum_names_exactly_the_states_the_schema_allows() -> None:
    assert allowed_statuses("worker_jobs") == [status.value for status in worker.Status]
    assert tuple(worker.Status) == worker.STATUSES
    finished = [worker.Status.SUCCEEDED, worker.Status.FAILED, worker.Status.CANCELLED]
    assert allowed_statuses("worker_finished_per_minute") == finished


def test_a_status_compares_equal_to_the_plain_string_a_row_holds() -> None:
    assert worker.Status.PENDING == "pending"
    assert f"{worker.Status.FAILED}" == "failed"
