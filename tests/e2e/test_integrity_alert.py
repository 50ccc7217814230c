"""A reused transaction id with another body, from the settlement worker to an alert.

The real chain: a payment and then a different payment under the same id go into the
txn topic; `posflow settlement worker` applies the first, quarantines the second and
publishes an integrity event; `posflow alerts run` turns it into a critical
ledger_integrity alert for that merchant. The balance counts the first payment once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from cli.harness import Pipeline
from posflow.settings import KafkaSettings, PostgresSettings, Settings
from posflow.stack import Stack, ensure_topics
from simulator.fleet import build_fleet
from simulator.register import register_fleet
from tests.conftest import unique
from tests.integration._settlement_reference import envelope
from tests.unit import samples

# The bridge refuses clocks far from the time of receipt: payloads carry the run's time.
NOW = datetime.now(UTC).isoformat()

pytestmark = pytest.mark.slow


def _rows(pg: PostgresSettings, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn()) as conn:
        return conn.execute(query.encode(), params).fetchall()


async def test_a_reused_txn_id_with_another_body_raises_a_ledger_integrity_alert(
    settings: Settings, pg: PostgresSettings, stack: Stack
) -> None:
    run_id = unique("ia").split("-")[1]
    prefix = f"ia{run_id}"
    s = settings.model_copy(
        update={
            "kafka": KafkaSettings(**{**settings.kafka.model_dump(), "topic_prefix": prefix}),
            "postgres": pg,
        }
    )
    await ensure_topics(s)
    fleet = build_fleet(1, seed=s.simulator.seed, name=f"ia{run_id}")
    register_fleet(s, fleet, mqtt=False)  # the merchant exists before the engine starts
    terminal = fleet.terminals[0]
    merchant = terminal.merchant.merchant_id
    pipeline = Pipeline(settings, prefix, run_id, database=pg.database)
    try:
        pipeline.start(worker=False, settlement=True, alerts=True)
        txn_id = f"{terminal.terminal_id}:000001"
        first = samples.txn(ts=NOW, merchant_id=merchant, terminal_id=terminal.terminal_id,
                            txn_id=txn_id, amount_minor=1250,
                            currency=terminal.merchant.city.currency)  # fmt: skip
        other = {**first, "amount_minor": 9999}  # same id, another body
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for body in (first, other):
                env = envelope(body)
                await producer.send_and_wait(f"{prefix}.txn.v1", env.to_json(),
                                             key=env.kafka_key())  # fmt: skip
        finally:
            await producer.stop()

        query = (
            "SELECT rule, severity, subject_kind, subject_id, state, summary FROM alerts"
            " WHERE merchant_id = %s"
        )
        deadline = time.monotonic() + 60
        alerts: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            alerts = _rows(pg, query, merchant)
            if any(a[4] == "firing" for a in alerts):
                break
            await asyncio.sleep(0.5)
    finally:
        pipeline.stop()
    assert len(alerts) == 1, alerts
    rule, severity, kind, subject, state, summary = alerts[0]
    assert (rule, severity, kind, subject, state) == (
        "ledger_integrity", "critical", "merchant", merchant, "firing",
    )  # fmt: skip
    assert txn_id in summary, summary
    assert "txn_id_conflict" in summary, summary
    # The first body counted once; the second quarantined, never applied.
    assert _rows(pg, "SELECT count(*) FROM ledger_entries WHERE txn_id = %s", txn_id) == [(1,)]
    assert _rows(
        pg, "SELECT (body->>'amount_minor')::bigint, reason FROM ledger_quarantine"
        " WHERE txn_id = %s", txn_id,
    ) == [(9999, "duplicate transaction id with a different body")]  # fmt: skip
    [(gross,)] = _rows(
        pg, "SELECT sum(gross_minor) FROM ledger_entries WHERE merchant_id = %s", merchant
    )
    assert gross == 1250
