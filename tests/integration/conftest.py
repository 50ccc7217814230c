from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from posflow.settings import PostgresSettings, Settings
from posflow.stack import Stack
from tests.conftest import unique


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration talks to real servers.
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.stack)


@pytest.fixture
def pg(settings: Settings, stack: Stack) -> Iterator[PostgresSettings]:
    """A fresh, empty database of this test's own."""
    name = unique("t").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    # A server-side process (autovacuum, a backend still exiting) can make FORCE fail for a
    # moment with "insufficient privilege": try again shortly rather than fail the test.
    for attempt in range(10):
        try:
            with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            break
        except psycopg.errors.InsufficientPrivilege:
            if attempt == 9:
                raise
            time.sleep(0.5)
