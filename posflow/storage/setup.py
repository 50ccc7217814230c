"""What every service that writes to the database runs at start."""

from __future__ import annotations

import logging

import psycopg

from posflow.settings import StorageSettings
from posflow.storage.maintenance import default_retention, maintain
from posflow.storage.migrate import StoragePath, detect_path, migrate
from posflow.storage.policies import apply_timescaledb_policies

__all__ = ["prepare_database", "retention_of"]

log = logging.getLogger("posflow.storage")


def retention_of(storage: StorageSettings) -> dict[str, int]:
    return default_retention(storage.raw_retention_days, storage.rollup_retention_days)


def prepare_database(
    conn: psycopg.Connection[tuple[object, ...]], storage: StorageSettings
) -> StoragePath:
    """Migrate, then set up the active path's upkeep; logs and returns which path it is."""
    applied = migrate(conn)
    path = detect_path(conn)
    if path == "timescaledb":
        apply_timescaledb_policies(conn, storage)
    else:
        maintain(conn, retention_of(storage))  # partitions before the first write
    log.info(
        "storage path: %s (%d migrations applied now)",
        "TimescaleDB" if path == "timescaledb" else "plain PostgreSQL (native partitioning)",
        len(applied),
    )
    return path
