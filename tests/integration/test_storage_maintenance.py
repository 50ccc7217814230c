"""Every service runs the storage upkeep at start: concurrent starts must not collide."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg
import pytest

from posflow.settings import PostgresSettings, StorageSettings
from posflow.storage.maintenance import default_retention, maintain
from posflow.storage.migrate import detect_path, migrate
from posflow.storage.policies import apply_timescaledb_policies
from posflow.storage.setup import retention_of


def test_concurrent_maintenance_creates_each_partition_once_without_errors(
    pg: PostgresSettings,
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        if detect_path(conn) != "plain":
            pytest.skip("TimescaleDB makes chunks itself: see the next test for its upkeep")
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


def test_concurrent_timescaledb_upkeep_runs_every_policy_job_cleanly(
    pg: PostgresSettings,
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        if detect_path(conn) != "timescaledb":
            pytest.skip("plain PostgreSQL: partitions, see the test above")
        apply_timescaledb_policies(conn, StorageSettings())
    errors: list[BaseException] = []
    results: list[dict[str, object]] = []
    start = threading.Barrier(3)

    def one(autocommit: bool) -> None:
        try:
            with psycopg.connect(pg.dsn(), autocommit=autocommit) as conn:
                start.wait(timeout=10)
                results.append(maintain(conn, retention_of(StorageSettings())))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(results) == 3
    for result in results:  # the advisory lock makes them take turns; none fails
        assert result["path"] == "timescaledb"
        assert result["failed"] == []
        jobs = sorted(run.job for run in result["jobs"])  # type: ignore[attr-defined]
        assert jobs == [
            "policy_compression telemetry",
            "policy_compression terminal_health",
            "policy_refresh_continuous_aggregate fleet_battery_1m",
            "policy_refresh_continuous_aggregate fleet_signal_1m",
            "policy_refresh_continuous_aggregate telemetry_1h",
            "policy_refresh_continuous_aggregate telemetry_1m",
            "policy_retention fleet_battery_1m",
            "policy_retention fleet_signal_1m",
            "policy_retention telemetry",
            "policy_retention telemetry_1h",
            "policy_retention telemetry_1m",
            "policy_retention terminal_health",
            "policy_retention transactions",
        ]


def test_services_starting_together_apply_the_policies_without_colliding(
    pg: PostgresSettings,
) -> None:
    """Every service prepares the database at start; four at once each remove and re-add
    every policy (a lock makes them take turns: without it one fails with "tuple
    concurrently deleted"), and the policies end as the settings say, once each."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        if detect_path(conn) != "timescaledb":
            pytest.skip("plain PostgreSQL has no policies: partitions, see the first test")
    errors: list[BaseException] = []
    start = threading.Barrier(4)
    storage = StorageSettings(compress_after_days=3)

    def one() -> None:
        try:
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                start.wait(timeout=10)
                for _ in range(5):
                    apply_timescaledb_policies(conn, storage)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with psycopg.connect(pg.dsn()) as conn:
        rows = conn.execute(
            "SELECT hypertable_name, config->>'compress_after' FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_compression' ORDER BY 1"
        ).fetchall()
    assert rows == [("telemetry", "3 days"), ("terminal_health", "3 days")]
