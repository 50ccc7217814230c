"""The alert engine's store on a real database: each batch is its own committed transaction."""

from __future__ import annotations

import psycopg
import pytest

from alerts.lifecycle import Changes
from alerts.store import AlertStore
from posflow.settings import PostgresSettings, Settings
from posflow.storage.setup import prepare_database

pytestmark = pytest.mark.slow


def test_a_batch_after_a_stray_read_is_still_committed_on_its_own(
    settings: Settings, pg: PostgresSettings
) -> None:
    """A read on the store's connection outside a batch (the reference-data refresh did
    one from another thread, at any moment) leaves an implicit transaction open. A batch
    written then became a savepoint inside it: not durable until something committed,
    and the facts staging table (emptied at commit) kept its rows, so the next batch
    touching the same terminal failed ("ON CONFLICT DO UPDATE command cannot affect row a
    second time") and the engine died; seen in a 50,000-terminal load test."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        prepare_database(conn, settings.storage)
    store = AlertStore(pg.dsn(), group="g-store", channels=[])
    store.open()
    try:
        for battery in (50, 40, 30):
            store.write(
                Changes(
                    terminals={
                        "T-1": {"merchant_id": "M-1", "battery": battery},
                        "T-2": {"merchant_id": "M-1", "battery": battery + 1},
                    }
                ),
                {("pos.telemetry.v1", 0): battery},
            )
            store.conn.execute("SELECT 1")  # the stray read
            with psycopg.connect(pg.dsn()) as other:  # what a restart would load
                facts: dict[str, int] = dict(
                    other.execute(
                        "SELECT terminal_id, (facts->>'battery')::int FROM alert_terminal_facts"
                    ).fetchall()
                )
                offset = other.execute(
                    "SELECT next_offset FROM consumer_offsets WHERE consumer_group = 'g-store'"
                ).fetchone()
            assert facts == {"T-1": battery, "T-2": battery + 1}
            assert offset == (battery,)
    finally:
        store.close()
