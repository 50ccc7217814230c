"""Creating a database on the TimescaleDB or the plain-PostgreSQL storage path.

The TimescaleDB extension can only be created by a superuser, so a fresh
database of an ordinary role (a test's, a benchmark's, a load run's) gets it by
being copied from a template that has it: ``posflow_template_timescaledb``, made
by the local stack. The template refuses connections: TimescaleDB starts a
background scheduler in every database with the extension that accepts them,
and a session in a template makes ``CREATE DATABASE`` from it fail ("source
database is being accessed by other users"). That is why the extension is not
simply put into ``template1``.
"""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from posflow.storage.migrate import StoragePath

__all__ = [
    "TIMESCALEDB_TEMPLATE",
    "create_database",
    "drop_database",
    "timescaledb_template_exists",
]

TIMESCALEDB_TEMPLATE = "posflow_template_timescaledb"


def timescaledb_template_exists(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_database WHERE datname = %s AND datistemplate",
        [TIMESCALEDB_TEMPLATE],
    ).fetchone()
    return row is not None


def create_database(
    admin: psycopg.Connection[tuple[object, ...]],
    name: str,
    *,
    path: StoragePath | None = None,
    owner: str | None = None,
) -> StoragePath:
    """``CREATE DATABASE name`` on the wanted storage path; returns the path it is on.

    ``path=None`` takes TimescaleDB where the cluster's template has it, else plain.
    ``path="timescaledb"`` where the template is missing is an error; ``"plain"``
    copies ``template0``. ``admin`` must be in autocommit.
    """
    has_template = timescaledb_template_exists(admin)
    if path == "timescaledb" and not has_template:
        raise RuntimeError(
            f"database {name}: no {TIMESCALEDB_TEMPLATE} template in this cluster, so no "
            "TimescaleDB (`posflow stack up` makes it where the extension is installed)"
        )
    chosen: StoragePath = path or ("timescaledb" if has_template else "plain")
    template = TIMESCALEDB_TEMPLATE if chosen == "timescaledb" else "template0"
    statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template)
    )
    if owner is not None:
        statement = sql.SQL("{} OWNER {}").format(statement, sql.Identifier(owner))
    # ObjectInUse: a session passing through the template.
    _execute_retrying(admin, statement, psycopg.errors.ObjectInUse)
    return chosen


def drop_database(admin: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)``; ``admin`` must be in autocommit.

    TimescaleDB's scheduler (a superuser's background worker) may be in the database for a
    moment, and FORCE may not end it ("insufficient privilege"): the drop is tried again.
    """
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    _execute_retrying(admin, statement, psycopg.errors.InsufficientPrivilege)


def _execute_retrying(
    admin: psycopg.Connection[tuple[object, ...]],
    statement: sql.Composed,
    retry_on: type[psycopg.Error],
) -> None:
    """Execute ``statement``; on ``retry_on`` again every 0.5 s, 20 attempts in all."""
    for attempt in range(20):
        try:
            admin.execute(statement)
        except retry_on:
            if attempt == 19:
                raise
            time.sleep(0.5)
        else:
            return
