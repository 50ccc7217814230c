from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from posflow.settings import PostgresSettings, Settings
from posflow.stack import Stack
from posflow.stack._process import _CHILDREN
from posflow.storage.databases import create_database
from tests.conftest import unique


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration talks to real servers.
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.stack)


# Modules whose tests run on both storage paths: TimescaleDB (the default, every test) and
# plain PostgreSQL with native partitioning (the supported fallback), same cluster.
BOTH_PATHS = frozenset(
    {
        "test_storage",
        "test_storage_maintenance",
        "test_storage_writers",
        "test_rawsink",
        "test_settlement",
        "test_settlement_worker",
        "test_settlement_properties",
        "test_dashboards_sql",
    }
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg" in metafunc.fixturenames and metafunc.module.__name__.split(".")[-1] in BOTH_PATHS:
        metafunc.parametrize("storage_path", ["timescaledb", "plain"])


@pytest.fixture
def pg(settings: Settings, stack: Stack, storage_path: str) -> Iterator[PostgresSettings]:
    """A fresh, empty database of this test's own, on the TimescaleDB or the plain path.

    Where the stack has TimescaleDB, the default database has it (copied from the stack's
    template, see posflow.storage.databases); a plain-path one never does.
    """
    name = unique("t").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        got = create_database(admin, name, path=None if storage_path == "timescaledb" else "plain")
    if storage_path == "timescaledb" and settings.stack.require_timescaledb:
        assert got == "timescaledb", "REQUIRE_TIMESCALEDB is set but the stack has no template"
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


def stop_own_mosquitto(stack: Stack, directory: Path) -> None:
    """Stop a test's own Mosquitto (not the shared stack's), reap its process (no zombie,
    no ResourceWarning) and remove its stack directory."""
    stack.down(["mosquitto"])
    conf = str(stack.mosquitto.dir / "mosquitto.conf")
    for child in _CHILDREN:
        if isinstance(child.args, list) and child.args[-1] == conf:
            child.wait(timeout=10)
    shutil.rmtree(directory, ignore_errors=True)
