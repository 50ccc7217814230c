"""The run's loss accounting counts the run's own rows, not an earlier run's of the same fleet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from posflow.settings import PostgresSettings
from posflow.storage import migrate
from simulator.accounting import wait_for_rows


def test_rows_of_an_earlier_run_of_the_same_fleet_are_not_counted(pg: PostgresSettings) -> None:
    now = datetime.now(UTC)
    earlier, this_run = now - timedelta(minutes=20), now - timedelta(minutes=2)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        for seq, received in enumerate([earlier] * 5 + [this_run] * 3):
            conn.execute(
                "INSERT INTO telemetry (ts, terminal_id, merchant_id, seq, received_at)"
                " VALUES (%s, 'T-demo-0001', 'M-demo-01', %s, %s)",
                [received, seq, received],
            )
        conn.execute(
            "INSERT INTO transactions (ts, txn_id, merchant_id, terminal_id, txn_type, status,"
            " amount_minor, tip_minor, currency, auth_latency_ms, scheme, entry_mode,"
            " received_at) VALUES (%s, 'x1', 'M-demo-01', 'T-demo-0001', 'sale', 'approved',"
            " 100, 0, 'EUR', 300, 'visa', 'contactless', %s)",
            [this_run, this_run],
        )
    assert wait_for_rows(pg.dsn(), "demo", 4, timeout_s=5, still_s=0.5) == 9
    since = now - timedelta(minutes=5)
    assert wait_for_rows(pg.dsn(), "demo", 4, timeout_s=5, still_s=0.5, since=since) == 4
