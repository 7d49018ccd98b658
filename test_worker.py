"""Specification of the worker, as tests.  Real database files under tmp_path."""

from __future__ import annotations

import worker


def test_schema_version_is_the_last_section_of_schema_sql() -> None:
    assert worker.schema_version() == 1
