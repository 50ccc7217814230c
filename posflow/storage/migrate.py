"""Schema migrations: ordered SQL files, recorded, under an advisory lock.

Files are ``NNNN_name.sql`` (both storage paths) or ``NNNN_name.timescaledb.sql``
/ ``NNNN_name.plain.sql`` (one path). Each applies in its own transaction and
is recorded with its checksum in ``posflow_schema_migrations``; a recorded
file whose text changed is an error, not silently skipped. Two processes may
migrate at once: the second waits on the lock and then finds nothing to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import psycopg

from posflow.errors import PosflowError

__all__ = ["Migration", "StoragePath", "detect_path", "migrate", "pending_migrations"]

log = logging.getLogger("posflow.storage")

StoragePath = Literal["timescaledb", "plain"]

# pg_advisory_lock key: the first 8 bytes of sha256("posflow.migrations"), fixed.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"posflow.migrations").digest()[:8], "big", signed=True)
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(timescaledb|plain))?\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: StoragePath | None  # None: applies on both paths
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _all_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("posflow.storage").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise PosflowError(
                    f"migration file {entry.name} is not named NNNN_name[.timescaledb|.plain].sql",
                    fix="rename it",
                )
            continue
        version, name, path = match.groups()
        found.append(Migration(int(version), name, path, entry.read_text()))  # type: ignore[arg-type]
    return sorted(found, key=lambda m: (m.version, m.path or ""))


def detect_path(conn: psycopg.Connection[tuple[object, ...]]) -> StoragePath:
    """TimescaleDB when its extension is installed in this database, else plain PostgreSQL."""
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return "timescaledb" if row else "plain"


def _ensure_table(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS posflow_schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            path        text NOT NULL,
            checksum    text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def pending_migrations(
    conn: psycopg.Connection[tuple[object, ...]], path: StoragePath
) -> list[Migration]:
    """Migrations for this path not yet applied (checks recorded checksums)."""
    wanted = [m for m in _all_migrations() if m.path in (None, path)]
    applied = {
        int(str(v)): (str(c), str(p))
        for v, c, p in conn.execute(
            "SELECT version, checksum, path FROM posflow_schema_migrations"
        ).fetchall()
    }
    pending = []
    for migration in wanted:
        if migration.version not in applied:
            pending.append(migration)
            continue
        checksum, applied_path = applied[migration.version]
        if applied_path not in (path, "both"):
            raise PosflowError(
                f"the database was migrated for the {applied_path} storage path, "
                f"but this server now is {path}",
                fix="migrate a fresh database; see docs/operations.md (moving to TimescaleDB)",
            )
        if checksum != migration.checksum:
            raise PosflowError(
                f"migration {migration.version:04d}_{migration.name} changed after it was "
                "applied (checksum differs)",
                fix="never edit an applied migration: add a new one that makes the change",
            )
    return pending


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[Migration]:
    """Apply every pending migration; returns those applied (empty the second time)."""
    if not conn.autocommit:
        conn.commit()
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
    try:
        _ensure_table(conn)
        path = detect_path(conn)
        todo = pending_migrations(conn, path)
        for migration in todo:
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO posflow_schema_migrations (version, name, path, checksum)"
                    " VALUES (%s, %s, %s, %s)",
                    [
                        migration.version,
                        migration.name,
                        migration.path or "both",
                        migration.checksum,
                    ],
                )
            log.info("applied migration %04d_%s (%s)", migration.version, migration.name, path)
        return todo
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])
