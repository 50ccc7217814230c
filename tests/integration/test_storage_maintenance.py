"""Every service runs the storage upkeep at start: concurrent starts must not collide."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg

from posflow.settings import PostgresSettings
from posflow.storage.maintenance import default_retention, maintain
from posflow.storage.migrate import migrate


def test_concurrent_maintenance_creates_each_partition_once_without_errors(
    pg: PostgresSettings,
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    errors: list[BaseException] = []
    created: list[list[str]] = []
    start = threading.Barrier(4)
    now = datetime(2031, 5, 20, 12, tzinfo=UTC)  # days no partition exists for yet

    def one(autocommit: bool) -> None:
        try:
            with psycopg.connect(pg.dsn(), autocommit=autocommit) as conn:
                start.wait(timeout=10)
                result = maintain(conn, default_retention(30, 400), now=now)
                created.append(list(result["created"]))  # type: ignore[call-overload]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    everything = sorted(name for names in created for name in names)
    assert len(everything) == len(set(everything))  # each partition created by one of them
    assert "telemetry_p20310520" in everything
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE c.relname = 'telemetry_p20310520'"
        ).fetchone()
    assert row == (1,)
