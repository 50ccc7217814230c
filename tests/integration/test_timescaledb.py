"""What TimescaleDB is for, on the real extension: values checked, not only objects.

Hypertables with their chunk intervals, continuous aggregates with real-time
aggregation, compression segmented by terminal (queries across compressed and
uncompressed chunks stay exact, a replay into a compressed chunk adds nothing),
retention that drops old telemetry and never touches the ledger or the audit
trail, and the policy jobs run by ``maintain()`` with their effect in the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from posflow.contracts import Accepted, IngestEnvelope, Telemetry, validate_message
from posflow.settings import PostgresSettings, Settings, StorageSettings
from posflow.storage import detect_path, migrate
from posflow.storage.ledger import LedgerEntry, LedgerWriter
from posflow.storage.maintenance import maintain
from posflow.storage.policies import apply_timescaledb_policies
from posflow.storage.setup import retention_of
from posflow.storage.writers import TelemetryWriter
from tests.unit import samples

Conn = psycopg.Connection[tuple[Any, ...]]
STORAGE = StorageSettings(raw_retention_days=30, rollup_retention_days=400, compress_after_days=2)


@pytest.fixture
def tsdb(pg: PostgresSettings, settings: Settings) -> Iterator[Conn]:
    """A migrated TimescaleDB database with posflow's policies, in autocommit."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        if detect_path(conn) != "timescaledb":
            assert not settings.stack.require_timescaledb, "TimescaleDB required, not installed"
            pytest.skip("TimescaleDB is not installed in this stack's PostgreSQL")
        apply_timescaledb_policies(conn, STORAGE)
        yield conn


def _readings(
    start: datetime, minutes: int, terminals: int = 3, every_s: int = 60
) -> list[IngestEnvelope]:
    """One reading per terminal every ``every_s`` from ``start``; battery = minute % 100."""
    out = []
    for step in range(minutes * 60 // every_s):
        ts = start + timedelta(seconds=step * every_s)
        for t in range(terminals):
            terminal = f"T-{t}"
            body = samples.telemetry(
                merchant_id="M-1", terminal_id=terminal, seq=step,
                ts=ts.isoformat(), **{"battery.level_pct": (step + t) % 100},
            )  # fmt: skip
            result = validate_message(
                f"pos/v1/M-1/{terminal}/telemetry", json.dumps(body).encode(),
                received_at=ts + timedelta(milliseconds=40), mqtt_mid=1,
            )  # fmt: skip
            assert isinstance(result, Accepted), result
            out.append(result.envelope)
    return out


def _write(conn: Conn, batch: list[IngestEnvelope]) -> int:
    conn.autocommit = False
    try:
        written = TelemetryWriter(conn, "timescaledb").write(batch)
        conn.commit()
    finally:
        conn.autocommit = True
    return written


def _one(conn: Conn, query: str, *params: object) -> Any:
    row = conn.execute(query.encode(), params).fetchone()
    assert row is not None
    return row[0]


def test_hypertables_have_the_chunk_intervals_sized_for_50000_terminals(tsdb: Conn) -> None:
    intervals: dict[str, timedelta] = dict(
        tsdb.execute(
            "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = 'public'"
            " AND hypertable_name IN ('telemetry', 'terminal_health', 'transactions')"
        ).fetchall()
    )
    assert intervals == {
        "telemetry": timedelta(hours=2),
        "terminal_health": timedelta(hours=2),
        "transactions": timedelta(days=1),
    }


def test_continuous_aggregates_answer_in_real_time_and_after_refresh_alike(tsdb: Conn) -> None:
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=50)
    batch = _readings(start, minutes=40)  # 3 terminals, one reading a minute
    assert _write(tsdb, batch) == 120
    realtime = {
        view: tsdb.execute(
            f"SELECT terminal_id, sum(samples), min(battery_min), max(battery_max) FROM {view}"  # noqa: S608
            " GROUP BY terminal_id ORDER BY terminal_id"
        ).fetchall()
        for view in ("telemetry_1m", "telemetry_1h")
    }
    expected = [(f"T-{t}", 40, t, 39 + t) for t in range(3)]
    assert realtime == {"telemetry_1m": expected, "telemetry_1h": expected}
    flags: dict[str, bool] = dict(
        tsdb.execute(
            "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates"
        ).fetchall()
    )
    assert flags == {  # every continuous aggregate answers in real time
        "telemetry_1m": False,
        "telemetry_1h": False,
        "fleet_battery_1m": False,
        "fleet_signal_1m": False,
    }

    result = maintain(tsdb, retention_of(STORAGE))  # runs the refresh policies
    assert result["failed"] == []
    table = sql.Identifier(
        "_timescaledb_internal", f"_materialized_hypertable_{_mat_id(tsdb, 'telemetry_1m')}"
    )
    row = tsdb.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    materialised = row[0] if row else 0
    assert materialised > 0  # the refresh wrote buckets, it did not only return
    # A late reading in an already materialised minute is in the view after the next run.
    late = _readings(start + timedelta(minutes=5), minutes=1, terminals=1)
    late_env = late[0].model_copy(
        update={"payload": late[0].payload.model_copy(update={"seq": 10_000})}
    )
    assert _write(tsdb, [late_env]) == 1
    assert maintain(tsdb, retention_of(STORAGE))["failed"] == []
    minute = _one(
        tsdb,
        "SELECT samples FROM telemetry_1m WHERE terminal_id = 'T-0' AND bucket = %s",
        start + timedelta(minutes=5),
    )
    assert minute == 2


def _mat_id(conn: Conn, view: str) -> int:
    return int(
        _one(
            conn,
            "SELECT mat_hypertable_id FROM _timescaledb_catalog.continuous_agg"
            " WHERE user_view_name = %s",
            view,
        )
    )


def test_compressed_and_uncompressed_chunks_answer_one_query_exactly(tsdb: Conn) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old = _readings(now - timedelta(days=3), minutes=120, every_s=300)  # compressed by policy
    new = _readings(now - timedelta(hours=3), minutes=120, every_s=300)  # stays row-based
    assert _write(tsdb, old + new) == len(old) + len(new) == 144
    assert maintain(tsdb, retention_of(STORAGE))["failed"] == []
    chunks = tsdb.execute(
        "SELECT range_end < now() - interval '2 days', is_compressed"
        " FROM timescaledb_information.chunks WHERE hypertable_name = 'telemetry'"
    ).fetchall()
    assert {(True, True), (False, False)} == set(chunks)  # old ones compressed, new not
    stats = tsdb.execute(
        "SELECT before_compression_total_bytes, after_compression_total_bytes"
        " FROM hypertable_compression_stats('telemetry')"
    ).fetchone()
    assert stats is not None
    assert stats[1] is not None
    got = tsdb.execute(
        "SELECT terminal_id, count(*), sum(battery_level_pct), min(ts), max(ts) FROM telemetry"
        " WHERE ts >= %s GROUP BY terminal_id ORDER BY terminal_id",
        [now - timedelta(days=4)],
    ).fetchall()
    want = []
    for t in range(3):
        rows = [
            e.payload
            for e in old + new
            if e.terminal_id == f"T-{t}" and isinstance(e.payload, Telemetry)
        ]
        levels = sum(p.battery.level_pct for p in rows)
        want.append((f"T-{t}", 48, levels, min(p.ts for p in rows), max(p.ts for p in rows)))
    assert got == want
    # The raw sink replays a batch after a crash: into a compressed chunk it adds nothing.
    assert _write(tsdb, old[:10]) == 0
    assert _one(tsdb, "SELECT count(*) FROM telemetry") == 144


def test_retention_drops_old_telemetry_and_leaves_the_ledger_and_audit_whole(
    tsdb: Conn,
) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    ancient = now - timedelta(days=40)
    assert _write(tsdb, _readings(ancient, minutes=60, every_s=600)) == 18
    assert _write(tsdb, _readings(now - timedelta(hours=1), minutes=30, every_s=600)) == 9
    tsdb.autocommit = False
    entries = [
        LedgerEntry(
            txn_id=f"tx-{i}",
            merchant_id="M-1",
            terminal_id="T-0",
            txn_type="sale",
            currency="EUR",
            gross_minor=1000 + i,
            fee_minor=20,
            net_minor=980 + i,
            occurred_at=ancient + timedelta(minutes=i),
            body={"txn_id": f"tx-{i}"},
        )
        for i in range(5)
    ]
    LedgerWriter(tsdb, consumer_group="g").write(entries, offsets={})
    tsdb.commit()
    tsdb.execute(
        "INSERT INTO audit_log (seq, at, actor, role, action, target, source, outcome,"
        " prev_hash, hash) VALUES (1, %s, 'a', 'admin', 'x', 'y', 'cli', 'ok', '0', '1')",
        [ancient],
    )
    tsdb.commit()
    tsdb.autocommit = True
    ledger_before = tsdb.execute(
        "SELECT txn_id, net_minor, occurred_at FROM ledger_entries ORDER BY txn_id"
    ).fetchall()

    result = maintain(tsdb, retention_of(STORAGE))
    assert result["failed"] == []
    assert _one(tsdb, "SELECT count(*) FROM telemetry WHERE ts < now() - interval '30 days'") == 0
    assert _one(tsdb, "SELECT count(*) FROM telemetry") == 9  # the recent readings stay
    assert (
        tsdb.execute(
            "SELECT txn_id, net_minor, occurred_at FROM ledger_entries ORDER BY txn_id"
        ).fetchall()
        == ledger_before
    )
    assert len(ledger_before) == 5
    assert _one(tsdb, "SELECT count(*) FROM audit_log") == 1
    # No policy of any kind is attached to money or audit tables.
    targets = {
        r[0]
        for r in tsdb.execute(
            "SELECT hypertable_name FROM timescaledb_information.jobs"
            " WHERE hypertable_name IS NOT NULL"
        )
    }
    assert targets.isdisjoint({"ledger_entries", "merchant_balances", "audit_log", "payouts"})
    hypertables = {
        r[0]
        for r in tsdb.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
    }
    assert "ledger_entries" not in hypertables  # a plain table with a unique txn id
