"""Storage on the real PostgreSQL: migrations, idempotent writers, the ledger, crash safety."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from psycopg import sql

from posflow.contracts import Accepted, IngestEnvelope, validate_message
from posflow.errors import PosflowError
from posflow.settings import PostgresSettings, Settings
from posflow.storage import detect_path, drop_expired_partitions, ensure_partitions, migrate
from posflow.storage.ledger import LedgerEntry, LedgerWriter
from posflow.storage.maintenance import refresh_hourly_rollup
from posflow.storage.writers import TelemetryWriter, TransactionWriter
from tests.conftest import ROOT, unique
from tests.unit import samples

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def db(pg: PostgresSettings) -> Iterator[Conn]:
    """A migrated database with today's partitions."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        ensure_partitions(conn)
    with psycopg.connect(pg.dsn()) as conn:
        yield conn


def _tables(conn: Conn) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    ).fetchall()
    return {str(r[0]) for r in rows}


def _dump(conn: Conn, table: str, order: str) -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT * FROM {} ORDER BY {}").format(sql.Identifier(table), sql.SQL(order))
    return conn.execute(query).fetchall()


# --- migrations ----------------------------------------------------------------------


def test_migrations_apply_on_an_empty_database_and_are_a_noop_the_second_time(
    pg: PostgresSettings,
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        first = migrate(conn)
        tables = _tables(conn)
        second = migrate(conn)
        recorded = conn.execute(
            "SELECT version, name, path FROM posflow_schema_migrations ORDER BY version"
        ).fetchall()
        path = detect_path(conn)
    # Later migrations (0003 settlement, ...) belong to their parts; 0001/0002 are storage's.
    assert [(m.version, m.name) for m in first][:2] == [(1, "core"), (2, "timeseries")]
    assert second == []
    assert recorded[:2] == [(1, "core", "both"), (2, "timeseries", path)]
    assert (3, "settlement", "both") in recorded
    assert {
        "telemetry", "transactions", "terminal_health", "telemetry_1m", "telemetry_1h",
        "merchants", "terminals", "terminal_state", "ledger_entries", "ledger_quarantine",
        "merchant_balances", "cashflow_events", "consumer_offsets", "alerts",
        "deadletter_counts",
    } <= tables  # fmt: skip


def test_two_concurrent_migrate_runs_do_not_collide(pg: PostgresSettings) -> None:
    results: list[object] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                start.wait()
                results.append(len(migrate(conn)))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # One applied every migration (0001, 0002 and the later parts'), the other waited on
    # the lock and found nothing to do.
    applied = sorted(r for r in results if isinstance(r, int))
    assert len(applied) == 2, results
    assert applied[0] == 0
    assert applied[1] >= 3


def test_an_edited_migration_is_refused_with_the_fix(db: Conn) -> None:
    db.execute("UPDATE posflow_schema_migrations SET checksum = 'x' WHERE version = 1")
    db.commit()
    db.autocommit = True
    with pytest.raises(PosflowError, match="0001_core changed after it was applied") as err:
        migrate(db)
    assert "add a new one" in str(err.value)


def test_cli_migrate_reports_the_storage_path(pg: PostgresSettings) -> None:
    env = {**os.environ, "POSFLOW_POSTGRES__DATABASE": pg.database}
    run = [sys.executable, "-m", "cli", "db", "migrate"]
    first = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    again = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_core" in first.stdout
    # 0001/0002 are storage's; later parts add theirs (0003 settlement, ...).
    assert re.search(
        r"schema up to date \(\d+ applied now\), storage path: plain", first.stdout
    ) or ("storage path: timescaledb" in first.stdout)
    assert "(0 applied now)" in again.stdout


def test_timescaledb_path_has_hypertables_aggregates_and_policies(
    db: Conn, settings: Settings, storage_path: str
) -> None:
    if storage_path == "plain":
        pytest.skip("a plain-PostgreSQL database: TimescaleDB's objects are not expected there")
    if detect_path(db) != "timescaledb":
        assert not settings.stack.require_timescaledb, "TimescaleDB required but not installed"
        pytest.skip("TimescaleDB is not installed in this stack's PostgreSQL (`posflow stack up`)")
    from posflow.storage.policies import apply_timescaledb_policies

    db.commit()
    db.autocommit = True
    apply_timescaledb_policies(db, settings.storage)
    hypertables = {
        r[0] for r in db.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
    }
    assert {"telemetry", "transactions", "terminal_health"} <= hypertables
    aggregates = {
        r[0]
        for r in db.execute("SELECT view_name FROM timescaledb_information.continuous_aggregates")
    }
    assert {"telemetry_1m", "telemetry_1h"} <= aggregates
    segment_by = db.execute(
        "SELECT attname FROM timescaledb_information.compression_settings"
        " WHERE hypertable_name = 'telemetry' AND segmentby_column_index IS NOT NULL"
    ).fetchall()
    assert segment_by == [("terminal_id",)]
    jobs = {
        (r[0], r[1])
        for r in db.execute(
            "SELECT proc_name, hypertable_name FROM timescaledb_information.jobs"
            " WHERE hypertable_name IS NOT NULL"
        )
    }
    assert ("policy_compression", "telemetry") in jobs
    assert ("policy_retention", "telemetry") in jobs


# --- telemetry and transactions --------------------------------------------------------


def _telemetry(
    count: int, terminals: int = 5, start: datetime | None = None
) -> list[IngestEnvelope]:
    start = start or datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    out = []
    for i in range(count):
        terminal = f"T-{i % terminals:04d}"
        body = samples.telemetry(
            merchant_id="M-0001",
            terminal_id=terminal,
            seq=i,
            ts=(start + timedelta(seconds=7 * i)).isoformat(),
            **{"battery.level_pct": 20 + i % 80, "battery.charging": i % 3 == 0},
        )
        result = validate_message(
            f"pos/v1/M-0001/{terminal}/telemetry",
            json.dumps(body).encode(),
            # As the bridge received it (the tests write days ahead or behind today too).
            received_at=start + timedelta(seconds=7 * i, milliseconds=40),
            mqtt_mid=1,
        )
        assert isinstance(result, Accepted), result
        out.append(result.envelope)
    return out


def test_writing_the_same_telemetry_batch_twice_leaves_identical_tables(db: Conn) -> None:
    path = detect_path(db)
    writer = TelemetryWriter(db, path)
    batch = _telemetry(600)
    assert writer.write(batch) == 600
    before = {
        "telemetry": _dump(db, "telemetry", "terminal_id, ts, seq"),
        "telemetry_1m": _dump(db, "telemetry_1m", "terminal_id, bucket"),
    }
    assert writer.write(batch) == 0
    assert writer.write(batch[100:300]) == 0
    after = {
        "telemetry": _dump(db, "telemetry", "terminal_id, ts, seq"),
        "telemetry_1m": _dump(db, "telemetry_1m", "terminal_id, bucket"),
    }
    assert after == before
    assert len(before["telemetry"]) == 600


def test_rollups_equal_aggregates_of_the_raw_telemetry(db: Conn) -> None:
    path = detect_path(db)
    writer = TelemetryWriter(db, path)
    batch = _telemetry(900, terminals=3, start=datetime(2026, 11, 23, 9, 0, tzinfo=UTC))
    ensure_partitions(db, today=datetime(2026, 11, 23, tzinfo=UTC).date())
    # Two overlapping writes: the rollup must count each row exactly once.
    writer.write(batch[:600])
    writer.write(batch[300:])
    raw_1m = db.execute(
        """
        SELECT date_trunc('minute', ts, 'UTC'), terminal_id, count(*),
               avg(battery_level_pct)::float8, min(signal_dbm), max(signal_dbm),
               count(*) FILTER (WHERE charging)
          FROM telemetry GROUP BY 1, 2 ORDER BY 2, 1
        """
    ).fetchall()
    view_1m = db.execute(
        "SELECT bucket, terminal_id, samples, battery_avg, signal_min_dbm, signal_max_dbm,"
        " charging_samples FROM telemetry_1m ORDER BY terminal_id, bucket"
    ).fetchall()
    assert view_1m == raw_1m
    raw_1h = db.execute(
        """
        SELECT date_trunc('hour', ts, 'UTC'), terminal_id, count(*), avg(battery_level_pct)::float8
          FROM telemetry GROUP BY 1, 2 ORDER BY 2, 1
        """
    ).fetchall()
    hour_query = (
        "SELECT bucket, terminal_id, samples, battery_avg FROM telemetry_1h"
        " ORDER BY terminal_id, bucket"
    )
    before_refresh = db.execute(hour_query).fetchall()  # live, from the minutes
    db.commit()
    if path == "plain":
        refresh_hourly_rollup(db, now=datetime(2026, 11, 23, 11, 30, tzinfo=UTC))
        db.commit()
    after_refresh = db.execute(hour_query).fetchall()  # 09:00 and 10:00 materialised
    assert before_refresh == after_refresh == raw_1h
    for got, want in zip(after_refresh, raw_1h, strict=True):
        assert got[3] == pytest.approx(want[3])


def test_transactions_writer_is_idempotent_and_keeps_integer_money(db: Conn) -> None:
    writer = TransactionWriter(db, detect_path(db))
    envelopes = []
    for i in range(50):
        body = samples.txn(txn_id=f"tx-{i}", amount_minor=999_999_999_950 + i, seq=i)
        result = validate_message(
            "pos/v1/M-0001/T-0001/txn",
            json.dumps(body).encode(),
            received_at=datetime.now(UTC),
            mqtt_mid=1,
        )
        assert isinstance(result, Accepted), result
        envelopes.append(result.envelope)
    assert writer.write(envelopes) == 50
    assert writer.write(envelopes) == 0
    rows = db.execute(
        "SELECT txn_id, amount_minor FROM transactions ORDER BY amount_minor"
    ).fetchall()
    assert rows == [(f"tx-{i}", 999_999_999_950 + i) for i in range(50)]


def test_partitions_are_created_ahead_absorb_early_rows_and_expire(db: Conn) -> None:
    if detect_path(db) != "plain":
        pytest.skip("native partitioning is the plain-PostgreSQL path; TimescaleDB has chunks")
    far = datetime.now(UTC) + timedelta(days=10)
    writer = TelemetryWriter(db, "plain")
    writer.write(_telemetry(5, start=far))
    in_default = db.execute("SELECT count(*) FROM telemetry_default").fetchone()
    assert in_default == (5,)
    created = ensure_partitions(db, days_behind=0, days_ahead=0, today=far.date())
    db.commit()
    assert f"telemetry_p{far:%Y%m%d}" in created
    # The early rows moved out of the default partition into their day.
    assert db.execute("SELECT count(*) FROM telemetry_default").fetchone() == (0,)
    assert db.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(f"telemetry_p{far:%Y%m%d}"))
    ).fetchone() == (5,)
    dropped = drop_expired_partitions(db, {"telemetry": 1}, today=(far + timedelta(days=3)).date())
    db.commit()
    assert f"telemetry_p{far:%Y%m%d}" in dropped
    assert db.execute("SELECT count(*) FROM telemetry").fetchone() == (0,)


# --- the ledger ----------------------------------------------------------------------------


def _entry(txn_id: str, merchant: str = "M-1", amount: int = 1000, **body: Any) -> LedgerEntry:
    return LedgerEntry(
        txn_id=txn_id,
        merchant_id=merchant,
        terminal_id="T-1",
        txn_type="sale",
        currency="EUR",
        gross_minor=amount,
        fee_minor=amount // 50,
        net_minor=amount - amount // 50,
        occurred_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
        body={"txn_id": txn_id, "amount_minor": amount, **body},
    )


def _ledger_state(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "entries": conn.execute(
            "SELECT txn_id, merchant_id, net_minor FROM ledger_entries ORDER BY txn_id"
        ).fetchall(),
        "balances": _dump(conn, "merchant_balances", "merchant_id, currency"),
        "events": conn.execute(
            "SELECT merchant_id, seq, txn_id, amount_minor, pending_minor FROM cashflow_events"
            " ORDER BY merchant_id, seq"
        ).fetchall(),
        "offsets": conn.execute(
            "SELECT consumer_group, topic, partition, next_offset FROM consumer_offsets"
            " ORDER BY 1, 2, 3"
        ).fetchall(),
    }


def test_writing_the_same_ledger_batch_twice_changes_nothing(db: Conn) -> None:
    writer = LedgerWriter(db, consumer_group="g")
    batch = [_entry(f"tx-{i}", merchant=f"M-{i % 3}", amount=1000 + i) for i in range(30)]
    first = writer.write(batch, offsets={("pos.txn.v1", 0): 30})
    state = _ledger_state(db)
    second = writer.write(batch, offsets={("pos.txn.v1", 0): 30})
    assert (first.applied, first.duplicates) == (30, 0)
    assert (second.applied, second.duplicates, second.quarantined) == (0, 30, [])
    assert _ledger_state(db) == state
    # Balances are the exact integer sums; events are numbered 1..n per merchant.
    nets = {f"M-{m}": sum((1000 + i) - (1000 + i) // 50 for i in range(m, 30, 3)) for m in range(3)}
    assert {(r[0], r[1].strip(), r[2]) for r in state["balances"]} == {
        (m, "EUR", n) for m, n in nets.items()
    }
    for m in range(3):
        seqs = [e[1] for e in state["events"] if e[0] == f"M-{m}"]
        assert seqs == list(range(1, 11))
    assert state["offsets"] == [("g", "pos.txn.v1", 0, 30)]


def test_a_reused_transaction_id_with_another_body_is_quarantined_not_applied(db: Conn) -> None:
    writer = LedgerWriter(db, consumer_group="g")
    writer.write([_entry("tx-1", amount=1000)], offsets={})
    result = writer.write(
        [_entry("tx-1", amount=99_999), _entry("tx-2", amount=500), _entry("tx-2", amount=501)],
        offsets={},
    )
    assert result.applied == 1  # tx-2 (first body)
    assert result.quarantined == ["tx-2", "tx-1"]
    assert db.execute(
        "SELECT txn_id, gross_minor FROM ledger_entries ORDER BY txn_id"
    ).fetchall() == [("tx-1", 1000), ("tx-2", 500)]
    quarantined = db.execute(
        "SELECT txn_id, body->>'amount_minor' FROM ledger_quarantine ORDER BY txn_id"
    ).fetchall()
    assert quarantined == [("tx-1", "99999"), ("tx-2", "501")]
    # The balance moved only for what was applied.
    assert db.execute("SELECT pending_minor FROM merchant_balances").fetchone() == (
        (1000 - 20) + (500 - 10),
    )


@pytest.mark.slow
async def test_sink_killed_between_db_commit_and_kafka_commit_neither_repeats_nor_skips(
    settings: Settings, pg: PostgresSettings, tmp_path: Path
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
    topic, group = unique("t.txn"), unique("ledger")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    expected = set()
    try:
        for i in range(300):
            merchant = f"M-{i % 4}"
            body = samples.txn(
                merchant_id=merchant, terminal_id="T-1", txn_id=f"tx-{i}", amount_minor=100 + i
            )
            result = validate_message(
                f"pos/v1/{merchant}/T-1/txn",
                json.dumps(body).encode(),
                received_at=datetime.now(UTC),
                mqtt_mid=1,
            )
            assert isinstance(result, Accepted), result
            await producer.send(topic, result.envelope.to_json(), key=merchant.encode())
            expected.add(f"tx-{i}")
        await producer.flush()
    finally:
        await producer.stop()

    marker = tmp_path / "committed"
    args = [settings.kafka.bootstrap, topic, group, pg.dsn(), "300"]
    run = [sys.executable, "-m", "tests.integration._ledger_sink_proc"]
    first = subprocess.Popen([*run, *args, "--hang-after-first-commit", str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert marker.exists(), "the sink never committed a batch"
        first.send_signal(signal.SIGKILL)  # after the database commit, before Kafka's
    finally:
        first.kill()
        first.wait()
    applied_before = json.loads(marker.read_text())["applied"]
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM ledger_entries").fetchone() == (applied_before,)
    assert 0 < applied_before < 300

    remaining = [*args[:4], str(300 - applied_before)]
    second = subprocess.run(
        [*run, *remaining], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert second.returncode == 0, second.stderr
    totals = json.loads(second.stdout.strip().splitlines()[-1])
    # Resumed from the offsets stored with the data: nothing re-read, nothing skipped.
    assert totals["duplicates"] == 0
    assert totals["applied"] == 300 - applied_before
    with psycopg.connect(pg.dsn()) as conn:
        ids = {r[0] for r in conn.execute("SELECT txn_id FROM ledger_entries").fetchall()}
        events = conn.execute(
            "SELECT merchant_id, array_agg(seq ORDER BY seq) FROM cashflow_events GROUP BY 1"
        ).fetchall()
        total = conn.execute("SELECT sum(pending_minor) FROM merchant_balances").fetchone()
    assert ids == expected
    assert {m: list(s) for m, s in events} == {
        f"M-{m}": list(range(1, 76)) for m in range(4)
    }  # per merchant, every event once, no gap
    assert total == (sum(100 + i for i in range(300)),)


# --- named read queries ------------------------------------------------------------------


def test_every_named_query_runs_and_returns_what_the_writers_stored(db: Conn) -> None:
    from posflow.storage.queries import QUERIES, run

    start = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    ensure_partitions(db, today=start.date())
    db.commit()
    TelemetryWriter(db, detect_path(db)).write(_telemetry(60, terminals=2, start=start))
    writer = LedgerWriter(db, consumer_group="g")
    writer.write([_entry(f"tx-{i}", merchant="M-1", amount=1000) for i in range(5)], offsets={})
    db.execute(
        "INSERT INTO terminal_state (terminal_id, merchant_id, online, last_seen, health_score)"
        " VALUES ('T-a', 'M-1', true, now(), 35), ('T-b', 'M-1', false, now(), 90)"
    )
    db.execute(
        "INSERT INTO alerts (alert_id, rule, severity, subject_kind, subject_id, state,"
        " started_at) VALUES ('a1', 'battery_low', 'warning', 'terminal', 'T-a', 'firing', now())"
    )
    db.execute(
        "INSERT INTO deadletter_counts VALUES (%s, 'card_data', 2), (%s, 'card_data', 3)",
        [start, start + timedelta(minutes=1)],
    )
    window = {"start": start, "end": start + timedelta(hours=2)}
    params: dict[str, dict[str, Any]] = {
        "fleet_online": {},
        "worst_terminals": {"limit": 1},
        "terminal_telemetry_1m": {"terminal_id": "T-0000", **window},
        "terminal_telemetry_1h": {"terminal_id": "T-0000", **window},
        "merchant_balances": {"merchant_id": "M-1"},
        "merchant_cashflow_page": {
            "merchant_id": "M-1", "after_seq": 2, "limit": 2,
            "start": start, "end": start + timedelta(days=1),
        },
        "open_alerts_by_severity": {},
        "deadletters_by_reason": window,
    }  # fmt: skip
    assert set(params) == set(QUERIES)  # a new query gets a case here
    got = {name: run(db, name, **p) for name, p in params.items()}
    assert got["fleet_online"] == [{"online": 1, "offline": 1}]
    assert [r["terminal_id"] for r in got["worst_terminals"]] == ["T-a"]
    # 30 samples of T-0000, 14 s apart from 09:00: 09:00..09:06 in minutes, one hour.
    assert sum(r["samples"] for r in got["terminal_telemetry_1m"]) == 30
    assert [r["samples"] for r in got["terminal_telemetry_1h"]] == [30]
    assert got["merchant_balances"] == [
        {
            "currency": "EUR",
            "pending_minor": 5 * 980,
            "available_minor": 0,
            "paid_out_minor": 0,
            "updated_at": got["merchant_balances"][0]["updated_at"],
        }
    ]
    assert [r["seq"] for r in got["merchant_cashflow_page"]] == [3, 4]
    assert got["open_alerts_by_severity"] == [{"severity": "warning", "open": 1}]
    assert got["deadletters_by_reason"] == [{"reason": "card_data", "count": 5}]
