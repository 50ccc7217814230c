"""Daily range partitions on plain PostgreSQL: created ahead, dropped for retention.

TimescaleDB does this itself (chunks, retention policies); on plain PostgreSQL
``ensure_partitions`` creates one partition per day around today and
``drop_expired_partitions`` removes whole days past retention, which is
instant compared with deleting rows.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql

from posflow.storage.migrate import detect_path

__all__ = ["PARTITIONED", "drop_expired_partitions", "ensure_partitions"]

# Partitioned table -> its partitioning column.
PARTITIONED = {
    "telemetry": "ts",
    "transactions": "ts",
    "terminal_health": "window_start",
    "telemetry_rollup_1m": "bucket",
    "telemetry_rollup_1h": "bucket",
}
_DAY = re.compile(r"_p(\d{8})$")


def _existing(conn: psycopg.Connection[tuple[object, ...]], table: str) -> set[str]:
    rows = conn.execute(
        """
        SELECT c.relname FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.relname = %s
        """,
        [table],
    ).fetchall()
    return {str(r[0]) for r in rows}


def ensure_partitions(
    conn: psycopg.Connection[tuple[object, ...]],
    *,
    days_behind: int = 2,
    days_ahead: int = 3,
    today: date | None = None,
) -> list[str]:
    """Create the missing daily partitions of every partitioned table; returns their names.

    Rows already in the DEFAULT partition for a new day move into it, so
    creating a partition for a day that received early data never fails.
    """
    if detect_path(conn) == "timescaledb":
        return []  # hypertables make their chunks as rows arrive
    today = today or datetime.now(UTC).date()
    created = []
    for table, column in PARTITIONED.items():
        existing = _existing(conn, table)
        for offset in range(-days_behind, days_ahead + 1):
            day = today + timedelta(days=offset)
            name = f"{table}_p{day:%Y%m%d}"
            if name in existing:
                continue
            low = datetime(day.year, day.month, day.day, tzinfo=UTC)
            high = low + timedelta(days=1)
            ident = {
                "part": sql.Identifier(name),
                "table": sql.Identifier(table),
                "default": sql.Identifier(f"{table}_default"),
                "col": sql.Identifier(column),
            }
            with conn.transaction():
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {part} "
                        "(LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                    ).format(**ident)
                )
                conn.execute(
                    sql.SQL(
                        "WITH moved AS (DELETE FROM {default} WHERE {col} >= %s AND {col} < %s "
                        "RETURNING *) INSERT INTO {part} SELECT * FROM moved"
                    ).format(**ident),
                    [low, high],
                )
                conn.execute(  # DDL takes no parameters: bounds as literals
                    sql.SQL(
                        "ALTER TABLE {table} ATTACH PARTITION {part} "
                        "FOR VALUES FROM ({lo}) TO ({hi})"
                    ).format(**ident, lo=sql.Literal(low), hi=sql.Literal(high))
                )
            created.append(name)
    return created


def drop_expired_partitions(
    conn: psycopg.Connection[tuple[object, ...]],
    retention: dict[str, int],
    *,
    today: date | None = None,
) -> list[str]:
    """Drop daily partitions entirely older than ``retention[table]`` days; returns names."""
    if detect_path(conn) == "timescaledb":
        return []  # retention policies drop whole chunks (jobs.py)
    today = today or datetime.now(UTC).date()
    dropped = []
    for table, days in retention.items():
        cutoff = today - timedelta(days=days)
        for name in sorted(_existing(conn, table)):
            match = _DAY.search(name)
            if match is None:
                continue
            day = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC).date()
            if day + timedelta(days=1) <= cutoff:
                with conn.transaction():
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                dropped.append(name)
        column = PARTITIONED[table]
        with conn.transaction():
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE {} < %s").format(
                    sql.Identifier(f"{table}_default"), sql.Identifier(column)
                ),
                [datetime(cutoff.year, cutoff.month, cutoff.day, tzinfo=UTC)],
            )
    return dropped
