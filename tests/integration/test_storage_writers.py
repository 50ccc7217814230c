"""The time-series writers after a failed batch: the next batch still goes in."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest

from posflow.contracts import Accepted, IngestEnvelope, validate_message
from posflow.settings import PostgresSettings
from posflow.storage import detect_path, migrate
from posflow.storage.writers import TransactionWriter
from tests.unit import samples


def _envelope(i: int, amount: int) -> IngestEnvelope:
    body = samples.txn(txn_id=f"tx-{i}", amount_minor=amount, seq=i)
    result = validate_message(
        "pos/v1/M-0001/T-0001/txn",
        json.dumps(body).encode(),
        received_at=datetime.now(UTC),
        mqtt_mid=1,
    )
    assert isinstance(result, Accepted), result
    return result.envelope


def test_a_first_batch_refused_by_the_database_does_not_break_the_writer(
    pg: PostgresSettings,
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        migrate(conn)
        conn.execute("ALTER TABLE transactions ADD CONSTRAINT no_13 CHECK (amount_minor <> 1313)")
    with psycopg.connect(pg.dsn()) as conn:
        writer = TransactionWriter(conn, detect_path(conn))
        # The very first batch creates the staging table inside its transaction; the
        # rollback removes it again, and the writer must notice.
        with pytest.raises(psycopg.errors.CheckViolation):
            writer.write([_envelope(1, 1313), _envelope(2, 200)])
        assert writer.write([_envelope(2, 200), _envelope(3, 300)]) == 2
        rows = conn.execute("SELECT txn_id, amount_minor FROM transactions ORDER BY 1").fetchall()
    assert rows == [("tx-2", 200), ("tx-3", 300)]
